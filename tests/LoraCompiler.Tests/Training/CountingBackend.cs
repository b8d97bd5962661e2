using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Training;

/// <summary>An <see cref="IBackend"/> that forwards every call and counts the kernels it ran.</summary>
public sealed class CountingBackend(IBackend inner) : IBackend
{
    public long Kernels { get; private set; }

    private readonly Dictionary<string, long> _byKernel = new(StringComparer.Ordinal);

    /// <summary>How many times the kernel (the <see cref="IBackend"/> method) named <paramref name="kernel"/> ran.</summary>
    public long CountOf(string kernel) => _byKernel.GetValueOrDefault(kernel);

    private void Count([System.Runtime.CompilerServices.CallerMemberName] string kernel = "")
    {
        Kernels++;
        _byKernel[kernel] = _byKernel.GetValueOrDefault(kernel) + 1;
    }

    public string Name => "counting " + inner.Name;
    public void Synchronize() => inner.Synchronize();
    public long TransferredBytes => inner.TransferredBytes;
    public bool TryGetHostSpan(Tensor tensor, out Span<float> values) => inner.TryGetHostSpan(tensor, out values);
    public Tensor Allocate(string name, long length) => inner.Allocate(name, length);
    public Tensor AllocateInFile(string name, long length, Func<LoraCompiler.Runtime.IO.MappedBuffer> file) => inner.AllocateInFile(name, length, file);
    public Tensor Upload(string name, ReadOnlySpan<float> data) => inner.Upload(name, data);
    public Tensor Adopt(string name, Memory<float> values) => inner.Adopt(name, values);
    public void Download(Tensor src, Span<float> dst) => inner.Download(src, dst);
    public Tensor MapWeight(ModelWeights weights, string name) => inner.MapWeight(weights, name);
    public void ReleaseWeight(Tensor weight) => inner.ReleaseWeight(weight);
    public void Write(Tensor dst, ReadOnlySpan<float> data) => inner.Write(dst, data);
    public void Zero(Tensor t, long n) { Count(); inner.Zero(t, n); }
    public void AdamWUpdate(Tensor parameter, Tensor m, Tensor v, Tensor gradient, long n, in AdamWStep step) { Count(); inner.AdamWUpdate(parameter, m, v, gradient, n, step); }
    public void SgdUpdate(Tensor parameter, Tensor gradient, long n, float learningRate, float gradScale) { Count(); inner.SgdUpdate(parameter, gradient, n, learningRate, gradScale); }
    public void CheckFinite(Tensor values, long n, int check) { Count(); inner.CheckFinite(values, n, check); }
    public (int Check, bool NaN)? TakeNonFinite() => inner.TakeNonFinite();
    public void AddNoise(Tensor values, long n, NoiseKey key, float scale) { Count(); inner.AddNoise(values, n, key, scale); }
    public void Copy(Tensor dst, Tensor src, long n) { Count(); inner.Copy(dst, src, n); }
    public void AddInPlace(Tensor dst, Tensor src, long n) { Count(); inner.AddInPlace(dst, src, n); }
    public void Scale(Tensor x, float factor, long n) { Count(); inner.Scale(x, factor, n); }
    public void EmbeddingForward(Tensor x, ReadOnlySpan<int> tokens, Tensor table, int T, int C) { Count(); inner.EmbeddingForward(x, tokens, table, T, C); }
    public void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int T, int C, float eps, float weightOffset) { Count(); inner.RmsNormForward(y, rstd, x, w, T, C, eps, weightOffset); }
    public void RmsNormBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, Tensor rstd, int T, int C, float weightOffset, bool accumulate) { Count(); inner.RmsNormBackward(dx, dy, x, w, rstd, T, C, weightOffset, accumulate); }
    public void RopeForward(Tensor x, Tensor cos, Tensor sin, int T, int heads, int headDim) { Count(); inner.RopeForward(x, cos, sin, T, heads, headDim); }
    public void RopeBackward(Tensor dx, Tensor cos, Tensor sin, int T, int heads, int headDim) { Count(); inner.RopeBackward(dx, cos, sin, T, heads, headDim); }
    public void AttentionForward(Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v, int T, int heads, int kvHeads, int headDim, float scale, int window) { Count(); inner.AttentionForward(output, lse, q, k, v, T, heads, kvHeads, headDim, scale, window); }
    public void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOutput, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v, int T, int heads, int kvHeads, int headDim, float scale, int window) { Count(); inner.AttentionBackward(dq, dk, dv, dOutput, output, lse, q, k, v, T, heads, kvHeads, headDim, scale, window); }
    public void GluForward(Tensor h, Tensor gate, Tensor up, long n, GluActivation activation) { Count(); inner.GluForward(h, gate, up, n, activation); }
    public void GluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long n, GluActivation activation) { Count(); inner.GluBackward(dGate, dUp, dh, gate, up, n, activation); }
    public void LinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, int T, int din, int dout) { Count(); inner.LinearForward(y, x, w, bias, T, din, dout); }
    public void LinearBackwardInput(Tensor dx, Tensor dy, Tensor w, int T, int din, int dout, bool accumulate) { Count(); inner.LinearBackwardInput(dx, dy, w, T, din, dout, accumulate); }
    public void MatMul(Tensor c, Tensor a, Tensor b, int rows, int cols, int depth, MatMulForm form, float alpha, bool accumulate) { Count(); inner.MatMul(c, a, b, rows, cols, depth, form, alpha, accumulate); }
    public void LoraForward(Tensor y, Tensor h, Tensor x, Tensor a, Tensor b, float scale, int T, int din, int dout, int r) { Count(); inner.LoraForward(y, h, x, a, b, scale, T, din, dout, r); }
    public void LoraBackward(Tensor dx, Tensor da, Tensor db, Tensor h, Tensor dh, Tensor dy, Tensor x, Tensor a, Tensor b, float scale, int T, int din, int dout, int r) { Count(); inner.LoraBackward(dx, da, db, h, dh, dy, x, a, b, scale, T, din, dout, r); }
    public float LmHeadCrossEntropy(Tensor dx, Tensor logits, Tensor x, Tensor w, ReadOnlySpan<int> targets, int T, int C, int V, int chunk, float softcap) { Count(); return inner.LmHeadCrossEntropy(dx, logits, x, w, targets, T, C, V, chunk, softcap); }
    public void RopeForwardAt(Tensor x, Tensor cos, Tensor sin, int position, int T, int heads, int headDim) { Count(); inner.RopeForwardAt(x, cos, sin, position, T, heads, headDim); }
    public void CopyRange(Tensor dst, long dstOffset, Tensor src, long srcOffset, long n) { Count(); inner.CopyRange(dst, dstOffset, src, srcOffset, n); }
    public void AttentionDecode(Tensor output, Tensor q, Tensor kCache, Tensor vCache, int count, int heads, int kvHeads, int headDim, float scale) { Count(); inner.AttentionDecode(output, q, kCache, vCache, count, heads, kvHeads, headDim, scale); }
    public void LmHeadLogits(Tensor logits, Tensor x, Tensor w, int T, int C, int V, float softcap) { Count(); inner.LmHeadLogits(logits, x, w, T, C, V, softcap); }
    public void Dispose() => inner.Dispose();
}
