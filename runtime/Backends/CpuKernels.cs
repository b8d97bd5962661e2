using System.Buffers;
using System.Numerics;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// The CPU kernels on raw spans, llm.c style: <c>&lt;Op&gt;Forward</c> / <c>&lt;Op&gt;Backward</c> with
/// arguments ordered outputs, saved statistics, inputs, weights, dimensions, then the thread count.
/// Layouts and accumulation rules are <see cref="IBackend"/>'s. Per-row reductions (mean of squares,
/// softmax sums, log-sum-exp) accumulate in double (attention's softmax sums: within a 64-key tile in
/// float, across tiles in double); dot products inside the products use float FMA.
/// </summary>
internal static unsafe partial class CpuKernels
{
    /// <summary>Elements below which an elementwise or per-row kernel stays on the calling thread.</summary>
    private const long ElementwiseParallelMin = 1L << 16;

    // ================================================================ embedding

    /// <summary>x[t, :] = table[tokens[t], :] for t &lt; T.</summary>
    public static void EmbeddingForward(Span<float> x, ReadOnlySpan<int> tokens, ReadOnlySpan<float> table, int T, int C)
    {
        Need(x, (long)T * C, nameof(x));
        SequenceChecks.Tokens(tokens, T, table.Length / C);
        for (int t = 0; t < T; t++)
            table.Slice(tokens[t] * C, C).CopyTo(x.Slice(t * C, C));
    }

    // ================================================================ RMSNorm

    /// <summary>
    /// y[t] = x[t]·rstd[t]·(weightOffset + w), rstd[t] = 1/sqrt(mean(x[t]²) + eps); saves rstd [T].
    /// weightOffset 0 is Llama's form, 1 Gemma's (1 + w, rounded to float first, as Hugging Face does).
    /// </summary>
    public static void RmsNormForward(Span<float> y, Span<float> rstd, ReadOnlySpan<float> x, ReadOnlySpan<float> w, int T, int C, float eps,
                                      float weightOffset, int threads)
    {
        Need(y, (long)T * C, nameof(y)); Need(rstd, T, nameof(rstd)); Need(x, (long)T * C, nameof(x)); Need(w, C, nameof(w));
        float[]? shifted = OffsetWeight(w, C, weightOffset);
        fixed (float* py = y) fixed (float* pr = rstd) fixed (float* px = x) fixed (float* pw = shifted is null ? w : shifted)
            For(T, threads, (long)T * C, new RmsNormRows(py, pr, px, pw, C, eps));
        if (shifted is not null)
            ArrayPool<float>.Shared.Return(shifted);
    }

    private readonly struct RmsNormRows(float* Y, float* R, float* X, float* W, int C, float eps) : IParallelBody
    {
        public void Run(int t)
        {
            float* xt = X + (long)t * C, yt = Y + (long)t * C;
            double meanSquare = DotDouble(xt, xt, C) / C;
            float r = (float)(1.0 / Math.Sqrt(meanSquare + eps));
            R[t] = r;
            // y = (x·r)·w, the order Hugging Face rounds in.
            var row = new Span<float>(yt, C);
            TensorPrimitives.Multiply(new ReadOnlySpan<float>(xt, C), r, row);
            TensorPrimitives.Multiply(row, new ReadOnlySpan<float>(W, C), row);
        }
    }

    /// <summary>
    /// dx[t] (+= with accumulate, else =) r·(dy⊙w′ − x·r²·⟨dy⊙w′, x⟩/C) with r = rstd[t] and
    /// w′ = weightOffset + w: the gradient of y = x·r(x)·w′, since ∂r/∂x = −r³·x/C.
    /// </summary>
    public static void RmsNormBackward(Span<float> dx, ReadOnlySpan<float> dy, ReadOnlySpan<float> x, ReadOnlySpan<float> w, ReadOnlySpan<float> rstd,
                                       int T, int C, float weightOffset, bool accumulate, int threads)
    {
        Need(dx, (long)T * C, nameof(dx)); Need(dy, (long)T * C, nameof(dy)); Need(x, (long)T * C, nameof(x));
        Need(w, C, nameof(w)); Need(rstd, T, nameof(rstd));
        float[]? shifted = OffsetWeight(w, C, weightOffset);
        fixed (float* pdx = dx) fixed (float* pdy = dy) fixed (float* px = x) fixed (float* pw = shifted is null ? w : shifted) fixed (float* pr = rstd)
            For(T, threads, (long)T * C, new RmsNormGradientRows(pdx, pdy, px, pw, pr, C, accumulate));
        if (shifted is not null)
            ArrayPool<float>.Shared.Return(shifted);
    }

    private readonly struct RmsNormGradientRows(float* DX, float* DY, float* X, float* W, float* R, int C, bool accumulate) : IParallelBody
    {
        public void Run(int t)
        {
            float* xt = X + (long)t * C, dyt = DY + (long)t * C, dxt = DX + (long)t * C;
            double r = R[t];
            double dot = 0; // ⟨dy⊙w′, x⟩
            for (int i = 0; i < C; i++)
                dot += (double)dyt[i] * W[i] * xt[i];
            float coef = (float)(r * r * r * dot / C);
            float rf = (float)r;
            if (accumulate)
                for (int i = 0; i < C; i++)
                    dxt[i] += rf * dyt[i] * W[i] - coef * xt[i];
            else
                for (int i = 0; i < C; i++)
                    dxt[i] = rf * dyt[i] * W[i] - coef * xt[i];
        }
    }

    /// <summary>
    /// weightOffset + w[..C] in a pooled array (the caller returns it), or null for offset 0, where the
    /// kernels read w itself.
    /// </summary>
    private static float[]? OffsetWeight(ReadOnlySpan<float> w, int C, float weightOffset)
    {
        if (weightOffset == 0)
            return null;
        if (!float.IsFinite(weightOffset))
            throw new ArgumentOutOfRangeException(nameof(weightOffset), weightOffset, "weightOffset must be finite.");
        float[] shifted = ArrayPool<float>.Shared.Rent(Math.Max(C, 1));
        TensorPrimitives.Add(w[..C], weightOffset, shifted.AsSpan(0, C));
        return shifted;
    }

    // ================================================================ RoPE

    /// <summary>
    /// x [T, heads, hd] in place, Hugging Face's rotate_half: (x1, x2) = (x[j], x[j + hd/2]) becomes
    /// (x1·cos − x2·sin, x2·cos + x1·sin) with cos/sin[t, j].
    /// </summary>
    public static void RopeForward(Span<float> x, ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, int T, int heads, int headDim)
        => Rotate(x, cos, sin, T, heads, headDim, 1f);

    /// <summary>
    /// One decoding step's attention (see IBackend.AttentionDecode): q [heads, hd] against the first
    /// count rows of kCache and vCache [capacity, kvHeads, hd], into output [heads, hd]. Each head is a
    /// softmax over count scores (their sum in float64).
    /// </summary>
    public static void AttentionDecode(Span<float> output, ReadOnlySpan<float> q, ReadOnlySpan<float> kCache, ReadOnlySpan<float> vCache,
        int count, int heads, int kvHeads, int headDim, float scale)
    {
        if (kvHeads <= 0 || heads % kvHeads != 0)
            throw new ArgumentException($"heads {heads} is not a multiple of kvHeads {kvHeads}.", nameof(kvHeads));
        if (count <= 0)
            throw new ArgumentOutOfRangeException(nameof(count), count, "a decoding step attends to at least its own key.");
        int kvWidth = kvHeads * headDim;
        Need(output, (long)heads * headDim, nameof(output)); Need(q, (long)heads * headDim, nameof(q));
        Need(kCache, (long)count * kvWidth, nameof(kCache)); Need(vCache, (long)count * kvWidth, nameof(vCache));
        var scores = ArrayPool<float>.Shared.Rent(count);
        try
        {
            for (int h = 0; h < heads; h++)
            {
                int g = h / (heads / kvHeads);
                ReadOnlySpan<float> qh = q.Slice(h * headDim, headDim);
                float max = float.MinValue;
                for (int s = 0; s < count; s++)
                {
                    scores[s] = TensorPrimitives.Dot(qh, kCache.Slice(s * kvWidth + g * headDim, headDim)) * scale;
                    max = Math.Max(max, scores[s]);
                }
                Span<float> oh = output.Slice(h * headDim, headDim);
                oh.Clear();
                double sum = 0;
                for (int s = 0; s < count; s++)
                {
                    float p = MathF.Exp(scores[s] - max);
                    sum += p;
                    TensorPrimitives.MultiplyAdd(vCache.Slice(s * kvWidth + g * headDim, headDim), p, oh, oh);
                }
                TensorPrimitives.Multiply(oh, (float)(1 / sum), oh);
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(scores);
        }
    }

    /// <summary>The transpose of <see cref="RopeForward"/> on dx in place: rotation by −θ.</summary>
    public static void RopeBackward(Span<float> dx, ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, int T, int heads, int headDim)
        => Rotate(dx, cos, sin, T, heads, headDim, -1f);

    private static void Rotate(Span<float> x, ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, int T, int heads, int headDim, float direction)
    {
        if (headDim % 2 != 0)
            throw new ArgumentException($"headDim {headDim} is odd.", nameof(headDim));
        int half = headDim / 2;
        Need(x, (long)T * heads * headDim, nameof(x)); Need(cos, (long)T * half, nameof(cos)); Need(sin, (long)T * half, nameof(sin));
        for (int t = 0; t < T; t++)
        {
            ReadOnlySpan<float> c = cos.Slice(t * half, half), s = sin.Slice(t * half, half);
            for (int h = 0; h < heads; h++)
            {
                Span<float> head = x.Slice((t * heads + h) * headDim, headDim);
                Span<float> x1 = head[..half], x2 = head[half..];
                int j = 0;
                if (Vector.IsHardwareAccelerated)
                    for (; j <= half - Vector<float>.Count; j += Vector<float>.Count)
                    {
                        var vc = new Vector<float>(c[j..]);
                        var vs = new Vector<float>(s[j..]) * direction;
                        var v1 = new Vector<float>(x1[j..]);
                        var v2 = new Vector<float>(x2[j..]);
                        (v1 * vc - v2 * vs).CopyTo(x1[j..]);
                        (v2 * vc + v1 * vs).CopyTo(x2[j..]);
                    }
                for (; j < half; j++)
                {
                    float a = x1[j], b = x2[j], sj = direction * s[j];
                    x1[j] = a * c[j] - b * sj;
                    x2[j] = b * c[j] + a * sj;
                }
            }
        }
    }

    // ================================================================ GLU

    /// <summary>√(2/π), the tanh-GELU's inner factor.</summary>
    private const float GeluC = 0.7978845608028654f;

    /// <summary>The tanh-GELU's cubic coefficient.</summary>
    private const float GeluA = 0.044715f;

    /// <summary>
    /// h = act(gate)·up. SiLU: silu(g) = g·σ(g). GeluTanh: gelu(g) = 0.5·g·(1 + tanh(u)) with
    /// u = √(2/π)·(g + 0.044715·g³), computed as g·σ(2u), the same function (0.5·(1 + tanh(u)) = σ(2u))
    /// without the cancellation of 1 + tanh(u) for negative g.
    /// </summary>
    public static void GluForward(Span<float> h, ReadOnlySpan<float> gate, ReadOnlySpan<float> up, long n, GluActivation activation, int threads)
    {
        Need(h, n, nameof(h)); Need(gate, n, nameof(gate)); Need(up, n, nameof(up));
        bool gelu = IsGelu(activation);
        fixed (float* ph = h) fixed (float* pg = gate) fixed (float* pu = up)
            ForChunks(n, threads, new GluChunks(ph, pg, pu, gelu));
    }

    private readonly struct GluChunks(float* H, float* G, float* U, bool gelu) : IChunkBody
    {
        public void Run(long start, int len)
        {
            var hs = new Span<float>(H + start, len);
            var gs = new ReadOnlySpan<float>(G + start, len);
            if (gelu)
            {
                GeluArgument(H + start, G + start, len); // 2u
                TensorPrimitives.Sigmoid(hs, hs);
            }
            else
                TensorPrimitives.Sigmoid(gs, hs);
            TensorPrimitives.Multiply(hs, gs, hs);
            TensorPrimitives.Multiply(hs, new ReadOnlySpan<float>(U + start, len), hs);
        }
    }

    /// <summary>
    /// dUp = dh·act(gate), dGate = dh·up·act′(gate), with s = σ(g) for SiLU and σ(2u) for GeluTanh:
    /// silu′(g) = s·(1 + g·(1 − s)) and gelu′(g) = s + 2·g·s·(1 − s)·u′, u′ = √(2/π)·(1 + 3·0.044715·g²).
    /// dUp may be dh itself.
    /// </summary>
    public static void GluBackward(Span<float> dGate, Span<float> dUp, ReadOnlySpan<float> dh, ReadOnlySpan<float> gate, ReadOnlySpan<float> up, long n,
                                   GluActivation activation, int threads)
    {
        Need(dGate, n, nameof(dGate)); Need(dUp, n, nameof(dUp)); Need(dh, n, nameof(dh)); Need(gate, n, nameof(gate)); Need(up, n, nameof(up));
        bool gelu = IsGelu(activation);
        fixed (float* pdg = dGate) fixed (float* pdu = dUp) fixed (float* pdh = dh) fixed (float* pg = gate) fixed (float* pu = up)
            ForChunks(n, threads, new GluGradientChunks(pdg, pdu, pdh, pg, pu, gelu));
    }

    private readonly struct GluGradientChunks(float* DG, float* DU, float* DH, float* G, float* U, bool gelu) : IChunkBody
    {
        public void Run(long start, int len)
        {
            float* dg = DG + start, du = DU + start, d = DH + start, g = G + start, u = U + start;
            // s into dGate first (dh, gate and up are inputs, so they may not be overwritten;
            // dUp may be dh itself: each element of dh is read before dUp's is written).
            var sg = new Span<float>(dg, len);
            if (gelu)
            {
                GeluArgument(dg, g, len);
                TensorPrimitives.Sigmoid(sg, sg);
                GeluBackward(dg, du, d, g, u, len);
            }
            else
            {
                TensorPrimitives.Sigmoid(new ReadOnlySpan<float>(g, len), sg);
                SiluBackward(dg, du, d, g, u, len);
            }
        }
    }

    private static bool IsGelu(GluActivation activation) => activation switch
    {
        GluActivation.Silu => false,
        GluActivation.GeluTanh => true,
        _ => throw new ArgumentOutOfRangeException(nameof(activation), activation, "not a GLU activation."),
    };

    /// <summary>arg[i] = 2u = 2·√(2/π)·g·(1 + 0.044715·g²), the argument of σ in gelu(g) = g·σ(2u).</summary>
    private static void GeluArgument(float* arg, float* g, int len)
    {
        const float c2 = 2 * GeluC, c2a = 2 * GeluC * GeluA;
        int i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var vc2 = new Vector<float>(c2);
            var vc2a = new Vector<float>(c2a);
            for (; i <= len - Vector<float>.Count; i += Vector<float>.Count)
            {
                var gi = Vector.Load(g + i);
                Vector.Store(gi * Vector.MultiplyAddEstimate(vc2a, gi * gi, vc2), arg + i);
            }
        }
        for (; i < len; i++)
            arg[i] = g[i] * (c2a * g[i] * g[i] + c2);
    }

    /// <summary>dUp = dh·g·s, dGate = dh·up·s·(1 + g·(1 − s)), with s = σ(g) already in dGate.</summary>
    private static void SiluBackward(float* dg, float* du, float* d, float* g, float* u, int len)
    {
        int i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var one = Vector<float>.One;
            for (; i <= len - Vector<float>.Count; i += Vector<float>.Count)
            {
                var sg = Vector.Load(dg + i);
                var gi = Vector.Load(g + i);
                var di = Vector.Load(d + i);
                Vector.Store(di * gi * sg, du + i);
                Vector.Store(di * Vector.Load(u + i) * sg * (one + gi * (one - sg)), dg + i);
            }
        }
        for (; i < len; i++)
        {
            float sg = dg[i], di = d[i]; // di read first: dUp may be dh itself
            du[i] = di * g[i] * sg;
            dg[i] = di * u[i] * sg * (1f + g[i] * (1f - sg));
        }
    }

    /// <summary>
    /// dUp = dh·g·s, dGate = dh·up·(s + 2·g·s·(1 − s)·u′), u′ = √(2/π)·(1 + 3·0.044715·g²), with
    /// s = σ(2u) already in dGate.
    /// </summary>
    private static void GeluBackward(float* dg, float* du, float* d, float* g, float* u, int len)
    {
        const float c = GeluC, c3a = 3 * GeluC * GeluA;
        int i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var one = Vector<float>.One;
            var two = new Vector<float>(2f);
            var vc = new Vector<float>(c);
            var vc3a = new Vector<float>(c3a);
            for (; i <= len - Vector<float>.Count; i += Vector<float>.Count)
            {
                var sg = Vector.Load(dg + i);
                var gi = Vector.Load(g + i);
                var di = Vector.Load(d + i);
                var uPrime = Vector.MultiplyAddEstimate(vc3a, gi * gi, vc);
                Vector.Store(di * gi * sg, du + i);
                Vector.Store(di * Vector.Load(u + i) * (sg + two * gi * sg * (one - sg) * uPrime), dg + i);
            }
        }
        for (; i < len; i++)
        {
            float sg = dg[i], gi = g[i], di = d[i]; // di read first: dUp may be dh itself
            float uPrime = c3a * gi * gi + c;
            du[i] = di * gi * sg;
            dg[i] = di * u[i] * (sg + 2f * gi * sg * (1f - sg) * uPrime);
        }
    }

    // ================================================================ linear and LoRA

    /// <summary>y [T, dout] = x [T, din]·wᵀ (+ bias), w [dout, din].</summary>
    public static void LinearForward(Span<float> y, ReadOnlySpan<float> x, ReadOnlySpan<float> w, ReadOnlySpan<float> bias, int T, int din, int dout, int threads)
    {
        GemmNT(y, x, w, T, dout, din, 1f, false, threads);
        AddBias(y, bias, T, dout);
    }

    /// <summary>Adds <paramref name="bias"/> [dout] to each of the T rows of y (nothing when it is empty): the linear forwards' bias, whatever w's format.</summary>
    private static void AddBias(Span<float> y, ReadOnlySpan<float> bias, int T, int dout)
    {
        if (bias.IsEmpty)
            return;
        Need(bias, dout, nameof(bias));
        for (int t = 0; t < T; t++)
        {
            Span<float> row = y.Slice(t * dout, dout);
            TensorPrimitives.Add(row, bias[..dout], row);
        }
    }

    /// <summary>dx [T, din] (=|+=) dy [T, dout]·w.</summary>
    public static void LinearBackwardInput(Span<float> dx, ReadOnlySpan<float> dy, ReadOnlySpan<float> w, int T, int din, int dout, bool accumulate, int threads)
        => GemmNN(dx, dy, w, T, dout, din, 1f, accumulate, threads);

    // ================================================================ LM head + cross-entropy

    /// <summary>
    /// Mean cross-entropy over the labelled rows of logits = x·wᵀ, never holding more than one
    /// [T, chunk] block of logits. With softcap c &gt; 0 the softmax is over z = c·tanh(logits/c)
    /// (Gemma's final_logit_softcapping); 0 leaves the logits as they are. Rows labelled −1 are left
    /// out of the products altogether (their dx is 0): when there are any, the labelled rows of x are
    /// gathered first. Returns the loss; dx (=).
    /// </summary>
    public static float LmHeadCrossEntropy(Span<float> dx, Span<float> logits, ReadOnlySpan<float> x, ReadOnlySpan<float> w, ReadOnlySpan<int> targets,
                                           int T, int C, int V, int chunk, float softcap, int threads)
    {
        Need(w, (long)V * C, nameof(w));
        fixed (float* pw = w)
            return LmHeadCrossEntropy(dx, logits, x, new HeadWeight(pw), targets, T, C, V, chunk, softcap, threads);
    }

    /// <summary>The LM head with its weight float32, 4-bit or 16-bit (<see cref="HeadWeight"/>).</summary>
    private static float LmHeadCrossEntropy(Span<float> dx, Span<float> logits, ReadOnlySpan<float> x, HeadWeight w, ReadOnlySpan<int> targets,
                                            int T, int C, int V, int chunk, float softcap, int threads)
    {
        if (chunk <= 0)
            throw new ArgumentOutOfRangeException(nameof(chunk), chunk, "chunk must be positive.");
        if (!(softcap >= 0) || float.IsPositiveInfinity(softcap))
            throw new ArgumentOutOfRangeException(nameof(softcap), softcap, "softcap must be 0 (none) or a positive cap.");
        chunk = Math.Min(chunk, V);
        Need(dx, (long)T * C, nameof(dx)); Need(logits, (long)T * chunk, nameof(logits));
        Need(x, (long)T * C, nameof(x));
        int count = SequenceChecks.Labels(targets, T, V);

        dx[..(T * C)].Clear();
        int[] rows = ArrayPool<int>.Shared.Rent(Math.Max(T, 1)); // the labelled rows, then their labels
        for (int t = 0, n = 0; t < T; t++)
            if (targets[t] >= 0)
                rows[n++] = t;
        double lossSum = 0;
        if (count == T)
        {
            targets[..T].CopyTo(rows);
            lossSum = LmHeadLabelled(dx, logits, x, w, rows, T, C, V, chunk, softcap, threads);
        }
        else if (count > 0)
        {
            // Gather the labelled rows, run on those, scatter their dx back.
            float[] xs = ArrayPool<float>.Shared.Rent(count * C), dxs = ArrayPool<float>.Shared.Rent(count * C);
            int[] labels = ArrayPool<int>.Shared.Rent(count);
            for (int i = 0; i < count; i++)
            {
                x.Slice(rows[i] * C, C).CopyTo(xs.AsSpan(i * C, C));
                labels[i] = targets[rows[i]];
            }
            lossSum = LmHeadLabelled(dxs, logits, xs, w, labels, count, C, V, chunk, softcap, threads);
            for (int i = 0; i < count; i++)
                dxs.AsSpan(i * C, C).CopyTo(dx.Slice(rows[i] * C, C));
            ArrayPool<float>.Shared.Return(xs);
            ArrayPool<float>.Shared.Return(dxs);
            ArrayPool<int>.Shared.Return(labels);
        }
        ArrayPool<int>.Shared.Return(rows);
        return count == 0 ? 0f : (float)(lossSum / count);
    }

    /// <summary>
    /// The LM head on N rows that all have a label: returns Σ_t CE_t and writes dx = ∂(Σ CE / N)/∂x.
    /// Pass 1 runs an online log-sum-exp over the vocabulary chunks (running max m and Σexp(z − m)
    /// per row, in double) and picks out each target logit; pass 2 recomputes each chunk, turns it
    /// into dlogits = (softmax − onehot)/N in place and accumulates dx += dlogits·w_chunk. With a
    /// softcap c, z = c·tanh(l/c) and dlogits = (softmax(z) − onehot)/N·(1 − tanh²(l/c)); without,
    /// z = l.
    /// </summary>
    private static double LmHeadLabelled(Span<float> dx, Span<float> logits, ReadOnlySpan<float> x, HeadWeight w, ReadOnlySpan<int> labels,
                                         int N, int C, int V, int chunk, float softcap, int threads)
    {
        double[] stats = ArrayPool<double>.Shared.Rent(3 * N);
        double lossSum = 0;
        fixed (float* pdx = dx) fixed (float* pl = logits) fixed (float* px = x)
        fixed (double* pst = stats) fixed (int* plab = labels)
        {
            float* DX = pdx, L = pl, X = px;
            double* max = pst, sumExp = pst + N, target = pst + 2 * N;
            int* label = plab;
            for (int t = 0; t < N; t++)
            {
                max[t] = double.NegativeInfinity;
                sumExp[t] = 0;
                target[t] = 0;
            }

            // Pass 1: online log-sum-exp. Merging a chunk with max m_c and sum s_c:
            // m = max(m, m_c), S = S·exp(m_old − m) + Σ exp(l − m).
            for (int v0 = 0; v0 < V; v0 += chunk)
            {
                int n = Math.Min(chunk, V - v0), vStart = v0;
                w.Logits(L, X, N, v0, n, C, threads);
                For(N, threads, (long)N * n, new LogSumExpRows(L, n, vStart, label, max, sumExp, target, softcap));
            }
            for (int t = 0; t < N; t++)
            {
                double lse = max[t] + Math.Log(sumExp[t]);
                lossSum += lse - target[t];
                max[t] = lse; // reused below as the row's log-sum-exp
            }

            // Pass 2: dlogits = (softmax − onehot)/N, dx += dlogits·w_chunk.
            float inv = 1f / N;
            for (int v0 = 0; v0 < V; v0 += chunk)
            {
                int n = Math.Min(chunk, V - v0), vStart = v0;
                w.Logits(L, X, N, v0, n, C, threads);
                For(N, threads, (long)N * n, new LogitGradientRows(L, n, vStart, label, max, inv, softcap));
                w.InputGradient(DX, L, N, v0, n, C, v0 > 0, threads);
            }
        }
        ArrayPool<double>.Shared.Return(stats);
        return lossSum;
    }

    /// <summary>Pass 1 of the LM head over one chunk of the vocabulary: each row's running log-sum-exp and target logit.</summary>
    private readonly struct LogSumExpRows(float* L, int n, int vStart, int* label, double* max, double* sumExp, double* target, float softcap)
        : IParallelBody
    {
        public void Run(int t)
        {
            Span<float> row = new(L + (long)t * n, n);
            if (softcap > 0)
                SoftCap(row, softcap);
            int j = label[t] - vStart;
            if ((uint)j < (uint)n)
                target[t] = row[j];
            double m = Math.Max(max[t], TensorPrimitives.Max(row));
            sumExp[t] = sumExp[t] * Math.Exp(max[t] - m) + SumExp(row, (float)m);
            max[t] = m;
        }
    }

    /// <summary>Pass 2 of the LM head over one chunk: dlogits = (softmax − onehot)/N in place (max holds each row's log-sum-exp).</summary>
    private readonly struct LogitGradientRows(float* L, int n, int vStart, int* label, double* max, float inv, float softcap) : IParallelBody
    {
        public void Run(int t)
        {
            Span<float> row = new(L + (long)t * n, n);
            int j = label[t] - vStart;
            if (softcap > 0)
            {
                SoftCapGradient(row, softcap, (float)max[t], inv, j);
                return;
            }
            // exp(l − lse)/N, minus 1/N at the label
            TensorPrimitives.Subtract(row, (float)max[t], row);
            TensorPrimitives.Exp(row, row);
            TensorPrimitives.Multiply(row, inv, row);
            if ((uint)j < (uint)n)
                row[j] -= inv;
        }
    }

    /// <summary>row = c·tanh(row/c), the order Hugging Face rounds in.</summary>
    internal static void SoftCap(Span<float> row, float c)
    {
        TensorPrimitives.Divide(row, c, row);
        TensorPrimitives.Tanh(row, row);
        TensorPrimitives.Multiply(row, c, row);
    }

    /// <summary>
    /// A row of logits l becomes ∂(CE/N)/∂l through the softcap: with τ = tanh(l/c) and z = c·τ,
    /// (exp(z − lse)/N − onehot/N)·(1 − τ²); the label, if in this chunk, is at j.
    /// </summary>
    private static void SoftCapGradient(Span<float> row, float c, float lse, float inv, int j)
    {
        TensorPrimitives.Divide(row, c, row);
        TensorPrimitives.Tanh(row, row);
        float labelTanh = (uint)j < (uint)row.Length ? row[j] : 0f;
        int i = 0, n = row.Length;
        fixed (float* p = row)
        {
            if (Vector.IsHardwareAccelerated)
            {
                var vc = new Vector<float>(c);
                var vl = new Vector<float>(lse);
                var vInv = new Vector<float>(inv);
                var one = Vector<float>.One;
                for (; i <= n - Vector<float>.Count; i += Vector<float>.Count)
                {
                    var tau = Vector.Load(p + i);
                    var prob = Vector.Exp(tau * vc - vl) * vInv;
                    Vector.Store(prob * (one - tau * tau), p + i);
                }
            }
            for (; i < n; i++)
            {
                float tau = p[i];
                p[i] = MathF.Exp(tau * c - lse) * inv * (1f - tau * tau);
            }
        }
        if ((uint)j < (uint)n)
            row[j] -= inv * (1f - labelTanh * labelTanh);
    }

    /// <summary>Σ exp(row − m) in double; overwrites row.</summary>
    private static double SumExp(Span<float> row, float m)
    {
        TensorPrimitives.Subtract(row, m, row);
        TensorPrimitives.Exp(row, row);
        return SumDouble(row);
    }

    // ================================================================ reductions in double

    /// <summary>Σ x[i] accumulated in double.</summary>
    internal static double SumDouble(ReadOnlySpan<float> x)
    {
        fixed (float* p = x)
            return DotDouble(p, null, x.Length);
    }

    /// <summary>Σ x[i]·y[i] (or Σ x[i] when y is null), each product and the sum in double.</summary>
    internal static double DotDouble(float* x, float* y, int n)
    {
        int i = 0;
        double sum = 0;
        if (Vector256.IsHardwareAccelerated && n >= 8)
        {
            Vector256<double> acc0 = Vector256<double>.Zero, acc1 = Vector256<double>.Zero;
            for (; i <= n - 8; i += 8)
            {
                var (x0, x1) = Vector256.Widen(Vector256.Load(x + i));
                if (y is null)
                {
                    acc0 += x0;
                    acc1 += x1;
                }
                else
                {
                    var (y0, y1) = Vector256.Widen(Vector256.Load(y + i));
                    acc0 = Vector256.MultiplyAddEstimate(x0, y0, acc0);
                    acc1 = Vector256.MultiplyAddEstimate(x1, y1, acc1);
                }
            }
            sum = Vector256.Sum(acc0 + acc1);
        }
        for (; i < n; i++)
            sum += y is null ? x[i] : (double)x[i] * y[i];
        return sum;
    }

    // ================================================================ threading and checks

    /// <summary>body.Run(0..count), in parallel (<see cref="WorkerPool"/>) when threads &gt; 1 and the work is worth it.</summary>
    internal static void For<TBody>(int count, int threads, long work, TBody body) where TBody : struct, IParallelBody
    {
        if (threads <= 1 || count <= 1 || work < ParallelMinWork)
        {
            for (int i = 0; i < count; i++)
                body.Run(i);
            return;
        }
        WorkerPool.For(count, threads, body);
    }

    /// <summary>An elementwise loop's body over one chunk [start, start + length).</summary>
    internal interface IChunkBody
    {
        void Run(long start, int length);
    }

    /// <summary>body.Run(start, length) over [0, n) in chunks, one chunk per thread-sized slice.</summary>
    private static void ForChunks<TBody>(long n, int threads, TBody body) where TBody : struct, IChunkBody
    {
        if (threads <= 1 || n < ElementwiseParallelMin)
        {
            for (long start = 0; start < n; start += int.MaxValue)
                body.Run(start, (int)Math.Min(int.MaxValue, n - start));
            return;
        }
        // A few chunks per thread for balance, each a multiple of 64 floats.
        long size = (n + 4L * threads - 1) / (4L * threads);
        size = Math.Min(int.MaxValue, (size + 63) / 64 * 64);
        int chunks = (int)((n + size - 1) / size);
        For(chunks, threads, long.MaxValue, new Chunks<TBody>(n, size, body));
    }

    private readonly struct Chunks<TBody>(long n, long size, TBody body) : IParallelBody where TBody : struct, IChunkBody
    {
        public void Run(int i)
        {
            long start = i * size;
            body.Run(start, (int)Math.Min(size, n - start));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Need(ReadOnlySpan<float> span, long length, string name)
    {
        if (span.Length < length)
            throw new ArgumentException($"{name} holds {span.Length} floats, the kernel needs {length}.", name);
    }
}
