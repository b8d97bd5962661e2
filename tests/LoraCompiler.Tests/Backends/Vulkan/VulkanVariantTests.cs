using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using LoraCompiler.Tests.Training;
using Xunit.Abstractions;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>
/// The shader variants a device's features choose: the per-row kernels with and without subgroup
/// arithmetic, each against the CPU wherever lavapipe has the feature.
/// </summary>
public class VulkanVariantTests(ITestOutputHelper output)
{
    private const double GradientTolerance = 1e-4;

    [VulkanFact]
    public void The_device_reports_its_features()
    {
        using var vulkan = VulkanTestDevice.Create();
        var d = vulkan.Device;
        output.WriteLine($"{d.Name}: vendor 0x{d.VendorId:x}, subgroup size {d.SubgroupSize}, arithmetic {d.SubgroupArithmetic}, " +
                         $"16-bit storage {d.Storage16Bit}, fp16 arithmetic {d.Float16Arithmetic}, workgroup width {vulkan.WorkgroupWidth}; subgroups used: {vulkan.Subgroups}");
        Assert.Equal(d.SubgroupArithmetic && d.VendorId != VulkanQuirks.Qualcomm, vulkan.Subgroups);
        Assert.True(vulkan.WorkgroupWidth <= d.MaxWorkGroupInvocations && vulkan.WorkgroupWidth <= d.MaxWorkGroupSize.X);
        Assert.True(d.SubgroupSize > 0 || !d.SubgroupArithmetic);
    }

    [VulkanTheory]
    [InlineData("tiny-qwen2", false)]
    [InlineData("tiny-qwen2", true)]
    [InlineData("tiny-gemma3", false)] // softcapped logits, per-head norms
    [InlineData("tiny-gemma3", true)]
    public void Gradients_match_the_cpu_with_and_without_subgroups(string modelName, bool subgroups)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 17, sequence: 19);
        using var weights = ModelWeights.Open(fixture.WeightsPath);
        var options = new VulkanBackendOptions { Subgroups = subgroups };
        using (var probe = VulkanTestDevice.Create(new VulkanBackendOptions { Subgroups = false }))
            if (subgroups && !probe.Device.SubgroupArithmetic)
            {
                // A device without the feature refuses the variant by name, and runs the plain kernels by default.
                Assert.Contains("subgroup arithmetic", Assert.Throws<VulkanException>(() => VulkanTestDevice.Create(options)).Message);
                return;
            }
        using var vulkan = VulkanTestDevice.Create(options);
        Assert.Equal(subgroups, vulkan.Subgroups);
        var (loss, gradients) = Step(vulkan, model, fixture, weights);
        var (cpuLoss, cpuGradients) = Step(new CpuBackend(), model, fixture, weights);
        Assert.InRange(Math.Abs(loss - cpuLoss), 0, 1e-5 * Math.Max(1, cpuLoss));
        foreach (var (name, g) in gradients)
        {
            double error = ModelFixture.RelativeError(g, cpuGradients[name]);
            Assert.True(error < GradientTolerance, $"{name}: relative error {error:E2}");
        }

        // Decoding reads the per-row attention kernel and the norms: the next-token logits agree too.
        var logits = Decode(vulkan, model, fixture, weights);
        var cpuLogits = Decode(new CpuBackend(), model, fixture, weights);
        Assert.True(ModelFixture.RelativeError(logits, cpuLogits) < GradientTolerance);
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
    }

    [Fact]
    public void Subgroups_are_off_where_the_quirks_say_so()
    {
        Assert.False(VulkanQuirks.UseSubgroups(offered: true, VulkanQuirks.Qualcomm, requested: null, "Adreno (TM) 740"));
        Assert.True(VulkanQuirks.UseSubgroups(offered: true, 0x10DE, requested: null, "NVIDIA H200"));
        Assert.False(VulkanQuirks.UseSubgroups(offered: false, 0x10DE, requested: null, "a 1.0 device"));
        Assert.False(VulkanQuirks.UseSubgroups(offered: true, 0x10DE, requested: false, "NVIDIA H200"));
        Assert.True(VulkanQuirks.UseSubgroups(offered: true, VulkanQuirks.Qualcomm, requested: true, "Adreno (TM) 740"));
        Assert.Throws<VulkanException>(() => VulkanQuirks.UseSubgroups(offered: false, 0x10DE, requested: true, "a 1.0 device"));
    }

    private static (float Loss, Dictionary<string, float[]> Gradients) Step(IBackend backend, ModelInfo model, ModelFixture fixture, ModelWeights weights)
    {
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        using var trainer = model.Create(backend, weights, adapter, fixture.Tokens.Length);
        float loss = trainer.ForwardBackward(fixture.Tokens);
        var gradients = trainer.DownloadGradients().SelectMany(g => new[] { (g.Spec.AName, g.DA), (g.Spec.BName, g.DB) })
            .ToDictionary(p => p.Item1, p => p.Item2);
        return (loss, gradients);
    }

    /// <summary>The logits after the prompt and three more tokens, one at a time through the KV cache.</summary>
    private static float[] Decode(IBackend backend, ModelInfo model, ModelFixture fixture, ModelWeights weights)
    {
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        using var trainer = model.Create(backend, weights, adapter, fixture.Tokens.Length + 3);
        using var cache = trainer.CreateCache(fixture.Tokens.Length + 3);
        using var logits = backend.Allocate("logits", model.Vocab);
        trainer.Infer(fixture.Tokens, 0, cache, logits);
        for (int i = 0; i < 3; i++)
            trainer.Infer([fixture.Tokens[i]], fixture.Tokens.Length + i, cache, logits);
        var host = new float[model.Vocab];
        backend.Download(logits, host);
        return host;
    }
}
