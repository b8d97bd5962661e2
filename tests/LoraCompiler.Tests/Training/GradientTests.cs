using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Training;

/// <summary>
/// The generated trainers' LoRA gradients against an independent TorchSharp autograd implementation
/// of the same architecture (float64), on random weights with nonzero A and B.
/// </summary>
public class GradientTests
{
    private const double GradientTolerance = 1e-4;
    private const double LossTolerance = 1e-5;

    [Theory]
    [InlineData("tiny-qwen2", 23)]  // GQA, q/k/v biases, tied embeddings; 23 tokens: a partial LM-head chunk
    [InlineData("tiny-llama", 29)]  // untied head, llama3 rope_scaling, LoRA on 5 of 7 projections
    [InlineData("tiny-qwen3", 21)]  // q/k norms, head_dim 16 ≠ 48/4, no biases, untied head, LoRA on 5 of 7
    [InlineData("tiny-gemma3", 23)] // sandwich norms (1 + w), GeGLU, √hidden embedding, query_pre_attn_scalar,
                                    // sliding layers (window 7 < 23) with their own RoPE base, linear rope_scaling, softcap
    [InlineData("tiny-gemma3", 5)]  // a sequence shorter than the window
    public void LoraGradientsMatchTorchAutograd(string modelName, int tokens)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 7, tokens);
        var (referenceLoss, referenceGradients) = fixture.Reference();

        // A trainer sized for longer sequences than it runs: nothing may depend on unused rows.
        using var trainer = fixture.CreateTrainer(new CpuBackend(), tokens + 9);
        float loss = trainer.ForwardBackward(fixture.Tokens);

        Assert.InRange(Math.Abs(loss - referenceLoss), 0, LossTolerance * Math.Max(1, Math.Abs(referenceLoss)));
        AssertGradients(trainer.DownloadGradients(), referenceGradients);
    }

    /// <summary>
    /// Weights stored in 16 bits and used as stored (the products convert them panel by panel, the
    /// embedding and the norms row by row): the gradients equal the reference's on the same 16-bit
    /// values as float32.
    /// </summary>
    [Theory]
    [InlineData("tiny-qwen2", "BF16", 23)] // tied head: the LM head reads the 16-bit embedding
    [InlineData("tiny-qwen2", "F16", 23)]
    [InlineData("tiny-llama", "BF16", 29)] // untied head
    [InlineData("tiny-gemma3", "BF16", 23)] // (1 + w) norms, q/k norms: 16-bit norm weights
    [InlineData("tiny-qwen3", "F16", 21)]
    public void LoraGradientsMatchTorchAutogradWith16BitWeights(string modelName, string dtype, int tokens)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 7, tokens, dtype);
        var (referenceLoss, referenceGradients) = fixture.Reference();

        using var backend = new CpuBackend();
        using (var embedding = backend.MapWeight(fixture.OpenWeights(), "model.embed_tokens.weight"))
            Assert.IsType<CpuFloat16Tensor>(embedding); // used as stored, not converted
        using var trainer = fixture.CreateTrainer(backend);
        float loss = trainer.ForwardBackward(fixture.Tokens);

        Assert.InRange(Math.Abs(loss - referenceLoss), 0, LossTolerance * Math.Max(1, Math.Abs(referenceLoss)));
        AssertGradients(trainer.DownloadGradients(), referenceGradients);
    }

    [Fact]
    public void GradientsDoNotDependOnThePreviousStep()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 3, sequence: 17);
        using var trainer = fixture.CreateTrainer(new CpuBackend());

        // A longer, different step first; then the step under test after zeroing the gradients.
        trainer.ForwardBackward(fixture.Tokens.Reverse().ToArray());
        trainer.ZeroGradients();
        float loss = trainer.ForwardBackward(fixture.Tokens);

        var (referenceLoss, referenceGradients) = fixture.Reference();
        Assert.InRange(Math.Abs(loss - referenceLoss), 0, LossTolerance * Math.Max(1, referenceLoss));
        AssertGradients(trainer.DownloadGradients(), referenceGradients);
    }

    [Theory]
    [InlineData("tiny-qwen2")]
    [InlineData("tiny-llama")]
    [InlineData("tiny-gemma3")]
    public void GradCommandWritesTheReferenceGradients(string modelName)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 11, sequence: 19);
        string tokensFile = Path.Combine(fixture.Dir, "tokens.json");
        File.WriteAllText(tokensFile, "[" + string.Join(", ", fixture.Tokens) + "]");
        string output = Path.Combine(fixture.Dir, "grads.safetensors");

        int code = Commands.Grad(new Args([
            "--model", modelName, "--weights", fixture.WeightsPath, "--adapter", fixture.AdapterPath,
            "--tokens", tokensFile, "--out", output]));

        Assert.Equal(0, code);
        var (_, referenceGradients) = fixture.Reference();
        using var written = SafeTensorsFile.Open(output);
        Assert.Equal(referenceGradients.Keys.Order(), written.Names.Order());
        foreach (var (name, expected) in referenceGradients)
            Assert.True(ModelFixture.RelativeError(written.Read(name), expected) < GradientTolerance, name);
    }

    [Theory]
    [InlineData("tiny-llama")]
    [InlineData("tiny-qwen3")]
    [InlineData("tiny-gemma3")]
    public void TrainerAllocatesExactlyItsMemoryPlan(string modelName)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 5, sequence: 8);
        using var trainer = fixture.CreateTrainer(new CpuBackend(), 33);
        var plan = model.Plan(33);
        Assert.Equal(plan.TotalBytes - plan.BytesOf(BufferRole.Weights), trainer.AllocatedBytes); // weights are mapped, not allocated
    }

    private static void AssertGradients(IEnumerable<(LoraModuleSpec Spec, float[] DA, float[] DB)> actual,
        Dictionary<string, float[]> expected)
    {
        int checkedTensors = 0;
        foreach (var (spec, da, db) in actual)
        {
            foreach (var (name, gradient) in new[] { (spec.AName, da), (spec.BName, db) })
            {
                var reference = expected[name];
                Assert.True(reference.Any(v => v != 0), $"{name}: the reference gradient is zero, the test would prove nothing");
                double error = ModelFixture.RelativeError(gradient, reference);
                Assert.True(error < GradientTolerance, $"{name}: relative error {error:E2} ≥ {GradientTolerance:E0}");
                checkedTensors++;
            }
        }
        Assert.Equal(expected.Count, checkedTensors);
    }
}
