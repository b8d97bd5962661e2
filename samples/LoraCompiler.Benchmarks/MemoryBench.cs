using System.Globalization;
using System.Text.Json;
using LoraCompiler.CommandLine;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Benchmarks;

/// <summary>
/// The memory benchmark both programs run: N SGD steps of our generated trainer with private memory
/// sampled from before the trainer is created to the end of the last optimizer step
/// (<see cref="Measure"/>), printed as a block (<see cref="Print"/>) or a row, and passed between
/// processes as one JSON line (<see cref="JsonPrefix"/>).
/// </summary>
public static class MemoryBench
{
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

    /// <summary>Measures one run and prints it: the block, then the JSON line for the process that started this one.</summary>
    public static int RunOne(MemoryBenchOptions options, TextWriter o)
    {
        var result = Measure(options, options.Sequences[0], o);
        Print(result, o);
        o.WriteLine(JsonPrefix + JsonSerializer.Serialize(result));
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
            using var backend = BackendOptions.Create(options.Backend, options.Device, options.MaxResident);
            var vulkan = backend as VulkanBackend;
            var adapter = LoraAdapter.CreateNew(model.Lora, model.LoraModules, seed: 1);
            var budgetPlan = options.BudgetPlan(options.MemoryBudget, seq);
            var trainerOptions = new TrainerOptions(ActivationsInFile: options.ActivationsInFile);
            using var trainer = model.Create(backend, weights, adapter, seq, budgetPlan?.ToOptions(trainerOptions) ?? trainerOptions);
            // The driver's usage (VK_EXT_memory_budget) is read where RssAnon is read at events: each layer's end and each step's.
            long? usagePeak = null;
            void SampleDevice()
            {
                if (vulkan?.DeviceMemory.Usage is long usage)
                    usagePeak = Math.Max(usagePeak ?? 0, usage);
            }
            trainer.LayerGradientsReady += ready =>
            {
                sampler.Sample($"layer {ready.Layer} backward");
                SampleDevice();
            };
            long created = ProcessMemory.PrivateBytes();
            VulkanDeviceMemory? device = null;

            var training = new TrainingOptions
            {
                Steps = options.Steps, Optimizer = "sgd", LearningRate = MemoryBenchOptions.LearningRate, LcsbGroups = 1, Seed = 1,
            };
            var run = new TrainingRun(trainer, data, training, Path.Combine(dir, "run"));
            var steps = new List<(double Seconds, double CpuSeconds, float Loss)>();
            double previous = 0, previousCpu = Environment.CpuUsage.TotalTime.TotalSeconds;
            sampler.Phase = "step 1";
            run.StepCompleted += m =>
            {
                sampler.Sample("after the optimizer step");
                SampleDevice();
                double cpu = Environment.CpuUsage.TotalTime.TotalSeconds;
                steps.Add((m.ElapsedSeconds - previous, cpu - previousCpu, m.Loss));
                (previous, previousCpu) = (m.ElapsedSeconds, cpu);
                if (m.Step == options.Steps)
                {
                    sampler.Stop(); // the adapter and checkpoint written after the last step are not part of a step
                    device = vulkan?.DeviceMemory;
                }
                else
                    sampler.Phase = $"step {m.Step + 1}";
            };
            run.Run();

            var plan = model.Plan(seq, trainer.KeptLayers);
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
                MemoryBudgetBytes = budgetPlan?.BudgetBytes,
                KeptLayers = trainer.KeptLayers,
                CheckpointsInFile = trainer.ActivationsInFile,
                PlannedPeakBytes = budgetPlan?.PlannedPeakBytes,
                StepSeconds = steps.Select(s => s.Seconds).ToArray(),
                StepCpuSeconds = steps.Select(s => s.CpuSeconds).ToArray(),
                Losses = steps.Select(s => s.Loss).ToArray(),
                Samples = sampler.Samples,
                SampleIntervalMs = SampleInterval.TotalMilliseconds,
                Sampling = Sampling,
                MaxResidentBytes = options.MaxResident,
                DevicePeakBytes = device?.DeviceLocal.PeakBytes,
                DevicePeakAllocations = device?.DeviceLocal.PeakAllocations,
                DeviceStagingPeakBytes = device?.HostVisible.PeakBytes,
                DeviceTensorBytes = device?.TensorBytes,
                DeviceWeightBytes = device?.WeightBytes,
                DeviceBackendBytes = device?.BackendBytes,
                ResidentWeightBytes = vulkan?.ResidentWeightBytes,
                ResidentWeights = vulkan?.ResidentWeights,
                DeviceUsagePeakBytes = usagePeak,
                DeviceBudgetBytes = device?.Budget,
                DeviceHeapBytes = device?.HeapBytes,
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
        if (r.MemoryBudgetBytes is long budget)
            o.WriteLine($"  {"memory budget (--memory-budget)",-48} {Mib(budget),10}  {r.KeptLayers} of the last layers keep their activations, " +
                        $"checkpoints in {(r.CheckpointsInFile ? "a mapped file" : "memory")}; planned peak {Mib(r.PlannedPeakBytes ?? 0).Trim()}");
        long above = r.PeakPrivateBytes - r.BaselinePrivateBytes;
        o.WriteLine($"  {"peak private memory (RssAnon)",-48} {Mib(r.PeakPrivateBytes),10}  at {r.PeakAt}; {Mib(above).Trim()} above the baseline");
        if (r.TrainerBufferBytes is long allBuffers && r.AdapterHostBytes is long ab
            && (allBuffers - (r.FileBackedBufferBytes ?? 0)) is var tb)
            o.WriteLine($"  {"  above the baseline",-48} {"",10}  {Mib(tb).Trim()} trainer buffers in private memory + " +
                        (ab > 0 ? $"{Mib(ab).Trim()} the adapter's host copy + " : "") +
                        $"{Mib(above - tb - ab).Trim()} the rest (managed heap, JIT code, thread stacks)");
        if (r.DevicePeakBytes is long devicePeak)
        {
            o.WriteLine($"  {"peak device memory (Vulkan, the backend's count)",-48} {Mib(devicePeak),10}  device-local, {r.DevicePeakAllocations} buffers at the peak; " +
                        $"+ {Mib(r.DeviceStagingPeakBytes ?? 0).Trim()} host-visible staging");
            long tensors = r.DeviceTensorBytes ?? 0;
            string check = r.TrainerBufferBytes is long trainerBytes
                ? tensors == trainerBytes ? "= the trainer buffers" : $"≠ the trainer buffers ({tensors - trainerBytes:+#;-#;0} bytes)"
                : "";
            o.WriteLine($"  {"  device buffers after the last step",-48} {Mib(tensors + (r.DeviceWeightBytes ?? 0) + (r.DeviceBackendBytes ?? 0)),10}  " +
                        $"{Mib(tensors).Trim()} tensors ({check}) + {Mib(r.DeviceWeightBytes ?? 0).Trim()} base weights " +
                        $"({r.ResidentWeights} resident, {Mib(r.ResidentWeightBytes ?? 0).Trim()}" +
                        (r.MaxResidentBytes is long cap ? $", --max-resident {cap}" : "") + $") + {Mib(r.DeviceBackendBytes ?? 0).Trim()} the backend's own");
            o.WriteLine($"  {"  driver's usage (VK_EXT_memory_budget)",-48} " + (r.DeviceUsagePeakBytes is long usage
                ? $"{Mib(usage),10}  the highest heapUsage read at each layer's and step's end, of a budget of {Mib(r.DeviceBudgetBytes ?? 0).Trim()}"
                : $"{"-",10}  the device does not offer the extension (device-local heap: {Mib(r.DeviceHeapBytes ?? 0).Trim()})"));
        }
        o.WriteLine($"  {"peak file-backed resident (RssFile, not counted)",-48} {Mib(r.PeakFileBytes),10}  mapped files: the weights in use and the runtime's own libraries");
        if (r.HighWaterMarkBytes is long hwm)
            o.WriteLine($"  {"VmHWM (all resident pages, whole process)",-48} {Mib(hwm),10}  the kernel's high-water mark, file-backed pages included");
        o.WriteLine($"  {"step time",-48} {r.SteadyStepSeconds,8:F2} s  median of steps 2..{r.Steps} (first step {r.FirstStepSeconds:F2} s); {r.Sequence / r.SteadyStepSeconds:F0} tokens/s");
        o.WriteLine($"  {"loss",-48} {r.Losses.FirstOrDefault(),10:F4}  at step 1; {r.Losses.LastOrDefault():F4} at step {r.Steps}");
        o.WriteLine($"  sampled: {r.Sampling}; {r.Samples:N0} samples");
    }

    public static void PrintRowHeader(TextWriter o) =>
        o.WriteLine($"{"seq",5} {"peak RssAnon",13} {"above base",11} {"buffers",10} {"planned",10} {"plan/buf",8} {"growth/token",13} {"step s",8} {"device peak",11}");

    public static void PrintRow(MemoryBenchResult r, MemoryBenchResult? previous, TextWriter o)
    {
        string growth = previous is null ? "" :
            $"{(r.PeakPrivateBytes - previous.PeakPrivateBytes) / 1024.0 / (r.Sequence - previous.Sequence),9:F1} KiB";
        string ratio = r.PlannedBufferBytes is long p && r.TrainerBufferBytes is long b && b > 0 ? ((double)p / b).ToString("F3", CultureInfo.InvariantCulture) : "-";
        o.WriteLine($"{r.Sequence,5} {Mib(r.PeakPrivateBytes),13} {Mib(r.PeakPrivateBytes - r.BaselinePrivateBytes),11} " +
                    $"{(r.TrainerBufferBytes is long tb ? Mib(tb) : "-"),10} {(r.PlannedBufferBytes is long pb ? Mib(pb) : "-"),10} {ratio,8} {growth,13} {r.SteadyStepSeconds,8:F2} {(r.DevicePeakBytes is long d ? Mib(d) : "-"),11}");
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

        bool SameArray(Tensor tensor, float[] array) => trainer.Backend.TryGetHostSpan(tensor, out var values) && values.Overlaps(array);
    }

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
    /// <summary>The <c>--memory-budget</c> the run was planned for; null without one.</summary>
    public long? MemoryBudgetBytes { get; init; }
    /// <summary>How many of the last layers kept their activations from forward to backward (0: every layer recomputed).</summary>
    public int KeptLayers { get; init; }
    /// <summary>Whether the checkpoints were in a memory-mapped file.</summary>
    public bool CheckpointsInFile { get; init; }
    /// <summary>The planner's peak of private memory for the budget (<see cref="MemoryBudgetPlan.PlannedPeakBytes"/>); null without a budget.</summary>
    public long? PlannedPeakBytes { get; init; }
    public required double[] StepSeconds { get; init; }
    /// <summary>The processor time (all threads, user and system) of each step: less disturbed than the wall time by other processes on a shared machine.</summary>
    public double[] StepCpuSeconds { get; init; } = [];
    public required float[] Losses { get; init; }
    public required long Samples { get; init; }
    public required double SampleIntervalMs { get; init; }
    public required string Sampling { get; init; }

    /// <summary><c>--max-resident</c> (null: the Vulkan backend's default, what fits the device's budget).</summary>
    public long? MaxResidentBytes { get; init; }
    /// <summary>Vulkan: the device-local memory's peak from the backend's creation to the end of the last step, by the backend's own count; null on the CPU.</summary>
    public long? DevicePeakBytes { get; init; }
    public int? DevicePeakAllocations { get; init; }
    /// <summary>Vulkan: the host-visible staging memory's peak.</summary>
    public long? DeviceStagingPeakBytes { get; init; }
    /// <summary>Vulkan, after the last step: bytes of the tensors on the device (a trainer's buffers and LoRA parameters: its AllocatedBytes).</summary>
    public long? DeviceTensorBytes { get; init; }
    /// <summary>Vulkan, after the last step: bytes of base weights on the device (the resident ones and those the trainer keeps mapped).</summary>
    public long? DeviceWeightBytes { get; init; }
    /// <summary>Vulkan, after the last step: the backend's own device buffers (token ids, labels, statistics).</summary>
    public long? DeviceBackendBytes { get; init; }
    public long? ResidentWeightBytes { get; init; }
    public int? ResidentWeights { get; init; }
    /// <summary>Vulkan with VK_EXT_memory_budget: the highest heapUsage of the device-local heap read at each layer's and step's end; null without it.</summary>
    public long? DeviceUsagePeakBytes { get; init; }
    public long? DeviceBudgetBytes { get; init; }
    public long? DeviceHeapBytes { get; init; }

    public double FirstStepSeconds => StepSeconds.Length > 0 ? StepSeconds[0] : double.NaN;

    /// <summary>The median of the steps after the first (the first, alone, when there is one step).</summary>
    public double SteadyStepSeconds => SteadyMedian(StepSeconds);

    /// <summary>The median processor time of the steps after the first; NaN when it was not measured.</summary>
    public double SteadyStepCpuSeconds => StepCpuSeconds.Length == 0 ? double.NaN : SteadyMedian(StepCpuSeconds);

    private static double SteadyMedian(double[] values)
    {
        var rest = values.Skip(1).Order().ToArray();
        if (rest.Length == 0)
            return values.Length > 0 ? values[0] : double.NaN;
        return rest.Length % 2 == 1 ? rest[rest.Length / 2] : (rest[rest.Length / 2 - 1] + rest[rest.Length / 2]) / 2;
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

    /// <summary><c>--max-resident SIZE</c>: the Vulkan backend's <see cref="VulkanBackendOptions.MaxResidentBytes"/> (0 streams every weight; null: what fits).</summary>
    public long? MaxResident { get; init; }

    public bool NoReference { get; init; }

    /// <summary><c>--activations memory|mmap</c> (null: the model JSON's).</summary>
    public string? Activations { get; init; }

    /// <summary><see cref="Activations"/> as the trainer takes it.</summary>
    public bool? ActivationsInFile => TrainerOptions.ParsePlacement(Activations, "--activations");

    /// <summary><c>--memory-budget SIZE</c>: the run is planned for it (SGD keeps no optimizer state); null plans nothing.</summary>
    public long? MemoryBudget { get; init; }

    /// <summary><c>--budgets SIZE,SIZE,...</c>: one run per budget, each in a fresh process, after one of the smallest plan.</summary>
    public IReadOnlyList<long> Budgets { get; init; } = [];

    /// <summary>Whether <c>--budgets</c> was given.</summary>
    public bool SeveralBudgets => Budgets.Count > 0;

    /// <summary><c>--plot FILE.svg</c>: step time against peak memory of the <c>--budgets</c> runs.</summary>
    public string? PlotPath { get; init; }

    /// <summary>The planner's choice for a budget at one sequence length (a bench step keeps no optimizer state); null for no budget.</summary>
    public MemoryBudgetPlan? BudgetPlan(long? budget, int seq)
    {
        if (budget is not long bytes)
            return null;
        try
        {
            return MemoryBudgetPlanner.Plan(MemoryCosts.For(Model, seq, "sgd"), bytes, ActivationsInFile);
        }
        catch (MemoryBudgetException e)
        {
            throw new UsageException($"--{(SeveralBudgets ? "budgets" : "memory-budget")}: {e.Message}.");
        }
    }

    /// <summary>The budget of the smallest plan at one sequence length, to the byte: every layer recomputed, checkpoints mapped unless --activations says otherwise.</summary>
    public long SmallestBudget(int seq) => MemoryBudgetPlanner.SmallestPeakBytes(MemoryCosts.For(Model, seq, "sgd"), ActivationsInFile);

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
        long? maxResident = BackendOptions.MaxResident(args);
        bool noReference = args.Flag("no-reference");
        string? activations = args.Optional("activations");
        long? budget = args.Optional("memory-budget") is { } budgetText ? Size(budgetText, "memory-budget") : null;
        string? budgetList = args.Optional("budgets");
        string? plot = args.Optional("plot");
        args.RejectUnknown();
        if (activations is not (null or "memory" or "mmap"))
            throw new UsageException($"--activations takes memory or mmap, not '{activations}'.");

        if (rank != model.Lora.R)
            model = WithRank(model, rank);
        if (steps < 1)
            throw new UsageException("--steps must be at least 1.");
        if (backend is not ("cpu" or "vulkan"))
            throw new UsageException($"Unknown backend '{backend}' (available: cpu, vulkan).");
        if (maxResident is not null && backend != "vulkan")
            throw new UsageException("--max-resident applies to --backend vulkan.");
        if (!File.Exists(weights) && !Directory.Exists(weights))
            throw new UsageException($"--weights {weights}: no such file or folder. Write random weights with " +
                                     $"'lora init-random --model {model.Name} --out DIR'.");
        var sequences = seqs is null ? [seq] : ParseList(seqs);
        if (sequences.Any(s => s < 2))
            throw new UsageException("Every sequence length must be at least 2.");
        long[] budgets = budgetList is null ? [] : budgetList.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(b => Size(b, "budgets")).ToArray();
        if (budgetList is not null && budgets.Length == 0)
            throw new UsageException("--budgets needs at least one size, like --budgets 128MB,256MB,512MB,1GB.");
        if (budgets.Length > 0 && (seqs is not null || budget is not null))
            throw new UsageException($"--budgets: measures one sequence length at several budgets; leave out {(seqs is not null ? "--seqs" : "--memory-budget")}.");
        if (plot is not null && budgets.Length == 0)
            throw new UsageException("--plot draws the runs of --budgets: give --budgets SIZE,SIZE,...");
        if (plot is not null && !plot.EndsWith(".svg", StringComparison.OrdinalIgnoreCase))
            throw new UsageException($"--plot: {plot} is not an .svg file name.");
        var options = new MemoryBenchOptions
        {
            Model = model,
            WeightsPath = Path.GetFullPath(weights),
            Sequences = sequences,
            SeveralSequences = seqs is not null,
            Steps = steps,
            Backend = backend,
            Device = device,
            MaxResident = maxResident,
            NoReference = noReference,
            Activations = activations,
            MemoryBudget = budget,
            Budgets = budgets,
            PlotPath = plot is null ? null : Path.GetFullPath(plot),
        };
        // A budget below the smallest plan is refused now, before any process starts.
        foreach (int s in sequences)
            foreach (long b in budget is long one ? [one] : budgets)
                options.BudgetPlan(b, s);
        return options;
    }

    private static long Size(string text, string option) =>
        ByteSize.TryParse(text, out string problem) ?? throw new UsageException($"--{option}: {problem}.");

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

    /// <summary>The options of a child run at one sequence length (and budget).</summary>
    public IEnumerable<string> ChildArguments(int seq, long? budget = null)
    {
        string[] common =
        [
            "--model", Model.Name, "--weights", WeightsPath, "--seq", seq.ToString(CultureInfo.InvariantCulture),
            "--steps", Steps.ToString(CultureInfo.InvariantCulture), "--backend", Backend,
        ];
        if (Activations is not null)
            common = [.. common, "--activations", Activations];
        if ((budget ?? MemoryBudget) is long bytes)
            common = [.. common, "--memory-budget", bytes.ToString(CultureInfo.InvariantCulture)];
        if (MaxResident is long resident)
            common = [.. common, "--max-resident", BackendOptions.FormatMaxResident(resident)];
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
