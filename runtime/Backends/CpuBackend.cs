using System.Buffers;
using System.Numerics.Tensors;

using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// A float32 buffer in host memory. It wraps a <see cref="Memory{T}"/>, so it can hold an array or
/// memory-mapped weights (through a <see cref="System.Buffers.MemoryManager{T}"/>); the optional owner
/// is disposed with it.
/// </summary>
public sealed class CpuTensor : Tensor
{
    private readonly IDisposable? _owner;

    public CpuTensor(string name, Memory<float> memory, IDisposable? owner = null)
        : base(name, memory.Length)
    {
        Memory = memory;
        _owner = owner;
    }

    public Memory<float> Memory { get; }

    public Span<float> Span => Memory.Span;

    /// <summary>True for a weight used in place in a read-only file mapping (never written).</summary>
    public bool IsFileMapped { get; init; }

    public override bool IsResident => IsFileMapped;

    /// <summary>A converted weight's array, rented from the shared pool and returned by ReleaseWeight.</summary>
    internal float[]? PooledArray { get; set; }

    public override void Dispose() => _owner?.Dispose();
}

/// <summary>
/// A 4-bit base weight on the CPU (<see cref="IBackend.MapWeight"/> of a quantized tensor): packed words,
/// scales and biases used where they lie, in the file mapping. Only the linear, embedding and LM-head
/// kernels take it; they dequantize it a tile at a time inside their products. Its length is the
/// logical element count, rows × columns.
/// </summary>
public sealed class CpuQ4Tensor(Q4Weight weight) : Tensor(weight.Name, (long)weight.Rows * weight.Columns)
{
    public Q4Weight Weight { get; } = weight;

    /// <summary>True when the weight lies in a read-only file mapping (<see cref="ModelWeights.MapQ4"/>), not in arrays.</summary>
    public bool IsFileMapped { get; init; }

    public override bool IsResident => IsFileMapped;
}

/// <summary>
/// A 16-bit (F16 or BF16) base weight on the CPU (<see cref="IBackend.MapWeight"/> of such a tensor):
/// its bits used where they lie, in the file mapping. The linear, embedding and LM-head kernels
/// convert it a panel or a row at a time inside their products; the norm and bias consumers convert
/// the vector they read into a pooled buffer for the length of one call. Its length is the element count.
/// </summary>
public sealed class CpuFloat16Tensor(Float16Weight weight) : Tensor(weight.Name, weight.Elements)
{
    public Float16Weight Weight { get; } = weight;

    /// <summary>True when the bits lie in a read-only file mapping (<see cref="ModelWeights.MapFloat16"/>), not in an array.</summary>
    public bool IsFileMapped => Weight.IsFileMapped;

    public override bool IsResident => IsFileMapped;
}

/// <summary>
/// The CPU backend: <see cref="IBackend"/> on <see cref="CpuTensor"/>s, each method one call into
/// <see cref="CpuKernels"/> with the backend's thread count.
/// </summary>
public sealed class CpuBackend : IBackend
{
    private readonly int _threads;

    /// <param name="threads">Worker threads for the parallel kernels; all processors by default.</param>
    public CpuBackend(int? threads = null)
    {
        if (threads is <= 0)
            throw new ArgumentOutOfRangeException(nameof(threads), threads, "threads must be positive.");
        _threads = threads ?? Environment.ProcessorCount;
    }

    public int Threads => _threads;

    public string Name => _threads == 1 ? "cpu (1 thread)" : $"cpu ({_threads} threads)";

    public void Dispose() { }

    /// <summary>Nothing to wait for: every kernel has run when its call returns.</summary>
    public void Synchronize() { }

    /// <summary>0: CPU tensors are host memory.</summary>
    public long TransferredBytes => 0;

    public bool TryGetHostSpan(Tensor tensor, out Span<float> values)
    {
        values = tensor is CpuTensor { IsFileMapped: false } t ? t.Span : default;
        return tensor is CpuTensor { IsFileMapped: false };
    }

    // ---------------------------------------------------------------- optimizer

    public void AdamWUpdate(Tensor parameter, Tensor m, Tensor v, Tensor gradient, long n, in AdamWStep step)
    {
        Span<float> p = S(parameter, n), mSpan = S(m, n), vSpan = S(v, n);
        ReadOnlySpan<float> g = S(gradient, n);
        float b1 = step.Beta1, b2 = step.Beta2, c1 = step.BiasCorrection1, c2 = step.BiasCorrection2;
        float lr = step.LearningRate, eps = step.Epsilon, decay = step.WeightDecay, scale = step.GradScale;
        for (int i = 0; i < p.Length; i++)
        {
            float gi = scale == 0 ? 0 : g[i] * scale;
            mSpan[i] = b1 * mSpan[i] + (1 - b1) * gi;
            vSpan[i] = b2 * vSpan[i] + (1 - b2) * gi * gi;
            p[i] -= lr * (mSpan[i] / c1 / (MathF.Sqrt(vSpan[i] / c2) + eps) + decay * p[i]);
        }
    }

    public void SgdUpdate(Tensor parameter, Tensor gradient, long n, float learningRate, float gradScale)
    {
        if (gradScale != 0)
            TensorPrimitives.MultiplyAdd(S(gradient, n), -learningRate * gradScale, S(parameter, n), S(parameter, n));
    }

    private (int Check, bool NaN)? _nonFinite;

    public void CheckFinite(Tensor values, long n, int check)
    {
        if (_nonFinite is { } earlier && earlier.Check <= check || FiniteValues.All(S(values, n), out bool nan))
            return;
        _nonFinite = (check, nan);
    }

    public (int Check, bool NaN)? TakeNonFinite()
    {
        var found = _nonFinite;
        _nonFinite = null;
        return found;
    }

    public void AddNoise(Tensor values, long n, NoiseKey key, float scale)
    {
        Span<float> x = S(values, n);
        for (int i = 0; i < x.Length; i++)
            x[i] += scale * CounterNoise.Normal(key, i);
    }

    // ---------------------------------------------------------------- buffers

    public Tensor Allocate(string name, long length)
    {
        if (length is < 0 or > int.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(length), length, $"a CPU tensor holds at most {int.MaxValue} floats.");
        return new CpuTensor(name, new float[length]);
    }

    public Tensor AllocateInFile(string name, long length, Func<MappedBuffer> file)
    {
        var mapped = file();
        return new CpuTensor(name, mapped.Memory, owner: mapped);
    }

    public Tensor Upload(string name, ReadOnlySpan<float> data) => new CpuTensor(name, data.ToArray());

    public Tensor Adopt(string name, Memory<float> values) => new CpuTensor(name, values);

    /// <summary>
    /// A 4-bit weight stays packed in the file mapping (<see cref="CpuQ4Tensor"/>), an F16 or BF16 one
    /// stays 16-bit there (<see cref="CpuFloat16Tensor"/>); an F32 weight is the file mapping itself.
    /// Only an F32 tensor the file does not align to 4 bytes is converted, into a pooled array.
    /// </summary>
    public Tensor MapWeight(ModelWeights weights, string name)
    {
        if (weights.IsQuantized(name))
            return new CpuQ4Tensor(weights.MapQ4(name)) { IsFileMapped = true };
        if (weights.MapFloat16(name) is { } half)
            return new CpuFloat16Tensor(half);
        if (weights.MapF32(name) is { } mapped)
            return new CpuTensor(name, mapped) { IsFileMapped = true };
        // An unaligned F32 tensor: copied into a pooled array that ReleaseWeight returns, so a layer's
        // copies are reused by the next layer instead of piling up for the garbage collector.
        int length = checked((int)weights.Info(name).Elements);
        var pooled = ArrayPool<float>.Shared.Rent(length);
        weights.Read(name, pooled.AsSpan(0, length));
        return new CpuTensor(name, pooled.AsMemory(0, length)) { PooledArray = pooled };
    }

    /// <summary>A file-mapped weight's pages are dropped (madvise DONTNEED): read again from the file if touched.</summary>
    public void ReleaseWeight(Tensor weight)
    {
        if (weight is CpuQ4Tensor q4)
        {
            if (q4.IsFileMapped)
            {
                DontNeed(q4.Weight.Packed);
                DontNeed(q4.Weight.Scales);
                DontNeed(q4.Weight.Biases);
            }
            return;
        }
        if (weight is CpuFloat16Tensor half)
        {
            if (half.IsFileMapped)
                DontNeed(half.Weight.Bits);
            return;
        }
        var tensor = Cpu(weight);
        if (tensor.IsFileMapped)
            DontNeed(tensor.Memory);
        else if (tensor.PooledArray is { } pooled)
        {
            tensor.PooledArray = null;
            ArrayPool<float>.Shared.Return(pooled);
        }
    }

    private static unsafe void DontNeed<T>(Memory<T> memory) where T : unmanaged
    {
        using var pin = memory.Pin();
        Posix.DontNeed(pin.Pointer, (long)memory.Length * sizeof(T));
    }

    public void Download(Tensor src, Span<float> dst) => S(src, dst.Length).CopyTo(dst);

    public void Write(Tensor dst, ReadOnlySpan<float> data) => data.CopyTo(S(dst, data.Length));

    public void Zero(Tensor t, long n) => S(t, n).Clear();

    public void Copy(Tensor dst, Tensor src, long n) => S(src, n).CopyTo(S(dst, n));

    public void AddInPlace(Tensor dst, Tensor src, long n)
    {
        Span<float> d = S(dst, n);
        TensorPrimitives.Add(d, S(src, n), d);
    }

    public void Scale(Tensor x, float factor, long n)
    {
        Span<float> d = S(x, n);
        TensorPrimitives.Multiply(d, factor, d);
    }

    // ---------------------------------------------------------------- kernels

    public void EmbeddingForward(Tensor x, ReadOnlySpan<int> tokens, Tensor table, int T, int C)
    {
        if (table is CpuQ4Tensor q4)
            CpuKernels.EmbeddingForward(S(x), tokens, q4.Weight, T, C);
        else if (table is CpuFloat16Tensor half)
            CpuKernels.EmbeddingForward(S(x), tokens, half.Weight, T, C);
        else
            CpuKernels.EmbeddingForward(S(x), tokens, S(table), T, C);
    }

    public void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int T, int C, float eps, float weightOffset)
    {
        var weight = new VectorView(w, C);
        CpuKernels.RmsNormForward(S(y), S(rstd), S(x), weight.Span, T, C, eps, weightOffset, _threads);
        weight.Dispose();
    }

    public void RmsNormBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, Tensor rstd, int T, int C, float weightOffset, bool accumulate)
    {
        var weight = new VectorView(w, C);
        CpuKernels.RmsNormBackward(S(dx), S(dy), S(x), weight.Span, S(rstd), T, C, weightOffset, accumulate, _threads);
        weight.Dispose();
    }

    public void RopeForward(Tensor x, Tensor cos, Tensor sin, int T, int heads, int headDim)
        => CpuKernels.RopeForward(S(x), S(cos), S(sin), T, heads, headDim);

    public void RopeBackward(Tensor dx, Tensor cos, Tensor sin, int T, int heads, int headDim)
        => CpuKernels.RopeBackward(S(dx), S(cos), S(sin), T, heads, headDim);

    public void AttentionForward(Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v, int T, int heads, int kvHeads, int headDim,
                                 float scale, int window)
        => CpuKernels.AttentionForward(S(output), S(lse), S(q), S(k), S(v), T, heads, kvHeads, headDim, scale, window, _threads);

    public void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOutput, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
                                  int T, int heads, int kvHeads, int headDim, float scale, int window)
        => CpuKernels.AttentionBackward(S(dq), S(dk), S(dv), S(dOutput), S(output), S(lse), S(q), S(k), S(v), T, heads, kvHeads, headDim,
            scale, window, _threads);

    public void GluForward(Tensor h, Tensor gate, Tensor up, long n, GluActivation activation)
        => CpuKernels.GluForward(S(h), S(gate), S(up), n, activation, _threads);

    public void GluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long n, GluActivation activation)
        => CpuKernels.GluBackward(S(dGate), S(dUp), S(dh), S(gate), S(up), n, activation, _threads);

    public void LinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, int T, int din, int dout)
    {
        var b = new VectorView(bias, dout);
        if (w is CpuQ4Tensor q4)
            CpuKernels.LinearForward(S(y), S(x), q4.Weight, b.Span, T, din, dout, _threads);
        else if (w is CpuFloat16Tensor half)
            CpuKernels.LinearForward(S(y), S(x), half.Weight, b.Span, T, din, dout, _threads);
        else
            CpuKernels.LinearForward(S(y), S(x), S(w), b.Span, T, din, dout, _threads);
        b.Dispose();
    }

    public void LinearBackwardInput(Tensor dx, Tensor dy, Tensor w, int T, int din, int dout, bool accumulate)
    {
        if (w is CpuQ4Tensor q4)
            CpuKernels.LinearBackwardInput(S(dx), S(dy), q4.Weight, T, din, dout, accumulate, _threads);
        else if (w is CpuFloat16Tensor half)
            CpuKernels.LinearBackwardInput(S(dx), S(dy), half.Weight, T, din, dout, accumulate, _threads);
        else
            CpuKernels.LinearBackwardInput(S(dx), S(dy), S(w), T, din, dout, accumulate, _threads);
    }

    public void MatMul(Tensor c, Tensor a, Tensor b, int rows, int cols, int depth, MatMulForm form, float alpha, bool accumulate)
    {
        Span<float> cs = S(c, (long)rows * cols);
        switch (form)
        {
            case MatMulForm.NT:
                CpuKernels.GemmNT(cs, S(a, (long)rows * depth), S(b, (long)cols * depth), rows, cols, depth, alpha, accumulate, _threads);
                break;
            case MatMulForm.NN:
                CpuKernels.GemmNN(cs, S(a, (long)rows * depth), S(b, (long)depth * cols), rows, depth, cols, alpha, accumulate, _threads);
                break;
            case MatMulForm.TN:
                CpuKernels.GemmTN(cs, S(a, (long)depth * rows), S(b, (long)depth * cols), depth, rows, cols, alpha, accumulate, _threads);
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(form), form, null);
        }
    }

    public float LmHeadCrossEntropy(Tensor dx, Tensor logits, Tensor x, Tensor w, ReadOnlySpan<int> targets, int T, int C, int V, int chunk,
                                    float softcap)
        => w switch
        {
            CpuQ4Tensor q4 => CpuKernels.LmHeadCrossEntropy(S(dx), S(logits), S(x), q4.Weight, targets, T, C, V, chunk, softcap, _threads),
            CpuFloat16Tensor half => CpuKernels.LmHeadCrossEntropy(S(dx), S(logits), S(x), half.Weight, targets, T, C, V, chunk, softcap, _threads),
            _ => CpuKernels.LmHeadCrossEntropy(S(dx), S(logits), S(x), S(w), targets, T, C, V, chunk, softcap, _threads),
        };

    public void RopeForwardAt(Tensor x, Tensor cos, Tensor sin, int position, int T, int heads, int headDim)
    {
        int half = headDim / 2;
        CpuKernels.RopeForward(S(x), S(cos)[(position * half)..], S(sin)[(position * half)..], T, heads, headDim);
    }

    public void CopyRange(Tensor dst, long dstOffset, Tensor src, long srcOffset, long n)
    {
        if (dstOffset < 0 || srcOffset < 0 || n < 0)
            throw new ArgumentOutOfRangeException(nameof(n), "offsets and lengths must not be negative.");
        S(src, srcOffset + n)[(int)srcOffset..].CopyTo(S(dst, dstOffset + n)[(int)dstOffset..]);
    }

    public void AttentionDecode(Tensor output, Tensor q, Tensor kCache, Tensor vCache, int count, int heads, int kvHeads, int headDim, float scale)
        => CpuKernels.AttentionDecode(S(output), S(q), S(kCache), S(vCache), count, heads, kvHeads, headDim, scale);

    public void LmHeadLogits(Tensor logits, Tensor x, Tensor w, int T, int C, int V, float softcap)
    {
        LinearForward(logits, x, w, null, T, C, V);
        if (softcap > 0)
            CpuKernels.SoftCap(S(logits, (long)T * V), softcap);
    }

    // ---------------------------------------------------------------- helpers

    private static Span<float> S(Tensor t) => Cpu(t).Span;

    /// <summary>The first n floats of t.</summary>
    private static Span<float> S(Tensor t, long n)
    {
        var cpu = Cpu(t);
        if (n < 0 || n > cpu.Length)
            throw new ArgumentOutOfRangeException(nameof(n), n, $"{t} holds {cpu.Length} floats.");
        return cpu.Span[..(int)n];
    }

    private static CpuTensor Cpu(Tensor t) => t as CpuTensor
        ?? throw new ArgumentException(t switch
        {
            CpuQ4Tensor => $"{t} is a 4-bit weight, which only the linear, embedding and LM-head kernels take.",
            CpuFloat16Tensor => $"{t} is a 16-bit weight, which only the linear, embedding, LM-head and norm kernels and the bias take.",
            _ => $"{t} is a {t.GetType().Name}, not a CpuTensor of this backend.",
        }, nameof(t));

    /// <summary>
    /// The first n floats of a vector a kernel reads (a norm weight, a bias; none for null): a float
    /// tensor in place, a 16-bit weight converted into a pooled buffer that <see cref="Dispose"/>
    /// returns, so a steady-state step converts its vectors without allocating.
    /// </summary>
    private ref struct VectorView
    {
        private float[]? _rented;

        public VectorView(Tensor? t, int n)
        {
            if (t is null)
            {
                Span = default;
                return;
            }
            if (t is CpuFloat16Tensor half)
            {
                if (n < 0 || n > half.Length)
                    throw new ArgumentOutOfRangeException(nameof(n), n, $"{t} holds {half.Length} values.");
                _rented = ArrayPool<float>.Shared.Rent(Math.Max(n, 1));
                var span = _rented.AsSpan(0, n);
                CpuKernels.Widen(half.Weight, span);
                Span = span;
                return;
            }
            Span = S(t, n);
        }

        public ReadOnlySpan<float> Span { get; }

        public void Dispose()
        {
            if (_rented is not null)
                ArrayPool<float>.Shared.Return(_rented);
            _rented = null;
        }
    }
}
