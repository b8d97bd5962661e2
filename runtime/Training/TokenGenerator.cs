using LoraCompiler.Runtime.Backends;

namespace LoraCompiler.Runtime.Training;

/// <summary>How the next token is drawn from the logits. Temperature 0 is greedy (the first largest logit).</summary>
/// <param name="TopK">Keep the K most likely tokens (0: all).</param>
/// <param name="TopP">Keep the smallest set of most likely tokens whose probability reaches P (1: all).</param>
public sealed record SamplingOptions(float Temperature = 0, int TopK = 0, float TopP = 1, int Seed = 0)
{
    public void Validate()
    {
        if (!(Temperature >= 0) || float.IsInfinity(Temperature))
            throw new ArgumentException($"--temperature must be 0 or more, not {Temperature}.");
        if (TopK < 0)
            throw new ArgumentException($"--top-k must be 0 (off) or more, not {TopK}.");
        if (!(TopP > 0 && TopP <= 1))
            throw new ArgumentException($"--top-p must be in (0, 1], not {TopP}.");
    }
}

/// <summary>
/// Text generation with a trainer's forward: the prompt in one pass that fills a KV cache, then one
/// token at a time, each attending to the cache (<see cref="TrainerBase.Infer"/>). The logits are read
/// back to the host and sampled there.
/// </summary>
public sealed class TokenGenerator : IDisposable
{
    private readonly TrainerBase _trainer;
    private readonly IBackend _backend;
    private readonly KvCache _cache;
    private readonly Tensor _logits;
    private readonly float[] _host;

    /// <param name="trainer">Created with a MaxSequence of at least <paramref name="maxTokens"/>; the logits live on its backend.</param>
    /// <param name="maxTokens">The prompt and the generated tokens together.</param>
    public TokenGenerator(TrainerBase trainer, int maxTokens)
    {
        _trainer = trainer;
        _backend = trainer.Backend;
        _cache = trainer.CreateCache(maxTokens);
        _logits = _backend.Allocate("decode:logits", trainer.Model.Vocab);
        _host = new float[trainer.Model.Vocab];
    }

    /// <summary>The KV cache's size on the backend.</summary>
    public long CacheBytes => _cache.Bytes;

    /// <summary>The logits after <paramref name="tokens"/> at <paramref name="position"/> (the prompt at 0, then one token at a time).</summary>
    public float[] Step(ReadOnlySpan<int> tokens, int position)
    {
        _trainer.Infer(tokens, position, _cache, _logits);
        _backend.Download(_logits, _host);
        return _host;
    }

    /// <summary>
    /// The new tokens after <paramref name="prompt"/>, as they are produced: at most
    /// <paramref name="maxNewTokens"/>, ending before the first of <paramref name="stopTokens"/>.
    /// </summary>
    public IEnumerable<int> Generate(int[] prompt, int maxNewTokens, SamplingOptions sampling, IReadOnlySet<int> stopTokens)
    {
        sampling.Validate();
        if (prompt.Length == 0)
            throw new ArgumentException("The prompt is empty.");
        if (prompt.Length + maxNewTokens > _cache.MaxTokens)
            throw new ArgumentException($"{prompt.Length} prompt tokens and {maxNewTokens} new ones do not fit the {_cache.MaxTokens} positions prepared.");
        var rng = new Random(sampling.Seed);
        var logits = Step(prompt, 0);
        for (int n = 0; n < maxNewTokens; n++)
        {
            int next = Sample(logits, sampling, rng);
            if (stopTokens.Contains(next))
                yield break;
            yield return next;
            if (n + 1 < maxNewTokens)
                logits = Step([next], prompt.Length + n);
        }
    }

    /// <summary>The next token: the first largest logit at temperature 0, else a draw from the filtered softmax.</summary>
    public static int Sample(ReadOnlySpan<float> logits, SamplingOptions sampling, Random rng)
    {
        if (sampling.Temperature == 0)
            return System.Numerics.Tensors.TensorPrimitives.IndexOfMax(logits);

        // The candidates by decreasing logit; top-k keeps the first K.
        var order = Enumerable.Range(0, logits.Length).ToArray();
        var keys = logits.ToArray();
        Array.Sort(keys, order, Comparer<float>.Create((a, b) => b.CompareTo(a)));
        int kept = sampling.TopK > 0 ? Math.Min(sampling.TopK, order.Length) : order.Length;

        var p = new double[kept];
        double max = keys[0] / sampling.Temperature, sum = 0;
        for (int i = 0; i < kept; i++)
            sum += p[i] = Math.Exp(keys[i] / sampling.Temperature - max);
        // Top-p: the smallest prefix whose probability reaches P.
        double mass = 0;
        for (int i = 0; i < kept; i++)
        {
            mass += p[i] / sum;
            if (mass >= sampling.TopP)
            {
                kept = i + 1;
                break;
            }
        }
        double total = p.Take(kept).Sum(), u = rng.NextDouble() * total;
        for (int i = 0; i < kept; i++)
        {
            u -= p[i];
            if (u < 0)
                return order[i];
        }
        return order[kept - 1];
    }

    public void Dispose()
    {
        _cache.Dispose();
        _logits.Dispose();
    }
}
