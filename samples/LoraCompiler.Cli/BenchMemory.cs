using LoraCompiler.Benchmarks;

namespace LoraCompiler.Cli;

/// <summary>
/// <c>lora bench memory</c>: the peak private memory of N training steps. With <c>--no-reference</c> it
/// trains our generated trainer in this process and prints what it measured (and, as the last line,
/// the same as JSON for the program that started it); with <c>--seqs</c> or <c>--budgets</c> each
/// sequence length or budget runs in a fresh child process so peaks do not mix. Without
/// <c>--no-reference</c> it hands over to <c>lora-bench</c> (samples/LoraCompiler.Bench), which runs
/// ours and a TorchSharp autograd reference each in its own process and prints them side by side: the
/// TorchSharp dependency stays out of this program. What both share is the benchmarks library
/// (samples/LoraCompiler.Benchmarks: <see cref="MemoryBench"/>).
/// </summary>
public static class BenchMemory
{
    public const string Usage = """
          bench memory --weights PATH [--model NAME] [--seq N | --seqs N,N,...] [--steps N] [--rank R (another generated trainer)]
                       [--backend cpu|vulkan] [--device D] [--max-resident SIZE] [--activations memory|mmap] [--no-reference]
                       [--memory-budget SIZE | --budgets SIZE,SIZE,... [--plot FILE.svg]]
                                                      peak private memory (RssAnon) of N SGD steps, the trainer's
                                                      buffers, the planned peak and the step time; against a
                                                      TorchSharp autograd step unless --no-reference;
                                                      --memory-budget plans kept layers and mapped checkpoints for
                                                      a budget (512MB, 1GiB), --budgets measures the smallest plan
                                                      and each budget, --plot draws step time against peak memory;
                                                      with --backend vulkan also the peak device memory and the
                                                      device's buffers against the plan; --max-resident SIZE caps
                                                      the base weights kept on the device (0 streams them all)
        """;

    public static int Run(Args args)
    {
        var options = MemoryBenchOptions.Parse(args);
        if (!options.NoReference && !MemoryBench.HasTorchReference(options.Model))
            throw new UsageException($"The TorchSharp reference implements Qwen2 and Llama; {options.Model.Name} is {options.Model.Architecture}: " +
                                     "measure it with --no-reference.");
        if (!options.NoReference)
            return LoraBench.Run(["memory", .. args.Raw.Where(a => a != "--no-reference")]);
        if (options.SeveralBudgets)
            return RunBudgets(options, Console.Out);
        if (options.SeveralSequences)
            return RunChildren(options, Console.Out);
        return MemoryBench.RunOne(options, Console.Out);
    }

    /// <summary>
    /// One fresh process per sequence length (<c>lora bench memory --no-reference --seq S</c>), so each
    /// peak is its own; prints one row each.
    /// </summary>
    private static int RunChildren(MemoryBenchOptions options, TextWriter o)
    {
        o.WriteLine($"{options.Model.Name}, LoRA r={options.Model.Lora.R}, batch 1, SGD, {options.Steps} steps per length, {options.Backend}; each length in a fresh process");
        MemoryBench.PrintRowHeader(o);
        MemoryBenchResult? previous = null;
        foreach (int seq in options.Sequences)
        {
            var result = ChildProcess.RunForResult(LoraCommand(), ["bench", "memory", "--no-reference", .. options.ChildArguments(seq)]);
            MemoryBench.PrintRow(result, previous, o);
            previous = result;
        }
        o.WriteLine($"peak: {MemoryBench.Sampling}. growth: change of the peak per added token from the row above.");
        return 0;
    }

    /// <summary>The smallest plan and each budget in a fresh process (<c>lora bench memory --no-reference --memory-budget B</c>), a table and the plot.</summary>
    private static int RunBudgets(MemoryBenchOptions options, TextWriter o)
    {
        o.WriteLine($"{options.Model.Name}, LoRA r={options.Model.Lora.R}, seq {options.Sequences[0]}, batch 1, SGD, {options.Steps} steps per budget, " +
                    $"{options.Backend}; each budget in a fresh process");
        var results = MemoryBudgetSweep.Run(options, LoraCommand(), ["bench", "memory", "--no-reference"], o);
        o.WriteLine();
        MemoryBudgetSweep.PrintTable(results, null, o);
        if (options.PlotPath is { } plot)
        {
            MemoryBudgetSweep.Plot(plot, $"{options.Model.Name}, seq {options.Sequences[0]}: step time against peak memory", results, null);
            o.WriteLine($"Wrote {plot}.");
        }
        return 0;
    }

    /// <summary>How to start this program again: the dotnet host and lora.dll (or the apphost).</summary>
    public static ChildCommand LoraCommand() => ChildCommand.ForAssembly(typeof(BenchMemory).Assembly.Location);
}

/// <summary>
/// Finds and starts <c>lora-bench</c> (samples/LoraCompiler.Bench), the program that holds the TorchSharp
/// reference: a built lora-bench.dll next to this program or in the project's bin folder, else
/// <c>dotnet run --project</c> on the source, else a message saying how to build it.
/// </summary>
public static class LoraBench
{
    public const string ProjectPath = "samples/LoraCompiler.Bench/LoraCompiler.Bench.csproj";

    public static int Run(IReadOnlyList<string> arguments)
    {
        string here = Path.GetDirectoryName(typeof(LoraBench).Assembly.Location)!;
        string? root = ProgramLocator.RepositoryRoot(here);
        if (ProgramLocator.Find("lora-bench.dll", Path.Combine("samples", "LoraCompiler.Bench"), here, root) is { } dll)
            return ChildProcess.Run(ChildCommand.ForAssembly(dll), arguments);
        if (root is not null && File.Exists(Path.Combine(root, ProjectPath)))
        {
            Console.Error.WriteLine($"lora-bench is not built; running it with 'dotnet run --project {ProjectPath} -c Release' (builds it once).");
            return ChildProcess.Run(new ChildCommand(ChildCommand.DotnetHost(),
                ["run", "--project", Path.Combine(root, ProjectPath), "-c", "Release", "--"]), arguments);
        }
        throw new UsageException(
            "bench memory compares against a TorchSharp autograd reference in the separate program lora-bench, which was not found. " +
            $"Build it from the repository with 'dotnet build {ProjectPath} -c Release', or pass --no-reference to measure LoraCompiler alone.");
    }
}
