using System.Buffers;
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
            GemmNTQ4(py, dout, px, din, pin.Matrix, 0, T, dout, 1f, false, threads);
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

        For(rowTiles * colTiles, threads, (long)M * N * K, tile =>
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
        });
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

        For(rowTiles * colTiles, threads, (long)R * cols * P, tile =>
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
        });
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
