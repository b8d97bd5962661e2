using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// Causal grouped-query attention, FlashAttention-2 style: the [T, T] scores are only ever held one
/// [Block, Block] tile at a time. Query blocks and key blocks line up, so only the diagonal tile of a
/// block row is causally masked. With a sliding window W, query t sees key s iff 0 ≤ t − s &lt; W: the
/// tiles a window leaves wholly unseen are never visited (a block row walks only the key blocks its
/// window reaches, so a sliding layer costs O(T·W)), and the tiles it cuts through are masked at the
/// window's edge as the diagonal tile is at the causal one. A tile's products are the GEMM kernels'
/// (single-threaded inside a work item), all in the broadcast form: the operand that stays fixed
/// through a work item (its query block, or in the dk/dv pass its key block) is transposed once, and
/// the tile is laid out [keys, queries] or [queries, keys] to match. The passes between the products
/// (max, exp, the softmax gradient) are fused vector loops, down the columns when a tile is
/// [keys, queries].
/// </summary>
internal static unsafe partial class CpuKernels
{
    /// <summary>Query rows and key columns per attention tile.</summary>
    private const int AttentionBlock = 64;

    /// <summary>
    /// For g = h / (heads / kvHeads), over the keys s that query t sees (s ≤ t and, with window W &gt; 0,
    /// t − s &lt; W): out[t, h] = Σ_s softmax_s(scale·q[t,h]·k[s,g])·v[s,g] and
    /// lse[h, t] = log Σ_s exp(scale·q[t,h]·k[s,g]). Work items are (head, block of query rows), run in
    /// parallel; each transposes its query block once, then walks the key blocks from the first its window
    /// reaches (<see cref="FirstKeyBlock"/>) to its diagonal with an online softmax over the [keys, queries]
    /// tile Sᵀ = scale·k·qᵀ: a running max m and sum l per query (the sum of a tile's terms in float, across
    /// tiles in double), the output rows rescaled by exp(m_old − m_new) when the max grows, and
    /// out += exp(Sᵀ − m)ᵀ·v. Returns the number of tiles computed.
    /// </summary>
    public static long AttentionForward(Span<float> output, Span<float> lse, ReadOnlySpan<float> q, ReadOnlySpan<float> k, ReadOnlySpan<float> v,
                                        int T, int heads, int kvHeads, int headDim, float scale, int window, int threads)
    {
        int group = Group(heads, kvHeads);
        window = Window(window, T, scale);
        int qs = heads * headDim, ks = kvHeads * headDim; // row strides of q/out and k/v
        Need(output, (long)T * qs, nameof(output)); Need(lse, (long)heads * T, nameof(lse));
        Need(q, (long)T * qs, nameof(q)); Need(k, (long)T * ks, nameof(k)); Need(v, (long)T * ks, nameof(v));
        int blocks = Ceil(T, AttentionBlock);
        long visited = 0;
        fixed (float* po = output) fixed (float* pl = lse) fixed (float* pq = q) fixed (float* pk = k) fixed (float* pv = v)
        {
            float* O = po, LSE = pl, Q = pq, K = pk, V = pv;
            For(heads * blocks, threads, AttentionWork(T, heads, headDim, window), new AttentionRows(O, LSE, Q, K, V, &visited, T, qs, ks, headDim, group, blocks, scale, window));
        }
        return visited;
    }

    /// <summary>Forward over one (head, query block): the online softmax across its key blocks.</summary>
    private readonly struct AttentionRows(float* O, float* LSE, float* Q, float* K, float* V, long* visited, int T, int qs, int ks, int headDim, int group, int blocks, float scale, int window) : IParallelBody
    {
        public void Run(int item)
        {
            const int B = AttentionBlock;
            int h = item / blocks, qb = blocks - 1 - item % blocks, g = h / group; // longest rows first
            int t0 = qb * B, rows = Math.Min(T, t0 + B) - t0, first = FirstKeyBlock(qb, window);
            float* oh = O + (long)t0 * qs + h * headDim;
            float* rowMax = stackalloc float[B], rescale = stackalloc float[B], tileSum = stackalloc float[B];
            double* rowSum = stackalloc double[B];
            // The running max starts finite, so that a column whose first tiles are all masked (a
            // window's edge) keeps m and its sum at rest instead of computing exp(−∞ + ∞).
            new Span<float>(rowMax, B).Fill(float.MinValue);
            new Span<double>(rowSum, B).Clear();
            float[] scratch = ArrayPool<float>.Shared.Rent(B * B + headDim * B);
            fixed (float* St = scratch)
            {
                float* qt = St + B * B; // qᵀ of the query block, [hd, rows] with row stride B
                Transpose(qt, B, Q + (long)t0 * qs + h * headDim, qs, rows, headDim);
                for (int kb = first; kb <= qb; kb++)
                {
                    int s0 = kb * B, keys = Math.Min(T, s0 + B) - s0;
                    float* kRows = K + (long)s0 * ks + g * headDim;
                    // Sᵀ = scale·k·qᵀ over the tile, [keys, rows]; key i sees the queries VisibleQueries gives.
                    GemmNN(St, B, kRows, ks, qt, B, keys, headDim, rows, scale, false, 1);
                    if (IsMasked(t0, rows, s0, keys, window))
                        for (int i = 0; i < keys; i++)
                        {
                            var (lo, hi) = VisibleQueries(s0 + i, t0, rows, window);
                            new Span<float>(St + i * B, lo).Fill(float.NegativeInfinity);
                            new Span<float>(St + i * B + hi, rows - hi).Fill(float.NegativeInfinity);
                        }
                    OnlineSoftmaxColumns(St, B, keys, rows, rowMax, rescale, tileSum);
                    for (int j = 0; j < rows; j++)
                    {
                        rowSum[j] = rowSum[j] * rescale[j] + tileSum[j];
                        if (kb > first && rescale[j] != 1f)
                            Scale(oh + (long)j * qs, headDim, rescale[j]);
                    }
                    // out (=|+=) exp(Sᵀ − m)ᵀ·v over the tile
                    GemmTN(oh, qs, St, B, V + (long)s0 * ks + g * headDim, ks, keys, rows, headDim, 1f, kb > first, 1);
                }
            }
            ArrayPool<float>.Shared.Return(scratch);
            for (int j = 0; j < rows; j++)
            {
                Scale(oh + (long)j * qs, headDim, (float)(1.0 / rowSum[j]));
                LSE[(long)h * T + t0 + j] = (float)(rowMax[j] + Math.Log(rowSum[j]));
            }
            Interlocked.Add(ref *visited, qb - first + 1);
        }
    }

    /// <summary>
    /// dq, dk, dv (=), recomputing each tile of probabilities from the lse saved by forward:
    /// P = exp(scale·q·kᵀ − lse) (0 where query t does not see key s), dP = dOut·vᵀ and, with
    /// D[t] = Σ_d dOut[t,d]·out[t,d] (= Σ_s P·dP), dS = P∘(dP − D). Then dq = scale·dS·k,
    /// dk = scale·Σ_h dSᵀ·q and dv = Σ_h Pᵀ·dOut over the heads h that share a kv head. Pass 1 runs per
    /// (head, query block): D for its rows, then dq over the key blocks from the first its window reaches
    /// to the diagonal. Pass 2 runs per (kv head, key block), so no two work items write the same dk/dv
    /// rows: it walks the group's heads and the query blocks from the diagonal down to the last that sees
    /// one of its keys (<see cref="LastQueryBlock"/>), recomputing the tiles. Scratch: D [heads, T] and, per
    /// work item, two [Block, Block] tiles and the transposed operands that stay fixed through it (q and
    /// dOut of its query block, or k and v of its key block). Returns the number of tiles computed, both
    /// passes together.
    /// </summary>
    public static long AttentionBackward(Span<float> dq, Span<float> dk, Span<float> dv, ReadOnlySpan<float> dOutput, ReadOnlySpan<float> output,
                                         ReadOnlySpan<float> lse, ReadOnlySpan<float> q, ReadOnlySpan<float> k, ReadOnlySpan<float> v,
                                         int T, int heads, int kvHeads, int headDim, float scale, int window, int threads)
    {
        int group = Group(heads, kvHeads);
        window = Window(window, T, scale);
        int qs = heads * headDim, ks = kvHeads * headDim;
        Need(dq, (long)T * qs, nameof(dq)); Need(dk, (long)T * ks, nameof(dk)); Need(dv, (long)T * ks, nameof(dv));
        Need(dOutput, (long)T * qs, nameof(dOutput)); Need(output, (long)T * qs, nameof(output)); Need(lse, (long)heads * T, nameof(lse));
        Need(q, (long)T * qs, nameof(q)); Need(k, (long)T * ks, nameof(k)); Need(v, (long)T * ks, nameof(v));
        int blocks = Ceil(T, AttentionBlock);
        const int B = AttentionBlock;
        int tileFloats = 2 * B * B + 2 * headDim * B;
        long work = AttentionWork(T, heads, headDim, window), visited = 0;
        float[] dRows = ArrayPool<float>.Shared.Rent(Math.Max(1, heads * T));
        fixed (float* pdq = dq) fixed (float* pdk = dk) fixed (float* pdv = dv) fixed (float* pdo = dOutput) fixed (float* po = output)
        fixed (float* pl = lse) fixed (float* pq = q) fixed (float* pk = k) fixed (float* pv = v) fixed (float* pd = dRows)
        {
            var a = new AttentionOperands(pq, pk, pv, pdo, pl, pd, T, qs, ks, headDim, scale, window);
            float* DQ = pdq, DK = pdk, DV = pdv, DO = pdo, O = po, D = pd, Q = pq, K = pk;

            // Pass 1, per (head, query block): D, then dq = scale·Σ_kb dS·k, with the tiles laid out
            // [keys, queries] against the block's transposed q and dOut.
            For(heads * blocks, threads, work, new AttentionQueryGradients(a, DQ, DO, O, D, K, &visited, T, qs, ks, headDim, group, blocks, scale, window, tileFloats));

            // Pass 2, per (kv head, key block): dk and dv rows s0..s1 sum over the group's heads and
            // the query blocks that can see them.
            For(kvHeads * blocks, threads, work, new AttentionKeyGradients(a, DK, DV, DO, Q, &visited, T, qs, ks, headDim, group, blocks, scale, window, tileFloats));
        }
        ArrayPool<float>.Shared.Return(dRows);
        return visited;
    }

    /// <summary>Backward pass 2 over one (kv head, key block): its dk and dv rows, summed over the group's heads and the query blocks that see them.</summary>
    private readonly struct AttentionKeyGradients(AttentionOperands a, float* DK, float* DV, float* DO, float* Q, long* visited, int T, int qs, int ks, int headDim, int group, int blocks, float scale, int window, int tileFloats) : IParallelBody
    {
        public void Run(int item)
        {
            const int B = AttentionBlock;
            int g = item / blocks, kb = item % blocks, last = LastQueryBlock(kb, blocks, window);
            int s0 = kb * B, keys = Math.Min(T, s0 + B) - s0;
            float* dkRows = DK + (long)s0 * ks + g * headDim, dvRows = DV + (long)s0 * ks + g * headDim;
            float[] scratch = ArrayPool<float>.Shared.Rent(tileFloats);
            fixed (float* tiles = scratch)
            {
                var tile = new AttentionTile(tiles, headDim);
                a.LoadKeys(tile, g, s0, keys);
                for (int j = 0; j < group; j++)
                {
                    int h = g * group + j;
                    for (int qb = kb; qb <= last; qb++)
                    {
                        int t0 = qb * B, rows = Math.Min(T, t0 + B) - t0;
                        bool add = j > 0 || qb > kb;
                        a.GradientsByQuery(tile, h, t0, rows, s0, keys);
                        // dv (=|+=) Pᵀ·dOut, dk (=|+=) scale·dSᵀ·q
                        GemmTN(dvRows, ks, tile.P, B, DO + (long)t0 * qs + h * headDim, qs, rows, keys, headDim, 1f, add, 1);
                        GemmTN(dkRows, ks, tile.dS, B, Q + (long)t0 * qs + h * headDim, qs, rows, keys, headDim, scale, add, 1);
                    }
                }
            }
            ArrayPool<float>.Shared.Return(scratch);
            Interlocked.Add(ref *visited, (long)group * (last - kb + 1));
        }
    }

    /// <summary>Backward pass 1 over one (head, query block): D for its rows, then dq.</summary>
    private readonly struct AttentionQueryGradients(AttentionOperands a, float* DQ, float* DO, float* O, float* D, float* K, long* visited, int T, int qs, int ks, int headDim, int group, int blocks, float scale, int window, int tileFloats) : IParallelBody
    {
        public void Run(int item)
        {
            const int B = AttentionBlock;
            int h = item / blocks, qb = blocks - 1 - item % blocks, g = h / group; // longest rows first
            int t0 = qb * B, rows = Math.Min(T, t0 + B) - t0, first = FirstKeyBlock(qb, window);
            for (int t = t0; t < t0 + rows; t++)
            {
                long at = (long)t * qs + h * headDim;
                D[(long)h * T + t] = (float)DotDouble(DO + at, O + at, headDim);
            }
            float[] scratch = ArrayPool<float>.Shared.Rent(tileFloats);
            fixed (float* tiles = scratch)
            {
                var tile = new AttentionTile(tiles, headDim);
                a.LoadQueries(tile, h, t0, rows);
                for (int kb = first; kb <= qb; kb++)
                {
                    int s0 = kb * B, keys = Math.Min(T, s0 + B) - s0;
                    a.GradientsByKey(tile, h, g, t0, rows, s0, keys);
                    // dq (=|+=) scale·dS·k, dS read down the columns of the [keys, queries] tile
                    GemmTN(DQ + (long)t0 * qs + h * headDim, qs, tile.dS, B, K + (long)s0 * ks + g * headDim, ks, keys, rows, headDim, scale, kb > first, 1);
                }
            }
            ArrayPool<float>.Shared.Return(scratch);
            Interlocked.Add(ref *visited, qb - first + 1);
        }
    }

    /// <summary>
    /// One work item's tiles: P and dS [Block, Block], and two [hd, Block] tiles (row stride Block) for the
    /// transposed operands that stay fixed through the item: kᵀ and vᵀ, or qᵀ and dOutᵀ.
    /// </summary>
    private readonly struct AttentionTile(float* tiles, int headDim)
    {
        public readonly float* P = tiles, dS = tiles + AttentionBlock * AttentionBlock;
        public readonly float* First = tiles + 2 * AttentionBlock * AttentionBlock, Second = tiles + 2 * AttentionBlock * AttentionBlock + headDim * AttentionBlock;
    }

    /// <summary>The operands of the attention backward, and the recompute of one tile from them.</summary>
    private readonly struct AttentionOperands(float* q, float* k, float* v, float* dOutput, float* lse, float* d, int T, int qs, int ks, int headDim,
                                              float scale, int window)
    {
        /// <summary>kᵀ and vᵀ of keys s0..s0+keys of kv head g into the tile, for <see cref="GradientsByQuery"/>.</summary>
        public void LoadKeys(AttentionTile tile, int g, int s0, int keys)
        {
            Transpose(tile.First, AttentionBlock, k + (long)s0 * ks + g * headDim, ks, keys, headDim);
            Transpose(tile.Second, AttentionBlock, v + (long)s0 * ks + g * headDim, ks, keys, headDim);
        }

        /// <summary>qᵀ and dOutᵀ of query rows t0..t0+rows of head h into the tile, for <see cref="GradientsByKey"/>.</summary>
        public void LoadQueries(AttentionTile tile, int h, int t0, int rows)
        {
            Transpose(tile.First, AttentionBlock, q + (long)t0 * qs + h * headDim, qs, rows, headDim);
            Transpose(tile.Second, AttentionBlock, dOutput + (long)t0 * qs + h * headDim, qs, rows, headDim);
        }

        /// <summary>
        /// For query rows t0..t0+rows of head h against the loaded key block (keys s0..s0+keys):
        /// P = exp(scale·q·kᵀ − lse) and dS = P∘(dOut·vᵀ − D), both [rows, keys], 0 where a query does not
        /// see a key (<see cref="VisibleKeys"/>).
        /// </summary>
        public void GradientsByQuery(AttentionTile tile, int h, int t0, int rows, int s0, int keys)
        {
            const int B = AttentionBlock;
            GemmNN(tile.P, B, q + (long)t0 * qs + h * headDim, qs, tile.First, B, rows, headDim, keys, scale, false, 1);
            GemmNN(tile.dS, B, dOutput + (long)t0 * qs + h * headDim, qs, tile.Second, B, rows, headDim, keys, 1f, false, 1);
            bool masked = IsMasked(t0, rows, s0, keys, window);
            for (int i = 0; i < rows; i++)
            {
                long t = (long)h * T + t0 + i;
                var (lo, hi) = masked ? VisibleKeys(t0 + i, s0, keys, window) : (0, keys);
                SoftmaxGradientRow(tile.P + i * B, tile.dS + i * B, lo, hi, keys, lse[t], d[t]);
            }
        }

        /// <summary>
        /// The same tile laid out [keys, rows], against the loaded query block (keys s0..s0+keys of kv head g):
        /// Pᵀ = exp(scale·k·qᵀ − lse) and dSᵀ = Pᵀ∘(v·dOutᵀ − D), with lse and D running along the columns;
        /// key i sees the queries <see cref="VisibleQueries"/> gives.
        /// </summary>
        public void GradientsByKey(AttentionTile tile, int h, int g, int t0, int rows, int s0, int keys)
        {
            const int B = AttentionBlock;
            GemmNN(tile.P, B, k + (long)s0 * ks + g * headDim, ks, tile.First, B, keys, headDim, rows, scale, false, 1);
            GemmNN(tile.dS, B, v + (long)s0 * ks + g * headDim, ks, tile.Second, B, keys, headDim, rows, 1f, false, 1);
            bool masked = IsMasked(t0, rows, s0, keys, window);
            long row = (long)h * T + t0;
            for (int i = 0; i < keys; i++)
            {
                var (lo, hi) = masked ? VisibleQueries(s0 + i, t0, rows, window) : (0, rows);
                SoftmaxGradientColumns(tile.P + i * B, tile.dS + i * B, lo, hi, rows, lse + row, d + row);
            }
        }
    }

    private static int Group(int heads, int kvHeads)
    {
        if (kvHeads <= 0 || heads % kvHeads != 0)
            throw new ArgumentException($"heads {heads} is not a multiple of kvHeads {kvHeads}.", nameof(kvHeads));
        return heads / kvHeads;
    }

    // ---------------------------------------------------------------- the window

    /// <summary>Checks scale and window; the window as the kernels use it: 0 (every earlier key) for W ≥ T, which hides nothing.</summary>
    private static int Window(int window, int T, float scale)
    {
        if (!float.IsFinite(scale))
            throw new ArgumentOutOfRangeException(nameof(scale), scale, "scale must be finite.");
        if (window < 0)
            throw new ArgumentOutOfRangeException(nameof(window), window, "window must be 0 (causal) or positive.");
        return window >= T ? 0 : window;
    }

    /// <summary>The first key block query block qb sees: the one holding key t0 − W + 1, its first query's earliest.</summary>
    private static int FirstKeyBlock(int qb, int window)
        => window > 0 ? Math.Max(0, qb * AttentionBlock - window + 1) / AttentionBlock : 0;

    /// <summary>The last query block that sees a key of block kb: the one holding query s1 + W − 1, its last key's latest.</summary>
    private static int LastQueryBlock(int kb, int blocks, int window)
        => window > 0 ? Math.Min(blocks - 1, (kb * AttentionBlock + AttentionBlock - 1 + window - 1) / AttentionBlock) : blocks - 1;

    /// <summary>Multiply-adds of the score products, for the decision to go parallel: O(T·W) with a window.</summary>
    private static long AttentionWork(int T, int heads, int headDim, int window)
        => (long)heads * T * (window > 0 ? Math.Min(T, window + AttentionBlock) : T) * headDim;

    /// <summary>Whether the tile of queries t0..t0+rows and keys s0..s0+keys has a pair the query does not see.</summary>
    private static bool IsMasked(int t0, int rows, int s0, int keys, int window)
        => s0 + keys - 1 > t0 || (window > 0 && t0 + rows - 1 - s0 >= window);

    /// <summary>The queries t = t0 + j, j in [lo, hi) ⊆ [0, rows), that see key s: s ≤ t and, with a window, t − s &lt; W.</summary>
    private static (int Lo, int Hi) VisibleQueries(int s, int t0, int rows, int window)
    {
        int lo = Math.Clamp(s - t0, 0, rows);
        return (lo, window > 0 ? Math.Clamp(s + window - t0, lo, rows) : rows);
    }

    /// <summary>The keys s = s0 + i, i in [lo, hi) ⊆ [0, keys), that query t sees: s ≤ t and, with a window, t − s &lt; W.</summary>
    private static (int Lo, int Hi) VisibleKeys(int t, int s0, int keys, int window)
    {
        int hi = Math.Clamp(t - s0 + 1, 0, keys);
        return (window > 0 ? Math.Clamp(t - window + 1 - s0, 0, hi) : 0, hi);
    }

    // ---------------------------------------------------------------- tile helpers

    /// <summary>dst[j, i] = src[i, j] for i &lt; rows, j &lt; cols, with leading dimensions ldd and lds.</summary>
    private static void Transpose(float* dst, int ldd, float* src, int lds, int rows, int cols)
    {
        for (int i = 0; i < rows; i++)
        {
            float* row = src + (long)i * lds;
            for (int j = 0; j < cols; j++)
                dst[(long)j * ldd + i] = row[j];
        }
    }

    /// <summary>x[0..n) *= factor.</summary>
    private static void Scale(float* x, int n, float factor)
    {
        var span = new Span<float>(x, n);
        System.Numerics.Tensors.TensorPrimitives.Multiply(span, factor, span);
    }

    /// <summary>
    /// One row of a tile: p[i] = exp(p[i] − lse), ds[i] = p[i]·(ds[i] − delta) for lo ≤ i &lt; hi, both 0 on
    /// [0, lo) and [hi, keys) (the mask).
    /// </summary>
    private static void SoftmaxGradientRow(float* p, float* ds, int lo, int hi, int keys, float lse, float delta)
    {
        for (int i = 0; i < lo; i++)
            p[i] = ds[i] = 0f;
        int w = MaxVectorWidth, n = hi - lo;
        if (w >= 16 && Vec512Ops.IsAccelerated)
            SoftmaxGradientRow<Vector512<float>, Vec512Ops>(p + lo, ds + lo, n, lse, delta);
        else if (w >= 8 && Vec256Ops.IsAccelerated)
            SoftmaxGradientRow<Vector256<float>, Vec256Ops>(p + lo, ds + lo, n, lse, delta);
        else if (w >= 4 && Vec128Ops.IsAccelerated)
            SoftmaxGradientRow<Vector128<float>, Vec128Ops>(p + lo, ds + lo, n, lse, delta);
        else
            SoftmaxGradientRow<float, ScalarOps>(p + lo, ds + lo, n, lse, delta);
        for (int i = hi; i < keys; i++)
            p[i] = ds[i] = 0f;
    }

    /// <summary>
    /// The online-softmax step of a [keys, cols] tile of scores (masked entries −∞) for cols queries, down
    /// the columns: m[j] = max(m[j], max_i tile[i, j]), rescale[j] = exp(m_old[j] − m[j]),
    /// tile[i, j] = exp(tile[i, j] − m[j]) and sum[j] = Σ_i tile[i, j]. m is finite (it starts at
    /// float.MinValue), so a column masked throughout gets rescale 1 and sum 0.
    /// </summary>
    private static void OnlineSoftmaxColumns(float* tile, int ld, int keys, int cols, float* m, float* rescale, float* sum)
    {
        int j = 0, w = MaxVectorWidth;
        if (w >= 16 && Vec512Ops.IsAccelerated)
            j = OnlineSoftmaxColumns<Vector512<float>, Vec512Ops>(tile, ld, keys, j, cols, m, rescale, sum);
        if (w >= 8 && Vec256Ops.IsAccelerated)
            j = OnlineSoftmaxColumns<Vector256<float>, Vec256Ops>(tile, ld, keys, j, cols, m, rescale, sum);
        if (w >= 4 && Vec128Ops.IsAccelerated)
            j = OnlineSoftmaxColumns<Vector128<float>, Vec128Ops>(tile, ld, keys, j, cols, m, rescale, sum);
        OnlineSoftmaxColumns<float, ScalarOps>(tile, ld, keys, j, cols, m, rescale, sum);
    }

    /// <summary>
    /// One row (key) of a [keys, cols] tile: p[j] = exp(p[j] − lse[j]), ds[j] = p[j]·(ds[j] − delta[j]) for
    /// lo ≤ j &lt; hi, both 0 on [0, lo) and [hi, cols) (the mask).
    /// </summary>
    private static void SoftmaxGradientColumns(float* p, float* ds, int lo, int hi, int cols, float* lse, float* delta)
    {
        for (int j = 0; j < lo; j++)
            p[j] = ds[j] = 0f;
        int w = MaxVectorWidth, first = lo;
        if (w >= 16 && Vec512Ops.IsAccelerated)
            first = SoftmaxGradientColumns<Vector512<float>, Vec512Ops>(p, ds, first, hi, lse, delta);
        if (w >= 8 && Vec256Ops.IsAccelerated)
            first = SoftmaxGradientColumns<Vector256<float>, Vec256Ops>(p, ds, first, hi, lse, delta);
        if (w >= 4 && Vec128Ops.IsAccelerated)
            first = SoftmaxGradientColumns<Vector128<float>, Vec128Ops>(p, ds, first, hi, lse, delta);
        SoftmaxGradientColumns<float, ScalarOps>(p, ds, first, hi, lse, delta);
        for (int j = hi; j < cols; j++)
            p[j] = ds[j] = 0f;
    }

    /// <summary>Columns [j, j1) in whole vectors; returns the first column not done.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int OnlineSoftmaxColumns<TV, TOps>(float* tile, int ld, int keys, int j, int j1, float* m, float* rescale, float* sum)
        where TV : struct where TOps : IVecOps<TV>
    {
        int width = TOps.Width;
        for (; j <= j1 - width; j += width)
        {
            TV old = TOps.Load(m + j), max = old;
            for (int i = 0; i < keys; i++)
                max = TOps.Max(max, TOps.Load(tile + (long)i * ld + j));
            TOps.Store(m + j, max);
            TOps.Store(rescale + j, TOps.Exp(TOps.Subtract(old, max)));
            TV total = TOps.Zero;
            for (int i = 0; i < keys; i++)
            {
                float* at = tile + (long)i * ld + j;
                TV e = TOps.Exp(TOps.Subtract(TOps.Load(at), max));
                TOps.Store(at, e);
                total = TOps.Add(total, e);
            }
            TOps.Store(sum + j, total);
        }
        return j;
    }

    /// <summary>Columns [j, j1) in whole vectors; returns the first column not done.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int SoftmaxGradientColumns<TV, TOps>(float* p, float* ds, int j, int j1, float* lse, float* delta)
        where TV : struct where TOps : IVecOps<TV>
    {
        int width = TOps.Width;
        for (; j <= j1 - width; j += width)
        {
            TV e = TOps.Exp(TOps.Subtract(TOps.Load(p + j), TOps.Load(lse + j)));
            TOps.Store(p + j, e);
            TOps.Store(ds + j, TOps.Mul(e, TOps.Subtract(TOps.Load(ds + j), TOps.Load(delta + j))));
        }
        return j;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void SoftmaxGradientRow<TV, TOps>(float* p, float* ds, int n, float lse, float delta) where TV : struct where TOps : IVecOps<TV>
    {
        int i = 0, width = TOps.Width;
        TV l = TOps.Splat(lse), dl = TOps.Splat(delta);
        for (; i <= n - width; i += width)
        {
            TV e = TOps.Exp(TOps.Subtract(TOps.Load(p + i), l));
            TOps.Store(p + i, e);
            TOps.Store(ds + i, TOps.Mul(e, TOps.Subtract(TOps.Load(ds + i), dl)));
        }
        for (; i < n; i++)
        {
            float e = p[i] = MathF.Exp(p[i] - lse);
            ds[i] = e * (ds[i] - delta);
        }
    }
}
