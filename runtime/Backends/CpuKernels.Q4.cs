using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// A 4-bit weight as the kernels read it: pointers to its packed words, scales and biases (pinned
/// by <see cref="CpuKernels.Q4Pin"/>), and its dimensions.
/// </summary>
internal readonly unsafe struct Q4Matrix(uint* packed, Half* scales, Half* biases, int rows, int columns, int groupSize)
{
    public int Rows => rows;
    public int Columns => columns;
    public int GroupSize => groupSize;

    /// <summary>The packed words [Rows, Columns/8], the scales and the biases [Rows, Columns/GroupSize].</summary>
    public uint* Packed => packed;
    public Half* Scales => scales;
    public Half* Biases => biases;

    /// <summary>
    /// Rows [row0, row0 + count), columns [col0, col0 + cols) as float32 into dst with leading
    /// dimension ldd; col0 and cols are multiples of 8. Uses <see cref="Q4.DequantizeRange(uint*, Half*, Half*, int, int, int, float*)"/>,
    /// the routine behind <see cref="Q4Weight.Dequantize"/>, so the values are exactly the same.
    /// </summary>
    public void Dequantize(int row0, int count, int col0, int cols, float* dst, int ldd)
    {
        int words = columns / Q4.PerWord, groups = columns / groupSize;
        for (int r = 0; r < count; r++)
        {
            long row = row0 + r;
            Q4.DequantizeRange(packed + row * words, scales + row * groups, biases + row * groups, groupSize, col0, cols, dst + (long)r * ldd);
        }
    }
}

/// <summary>
/// The products with a 4-bit weight, dequantization fused in: the weight is never expanded beyond
/// one cache tile. Each parallel tile dequantizes the panel of W it multiplies into a small float
/// buffer (NT: 48 rows of W × a depth block of at most about 1024; NN: 256 rows × 128 or 64
/// columns) and runs the float micro-kernels of <c>CpuKernels.Gemm.cs</c> on it,
/// tiled as the float products are but with every row of the activation in one tile where the
/// threads allow: a panel is dequantized once and used by all T rows, so dequantizing (about 0.5
/// cycle per weight) costs a few percent of the T multiply-adds each weight takes part in.
/// </summary>
internal static unsafe partial class CpuKernels
{
    // ================================================================ kernels with a 4-bit weight

    /// <summary>x[t, :] = table[tokens[t], :] for t &lt; T, dequantizing only the gathered rows.</summary>
    public static void EmbeddingForward(Span<float> x, ReadOnlySpan<int> tokens, Q4Weight table, int T, int C)
    {
        Need(x, (long)T * C, nameof(x));
        if (tokens.Length < T)
            throw new ArgumentException($"tokens has {tokens.Length} entries, T is {T}.", nameof(tokens));
        if (table.Columns != C)
            throw new ArgumentException($"'{table.Name}' has rows of {table.Columns}, C is {C}.", nameof(table));
        for (int t = 0; t < T; t++)
        {
            int token = tokens[t];
            if ((uint)token >= (uint)table.Rows)
                throw new ArgumentOutOfRangeException(nameof(tokens), $"tokens[{t}] = {token} is outside the table's {table.Rows} rows.");
            table.DequantizeRow(token, x.Slice(t * C, C));
        }
    }

    /// <summary>y [T, dout] = x [T, din]·wᵀ (+ bias) with a 4-bit w [dout, din].</summary>
    public static void LinearForward(Span<float> y, ReadOnlySpan<float> x, Q4Weight w, ReadOnlySpan<float> bias, int T, int din, int dout, int threads)
    {
        CheckShape(w, dout, din);
        Need(y, (long)T * dout, nameof(y)); Need(x, (long)T * din, nameof(x));
        using (var pin = new Q4Pin(w))
        fixed (float* py = y) fixed (float* px = x)
        {
            if (T <= NibbleDotMaxRows)
                NibbleDotsQ4(py, px, pin.Matrix, T, threads);
            else
                GemmNTQ4(py, dout, px, din, pin.Matrix, 0, T, dout, 1f, false, threads);
        }
        if (!bias.IsEmpty)
        {
            Need(bias, dout, nameof(bias));
            for (int t = 0; t < T; t++)
            {
                Span<float> row = y.Slice(t * dout, dout);
                System.Numerics.Tensors.TensorPrimitives.Add(row, bias[..dout], row);
            }
        }
    }

    /// <summary>dx [T, din] (=|+=) dy [T, dout]·w with a 4-bit w [dout, din].</summary>
    public static void LinearBackwardInput(Span<float> dx, ReadOnlySpan<float> dy, Q4Weight w, int T, int din, int dout, bool accumulate, int threads)
    {
        CheckShape(w, dout, din);
        Need(dx, (long)T * din, nameof(dx)); Need(dy, (long)T * dout, nameof(dy));
        using var pin = new Q4Pin(w);
        fixed (float* pdx = dx) fixed (float* pdy = dy)
            GemmNNQ4(pdx, din, pdy, dout, pin.Matrix, 0, T, dout, 1f, accumulate, threads);
    }

    /// <summary>
    /// <see cref="LmHeadCrossEntropy(Span{float}, Span{float}, ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{int}, int, int, int, int, float, int)"/>
    /// with a 4-bit w [V, C]: each vocabulary chunk's logits and its dx term are products with the
    /// chunk's rows of w dequantized a tile at a time; no chunk is ever held in float. The softcap is
    /// the float kernel's.
    /// </summary>
    public static float LmHeadCrossEntropy(Span<float> dx, Span<float> logits, ReadOnlySpan<float> x, Q4Weight w, ReadOnlySpan<int> targets,
                                           int T, int C, int V, int chunk, float softcap, int threads)
    {
        if (w.Columns != C || w.Rows < V)
            throw new ArgumentException($"'{w.Name}' is [{w.Rows}, {w.Columns}], the LM head needs [{V}, {C}].", nameof(w));
        using var pin = new Q4Pin(w);
        return LmHeadCrossEntropy(dx, logits, x, new HeadWeight(null, pin.Matrix), targets, T, C, V, chunk, softcap, threads);
    }

    private static void CheckShape(Q4Weight w, int dout, int din)
    {
        if (w.Rows != dout || w.Columns != din)
            throw new ArgumentException($"'{w.Name}' is [{w.Rows}, {w.Columns}], the kernel needs [{dout}, {din}].", nameof(w));
    }

    /// <summary>Pins a <see cref="Q4Weight"/>'s three memories (free for a file mapping) for the length of a kernel.</summary>
    internal readonly struct Q4Pin : IDisposable
    {
        private readonly MemoryHandle _packed, _scales, _biases;

        public Q4Pin(Q4Weight w)
        {
            _packed = w.Packed.Pin();
            _scales = w.Scales.Pin();
            _biases = w.Biases.Pin();
            Matrix = new Q4Matrix((uint*)_packed.Pointer, (Half*)_scales.Pointer, (Half*)_biases.Pointer, w.Rows, w.Columns, w.GroupSize);
        }

        public Q4Matrix Matrix { get; }

        public void Dispose()
        {
            _packed.Dispose();
            _scales.Dispose();
            _biases.Dispose();
        }
    }

    // ================================================================ panels

    /// <summary>Floats in a panel: the larger of NT's [48, depth ≤ 1024 + 15] and NN's [256, 128].</summary>
    private const int PanelFloats = NtColBlock * (NtDepthBlock + 16) > BcDepthBlock * BcColBlock
        ? NtColBlock * (NtDepthBlock + 16) : BcDepthBlock * BcColBlock;

    private static readonly Stack<float[]> s_panels = new();

    /// <summary>
    /// A panel buffer (about 200 KB). Kept in a pool of their own: as many exist as tiles have ever
    /// run at once (the thread count), where the shared ArrayPool would keep one per thread-pool
    /// thread that ever ran a tile.
    /// </summary>
    private static float[] RentPanel()
    {
        lock (s_panels)
            if (s_panels.Count > 0)
                return s_panels.Pop();
        return new float[PanelFloats];
    }

    private static void ReturnPanel(float[] panel)
    {
        lock (s_panels)
            s_panels.Push(panel);
    }

    // ================================================================ NT: C = α·A·W[w0.., :]ᵀ

    /// <summary>
    /// C[M,N] (=|+=) α·A[M,K]·W[w0 + j, :]ᵀ for j &lt; N, K = W.Columns: the float NT product with the
    /// rows of W dequantized a [48, depth] panel at a time.
    /// </summary>
    internal static void GemmNTQ4(float* c, int ldc, float* a, int lda, Q4Matrix w, int w0, int M, int N, float alpha, bool accumulate, int threads)
    {
        int K = w.Columns;
        if (M <= 0 || N <= 0)
            return;
        if (w0 < 0 || w0 + N > w.Rows)
            throw new ArgumentOutOfRangeException(nameof(w0), $"rows {w0}..{w0 + N} are outside the weight's {w.Rows}.");
        if (K <= 0)
        {
            if (!accumulate)
                ZeroRows(c, ldc, M, N);
            return;
        }
        int width = MaxVectorWidth;
        if (width >= 16 && K >= 16 && Vec512Ops.IsAccelerated)
            DotProductsQ4<Vector512<float>, Vec512Ops>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, threads);
        else if (width >= 8 && K >= 8 && Vec256Ops.IsAccelerated)
            DotProductsQ4<Vector256<float>, Vec256Ops>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, threads);
        else if (width >= 4 && K >= 4 && Vec128Ops.IsAccelerated)
            DotProductsQ4<Vector128<float>, Vec128Ops>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, threads);
        else
            DotProductsQ4<float, ScalarOps>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, threads);
    }

    private static void DotProductsQ4<TV, TOps>(float* c, int ldc, float* a, int lda, Q4Matrix w, int w0, int M, int N, int K, float alpha, bool accumulate, int threads)
        where TV : struct where TOps : IVecOps<TV>
    {
        // The float product's tiling (DotProducts) with two changes. A tile takes all rows of A (up to
        // 512) when there are enough column tiles for the threads, so that each panel of W is
        // dequantized once (the panel is re-read from L2 for every 4 rows either way; A's 4 rows
        // stay in L1). Depth
        // blocks are a multiple of 16 so that each starts on a word (at the widest vectors, the same
        // blocks as the float product).
        int rowBlock = Ceil(Math.Clamp(M, NtRowBlock, 4 * NtRowBlock), 4) * 4;
        int colTiles = Ceil(N, NtColBlock);
        while (threads > 1 && rowBlock > 4 && Ceil(M, rowBlock) * colTiles < 4 * threads)
            rowBlock = Ceil(rowBlock / 2, 4) * 4;
        int rowTiles = Ceil(M, rowBlock);
        int depthBlocks = Ceil(K, NtDepthBlock);
        int depth = Math.Min(K, Ceil(Ceil(K, depthBlocks), 16) * 16);

        For(rowTiles * colTiles, threads, (long)M * N * K, new DotTilesQ4<TV, TOps>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, rowBlock, colTiles, depth));
    }

    /// <summary>One tile of the 4-bit NT product: each depth block of its W panel dequantized once, then the float micro-kernels.</summary>
    private readonly struct DotTilesQ4<TV, TOps>(float* c, int ldc, float* a, int lda, Q4Matrix w, int w0, int M, int N, int K, float alpha, bool accumulate, int rowBlock, int colTiles, int depth) : IParallelBody where TV : struct where TOps : IVecOps<TV>
    {
        public void Run(int tile)
        {
            int i0 = tile / colTiles * rowBlock, j0 = tile % colTiles * NtColBlock;
            int i1 = Math.Min(M, i0 + rowBlock), j1 = Math.Min(N, j0 + NtColBlock);
            float[] panel = RentPanel();
            fixed (float* b = panel)
                for (int k0 = 0; k0 < K; k0 += depth)
                {
                    int kn = Math.Min(depth, K - k0);
                    bool add = accumulate || k0 > 0;
                    // W rows j0..j1, columns k0..k0+kn, as float [j1 − j0, kn].
                    w.Dequantize(w0 + j0, j1 - j0, k0, kn, b, kn);
                    for (int i = i0; i < i1; i += 4)
                    {
                        if (TOps.Width >= 16)
                            for (int j = j0; j < j1; j += 4)
                                DotMicro4x4<TV, TOps>(c + (long)i * ldc + j, ldc, a + (long)i * lda + k0, lda, Math.Min(4, i1 - i),
                                                      b + (long)(j - j0) * kn, kn, Math.Min(4, j1 - j), kn, alpha, add);
                        else
                            for (int j = j0; j < j1; j += 3)
                                DotMicro<TV, TOps>(c + (long)i * ldc + j, ldc, a + (long)i * lda + k0, lda, Math.Min(4, i1 - i),
                                                   b + (long)(j - j0) * kn, kn, Math.Min(3, j1 - j), kn, alpha, add);
                    }
                }
            ReturnPanel(panel);
        }
    }

    // ================================================================ decoding: y = x·Wᵀ for a few rows of x

    /// <summary>
    /// Rows of x up to which <see cref="LinearForward(Span{float}, ReadOnlySpan{float}, Q4Weight, ReadOnlySpan{float}, int, int, int, int)"/>
    /// takes <see cref="NibbleDotsQ4"/> rather than the dequantizing product. The nibble dot products
    /// decode each weight once per row of x, the dequantizing product once for all of them. Measured at
    /// Qwen2.5-0.5B's shapes on Zen 4 (weights in DRAM and in L3, 1 and 2 threads), the nibble path is
    /// 3–4× faster at T = 1, 1.2–2× at T = 2 and 1.2–1.5× at T = 3; at T = 4 it is level with weights
    /// in L3 and up to 30% slower with weights in DRAM on 2 threads.
    /// </summary>
    internal const int NibbleDotMaxRows = 3;

    /// <summary>Rows of W whose scales and biases are converted to float at a time.</summary>
    private const int NibbleRowBlock = 16;

    /// <summary>
    /// y[t, r] = Σ_g scale[r, g]·(Σ_{k∈g} q[r, k]·x[t, k]) + bias[r, g]·(Σ_{k∈g} x[t, k]) for t &lt; T: the
    /// linear layer's product for the few rows of a decoding step, on the packed nibbles themselves.
    /// The lanes of a vector are Width consecutive words of a row of W, so nibble k of every lane is one
    /// AND and a conversion, and its partner in x is column 8i + k: x is laid out once per call in that
    /// order (<see cref="NibbleLayout"/>), with the sum of its 8 columns under each word. A word's dot
    /// product with x times its group's scale, plus its group's bias times the word's sum of x, is its
    /// term of the row's product; each lane's scale and bias come from its row's, converted to float
    /// 16 rows at a time, by a permutation. Rows of W are split among the threads; the micro-kernel
    /// takes 4 at a time, whose dot products are independent chains of FMAs sharing each load of x.
    /// Words past the last whole vector are finished at the narrower widths.
    /// </summary>
    internal static void NibbleDotsQ4(float* y, float* x, Q4Matrix w, int T, int threads)
    {
        int rows = w.Rows, cols = w.Columns, words = cols / Q4.PerWord;
        if (T <= 0 || rows <= 0)
            return;
        float[] xBuffer = ArrayPool<float>.Shared.Rent(Math.Max(1, T * (cols + words)));
        int[] groupBuffer = ArrayPool<int>.Shared.Rent(Math.Max(1, 2 * words));
        fixed (float* xf = xBuffer) fixed (int* gf = groupBuffer)
        {
            var layout = new NibbleLayout(xf, gf, x, T, cols, w.GroupSize);
            int chunkRows = Math.Clamp(Ceil(Ceil(rows, 4 * Math.Max(1, threads)), NibbleRowBlock) * NibbleRowBlock, NibbleRowBlock, 64 * NibbleRowBlock);
            For(Ceil(rows, chunkRows), threads, (long)T * rows * cols, new NibbleChunks(y, w, layout, T, rows, chunkRows));
        }
        ArrayPool<float>.Shared.Return(xBuffer);
        ArrayPool<int>.Shared.Return(groupBuffer);
    }

    private readonly struct NibbleChunks(float* y, Q4Matrix w, NibbleLayout layout, int T, int rows, int chunkRows) : IParallelBody
    {
        public void Run(int chunk) => NibbleRows(y, w, layout, T, chunk * chunkRows, Math.Min(rows, (chunk + 1) * chunkRows));
    }

    /// <summary>
    /// x as <see cref="NibbleMicro{TV, TOps}"/> reads it, in buffers of T·(cols + words) floats and
    /// 2·words ints. Words [0, End16) go in vectors of 16, [End16, End8) of 8, [End8, End4) of 4, the
    /// rest one at a time. A vector of Width words j..j+Width meets x as 8 vectors, the k-th holding
    /// columns 8(j + i) + k for lanes i, times <see cref="NibbleScale"/>[k], at Xp[t·cols + 8j + k·Width + i];
    /// Xs[t·words + j + i] = Σ_k x[t, 8(j + i) + k]; First[j] is the group of the vector's first column
    /// and Lane[j + i] how many groups past it word i lies (below Width, as a word is in one group).
    /// </summary>
    private readonly struct NibbleLayout
    {
        public readonly float* Xp, Xs;
        public readonly int* First, Lane;
        public readonly int Columns, Words, End16, End8, End4;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public NibbleLayout(float* floats, int* ints, float* x, int T, int cols, int groupSize)
        {
            int words = cols / Q4.PerWord, width = MaxVectorWidth;
            Columns = cols;
            Words = words;
            End16 = width >= 16 && Vec512Ops.IsAccelerated ? words / 16 * 16 : 0;
            End8 = End16 + (width >= 8 && Vec256Ops.IsAccelerated ? (words - End16) / 8 * 8 : 0);
            End4 = End8 + (width >= 4 && Vec128Ops.IsAccelerated ? (words - End8) / 4 * 4 : 0);
            Xp = floats;
            Xs = floats + (long)T * cols;
            First = ints;
            Lane = ints + words;
            Span<(int Width, int Start, int End)> ranges = [(16, 0, End16), (8, End16, End8), (4, End8, End4), (1, End4, words)];
            foreach (var (w, start, end) in ranges)
                for (int j = start; j < end; j += w)
                {
                    int g0 = Q4.PerWord * j / groupSize;
                    First[j] = g0;
                    for (int i = 0; i < w; i++)
                        Lane[j + i] = Q4.PerWord * (j + i) / groupSize - g0;
                    for (int t = 0; t < T; t++)
                    {
                        float* xt = x + (long)t * cols, pt = Xp + (long)t * cols + Q4.PerWord * j;
                        for (int k = 0; k < Q4.PerWord; k++)
                            for (int i = 0; i < w; i++)
                                pt[k * w + i] = xt[Q4.PerWord * (j + i) + k] * NibbleScale[k];
                    }
                }
            for (int t = 0; t < T; t++)
                for (int j = 0; j < words; j++)
                {
                    float* c = x + (long)t * cols + Q4.PerWord * j;
                    Xs[(long)t * words + j] = c[0] + c[1] + c[2] + c[3] + c[4] + c[5] + c[6] + c[7];
                }
        }
    }

    /// <summary>
    /// 16^−k for the nibbles k &lt; 7 that <see cref="IVecOps{TV}.NibbleInPlace"/> leaves in place (as
    /// q·16^k), 1 for the top one that <see cref="IVecOps{TV}.TopNibble"/> shifts down: (q·16^k)·(x·16^−k)
    /// is the same real number as q·x (both scalings are exact), so each FMA rounds as it would on q·x.
    /// </summary>
    private static ReadOnlySpan<float> NibbleScale => [1f, 1f / 16, 1f / 256, 1f / 4096, 1f / 65536, 1f / 1048576, 1f / 16777216, 1f];

    /// <summary>
    /// y[t, r] for t &lt; T, r0 ≤ r &lt; r1. Optimized from the first call: a decoding run is short, and
    /// the first tokens would otherwise run this loop unoptimized.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void NibbleRows(float* y, Q4Matrix w, NibbleLayout x, int T, int r0, int r1)
    {
        int rows = w.Rows, cols = x.Columns, words = x.Words, groups = cols / w.GroupSize;
        int end16 = x.End16, end8 = x.End8, end4 = x.End4;
        // Scales then biases of NibbleRowBlock rows as float [rows, groups], each followed by 16 floats
        // that a permuted load of the last groups may read.
        int ld = NibbleRowBlock * groups + 16;
        float[] buffer = ArrayPool<float>.Shared.Rent(2 * ld);
        fixed (float* sf = buffer)
            for (int s = r0; s < r1; s += NibbleRowBlock)
            {
                int n = Math.Min(NibbleRowBlock, r1 - s);
                float* bf = sf + ld;
                HalfToSingle(w.Scales + (long)s * groups, sf, n * groups);
                HalfToSingle(w.Biases + (long)s * groups, bf, n * groups);
                for (int r = s; r < s + n; r += 4)
                {
                    int m = Math.Min(4, s + n - r);
                    uint* wr = w.Packed + (long)r * words;
                    float* sr = sf + (r - s) * groups, br = bf + (r - s) * groups;
                    for (int t = 0; t < T; t++)
                    {
                        float* xp = x.Xp + (long)t * cols, xs = x.Xs + (long)t * words;
                        var dots = Vector128<float>.Zero;
                        if (end16 > 0)
                            dots += NibbleMicro<Vector512<float>, Vec512Ops>(wr, words, m, sr, br, groups, xp, xs, x.First, x.Lane, 0, end16);
                        if (end8 > end16)
                            dots += NibbleMicro<Vector256<float>, Vec256Ops>(wr, words, m, sr, br, groups, xp, xs, x.First, x.Lane, end16, end8);
                        if (end4 > end8)
                            dots += NibbleMicro<Vector128<float>, Vec128Ops>(wr, words, m, sr, br, groups, xp, xs, x.First, x.Lane, end8, end4);
                        if (words > end4)
                            dots += NibbleMicro<float, ScalarOps>(wr, words, m, sr, br, groups, xp, xs, x.First, x.Lane, end4, words);
                        float* yt = y + (long)t * rows + r;
                        for (int i = 0; i < m; i++)
                            yt[i] = dots[i];
                    }
                }
            }
        ArrayPool<float>.Shared.Return(buffer);
    }

    /// <summary>
    /// Rows r &lt; rows ≤ 4 of W (missing rows alias the first: computed, never stored) over words
    /// [start, end), a multiple of Width: Σ_j scale·(Σ_k q·x) + bias·xs per lane, then the four sums.
    /// Words at w + r·ldw, the row's float scales and biases at s + r·lds and b + r·lds.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static Vector128<float> NibbleMicro<TV, TOps>(uint* w, int ldw, int rows, float* s, float* b, int lds,
                                                          float* xp, float* xs, int* first, int* lane, int start, int end)
        where TV : struct where TOps : IVecOps<TV>
    {
        uint* w0 = w, w1 = rows > 1 ? w0 + ldw : w0, w2 = rows > 2 ? w1 + ldw : w0, w3 = rows > 3 ? w2 + ldw : w0;
        float* s0 = s, s1 = rows > 1 ? s0 + lds : s0, s2 = rows > 2 ? s1 + lds : s0, s3 = rows > 3 ? s2 + lds : s0;
        float* b0 = b, b1 = rows > 1 ? b0 + lds : b0, b2 = rows > 2 ? b1 + lds : b0, b3 = rows > 3 ? b2 + lds : b0;
        TV r0 = TOps.Zero, r1 = TOps.Zero, r2 = TOps.Zero, r3 = TOps.Zero;
        int width = TOps.Width;
        for (int j = start; j < end; j += width)
        {
            TV d0 = TOps.Zero, d1 = TOps.Zero, d2 = TOps.Zero, d3 = TOps.Zero;
            float* xk = xp + Q4.PerWord * j;
            // Nibbles 0..6 in place against x·16^−k, then nibble 7 shifted down against x itself.
            for (int k = 0; k < Q4.PerWord - 1; k++, xk += width)
            {
                TV xv = TOps.Load(xk);
                d0 = TOps.MulAdd(TOps.NibbleInPlace(w0 + j, k), xv, d0);
                d1 = TOps.MulAdd(TOps.NibbleInPlace(w1 + j, k), xv, d1);
                d2 = TOps.MulAdd(TOps.NibbleInPlace(w2 + j, k), xv, d2);
                d3 = TOps.MulAdd(TOps.NibbleInPlace(w3 + j, k), xv, d3);
            }
            TV x7 = TOps.Load(xk);
            d0 = TOps.MulAdd(TOps.TopNibble(w0 + j), x7, d0);
            d1 = TOps.MulAdd(TOps.TopNibble(w1 + j), x7, d1);
            d2 = TOps.MulAdd(TOps.TopNibble(w2 + j), x7, d2);
            d3 = TOps.MulAdd(TOps.TopNibble(w3 + j), x7, d3);
            int g = first[j];
            int* index = lane + j;
            TV sum = TOps.Load(xs + j);
            r0 = TOps.MulAdd(TOps.LoadPermuted(b0 + g, index), sum, TOps.MulAdd(d0, TOps.LoadPermuted(s0 + g, index), r0));
            r1 = TOps.MulAdd(TOps.LoadPermuted(b1 + g, index), sum, TOps.MulAdd(d1, TOps.LoadPermuted(s1 + g, index), r1));
            r2 = TOps.MulAdd(TOps.LoadPermuted(b2 + g, index), sum, TOps.MulAdd(d2, TOps.LoadPermuted(s2 + g, index), r2));
            r3 = TOps.MulAdd(TOps.LoadPermuted(b3 + g, index), sum, TOps.MulAdd(d3, TOps.LoadPermuted(s3 + g, index), r3));
        }
        return TOps.Sum4(r0, r1, r2, r3);
    }

    /// <summary>
    /// n F16 values to float32, exactly as <see cref="Q4.ToSingle"/> (which finishes the tail), 16 at a
    /// time: the magnitude's bits moved into a float32 are the value times 2^−112, one exact
    /// multiplication fixes that; infinities and NaNs get the all-ones exponent instead. Its own
    /// rather than TensorPrimitives' so that it too is optimized from a decoding run's first call.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void HalfToSingle(Half* src, float* dst, int n)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
            for (; i <= n - 16; i += 16)
            {
                var h = Vector256.Load((ushort*)src + i);
                Widen(Vector256.WidenLower(h)).Store(dst + i);
                Widen(Vector256.WidenUpper(h)).Store(dst + i + 8);
            }
        for (; i < n; i++)
            dst[i] = Q4.ToSingle(src[i]);

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        static Vector256<float> Widen(Vector256<uint> h)
        {
            var magnitude = h & Vector256.Create(0x7FFFu);
            var sign = (h & Vector256.Create(0x8000u)) << 16;
            var finite = (magnitude << 13).AsSingle() * Vector256.Create(5.192296858534828e33f); // 2^112
            var special = (magnitude << 13) | Vector256.Create(0x7F800000u);
            return (Vector256.ConditionalSelect(Vector256.GreaterThanOrEqual(magnitude, Vector256.Create(0x7C00u)), special, finite.AsUInt32()) | sign).AsSingle();
        }
    }

    // ================================================================ NN: C = α·A·W[w0.., :]

    /// <summary>
    /// C[M,K] (=|+=) α·A[M,N]·W[w0 + p, :] for p &lt; N, K = W.Columns: the float broadcast product with
    /// W dequantized a [256, 128] panel at a time.
    /// </summary>
    internal static void GemmNNQ4(float* c, int ldc, float* a, int lda, Q4Matrix w, int w0, int M, int N, float alpha, bool accumulate, int threads)
    {
        int R = M, cols = w.Columns, P = N;
        if (R <= 0 || cols <= 0)
            return;
        if (w0 < 0 || w0 + N > w.Rows)
            throw new ArgumentOutOfRangeException(nameof(w0), $"rows {w0}..{w0 + N} are outside the weight's {w.Rows}.");
        if (P <= 0)
        {
            if (!accumulate)
                ZeroRows(c, ldc, R, cols);
            return;
        }

        // The float product's tiling (Broadcast), preferring column tiles to row tiles so that each
        // panel of W is dequantized as few times as possible: all rows (up to 288, so that C's and
        // A's tiles stay in L2) in a tile when the columns give the threads enough tiles, in blocks
        // of 128 or, if that is too few, 64 columns.
        int colBlock = threads > 1 && Ceil(cols, BcColBlock) < 4 * threads ? BcColBlock / 2 : BcColBlock;
        int colTiles = Ceil(cols, colBlock);
        int rowBlock = Ceil(Math.Clamp(R, BcRowBlock, 2 * BcRowBlock), 6) * 6;
        while (threads > 1 && rowBlock > 6 && Ceil(R, rowBlock) * colTiles < 4 * threads)
            rowBlock = Math.Max(6, rowBlock / 12 * 6);
        int rowTiles = Ceil(R, rowBlock);

        For(rowTiles * colTiles, threads, (long)R * cols * P, new BroadcastTilesQ4(c, ldc, a, lda, w, w0, R, cols, P, alpha, accumulate, rowBlock, colTiles, colBlock));
    }

    /// <summary>One tile of the 4-bit NN product: each depth block of its W panel dequantized once, then the float micro-kernels.</summary>
    private readonly struct BroadcastTilesQ4(float* c, int ldc, float* a, int lda, Q4Matrix w, int w0, int R, int cols, int P, float alpha, bool accumulate, int rowBlock, int colTiles, int colBlock) : IParallelBody
    {
        public void Run(int tile)
        {
            int r0 = tile / colTiles * rowBlock, q0 = tile % colTiles * colBlock;
            int r1 = Math.Min(R, r0 + rowBlock), q1 = Math.Min(cols, q0 + colBlock);
            int ld = q1 - q0;
            float[] panel = RentPanel();
            fixed (float* buffer = panel)
                for (int p0 = 0; p0 < P; p0 += BcDepthBlock)
                {
                    int pn = Math.Min(BcDepthBlock, P - p0);
                    bool add = accumulate || p0 > 0;
                    // W rows p0..p0+pn, columns q0..q1, as float [pn, ld]; bp + q addresses column q.
                    w.Dequantize(w0 + p0, pn, q0, ld, buffer, ld);
                    float* ap = a + p0, bp = buffer - q0;
                    int q = q0, width = MaxVectorWidth;
                    if (width >= 16 && Vec512Ops.IsAccelerated)
                        q = BroadcastColumns<Vector512<float>, Vec512Ops>(c, ldc, ap, lda, 1, bp, ld, r0, r1, q, q1, pn, alpha, add);
                    if (width >= 8 && Vec256Ops.IsAccelerated)
                        q = BroadcastColumns<Vector256<float>, Vec256Ops>(c, ldc, ap, lda, 1, bp, ld, r0, r1, q, q1, pn, alpha, add);
                    if (width >= 4 && Vec128Ops.IsAccelerated)
                        q = BroadcastColumns<Vector128<float>, Vec128Ops>(c, ldc, ap, lda, 1, bp, ld, r0, r1, q, q1, pn, alpha, add);
                    BroadcastColumns<float, ScalarOps>(c, ldc, ap, lda, 1, bp, ld, r0, r1, q, q1, pn, alpha, add);
                }
            ReturnPanel(panel);
        }
    }

    // ================================================================ the LM head's weight

    /// <summary>The LM head's w [V, C]: float32 in place, or 4-bit. Its two products on a chunk of rows.</summary>
    private readonly struct HeadWeight(float* f32, Q4Matrix q4)
    {
        /// <summary>L[N, n] = X[N, C]·w[v0..v0+n, :]ᵀ.</summary>
        public void Logits(float* L, float* X, int N, int v0, int n, int C, int threads)
        {
            if (f32 is not null)
                GemmNT(L, n, X, C, f32 + (long)v0 * C, C, N, n, C, 1f, false, threads);
            else
                GemmNTQ4(L, n, X, C, q4, v0, N, n, 1f, false, threads);
        }

        /// <summary>DX[N, C] (=|+=) L[N, n]·w[v0..v0+n, :].</summary>
        public void InputGradient(float* DX, float* L, int N, int v0, int n, int C, bool accumulate, int threads)
        {
            if (f32 is not null)
                GemmNN(DX, C, L, n, f32 + (long)v0 * C, C, N, n, C, 1f, accumulate, threads);
            else
                GemmNNQ4(DX, C, L, n, q4, v0, N, n, 1f, accumulate, threads);
        }
    }
}
