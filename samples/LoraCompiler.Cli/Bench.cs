using System.Diagnostics;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Cli;

/// <summary>
/// <c>lora bench kernels</c>: the NT matrix product (the linear layer's forward) in GFLOP/s on each
/// backend; <c>lora bench step --model NAME</c>: one training step's time on each backend, on random
/// weights. Both print a table with the machine's and the device's names. <c>lora bench memory</c> is
/// <see cref="BenchMemory"/>.
/// </summary>
public static class Bench
{
    public const string Usage = """
          bench kernels [--backend cpu|vulkan|all] [--device D] [--seconds S]
                                                      NT matrix-product GFLOP/s (the linear forward) per backend;
                                                      on the CPU also with 4-bit and BF16 weights, and the NN
                                                      product (the input gradient dy·W) with each
          bench step --model NAME [--seq N] [--steps N] [--backend cpu|vulkan|all] [--device D] [--quantize q4] [--dtype F32|BF16|F16]
                     [--max-resident SIZE]
                                                      one training step's time per backend (forward, backward,
                                                      AdamW), random weights, and
                                                      the bytes a step moves between host and device; Vulkan's
                                                      device memory (peak, resident weights); --max-resident
                                                      caps the weights kept on the device (0 streams them all)
        """ + "\n" + BenchMemory.Usage + "\n" + BenchDecode.Usage;

    // (T, din, dout): the shapes of Qwen2.5-0.5B's projections at 256 tokens.
    private static readonly (int T, int In, int Out)[] Shapes = [(256, 896, 896), (256, 896, 4864), (256, 4864, 896)];

    public static int Run(string what, Args args) => what switch
    {
        "kernels" => Kernels(args),
        "step" => Step(args),
        "memory" => BenchMemory.Run(args),
        "decode" => BenchDecode.Run(args),
        _ => throw new UsageException($"Unknown benchmark '{what}': use 'bench kernels', 'bench step', 'bench memory' or 'bench decode'."),
    };

    private static int Kernels(Args args)
    {
        var backends = Backends(args);
        double seconds = args.Float("seconds", 1f, min: 0, exclusiveMin: true);
        args.RejectUnknown();
        Header();
        Console.WriteLine($"{"product (T×in → out)",-26} {"backend",-44} {"weight",-6} {"ms/call",10} {"GFLOP/s",9} {"vs cpu",7}");
        var rng = new Random(1);
        foreach (var (T, din, dout) in Shapes)
        {
            double flops = 2.0 * T * din * dout;
            double? cpuRate = null;
            foreach (var make in backends)
            {
                using var backend = make();
                var weights = RandomValues(rng, din * dout);
                using var x = backend.Upload("x", RandomValues(rng, T * din));
                using var w = backend.Upload("w", weights);
                using var y = backend.Allocate("y", (long)T * dout);
                double ms = Time(backend, () => backend.LinearForward(y, x, w, null, T, din, dout), seconds);
                double rate = flops / ms / 1e6;
                if (backend is CpuBackend)
                    cpuRate = rate;
                string ratio = cpuRate is double c && backend is not CpuBackend ? $"{rate / c,6:F2}x" : "";
                Console.WriteLine($"{$"{T}×{din} → {dout}",-26} {backend.Name,-44} {"f32",-6} {ms,10:F2} {rate,9:F2} {ratio,7}");
                if (backend is not CpuBackend)
                    continue;

                // The CPU with the same weight in 4 bits (dequantized inside the product) and in BF16
                // (converted inside the product), then the input gradient dx = dy·W with each.
                using var q4 = new CpuQ4Tensor(Q4.Quantize("w", weights, dout, din));
                using var bf16 = new CpuFloat16Tensor(new Float16Weight("w", Float16Format.BF16, dout, din,
                    weights.Select(v => (ushort)(BitConverter.SingleToUInt32Bits(v) >> 16)).ToArray()));
                foreach (var (label, weight) in new (string, Tensor)[] { ("q4", q4), ("bf16", bf16) })
                {
                    ms = Time(backend, () => backend.LinearForward(y, x, weight, null, T, din, dout), seconds);
                    Console.WriteLine($"{$"{T}×{din} → {dout}",-26} {backend.Name,-44} {label,-6} {ms,10:F2} {flops / ms / 1e6,9:F2} {flops / ms / 1e6 / cpuRate,6:F2}x");
                }
                foreach (var (label, weight) in new (string, Tensor)[] { ("f32", w), ("q4", q4), ("bf16", bf16) })
                {
                    ms = Time(backend, () => backend.LinearBackwardInput(x, y, weight, T, din, dout, false), seconds);
                    Console.WriteLine($"{$"{T}×{dout} → {din} (dy·W)",-26} {backend.Name,-44} {label,-6} {ms,10:F2} {flops / ms / 1e6,9:F2} {flops / ms / 1e6 / cpuRate,6:F2}x");
                }
            }
        }
        Console.WriteLine("vs cpu: against the CPU's float32 forward at the same shape.");
        return 0;
    }

    private static int Step(Args args)
    {
        string name = args.Required("model");
        var model = TrainerCatalog.Find(name) ?? throw new UsageException($"No trainer for model '{name}'.");
        int seq = Commands.Seq(args, model, 64);
        int steps = args.Int("steps", 2, min: 1);
        string? quantize = args.Optional("quantize");
        string dtype = args.Get("dtype", "F32").ToUpperInvariant();
        long? maxResident = BackendOptions.MaxResident(args);
        var backends = Backends(args, maxResident);
        args.RejectUnknown();
        if (seq < 2 || steps < 1)
            throw new UsageException("--seq must be at least 2 and --steps at least 1.");
        if (quantize is not (null or "q4"))
            throw new UsageException($"Unknown --quantize '{quantize}' (available: q4).");
        if (dtype is not ("F32" or "BF16" or "F16"))
            throw new UsageException($"Unknown --dtype '{dtype}' (available: F32, BF16, F16).");

        string dir = Directory.CreateTempSubdirectory("lora-bench-").FullName;
        try
        {
            Console.WriteLine($"Writing random weights for {model.Name} ({model.ParameterCount / 1e6:F1}M parameters, {(quantize is null ? dtype : $"4-bit, the rest {dtype}")})...");
            RandomWeights.Write(model, dir, seed: 1, dtype, quantizeGroupSize: quantize is null ? null : Q4.DefaultGroupSize);
            using var weights = ModelWeights.Open(dir);
            var tokens = Enumerable.Range(0, seq + 1).Select(i => (i * 7919 + 13) % model.Vocab).ToArray();
            Header();
            Console.WriteLine($"{"model",-14} {"seq",5} {"backend",-44} {"first step s",12} {"step s",9} {"tokens/s",9}");
            foreach (var make in backends)
            {
                using var backend = make();
                var adapter = LoraAdapter.CreateNew(model.Lora, model.LoraModules, seed: 1);
                using var trainer = model.Create(backend, weights, adapter, seq);
                var vulkan = backend as VulkanBackend;
                // A step of a training run: forward, backward and AdamW layer by layer, the run's checks
                // read at its end. The first step uploads what stays resident; the others are timed.
                var run = new TrainingRun(trainer, new TokenWindows(tokens, seq, "one repeated sequence"),
                    new TrainingOptions { Steps = steps + 1, Optimizer = "adamw" }, Path.Combine(dir, $"run-{backends.IndexOf(make)}"));
                var watch = Stopwatch.StartNew();
                double first = 0, timed = 0;
                long transferred = 0, weightUploads = 0, perStep = 0, weightsPerStep = 0;
                run.StepCompleted += m =>
                {
                    if (m.Step == 1)
                    {
                        first = watch.Elapsed.TotalSeconds;
                        vulkan?.ResetPeakDeviceMemory();
                        (transferred, weightUploads) = (backend.TransferredBytes, vulkan?.WeightUploadBytes ?? 0);
                        watch.Restart();
                    }
                    else if (m.Step == steps + 1)
                    {
                        // Before the run's final checkpoint, which reads the adapter and the moments back.
                        timed = watch.Elapsed.TotalSeconds;
                        perStep = (backend.TransferredBytes - transferred) / steps;
                        weightsPerStep = ((vulkan?.WeightUploadBytes ?? 0) - weightUploads) / steps;
                    }
                };
                run.Run();
                double step = timed / steps;
                Console.WriteLine($"{model.Name,-14} {seq,5} {backend.Name,-44} {first,12:F3} {step,9:F3} {seq / step,9:F0}");
                // Over the timed steps, so the first step's uploads of resident weights are not in it.
                Console.WriteLine($"  host<->device per step: {perStep} bytes" + (vulkan is null ? "" :
                    $" ({weightsPerStep} of them base weights; {vulkan.ResidentWeights} weights resident, " +
                    $"{vulkan.ResidentWeightBytes} bytes)"));
                if (vulkan is not null)
                    Console.WriteLine("  " + DeviceMemoryLine(vulkan.DeviceMemory, trainer.AllocatedBytes, vulkan.ResidentWeightBytes));
                if (vulkan is not null)
                    Console.WriteLine("  " + KernelsLine(vulkan));
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
        return 0;
    }

    /// <summary>
    /// The step's peak device memory (this backend's own count, and the driver's usage where it has
    /// VK_EXT_memory_budget) and whether the trainer's device buffers are its memory plan.
    /// </summary>
    internal static string DeviceMemoryLine(VulkanDeviceMemory m, long trainerBytes, long residentBytes) =>
        $"device memory: peak {m.DeviceLocal.PeakBytes} bytes device-local in {m.DeviceLocal.PeakAllocations} buffers, " +
        $"{m.HostVisible.PeakBytes} bytes host-visible staging; now {m.TensorBytes} bytes of tensors " +
        $"({(m.TensorBytes == trainerBytes ? "=" : "≠")} the trainer's AllocatedBytes {trainerBytes}), {m.WeightBytes} of base weights " +
        $"({residentBytes} resident), {m.BackendBytes} the backend's own" +
        (m.Usage is long usage ? $"; driver: usage {usage} of budget {m.Budget} bytes" : "; driver: no VK_EXT_memory_budget") +
        $"; heap {m.HeapBytes} bytes";

    /// <summary>Milliseconds per call: one warm-up call, then repeats until <paramref name="seconds"/> have passed (at least 2).</summary>
    private static double Time(IBackend backend, Action call, double seconds)
    {
        call();
        backend.Synchronize();
        int calls = 0;
        var watch = Stopwatch.StartNew();
        do
        {
            call();
            backend.Synchronize();
            calls++;
        }
        while (calls < 2 || watch.Elapsed.TotalSeconds < seconds);
        return watch.Elapsed.TotalMilliseconds / calls;
    }

    private static List<Func<IBackend>> Backends(Args args, long? maxResident = null)
    {
        string which = args.Get("backend", "all");
        string? device = args.Optional("device");
        if (maxResident is not null && which == "cpu")
            throw new UsageException("--max-resident applies to --backend vulkan (or all).");
        var list = new List<Func<IBackend>>();
        if (which is "cpu" or "all")
            list.Add(() => new CpuBackend());
        if (which is "vulkan" or "all")
        {
            if (which == "all" && device is null && !VulkanDevice.IsAvailable(out string reason))
                Console.WriteLine($"(no Vulkan backend: {reason})");
            else
                list.Add(() => BackendOptions.CreateVulkan(device, maxResident));
        }
        if (list.Count == 0)
            throw new UsageException($"Unknown backend '{which}' (cpu, vulkan or all).");
        return list;
    }

    /// <summary>The shader variants the device's features chose, and the features they were chosen from.</summary>
    internal static string KernelsLine(VulkanBackend vulkan)
    {
        var d = vulkan.Device;
        return $"kernels: per-row reductions {(vulkan.Subgroups ? $"through subgroups (size {d.SubgroupSize})" : "through shared memory")}, " +
               $"workgroup width {vulkan.WorkgroupWidth}; device: subgroup arithmetic {(d.SubgroupArithmetic ? "yes" : "no")}, " +
               $"16-bit storage {(d.Storage16Bit ? "yes" : "no")}, fp16 arithmetic {(d.Float16Arithmetic ? "yes" : "no")} (16-bit weights are read as packed words either way; arithmetic stays fp32)";
    }

    private static void Header()
    {
        Console.WriteLine($"machine: {Environment.MachineName}, {Environment.ProcessorCount} logical processors, {System.Runtime.InteropServices.RuntimeInformation.OSDescription}");
        try
        {
            foreach (var d in VulkanDevice.List())
                Console.WriteLine($"vulkan device {d}");
        }
        catch (VulkanException e)
        {
            Console.WriteLine($"vulkan: {e.Message}");
        }
    }

    private static float[] RandomValues(Random rng, int n)
    {
        var values = new float[n];
        for (int i = 0; i < n; i++)
            values[i] = (float)(rng.NextDouble() * 2 - 1);
        return values;
    }
}
