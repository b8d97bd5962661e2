using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// A 4-bit weight as the kernels read it: pointers to its packed words, scales and biases (pinned
/// by <see cref="CpuKernels.Q4Pin"/>), and its dimensions.
/// </summary>
internal readonly unsafe struct Q4Matrix(uint* packed, Half* scales, Half* biases, int rows, int columns, int groupSize) : IPanelWeight
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
/// The kernels with a 4-bit weight: the products run on <see cref="Q4Matrix"/> panels
/// (<c>CpuKernels.Panels.cs</c>); the embedding dequantizes the rows it gathers; decoding's few rows
/// take the nibble dot products below, on the packed words themselves.
/// </summary>
internal static unsafe partial class CpuKernels
{
    // ================================================================ kernels with a 4-bit weight

    /// <summary>x[t, :] = table[tokens[t], :] for t &lt; T, dequantizing only the gathered rows.</summary>
    public static void EmbeddingForward(Span<float> x, ReadOnlySpan<int> tokens, Q4Weight table, int T, int C)
    {
        Need(x, (long)T * C, nameof(x));
        if (table.Columns != C)
            throw new ArgumentException($"'{table.Name}' has rows of {table.Columns}, C is {C}.", nameof(table));
        SequenceChecks.Tokens(tokens, T, table.Rows);
        for (int t = 0; t < T; t++)
            table.DequantizeRow(tokens[t], x.Slice(t * C, C));
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
                GemmNTPanels(py, dout, px, din, pin.Matrix, 0, T, dout, 1f, false, threads);
        }
        AddBias(y, bias, T, dout);
    }

    /// <summary>dx [T, din] (=|+=) dy [T, dout]·w with a 4-bit w [dout, din].</summary>
    public static void LinearBackwardInput(Span<float> dx, ReadOnlySpan<float> dy, Q4Weight w, int T, int din, int dout, bool accumulate, int threads)
    {
        CheckShape(w, dout, din);
        Need(dx, (long)T * din, nameof(dx)); Need(dy, (long)T * dout, nameof(dy));
        using var pin = new Q4Pin(w);
        fixed (float* pdx = dx) fixed (float* pdy = dy)
            GemmNNPanels(pdx, din, pdy, dout, pin.Matrix, 0, T, dout, 1f, accumulate, threads);
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
        return LmHeadCrossEntropy(dx, logits, x, new HeadWeight(pin.Matrix), targets, T, C, V, chunk, softcap, threads);
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

}
