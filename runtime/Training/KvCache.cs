using LoraCompiler.Runtime.Backends;

namespace LoraCompiler.Runtime.Training;

/// <summary>
/// The keys and values of every layer for decoding, on the trainer's backend. A full-attention layer
/// keeps every position up to <see cref="MaxTokens"/>; a sliding-window layer only its window, as a
/// ring (position p lives in slot p mod window), since attention does not depend on the keys' order.
/// Made by <see cref="TrainerBase.CreateCache"/>.
/// </summary>
public sealed class KvCache : IDisposable
{
    private readonly IBackend _backend;
    private readonly Tensor[] _keys, _values;
    private readonly int[] _capacity;
    private readonly int _width;

    internal KvCache(IBackend backend, ModelInfo model, int maxTokens)
    {
        if (maxTokens < 1)
            throw new ArgumentOutOfRangeException(nameof(maxTokens), maxTokens, "a cache holds at least one token.");
        _backend = backend;
        MaxTokens = maxTokens;
        _width = model.KvHeads * model.HeadDim;
        _capacity = model.LayerWindows.Select(w => w > 0 ? Math.Min(w, maxTokens) : maxTokens).ToArray();
        _keys = new Tensor[model.Layers];
        _values = new Tensor[model.Layers];
        for (int l = 0; l < model.Layers; l++)
        {
            _keys[l] = backend.Allocate($"kv:{l}.k", (long)_capacity[l] * _width);
            _values[l] = backend.Allocate($"kv:{l}.v", (long)_capacity[l] * _width);
            Bytes += 2L * _capacity[l] * _width * sizeof(float);
        }
    }

    /// <summary>The most tokens (prompt and generated) the cache serves.</summary>
    public int MaxTokens { get; }

    /// <summary>The cache's size on the backend.</summary>
    public long Bytes { get; }

    /// <summary>
    /// Keeps the keys and values k, v [T, kvHeads·headDim] of the tokens at positions
    /// position..position+T−1; of those a ring keeps the last rows it has room for.
    /// </summary>
    public void Store(int layer, Tensor k, Tensor v, int T, int position)
    {
        if (position + T > MaxTokens)
            throw new ArgumentOutOfRangeException(nameof(position), position, $"the cache holds {MaxTokens} tokens; position {position} + {T} does not fit.");
        int capacity = _capacity[layer];
        for (int t = Math.Max(0, T - capacity); t < T;)
        {
            // A run of rows that lands in consecutive slots: up to the ring's end.
            int slot = (position + t) % capacity;
            int rows = Math.Min(T - t, capacity - slot);
            _backend.CopyRange(_keys[layer], (long)slot * _width, k, (long)t * _width, (long)rows * _width);
            _backend.CopyRange(_values[layer], (long)slot * _width, v, (long)t * _width, (long)rows * _width);
            t += rows;
        }
    }

    /// <summary>How many keys a layer holds once the tokens before <paramref name="end"/> are stored.</summary>
    public int Count(int layer, int end) => Math.Min(end, _capacity[layer]);

    public Tensor Keys(int layer) => _keys[layer];
    public Tensor Values(int layer) => _values[layer];

    public void Dispose()
    {
        foreach (var t in _keys.Concat(_values))
            t.Dispose();
    }
}
