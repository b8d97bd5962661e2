using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Data;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Tests.Training;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>
/// Whole training runs on the device: the optimizer, the gradient sums and the checks run there, and
/// the adapter a run ends with is the CPU's.
/// </summary>
public class VulkanTrainingTests
{
    private const double AdapterTolerance = 1e-4;

    /// <summary>Sequences in turn, the same order on every backend.</summary>
    private sealed class Sequences(IReadOnlyList<int[]> sequences) : ITrainingData
    {
        private int _next;

        public string Description => $"{sequences.Count} sequences in turn";

        public (ReadOnlyMemory<int> Tokens, ReadOnlyMemory<int> Targets) Next()
        {
            var tokens = sequences[_next++ % sequences.Count];
            return (tokens, TrainerBase.NextTokenTargets(tokens));
        }

        public string Position { get => _next.ToString(); set => _next = int.Parse(value); }
    }

    private static (LoraAdapter Adapter, IReadOnlyList<StepMetrics> Metrics, long[] Traffic) Train(IBackend backend, ModelFixture fixture,
        TrainingOptions options, string name)
    {
        var rng = new Random(11);
        var sequences = Enumerable.Range(0, 3).Select(_ => Enumerable.Range(0, 20).Select(_ => rng.Next(fixture.Model.Vocab)).ToArray()).ToList();
        using var trainer = fixture.CreateTrainer(backend, maxSequence: 20);
        string outDir = Path.Combine(fixture.Dir, name);
        var run = new TrainingRun(trainer, new Sequences(sequences), options, outDir);
        var traffic = new long[options.Steps + 1];
        run.StepCompleted += m => traffic[m.Step] = backend.TransferredBytes;
        Assert.True(run.Run());
        return (LoraAdapter.Load(outDir, fixture.Model.Lora, fixture.Model.LoraModules), run.Metrics, traffic);
    }

    [VulkanTheory]
    [InlineData("tiny-qwen2", "adamw", 2, 2)] // AdamW, gradient accumulation and LCSB together
    [InlineData("tiny-llama", "adamw", 1, 1)]
    [InlineData("tiny-gemma3", "sgd", 3, 1)]
    [InlineData("tiny-qwen2", "adamw", 1, 3)]
    public void A_run_on_the_device_ends_with_the_cpus_adapter(string modelName, string optimizer, int accumulation, int lcsbGroups)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 23, sequence: 20);
        var options = new TrainingOptions
        {
            Steps = 6, LearningRate = 5e-3f, Optimizer = optimizer, GradientAccumulation = accumulation, LcsbGroups = lcsbGroups,
            WeightDecay = optimizer == "adamw" ? 0.01f : 0, SaveEvery = 3,
        };
        var (cpu, cpuMetrics, _) = Train(new CpuBackend(), fixture, options, "cpu");
        using var vulkan = VulkanTestDevice.Create();
        var (gpu, gpuMetrics, _) = Train(vulkan, fixture, options, "vulkan");

        foreach (var (c, g) in cpuMetrics.Zip(gpuMetrics))
            Assert.InRange(Math.Abs(c.Loss - g.Loss), 0, 1e-4 * Math.Max(1, c.Loss));
        var start = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        foreach (var ((c, g), s) in cpu.Modules.Zip(gpu.Modules).Zip(start.Modules))
        {
            Assert.True(ModelFixture.RelativeError(g.A, c.A) < AdapterTolerance, $"{c.Spec.AName}: {ModelFixture.RelativeError(g.A, c.A):E2}");
            Assert.True(ModelFixture.RelativeError(g.B, c.B) < AdapterTolerance, $"{c.Spec.BName}: {ModelFixture.RelativeError(g.B, c.B):E2}");
            // The run moved the adapter (else the comparison says nothing): B starts at zero.
            Assert.True(ModelFixture.RelativeError(c.A, s.A) > 1e-4 || c.B.Any(x => x != 0), c.Spec.Module);
        }
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
    }

    [VulkanTheory]
    [InlineData("adamw", 1, 1)]
    [InlineData("adamw", 2, 2)]
    [InlineData("sgd", 3, 1)]
    public void A_steady_state_step_moves_only_tokens_targets_and_the_loss(string optimizer, int accumulation, int lcsbGroups)
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 23, sequence: 20);
        using var vulkan = VulkanTestDevice.Create();
        var options = new TrainingOptions { Steps = 5, Optimizer = optimizer, GradientAccumulation = accumulation, LcsbGroups = lcsbGroups };
        var (_, _, traffic) = Train(vulkan, fixture, options, "vulkan");
        // Per sequence: 20 tokens and 20 targets in (int32), the loss out (a float); per step: the
        // checks' status word out. The weights stay on the device after the first step.
        long expected = accumulation * (20 * sizeof(int) * 2 + sizeof(float)) + sizeof(uint);
        for (int step = 3; step <= options.Steps; step++)
            Assert.Equal(expected, traffic[step] - traffic[step - 1]);
    }

    [VulkanFact]
    public void A_stopped_run_on_the_device_resumes_to_the_same_adapter()
    {
        // The checkpoint reads the adapter and AdamW's moments back from the device; the resume writes them there again.
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 23, sequence: 20);
        var options = new TrainingOptions { Steps = 6, LearningRate = 5e-3f, GradientAccumulation = 2, LcsbGroups = 2, SaveEvery = 2 };
        using var vulkan = VulkanTestDevice.Create();
        var (whole, _, _) = Train(vulkan, fixture, options, "whole");

        var rng = new Random(11);
        var sequences = Enumerable.Range(0, 3).Select(_ => Enumerable.Range(0, 20).Select(_ => rng.Next(model.Vocab)).ToArray()).ToList();
        string outDir = Path.Combine(fixture.Dir, "stopped");
        using (var trainer = fixture.CreateTrainer(vulkan, maxSequence: 20))
        {
            using var stop = new CancellationTokenSource();
            var run = new TrainingRun(trainer, new Sequences(sequences), options, outDir);
            run.StepCompleted += m => { if (m.Step == 3) stop.Cancel(); };
            Assert.False(run.Run(stop.Token));
            Assert.Equal(3, run.LastCheckpointStep);
        }
        using (var trainer = fixture.CreateTrainer(vulkan, maxSequence: 20))
        {
            var run = new TrainingRun(trainer, new Sequences(sequences), options, outDir);
            Assert.True(run.Resume(outDir));
            Assert.True(run.Run());
        }
        var resumed = LoraAdapter.Load(outDir, model.Lora, model.LoraModules);
        foreach (var (a, b) in whole.Modules.Zip(resumed.Modules))
        {
            Assert.True(ModelFixture.RelativeError(b.A, a.A) < 1e-6, a.Spec.AName);
            Assert.True(ModelFixture.RelativeError(b.B, a.B) < 1e-6, a.Spec.BName);
        }
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
    }

    [VulkanFact]
    public void MeZO_on_the_device_ends_near_the_cpus_adapter()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 29, sequence: 20);
        // Float32 losses differ in their last bits between backends, and MeZO divides their difference
        // by 2ε: ε = 1e-2 keeps that within the tolerance over a few steps.
        var options = new TrainingOptions { Steps = 4, LearningRate = 1e-3f, Method = "mezo", Optimizer = "sgd", MezoEpsilon = 1e-2f, Seed = 5 };
        var (cpu, _, _) = Train(new CpuBackend(), fixture, options, "cpu");
        using var vulkan = VulkanTestDevice.Create();
        var (gpu, _, _) = Train(vulkan, fixture, options, "vulkan");
        var start = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        foreach (var ((c, g), s) in cpu.Modules.Zip(gpu.Modules).Zip(start.Modules))
        {
            var cpuMove = c.A.Zip(s.A, (x, y) => x - y).ToArray();
            var gpuMove = g.A.Zip(s.A, (x, y) => x - y).ToArray();
            Assert.True(cpuMove.Any(x => x != 0), c.Spec.AName);
            Assert.True(ModelFixture.RelativeError(gpuMove, cpuMove) < 1e-2, $"{c.Spec.AName}: {ModelFixture.RelativeError(gpuMove, cpuMove):E2}");
        }
    }

    [VulkanTheory]
    [InlineData("vulkan")]
    [InlineData("cpu")]
    public void A_diverging_run_names_the_first_tensor_that_is_not_finite(string backendName)
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 23, sequence: 20);
        using IBackend backend = backendName == "cpu" ? new CpuBackend() : VulkanTestDevice.Create();
        // Weight decay this large sends every nonzero parameter to infinity in the first update: the
        // step's checks, read at its end, name the first module's A (B starts at zero and stays finite).
        var options = new TrainingOptions { Steps = 5, LearningRate = 1e30f, WeightDecay = 1e10f };
        var error = Assert.Throws<TrainingDivergedException>(() => Train(backend, fixture, options, backendName));
        Assert.Equal($"step 1: the update of {model.LoraModules[0].AName} is not finite (infinite)", error.Message);
        Assert.False(Directory.Exists(Path.Combine(fixture.Dir, backendName, TrainingRun.CheckpointFolder)));
    }
}
