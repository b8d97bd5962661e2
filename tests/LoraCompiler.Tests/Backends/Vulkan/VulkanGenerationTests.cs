using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>Decoding with the KV cache on the Vulkan backend: every step's logits against the CPU backend's, and the same greedy tokens.</summary>
public sealed class VulkanGenerationTests
{
    [VulkanTheory]
    [InlineData("tiny-qwen2")]
    [InlineData("tiny-gemma3")] // sliding layers: the ring cache wraps during the 14 decoded tokens
    public void DecodingMatchesTheCpu(string modelName)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 9, sequence: 18);
        int[] tokens = fixture.Tokens;
        const int prompt = 4;

        using var vulkan = VulkanTestDevice.Create();
        using var cpuTrainer = fixture.CreateTrainer(new CpuBackend(), tokens.Length);
        using var gpuTrainer = fixture.CreateTrainer(vulkan, tokens.Length);
        using var cpu = new TokenGenerator(cpuTrainer, tokens.Length);
        using var gpu = new TokenGenerator(gpuTrainer, tokens.Length);
        for (int t = prompt - 1; t < tokens.Length; t++)
        {
            var (expected, actual) = t == prompt - 1
                ? ((float[])cpu.Step(tokens.AsSpan(0, prompt), 0).Clone(), gpu.Step(tokens.AsSpan(0, prompt), 0))
                : ((float[])cpu.Step(tokens.AsSpan(t, 1), t).Clone(), gpu.Step(tokens.AsSpan(t, 1), t));
            double error = ModelFixture.RelativeError(actual, expected);
            Assert.True(error < 1e-5, $"position {t}: Vulkan's logits differ from the CPU's by {error:E2}");
        }
        VulkanTestDevice.AssertNoValidationErrors(vulkan);

        var greedyCpu = NewGenerator(fixture, new CpuBackend()).Generate(tokens[..prompt], 10, new SamplingOptions(), new HashSet<int>()).ToList();
        using var vulkan2 = VulkanTestDevice.Create();
        Assert.Equal(greedyCpu, NewGenerator(fixture, vulkan2).Generate(tokens[..prompt], 10, new SamplingOptions(), new HashSet<int>()));
    }

    private static TokenGenerator NewGenerator(ModelFixture fixture, IBackend backend) =>
        new(fixture.CreateTrainer(backend, 14), 14);
}
