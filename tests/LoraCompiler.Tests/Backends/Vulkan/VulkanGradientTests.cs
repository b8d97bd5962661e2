using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using Xunit.Abstractions;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>
/// The whole generated training step (forward, chunked LM head, recompute and MeSP backward) on the
/// Vulkan backend: its loss and every LoRA gradient against the CPU backend and the TorchSharp
/// autograd reference, within 1e-4.
/// </summary>
public sealed class VulkanGradientTests(ITestOutputHelper output)
{
    private const double GradientTolerance = 1e-4;
    private const double LossTolerance = 1e-5;

    [VulkanTheory]
    [InlineData("tiny-qwen2", 23, null)]     // GQA, q/k/v biases, tied embeddings, a partial LM-head chunk
    [InlineData("tiny-llama", 29, null)]     // untied head, llama3 rope_scaling, LoRA on 5 of 7 projections
    [InlineData("tiny-qwen2", 19, 60_000L)]  // the embedding (and tied head) split over two buffers, a row straddling them
    [InlineData("tiny-llama", 17, 40_000L)]  // embedding and LM head split, each with a straddling row
    [InlineData("tiny-qwen3", 21, null)]     // q/k norms over head_dim ≠ hidden/heads, untied head
    [InlineData("tiny-gemma3", 23, null)]    // sandwich (1 + w) norms, GeGLU, sliding layers (window 7 < 23), softcap
    public void GradientsMatchCpuAndTorch(string modelName, int tokens, long? maxBufferBytes)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 7, tokens);
        var (referenceLoss, referenceGradients) = fixture.Reference();

        using var weights = ModelWeights.Open(fixture.WeightsPath);
        var (cpuLoss, cpuGradients) = Step(new CpuBackend(), model, fixture, weights);
        using var vulkan = VulkanTestDevice.Create(new VulkanBackendOptions { MaxBufferBytes = maxBufferBytes });
        var (loss, gradients) = Step(vulkan, model, fixture, weights);
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
        output.WriteLine($"{vulkan.Name}: loss {loss} (cpu {cpuLoss}, torch {referenceLoss}), {vulkan.Submissions} submissions");

        Assert.InRange(Math.Abs(loss - cpuLoss), 0, LossTolerance * Math.Max(1, Math.Abs(cpuLoss)));
        Assert.InRange(Math.Abs(loss - referenceLoss), 0, LossTolerance * Math.Max(1, Math.Abs(referenceLoss)));
        Assert.Equal(referenceGradients.Count, gradients.Count);
        double worstCpu = 0, worstTorch = 0;
        foreach (var (name, gradient) in gradients)
        {
            Assert.True(referenceGradients[name].Any(v => v != 0), $"{name}: the reference gradient is zero");
            double vsCpu = ModelFixture.RelativeError(gradient, cpuGradients[name]);
            double vsTorch = ModelFixture.RelativeError(gradient, referenceGradients[name]);
            Assert.True(vsCpu < GradientTolerance, $"{name}: relative error against the CPU backend {vsCpu:E2}");
            Assert.True(vsTorch < GradientTolerance, $"{name}: relative error against TorchSharp {vsTorch:E2}");
            worstCpu = Math.Max(worstCpu, vsCpu);
            worstTorch = Math.Max(worstTorch, vsTorch);
        }
        output.WriteLine($"worst relative error: {worstCpu:E2} against cpu, {worstTorch:E2} against torch over {gradients.Count} gradients");
    }

    /// <summary>
    /// Weights stored in 16 bits and kept 16-bit on the device: the loss and gradients equal the CPU
    /// backend's and TorchSharp's on the same 16-bit values as float32.
    /// </summary>
    [VulkanTheory]
    [InlineData("tiny-qwen2", "BF16", 23, null)]     // tied head: the LM head reads the 16-bit embedding
    [InlineData("tiny-qwen2", "F16", 19, 60_000L)]   // the 16-bit embedding split over buffers by whole rows
    [InlineData("tiny-gemma3", "BF16", 23, null)]    // (1 + w) norms and q/k norms read as 16-bit vectors
    public void GradientsWith16BitWeightsMatchCpuAndTorch(string modelName, string dtype, int tokens, long? maxBufferBytes)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 7, tokens, dtype);
        var (referenceLoss, referenceGradients) = fixture.Reference();

        using var weights = ModelWeights.Open(fixture.WeightsPath);
        var (cpuLoss, cpuGradients) = Step(new CpuBackend(), model, fixture, weights);
        using var vulkan = VulkanTestDevice.Create(new VulkanBackendOptions { MaxBufferBytes = maxBufferBytes });
        using (var embedding = vulkan.MapWeight(weights, "model.embed_tokens.weight"))
            Assert.IsType<VulkanFloat16Tensor>(embedding);
        var (loss, gradients) = Step(vulkan, model, fixture, weights);
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
        output.WriteLine($"{vulkan.Name}, {dtype}: loss {loss} (cpu {cpuLoss}, torch {referenceLoss})");

        Assert.InRange(Math.Abs(loss - cpuLoss), 0, LossTolerance * Math.Max(1, Math.Abs(cpuLoss)));
        Assert.InRange(Math.Abs(loss - referenceLoss), 0, LossTolerance * Math.Max(1, Math.Abs(referenceLoss)));
        Assert.Equal(referenceGradients.Count, gradients.Count);
        foreach (var (name, gradient) in gradients)
        {
            Assert.True(referenceGradients[name].Any(v => v != 0), $"{name}: the reference gradient is zero");
            double vsCpu = ModelFixture.RelativeError(gradient, cpuGradients[name]);
            double vsTorch = ModelFixture.RelativeError(gradient, referenceGradients[name]);
            Assert.True(vsCpu < GradientTolerance, $"{name}: relative error against the CPU backend {vsCpu:E2}");
            Assert.True(vsTorch < GradientTolerance, $"{name}: relative error against TorchSharp {vsTorch:E2}");
        }
    }

    [VulkanFact]
    public void SecondStepAfterZeroingMatchesAFreshOne()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 3, sequence: 17);
        using var weights = ModelWeights.Open(fixture.WeightsPath);
        using var vulkan = VulkanTestDevice.Create();
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        using var trainer = model.Create(vulkan, weights, adapter, 17);
        trainer.ForwardBackward(fixture.Tokens.Reverse().ToArray());
        trainer.ZeroGradients();
        float loss = trainer.ForwardBackward(fixture.Tokens);

        var (cpuLoss, cpuGradients) = Step(new CpuBackend(), model, fixture, weights);
        Assert.InRange(Math.Abs(loss - cpuLoss), 0, LossTolerance * Math.Max(1, cpuLoss));
        foreach (var (spec, da, db) in trainer.DownloadGradients())
        {
            Assert.True(ModelFixture.RelativeError(da, cpuGradients[spec.AName]) < GradientTolerance, spec.AName);
            Assert.True(ModelFixture.RelativeError(db, cpuGradients[spec.BName]) < GradientTolerance, spec.BName);
        }
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
    }

    [VulkanFact]
    public void LcsbStepAndForwardOnlyLossMatchCpu()
    {
        // The trainer's other paths on the same kernels: an LCSB step (layers skipped by the cyclic
        // schedule) and the forward-only loss MeZO uses.
        var model = TrainerCatalog.Find("tiny-llama")!;
        using var fixture = new ModelFixture(model, seed: 5, sequence: 21);
        using var weights = ModelWeights.Open(fixture.WeightsPath);
        var targets = TrainerBase.NextTokenTargets(fixture.Tokens);
        using var vulkan = VulkanTestDevice.Create();
        var results = new List<(float Loss, float ForwardLoss, Dictionary<string, float[]> Gradients)>();
        foreach (IBackend backend in new IBackend[] { new CpuBackend(), vulkan })
        {
            var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
            using var trainer = model.Create(backend, weights, adapter, fixture.Tokens.Length);
            trainer.LcsbGroups = 2;
            float loss = trainer.ForwardBackward(fixture.Tokens, targets, step: 1);
            float forwardLoss = trainer.Loss(fixture.Tokens, targets);
            var gradients = trainer.DownloadGradients().SelectMany(g => new[] { (g.Spec.AName, g.DA), (g.Spec.BName, g.DB) })
                .ToDictionary(p => p.Item1, p => p.Item2);
            results.Add((loss, forwardLoss, gradients));
        }
        var (cpu, vk) = (results[0], results[1]);
        Assert.InRange(Math.Abs(vk.Loss - cpu.Loss), 0, LossTolerance * Math.Max(1, cpu.Loss));
        Assert.InRange(Math.Abs(vk.ForwardLoss - cpu.ForwardLoss), 0, LossTolerance * Math.Max(1, cpu.ForwardLoss));
        foreach (var (name, expected) in cpu.Gradients)
        {
            if (expected.All(v => v == 0))
                Assert.All(vk.Gradients[name], v => Assert.Equal(0f, v)); // a skipped layer
            else
                Assert.True(ModelFixture.RelativeError(vk.Gradients[name], expected) < GradientTolerance, name);
        }
        Assert.Contains(cpu.Gradients.Values, g => g.All(v => v == 0));
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
    }

    [VulkanFact]
    public void GradCommandRunsOnVulkan()
    {
        const string modelName = "tiny-llama";
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 11, sequence: 19);
        string tokensFile = Path.Combine(fixture.Dir, "tokens.json");
        File.WriteAllText(tokensFile, "[" + string.Join(", ", fixture.Tokens) + "]");
        string outPath = Path.Combine(fixture.Dir, "grads.safetensors");
        if (!VulkanTestDevice.Available)
            Assert.Fail($"No Vulkan device: {VulkanTestDevice.Reason}");

        int code = Commands.Grad(new Args([
            "--model", modelName, "--weights", fixture.WeightsPath, "--adapter", fixture.AdapterPath,
            "--tokens", tokensFile, "--out", outPath, "--backend", "vulkan", "--device", "0"]));

        Assert.Equal(0, code);
        var (_, reference) = fixture.Reference();
        using var written = SafeTensorsFile.Open(outPath);
        Assert.Equal(reference.Keys.Order(), written.Names.Order());
        foreach (var (name, expected) in reference)
            Assert.True(ModelFixture.RelativeError(written.Read(name), expected) < GradientTolerance, name);
    }

    [VulkanTheory]
    [InlineData("tiny-qwen2", 23, 2)]   // the last two layers keep their activations, two are recomputed
    [InlineData("tiny-gemma3", 23, 5)]  // every layer kept, sliding and full: nothing recomputed
    public void Kept_layers_match_cpu_and_torch(string modelName, int tokens, int kept)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 7, tokens);
        var (referenceLoss, referenceGradients) = fixture.Reference();
        using var weights = ModelWeights.Open(fixture.WeightsPath);
        var options = new TrainerOptions(KeptLayers: kept);
        var (cpuLoss, cpuGradients) = Step(new CpuBackend(), model, fixture, weights, options);
        using var vulkan = VulkanTestDevice.Create();
        var (loss, gradients) = Step(vulkan, model, fixture, weights, options);
        VulkanTestDevice.AssertNoValidationErrors(vulkan);

        Assert.InRange(Math.Abs(loss - referenceLoss), 0, LossTolerance * Math.Max(1, Math.Abs(referenceLoss)));
        Assert.InRange(Math.Abs(cpuLoss - referenceLoss), 0, LossTolerance * Math.Max(1, Math.Abs(referenceLoss)));
        Assert.Equal(referenceGradients.Count, gradients.Count);
        foreach (var (name, gradient) in gradients)
        {
            Assert.True(referenceGradients[name].Any(v => v != 0), $"{name}: the reference gradient is zero");
            Assert.True(ModelFixture.RelativeError(gradient, referenceGradients[name]) < GradientTolerance, $"{name}: against TorchSharp");
            Assert.True(ModelFixture.RelativeError(cpuGradients[name], referenceGradients[name]) < GradientTolerance, $"{name}: cpu against TorchSharp");
        }
    }

    private static (float Loss, Dictionary<string, float[]> Gradients) Step(IBackend backend, ModelInfo model, ModelFixture fixture, ModelWeights weights,
        TrainerOptions? options = null)
    {
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        // Sized for longer sequences than it runs: nothing may depend on unused rows.
        using var trainer = model.Create(backend, weights, adapter, fixture.Tokens.Length + 9, options);
        float loss = trainer.ForwardBackward(fixture.Tokens);
        var gradients = new Dictionary<string, float[]>();
        foreach (var (spec, da, db) in trainer.DownloadGradients())
        {
            gradients[spec.AName] = da;
            gradients[spec.BName] = db;
        }
        return (loss, gradients);
    }
}
