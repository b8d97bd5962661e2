using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// The few vector operations the GEMM micro-kernels, the attention tiles' row passes and the 4-bit
/// matrix-vector product need, as static abstract members so one generic kernel is specialised by the
/// JIT for each width: Vector512, Vector256, Vector128, and a scalar "vector" of one float that
/// finishes the tails.
/// </summary>
internal unsafe interface IVecOps<TV> where TV : struct
{
    /// <summary>Floats per vector.</summary>
    static abstract int Width { get; }

    /// <summary>Whether this width runs in hardware here (the scalar one always does).</summary>
    static abstract bool IsAccelerated { get; }

    static abstract TV Zero { get; }
    static abstract TV Load(float* p);
    static abstract void Store(float* p, TV v);
    static abstract TV Splat(float x);

    /// <summary>a·b + c, one FMA where the hardware has it.</summary>
    static abstract TV MulAdd(TV a, TV b, TV c);
    static abstract TV Mul(TV a, TV b);

    /// <summary>The sum of the lanes.</summary>
    static abstract float Sum(TV v);

    /// <summary>(Σa, Σb, Σc, Σd): four horizontal sums sharing their shuffles.</summary>
    static abstract Vector128<float> Sum4(TV a, TV b, TV c, TV d);

    static abstract TV Add(TV a, TV b);
    static abstract TV Subtract(TV a, TV b);
    static abstract TV Max(TV a, TV b);

    /// <summary>The largest lane.</summary>
    static abstract float MaxAcross(TV v);

    /// <summary>e^x lane by lane (the runtime's vectorized exp).</summary>
    static abstract TV Exp(TV v);

    /// <summary>
    /// Nibble k &lt; 7 of Width consecutive 32-bit words left where it lies: lane i is
    /// words[i] &amp; 15·16^k as a float, exactly q·16^k for the 4-bit level q of column 8i + k of the
    /// words' 8·Width columns (below 2^31, so a signed conversion). One AND and one conversion.
    /// </summary>
    static abstract TV NibbleInPlace(uint* words, int k);

    /// <summary>Nibble 7 of Width consecutive 32-bit words: lane i is words[i] &gt;&gt; 28 as a float.</summary>
    static abstract TV TopNibble(uint* words);

    /// <summary>The Width floats at p permuted: lane i is p[index[i]], every index in [0, Width).</summary>
    static abstract TV LoadPermuted(float* p, int* index);
}

internal unsafe struct Vec512Ops : IVecOps<Vector512<float>>
{
    public static int Width => Vector512<float>.Count;
    public static bool IsAccelerated => Vector512.IsHardwareAccelerated;
    public static Vector512<float> Zero => Vector512<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Load(float* p) => Vector512.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector512<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Splat(float x) => Vector512.Create(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> MulAdd(Vector512<float> a, Vector512<float> b, Vector512<float> c) => Vector512.MultiplyAddEstimate(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Mul(Vector512<float> a, Vector512<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sum(Vector512<float> v) => Vector512.Sum(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Sum4(Vector512<float> a, Vector512<float> b, Vector512<float> c, Vector512<float> d)
        => Vec256Ops.Sum4(a.GetLower() + a.GetUpper(), b.GetLower() + b.GetUpper(), c.GetLower() + c.GetUpper(), d.GetLower() + d.GetUpper());
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Add(Vector512<float> a, Vector512<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Subtract(Vector512<float> a, Vector512<float> b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Max(Vector512<float> a, Vector512<float> b) => Vector512.Max(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float MaxAcross(Vector512<float> v) => Vec256Ops.MaxAcross(Vector256.Max(v.GetLower(), v.GetUpper()));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Exp(Vector512<float> v) => Vector512.Exp(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> NibbleInPlace(uint* words, int k) => Vector512.ConvertToSingle((Vector512.Load(words) & Vector512.Create(15u << (4 * k))).AsInt32());
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> TopNibble(uint* words) => Vector512.ConvertToSingle((Vector512.Load(words) >>> 28).AsInt32());
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> LoadPermuted(float* p, int* index) => Vector512.ShuffleNative(Vector512.Load(p), Vector512.Load(index));
}

internal unsafe struct Vec256Ops : IVecOps<Vector256<float>>
{
    public static int Width => Vector256<float>.Count;
    public static bool IsAccelerated => Vector256.IsHardwareAccelerated;
    public static Vector256<float> Zero => Vector256<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Load(float* p) => Vector256.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector256<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Splat(float x) => Vector256.Create(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> MulAdd(Vector256<float> a, Vector256<float> b, Vector256<float> c) => Vector256.MultiplyAddEstimate(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Mul(Vector256<float> a, Vector256<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sum(Vector256<float> v) => Vector256.Sum(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Sum4(Vector256<float> a, Vector256<float> b, Vector256<float> c, Vector256<float> d)
    {
        if (!Avx.IsSupported)
            return Vec128Ops.Sum4(a.GetLower() + a.GetUpper(), b.GetLower() + b.GetUpper(), c.GetLower() + c.GetUpper(), d.GetLower() + d.GetUpper());
        // Pairwise adds within each 128-bit lane leave [Σa, Σb, Σc, Σd] per half; add the halves.
        var abcd = Avx.HorizontalAdd(Avx.HorizontalAdd(a, b), Avx.HorizontalAdd(c, d));
        return abcd.GetLower() + abcd.GetUpper();
    }
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Add(Vector256<float> a, Vector256<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Subtract(Vector256<float> a, Vector256<float> b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Max(Vector256<float> a, Vector256<float> b) => Vector256.Max(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float MaxAcross(Vector256<float> v) => Vec128Ops.MaxAcross(Vector128.Max(v.GetLower(), v.GetUpper()));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Exp(Vector256<float> v) => Vector256.Exp(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> NibbleInPlace(uint* words, int k) => Vector256.ConvertToSingle((Vector256.Load(words) & Vector256.Create(15u << (4 * k))).AsInt32());
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> TopNibble(uint* words) => Vector256.ConvertToSingle((Vector256.Load(words) >>> 28).AsInt32());
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> LoadPermuted(float* p, int* index) => Vector256.ShuffleNative(Vector256.Load(p), Vector256.Load(index));
}

internal unsafe struct Vec128Ops : IVecOps<Vector128<float>>
{
    public static int Width => Vector128<float>.Count;
    public static bool IsAccelerated => Vector128.IsHardwareAccelerated;
    public static Vector128<float> Zero => Vector128<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Load(float* p) => Vector128.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector128<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Splat(float x) => Vector128.Create(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> MulAdd(Vector128<float> a, Vector128<float> b, Vector128<float> c) => Vector128.MultiplyAddEstimate(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Mul(Vector128<float> a, Vector128<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sum(Vector128<float> v) => Vector128.Sum(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Sum4(Vector128<float> a, Vector128<float> b, Vector128<float> c, Vector128<float> d)
        => Sse3.IsSupported
            ? Sse3.HorizontalAdd(Sse3.HorizontalAdd(a, b), Sse3.HorizontalAdd(c, d))
            : Vector128.Create(Vector128.Sum(a), Vector128.Sum(b), Vector128.Sum(c), Vector128.Sum(d));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Add(Vector128<float> a, Vector128<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Subtract(Vector128<float> a, Vector128<float> b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Max(Vector128<float> a, Vector128<float> b) => Vector128.Max(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float MaxAcross(Vector128<float> v) => MathF.Max(MathF.Max(v.GetElement(0), v.GetElement(1)), MathF.Max(v.GetElement(2), v.GetElement(3)));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Exp(Vector128<float> v) => Vector128.Exp(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> NibbleInPlace(uint* words, int k) => Vector128.ConvertToSingle((Vector128.Load(words) & Vector128.Create(15u << (4 * k))).AsInt32());
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> TopNibble(uint* words) => Vector128.ConvertToSingle((Vector128.Load(words) >>> 28).AsInt32());
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> LoadPermuted(float* p, int* index) => Vector128.ShuffleNative(Vector128.Load(p), Vector128.Load(index));
}

/// <summary>One float as a vector of width 1: the tails, and machines without SIMD.</summary>
internal unsafe struct ScalarOps : IVecOps<float>
{
    public static int Width => 1;
    public static bool IsAccelerated => true;
    public static float Zero => 0f;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Load(float* p) => *p;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, float v) => *p = v;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Splat(float x) => x;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float MulAdd(float a, float b, float c) => a * b + c;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Mul(float a, float b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sum(float v) => v;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Sum4(float a, float b, float c, float d) => Vector128.Create(a, b, c, d);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Add(float a, float b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Subtract(float a, float b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Max(float a, float b) => MathF.Max(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float MaxAcross(float v) => v;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Exp(float v) => MathF.Exp(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float NibbleInPlace(uint* words, int k) => (int)(*words & 15u << (4 * k));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float TopNibble(uint* words) => (int)(*words >> 28);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float LoadPermuted(float* p, int* index) => p[*index];
}
