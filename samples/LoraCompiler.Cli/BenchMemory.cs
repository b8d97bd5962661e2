using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Cli;

/// <summary>
/// <c>lora bench memory</c>: the peak private memory of N training steps. With <c>--no-reference</c> it
/// trains our generated trainer in this process and prints what it measured (and, as the last line,
/// the same as JSON for the program that started it); with <c>--seqs</c> each sequence length runs in
/// a fresh child process so peaks do not mix. Without <c>--no-reference</c> it hands over to
/// <c>lora-bench</c> (samples/LoraCompiler.Bench), which runs ours and a TorchSharp autograd
/// reference each in its own process and prints them side by side: the TorchSharp dependency stays
/// out of this program.
/// </summary>
public static class BenchMemory
{
    public const string Usage = """
          bench memory --weights PATH [--model NAME] [--seq N | --seqs N,N,...] [--steps N] [--rank R (another generated trainer)]
                       [--backend cpu|vulkan] [--device D] [--activations memory|mmap] [--no-reference]
                                                      peak private memory (RssAnon) of N SGD steps, the trainer's
                                                      buffers, the planned peak and the step time; against a
                                                      TorchSharp autograd step unless --no-reference
        """;

    /// <summary>How often the background thread samples RssAnon.</summary>
    public static readonly TimeSpan SampleInterval = TimeSpan.FromMilliseconds(1);

    /// <summary>The line prefix of the machine-readable result.</summary>
    public const string JsonPrefix = "json: ";

    /// <summary>What both implementations count, for the output and the README.</summary>
    public const string Sampling =
        "RssAnon (resident anonymous memory: resident minus shared pages of /proc/self/statm) read by a thread every 1 ms, " +
        "and at every layer's LayerGradientsReady and after every optimizer step; file-backed pages (the mapped weights) are not counted";

    /// <summary>Whether lora-bench's TorchSharp model (samples/LoraCompiler.Bench/TorchLoraModel.cs) implements the architecture.</summary>
    public static bool HasTorchReference(ModelInfo model) => model.Architecture is "Qwen2ForCausalLM" or "LlamaForCausalLM";

    public static int Run(Args args)
    {
        var options = MemoryBenchOptions.Parse(args);
        if (!options.NoReference && !HasTorchReference(options.Model))
            throw new UsageException($"The TorchSharp reference implements Qwen2 and Llama; {options.Model.Name} is {options.Model.Architecture}: " +
                                     "measure it with --no-reference.");
        if (!options.NoReference)
            return LoraBench.Run(["memory", .. args.Raw.Where(a => a != "--no-reference")]);
        if (options.SeveralSequences)
            return RunChildren(options, Console.Out);

        var result = Measure(options, options.Sequences[0], Console.Out);
        Print(result, Console.Out);
        Console.WriteLine(JsonPrefix + JsonSerializer.Serialize(result));
        return 0;
    }

    /// <summary>
    /// Trains <see cref="MemoryBenchOptions.Steps"/> SGD steps of full backprop on one repeated
    /// sequence, sampling private memory from before the trainer is created to the end of the last
    /// optimizer step.
    /// </summary>
    public static MemoryBenchResult Measure(MemoryBenchOptions options, int seq, TextWriter? progress = null)
    {
        var model = options.Model;
        string dir = Directory.CreateTempSubdirectory("lora-bench-memory-").FullName;
        try
        {
            using var weights = ModelWeights.Open(options.WeightsPath);
            var data = new RepeatedSequence(BenchTokens(model.Vocab, seq));
            progress?.WriteLine($"Training {options.Steps} SGD steps of {model.Name} on {seq} tokens ({Describe(weights)} weights)...");

            long baseline = ProcessMemory.PrivateBytes();
            using var sampler = new PeakMemorySampler(SampleInterval) { Phase = "trainer creation" };
            using var backend = BackendOptions.Create(options.Backend, options.Device);
            var adapter = LoraAdapter.CreateNew(model.Lora, model.LoraModules, seed: 1);
            using var trainer = model.Create(backend, weights, adapter, seq,
                new TrainerOptions(ActivationsInFile: TrainerOptions.ParsePlacement(options.Activations, "--activations")));
            trainer.LayerGradientsReady += ready => sampler.Sample($"layer {ready.Layer} backward");
            long created = ProcessMemory.PrivateBytes();

            var training = new TrainingOptions
            {
                Steps = options.Steps, Optimizer = "sgd", LearningRate = MemoryBenchOptions.LearningRate, LcsbGroups = 1, Seed = 1,
            };
            var run = new TrainingRun(trainer, data, training, Path.Combine(dir, "run"));
            var steps = new List<(double Seconds, float Loss)>();
            double previous = 0;
            sampler.Phase = "step 1";
            run.StepCompleted += m =>
            {
                sampler.Sample("after the optimizer step");
                steps.Add((m.ElapsedSeconds - previous, m.Loss));
                previous = m.ElapsedSeconds;
                if (m.Step == options.Steps)
                    sampler.Stop(); // the adapter and checkpoint written after the last step are not part of a step
                else
                    sampler.Phase = $"step {m.Step + 1}";
            };
            run.Run();

            var plan = model.Plan(seq);
            return new MemoryBenchResult
            {
                Implementation = "LoraCompiler",
                Model = model.Name,
                Rank = model.Lora.R,
                Sequence = seq,
                Steps = options.Steps,
                Backend = backend.Name,
                Threads = Environment.ProcessorCount,
                Weights = options.WeightsPath,
                WeightsDtype = Describe(weights),
                BaselinePrivateBytes = baseline,
                CreatedPrivateBytes = created,
                PeakPrivateBytes = sampler.PeakPrivateBytes,
                PeakAt = sampler.PeakAt,
                PeakFileBytes = sampler.PeakFileBytes,
                HighWaterMarkBytes = ProcessMemory.HighWaterMarkBytes(),
                TrainerBufferBytes = trainer.AllocatedBytes,
                FileBackedBufferBytes = trainer.FileBackedBytes,
                PlannedBufferBytes = plan.TotalBytes - plan.BytesOf(BufferRole.Weights),
                PlannedWeightBytes = plan.BytesOf(BufferRole.Weights),
                AdapterHostBytes = AdapterCopyBytes(trainer),
                StepSeconds = steps.Select(s => s.Seconds).ToArray(),
                Losses = steps.Select(s => s.Loss).ToArray(),
                Samples = sampler.Samples,
                SampleIntervalMs = SampleInterval.TotalMilliseconds,
                Sampling = Sampling,
            };
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>The block <c>bench memory --no-reference</c> prints for one run.</summary>
    public static void Print(MemoryBenchResult r, TextWriter o)
    {
        var model = TrainerCatalog.Find(r.Model);
        o.WriteLine();
        o.WriteLine($"{r.Implementation}: {r.Model}" + (model is null ? "" : $" ({model.Architecture}, {model.Layers} layers, hidden {model.Hidden})") +
                    $", LoRA r={r.Rank}" + (model is null ? "" : $" alpha={model.Lora.Alpha} on {string.Join(",", model.Lora.TargetModules)}"));
        o.WriteLine($"  seq {r.Sequence}, batch 1, full backprop, SGD, {r.Steps} steps on {r.Backend}; weights {r.Weights} ({r.WeightsDtype})");
        o.WriteLine($"  {"process baseline (RssAnon before the model)",-48} {Mib(r.BaselinePrivateBytes),10}  the .NET runtime and this program" +
                    (r.TrainerBufferBytes is null ? " (libtorch loaded)" : ""));
        o.WriteLine($"  {"after creating the model (RssAnon)",-48} {Mib(r.CreatedPrivateBytes),10}  " +
                    (r.TrainerBufferBytes is null ? "its parameters loaded, before the first step" : "the trainer's buffers and the adapter, before the first step"));
        if (r.TrainerBufferBytes is long buffers)
            o.WriteLine($"  {"trainer buffers (TrainerBase.AllocatedBytes)",-48} {Mib(buffers),10}  allocated once, live for the whole run" +
                        (r.FileBackedBufferBytes is > 0 ? $"; {Mib(r.FileBackedBufferBytes.Value).Trim()} of them (the checkpoints) in a memory-mapped file, " +
                                                         $"{Mib(buffers - r.FileBackedBufferBytes.Value).Trim()} in private memory" : ""));
        if (r.PlannedBufferBytes is long planned)
            o.WriteLine($"  {"planned peak (MemoryPlan, less mapped weights)",-48} {Mib(planned),10}  planned / allocated = " +
                        $"{(r.TrainerBufferBytes is long b && b > 0 ? ((double)planned / b).ToString("F3", CultureInfo.InvariantCulture) : "-")}; " +
                        $"the plan's {Mib(r.PlannedWeightBytes ?? 0).Trim()} of Weights (at float32 size) are mapped from the weight file, not allocated");
        long above = r.PeakPrivateBytes - r.BaselinePrivateBytes;
        o.WriteLine($"  {"peak private memory (RssAnon)",-48} {Mib(r.PeakPrivateBytes),10}  at {r.PeakAt}; {Mib(above).Trim()} above the baseline");
        if (r.TrainerBufferBytes is long allBuffers && r.AdapterHostBytes is long ab
            && (allBuffers - (r.FileBackedBufferBytes ?? 0)) is var tb)
            o.WriteLine($"  {"  above the baseline",-48} {"",10}  {Mib(tb).Trim()} trainer buffers in private memory + " +
                        (ab > 0 ? $"{Mib(ab).Trim()} the adapter's host copy + " : "") +
                        $"{Mib(above - tb - ab).Trim()} the rest (managed heap, JIT code, thread stacks)");
        o.WriteLine($"  {"peak file-backed resident (RssFile, not counted)",-48} {Mib(r.PeakFileBytes),10}  mapped files: the weights in use and the runtime's own libraries");
        if (r.HighWaterMarkBytes is long hwm)
            o.WriteLine($"  {"VmHWM (all resident pages, whole process)",-48} {Mib(hwm),10}  the kernel's high-water mark, file-backed pages included");
        o.WriteLine($"  {"step time",-48} {r.SteadyStepSeconds,8:F2} s  median of steps 2..{r.Steps} (first step {r.FirstStepSeconds:F2} s); {r.Sequence / r.SteadyStepSeconds:F0} tokens/s");
        o.WriteLine($"  {"loss",-48} {r.Losses.FirstOrDefault(),10:F4}  at step 1; {r.Losses.LastOrDefault():F4} at step {r.Steps}");
        o.WriteLine($"  sampled: {r.Sampling}; {r.Samples:N0} samples");
    }

    /// <summary>
    /// One fresh process per sequence length (<c>lora bench memory --no-reference --seq S</c>), so each
    /// peak is its own; prints one row each.
    /// </summary>
    private static int RunChildren(MemoryBenchOptions options, TextWriter o)
    {
        o.WriteLine($"{options.Model.Name}, LoRA r={options.Model.Lora.R}, batch 1, SGD, {options.Steps} steps per length, {options.Backend}; each length in a fresh process");
        PrintRowHeader(o);
        MemoryBenchResult? previous = null;
        foreach (int seq in options.Sequences)
        {
            var result = ChildProcess.RunForResult(LoraCommand(), ["bench", "memory", "--no-reference", .. options.ChildArguments(seq)]);
            PrintRow(result, previous, o);
            previous = result;
        }
        o.WriteLine($"peak: {Sampling}. growth: change of the peak per added token from the row above.");
        return 0;
    }

    public static void PrintRowHeader(TextWriter o) =>
        o.WriteLine($"{"seq",5} {"peak RssAnon",13} {"above base",11} {"buffers",10} {"planned",10} {"plan/buf",8} {"growth/token",13} {"step s",8}");

    public static void PrintRow(MemoryBenchResult r, MemoryBenchResult? previous, TextWriter o)
    {
        string growth = previous is null ? "" :
            $"{(r.PeakPrivateBytes - previous.PeakPrivateBytes) / 1024.0 / (r.Sequence - previous.Sequence),9:F1} KiB";
        string ratio = r.PlannedBufferBytes is long p && r.TrainerBufferBytes is long b && b > 0 ? ((double)p / b).ToString("F3", CultureInfo.InvariantCulture) : "-";
        o.WriteLine($"{r.Sequence,5} {Mib(r.PeakPrivateBytes),13} {Mib(r.PeakPrivateBytes - r.BaselinePrivateBytes),11} " +
                    $"{(r.TrainerBufferBytes is long tb ? Mib(tb) : "-"),10} {(r.PlannedBufferBytes is long pb ? Mib(pb) : "-"),10} {ratio,8} {growth,13} {r.SteadyStepSeconds,8:F2}");
    }

    /// <summary>
    /// Bytes of the adapter's host arrays that are not the trainer's own parameters: 0 where the
    /// backend uses the adapter's arrays in place (the CPU), the whole adapter where it uploads a copy.
    /// </summary>
    public static long AdapterCopyBytes(TrainerBase trainer)
    {
        var modules = trainer.Adapter.Modules.ToDictionary(m => m.Spec.Module);
        long bytes = 0;
        foreach (var t in trainer.LoraModules)
        {
            var host = modules[t.Spec.Module];
            if (!SameArray(t.A, host.A))
                bytes += (long)host.A.Length * sizeof(float);
            if (!SameArray(t.B, host.B))
                bytes += (long)host.B.Length * sizeof(float);
        }
        return bytes;

        static bool SameArray(Tensor tensor, float[] array) =>
            tensor is CpuTensor cpu && System.Runtime.InteropServices.MemoryMarshal.TryGetArray<float>(cpu.Memory, out var segment) &&
            segment.Array == array;
    }

    /// <summary>How to start this program again: the dotnet host and lora.dll (or the apphost).</summary>
    public static ChildCommand LoraCommand() => ChildCommand.ForAssembly(typeof(BenchMemory).Assembly.Location);

    /// <summary>
    /// The benchmark's tokens: a fixed, spread-out sequence inside the vocabulary. The loss is Hugging
    /// Face's labels = input_ids (row t predicts token t+1; the last row predicts nothing), on both sides.
    /// </summary>
    public static int[] BenchTokens(int vocab, int seq) =>
        Enumerable.Range(0, seq).Select(i => (int)((i * 7919L + 13) % vocab)).ToArray();

    /// <summary>The dtypes of the weight files, the one holding most bytes first: "F32", "BF16", ...</summary>
    public static string Describe(ModelWeights weights) => string.Join("+", weights.Names
        .Select(weights.Info)
        .GroupBy(i => i.Dtype)
        .OrderByDescending(g => g.Sum(i => i.ByteLength))
        .Select(g => g.Key));

    public static string Mib(long bytes) => $"{bytes / 1048576.0,6:F1} MiB";
}

/// <summary>What <c>bench memory</c> measured for one implementation at one sequence length (the JSON line).</summary>
public sealed record MemoryBenchResult
{
    public required string Implementation { get; init; }
    public required string Model { get; init; }
    public required int Rank { get; init; }
    public required int Sequence { get; init; }
    public required int Steps { get; init; }
    public required string Backend { get; init; }
    public required int Threads { get; init; }
    public required string Weights { get; init; }
    public required string WeightsDtype { get; init; }
    /// <summary>RssAnon before the model or trainer was created.</summary>
    public required long BaselinePrivateBytes { get; init; }
    /// <summary>RssAnon once the model or trainer was created and loaded, before the first step.</summary>
    public long CreatedPrivateBytes { get; init; }
    /// <summary>The highest RssAnon sampled from creating the model to the end of the last step.</summary>
    public required long PeakPrivateBytes { get; init; }
    public required string PeakAt { get; init; }
    public required long PeakFileBytes { get; init; }
    public long? HighWaterMarkBytes { get; init; }
    /// <summary><see cref="TrainerBase.AllocatedBytes"/>; null for the reference.</summary>
    public long? TrainerBufferBytes { get; init; }
    public long? FileBackedBufferBytes { get; init; }
    /// <summary>The memory plan's total less its Weights (mapped, not allocated); null for the reference.</summary>
    public long? PlannedBufferBytes { get; init; }
    public long? PlannedWeightBytes { get; init; }
    /// <summary>The adapter's host A and B where they are a copy beside the trainer's own parameters (0 on the CPU); null for the reference.</summary>
    public long? AdapterHostBytes { get; init; }
    public required double[] StepSeconds { get; init; }
    public required float[] Losses { get; init; }
    public required long Samples { get; init; }
    public required double SampleIntervalMs { get; init; }
    public required string Sampling { get; init; }

    public double FirstStepSeconds => StepSeconds.Length > 0 ? StepSeconds[0] : double.NaN;

    /// <summary>The median of the steps after the first (the first, alone, when there is one step).</summary>
    public double SteadyStepSeconds
    {
        get
        {
            var rest = StepSeconds.Skip(1).Order().ToArray();
            if (rest.Length == 0)
                return FirstStepSeconds;
            return rest.Length % 2 == 1 ? rest[rest.Length / 2] : (rest[rest.Length / 2 - 1] + rest[rest.Length / 2]) / 2;
        }
    }
}

/// <summary>The options of <c>bench memory</c>, shared with <c>lora-bench memory</c> and its reference.</summary>
public sealed record MemoryBenchOptions
{
    /// <summary>SGD's learning rate: small, so every step does the same work on nearly the same numbers.</summary>
    public const float LearningRate = 1e-4f;

    public required ModelInfo Model { get; init; }
    public required string WeightsPath { get; init; }
    public required IReadOnlyList<int> Sequences { get; init; }
    public bool SeveralSequences { get; init; }
    public int Steps { get; init; } = 5;
    public string Backend { get; init; } = "cpu";
    public string? Device { get; init; }
    public bool NoReference { get; init; }

    /// <summary><c>--activations memory|mmap</c> (null: the model JSON's).</summary>
    public string? Activations { get; init; }

    public static MemoryBenchOptions Parse(Args args)
    {
        string name = args.Get("model", "qwen2.5-0.5b");
        var model = TrainerCatalog.Find(name) ?? throw new UsageException(
            $"No trainer for model '{name}'. This build has: {string.Join(", ", TrainerCatalog.All.Select(m => m.Name))}.");
        string weights = args.Required("weights");
        string? seqs = args.Optional("seqs");
        int seq = args.Int("seq", 256, min: 2);
        int steps = args.Int("steps", 5, min: 1);
        int rank = args.Int("rank", model.Lora.R, min: 1);
        string backend = args.Get("backend", "cpu");
        string? device = args.Optional("device");
        bool noReference = args.Flag("no-reference");
        string? activations = args.Optional("activations");
        args.RejectUnknown();
        if (activations is not (null or "memory" or "mmap"))
            throw new UsageException($"--activations takes memory or mmap, not '{activations}'.");

        if (rank != model.Lora.R)
            model = WithRank(model, rank);
        if (steps < 1)
            throw new UsageException("--steps must be at least 1.");
        if (backend is not ("cpu" or "vulkan"))
            throw new UsageException($"Unknown backend '{backend}' (available: cpu, vulkan).");
        if (!File.Exists(weights) && !Directory.Exists(weights))
            throw new UsageException($"--weights {weights}: no such file or folder. Write random weights with " +
                                     $"'lora init-random --model {model.Name} --out DIR'.");
        var sequences = seqs is null ? [seq] : ParseList(seqs);
        if (sequences.Any(s => s < 2))
            throw new UsageException("Every sequence length must be at least 2.");
        return new MemoryBenchOptions
        {
            Model = model,
            WeightsPath = Path.GetFullPath(weights),
            Sequences = sequences,
            SeveralSequences = seqs is not null,
            Steps = steps,
            Backend = backend,
            Device = device,
            NoReference = noReference,
            Activations = activations,
        };
    }

    /// <summary>
    /// The trainer of the same model generated at LoRA rank <paramref name="rank"/>: a trainer's rank is
    /// fixed when it is generated, so another rank is another model JSON (models/qwen2.5-0.5b-r16.json
    /// beside models/qwen2.5-0.5b.json). Which one is used is printed with the results.
    /// </summary>
    public static ModelInfo WithRank(ModelInfo model, int rank)
    {
        string family = System.Text.RegularExpressions.Regex.Replace(model.Name, "-r[0-9]+$", "");
        bool Related(ModelInfo m) => m.Name == family || m.Name.StartsWith(family + "-r", StringComparison.Ordinal);
        var match = TrainerCatalog.All.FirstOrDefault(m => Related(m) && m.Lora.R == rank && m.ParameterCount == model.ParameterCount);
        if (match is not null)
            return match;
        var ranks = TrainerCatalog.All.Where(m => Related(m) && m.ParameterCount == model.ParameterCount)
            .OrderBy(m => m.Lora.R).Select(m => $"r={m.Lora.R} ({m.Name})");
        throw new UsageException(
            $"--rank {rank}: no trainer of {family} was generated with LoRA r={rank}; this build has {string.Join(", ", ranks)}. " +
            "A trainer's rank is fixed when it is generated: add a model JSON with " +
            $"\"lora\": {{\"r\": {rank}}} (models/{family}-r{rank}.json) and rebuild to measure another rank.");
    }

    /// <summary>The options of a child run at one sequence length.</summary>
    public IEnumerable<string> ChildArguments(int seq)
    {
        string[] common =
        [
            "--model", Model.Name, "--weights", WeightsPath, "--seq", seq.ToString(CultureInfo.InvariantCulture),
            "--steps", Steps.ToString(CultureInfo.InvariantCulture), "--backend", Backend,
        ];
        if (Activations is not null)
            common = [.. common, "--activations", Activations];
        return Device is null ? common : [.. common, "--device", Device];
    }

    private static int[] ParseList(string text)
    {
        try
        {
            return text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(s => int.Parse(s, CultureInfo.InvariantCulture)).ToArray() is { Length: > 0 } list
                ? list
                : throw new UsageException("--seqs needs at least one length, like --seqs 128,256,512,1024.");
        }
        catch (FormatException)
        {
            throw new UsageException($"--seqs expects lengths separated by commas, like 128,256,512,1024; found '{text}'.");
        }
    }
}

/// <summary>The same sequence at every step, so that every step does the same work; labels = input_ids.</summary>
public sealed class RepeatedSequence(int[] tokens) : ITrainingData
{
    private readonly int[] _tokens = tokens;
    private readonly int[] _targets = TrainerBase.NextTokenTargets(tokens);

    public string Description => $"{_tokens.Length} fixed tokens";

    public (ReadOnlyMemory<int> Tokens, ReadOnlyMemory<int> Targets) Next() => (_tokens, _targets);

    public string Position { get => "0"; set { } }
}

/// <summary>A program to start: a file and the arguments that come before the command's own.</summary>
public sealed record ChildCommand(string FileName, IReadOnlyList<string> Prefix)
{
    /// <summary>
    /// Runs <paramref name="assemblyPath"/> (a .dll) with the dotnet host this process runs on, or
    /// directly when this process is an apphost of that assembly.
    /// </summary>
    public static ChildCommand ForAssembly(string assemblyPath) => new(DotnetHost(), [assemblyPath]);

    /// <summary>The dotnet executable: the one running this process, DOTNET_HOST_PATH, or 'dotnet' on the PATH.</summary>
    public static string DotnetHost()
    {
        if (Environment.ProcessPath is { } self && Path.GetFileNameWithoutExtension(self) == "dotnet")
            return self;
        if (Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host))
            return host;
        return "dotnet";
    }

    public ProcessStartInfo StartInfo(IEnumerable<string> arguments, bool redirect)
    {
        var info = new ProcessStartInfo(FileName) { UseShellExecute = false, RedirectStandardOutput = redirect };
        foreach (var a in Prefix.Concat(arguments))
            info.ArgumentList.Add(a);
        return info;
    }

    public override string ToString() => string.Join(" ", new[] { FileName }.Concat(Prefix));
}

/// <summary>Runs a child process of the benchmark.</summary>
public static class ChildProcess
{
    /// <summary>Runs the command with its stdout and stderr shown, and returns its exit code.</summary>
    public static int Run(ChildCommand command, IEnumerable<string> arguments)
    {
        using var process = Process.Start(command.StartInfo(arguments, redirect: false))
            ?? throw new IOException($"Could not start {command}.");
        process.WaitForExit();
        return process.ExitCode;
    }

    /// <summary>
    /// Runs a <c>bench memory</c> child, echoes its output (not the JSON line) and returns the result of
    /// its JSON line; fails with its exit code when it fails.
    /// </summary>
    public static MemoryBenchResult RunForResult(ChildCommand command, IEnumerable<string> arguments, TextWriter? echo = null)
    {
        var args = arguments.ToList();
        using var process = Process.Start(command.StartInfo(args, redirect: true))
            ?? throw new IOException($"Could not start {command}.");
        MemoryBenchResult? result = null;
        string? line;
        while ((line = process.StandardOutput.ReadLine()) is not null)
        {
            if (line.StartsWith(BenchMemory.JsonPrefix, StringComparison.Ordinal))
                result = JsonSerializer.Deserialize<MemoryBenchResult>(line[BenchMemory.JsonPrefix.Length..]);
            else
                echo?.WriteLine(line);
        }
        process.WaitForExit();
        if (process.ExitCode != 0 || result is null)
            throw new IOException($"'{command} {string.Join(" ", args)}' " +
                                  (process.ExitCode != 0 ? $"failed with exit code {process.ExitCode}." : "printed no result line."));
        return result;
    }
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
        string? root = RepositoryRoot(here);
        if (Find(here, root) is { } dll)
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

    /// <summary>lora-bench.dll beside this program, or the newest build under the project's bin folder (this build's configuration first).</summary>
    public static string? Find(string here, string? root)
    {
        string beside = Path.Combine(here, "lora-bench.dll");
        if (File.Exists(beside))
            return beside;
        if (root is null)
            return null;
        string bin = Path.Combine(root, "samples", "LoraCompiler.Bench", "bin");
        if (!Directory.Exists(bin))
            return null;
        string configuration = here.Contains($"{Path.DirectorySeparatorChar}Debug{Path.DirectorySeparatorChar}") ? "Debug" : "Release";
        return Directory.EnumerateFiles(bin, "lora-bench.dll", SearchOption.AllDirectories)
            .OrderByDescending(p => p.Contains($"{Path.DirectorySeparatorChar}{configuration}{Path.DirectorySeparatorChar}"))
            .ThenByDescending(File.GetLastWriteTimeUtc)
            .FirstOrDefault();
    }

    /// <summary>The folder holding LoraCompiler.sln, from <paramref name="start"/> upwards.</summary>
    public static string? RepositoryRoot(string start)
    {
        for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "LoraCompiler.sln")))
                return dir.FullName;
        return null;
    }
}
