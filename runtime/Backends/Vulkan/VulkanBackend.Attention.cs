using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>FlashAttention forward and backward and the decoding step, with the loop limit lavapipe imposes.</summary>
public sealed unsafe partial class VulkanBackend
{
    // ---------------------------------------------------------------- attention

    /// <summary>The largest head dimension the attention shaders keep in registers (MAX_CHUNKS vec4s in attention_tiles.glsl).</summary>
    private const int MaxAttentionHeadDim = 256;

    /// <summary>
    /// FlashAttention forward (attention.comp): one workgroup per (head, block of query rows), staging only
    /// the key tiles some row of the block sees, so a sliding window of W costs O(T·W).
    /// </summary>
    public void AttentionForward(Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v, int T, int heads, int kvHeads, int headDim,
                                 float scale, int window)
    {
        var push = Attention(T, heads, kvHeads, headDim, scale, window, backward: false);
        long qn = (long)T * heads * headDim, kn = (long)T * kvHeads * headDim;
        VkBuffer o = Single(output, qn, nameof(output)), l = Single(lse, (long)heads * T, nameof(lse));
        VkBuffer qb = Single(q, qn, nameof(q)), kb = Single(k, kn, nameof(k)), vb = Single(v, kn, nameof(v));
        RunBlocks(Kernels.Attention, push, heads, T, [o, l, qb, kb, vb]);
    }

    /// <summary>
    /// FlashAttention backward in three passes: the row statistics (lse, D) into a buffer of the backend's,
    /// [heads, T, 2] (attention_back_delta.comp); dq per (head, query block) (attention_back_dq.comp);
    /// dk and dv per (kv head, key block) (attention_back_dkv.comp). Both skip the tiles outside the window.
    /// </summary>
    public void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOutput, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
                                  int T, int heads, int kvHeads, int headDim, float scale, int window)
    {
        var push = Attention(T, heads, kvHeads, headDim, scale, window, backward: true);
        long qn = (long)T * heads * headDim, kn = (long)T * kvHeads * headDim, rows = (long)heads * T;
        VkBuffer dqb = Single(dq, qn, nameof(dq)), dkb = Single(dk, kn, nameof(dk)), dvb = Single(dv, kn, nameof(dv));
        VkBuffer dob = Single(dOutput, qn, nameof(dOutput)), ob = Single(output, qn, nameof(output)), lb = Single(lse, rows, nameof(lse));
        VkBuffer qb = Single(q, qn, nameof(q)), kb = Single(k, kn, nameof(k)), vb = Single(v, kn, nameof(v));
        EnsureBuffer(ref _attentionStats, (ulong)Math.Max(rows, 1) * 2 * sizeof(float), "attention row statistics");
        var stats = _attentionStats!.Handle;
        RunElements(Kernels.AttentionBackDelta, push, rows, [stats, dob, ob, lb]);
        RunBlocks(Kernels.AttentionBackDq, push, heads, T, [dqb, dob, stats, qb, kb, vb]);
        RunBlocks(Kernels.AttentionBackDkv, push, kvHeads, T, [dkb, dvb, dob, stats, qb, kb, vb]);
    }

    private AttentionParameters Attention(int T, int heads, int kvHeads, int headDim, float scale, int window, bool backward)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(window);
        if (kvHeads <= 0 || heads % kvHeads != 0)
            throw new ArgumentException($"heads {heads} is not a multiple of kvHeads {kvHeads}.", nameof(kvHeads));
        if (headDim <= 0 || headDim > MaxAttentionHeadDim)
            throw new ArgumentOutOfRangeException(nameof(headDim), headDim, $"The Vulkan attention kernels support head dimensions up to {MaxAttentionHeadDim}.");
        // A tile row holds two operands' chunks plus one vec4 of row statistics (the dk/dv pass's lse
        // and D); rows are consumed four at a time.
        int chunks = (headDim + 3) / 4;
        uint tileRows = _pipelines.AttentionTileVec4s / (uint)(2 * chunks + 1) / 4 * 4;
        if (tileRows == 0)
            throw new VulkanException($"{_device.Name} has too little shared memory for attention with head dimension {headDim}.");
        if (VulkanQuirks.LoopLimit(_device) is long limit)
        {
            long loops = AttentionLoops(T, heads / kvHeads, headDim, (int)tileRows, (int)_pipelines.AttentionWorkgroup, backward, window);
            if (loops > limit)
                throw new VulkanException(
                    $"Attention over {T} tokens (head dimension {headDim}, {heads / kvHeads} query heads per kv head" +
                    (window > 0 && window < T ? $", a sliding window of {window}" : "") + $") needs about {loops} loop " +
                    $"iterations in one shader invocation; {_device.Name} silently stops a shader after {limit}. " +
                    "Use a shorter --seq, or a GPU.");
        }
        return new AttentionParameters
        {
            TokenCount = (uint)T, Heads = (uint)heads, KvHeads = (uint)kvHeads, HeadDim = (uint)headDim,
            Scale = scale, TileRows = tileRows, Window = (uint)window,
        };
    }

    /// <summary>
    /// An upper bound on the loop iterations of the busiest invocation of an attention shader. The forward
    /// walks up to T keys once, with up to three loops over the vec4 chunks per four keys (the dot
    /// products, the rescale, the accumulation); the dk/dv pass walks up to T queries once per query
    /// head of its kv head, with two (the dq pass, which walks T keys once, does no more). Add the tile
    /// staging loops and the loops before and after. With a sliding window W &lt; T a block stages at
    /// most W + width − 1 rows and a row visits at most W, starting anywhere in a tile (one more partial
    /// quad per tile).
    /// </summary>
    internal static long AttentionLoops(int T, int queryHeadsPerKvHead, int headDim, int tileRows, int width, bool backward, int window = 0)
    {
        long chunks = (headDim + 3) / 4;
        bool sliding = window > 0 && window < T;
        long staged = sliding ? Math.Min(T, (long)window + width - 1) : T, visited = sliding ? window : T;
        long tiles = (staged + tileRows - 1) / tileRows + 1;
        long quads = (visited + 3) / 4 + (sliding ? 2 : 1) * tiles;
        long staging = (tileRows * chunks + width - 1) / width + (tileRows + width - 1) / width + 3;
        long walks = backward ? queryHeadsPerKvHead : 1, perQuad = (backward ? 2 : 3) * chunks + 1;
        return 2 * headDim + 2 * chunks + walks * (tiles * staging + quads * perQuad);
    }

    /// <summary>One workgroup per (unit, block of rows): units × ⌈T / width⌉ workgroups.</summary>
    private void RunBlocks(KernelSpec kernel, in AttentionParameters push, int units, int T, ReadOnlySpan<VkBuffer> buffers)
    {
        var pipeline = _pipelines.Get(kernel);
        long blocks = (T + pipeline.WorkgroupSize.X - 1) / pipeline.WorkgroupSize.X;
        Dispatch1D(pipeline, push, units * blocks, buffers);
    }

    /// <summary>
    /// One token's attention over the first <paramref name="count"/> rows of a KV cache (attention_decode.comp):
    /// one workgroup per head, its invocations spread over the keys, an online softmax across tiles of keys.
    /// The cache rows read must lie in the caches' first buffer.
    /// </summary>
    public void AttentionDecode(Tensor output, Tensor q, Tensor kCache, Tensor vCache, int count, int heads, int kvHeads, int headDim, float scale)
    {
        if (kvHeads <= 0 || heads % kvHeads != 0)
            throw new ArgumentException($"heads {heads} is not a multiple of kvHeads {kvHeads}.", nameof(kvHeads));
        if (count <= 0)
            throw new ArgumentOutOfRangeException(nameof(count), count, "a decoding step attends to at least its own key.");
        if (headDim <= 0 || headDim > MaxAttentionHeadDim)
            throw new ArgumentOutOfRangeException(nameof(headDim), headDim, $"The Vulkan attention kernels support head dimensions up to {MaxAttentionHeadDim}.");
        long qn = (long)heads * headDim, kn = (long)count * kvHeads * headDim;
        if (kn > uint.MaxValue)
            throw new VulkanException($"A KV cache of {count} rows of {kvHeads}×{headDim} has more elements than the decoding shader can index.");
        VkBuffer o = Single(output, qn, nameof(output)), qb = Single(q, qn, nameof(q));
        VkBuffer kb = Single(kCache, kn, nameof(kCache)), vb = Single(vCache, kn, nameof(vCache));
        uint width = _pipelines.ElementWorkgroup;
        if (VulkanQuirks.LoopLimit(_device) is long limit)
        {
            long loops = DecodeLoops(count, headDim, (int)width);
            if (loops > limit)
                throw new VulkanException(
                    $"Decoding attention over {count} cached tokens (head dimension {headDim}) needs about {loops} loop iterations in one " +
                    $"shader invocation; {_device.Name} silently stops a shader after {limit}. Use a shorter context, or a GPU.");
        }
        var push = new AttentionDecodeParameters { Count = (uint)count, Heads = (uint)heads, KvHeads = (uint)kvHeads, HeadDim = (uint)headDim, Scale = scale };
        RunRows(Kernels.AttentionDecode, push, heads, [o, qb, kb, vb]);
    }

    /// <summary>
    /// An upper bound on the loop iterations of one invocation of attention_decode.comp: per tile of
    /// <paramref name="width"/> keys, the dot product (four dimensions an iteration, then the tail), the
    /// two reductions (log₂ width steps each) and, for each output dimension the invocation owns, the
    /// weighted sum over the tile's keys (four keys an iteration, then the tail); plus the query load and
    /// the write. Checked on lavapipe: with a head dimension of 8, a cache of 170,000 rows (about 61,000 by
    /// this bound) comes out right and one of 215,000 comes out wrong.
    /// </summary>
    internal static long DecodeLoops(int count, int headDim, int width)
    {
        long tiles = ((long)count + width - 1) / width, dims = (MaxAttentionHeadDim + width - 1) / width; // the shader's DIMS_PER_LANE
        long steps = 0;
        for (int w = width; w > 1; w /= 2)
            steps++;
        long perTile = headDim / 4 + headDim % 4 + 2 + 2 * (steps + 1) + dims * (width / 4 + 4 + 1) + 1;
        return tiles * perTile + 3 * dims + (headDim + width - 1) / width + 2;
    }
}
