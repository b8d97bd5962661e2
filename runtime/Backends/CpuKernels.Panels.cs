using System.Runtime.Intrinsics;

namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// A weight that the products read a panel at a time: 4-bit (<see cref="Q4Matrix"/>) or 16-bit
/// (<see cref="Float16Matrix"/>), converted to float32 into a small buffer right before the float
/// micro-kernels use it. Implemented by structs, so each product is specialised for its weight by the JIT.
/// </summary>
internal unsafe interface IPanelWeight
{
    int Rows { get; }
    int Columns { get; }

    /// <summary>
    /// Rows [row0, row0 + count), columns [col0, col0 + cols) as float32 into dst with leading
    /// dimension ldd. The products pass column ranges that start and end on a multiple of 8 (or at
    /// the last column), which a 4-bit weight needs.
    /// </summary>
    void Dequantize(int row0, int count, int col0, int cols, float* dst, int ldd);
}

/// <summary>
/// The products with a weight that is not float32 (<see cref="IPanelWeight"/>), its conversion fused
/// in: the weight is never expanded beyond one cache tile. Each parallel tile converts the panel of W
/// it multiplies into a small float buffer (NT: 48 rows of W × a depth block of at most about 1024;
/// NN: 256 rows × 128 or 64 columns) and runs the float micro-kernels of <c>CpuKernels.Gemm.cs</c>
/// on it, tiled as the float products are but with every row of the activation in one tile where the
/// threads allow: a panel is converted once and used by all T rows, so converting (about 0.5 cycle
/// per weight for 4 bits, less for 16) costs a few percent of the T multiply-adds each weight takes
/// part in.
/// </summary>
internal static unsafe partial class CpuKernels
{
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
    internal static void GemmNTPanels<TW>(float* c, int ldc, float* a, int lda, TW w, int w0, int M, int N, float alpha, bool accumulate, int threads)
        where TW : struct, IPanelWeight
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
            DotProductsPanels<Vector512<float>, Vec512Ops, TW>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, threads);
        else if (width >= 8 && K >= 8 && Vec256Ops.IsAccelerated)
            DotProductsPanels<Vector256<float>, Vec256Ops, TW>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, threads);
        else if (width >= 4 && K >= 4 && Vec128Ops.IsAccelerated)
            DotProductsPanels<Vector128<float>, Vec128Ops, TW>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, threads);
        else
            DotProductsPanels<float, ScalarOps, TW>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, threads);
    }

    private static void DotProductsPanels<TV, TOps, TW>(float* c, int ldc, float* a, int lda, TW w, int w0, int M, int N, int K, float alpha, bool accumulate, int threads)
        where TV : struct where TOps : IVecOps<TV> where TW : struct, IPanelWeight
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

        For(rowTiles * colTiles, threads, (long)M * N * K, new DotTilesPanels<TV, TOps, TW>(c, ldc, a, lda, w, w0, M, N, K, alpha, accumulate, rowBlock, colTiles, depth));
    }

    /// <summary>One tile of the NT product with a panel weight: each depth block of its W panel converted once, then the float micro-kernels.</summary>
    private readonly struct DotTilesPanels<TV, TOps, TW>(float* c, int ldc, float* a, int lda, TW w, int w0, int M, int N, int K, float alpha, bool accumulate, int rowBlock, int colTiles, int depth) : IParallelBody where TV : struct where TOps : IVecOps<TV> where TW : struct, IPanelWeight
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

    // ================================================================ NN: C = α·A·W[w0.., :]

    /// <summary>
    /// C[M,K] (=|+=) α·A[M,N]·W[w0 + p, :] for p &lt; N, K = W.Columns: the float broadcast product with
    /// W dequantized a [256, 128] panel at a time.
    /// </summary>
    internal static void GemmNNPanels<TW>(float* c, int ldc, float* a, int lda, TW w, int w0, int M, int N, float alpha, bool accumulate, int threads)
        where TW : struct, IPanelWeight
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

        For(rowTiles * colTiles, threads, (long)R * cols * P, new BroadcastTilesPanels<TW>(c, ldc, a, lda, w, w0, R, cols, P, alpha, accumulate, rowBlock, colTiles, colBlock));
    }

    /// <summary>One tile of the NN product with a panel weight: each depth block of its W panel converted once, then the float micro-kernels.</summary>
    private readonly struct BroadcastTilesPanels<TW>(float* c, int ldc, float* a, int lda, TW w, int w0, int R, int cols, int P, float alpha, bool accumulate, int rowBlock, int colTiles, int colBlock) : IParallelBody where TW : struct, IPanelWeight
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

    /// <summary>The LM head's w [V, C]: float32 in place, 4-bit or 16-bit. Its two products on a chunk of rows.</summary>
    private readonly struct HeadWeight
    {
        private readonly float* _f32;
        private readonly Q4Matrix _q4;
        private readonly Float16Matrix _w16;

        public HeadWeight(float* f32) => _f32 = f32;
        public HeadWeight(Q4Matrix q4) => _q4 = q4;
        public HeadWeight(Float16Matrix w16) => _w16 = w16;

        /// <summary>L[N, n] = X[N, C]·w[v0..v0+n, :]ᵀ.</summary>
        public void Logits(float* L, float* X, int N, int v0, int n, int C, int threads)
        {
            if (_f32 is not null)
                GemmNT(L, n, X, C, _f32 + (long)v0 * C, C, N, n, C, 1f, false, threads);
            else if (_w16.Bits is not null)
                GemmNTPanels(L, n, X, C, _w16, v0, N, n, 1f, false, threads);
            else
                GemmNTPanels(L, n, X, C, _q4, v0, N, n, 1f, false, threads);
        }

        /// <summary>DX[N, C] (=|+=) L[N, n]·w[v0..v0+n, :].</summary>
        public void InputGradient(float* DX, float* L, int N, int v0, int n, int C, bool accumulate, int threads)
        {
            if (_f32 is not null)
                GemmNN(DX, C, L, n, _f32 + (long)v0 * C, C, N, n, C, 1f, accumulate, threads);
            else if (_w16.Bits is not null)
                GemmNNPanels(DX, C, L, n, _w16, v0, N, n, 1f, accumulate, threads);
            else
                GemmNNPanels(DX, C, L, n, _q4, v0, N, n, 1f, accumulate, threads);
        }
    }
}
