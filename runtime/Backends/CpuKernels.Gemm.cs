using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// The three matrix products every kernel is built from, row-major with leading dimensions:
/// <list type="bullet">
/// <item>NT: C[M,N] (=|+=) α·A[M,K]·B[N,K]ᵀ — a dot product per output, both operands contiguous in K.</item>
/// <item>NN: C[M,K] (=|+=) α·A[M,N]·B[N,K] — a broadcast FMA: C[i,:] += A[i,p]·B[p,:].</item>
/// <item>TN: C[N,K] (=|+=) α·A[M,N]ᵀ·B[M,K] — the same broadcast form with A read down its columns.</item>
/// </list>
/// Each is split into cache tiles run in parallel, each tile into a register-blocked micro-kernel
/// (NT: 4 rows × 4 columns of dot products with 512-bit vectors, 4 × 3 with 16 registers; NN/TN:
/// 6 rows × 2 vectors of outputs), generic over the vector width so the tails run the same code at
/// a narrower width.
/// </summary>
internal static unsafe partial class CpuKernels
{
    /// <summary>The widest vector (in floats) the kernels may use; tests lower it to reach the narrow paths.</summary>
    internal static int MaxVectorWidth { get; set; } = 16;

    // Tile sizes, tuned on a Zen 4 core (32 KiB L1d, 1 MiB L2) at T = 256, C = 896 / 4864:
    // NT: 128 rows of A × 48 rows of B, K in blocks of about 1024 (the micro-kernel's 4 A rows, 16 KiB, stay in L1).
    private const int NtRowBlock = 128, NtColBlock = 48, NtDepthBlock = 1024;
    // NN/TN: 144 output rows × 128 output columns, the reduction in blocks of 256; each [256, 2-vector]
    // B panel is reused by 24 micro-kernels from L1.
    private const int BcRowBlock = 144, BcColBlock = 128, BcDepthBlock = 256;
    // An NT product with K at most this is transposed into the broadcast form (dot products that
    // short would be all horizontal sums): the LoRA up-projection H·Bᵀ with K = r.
    private const int NtSmallDepth = 16;
    /// <summary>Multiply-adds below which a product stays on the calling thread.</summary>
    internal const long ParallelMinWork = 1L << 18;

    // ---------------------------------------------------------------- span entry points

    /// <summary>y[M,N] (=|+=) α·x[M,K]·w[N,K]ᵀ, all contiguous.</summary>
    public static void GemmNT(Span<float> y, ReadOnlySpan<float> x, ReadOnlySpan<float> w, int M, int N, int K, float alpha, bool accumulate, int threads)
    {
        Need(y, (long)M * N, nameof(y)); Need(x, (long)M * K, nameof(x)); Need(w, (long)N * K, nameof(w));
        fixed (float* py = y) fixed (float* px = x) fixed (float* pw = w)
            GemmNT(py, N, px, K, pw, K, M, N, K, alpha, accumulate, threads);
    }

    /// <summary>dx[M,K] (=|+=) α·dy[M,N]·w[N,K], all contiguous.</summary>
    public static void GemmNN(Span<float> dx, ReadOnlySpan<float> dy, ReadOnlySpan<float> w, int M, int N, int K, float alpha, bool accumulate, int threads)
    {
        Need(dx, (long)M * K, nameof(dx)); Need(dy, (long)M * N, nameof(dy)); Need(w, (long)N * K, nameof(w));
        fixed (float* pdx = dx) fixed (float* pdy = dy) fixed (float* pw = w)
            GemmNN(pdx, K, pdy, N, pw, K, M, N, K, alpha, accumulate, threads);
    }

    /// <summary>dw[N,K] (=|+=) α·dy[M,N]ᵀ·x[M,K], all contiguous.</summary>
    public static void GemmTN(Span<float> dw, ReadOnlySpan<float> dy, ReadOnlySpan<float> x, int M, int N, int K, float alpha, bool accumulate, int threads)
    {
        Need(dw, (long)N * K, nameof(dw)); Need(dy, (long)M * N, nameof(dy)); Need(x, (long)M * K, nameof(x));
        fixed (float* pdw = dw) fixed (float* pdy = dy) fixed (float* px = x)
            GemmTN(pdw, K, pdy, N, px, K, M, N, K, alpha, accumulate, threads);
    }

    // ---------------------------------------------------------------- pointer entry points

    /// <summary>C[M,N] (=|+=) α·A[M,K]·B[N,K]ᵀ with leading dimensions ldc, lda, ldb.</summary>
    internal static void GemmNT(float* c, int ldc, float* a, int lda, float* b, int ldb, int M, int N, int K, float alpha, bool accumulate, int threads)
    {
        if (M <= 0 || N <= 0)
            return;
        if (K <= 0)
        {
            if (!accumulate)
                ZeroRows(c, ldc, M, N);
            return;
        }
        if (K <= NtSmallDepth && N >= 2 * K)
        {
            // Bᵀ [K, N] is small (K·N floats): transpose it once, then C[i,:] += A[i,p]·Bᵀ[p,:].
            float[] bt = ArrayPool<float>.Shared.Rent(K * N);
            fixed (float* pbt = bt)
            {
                for (int j = 0; j < N; j++)
                    for (int p = 0; p < K; p++)
                        pbt[(long)p * N + j] = b[(long)j * ldb + p];
                Broadcast(c, ldc, a, lda, 1, pbt, N, M, N, K, alpha, accumulate, threads);
            }
            ArrayPool<float>.Shared.Return(bt);
            return;
        }

        int w = MaxVectorWidth;
        if (w >= 16 && K >= 16 && Vec512Ops.IsAccelerated)
            DotProducts<Vector512<float>, Vec512Ops>(c, ldc, a, lda, b, ldb, M, N, K, alpha, accumulate, threads);
        else if (w >= 8 && K >= 8 && Vec256Ops.IsAccelerated)
            DotProducts<Vector256<float>, Vec256Ops>(c, ldc, a, lda, b, ldb, M, N, K, alpha, accumulate, threads);
        else if (w >= 4 && K >= 4 && Vec128Ops.IsAccelerated)
            DotProducts<Vector128<float>, Vec128Ops>(c, ldc, a, lda, b, ldb, M, N, K, alpha, accumulate, threads);
        else
            DotProducts<float, ScalarOps>(c, ldc, a, lda, b, ldb, M, N, K, alpha, accumulate, threads);
    }

    /// <summary>C[M,K] (=|+=) α·A[M,N]·B[N,K] with leading dimensions ldc, lda, ldb.</summary>
    internal static void GemmNN(float* c, int ldc, float* a, int lda, float* b, int ldb, int M, int N, int K, float alpha, bool accumulate, int threads)
        // Output row i reads A's row i (stride lda), walking it with step 1.
        => Broadcast(c, ldc, a, lda, 1, b, ldb, M, K, N, alpha, accumulate, threads);

    /// <summary>C[N,K] (=|+=) α·A[M,N]ᵀ·B[M,K] with leading dimensions ldc, lda, ldb.</summary>
    internal static void GemmTN(float* c, int ldc, float* a, int lda, float* b, int ldb, int M, int N, int K, float alpha, bool accumulate, int threads)
        // Output row n reads A's column n (stride 1), walking it with step lda.
        => Broadcast(c, ldc, a, 1, lda, b, ldb, N, K, M, alpha, accumulate, threads);

    // ---------------------------------------------------------------- NT: dot products

    private static void DotProducts<TV, TOps>(float* c, int ldc, float* a, int lda, float* b, int ldb, int M, int N, int K, float alpha, bool accumulate, int threads)
        where TV : struct where TOps : IVecOps<TV>
    {
        int rowBlock = NtRowBlock;
        int colTiles = Ceil(N, NtColBlock);
        while (threads > 1 && rowBlock > 4 && Ceil(M, rowBlock) * colTiles < 4 * threads)
            rowBlock /= 2;
        int rowTiles = Ceil(M, rowBlock);

        // Split K into equal blocks of at most about NtDepthBlock, each a multiple of the width.
        int depthBlocks = Ceil(K, NtDepthBlock);
        int depth = Math.Min(K, Ceil(Ceil(K, depthBlocks), TOps.Width) * TOps.Width);

        For(rowTiles * colTiles, threads, (long)M * N * K, new DotTiles<TV, TOps>(c, ldc, a, lda, b, ldb, M, N, K, alpha, accumulate, rowBlock, colTiles, depth));
    }

    /// <summary>One [rowBlock, NtColBlock] tile of an NT product, K in blocks of depth.</summary>
    private readonly struct DotTiles<TV, TOps>(float* c, int ldc, float* a, int lda, float* b, int ldb, int M, int N, int K, float alpha, bool accumulate, int rowBlock, int colTiles, int depth) : IParallelBody where TV : struct where TOps : IVecOps<TV>
    {
        public void Run(int tile)
        {
            int i0 = tile / colTiles * rowBlock, j0 = tile % colTiles * NtColBlock;
            int i1 = Math.Min(M, i0 + rowBlock), j1 = Math.Min(N, j0 + NtColBlock);
            for (int k0 = 0; k0 < K; k0 += depth)
            {
                int kn = Math.Min(depth, K - k0);
                bool add = accumulate || k0 > 0;
                for (int i = i0; i < i1; i += 4)
                {
                    if (TOps.Width >= 16)
                        // 512-bit: 32 registers hold a 4×4 block.
                        for (int j = j0; j < j1; j += 4)
                            DotMicro4x4<TV, TOps>(c + (long)i * ldc + j, ldc, a + (long)i * lda + k0, lda, Math.Min(4, i1 - i),
                                                  b + (long)j * ldb + k0, ldb, Math.Min(4, j1 - j), kn, alpha, add);
                    else
                        for (int j = j0; j < j1; j += 3)
                            DotMicro<TV, TOps>(c + (long)i * ldc + j, ldc, a + (long)i * lda + k0, lda, Math.Min(4, i1 - i),
                                               b + (long)j * ldb + k0, ldb, Math.Min(3, j1 - j), kn, alpha, add);
                }
            }
        }
    }

    /// <summary>
    /// C[r, j] (=|+=) α·Σₖ A[r, k]·B[j, k] for r &lt; rows ≤ 4, j &lt; cols ≤ 3. Missing rows and columns
    /// alias the first ones (computed, never stored), so one kernel covers the tails.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotMicro<TV, TOps>(float* c, int ldc, float* a, int lda, int rows, float* b, int ldb, int cols, int kn, float alpha, bool add)
        where TV : struct where TOps : IVecOps<TV>
    {
        float* a0 = a, a1 = rows > 1 ? a0 + lda : a0, a2 = rows > 2 ? a1 + lda : a0, a3 = rows > 3 ? a2 + lda : a0;
        float* b0 = b, b1 = cols > 1 ? b0 + ldb : b0, b2 = cols > 2 ? b1 + ldb : b0;
        TV c00 = TOps.Zero, c01 = TOps.Zero, c02 = TOps.Zero;
        TV c10 = TOps.Zero, c11 = TOps.Zero, c12 = TOps.Zero;
        TV c20 = TOps.Zero, c21 = TOps.Zero, c22 = TOps.Zero;
        TV c30 = TOps.Zero, c31 = TOps.Zero, c32 = TOps.Zero;
        int width = TOps.Width, k = 0, kVec = kn - width;
        for (; k <= kVec; k += width)
        {
            TV w0 = TOps.Load(b0 + k), w1 = TOps.Load(b1 + k), w2 = TOps.Load(b2 + k);
            TV x = TOps.Load(a0 + k);
            c00 = TOps.MulAdd(x, w0, c00); c01 = TOps.MulAdd(x, w1, c01); c02 = TOps.MulAdd(x, w2, c02);
            x = TOps.Load(a1 + k);
            c10 = TOps.MulAdd(x, w0, c10); c11 = TOps.MulAdd(x, w1, c11); c12 = TOps.MulAdd(x, w2, c12);
            x = TOps.Load(a2 + k);
            c20 = TOps.MulAdd(x, w0, c20); c21 = TOps.MulAdd(x, w1, c21); c22 = TOps.MulAdd(x, w2, c22);
            x = TOps.Load(a3 + k);
            c30 = TOps.MulAdd(x, w0, c30); c31 = TOps.MulAdd(x, w1, c31); c32 = TOps.MulAdd(x, w2, c32);
        }
        // Column j's four row sums in one 128-bit vector, then the scalar tail of K.
        Vector128<float> s0 = TOps.Sum4(c00, c10, c20, c30), s1 = TOps.Sum4(c01, c11, c21, c31), s2 = TOps.Sum4(c02, c12, c22, c32);
        for (; k < kn; k++)
        {
            var x = Vector128.Create(a0[k], a1[k], a2[k], a3[k]);
            s0 += x * b0[k];
            s1 += x * b1[k];
            s2 += x * b2[k];
        }
        PutRow(c, cols, s0[0], s1[0], s2[0], alpha, add);
        if (rows > 1) PutRow(c + ldc, cols, s0[1], s1[1], s2[1], alpha, add);
        if (rows > 2) PutRow(c + 2 * ldc, cols, s0[2], s1[2], s2[2], alpha, add);
        if (rows > 3) PutRow(c + 3 * ldc, cols, s0[3], s1[3], s2[3], alpha, add);
    }

    /// <summary>As <see cref="DotMicro{TV, TOps}"/> with 4 columns (16 accumulators), for 32-register machines.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotMicro4x4<TV, TOps>(float* c, int ldc, float* a, int lda, int rows, float* b, int ldb, int cols, int kn, float alpha, bool add)
        where TV : struct where TOps : IVecOps<TV>
    {
        float* a0 = a, a1 = rows > 1 ? a0 + lda : a0, a2 = rows > 2 ? a1 + lda : a0, a3 = rows > 3 ? a2 + lda : a0;
        float* b0 = b, b1 = cols > 1 ? b0 + ldb : b0, b2 = cols > 2 ? b1 + ldb : b0, b3 = cols > 3 ? b2 + ldb : b0;
        TV c00 = TOps.Zero, c01 = TOps.Zero, c02 = TOps.Zero, c03 = TOps.Zero;
        TV c10 = TOps.Zero, c11 = TOps.Zero, c12 = TOps.Zero, c13 = TOps.Zero;
        TV c20 = TOps.Zero, c21 = TOps.Zero, c22 = TOps.Zero, c23 = TOps.Zero;
        TV c30 = TOps.Zero, c31 = TOps.Zero, c32 = TOps.Zero, c33 = TOps.Zero;
        int width = TOps.Width, k = 0, kVec = kn - width;
        for (; k <= kVec; k += width)
        {
            TV w0 = TOps.Load(b0 + k), w1 = TOps.Load(b1 + k), w2 = TOps.Load(b2 + k), w3 = TOps.Load(b3 + k);
            TV x = TOps.Load(a0 + k);
            c00 = TOps.MulAdd(x, w0, c00); c01 = TOps.MulAdd(x, w1, c01); c02 = TOps.MulAdd(x, w2, c02); c03 = TOps.MulAdd(x, w3, c03);
            x = TOps.Load(a1 + k);
            c10 = TOps.MulAdd(x, w0, c10); c11 = TOps.MulAdd(x, w1, c11); c12 = TOps.MulAdd(x, w2, c12); c13 = TOps.MulAdd(x, w3, c13);
            x = TOps.Load(a2 + k);
            c20 = TOps.MulAdd(x, w0, c20); c21 = TOps.MulAdd(x, w1, c21); c22 = TOps.MulAdd(x, w2, c22); c23 = TOps.MulAdd(x, w3, c23);
            x = TOps.Load(a3 + k);
            c30 = TOps.MulAdd(x, w0, c30); c31 = TOps.MulAdd(x, w1, c31); c32 = TOps.MulAdd(x, w2, c32); c33 = TOps.MulAdd(x, w3, c33);
        }
        Vector128<float> s0 = TOps.Sum4(c00, c10, c20, c30), s1 = TOps.Sum4(c01, c11, c21, c31);
        Vector128<float> s2 = TOps.Sum4(c02, c12, c22, c32), s3 = TOps.Sum4(c03, c13, c23, c33);
        for (; k < kn; k++)
        {
            var x = Vector128.Create(a0[k], a1[k], a2[k], a3[k]);
            s0 += x * b0[k];
            s1 += x * b1[k];
            s2 += x * b2[k];
            s3 += x * b3[k];
        }
        // Transpose so that each vector holds one row's four columns.
        (s0, s1, s2, s3) = Transpose4(s0, s1, s2, s3);
        PutRow4(c, cols, s0, alpha, add);
        if (rows > 1) PutRow4(c + ldc, cols, s1, alpha, add);
        if (rows > 2) PutRow4(c + 2 * ldc, cols, s2, alpha, add);
        if (rows > 3) PutRow4(c + 3 * ldc, cols, s3, alpha, add);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector128<float>, Vector128<float>, Vector128<float>, Vector128<float>) Transpose4(
        Vector128<float> c0, Vector128<float> c1, Vector128<float> c2, Vector128<float> c3)
        => (Vector128.Create(c0[0], c1[0], c2[0], c3[0]), Vector128.Create(c0[1], c1[1], c2[1], c3[1]),
            Vector128.Create(c0[2], c1[2], c2[2], c3[2]), Vector128.Create(c0[3], c1[3], c2[3], c3[3]));

    /// <summary>c[0..cols) (=|+=) α·s[0..cols), cols ≤ 4.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PutRow4(float* c, int cols, Vector128<float> s, float alpha, bool add)
    {
        s *= alpha;
        if (cols == 4)
            (add ? Vector128.Load(c) + s : s).Store(c);
        else
            for (int j = 0; j < cols; j++)
                c[j] = add ? c[j] + s[j] : s[j];
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PutRow(float* c, int cols, float s0, float s1, float s2, float alpha, bool add)
    {
        c[0] = add ? c[0] + alpha * s0 : alpha * s0;
        if (cols > 1) c[1] = add ? c[1] + alpha * s1 : alpha * s1;
        if (cols > 2) c[2] = add ? c[2] + alpha * s2 : alpha * s2;
    }

    // ---------------------------------------------------------------- NN / TN: broadcast FMA

    /// <summary>
    /// C[r, q] (=|+=) α·Σₚ A(r, p)·B[p, q] for r &lt; R, q &lt; cols, p &lt; P, where A(r, p) =
    /// a[r·aRow + p·aStep]: NN walks A's rows (aRow = lda, aStep = 1), TN its columns (aRow = 1, aStep = lda).
    /// </summary>
    private static void Broadcast(float* c, int ldc, float* a, int aRow, int aStep, float* b, int ldb, int R, int cols, int P, float alpha, bool accumulate, int threads)
    {
        if (R <= 0 || cols <= 0)
            return;
        if (P <= 0)
        {
            if (!accumulate)
                ZeroRows(c, ldc, R, cols);
            return;
        }

        int rowBlock = BcRowBlock;
        int colTiles = Ceil(cols, BcColBlock);
        while (threads > 1 && rowBlock > 6 && Ceil(R, rowBlock) * colTiles < 4 * threads)
            rowBlock = Math.Max(6, rowBlock / 12 * 6); // halve, keeping whole micro-kernels
        int rowTiles = Ceil(R, rowBlock);

        For(rowTiles * colTiles, threads, (long)R * cols * P, new BroadcastTiles(c, ldc, a, aRow, aStep, b, ldb, R, cols, P, alpha, accumulate, rowBlock, colTiles));
    }

    /// <summary>One [rowBlock, BcColBlock] tile of a broadcast (NN/TN) product.</summary>
    private readonly struct BroadcastTiles(float* c, int ldc, float* a, int aRow, int aStep, float* b, int ldb, int R, int cols, int P, float alpha, bool accumulate, int rowBlock, int colTiles) : IParallelBody
    {
        public void Run(int tile)
        {
            int r0 = tile / colTiles * rowBlock, q0 = tile % colTiles * BcColBlock;
            int r1 = Math.Min(R, r0 + rowBlock), q1 = Math.Min(cols, q0 + BcColBlock);
            for (int p0 = 0; p0 < P; p0 += BcDepthBlock)
            {
                int pn = Math.Min(BcDepthBlock, P - p0);
                bool add = accumulate || p0 > 0;
                float* ap = a + (long)p0 * aStep, bp = b + (long)p0 * ldb;
                // Widest vectors first; each narrower width picks up the columns left over.
                int q = q0, w = MaxVectorWidth;
                if (w >= 16 && Vec512Ops.IsAccelerated)
                    q = BroadcastColumns<Vector512<float>, Vec512Ops>(c, ldc, ap, aRow, aStep, bp, ldb, r0, r1, q, q1, pn, alpha, add);
                if (w >= 8 && Vec256Ops.IsAccelerated)
                    q = BroadcastColumns<Vector256<float>, Vec256Ops>(c, ldc, ap, aRow, aStep, bp, ldb, r0, r1, q, q1, pn, alpha, add);
                if (w >= 4 && Vec128Ops.IsAccelerated)
                    q = BroadcastColumns<Vector128<float>, Vec128Ops>(c, ldc, ap, aRow, aStep, bp, ldb, r0, r1, q, q1, pn, alpha, add);
                BroadcastColumns<float, ScalarOps>(c, ldc, ap, aRow, aStep, bp, ldb, r0, r1, q, q1, pn, alpha, add);
            }
        }
    }

    /// <summary>Columns [q, q1) in steps of 2 then 1 vectors, every row of the tile; returns the first column not done.</summary>
    private static int BroadcastColumns<TV, TOps>(float* c, int ldc, float* a, int aRow, int aStep, float* b, int ldb, int r0, int r1, int q, int q1, int pn, float alpha, bool add)
        where TV : struct where TOps : IVecOps<TV>
    {
        int width = TOps.Width;
        // Column-panel outer, rows inner: the B panel [pn, 2 vectors] stays in L1 across the rows.
        for (; q + 2 * width <= q1; q += 2 * width)
            for (int r = r0; r < r1; r += 6)
                BroadcastMicro2<TV, TOps>(c + (long)r * ldc + q, ldc, a + (long)r * aRow, aRow, aStep, Math.Min(6, r1 - r), b + q, ldb, pn, alpha, add);
        if (q + width <= q1)
        {
            for (int r = r0; r < r1; r += 6)
                BroadcastMicro1<TV, TOps>(c + (long)r * ldc + q, ldc, a + (long)r * aRow, aRow, aStep, Math.Min(6, r1 - r), b + q, ldb, pn, alpha, add);
            q += width;
        }
        return q;
    }

    /// <summary>C[r, 0..2W) (=|+=) α·Σₚ A(r, p)·B[p, 0..2W) for r &lt; rows ≤ 6 (missing rows alias row 0).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void BroadcastMicro2<TV, TOps>(float* c, int ldc, float* a, int aRow, int aStep, int rows, float* b, int ldb, int pn, float alpha, bool add)
        where TV : struct where TOps : IVecOps<TV>
    {
        float* a0 = a, a1 = rows > 1 ? a0 + aRow : a0, a2 = rows > 2 ? a1 + aRow : a0;
        float* a3 = rows > 3 ? a2 + aRow : a0, a4 = rows > 4 ? a3 + aRow : a0, a5 = rows > 5 ? a4 + aRow : a0;
        TV c00 = TOps.Zero, c01 = TOps.Zero, c10 = TOps.Zero, c11 = TOps.Zero, c20 = TOps.Zero, c21 = TOps.Zero;
        TV c30 = TOps.Zero, c31 = TOps.Zero, c40 = TOps.Zero, c41 = TOps.Zero, c50 = TOps.Zero, c51 = TOps.Zero;
        int width = TOps.Width;
        nint off = 0;
        for (int p = 0; p < pn; p++, off += aStep, b += ldb)
        {
            TV b0 = TOps.Load(b), b1 = TOps.Load(b + width);
            TV s = TOps.Splat(a0[off]); c00 = TOps.MulAdd(s, b0, c00); c01 = TOps.MulAdd(s, b1, c01);
            s = TOps.Splat(a1[off]); c10 = TOps.MulAdd(s, b0, c10); c11 = TOps.MulAdd(s, b1, c11);
            s = TOps.Splat(a2[off]); c20 = TOps.MulAdd(s, b0, c20); c21 = TOps.MulAdd(s, b1, c21);
            s = TOps.Splat(a3[off]); c30 = TOps.MulAdd(s, b0, c30); c31 = TOps.MulAdd(s, b1, c31);
            s = TOps.Splat(a4[off]); c40 = TOps.MulAdd(s, b0, c40); c41 = TOps.MulAdd(s, b1, c41);
            s = TOps.Splat(a5[off]); c50 = TOps.MulAdd(s, b0, c50); c51 = TOps.MulAdd(s, b1, c51);
        }
        TV va = TOps.Splat(alpha);
        Put<TV, TOps>(c, c00, va, add); Put<TV, TOps>(c + width, c01, va, add);
        if (rows > 1) { Put<TV, TOps>(c + ldc, c10, va, add); Put<TV, TOps>(c + ldc + width, c11, va, add); }
        if (rows > 2) { Put<TV, TOps>(c + 2 * ldc, c20, va, add); Put<TV, TOps>(c + 2 * ldc + width, c21, va, add); }
        if (rows > 3) { Put<TV, TOps>(c + 3 * ldc, c30, va, add); Put<TV, TOps>(c + 3 * ldc + width, c31, va, add); }
        if (rows > 4) { Put<TV, TOps>(c + 4 * ldc, c40, va, add); Put<TV, TOps>(c + 4 * ldc + width, c41, va, add); }
        if (rows > 5) { Put<TV, TOps>(c + 5 * ldc, c50, va, add); Put<TV, TOps>(c + 5 * ldc + width, c51, va, add); }
    }

    /// <summary>C[r, 0..W) (=|+=) α·Σₚ A(r, p)·B[p, 0..W) for r &lt; rows ≤ 6.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void BroadcastMicro1<TV, TOps>(float* c, int ldc, float* a, int aRow, int aStep, int rows, float* b, int ldb, int pn, float alpha, bool add)
        where TV : struct where TOps : IVecOps<TV>
    {
        float* a0 = a, a1 = rows > 1 ? a0 + aRow : a0, a2 = rows > 2 ? a1 + aRow : a0;
        float* a3 = rows > 3 ? a2 + aRow : a0, a4 = rows > 4 ? a3 + aRow : a0, a5 = rows > 5 ? a4 + aRow : a0;
        TV c0 = TOps.Zero, c1 = TOps.Zero, c2 = TOps.Zero, c3 = TOps.Zero, c4 = TOps.Zero, c5 = TOps.Zero;
        nint off = 0;
        for (int p = 0; p < pn; p++, off += aStep, b += ldb)
        {
            TV b0 = TOps.Load(b);
            c0 = TOps.MulAdd(TOps.Splat(a0[off]), b0, c0);
            c1 = TOps.MulAdd(TOps.Splat(a1[off]), b0, c1);
            c2 = TOps.MulAdd(TOps.Splat(a2[off]), b0, c2);
            c3 = TOps.MulAdd(TOps.Splat(a3[off]), b0, c3);
            c4 = TOps.MulAdd(TOps.Splat(a4[off]), b0, c4);
            c5 = TOps.MulAdd(TOps.Splat(a5[off]), b0, c5);
        }
        TV va = TOps.Splat(alpha);
        Put<TV, TOps>(c, c0, va, add);
        if (rows > 1) Put<TV, TOps>(c + ldc, c1, va, add);
        if (rows > 2) Put<TV, TOps>(c + 2 * ldc, c2, va, add);
        if (rows > 3) Put<TV, TOps>(c + 3 * ldc, c3, va, add);
        if (rows > 4) Put<TV, TOps>(c + 4 * ldc, c4, va, add);
        if (rows > 5) Put<TV, TOps>(c + 5 * ldc, c5, va, add);
    }

    /// <summary>*c = α·v, or *c += α·v.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Put<TV, TOps>(float* c, TV v, TV alpha, bool add)
        where TV : struct where TOps : IVecOps<TV>
        => TOps.Store(c, add ? TOps.MulAdd(alpha, v, TOps.Load(c)) : TOps.Mul(alpha, v));

    // ---------------------------------------------------------------- helpers

    private static void ZeroRows(float* c, int ldc, int rows, int cols)
    {
        for (int i = 0; i < rows; i++)
            new Span<float>(c + (long)i * ldc, cols).Clear();
    }

    private static int Ceil(int n, int d) => (n + d - 1) / d;
}
