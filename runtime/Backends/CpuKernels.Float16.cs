using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// A 16-bit weight as the kernels read it: a pointer to its bits (pinned by
/// <see cref="CpuKernels.Float16Pin"/>), its dimensions and its format. A panel converts row by row:
/// BF16 is the upper half of a float32 (widen, shift left by 16), F16 goes through
/// <see cref="CpuKernels.HalfToSingle"/>; both are exact.
/// </summary>
internal readonly unsafe struct Float16Matrix(ushort* bits, int rows, int columns, Float16Format format) : IPanelWeight
{
    public int Rows => rows;
    public int Columns => columns;
    public Float16Format Format => format;

    /// <summary>The bits [Rows, Columns]; null for the default value (no weight).</summary>
    public ushort* Bits => bits;

    public void Dequantize(int row0, int count, int col0, int cols, float* dst, int ldd)
    {
        for (int r = 0; r < count; r++)
            CpuKernels.Float16ToSingle(bits + (long)(row0 + r) * columns + col0, dst + (long)r * ldd, cols, format);
    }
}

/// <summary>
/// The kernels with a 16-bit (F16 or BF16) weight used as stored: the products run on
/// <see cref="Float16Matrix"/> panels (<c>CpuKernels.Panels.cs</c>), the embedding converts the rows
/// it gathers and the LM head its chunks' panels. No float32 copy of the weight is made.
/// </summary>
internal static unsafe partial class CpuKernels
{
    /// <summary>x[t, :] = table[tokens[t], :] for t &lt; T, converting only the gathered rows.</summary>
    public static void EmbeddingForward(Span<float> x, ReadOnlySpan<int> tokens, Float16Weight table, int T, int C)
    {
        Need(x, (long)T * C, nameof(x));
        if (table.Columns != C)
            throw new ArgumentException($"'{table.Name}' has rows of {table.Columns}, C is {C}.", nameof(table));
        SequenceChecks.Tokens(tokens, T, table.Rows);
        using var pin = new Float16Pin(table);
        fixed (float* px = x)
            for (int t = 0; t < T; t++)
                pin.Matrix.Dequantize(tokens[t], 1, 0, C, px + (long)t * C, C);
    }

    /// <summary>y [T, dout] = x [T, din]·wᵀ (+ bias) with a 16-bit w [dout, din].</summary>
    public static void LinearForward(Span<float> y, ReadOnlySpan<float> x, Float16Weight w, ReadOnlySpan<float> bias, int T, int din, int dout, int threads)
    {
        CheckShape(w, dout, din);
        Need(y, (long)T * dout, nameof(y)); Need(x, (long)T * din, nameof(x));
        using (var pin = new Float16Pin(w))
        fixed (float* py = y) fixed (float* px = x)
            GemmNTPanels(py, dout, px, din, pin.Matrix, 0, T, dout, 1f, false, threads);
        AddBias(y, bias, T, dout);
    }

    /// <summary>dx [T, din] (=|+=) dy [T, dout]·w with a 16-bit w [dout, din].</summary>
    public static void LinearBackwardInput(Span<float> dx, ReadOnlySpan<float> dy, Float16Weight w, int T, int din, int dout, bool accumulate, int threads)
    {
        CheckShape(w, dout, din);
        Need(dx, (long)T * din, nameof(dx)); Need(dy, (long)T * dout, nameof(dy));
        using var pin = new Float16Pin(w);
        fixed (float* pdx = dx) fixed (float* pdy = dy)
            GemmNNPanels(pdx, din, pdy, dout, pin.Matrix, 0, T, dout, 1f, accumulate, threads);
    }

    /// <summary>
    /// <see cref="LmHeadCrossEntropy(Span{float}, Span{float}, ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{int}, int, int, int, int, float, int)"/>
    /// with a 16-bit w [V, C] (the tied embedding of a BF16 model): each vocabulary chunk's products
    /// convert the chunk's rows of w a panel at a time.
    /// </summary>
    public static float LmHeadCrossEntropy(Span<float> dx, Span<float> logits, ReadOnlySpan<float> x, Float16Weight w, ReadOnlySpan<int> targets,
                                           int T, int C, int V, int chunk, float softcap, int threads)
    {
        if (w.Columns != C || w.Rows < V)
            throw new ArgumentException($"'{w.Name}' is [{w.Rows}, {w.Columns}], the LM head needs [{V}, {C}].", nameof(w));
        using var pin = new Float16Pin(w);
        return LmHeadCrossEntropy(dx, logits, x, new HeadWeight(pin.Matrix), targets, T, C, V, chunk, softcap, threads);
    }

    /// <summary>The first <c>dst.Length</c> values of a 16-bit vector (a norm weight, a bias) as float32.</summary>
    public static void Widen(Float16Weight w, Span<float> dst)
    {
        if (dst.Length > w.Elements)
            throw new ArgumentException($"'{w.Name}' has {w.Elements} values, {dst.Length} were asked for.", nameof(dst));
        using var pin = new Float16Pin(w);
        fixed (float* pd = dst)
            Float16ToSingle(pin.Matrix.Bits, pd, dst.Length, w.Format);
    }

    private static void CheckShape(Float16Weight w, int dout, int din)
    {
        if (w.Rows != dout || w.Columns != din)
            throw new ArgumentException($"'{w.Name}' is [{w.Rows}, {w.Columns}], the kernel needs [{dout}, {din}].", nameof(w));
    }

    /// <summary>n 16-bit values of <paramref name="format"/> to float32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void Float16ToSingle(ushort* src, float* dst, int n, Float16Format format)
    {
        if (format == Float16Format.BF16)
            BFloat16ToSingle(src, dst, n);
        else
            HalfToSingle((Half*)src, dst, n);
    }

    /// <summary>
    /// n BF16 values to float32, 32, 16 or 8 at a time: each is the upper half of its float32, so
    /// widening to 32 bits and shifting left by 16 is the exact conversion (NaN and infinity included).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void BFloat16ToSingle(ushort* src, float* dst, int n)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated && MaxVectorWidth >= 16)
            for (; i <= n - 32; i += 32)
            {
                var h = Vector512.Load(src + i);
                (Vector512.WidenLower(h) << 16).AsSingle().Store(dst + i);
                (Vector512.WidenUpper(h) << 16).AsSingle().Store(dst + i + 16);
            }
        if (Vector256.IsHardwareAccelerated && MaxVectorWidth >= 8)
            for (; i <= n - 16; i += 16)
            {
                var h = Vector256.Load(src + i);
                (Vector256.WidenLower(h) << 16).AsSingle().Store(dst + i);
                (Vector256.WidenUpper(h) << 16).AsSingle().Store(dst + i + 8);
            }
        if (Vector128.IsHardwareAccelerated && MaxVectorWidth >= 4)
            for (; i <= n - 8; i += 8)
            {
                var h = Vector128.Load(src + i);
                (Vector128.WidenLower(h) << 16).AsSingle().Store(dst + i);
                (Vector128.WidenUpper(h) << 16).AsSingle().Store(dst + i + 4);
            }
        for (; i < n; i++)
            dst[i] = BitConverter.UInt32BitsToSingle((uint)src[i] << 16);
    }

    /// <summary>Pins a <see cref="Float16Weight"/>'s bits (free for a file mapping) for the length of a kernel.</summary>
    internal readonly struct Float16Pin : IDisposable
    {
        private readonly MemoryHandle _bits;

        public Float16Pin(Float16Weight w)
        {
            _bits = w.Bits.Pin();
            Matrix = new Float16Matrix((ushort*)_bits.Pointer, w.Rows, w.Columns, w.Format);
        }

        public Float16Matrix Matrix { get; }

        public void Dispose() => _bits.Dispose();
    }
}
