using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Tests.Training;

/// <summary>
/// Layers that keep their activations from forward to backward (the kept variant the generator emits
/// beside the recompute one) and the planner that chooses them for a memory budget: the gradients of a
/// plan with kept layers against the TorchSharp autograd reference, the planner's choices, and sizes.
/// </summary>
public class MemoryBudgetTests
{
    private const double GradientTolerance = 1e-4;
    private const double LossTolerance = 1e-5;

    [Theory]
    [InlineData("tiny-qwen2", 23, 1)]   // the last layer kept, the others recomputed
    [InlineData("tiny-qwen2", 23, 4)]   // every layer kept: nothing recomputed
    [InlineData("tiny-llama", 29, 2)]   // LoRA on 5 of 7 projections: fewer values kept
    [InlineData("tiny-qwen3", 21, 3)]   // q/k norms: kept before and after, since RoPE rotates their output
    [InlineData("tiny-gemma3", 23, 3)]  // sandwich norms, GeGLU, sliding and full layers each with their copy
    public void Gradients_with_kept_layers_match_torch_autograd(string modelName, int tokens, int kept)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 7, tokens);
        var (referenceLoss, referenceGradients) = fixture.Reference();

        // Sized for longer sequences than it runs, and a different step first: a kept buffer's unused
        // rows and a previous step's values must not matter.
        using var trainer = CreateTrainer(fixture, new CpuBackend(), tokens + 9, new TrainerOptions(KeptLayers: kept));
        Assert.Equal(kept, trainer.KeptLayers);
        Assert.Equal(Enumerable.Range(0, model.Layers).Select(l => l >= model.Layers - kept), Enumerable.Range(0, model.Layers).Select(trainer.KeepsActivations));
        trainer.ForwardBackward(fixture.Tokens.Reverse().Take(tokens - 3).ToArray());
        trainer.ZeroGradients();
        float loss = trainer.ForwardBackward(fixture.Tokens);

        Assert.InRange(Math.Abs(loss - referenceLoss), 0, LossTolerance * Math.Max(1, Math.Abs(referenceLoss)));
        AssertGradients(trainer.DownloadGradients(), referenceGradients);
    }

    [Theory]
    [InlineData("tiny-llama", 2, 1)]  // layer 1 backpropagates (kept), layers 0 and 2 are skipped
    [InlineData("tiny-gemma3", 2, 0)] // layers 0, 2 and 4 backpropagate, of which 2 and 4 are kept
    public void Kept_layers_under_LCSB_match_autograd_with_stop_gradient(string modelName, int groups, int step)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 13, sequence: 21);
        var skipped = Enumerable.Range(0, model.Layers).Where(l => l % groups != step % groups).ToHashSet();
        var (referenceLoss, referenceGradients) = fixture.Reference(stopGradientLayers: skipped);

        using var trainer = CreateTrainer(fixture, new CpuBackend(), 21, new TrainerOptions(KeptLayers: model.Layers - 1, LcsbGroups: groups));
        float loss = trainer.ForwardBackward(fixture.Tokens, TrainerBase.NextTokenTargets(fixture.Tokens), step);

        Assert.InRange(Math.Abs(loss - referenceLoss), 0, LossTolerance * referenceLoss);
        foreach (var (spec, da, db) in trainer.DownloadGradients())
        {
            int layer = int.Parse(spec.Module.Split('.')[2]);
            foreach (var (name, gradient) in new[] { (spec.AName, da), (spec.BName, db) })
                if (skipped.Contains(layer))
                    Assert.All(gradient, g => Assert.Equal(0f, g));
                else
                    Assert.True(ModelFixture.RelativeError(gradient, referenceGradients[name]) < GradientTolerance, name);
        }
    }

    [Fact]
    public void A_kept_layer_skips_its_recompute()
    {
        // Counted kernels: a recomputed layer runs its six projections before down_proj again in backward; a kept one does not.
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 3, sequence: 12);
        long LinearForwards(int kept)
        {
            var backend = new CountingBackend(new CpuBackend());
            using var trainer = CreateTrainer(fixture, backend, 12, new TrainerOptions(KeptLayers: kept));
            trainer.ForwardBackward(fixture.Tokens);
            return backend.CountOf(nameof(IBackend.LinearForward));
        }
        long none = LinearForwards(0), two = LinearForwards(2), all = LinearForwards(model.Layers);
        Assert.Equal(2 * 6, none - two);
        Assert.Equal(model.Layers * 6, none - all);
    }

    [Theory]
    [InlineData("tiny-qwen2", 0)]
    [InlineData("tiny-qwen2", 3)]
    [InlineData("tiny-gemma3", 5)]
    public void A_trainer_allocates_its_plan_with_its_kept_layers(string modelName, int kept)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 5, sequence: 8);
        using var trainer = CreateTrainer(fixture, new CpuBackend(), 33, new TrainerOptions(KeptLayers: kept));
        var plan = model.Plan(33, kept);
        Assert.Equal(plan.TotalBytes - plan.BytesOf(BufferRole.Weights), trainer.AllocatedBytes);
        var keptRow = Assert.Single(plan.Buffers, b => b.Role == BufferRole.KeptActivations);
        Assert.Equal(kept * keptRow.Bytes(33), plan.BytesOf(BufferRole.KeptActivations));
    }

    [Fact]
    public void Kept_layers_add_no_allocation_to_a_step()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 9, sequence: 16);
        var targets = TrainerBase.NextTokenTargets(fixture.Tokens);
        long StepBytes(int kept)
        {
            using var trainer = CreateTrainer(fixture, new CpuBackend(), 16, new TrainerOptions(KeptLayers: kept));
            trainer.CaptureGradients = false;
            for (int i = 0; i < 3; i++)
                trainer.ForwardBackward(fixture.Tokens, targets, step: i);
            long before = GC.GetAllocatedBytesForCurrentThread();
            trainer.ForwardBackward(fixture.Tokens, targets, step: 3);
            return GC.GetAllocatedBytesForCurrentThread() - before;
        }
        Assert.Equal(StepBytes(0), StepBytes(model.Layers));
    }

    [Fact]
    public void A_budget_in_the_options_is_planned_by_the_trainer()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 5, sequence: 8);
        var costs = MemoryCosts.For(model, 16);
        long budget = costs.PeakBytes(model.Layers, activationsInFile: false, optimizerStateInFile: false); // every layer, all in memory: exactly
        using var trainer = CreateTrainer(fixture, new CpuBackend(), 16, new TrainerOptions(MemoryBudget: budget));
        Assert.Equal(model.Layers, trainer.KeptLayers);
        Assert.Equal(budget, trainer.BudgetPlan!.PlannedPeakBytes);
        Assert.False(trainer.ActivationsInFile);
        Assert.False(trainer.OptimizerStateInFile);
    }

    // ---- the planner ------------------------------------------------------------------------

    /// <summary>Costs with round numbers (MB), so that every expected plan below is worked out by hand.</summary>
    private static readonly MemoryCosts Costs = new(Layers: 24, BufferBytes: 50_000_000, CheckpointBytes: 23_000_000,
        OptimizerStateBytes: 35_000_000, KeptBytesPerLayer: 13_000_000, RuntimeBytes: 40_000_000);

    [Theory]
    // budget MB, kept, checkpoints in a file, moments in files; the placements cost 148 (both in memory),
    // 125 (checkpoints mapped), 113 (moments mapped) and 90 MB (both mapped) before any kept layer
    [InlineData(90, 0, true, true)]      // only the smallest plan fits
    [InlineData(125, 2, true, true)]     // in memory nothing more fits; with both mapped 35 MB are left: 2 layers of 13
    [InlineData(200, 8, true, true)]     // both mapped: 110 MB, 8 layers (in memory only 4 would fit)
    [InlineData(430, 24, false, true)]   // every layer: with the moments mapped (113 + 312 = 425), not yet in memory (460)
    [InlineData(460, 24, false, false)]  // every layer and everything in memory: 148 + 24·13 = 460
    [InlineData(1000, 24, false, false)]
    public void The_planner_keeps_what_fits_and_prefers_memory_to_files(int budgetMb, int kept, bool checkpointsInFile, bool stateInFile)
    {
        var plan = MemoryBudgetPlanner.Plan(Costs, budgetMb * 1_000_000L);
        Assert.Equal((kept, checkpointsInFile, stateInFile), (plan.KeptLayers, plan.ActivationsInFile, plan.OptimizerStateInFile));
        Assert.True(plan.PlannedPeakBytes <= plan.BudgetBytes);
        // The peak is what it is made of: runtime, buffers, what is in memory, the kept layers.
        Assert.Equal(40_000_000 + 50_000_000 + (checkpointsInFile ? 0 : 23_000_000) + (stateInFile ? 0 : 35_000_000) + kept * 13_000_000L,
            plan.PlannedPeakBytes);
    }

    [Fact]
    public void More_budget_never_keeps_fewer_layers_and_the_last_layers_are_kept_first()
    {
        var model = TrainerCatalog.Find("qwen2.5-0.5b")!;
        var costs = MemoryCosts.For(model, 256);
        int previous = 0;
        long smallest = MemoryBudgetPlanner.SmallestPeakBytes(costs);
        for (long budget = smallest; budget <= 2_000_000_000; budget += 7_000_000)
        {
            var plan = MemoryBudgetPlanner.Plan(costs, budget);
            Assert.True(plan.KeptLayers >= previous, $"{budget}: {plan.KeptLayers} kept after {previous}");
            Assert.InRange(plan.PlannedPeakBytes, 0, budget);
            // Keeping one more layer would not fit in the chosen placement.
            if (plan.KeptLayers < model.Layers)
                Assert.True(plan.PlannedPeakBytes + costs.KeptBytesPerLayer > budget);
            previous = plan.KeptLayers;
        }
        Assert.Equal(model.Layers, previous);
        Assert.Equal("layers 22..23 (2 of 24)", MemoryBudgetPlanner.Plan(Costs, 125_000_000).KeptDescription);
        Assert.Equal("all 24 (nothing recomputed)", MemoryBudgetPlanner.Plan(Costs, 460_000_000).KeptDescription);
    }

    [Fact]
    public void The_kept_bytes_are_the_values_a_layers_backward_reads()
    {
        // Qwen2.5-0.5B at 256 tokens: q 896, k and v 128 each, att 896, lse 14 (heads), x2 896, gate and up 4864 each.
        var model = TrainerCatalog.Find("qwen2.5-0.5b")!;
        var costs = MemoryCosts.For(model, 256);
        Assert.Equal((896 + 128 + 128 + 896 + 14 + 896 + 4864 + 4864) * 256L * 4, costs.KeptBytesPerLayer);
        Assert.Equal(25 * 896 * 256L * 4, costs.CheckpointBytes);
        Assert.Equal(2 * model.LoraParameterCount * 4, costs.OptimizerStateBytes);
        Assert.Equal(0, MemoryCosts.For(model, 256, "sgd").OptimizerStateBytes);
        Assert.Equal(3 * model.LoraParameterCount * 4, MemoryCosts.For(model, 256, "adamw", gradientAccumulation: 4).OptimizerStateBytes);
    }

    [Fact]
    public void A_budget_below_the_smallest_plan_is_refused_with_the_numbers()
    {
        var e = Assert.Throws<MemoryBudgetException>(() => MemoryBudgetPlanner.Plan(Costs, 80_000_000));
        Assert.Contains("80.0 MB is below the smallest plan, 90.0 MB", e.Message);
        Assert.Contains("trainer buffers 50.0 MB", e.Message);
        Assert.Contains("runtime allowance 40.0 MB", e.Message);

        // A placement fixed in memory raises the smallest plan by what it holds.
        e = Assert.Throws<MemoryBudgetException>(() => MemoryBudgetPlanner.Plan(Costs, 100_000_000, activationsInFile: false));
        Assert.Contains("the smallest plan, 113.0 MB", e.Message);
        Assert.Contains("checkpoints 23.0 MB", e.Message);
    }

    [Fact]
    public void A_fixed_placement_is_kept()
    {
        var plan = MemoryBudgetPlanner.Plan(Costs, 1_000_000_000, activationsInFile: true, optimizerStateInFile: true);
        Assert.Equal((24, true, true), (plan.KeptLayers, plan.ActivationsInFile, plan.OptimizerStateInFile));
    }

    // ---- sizes --------------------------------------------------------------------------------

    [Theory]
    [InlineData("512MB", 512_000_000L)]
    [InlineData("512 mb", 512_000_000L)]
    [InlineData("1GB", 1_000_000_000L)]
    [InlineData("1GiB", 1_073_741_824L)]
    [InlineData("256MiB", 268_435_456L)]
    [InlineData("1.5KiB", 1536L)]
    [InlineData("2KB", 2000L)]
    [InlineData("12345", 12345L)]
    [InlineData("7B", 7L)]
    public void Sizes_are_decimal_or_binary(string text, long bytes) => Assert.Equal(bytes, ByteSize.Parse(text));

    [Theory]
    [InlineData("", "not a size")]
    [InlineData("MB", "not a size")]
    [InlineData("-1MB", "not a size")]
    [InlineData("1.2.3MB", "not a size")]
    [InlineData(".5GB", "not a size")]
    [InlineData("12XB", "unknown unit 'XB'")]
    [InlineData("0", "not a positive size")]
    [InlineData("99999999TB", "fits 64 bits")]
    public void Other_text_is_not_a_size(string text, string reason)
    {
        Assert.Null(ByteSize.TryParse(text, out string problem));
        Assert.Contains(reason, problem);
        Assert.Contains(reason, Assert.Throws<FormatException>(() => ByteSize.Parse(text)).Message);
    }

    private static TrainerBase CreateTrainer(ModelFixture fixture, IBackend backend, int maxSequence, TrainerOptions options) =>
        fixture.Model.Create(backend, fixture.OpenWeights(),
            LoraAdapter.Load(fixture.AdapterPath, fixture.Model.Lora, fixture.Model.LoraModules), maxSequence, options);

    private static void AssertGradients(IEnumerable<(LoraModuleSpec Spec, float[] DA, float[] DB)> actual, Dictionary<string, float[]> expected)
    {
        int checkedTensors = 0;
        foreach (var (spec, da, db) in actual)
            foreach (var (name, gradient) in new[] { (spec.AName, da), (spec.BName, db) })
            {
                var reference = expected[name];
                Assert.True(reference.Any(v => v != 0), $"{name}: the reference gradient is zero, the test would prove nothing");
                double error = ModelFixture.RelativeError(gradient, reference);
                Assert.True(error < GradientTolerance, $"{name}: relative error {error:E2} ≥ {GradientTolerance:E0}");
                checkedTensors++;
            }
        Assert.Equal(expected.Count, checkedTensors);
    }
}

/// <summary><c>lora train --memory-budget</c>: a run whose layers keep their activations trains exactly as one that recomputes them.</summary>
[Collection(LoraCompiler.Tests.Cli.ConsoleOutputCollection.Name)]
public class MemoryBudgetTrainingTests
{
    [Theory]
    [InlineData("tiny-qwen2", "adamw")]
    [InlineData("tiny-gemma3", "sgd")]
    public void A_run_with_kept_layers_writes_the_adapter_of_a_run_without(string modelName, string optimizer)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 61, sequence: 8);
        string data = Path.Combine(fixture.Dir, "train.txt");
        File.WriteAllText(data, string.Concat(Enumerable.Repeat("The quick brown fox jumps over the lazy dog. ", 20)));
        string[] Train(string outDir) => [
            "--model", model.Name, "--weights", fixture.WeightsPath, "--data", data, "--out", outDir,
            "--steps", "6", "--seq", "32", "--lr", "1e-2", "--optimizer", optimizer, "--seed", "3", "--lcsb-groups", "2"];

        string kept = Path.Combine(fixture.Dir, "kept"), plain = Path.Combine(fixture.Dir, "plain");
        var (code, lines) = LoraCompiler.Tests.Cli.ConsoleOutput.Capture(() => Commands.Train(new Args([.. Train(kept), "--memory-budget", "10GB"])));
        Assert.Equal(0, code);
        Assert.Contains(lines, l => l.StartsWith("memory budget 10.0 GB: planned peak", StringComparison.Ordinal));
        Assert.Contains(lines, l => l.Contains($"layers keeping their activations: all {model.Layers} (nothing recomputed)", StringComparison.Ordinal));
        Assert.Equal(0, LoraCompiler.Tests.Cli.ConsoleOutput.Capture(() => Commands.Train(new Args(Train(plain)))).Code);

        var a = LoraAdapter.Load(kept, model.Lora, model.LoraModules);
        var b = LoraAdapter.Load(plain, model.Lora, model.LoraModules);
        foreach (var (x, y) in a.Modules.Zip(b.Modules))
        {
            Assert.True(ModelFixture.RelativeError(x.A, y.A) < 1e-6, x.Spec.AName);
            Assert.True(ModelFixture.RelativeError(x.B, y.B) < 1e-6, x.Spec.BName);
        }
    }
}
