using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Backends.Cpu;

/// <summary>
/// Every CPU kernel against an independent double-precision reference written here: forwards
/// against naive loops, backwards against central finite differences of those loops (for
/// L = Σ y·R with a random R) or, where finite differences would be slow, against a naive backward
/// written from the math. Sizes are deliberately awkward (not multiples of any vector width).
/// </summary>
public sealed class CpuKernelTests
{
    private const double ForwardTolerance = 1e-5;
    private const double BackwardTolerance = 1e-4;

    // ================================================================ GEMM

    public static TheoryData<int, int, int, int> GemmSizes => new()
    {
        { 1, 1, 1, 1 },
        { 1, 1, 1, 2 },
        { 13, 29, 37, 1 },
        { 13, 29, 37, 2 },
        { 7, 301, 8, 2 },    // NT with K = r: the transposed broadcast path
        { 6, 5, 100, 2 },
        { 257, 300, 311, 1 },
        { 257, 300, 311, 2 }, // blocked and parallel
        { 64, 64, 1100, 2 },  // several K blocks
    };

    [Theory]
    [MemberData(nameof(GemmSizes))]
    public void GemmNT_matches_naive(int M, int N, int K, int threads)
    {
        foreach (bool accumulate in new[] { false, true })
        {
            float[] x = Rand(M * K, 1), w = Rand(N * K, 2), y = Rand(M * N, 3);
            double[] want = ToDouble(y);
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++)
                {
                    double s = 0;
                    for (int k = 0; k < K; k++)
                        s += (double)x[i * K + k] * w[j * K + k];
                    want[i * N + j] = (accumulate ? want[i * N + j] : 0) + 0.7 * s;
                }
            CpuKernels.GemmNT(y, x, w, M, N, K, 0.7f, accumulate, threads);
            AssertClose(want, y, ForwardTolerance, $"NT {M}x{N}x{K} accumulate={accumulate}");
        }
    }

    [Theory]
    [MemberData(nameof(GemmSizes))]
    public void GemmNN_matches_naive(int M, int N, int K, int threads)
    {
        foreach (bool accumulate in new[] { false, true })
        {
            float[] dy = Rand(M * N, 4), w = Rand(N * K, 5), dx = Rand(M * K, 6);
            double[] want = ToDouble(dx);
            for (int i = 0; i < M; i++)
                for (int k = 0; k < K; k++)
                {
                    double s = 0;
                    for (int j = 0; j < N; j++)
                        s += (double)dy[i * N + j] * w[j * K + k];
                    want[i * K + k] = (accumulate ? want[i * K + k] : 0) + 0.7 * s;
                }
            CpuKernels.GemmNN(dx, dy, w, M, N, K, 0.7f, accumulate, threads);
            AssertClose(want, dx, ForwardTolerance, $"NN {M}x{N}x{K} accumulate={accumulate}");
        }
    }

    [Theory]
    [MemberData(nameof(GemmSizes))]
    public void GemmTN_matches_naive(int M, int N, int K, int threads)
    {
        foreach (bool accumulate in new[] { false, true })
        {
            float[] dy = Rand(M * N, 7), x = Rand(M * K, 8), dw = Rand(N * K, 9);
            double[] want = ToDouble(dw);
            for (int j = 0; j < N; j++)
                for (int k = 0; k < K; k++)
                {
                    double s = 0;
                    for (int i = 0; i < M; i++)
                        s += (double)dy[i * N + j] * x[i * K + k];
                    want[j * K + k] = (accumulate ? want[j * K + k] : 0) + 0.7 * s;
                }
            CpuKernels.GemmTN(dw, dy, x, M, N, K, 0.7f, accumulate, threads);
            AssertClose(want, dw, ForwardTolerance, $"TN {M}x{N}x{K} accumulate={accumulate}");
        }
    }

    [Fact]
    public void Gemms_with_an_empty_reduction_write_zeros_or_leave_the_output()
    {
        float[] y = Rand(6, 10);
        float[] kept = (float[])y.Clone();
        CpuKernels.GemmNT(y, [], [], 2, 3, 0, 1f, true, 1);
        Assert.Equal(kept, y);
        CpuKernels.GemmNN(y, [], [], 2, 0, 3, 1f, false, 1);
        Assert.All(y, v => Assert.Equal(0f, v));
    }

    // ================================================================ embedding

    [Fact]
    public void EmbeddingForward_copies_table_rows()
    {
        const int T = 5, C = 11, vocab = 17;
        float[] table = Rand(vocab * C, 11), x = new float[T * C];
        int[] tokens = [3, 0, 16, 3, 9];
        CpuKernels.EmbeddingForward(x, tokens, table, T, C);
        for (int t = 0; t < T; t++)
            Assert.Equal(table.AsSpan(tokens[t] * C, C).ToArray(), x.AsSpan(t * C, C).ToArray());
        Assert.Throws<ArgumentException>(() => CpuKernels.EmbeddingForward(x, [0, 1, 2, 3, vocab], table, T, C));
    }

    // ================================================================ RMSNorm

    /// <summary>y = x·rstd·(offset + w) in double (offset 0: Llama, 1: Gemma).</summary>
    private static double[] RmsNormRef(double[] x, double[] w, int T, int C, double eps, double offset, double[]? rstd = null)
    {
        var y = new double[T * C];
        for (int t = 0; t < T; t++)
        {
            double ms = 0;
            for (int i = 0; i < C; i++)
                ms += x[t * C + i] * x[t * C + i];
            double r = 1 / Math.Sqrt(ms / C + eps);
            if (rstd is not null)
                rstd[t] = r;
            for (int i = 0; i < C; i++)
                y[t * C + i] = x[t * C + i] * r * (offset + w[i]);
        }
        return y;
    }

    [Theory]
    [InlineData(7, 37, 1, 0f, true)]
    [InlineData(300, 259, 2, 0f, true)]  // parallel rows
    [InlineData(7, 37, 1, 0f, false)]    // (=): garbage in dx is overwritten
    [InlineData(7, 37, 1, 1f, true)]     // Gemma's 1 + w
    [InlineData(7, 37, 2, 1f, false)]
    [InlineData(300, 259, 2, 1f, false)]
    [InlineData(5 * 4, 256, 2, 1f, false)] // a per-head norm: T·heads rows of headDim
    public void RmsNorm_forward_and_backward(int T, int C, int threads, float weightOffset, bool accumulate)
    {
        const float eps = 1e-6f;
        // Gemma's weights lie around 0, Llama's around 1.
        float[] x = Rand(T * C, 12), w = weightOffset == 0 ? Rand(C, 13, 0.5, 1.5) : Rand(C, 13, -0.5, 0.5);
        float[] y = Rand(T * C, 72), rstd = Rand(T, 73);
        CpuKernels.RmsNormForward(y, rstd, x, w, T, C, eps, weightOffset, threads);
        var wantRstd = new double[T];
        AssertClose(RmsNormRef(ToDouble(x), ToDouble(w), T, C, eps, weightOffset, wantRstd), y, ForwardTolerance, "y");
        AssertClose(wantRstd, rstd, ForwardTolerance, "rstd");

        float[] R = Rand(T * C, 14), dx = Rand(T * C, 15);
        double[] before = ToDouble(dx);
        CpuKernels.RmsNormBackward(dx, R, x, w, rstd, T, C, weightOffset, accumulate, threads);
        double[] want = T * C <= 1000
            ? Gradient(xs => Dot(RmsNormRef(xs, ToDouble(w), T, C, eps, weightOffset), R), ToDouble(x))
            : RmsNormBackwardRef(ToDouble(R), ToDouble(x), ToDouble(w), T, C, eps, weightOffset);
        AssertClose(accumulate ? Add(before, want) : want, dx, BackwardTolerance, accumulate ? "dx (+=)" : "dx (=)");
    }

    [Fact]
    public void RmsNorm_backward_reference_matches_finite_differences()
    {
        const int T = 3, C = 7;
        const double eps = 1e-6;
        double[] x = ToDouble(Rand(T * C, 74)), w = ToDouble(Rand(C, 75, -0.5, 0.5));
        float[] R = Rand(T * C, 76);
        foreach (double offset in new[] { 0.0, 1.0 })
            Assert.True(RelErr(Gradient(xs => Dot(RmsNormRef(xs, w, T, C, eps, offset), R), x), RmsNormBackwardRef(ToDouble(R), x, w, T, C, eps, offset)) < 1e-7);
    }

    /// <summary>The exact RMSNorm input gradient, via the chain rule through mean(x²) written out.</summary>
    private static double[] RmsNormBackwardRef(double[] dy, double[] x, double[] w, int T, int C, double eps, double offset)
    {
        var dx = new double[T * C];
        for (int t = 0; t < T; t++)
        {
            double ms = 0;
            for (int i = 0; i < C; i++)
                ms += x[t * C + i] * x[t * C + i];
            ms /= C;
            double r = 1 / Math.Sqrt(ms + eps), dr = 0;
            for (int i = 0; i < C; i++)
                dr += dy[t * C + i] * (offset + w[i]) * x[t * C + i];
            double dms = dr * -0.5 * Math.Pow(ms + eps, -1.5); // ∂r/∂ms
            for (int i = 0; i < C; i++)
                dx[t * C + i] = dy[t * C + i] * (offset + w[i]) * r + dms * 2 * x[t * C + i] / C;
        }
        return dx;
    }

    // ================================================================ RoPE

    private static double[] RopeRef(double[] x, float[] cos, float[] sin, int T, int heads, int hd)
    {
        var y = (double[])x.Clone();
        int half = hd / 2;
        for (int t = 0; t < T; t++)
            for (int h = 0; h < heads; h++)
                for (int j = 0; j < half; j++)
                {
                    int i1 = (t * heads + h) * hd + j, i2 = i1 + half;
                    double c = cos[t * half + j], s = sin[t * half + j];
                    y[i1] = x[i1] * c - x[i2] * s;
                    y[i2] = x[i2] * c + x[i1] * s;
                }
        return y;
    }

    [Theory]
    [InlineData(7, 3, 10)]
    [InlineData(5, 2, 42)] // half = 21: a vector part and a scalar tail
    public void Rope_forward_and_backward(int T, int heads, int hd)
    {
        var (cos, sin) = Rope.Tables(T + 3, hd, 10000.0, null); // tables longer than T, as in a trainer
        float[] x = Rand(T * heads * hd, 16);
        double[] want = RopeRef(ToDouble(x), cos, sin, T, heads, hd);
        float[] y = (float[])x.Clone();
        CpuKernels.RopeForward(y, cos, sin, T, heads, hd);
        AssertClose(want, y, ForwardTolerance, "rope forward");

        float[] R = Rand(x.Length, 17), dx = (float[])R.Clone();
        CpuKernels.RopeBackward(dx, cos, sin, T, heads, hd);
        AssertClose(Gradient(xs => Dot(RopeRef(xs, cos, sin, T, heads, hd), R), ToDouble(x)), dx, BackwardTolerance, "rope backward");
    }

    // ================================================================ attention

    /// <summary>
    /// Naive causal GQA in double: the output, the probabilities [heads, T, T] and each row's log-sum-exp
    /// [heads, T]. Scores are scaled by scale (1/√hd when null); with window W &gt; 0 query t sees only the
    /// keys s with t − s &lt; W.
    /// </summary>
    private static (double[] Out, double[] Probs, double[] Lse) AttentionRef(double[] q, double[] k, double[] v, int T, int heads, int kvHeads, int hd,
                                                                              double? scale = null, int window = 0)
    {
        var output = new double[T * heads * hd];
        var probs = new double[heads * T * T];
        var lse = new double[heads * T];
        double sc = scale ?? 1 / Math.Sqrt(hd);
        for (int h = 0; h < heads; h++)
        {
            int g = h / (heads / kvHeads);
            for (int t = 0; t < T; t++)
            {
                int first = window > 0 ? Math.Max(0, t - window + 1) : 0;
                var scores = new double[t + 1];
                double max = double.NegativeInfinity;
                for (int s = first; s <= t; s++)
                {
                    double dot = 0;
                    for (int i = 0; i < hd; i++)
                        dot += q[(t * heads + h) * hd + i] * k[(s * kvHeads + g) * hd + i];
                    scores[s] = dot * sc;
                    max = Math.Max(max, scores[s]);
                }
                double sum = 0;
                for (int s = first; s <= t; s++)
                    sum += scores[s] = Math.Exp(scores[s] - max);
                lse[h * T + t] = max + Math.Log(sum);
                for (int s = first; s <= t; s++)
                {
                    double p = scores[s] / sum;
                    probs[(h * T + t) * T + s] = p;
                    for (int i = 0; i < hd; i++)
                        output[(t * heads + h) * hd + i] += p * v[(s * kvHeads + g) * hd + i];
                }
            }
        }
        return (output, probs, lse);
    }

    /// <summary>The attention backward written from the math, for sizes too big for finite differences.</summary>
    private static (double[] Dq, double[] Dk, double[] Dv) AttentionBackwardRef(double[] dOut, double[] q, double[] k, double[] v, int T, int heads, int kvHeads, int hd,
                                                                                 double? scale = null, int window = 0)
    {
        var (_, P, _) = AttentionRef(q, k, v, T, heads, kvHeads, hd, scale, window);
        double[] dq = new double[q.Length], dk = new double[k.Length], dv = new double[v.Length];
        double sc = scale ?? 1 / Math.Sqrt(hd);
        for (int h = 0; h < heads; h++)
        {
            int g = h / (heads / kvHeads);
            for (int t = 0; t < T; t++)
            {
                // dP[s] = dOut[t]·v[s]; dv[s] += P[t,s]·dOut[t] (P is 0 outside the window)
                var dP = new double[t + 1];
                for (int s = 0; s <= t; s++)
                    for (int i = 0; i < hd; i++)
                    {
                        dP[s] += dOut[(t * heads + h) * hd + i] * v[(s * kvHeads + g) * hd + i];
                        dv[(s * kvHeads + g) * hd + i] += P[(h * T + t) * T + s] * dOut[(t * heads + h) * hd + i];
                    }
                double pdp = 0;
                for (int s = 0; s <= t; s++)
                    pdp += P[(h * T + t) * T + s] * dP[s];
                for (int s = 0; s <= t; s++)
                {
                    double dScore = P[(h * T + t) * T + s] * (dP[s] - pdp) * sc;
                    for (int i = 0; i < hd; i++)
                    {
                        dq[(t * heads + h) * hd + i] += dScore * k[(s * kvHeads + g) * hd + i];
                        dk[(s * kvHeads + g) * hd + i] += dScore * q[(t * heads + h) * hd + i];
                    }
                }
            }
        }
        return (dq, dk, dv);
    }

    [Theory]
    [InlineData(7, 6, 2, 10, 1, true)]
    [InlineData(7, 6, 2, 10, 2, true)]
    [InlineData(37, 4, 1, 6, 2, true)]    // one kv head
    [InlineData(33, 6, 2, 10, 1, false)]  // one row past a multiple of 32
    [InlineData(70, 6, 2, 10, 2, false)]  // crosses the 64-row tile boundary, parallel
    [InlineData(70, 4, 2, 17, 2, false)]
    [InlineData(45, 3, 3, 9, 2, false)]   // plain multi-head attention
    [InlineData(150, 2, 1, 64, 2, false)] // three tiles at a real head dimension
    [InlineData(70, 2, 1, 256, 2, false)] // the largest head dimension the Vulkan shaders take
    public void Attention_forward_and_backward(int T, int heads, int kvHeads, int hd, int threads, bool finiteDifferences)
        => CheckAttention(T, heads, kvHeads, hd, threads, 1 / Math.Sqrt(hd), 0, finiteDifferences);

    [Theory]
    [InlineData(37, 4, 2, 6, 1, 0.3, 5, true)]      // W = 5 < T, GQA
    [InlineData(37, 4, 2, 6, 2, 0.3, 1, true)]      // W = 1: each query sees only its own key
    [InlineData(37, 2, 1, 5, 2, 0.7, 0, true)]      // a scale that is not 1/√hd, plain causal
    [InlineData(150, 4, 2, 10, 2, 0.2, 5, false)]   // a window inside one tile: later tiles start fully masked columns
    [InlineData(200, 6, 2, 17, 2, 0.25, 70, false)] // W > the 64-key tile, not a multiple of it
    [InlineData(200, 3, 3, 9, 1, 0.5, 64, false)]   // W = the tile
    [InlineData(130, 4, 1, 8, 2, 0.35, 129, false)] // W = T − 1
    [InlineData(150, 2, 1, 64, 2, 0.0625, 100, false)] // Gemma's head scale at a real head dimension
    public void Attention_with_a_scale_and_a_sliding_window(int T, int heads, int kvHeads, int hd, int threads, double scale, int window, bool finiteDifferences)
        => CheckAttention(T, heads, kvHeads, hd, threads, scale, window, finiteDifferences);

    private void CheckAttention(int T, int heads, int kvHeads, int hd, int threads, double scale, int window, bool finiteDifferences)
    {
        float[] q = Rand(T * heads * hd, 18), k = Rand(T * kvHeads * hd, 19), v = Rand(T * kvHeads * hd, 20);
        // Garbage in the outputs: all of it must be written.
        float[] output = Rand(q.Length, 31), lse = Rand(heads * T, 21);
        CpuKernels.AttentionForward(output, lse, q, k, v, T, heads, kvHeads, hd, (float)scale, window, threads);
        var (wantOut, _, wantLse) = AttentionRef(ToDouble(q), ToDouble(k), ToDouble(v), T, heads, kvHeads, hd, scale, window);
        AssertClose(wantOut, output, ForwardTolerance, "output");
        AssertClose(wantLse, lse, ForwardTolerance, "lse");
        for (int i = 0; i < wantLse.Length; i++)
            Assert.True(Math.Abs(lse[i] - wantLse[i]) < 1e-5 * (1 + Math.Abs(wantLse[i])), $"lse[{i}] = {lse[i]}, want {wantLse[i]}");

        float[] R = Rand(q.Length, 22);
        float[] dq = Rand(q.Length, 23), dk = Rand(k.Length, 24), dv = Rand(v.Length, 25); // (=): garbage is overwritten
        CpuKernels.AttentionBackward(dq, dk, dv, R, output, lse, q, k, v, T, heads, kvHeads, hd, (float)scale, window, threads);
        double[] qd = ToDouble(q), kd = ToDouble(k), vd = ToDouble(v);
        double[] wantDq, wantDk, wantDv;
        if (finiteDifferences)
        {
            wantDq = Gradient(xs => Dot(AttentionRef(xs, kd, vd, T, heads, kvHeads, hd, scale, window).Out, R), qd);
            wantDk = Gradient(xs => Dot(AttentionRef(qd, xs, vd, T, heads, kvHeads, hd, scale, window).Out, R), kd);
            wantDv = Gradient(xs => Dot(AttentionRef(qd, kd, xs, T, heads, kvHeads, hd, scale, window).Out, R), vd);
        }
        else
            (wantDq, wantDk, wantDv) = AttentionBackwardRef(ToDouble(R), qd, kd, vd, T, heads, kvHeads, hd, scale, window);
        AssertClose(wantDq, dq, BackwardTolerance, "dq");
        AssertClose(wantDk, dk, BackwardTolerance, "dk");
        AssertClose(wantDv, dv, BackwardTolerance, "dv");
    }

    [Theory]
    [InlineData(148)] // W = T
    [InlineData(149)]
    [InlineData(int.MaxValue)]
    public void Attention_with_a_window_of_at_least_T_is_plain_causal(int window)
    {
        const int T = 148, heads = 4, kvHeads = 2, hd = 12;
        const float scale = 0.3f;
        float[] q = Rand(T * heads * hd, 77), k = Rand(T * kvHeads * hd, 78), v = Rand(T * kvHeads * hd, 79), R = Rand(q.Length, 80);
        var (causal, causalLse, causalGrads) = RunAttention(q, k, v, R, T, heads, kvHeads, hd, scale, 0);
        var (windowed, windowedLse, windowedGrads) = RunAttention(q, k, v, R, T, heads, kvHeads, hd, scale, window);
        Assert.Equal(causal, windowed);
        Assert.Equal(causalLse, windowedLse);
        for (int i = 0; i < 3; i++)
            Assert.Equal(causalGrads[i], windowedGrads[i]);
    }

    private static (float[] Out, float[] Lse, float[][] Grads) RunAttention(float[] q, float[] k, float[] v, float[] R, int T, int heads, int kvHeads, int hd,
                                                                            float scale, int window)
    {
        float[] output = new float[q.Length], lse = new float[heads * T];
        float[] dq = new float[q.Length], dk = new float[k.Length], dv = new float[v.Length];
        CpuKernels.AttentionForward(output, lse, q, k, v, T, heads, kvHeads, hd, scale, window, 2);
        CpuKernels.AttentionBackward(dq, dk, dv, R, output, lse, q, k, v, T, heads, kvHeads, hd, scale, window, 2);
        return (output, lse, [dq, dk, dv]);
    }

    [Theory]
    [InlineData(700, 0)]
    [InlineData(700, 1)]
    [InlineData(700, 5)]
    [InlineData(700, 64)]
    [InlineData(700, 100)]
    [InlineData(700, 699)]
    [InlineData(1000, 130)]
    public void A_sliding_window_skips_the_tiles_it_does_not_see(int T, int window)
    {
        // Tiles of 64 queries × 64 keys: the kernels compute exactly the tiles that hold a pair (t, s)
        // with 0 ≤ t − s < W, counted here pair by pair. Forward computes each once per head; backward
        // twice (its dq pass by query block and its dk/dv pass by key block).
        const int B = 64, heads = 2, kvHeads = 1, hd = 4;
        int blocks = (T + B - 1) / B;
        long seen = 0;
        for (int qb = 0; qb < blocks; qb++)
            for (int kb = 0; kb <= qb; kb++)
            {
                bool any = false;
                for (int t = qb * B; t < Math.Min(T, qb * B + B) && !any; t++)
                    for (int s = kb * B; s < Math.Min(T, kb * B + B) && !any; s++)
                        any = s <= t && (window == 0 || t - s < window);
                seen += any ? 1 : 0;
            }
        if (window is > 0 and <= 100)
            Assert.True(seen <= 3L * blocks, $"{seen} tiles of {blocks} block rows"); // O(T·W), not O(T²)

        float[] q = Rand(T * heads * hd, 81), k = Rand(T * kvHeads * hd, 82), v = Rand(T * kvHeads * hd, 83), R = Rand(q.Length, 84);
        float[] output = new float[q.Length], lse = new float[heads * T];
        float[] dq = new float[q.Length], dk = new float[k.Length], dv = new float[v.Length];
        Assert.Equal(heads * seen, CpuKernels.AttentionForward(output, lse, q, k, v, T, heads, kvHeads, hd, 0.5f, window, 2));
        Assert.Equal(2 * heads * seen, CpuKernels.AttentionBackward(dq, dk, dv, R, output, lse, q, k, v, T, heads, kvHeads, hd, 0.5f, window, 2));
        Assert.All(output, x => Assert.True(float.IsFinite(x)));
        Assert.All(dk, x => Assert.True(float.IsFinite(x)));
    }

    [Fact]
    public void Attention_is_stable_with_large_scores()
    {
        // Scores in the hundreds, rising along the row: the online softmax rescales at every key block
        // and a naive exp would overflow.
        const int T = 150, heads = 2, kvHeads = 1, hd = 16;
        float[] q = Rand(T * heads * hd, 32), k = Rand(T * kvHeads * hd, 33), v = Rand(T * kvHeads * hd, 34);
        for (int i = 0; i < q.Length; i++)
            q[i] *= 30;
        for (int s = 0; s < T; s++)
            for (int i = 0; i < hd; i++)
                k[s * hd + i] += 0.05f * s;
        float[] output = new float[q.Length], lse = new float[heads * T];
        CpuKernels.AttentionForward(output, lse, q, k, v, T, heads, kvHeads, hd, 1 / MathF.Sqrt(hd), 0, 2);
        var (wantOut, _, wantLse) = AttentionRef(ToDouble(q), ToDouble(k), ToDouble(v), T, heads, kvHeads, hd);
        AssertClose(wantOut, output, ForwardTolerance, "output");
        AssertClose(wantLse, lse, ForwardTolerance, "lse");
        Assert.Contains(wantLse, x => x > 100);

        float[] R = Rand(q.Length, 35), dq = new float[q.Length], dk = new float[k.Length], dv = new float[v.Length];
        CpuKernels.AttentionBackward(dq, dk, dv, R, output, lse, q, k, v, T, heads, kvHeads, hd, 1 / MathF.Sqrt(hd), 0, 2);
        var (wantDq, wantDk, wantDv) = AttentionBackwardRef(ToDouble(R), ToDouble(q), ToDouble(k), ToDouble(v), T, heads, kvHeads, hd);
        AssertClose(wantDq, dq, BackwardTolerance, "dq");
        AssertClose(wantDk, dk, BackwardTolerance, "dk");
        AssertClose(wantDv, dv, BackwardTolerance, "dv");
    }

    [Fact]
    public void Attention_backward_reference_matches_finite_differences()
    {
        // Guards the naive backward used for the big attention cases, causal and with a window.
        const int T = 7, heads = 4, kvHeads = 2, hd = 3;
        double[] q = ToDouble(Rand(T * heads * hd, 27)), k = ToDouble(Rand(T * kvHeads * hd, 28)), v = ToDouble(Rand(T * kvHeads * hd, 29));
        float[] R = Rand(q.Length, 30);
        foreach (var (scale, window) in new (double?, int)[] { (null, 0), (0.8, 3) })
        {
            var (dq, dk, dv) = AttentionBackwardRef(ToDouble(R), q, k, v, T, heads, kvHeads, hd, scale, window);
            Assert.True(RelErr(Gradient(xs => Dot(AttentionRef(xs, k, v, T, heads, kvHeads, hd, scale, window).Out, R), q), dq) < 1e-7);
            Assert.True(RelErr(Gradient(xs => Dot(AttentionRef(q, xs, v, T, heads, kvHeads, hd, scale, window).Out, R), k), dk) < 1e-7);
            Assert.True(RelErr(Gradient(xs => Dot(AttentionRef(q, k, xs, T, heads, kvHeads, hd, scale, window).Out, R), v), dv) < 1e-7);
        }
    }

    // ================================================================ GLU

    private static double Sigmoid(double x) => 1 / (1 + Math.Exp(-x));

    /// <summary>act(g) in double: silu(g) = g·σ(g), or PyTorch's gelu(approximate="tanh") written as its formula.</summary>
    private static double Activation(double g, GluActivation activation) => activation == GluActivation.Silu
        ? g * Sigmoid(g)
        : 0.5 * g * (1 + Math.Tanh(Math.Sqrt(2 / Math.PI) * (g + 0.044715 * g * g * g)));

    [Theory]
    [InlineData(1001, 1, GluActivation.Silu)]
    [InlineData(70001, 2, GluActivation.Silu)] // parallel chunks
    [InlineData(1001, 1, GluActivation.GeluTanh)]
    [InlineData(70001, 2, GluActivation.GeluTanh)]
    public void Glu_forward_and_backward(int n, int threads, GluActivation activation)
    {
        float[] gate = Rand(n, 31, -4, 4), up = Rand(n, 32), h = Rand(n, 85);
        // Saturated gates as well: σ and tanh at their tails.
        gate[0] = -30; gate[1] = 30; gate[2] = -9; gate[3] = 9; gate[4] = 0;
        CpuKernels.GluForward(h, gate, up, n, activation, threads);
        var want = new double[n];
        for (int i = 0; i < n; i++)
            want[i] = Activation(gate[i], activation) * up[i];
        AssertClose(want, h, ForwardTolerance, "h");
        for (int i = 0; i < 5; i++)
            Assert.True(Math.Abs(h[i] - want[i]) <= 1e-6 * (1 + Math.Abs(want[i])), $"h[{i}] = {h[i]} for gate {gate[i]}, want {want[i]}");

        float[] dh = Rand(n, 33), dGate = Rand(n, 34), dUp = Rand(n, 35);
        CpuKernels.GluBackward(dGate, dUp, dh, gate, up, n, activation, threads);
        // h is elementwise, so ∂L/∂gate[i] is a one-variable central difference of dh[i]·h(gate[i], up[i]).
        double[] wantGate = new double[n], wantUp = new double[n];
        const double step = 1e-5;
        for (int i = 0; i < n; i++)
        {
            double g = gate[i], u = up[i];
            double F(double gg, double uu) => dh[i] * Activation(gg, activation) * uu;
            wantGate[i] = (F(g + step, u) - F(g - step, u)) / (2 * step);
            wantUp[i] = (F(g, u + step) - F(g, u - step)) / (2 * step);
        }
        AssertClose(wantGate, dGate, BackwardTolerance, "dGate");
        AssertClose(wantUp, dUp, BackwardTolerance, "dUp");

        // dUp in place over dh gives the same values.
        float[] inPlace = (float[])dh.Clone(), dGate2 = Rand(n, 86);
        CpuKernels.GluBackward(dGate2, inPlace, inPlace, gate, up, n, activation, threads);
        Assert.Equal(dUp, inPlace);
        Assert.Equal(dGate, dGate2);
    }

    // ================================================================ linear and LoRA

    [Theory]
    [InlineData(13, 37, 29, 1, true)]
    [InlineData(13, 37, 29, 2, false)]
    [InlineData(130, 300, 270, 2, true)]
    public void Linear_forward_and_input_gradient(int T, int din, int dout, int threads, bool withBias)
    {
        float[] x = Rand(T * din, 36), w = Rand(dout * din, 37), bias = Rand(dout, 38), y = Rand(T * dout, 39);
        CpuKernels.LinearForward(y, x, w, withBias ? bias : default, T, din, dout, threads);
        var want = new double[T * dout];
        for (int t = 0; t < T; t++)
            for (int o = 0; o < dout; o++)
            {
                double s = withBias ? bias[o] : 0;
                for (int i = 0; i < din; i++)
                    s += (double)x[t * din + i] * w[o * din + i];
                want[t * dout + o] = s;
            }
        AssertClose(want, y, ForwardTolerance, "y");

        // dx = R·w, written out (the finite-difference check of the same product is the LoRA test's).
        float[] R = Rand(T * dout, 40);
        var grad = new double[T * din];
        for (int t = 0; t < T; t++)
            for (int i = 0; i < din; i++)
                for (int o = 0; o < dout; o++)
                    grad[t * din + i] += (double)R[t * dout + o] * w[o * din + i];
        foreach (bool accumulate in new[] { false, true })
        {
            float[] dx = Rand(T * din, 41);
            double[] expected = accumulate ? Add(ToDouble(dx), grad) : grad;
            CpuKernels.LinearBackwardInput(dx, R, w, T, din, dout, accumulate, threads);
            AssertClose(expected, dx, BackwardTolerance, $"dx accumulate={accumulate}");
        }
    }

    private static double[] LinearRef(double[] x, double[] w, int T, int din, int dout)
    {
        var y = new double[T * dout];
        for (int t = 0; t < T; t++)
            for (int o = 0; o < dout; o++)
            {
                double s = 0;
                for (int i = 0; i < din; i++)
                    s += x[t * din + i] * w[o * din + i];
                y[t * dout + o] = s;
            }
        return y;
    }

    /// <summary>s·(x·aᵀ)·bᵀ in double.</summary>
    private static double[] LoraRef(double[] x, double[] a, double[] b, double scale, int T, int din, int dout, int r)
    {
        var h = LinearRef(x, a, T, din, r);
        var y = LinearRef(h, b, T, r, dout);
        for (int i = 0; i < y.Length; i++)
            y[i] *= scale;
        return y;
    }

    [Theory]
    [InlineData(7, 37, 29, 5, 1, true)]
    [InlineData(7, 37, 29, 8, 2, true)]
    [InlineData(70, 130, 301, 8, 2, false)] // parallel GEMMs and the K = r transposed path
    public void Lora_forward_and_backward(int T, int din, int dout, int r, int threads, bool finiteDifferences)
    {
        const float scale = 2.5f;
        float[] x = Rand(T * din, 42), a = Rand(r * din, 43), b = Rand(dout * r, 44), y = Rand(T * dout, 45), h = Rand(T * r, 46);
        double[] want = Add(ToDouble(y), LoraRef(ToDouble(x), ToDouble(a), ToDouble(b), scale, T, din, dout, r));
        IBackend cpu = new CpuBackend(threads);
        Tensor Of(float[] values) => new CpuTensor("t", values);
        cpu.LoraForward(Of(y), Of(h), Of(x), Of(a), Of(b), scale, T, din, dout, r);
        AssertClose(want, y, ForwardTolerance, "y (+=)");

        float[] R = Rand(T * dout, 47);
        float[] dx = Rand(x.Length, 48), da = Rand(a.Length, 49), db = Rand(b.Length, 50), dh = Rand(T * r, 51);
        double[] dx0 = ToDouble(dx), da0 = ToDouble(da), db0 = ToDouble(db);
        cpu.LoraBackward(Of(dx), Of(da), Of(db), Of(h), Of(dh), Of(R), Of(x), Of(a), Of(b), scale, T, din, dout, r);
        double[] xd = ToDouble(x), ad = ToDouble(a), bd = ToDouble(b);
        double[] wantDx, wantDa, wantDb;
        if (finiteDifferences)
        {
            wantDx = Gradient(xs => Dot(LoraRef(xs, ad, bd, scale, T, din, dout, r), R), xd, linear: true);
            wantDa = Gradient(xs => Dot(LoraRef(xd, xs, bd, scale, T, din, dout, r), R), ad, linear: true);
            wantDb = Gradient(xs => Dot(LoraRef(xd, ad, xs, scale, T, din, dout, r), R), bd, linear: true);
        }
        else
            (wantDx, wantDa, wantDb) = LoraBackwardRef(ToDouble(R), xd, ad, bd, scale, T, din, dout, r);
        AssertClose(Add(dx0, wantDx), dx, BackwardTolerance, "dx (+=)");
        AssertClose(Add(da0, wantDa), da, BackwardTolerance, "dA (+=)");
        AssertClose(Add(db0, wantDb), db, BackwardTolerance, "dB (+=)");
    }

    /// <summary>
    /// y = s·x·aᵀ·bᵀ differentiated by hand: with G = ∂L/∂y, dx = s·G·b·a, da = s·(G·b)ᵀ·x,
    /// db = s·Gᵀ·(x·aᵀ). Written as plain loops, independent of the kernels' GEMM formulation.
    /// </summary>
    private static (double[] Dx, double[] Da, double[] Db) LoraBackwardRef(double[] G, double[] x, double[] a, double[] b, double s, int T, int din, int dout, int r)
    {
        double[] dx = new double[T * din], da = new double[r * din], db = new double[dout * r];
        double[] h = LinearRef(x, a, T, din, r);
        for (int t = 0; t < T; t++)
            for (int j = 0; j < r; j++)
            {
                double gb = 0; // (G·b)[t, j]
                for (int o = 0; o < dout; o++)
                {
                    gb += G[t * dout + o] * b[o * r + j];
                    db[o * r + j] += s * G[t * dout + o] * h[t * r + j];
                }
                for (int i = 0; i < din; i++)
                {
                    dx[t * din + i] += s * gb * a[j * din + i];
                    da[j * din + i] += s * gb * x[t * din + i];
                }
            }
        return (dx, da, db);
    }

    [Fact]
    public void Lora_backward_reference_matches_finite_differences()
    {
        const int T = 3, din = 5, dout = 4, r = 2;
        const double s = 1.5;
        double[] x = ToDouble(Rand(T * din, 68)), a = ToDouble(Rand(r * din, 69)), b = ToDouble(Rand(dout * r, 70));
        float[] R = Rand(T * dout, 71);
        var (dx, da, db) = LoraBackwardRef(ToDouble(R), x, a, b, s, T, din, dout, r);
        Assert.True(RelErr(Gradient(xs => Dot(LoraRef(xs, a, b, s, T, din, dout, r), R), x, linear: true), dx) < 1e-9);
        Assert.True(RelErr(Gradient(xs => Dot(LoraRef(x, xs, b, s, T, din, dout, r), R), a, linear: true), da) < 1e-9);
        Assert.True(RelErr(Gradient(xs => Dot(LoraRef(x, a, xs, s, T, din, dout, r), R), b, linear: true), db) < 1e-9);
    }

    // ================================================================ LM head + cross-entropy

    /// <summary>The logits of row t in double, capped as c·tanh(l/c) when softcap c &gt; 0.</summary>
    private static double[] LogitsRef(double[] x, double[] w, int t, int C, int V, double softcap)
    {
        var logits = new double[V];
        for (int v = 0; v < V; v++)
        {
            for (int i = 0; i < C; i++)
                logits[v] += x[t * C + i] * w[v * C + i];
            if (softcap > 0)
                logits[v] = softcap * Math.Tanh(logits[v] / softcap);
        }
        return logits;
    }

    private static double LmHeadLossRef(double[] x, double[] w, int[] targets, int T, int C, int V, double softcap = 0)
    {
        double loss = 0;
        int count = 0;
        for (int t = 0; t < T; t++)
        {
            if (targets[t] < 0)
                continue;
            var logits = LogitsRef(x, w, t, C, V, softcap);
            double max = logits.Max(), sum = 0;
            foreach (double l in logits)
                sum += Math.Exp(l - max);
            loss += max + Math.Log(sum) - logits[targets[t]];
            count++;
        }
        return count == 0 ? 0 : loss / count;
    }

    /// <summary>
    /// ∂(mean CE)/∂x = Σ_v (softmax − onehot)[t, v]·w[v] / count, from the math; with a softcap each term
    /// also carries ∂z/∂l = 1 − tanh²(l/c) = 1 − (z/c)².
    /// </summary>
    private static double[] LmHeadGradRef(double[] x, double[] w, int[] targets, int T, int C, int V, double softcap = 0)
    {
        var dx = new double[T * C];
        int count = targets.Take(T).Count(t => t >= 0);
        for (int t = 0; t < T; t++)
        {
            if (targets[t] < 0)
                continue;
            var logits = LogitsRef(x, w, t, C, V, softcap);
            double max = logits.Max(), sum = 0;
            foreach (double l in logits)
                sum += Math.Exp(l - max);
            for (int v = 0; v < V; v++)
            {
                double d = (Math.Exp(logits[v] - max) / sum - (v == targets[t] ? 1 : 0)) / count;
                if (softcap > 0)
                    d *= 1 - logits[v] / softcap * (logits[v] / softcap);
                for (int i = 0; i < C; i++)
                    dx[t * C + i] += d * w[v * C + i];
            }
        }
        return dx;
    }

    [Theory]
    [InlineData(9, 24, 301, 64, 1, true, true, 0f)]    // partial last chunk (301 = 4·64 + 45), rows labelled −1
    [InlineData(9, 24, 301, 64, 2, true, false, 0f)]   // every row labelled
    [InlineData(9, 24, 301, 1000, 1, true, true, 0f)]  // one chunk bigger than V
    [InlineData(64, 48, 1001, 256, 2, false, true, 0f)] // parallel products, partial last chunk
    [InlineData(64, 48, 1001, 256, 2, false, false, 0f)]
    [InlineData(9, 24, 301, 64, 1, true, true, 2f)]    // softcap 2: logits of about ±4 are capped hard
    [InlineData(9, 24, 301, 64, 2, true, false, 30f)]  // Gemma 2's final cap, mild here
    [InlineData(64, 48, 1001, 256, 2, false, true, 3f)]
    public void LmHeadCrossEntropy_matches_full_softmax(int T, int C, int V, int chunk, int threads, bool finiteDifferences, bool someIgnored, float softcap)
    {
        float[] x = Rand(T * C, 52), w = Rand(V * C, 53);
        var rng = new Random(54);
        int[] targets = Enumerable.Range(0, T).Select(t => someIgnored && t % 4 == 1 ? -1 : rng.Next(V)).ToArray();
        targets[0] = V - 1; // a label in the partial last chunk
        float[] dx = Rand(T * C, 55), logits = new float[T * Math.Min(chunk, V)];

        float loss = CpuKernels.LmHeadCrossEntropy(dx, logits, x, w, targets, T, C, V, chunk, softcap, threads);

        double[] xd = ToDouble(x), wd = ToDouble(w);
        double wantLoss = LmHeadLossRef(xd, wd, targets, T, C, V, softcap);
        Assert.True(Math.Abs(loss - wantLoss) / Math.Abs(wantLoss) < ForwardTolerance, $"loss {loss} vs {wantLoss}");
        double[] wantDx = finiteDifferences
            ? Gradient(xs => LmHeadLossRef(xs, wd, targets, T, C, V, softcap), xd)
            : LmHeadGradRef(xd, wd, targets, T, C, V, softcap);
        AssertClose(wantDx, dx, BackwardTolerance, "dx (=)");
        for (int t = 0; t < T; t++)
            if (targets[t] < 0)
                Assert.All(dx.AsSpan(t * C, C).ToArray(), d => Assert.Equal(0f, d));
        if (softcap > 0 && softcap < 5)
            Assert.True(Math.Abs(wantLoss - LmHeadLossRef(xd, wd, targets, T, C, V)) > 0.01, "the cap changes the loss");
    }

    [Fact]
    public void LmHeadCrossEntropy_gradient_reference_matches_finite_differences()
    {
        const int T = 4, C = 5, V = 23;
        double[] x = ToDouble(Rand(T * C, 56)), w = ToDouble(Rand(V * C, 57));
        int[] targets = [3, -1, 22, 0];
        foreach (double softcap in new[] { 0, 1.5 })
            Assert.True(RelErr(Gradient(xs => LmHeadLossRef(xs, w, targets, T, C, V, softcap), x), LmHeadGradRef(x, w, targets, T, C, V, softcap)) < 1e-7);
    }

    [Fact]
    public void LmHeadCrossEntropy_with_no_label_is_zero()
    {
        const int T = 3, C = 8, V = 50;
        float[] dx = Rand(T * C, 58), logits = new float[T * 16];
        float loss = CpuKernels.LmHeadCrossEntropy(dx, logits, Rand(T * C, 59), Rand(V * C, 60), [-1, -1, -1], T, C, V, 16, 0f, 1);
        Assert.Equal(0f, loss);
        Assert.All(dx, d => Assert.Equal(0f, d));
    }

    [Fact]
    public void LmHeadCrossEntropy_is_stable_for_large_logits()
    {
        // Logits around ±300: exp would overflow float without the running max.
        const int T = 4, C = 16, V = 97;
        float[] x = Rand(T * C, 61, -6, 6), w = Rand(V * C, 62, -6, 6), dx = new float[T * C], logits = new float[T * 32];
        int[] targets = [5, 96, -1, 40];
        foreach (float softcap in new[] { 0f, 30f })
        {
            float loss = CpuKernels.LmHeadCrossEntropy(dx, logits, x, w, targets, T, C, V, 32, softcap, 1);
            double want = LmHeadLossRef(ToDouble(x), ToDouble(w), targets, T, C, V, softcap);
            Assert.True(float.IsFinite(loss) && Math.Abs(loss - want) / want < ForwardTolerance, $"softcap {softcap}: loss {loss} vs {want}");
            AssertClose(LmHeadGradRef(ToDouble(x), ToDouble(w), targets, T, C, V, softcap), dx, BackwardTolerance, $"softcap {softcap}: dx");
        }
    }

    // ================================================================ decoding

    /// <summary>RoPE in double of rows whose positions start at <paramref name="position"/>.</summary>
    private static double[] RopeAtRef(double[] x, float[] cos, float[] sin, int position, int T, int heads, int hd)
    {
        var y = (double[])x.Clone();
        int half = hd / 2;
        for (int t = 0; t < T; t++)
            for (int h = 0; h < heads; h++)
                for (int j = 0; j < half; j++)
                {
                    int i1 = (t * heads + h) * hd + j, i2 = i1 + half;
                    double c = cos[(position + t) * half + j], s = sin[(position + t) * half + j];
                    y[i1] = x[i1] * c - x[i2] * s;
                    y[i2] = x[i2] * c + x[i1] * s;
                }
        return y;
    }

    [Theory]
    [InlineData(17, 11, 4, 3, 10)]
    [InlineData(17, 16, 1, 2, 42)] // the table's last row; half = 21: a vector part and a scalar tail
    [InlineData(9, 0, 9, 2, 42)]   // from position 0: RopeForward itself
    public void RopeForwardAt_rotates_as_RopeForward_does_the_same_rows_of_a_longer_sequence(int L, int position, int T, int heads, int hd)
    {
        using var backend = new CpuBackend(2);
        var (cos, sin) = Rope.Tables(L, hd, 10000.0, null);
        int row = heads * hd;
        float[] sequence = Rand(L * row, 70);
        using var whole = backend.Upload("whole", sequence);
        backend.RopeForward(whole, backend.Upload("cos", cos), backend.Upload("sin", sin), L, heads, hd);
        var rotated = new float[L * row];
        backend.Download(whole, rotated);

        float[] rows = sequence.AsSpan(position * row, T * row).ToArray();
        using var x = backend.Upload("x", rows);
        backend.RopeForwardAt(x, backend.Upload("cos", cos), backend.Upload("sin", sin), position, T, heads, hd);
        var got = new float[T * row];
        backend.Download(x, got);
        Assert.Equal(rotated.AsSpan(position * row, T * row).ToArray(), got);
        AssertClose(RopeAtRef(ToDouble(rows), cos, sin, position, T, heads, hd), got, ForwardTolerance, "rope at a position");

        // Rows past the tables are an error, not a read beyond them.
        Assert.ThrowsAny<ArgumentException>(() => backend.RopeForwardAt(x, backend.Upload("cos", cos), backend.Upload("sin", sin), L - T + 1, T, heads, hd));
    }

    /// <summary>
    /// One token's attention in double, naively: for head h (kv head h / (heads / kvHeads)) the softmax of
    /// scale·q[h]·k[s] over s &lt; count, then Σ_s p[s]·v[s].
    /// </summary>
    private static double[] AttentionDecodeRef(double[] q, double[] k, double[] v, int count, int heads, int kvHeads, int hd, double scale)
    {
        var output = new double[heads * hd];
        int kvWidth = kvHeads * hd;
        for (int h = 0; h < heads; h++)
        {
            int g = h / (heads / kvHeads);
            var scores = new double[count];
            for (int s = 0; s < count; s++)
                for (int d = 0; d < hd; d++)
                    scores[s] += scale * q[h * hd + d] * k[s * kvWidth + g * hd + d];
            double max = scores.Max(), sum = scores.Sum(x => Math.Exp(x - max));
            for (int s = 0; s < count; s++)
            {
                double p = Math.Exp(scores[s] - max) / sum;
                for (int d = 0; d < hd; d++)
                    output[h * hd + d] += p * v[s * kvWidth + g * hd + d];
            }
        }
        return output;
    }

    [Theory]
    [InlineData(1, 4, 2, 16, 1.0)]     // the first token: its own value
    [InlineData(37, 6, 2, 10, 1.0)]    // GQA, three query heads per kv head
    [InlineData(37, 4, 4, 10, 1.7)]    // no grouping, another scale
    [InlineData(301, 4, 1, 256, 1.0)]  // Gemma 3's heads of 256 on one kv head
    [InlineData(1999, 14, 2, 64, 1.0)] // Qwen2.5-0.5B's heads over a long cache
    public void AttentionDecode_matches_a_naive_softmax_over_the_cache(int count, int heads, int kvHeads, int hd, double scaleFactor)
    {
        int kvWidth = kvHeads * hd, capacity = count + 5;
        float scale = (float)(scaleFactor / Math.Sqrt(hd));
        float[] q = Rand(heads * hd, 71, -2, 2), k = Rand(capacity * kvWidth, 72), v = Rand(capacity * kvWidth, 73), output = Rand(heads * hd, 74);
        // The rows past count are the unused rest of the cache: NaN would spread into the output if read.
        k.AsSpan(count * kvWidth).Fill(float.NaN);
        v.AsSpan(count * kvWidth).Fill(float.NaN);
        CpuKernels.AttentionDecode(output, q, k, v, count, heads, kvHeads, hd, scale);
        double[] want = AttentionDecodeRef(ToDouble(q), ToDouble(k), ToDouble(v), count, heads, kvHeads, hd, scale);
        AssertClose(want, output, ForwardTolerance, $"decode over {count} keys");
        if (count == 1)
            for (int h = 0; h < heads; h++)
                Assert.Equal(v.AsSpan(h / (heads / kvHeads) * hd, hd).ToArray(), output.AsSpan(h * hd, hd).ToArray());

        // The order of the cache rows does not matter (a sliding layer's cache is a ring).
        var order = Enumerable.Range(0, count).OrderBy(s => (s * 7919) % count).ToArray();
        float[] k2 = (float[])k.Clone(), v2 = (float[])v.Clone(), shuffled = new float[heads * hd];
        for (int s = 0; s < count; s++)
        {
            k.AsSpan(order[s] * kvWidth, kvWidth).CopyTo(k2.AsSpan(s * kvWidth));
            v.AsSpan(order[s] * kvWidth, kvWidth).CopyTo(v2.AsSpan(s * kvWidth));
        }
        CpuKernels.AttentionDecode(shuffled, q, k2, v2, count, heads, kvHeads, hd, scale);
        AssertClose(want, shuffled, ForwardTolerance, "decode over the cache in another order");
    }

    [Fact]
    public void AttentionDecode_equals_the_last_row_of_causal_attention()
    {
        const int T = 45, heads = 6, kvHeads = 2, hd = 10;
        float scale = 1f / MathF.Sqrt(hd);
        float[] q = Rand(T * heads * hd, 75), k = Rand(T * kvHeads * hd, 76), v = Rand(T * kvHeads * hd, 77);
        float[] full = new float[T * heads * hd], lse = new float[heads * T], decoded = new float[heads * hd];
        CpuKernels.AttentionForward(full, lse, q, k, v, T, heads, kvHeads, hd, scale, 0, 2);
        CpuKernels.AttentionDecode(decoded, q.AsSpan((T - 1) * heads * hd).ToArray(), k, v, T, heads, kvHeads, hd, scale);
        AssertClose(ToDouble(full.AsSpan((T - 1) * heads * hd).ToArray()), decoded, ForwardTolerance, "the last row");
    }

    [Fact]
    public void AttentionDecode_refuses_what_it_cannot_compute()
    {
        float[] q = new float[4 * 8], kv = new float[3 * 2 * 8], output = new float[4 * 8];
        Assert.Throws<ArgumentOutOfRangeException>(() => CpuKernels.AttentionDecode(output, q, kv, kv, 0, 4, 2, 8, 1f)); // no key
        Assert.Throws<ArgumentException>(() => CpuKernels.AttentionDecode(output, q, kv, kv, 3, 4, 3, 8, 1f));         // 4 heads on 3 kv heads
        Assert.ThrowsAny<ArgumentException>(() => CpuKernels.AttentionDecode(output, q, kv, kv, 4, 4, 2, 8, 1f));      // past the cache's 3 rows
    }

    /// <summary>Logits [T, V] = x·wᵀ in double, capped as c·tanh(l/c) when c &gt; 0.</summary>
    private static double[] LmHeadLogitsRef(double[] x, double[] w, int T, int C, int V, double softcap)
    {
        var logits = new double[T * V];
        for (int t = 0; t < T; t++)
            LogitsRef(x, w, t, C, V, softcap).CopyTo(logits, t * V);
        return logits;
    }

    [Theory]
    [InlineData(1, 48, 301, 0f, 1f)]
    [InlineData(3, 48, 301, 0f, 1f)]
    [InlineData(3, 48, 301, 2f, 1f)]   // a cap below most logits (about ±5 here)
    [InlineData(5, 32, 1001, 30f, 8f)] // logits around ±100: deep in the cap's saturation
    public void LmHeadLogits_with_float_and_4bit_weights(int T, int C, int V, float softcap, float weightScale)
    {
        using var backend = new CpuBackend(2);
        float[] x = Rand(T * C, 78), w = Rand(V * C, 79, -weightScale, weightScale);
        var q4 = Q4.Quantize("lm_head", w, V, C, groupSize: 16);
        var dequantized = new float[V * C];
        q4.Dequantize(dequantized);
        foreach (var (what, weight, values) in new[] { ("F32", backend.Upload("w", w), w), ("4-bit", (Tensor)new CpuQ4Tensor(q4), dequantized) })
        {
            using var logits = backend.Upload("logits", Rand(T * V, 80));
            backend.LmHeadLogits(logits, backend.Upload("x", x), weight, T, C, V, softcap);
            var got = new float[T * V];
            backend.Download(logits, got);
            double[] want = LmHeadLogitsRef(ToDouble(x), ToDouble(values), T, C, V, softcap);
            AssertClose(want, got, ForwardTolerance, $"{what} logits, softcap {softcap}");
            if (softcap > 0)
                Assert.All(got, l => Assert.InRange(l, -softcap, softcap));
        }
    }

    [Fact]
    public void CopyRange_copies_between_offsets_and_refuses_ranges_outside_the_tensors()
    {
        using var backend = new CpuBackend(1);
        float[] source = Rand(20, 81);
        using var src = backend.Upload("src", source);
        using var dst = backend.Allocate("dst", 30);
        backend.CopyRange(dst, 7, src, 3, 11);
        backend.CopyRange(dst, 29, src, 19, 1);  // the last element of each
        backend.CopyRange(dst, 30, src, 20, 0);  // nothing, at the very ends
        backend.CopyRange(src, 0, src, 10, 10);  // within one tensor, ranges apart
        var got = new float[30];
        backend.Download(dst, got);
        var want = new float[30];
        source.AsSpan(3, 11).CopyTo(want.AsSpan(7));
        want[29] = source[19];
        Assert.Equal(want, got);
        var moved = new float[20];
        backend.Download(src, moved);
        Assert.Equal([.. source.AsSpan(10, 10), .. source.AsSpan(10, 10)], moved);

        Assert.Throws<ArgumentOutOfRangeException>(() => backend.CopyRange(dst, 0, src, 10, 11)); // reads past src
        Assert.Throws<ArgumentOutOfRangeException>(() => backend.CopyRange(dst, 25, src, 0, 6));  // writes past dst
        Assert.Throws<ArgumentOutOfRangeException>(() => backend.CopyRange(dst, -1, src, 0, 1));
        Assert.Throws<ArgumentOutOfRangeException>(() => backend.CopyRange(dst, 0, src, -1, 1));
        Assert.Throws<ArgumentOutOfRangeException>(() => backend.CopyRange(dst, 0, src, 0, -1));
        backend.Download(dst, got);
        Assert.Equal(want, got); // a refused copy writes nothing
    }

    // ================================================================ the backend

    [Fact]
    public void CpuBackend_buffers_and_name()
    {
        using var backend = new CpuBackend(2);
        Assert.Equal("cpu (2 threads)", backend.Name);
        Assert.Equal($"cpu ({Environment.ProcessorCount} thread{(Environment.ProcessorCount == 1 ? "" : "s")})", new CpuBackend().Name);

        using var a = backend.Allocate("a", 5);
        using var b = backend.Upload("b", [1, 2, 3, 4, 5]);
        var host = new float[5];
        backend.Download(a, host);
        Assert.Equal(new float[5], host);
        backend.AddInPlace(a, b, 4);
        backend.AddInPlace(a, b, 5);
        backend.Download(a, host);
        Assert.Equal([2f, 4, 6, 8, 5], host);
        backend.Write(a, [9, 9]);
        backend.Copy(b, a, 3);
        backend.Zero(a, 1);
        backend.Download(a, host);
        Assert.Equal([0f, 9, 6, 8, 5], host);
        backend.Download(b, host);
        Assert.Equal([9f, 9, 6, 4, 5], host);
        Assert.Throws<ArgumentOutOfRangeException>(() => backend.Zero(a, 6));
    }

    [Fact]
    public void CpuBackend_runs_a_linear_layer_with_lora()
    {
        const int T = 5, din = 19, dout = 11, r = 3;
        using IBackend backend = new CpuBackend(2);
        float[] xs = Rand(T * din, 63), ws = Rand(dout * din, 64), bs = Rand(dout, 65), As = Rand(r * din, 66), Bs = Rand(dout * r, 67);
        using var x = backend.Upload("x", xs);
        using var w = backend.Upload("w", ws);
        using var bias = backend.Upload("bias", bs);
        using var a = backend.Upload("a", As);
        using var b = backend.Upload("b", Bs);
        using var y = backend.Allocate("y", T * dout);
        using var h = backend.Allocate("h", T * r);
        backend.LinearForward(y, x, w, bias, T, din, dout);
        backend.LoraForward(y, h, x, a, b, 0.5f, T, din, dout, r);
        var got = new float[T * dout];
        backend.Download(y, got);
        double[] want = Add(LinearRef(ToDouble(xs), ToDouble(ws), T, din, dout), LoraRef(ToDouble(xs), ToDouble(As), ToDouble(Bs), 0.5, T, din, dout, r));
        for (int t = 0; t < T; t++)
            for (int o = 0; o < dout; o++)
                want[t * dout + o] += bs[o];
        AssertClose(want, got, ForwardTolerance, "y");
    }

    // ================================================================ helpers

    private static float[] Rand(int n, int seed, double lo = -1, double hi = 1)
    {
        var rng = new Random(seed);
        var a = new float[n];
        for (int i = 0; i < n; i++)
            a[i] = (float)(lo + (hi - lo) * rng.NextDouble());
        return a;
    }

    private static double[] ToDouble(float[] a) => Array.ConvertAll(a, v => (double)v);

    private static double[] Add(double[] a, double[] b) => a.Zip(b, (p, q) => p + q).ToArray();

    private static double Dot(double[] y, float[] r)
    {
        double s = 0;
        for (int i = 0; i < y.Length; i++)
            s += y[i] * r[i];
        return s;
    }

    /// <summary>
    /// ∂loss/∂x by central differences in double. For a loss linear in x one step is exact up to
    /// rounding, so a larger step is used there.
    /// </summary>
    private static double[] Gradient(Func<double[], double> loss, double[] x, bool linear = false)
    {
        double step = linear ? 1e-2 : 1e-5;
        var g = new double[x.Length];
        for (int i = 0; i < x.Length; i++)
        {
            double xi = x[i];
            x[i] = xi + step;
            double up = loss(x);
            x[i] = xi - step;
            double down = loss(x);
            x[i] = xi;
            g[i] = (up - down) / (2 * step);
        }
        return g;
    }

    private static double RelErr(double[] want, double[] got)
    {
        double diff = 0, norm = 0;
        for (int i = 0; i < want.Length; i++)
        {
            diff += (got[i] - want[i]) * (got[i] - want[i]);
            norm += want[i] * want[i];
        }
        return norm == 0 ? Math.Sqrt(diff) : Math.Sqrt(diff / norm);
    }

    private static void AssertClose(double[] want, float[] got, double tolerance, string what)
    {
        Assert.Equal(want.Length, got.Length);
        Assert.All(got, v => Assert.True(float.IsFinite(v), $"{what}: non-finite value"));
        double err = RelErr(want, ToDouble(got));
        Assert.True(err < tolerance, $"{what}: relative error {err:E3} ≥ {tolerance:E0}");
    }
}

/// <summary>Runs alone, after the other tests: see <see cref="NarrowVectorWidthTests"/>.</summary>
[CollectionDefinition(nameof(NarrowVectorWidthTests), DisableParallelization = true)]
public sealed class NarrowVectorWidthCollection;

/// <summary>
/// The narrower vector widths (AVX2, SSE, scalar) compute the same products and attention.
/// <see cref="CpuKernels.MaxVectorWidth"/> is process-wide, so these run alone: a kernel of another test
/// running meanwhile would round differently, and a test that compares two runs bit for bit (a killed and
/// resumed training run) would fail.
/// </summary>
[Collection(nameof(NarrowVectorWidthTests))]
public sealed class NarrowVectorWidthTests
{
    [Theory]
    [InlineData(8)]
    [InlineData(4)]
    [InlineData(1)]
    public void Kernels_match_naive_at_narrower_vector_widths(int width)
    {
        var kernels = new CpuKernelTests();
        int saved = CpuKernels.MaxVectorWidth;
        try
        {
            CpuKernels.MaxVectorWidth = width;
            foreach (var (M, N, K) in new[] { (13, 29, 37), (7, 301, 8), (70, 90, 130) })
            {
                kernels.GemmNT_matches_naive(M, N, K, 2);
                kernels.GemmNN_matches_naive(M, N, K, 2);
                kernels.GemmTN_matches_naive(M, N, K, 2);
            }
            kernels.Attention_forward_and_backward(33, 6, 2, 10, 1, false);
            kernels.Attention_forward_and_backward(70, 4, 2, 17, 2, false);
            kernels.Attention_with_a_scale_and_a_sliding_window(150, 4, 2, 10, 2, 0.2, 5, false);
            kernels.Attention_with_a_scale_and_a_sliding_window(200, 6, 2, 17, 2, 0.25, 70, false);
        }
        finally
        {
            CpuKernels.MaxVectorWidth = saved;
        }
    }

    [Theory]
    [InlineData(8)]
    [InlineData(4)]
    [InlineData(1)]
    public void The_4bit_products_match_at_narrower_vector_widths(int width)
    {
        var q4 = new Q4Tests();
        int saved = CpuKernels.MaxVectorWidth;
        try
        {
            CpuKernels.MaxVectorWidth = width;
            q4.Linear_forward_and_input_gradient_with_4bit_weights_match_the_float_kernels(37, 200, 61, 40, 2);
            q4.Linear_forward_and_input_gradient_with_4bit_weights_match_the_float_kernels(13, 96, 53, 32, 1);
            foreach (var (T, din, dout, groupSize, threads) in new[] { (1, 896, 301, 64, 2), (3, 200, 37, 40, 1), (3, 1000, 3, 40, 2), (2, 136, 9, 8, 1), (1, 96, 5, 32, 2), (5, 200, 37, 40, 2) })
                q4.Linear_forward_for_a_few_rows_matches_a_float64_product_of_the_dequantized_weights(T, din, dout, groupSize, threads);
        }
        finally
        {
            CpuKernels.MaxVectorWidth = saved;
        }
    }

    [Theory]
    [InlineData(8)]
    [InlineData(4)]
    [InlineData(1)]
    public void The_16bit_conversions_and_products_match_at_narrower_vector_widths(int width)
    {
        using var tests = new Float16Tests();
        int saved = CpuKernels.MaxVectorWidth;
        try
        {
            CpuKernels.MaxVectorWidth = width;
            tests.Every_bit_pattern_converts_exactly(Float16Format.BF16);
            tests.Every_bit_pattern_converts_exactly(Float16Format.F16);
            tests.Linear_forward_and_input_gradient_with_16bit_weights_match_a_float64_product(37, 203, 61, 2);
            tests.Linear_forward_and_input_gradient_with_16bit_weights_match_a_float64_product(1, 896, 301, 2);
        }
        finally
        {
            CpuKernels.MaxVectorWidth = saved;
        }
    }
}
