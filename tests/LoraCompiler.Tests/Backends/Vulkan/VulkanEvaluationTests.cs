using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using LoraCompiler.Tests.Training;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>
/// Evaluation and validation on the Vulkan backend, where the LoRA parameters an optimizer steps live
/// on the device: the held-out loss is the CPU's, and validating leaves training alone.
/// </summary>
public sealed class VulkanEvaluationTests
{
    [VulkanFact]
    public void Validation_on_vulkan_scores_the_updated_adapter_and_leaves_training_alone()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 73, sequence: 4 * 12 + 1);
        var held = EvaluationData.Windows(fixture.Tokens[20..], 12, "held-out");
        var options = new TrainingOptions { Steps = 4, LearningRate = 1e-2f };

        LoraAdapter Train(ValidationOptions? validation, out IReadOnlyList<StepMetrics> metrics, string name)
        {
            using var vulkan = VulkanTestDevice.Create();
            using var trainer = fixture.CreateTrainer(vulkan, 12);
            var run = new TrainingRun(trainer, new TokenWindows(fixture.Tokens, 12, "train"), options, Path.Combine(fixture.Dir, name), validation);
            run.Run();
            VulkanTestDevice.AssertNoValidationErrors(vulkan);
            metrics = run.Metrics;
            return LoraAdapter.Load(Path.Combine(fixture.Dir, name), model.Lora, model.LoraModules);
        }

        var validated = Train(new ValidationOptions(held) { Every = 2 }, out var metrics, "validated");
        var plain = Train(null, out var plainMetrics, "plain");

        Assert.Equal([2, 4], metrics.Where(m => m.ValidationLoss is not null).Select(m => m.Step));
        Assert.Equal(plainMetrics.Select(m => m.Loss), metrics.Select(m => m.Loss));
        foreach (var (a, b) in validated.Modules.Zip(plain.Modules))
        {
            Assert.True(ModelFixture.RelativeError(a.A, b.A) < 1e-6, a.Spec.AName);
            Assert.True(ModelFixture.RelativeError(a.B, b.B) < 1e-6, a.Spec.BName);
        }

        // The last validation is the CPU's loss of the adapter the run wrote.
        using var weights = ModelWeights.Open(fixture.WeightsPath);
        using var cpu = model.Create(new CpuBackend(), weights, validated, 12);
        double expected = held.Evaluate(cpu).Loss;
        Assert.InRange(Math.Abs(metrics[^1].ValidationLoss!.Value - expected), 0, 1e-5 * Math.Max(1, expected));
    }
}
