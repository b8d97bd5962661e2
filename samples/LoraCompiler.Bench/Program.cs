using LoraCompiler.Bench;
using LoraCompiler.Benchmarks;

const string Usage = $"""
    lora-bench: benchmarks against TorchSharp (libtorch), kept out of the lora command line.

    Commands:
      memory --weights PATH [--model NAME] [--seq N | --seqs N,N,...] [--steps N] [--rank R] [--backend cpu|vulkan] [--device D] [--max-resident SIZE]
             [--activations memory|mmap] [--memory-budget SIZE | --budgets SIZE,SIZE,... [--plot FILE.svg]]
            LoraCompiler (the measurement of 'lora bench memory --no-reference') and a TorchSharp autograd LoRA
            step of the same model, each in a fresh process: peak private memory, step time, side by side;
            --budgets: the smallest plan and each budget against the reference, --plot: step time against peak memory
      memory-ours --weights PATH [--model NAME] [--seq N] [--steps N] [--memory-budget SIZE] ...
            the LoraCompiler side alone, in this process (prints a JSON line last)
      memory-reference --weights PATH [--model NAME] [--seq N] [--steps N]
            the TorchSharp autograd side alone, in this process (prints a JSON line last)

    {MemoryBench.Sampling}.
    """;

if (args.Length == 0 || args[0] is "-h" or "--help" or "help")
{
    Console.WriteLine(Usage);
    return args.Length == 0 ? 2 : 0;
}

try
{
    var options = new Args(args.Skip(1));
    return args[0] switch
    {
        "memory" => MemoryComparison.Run(MemoryBenchOptions.Parse(options)),
        "memory-ours" => MemoryComparison.RunOurs(MemoryBenchOptions.Parse(options)),
        "memory-reference" => ReferenceBench.Run(MemoryBenchOptions.Parse(options)),
        _ => throw new UsageException($"Unknown command '{args[0]}'. Run 'lora-bench --help' for the list."),
    };
}
catch (UsageException e)
{
    Console.Error.WriteLine($"error: {e.Message}");
    return 2;
}
catch (Exception e) when (e is IOException or LoraCompiler.Runtime.Weights.WeightsException or ArgumentException)
{
    Console.Error.WriteLine($"error: {e.Message}");
    return 1;
}
