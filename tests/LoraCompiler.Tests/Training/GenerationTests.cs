using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Tests.Training;

/// <summary>
/// Decoding with the KV cache: greedy generation equal to the TorchSharp reference's greedy decoding
/// (a whole forward per token, no cache), and each cached step's logits equal to those of one forward
/// over the whole sequence.
/// </summary>
public sealed class GenerationTests
{
    private const double LogitTolerance = 1e-4;

    [Theory]
    [InlineData("tiny-qwen2", 6, 10)]
    [InlineData("tiny-llama", 6, 10)]
    [InlineData("tiny-qwen3", 6, 10)]
    [InlineData("tiny-gemma3", 4, 14)] // the sliding layers' window of 7 is passed while decoding: their cache is a ring
    [InlineData("tiny-gemma3", 11, 6)] // a prompt longer than the window
    public void GreedyGenerationMatchesTheReference(string modelName, int promptLength, int newTokens)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 17, promptLength);
        int[] prompt = fixture.Tokens;
        using var trainer = fixture.CreateTrainer(new CpuBackend(), promptLength + newTokens);
        using var generator = new TokenGenerator(trainer, promptLength + newTokens);

        var stepLogits = new List<float[]>();
        var sequence = prompt.ToList();
        var logits = generator.Step(prompt, 0);
        for (int n = 0; n < newTokens; n++)
        {
            stepLogits.Add((float[])logits.Clone());
            int next = TokenGenerator.Sample(logits, new SamplingOptions(), new Random(0));
            sequence.Add(next);
            if (n + 1 < newTokens)
                logits = generator.Step([next], sequence.Count - 1);
        }

        // The reference: greedy over its full forward, one whole sequence per token.
        var reference = prompt.ToList();
        for (int n = 0; n < newTokens; n++)
        {
            var all = TorchReference.Logits(fixture.ReferenceConfig, fixture.Weights, fixture.Adapter, reference.ToArray());
            var last = Enumerable.Range(0, model.Vocab).Select(v => all[reference.Count - 1, v]).ToArray();
            double error = RelativeError(stepLogits[n], last);
            Assert.True(error < LogitTolerance, $"step {n}: logits differ from the reference by {error:E2}");
            reference.Add(Array.IndexOf(last, last.Max()));
        }
        Assert.Equal(reference, sequence);

        // The generator's own loop produces the same tokens.
        Assert.Equal(sequence.Skip(promptLength), NewGenerator(fixture, promptLength + newTokens)
            .Generate(prompt, newTokens, new SamplingOptions(), new HashSet<int>()));
    }

    /// <summary>
    /// Random models often repeat one token greedily, so the cache is also fed a random continuation
    /// (teacher forcing): every step's logits against the reference's logits of the whole sequence.
    /// </summary>
    [Theory]
    [InlineData("tiny-qwen2")]
    [InlineData("tiny-llama")]
    [InlineData("tiny-qwen3")]
    [InlineData("tiny-gemma3")]
    public void CachedStepsOnRandomTokensMatchTheReference(string modelName)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 23, sequence: 21);
        int[] tokens = fixture.Tokens;
        const int prompt = 5;
        using var trainer = fixture.CreateTrainer(new CpuBackend(), tokens.Length);
        using var generator = new TokenGenerator(trainer, tokens.Length);
        var all = TorchReference.Logits(fixture.ReferenceConfig, fixture.Weights, fixture.Adapter, tokens);

        for (int t = prompt - 1; t < tokens.Length; t++)
        {
            float[] logits = t == prompt - 1 ? generator.Step(tokens.AsSpan(0, prompt), 0) : generator.Step(tokens.AsSpan(t, 1), t);
            double error = RelativeError(logits, Enumerable.Range(0, model.Vocab).Select(v => all[t, v]).ToArray());
            Assert.True(error < LogitTolerance, $"position {t}: logits differ from the reference by {error:E2}");
        }
    }

    [Fact]
    public void CachedStepsEqualOneForwardOverTheWholeSequence()
    {
        var model = TrainerCatalog.Find("tiny-gemma3")!;
        using var fixture = new ModelFixture(model, seed: 5, sequence: 19);
        int[] tokens = fixture.Tokens;
        using var trainer = fixture.CreateTrainer(new CpuBackend(), tokens.Length);
        using var cached = new TokenGenerator(trainer, tokens.Length);

        cached.Step(tokens.AsSpan(0, 3), 0);
        for (int t = 3; t < tokens.Length; t++)
        {
            float[] step = (float[])cached.Step(tokens.AsSpan(t, 1), t).Clone();
            using var whole = new TokenGenerator(trainer, tokens.Length);
            float[] full = whole.Step(tokens.AsSpan(0, t + 1), 0);
            double error = RelativeError(step, full.Select(v => (double)v).ToArray());
            Assert.True(error < 1e-5, $"position {t}: the cached step's logits differ from the full forward's by {error:E2}");
        }
    }

    [Fact]
    public void SamplingFollowsTemperatureTopKAndTopP()
    {
        float[] logits = [1f, 3f, 2f, -1f];
        var rng = new Random(1);
        Assert.Equal(1, TokenGenerator.Sample(logits, new SamplingOptions(), rng));
        // top-k 1 and a tiny top-p both leave only the most likely token.
        Assert.All(Enumerable.Range(0, 50), _ => Assert.Equal(1, TokenGenerator.Sample(logits, new SamplingOptions(1f, TopK: 1), rng)));
        Assert.All(Enumerable.Range(0, 50), _ => Assert.Equal(1, TokenGenerator.Sample(logits, new SamplingOptions(1f, TopP: 0.1f), rng)));
        // top-k 2: only tokens 1 and 2, in about the ratio e³ : e².
        var counts = new int[4];
        for (int i = 0; i < 20_000; i++)
            counts[TokenGenerator.Sample(logits, new SamplingOptions(1f, TopK: 2), rng)]++;
        Assert.Equal(0, counts[0] + counts[3]);
        Assert.InRange(counts[1] / (double)counts[2], Math.E * 0.9, Math.E * 1.1);
        Assert.Throws<ArgumentException>(() => new SamplingOptions(-1f).Validate());
        Assert.Throws<ArgumentException>(() => new SamplingOptions(1f, TopP: 0f).Validate());
    }

    private static TokenGenerator NewGenerator(ModelFixture fixture, int maxTokens) =>
        new(fixture.CreateTrainer(new CpuBackend(), maxTokens), maxTokens);

    private static double RelativeError(float[] actual, double[] expected)
    {
        double diff = 0, norm = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            diff += Math.Pow(actual[i] - expected[i], 2);
            norm += expected[i] * expected[i];
        }
        return Math.Sqrt(diff / norm);
    }
}
