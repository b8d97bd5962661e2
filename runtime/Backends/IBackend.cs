using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Backends;

/// <summary>A float32 buffer owned by a backend. Lengths are in elements.</summary>
public abstract class Tensor : IDisposable
{
    protected Tensor(string name, long length)
    {
        Name = name;
        Length = length;
    }

    public string Name { get; }
    public long Length { get; }

    /// <summary>
    /// True for a base weight that stays where <see cref="IBackend.MapWeight"/> put it for the whole
    /// run: in place in a read-only file mapping (the CPU) or resident in device memory. A trainer maps
    /// such a weight once and keeps it; <see cref="IBackend.ReleaseWeight"/> only lets its pages go.
    /// </summary>
    public virtual bool IsResident => false;

    public virtual void Dispose() { }

    public override string ToString() => $"{Name}[{Length}]";
}

/// <summary>
/// The kernels a generated trainer calls. Every method is one kernel; the generated code passes the
/// dimensions it knows. Matrices are row-major. Weights use the safetensors layout: a linear layer's
/// W is [dout, din]. LoRA uses PEFT's: A is [r, din], B is [dout, r].
///
/// Argument order follows llm.c: outputs, saved statistics, inputs, weights, dimensions.
/// Accumulation rule: parameter gradients (dA, dB) are always <c>+=</c>; an activation gradient is
/// <c>=</c> unless the parameter is named <c>accumulate</c> (the residual stream's gradient is <c>+=</c>).
/// </summary>
public interface IBackend : IDisposable
{
    /// <summary>Human-readable name, for example "cpu (2 threads)".</summary>
    string Name { get; }

    /// <summary>
    /// Waits until every kernel called so far has run. A GPU backend records kernels and submits them
    /// in batches, so a call returns before its kernel has run; the CPU runs each kernel in its call.
    /// For timing: anything that reads results back (<see cref="Download"/>, a loss) waits by itself.
    /// </summary>
    void Synchronize();

    /// <summary>
    /// Bytes copied between the host's memory and the backend's since it was made, both ways (the
    /// traffic a step costs); 0 on the CPU, whose tensors are host memory.
    /// </summary>
    long TransferredBytes { get; }

    /// <summary>
    /// The tensor's values in host memory, when this backend keeps them there (the CPU), for reading
    /// and writing in place; false when they live elsewhere (a GPU), where only
    /// <see cref="Download"/> and <see cref="Write"/> reach them.
    /// </summary>
    bool TryGetHostSpan(Tensor tensor, out Span<float> values);

    /// <summary>A zero-filled buffer of <paramref name="length"/> floats.</summary>
    Tensor Allocate(string name, long length);

    /// <summary>
    /// A zero-filled buffer of <paramref name="length"/> floats in the memory-mapped file
    /// <paramref name="file"/> makes, where this backend keeps tensors in host memory (the CPU): file
    /// pages the kernel can write back and drop, not private memory. A GPU backend allocates device
    /// memory as <see cref="Allocate"/> does and never calls <paramref name="file"/>.
    /// </summary>
    Tensor AllocateInFile(string name, long length, Func<MappedBuffer> file);

    /// <summary>A buffer holding a copy of <paramref name="data"/> (weights, LoRA parameters).</summary>
    Tensor Upload(string name, ReadOnlySpan<float> data);

    /// <summary>
    /// A buffer holding <paramref name="values"/>: a backend that keeps tensors in host memory uses that
    /// memory itself (no second copy; its kernels write into it), another uploads a copy.
    /// </summary>
    Tensor Adopt(string name, Memory<float> values);

    /// <summary>
    /// A base weight as the kernels read it, from the model files. On the CPU an F32 tensor is a view
    /// of the memory-mapped file (no copy), an F16 or BF16 one is used as stored, converted panel by
    /// panel inside the products (row by row in the embedding, per call for a norm weight or a bias),
    /// and a 4-bit one is used packed, dequantized tile by tile inside the products; a GPU backend
    /// uploads it as stored (4-bit and 16-bit ones converted in its shaders). A mapped weight may be passed as the weight of
    /// LinearForward, LinearBackwardInput, EmbeddingForward and LmHeadCrossEntropy, and as the RMSNorm
    /// weight and the bias. Give it back with <see cref="ReleaseWeight"/> when its layer is done.
    /// </summary>
    Tensor MapWeight(ModelWeights weights, string name);

    /// <summary>Lets go of a mapped weight: its file pages leave memory (CPU) or its device memory is freed.</summary>
    void ReleaseWeight(Tensor weight);

    /// <summary>Copies the first <c>dst.Length</c> floats of <paramref name="src"/> to the host.</summary>
    void Download(Tensor src, Span<float> dst);

    /// <summary>Overwrites the first <c>data.Length</c> floats of <paramref name="dst"/>.</summary>
    void Write(Tensor dst, ReadOnlySpan<float> data);

    /// <summary>t[0..n) = 0.</summary>
    void Zero(Tensor t, long n);

    /// <summary>dst[0..n) = src[0..n).</summary>
    void Copy(Tensor dst, Tensor src, long n);

    /// <summary>dst[dstOffset..dstOffset+n) = src[srcOffset..srcOffset+n); the ranges may not overlap within one tensor.</summary>
    void CopyRange(Tensor dst, long dstOffset, Tensor src, long srcOffset, long n);

    /// <summary>dst[0..n) += src[0..n) (the residual connection).</summary>
    void AddInPlace(Tensor dst, Tensor src, long n);

    /// <summary>x[0..n) *= factor (Gemma's embedding scale, √hidden as a float32).</summary>
    void Scale(Tensor x, float factor, long n);

    /// <summary>x[t, :] = table[tokens[t], :] for t &lt; T. table is [vocab, C].</summary>
    void EmbeddingForward(Tensor x, ReadOnlySpan<int> tokens, Tensor table, int T, int C);

    /// <summary>
    /// y[t] = x[t] * rstd[t] * (weightOffset + w), rstd[t] = 1 / sqrt(mean(x[t]²) + eps), for T rows of
    /// C. Saves rstd [T]. weightOffset is 0 for Llama's form (w) and 1 for Gemma's (1 + w). A per-head
    /// norm (q_norm, k_norm) is T·heads rows of headDim.
    /// </summary>
    void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int T, int C, float eps, float weightOffset);

    /// <summary>dx (+= with accumulate, else =) ∂L/∂x given dy, using x, w and the rstd saved by forward.</summary>
    void RmsNormBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, Tensor rstd, int T, int C, float weightOffset, bool accumulate);

    /// <summary>
    /// Rotates x [T, heads, headDim] in place as Hugging Face's rotate_half does: for j &lt; headDim/2,
    /// (x1, x2) = (x[j], x[j + headDim/2]) becomes (x1·cos − x2·sin, x2·cos + x1·sin), with
    /// cos/sin [T, headDim/2] tables from <see cref="Rope"/>.
    /// </summary>
    void RopeForward(Tensor x, Tensor cos, Tensor sin, int T, int heads, int headDim);

    /// <summary>
    /// <see cref="RopeForward"/> for T rows at positions position..position+T−1: row t is rotated with
    /// the tables' row position + t (decoding, where the rows are the newest tokens of a sequence).
    /// </summary>
    void RopeForwardAt(Tensor x, Tensor cos, Tensor sin, int position, int T, int heads, int headDim);

    /// <summary>The transpose of <see cref="RopeForward"/>, in place on dx (rotation by −θ).</summary>
    void RopeBackward(Tensor dx, Tensor cos, Tensor sin, int T, int heads, int headDim);

    /// <summary>
    /// Causal grouped-query attention without any [T, T] buffer (FlashAttention-2: key blocks with an
    /// online softmax). Arguments: the output, the saved statistic lse, the inputs q, k, v, dimensions.
    /// q and output are [T, heads, hd], k and v [T, kvHeads, hd]; head h reads kv head g = h / (heads / kvHeads).
    /// Query t sees key s iff s ≤ t and, with a sliding window W &gt; 0, t − s &lt; W (window 0: every
    /// earlier key). With the scores S[h, t, s] = q[t, h]·k[s, g]·scale over the visible keys:
    /// output[t, h] = Σ_s softmax_s(S[h, t, :])·v[s, g], and lse [heads, T] holds
    /// lse[h, t] = log Σ_s exp(S[h, t, s]), the log-sum-exp of each row, from which
    /// <see cref="AttentionBackward"/> recomputes the softmax. scale is 1/√hd for most models
    /// (Gemma 3: query_pre_attn_scalar^−½). Key blocks outside the window are skipped, so a sliding
    /// layer costs O(T·W).
    /// </summary>
    void AttentionForward(Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v, int T, int heads, int kvHeads, int headDim,
                          float scale, int window);

    /// <summary>
    /// dq [T, heads, hd], dk and dv [T, kvHeads, hd] (=) from dOutput = ∂L/∂output [T, heads, hd].
    /// Arguments: the gradients written (dq, dk, dv), the incoming gradient dOutput, what forward saved
    /// (its output and lse), forward's inputs (q, k, v), dimensions. The probabilities
    /// P[h, t, s] = exp(S[h, t, s] − lse[h, t]) are recomputed block by block; with
    /// D[h, t] = Σ_d dOutput[t, h, d]·output[t, h, d] and dS = P∘(dOutput·vᵀ − D):
    /// dq = dS·k·scale, dk = dSᵀ·q·scale and dv = Pᵀ·dOutput, dk and dv summed over the query
    /// heads that share a kv head; scale and window as in <see cref="AttentionForward"/>. A backend's
    /// scratch is a few [block, block] tiles per worker plus D [heads, T]: nothing grows as T².
    /// </summary>
    void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOutput, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
                           int T, int heads, int kvHeads, int headDim, float scale, int window);

    /// <summary>
    /// One decoding step's attention: the newest token's queries q [heads, hd] against the first
    /// <paramref name="count"/> rows of a KV cache, kCache and vCache [capacity, kvHeads, hd], into
    /// output [heads, hd]: output[h] = Σ_s softmax_s(q[h]·kCache[s, g]·scale)·vCache[s, g] over s &lt; count,
    /// g = h / (heads / kvHeads). The cache holds exactly the keys the token may see (a sliding layer's
    /// cache is a ring of its window), in any order: attention does not depend on it.
    /// </summary>
    void AttentionDecode(Tensor output, Tensor q, Tensor kCache, Tensor vCache, int count, int heads, int kvHeads, int headDim, float scale);

    /// <summary>h = act(gate) * up, elementwise over n: SwiGLU (SiLU) or GeGLU (tanh-approximated GELU).</summary>
    void GluForward(Tensor h, Tensor gate, Tensor up, long n, GluActivation activation);

    /// <summary>dGate, dUp (=) from dh. dUp may be the same tensor as dh (updated in place).</summary>
    void GluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long n, GluActivation activation);

    /// <summary>y [T, dout] = x [T, din] · wᵀ (+ bias [dout] when not null). w is [dout, din].</summary>
    void LinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, int T, int din, int dout);

    /// <summary>dx [T, din] (= or +=) dy [T, dout] · w. The frozen base term of dX.</summary>
    void LinearBackwardInput(Tensor dx, Tensor dy, Tensor w, int T, int din, int dout, bool accumulate);

    /// <summary>
    /// c [rows, cols] (= or += with <paramref name="accumulate"/>) alpha · op(a)·op(b) over
    /// <paramref name="depth"/>, for float tensors the trainer owns (activations, LoRA parameters and
    /// gradients; never a base weight): <see cref="MatMulForm.NT"/> reads a [rows, depth] and b [cols, depth],
    /// <see cref="MatMulForm.NN"/> a [rows, depth] and b [depth, cols], <see cref="MatMulForm.TN"/>
    /// a [depth, rows] and b [depth, cols].
    /// </summary>
    void MatMul(Tensor c, Tensor a, Tensor b, int rows, int cols, int depth, MatMulForm form, float alpha, bool accumulate);

    /// <summary>
    /// y += scale · (x · aᵀ) · bᵀ. h [T, r] is scratch for H = x · aᵀ, which is not kept.
    /// a is [r, din], b is [dout, r]. Two products, the same on every backend.
    /// </summary>
    void LoraForward(Tensor y, Tensor h, Tensor x, Tensor a, Tensor b, float scale, int T, int din, int dout, int r)
    {
        MatMul(h, x, a, T, r, din, MatMulForm.NT, 1, accumulate: false);    // H [T, r]   = x·aᵀ
        MatMul(y, h, b, T, dout, r, MatMulForm.NT, scale, accumulate: true); // y [T, dout] += s·H·bᵀ
    }

    /// <summary>
    /// The MeSP structured LoRA backward, keeping only x:
    /// H = x·aᵀ (recomputed into h), dB += scale·dyᵀ·H, dH = scale·dy·b (into dh), dA += dHᵀ·x,
    /// dx += dH·a. The base term dy·w is <see cref="LinearBackwardInput"/>'s. Five products, the same
    /// on every backend.
    /// </summary>
    void LoraBackward(Tensor dx, Tensor da, Tensor db, Tensor h, Tensor dh, Tensor dy, Tensor x, Tensor a, Tensor b, float scale, int T, int din, int dout, int r)
    {
        MatMul(h, x, a, T, r, din, MatMulForm.NT, 1, accumulate: false);       // H  [T, r]     = x·aᵀ
        MatMul(db, dy, h, dout, r, T, MatMulForm.TN, scale, accumulate: true); // dB [dout, r] += s·dyᵀ·H
        MatMul(dh, dy, b, T, r, dout, MatMulForm.NN, scale, accumulate: false); // dH [T, r]    = s·dy·b
        MatMul(da, dh, x, r, din, T, MatMulForm.TN, 1, accumulate: true);      // dA [r, din]  += dHᵀ·x
        MatMul(dx, dh, a, T, din, r, MatMulForm.NN, 1, accumulate: true);      // dx [T, din]  += dH·a
    }

    /// <summary>
    /// Fused LM head and cross-entropy over vocabulary chunks: logits = x [T, C] · wᵀ (w is [V, C]) are
    /// never held beyond one [T, chunk] block (the logits scratch). targets[t] is the label of row t,
    /// or −1 for no label. With softcap c &gt; 0 the logits are capped first, z = c·tanh(logits / c)
    /// (Gemma's final_logit_softcapping); 0 leaves them as they are. Returns the mean cross-entropy over
    /// labelled rows and writes dx (=) ∂(mean loss)/∂x. With no labelled row the loss is 0 and dx is 0.
    /// </summary>
    float LmHeadCrossEntropy(Tensor dx, Tensor logits, Tensor x, Tensor w, ReadOnlySpan<int> targets, int T, int C, int V, int chunk,
                             float softcap);

    /// <summary>
    /// One AdamW step (Loshchilov and Hutter) over n values, in place: with g = gradient·gradScale,
    /// m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g², p −= lr·(m/c1 / (√(v/c2) + ε) + λ·p), where
    /// c1 = 1 − β1^t and c2 = 1 − β2^t for step t (from 1). gradScale 0 is a zero gradient (a layer
    /// LCSB skipped, which still moves with its momentum).
    /// </summary>
    void AdamWUpdate(Tensor parameter, Tensor m, Tensor v, Tensor gradient, long n, in AdamWStep step);

    /// <summary>One SGD step over n values, in place: p −= lr·gradient·gradScale.</summary>
    void SgdUpdate(Tensor parameter, Tensor gradient, long n, float learningRate, float gradScale);

    /// <summary>
    /// Notes whether the first n values of <paramref name="values"/> are all finite; when one is NaN or
    /// infinite, <paramref name="check"/> (a number ≥ 0 the caller gives each check) is what
    /// <see cref="TakeNonFinite"/> reports. Nothing is read back: a step's checks cost one small read at its end.
    /// </summary>
    void CheckFinite(Tensor values, long n, int check);

    /// <summary>
    /// The lowest check of <see cref="CheckFinite"/> that found a value that is not finite since the
    /// last call, and whether it was a NaN (else an infinity); null when every value was finite.
    /// Waits for the kernels called so far.
    /// </summary>
    (int Check, bool NaN)? TakeNonFinite();

    /// <summary>
    /// values[i] += scale·z_i for the first n values, z_i standard normal from
    /// <see cref="CounterNoise.Normal"/>(key, i): a function of the key and the index alone, so
    /// MeZO regenerates the same perturbation on the device instead of storing it.
    /// </summary>
    void AddNoise(Tensor values, long n, NoiseKey key, float scale);

    /// <summary>
    /// The LM head's logits for decoding: logits [T, V] = x [T, C] · wᵀ (w is [V, C]), capped as
    /// c·tanh(logits / c) when softcap c &gt; 0.
    /// </summary>
    void LmHeadLogits(Tensor logits, Tensor x, Tensor w, int T, int C, int V, float softcap);
}

/// <summary>Which operands of <see cref="IBackend.MatMul"/> are read transposed (T) or as they are (N).</summary>
public enum MatMulForm
{
    /// <summary>a · bᵀ.</summary>
    NT,

    /// <summary>a · b.</summary>
    NN,

    /// <summary>aᵀ · b.</summary>
    TN,
}

/// <summary>The activation of a gated MLP, <c>down(act(gate(x)) · up(x))</c>.</summary>
public enum GluActivation
{
    /// <summary>silu(x) = x·σ(x) (Qwen, Llama: hidden_act "silu").</summary>
    Silu,

    /// <summary>0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (Gemma: hidden_activation "gelu_pytorch_tanh").</summary>
    GeluTanh,
}

/// <summary>The hyperparameters of one <see cref="IBackend.AdamWUpdate"/>: step t counts from 1.</summary>
public readonly record struct AdamWStep(int Step, float LearningRate, float Beta1, float Beta2, float Epsilon, float WeightDecay, float GradScale)
{
    /// <summary>1 − β1^t, the first moment's bias correction.</summary>
    public float BiasCorrection1 => 1 - MathF.Pow(Beta1, Step);

    /// <summary>1 − β2^t, the second moment's bias correction.</summary>
    public float BiasCorrection2 => 1 - MathF.Pow(Beta2, Step);
}
