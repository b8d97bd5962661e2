using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Training;
using Xunit.Abstractions;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>
/// Every kernel of <see cref="VulkanBackend"/> (so every shader) against <see cref="CpuBackend"/> on random
/// inputs at sizes that are not multiples of any tile or workgroup: relative error ‖vk − cpu‖/‖cpu‖ under
/// 1e-5 for forward kernels and 1e-4 for backward ones. Runs with the validation layer when it is installed,
/// and fails on any validation error.
/// </summary>
public sealed class VulkanKernelTests(VulkanBackendFixture fixture, ITestOutputHelper output) : IClassFixture<VulkanBackendFixture>
{
    private const double Forward = 1e-5, Backward = 1e-4;

    private readonly Random _rng = new(1234);

    /// <summary>A tensor of a parity check: its initial contents and whether the result is compared.</summary>
    private sealed record Operand(string Name, float[] Data, bool Compare = false);

    private Operand In(string name, long n, float scale = 1f) => new(name, Random(n, scale));

    private Operand Out(string name, long n, float scale = 1f) => new(name, Random(n, scale), Compare: true);

    /// <summary>An output a kernel must overwrite (=): prefilled with NaN, which any read of it would spread.</summary>
    private static Operand Overwritten(string name, long n) => new(name, Enumerable.Repeat(float.NaN, (int)n).ToArray(), Compare: true);

    private float[] Random(long n, float scale = 1f) => ModelFixture.Normal(_rng, n, 0, scale);

    /// <summary>Runs <paramref name="op"/> on both backends from the same tensors and compares the marked ones.</summary>
    private Dictionary<string, float[]> Parity(double tolerance, Action<IBackend, Func<string, Tensor>> op, params Operand[] operands)
        => Parity(fixture.Backend, tolerance, op, operands);

    private Dictionary<string, float[]> Parity(VulkanBackend vulkan, double tolerance, Action<IBackend, Func<string, Tensor>> op, params Operand[] operands)
    {
        var cpu = new CpuBackend(2);
        var expected = Run(cpu, op, operands);
        var actual = Run(vulkan, op, operands);
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
        foreach (var o in operands.Where(o => o.Compare))
        {
            double error = ModelFixture.RelativeError(actual[o.Name], expected[o.Name]);
            output.WriteLine($"{o.Name}: relative error {error:E2}");
            Assert.True(error < tolerance, $"{o.Name}: relative error {error:E2} ≥ {tolerance:E0}");
        }
        return actual;
    }

    private static Dictionary<string, float[]> Run(IBackend backend, Action<IBackend, Func<string, Tensor>> op, Operand[] operands)
    {
        var tensors = operands.ToDictionary(o => o.Name, o => backend.Upload(o.Name, o.Data));
        op(backend, name => tensors[name]);
        var results = new Dictionary<string, float[]>();
        foreach (var o in operands)
        {
            results[o.Name] = new float[o.Data.Length];
            backend.Download(tensors[o.Name], results[o.Name]);
            tensors[o.Name].Dispose();
        }
        return results;
    }

    // ---------------------------------------------------------------- elementwise

    [VulkanFact]
    public void ZeroCopyAdd()
    {
        const int n = 1001;
        var r = Parity(Forward, (b, t) =>
        {
            b.Zero(t("z"), 777);
            b.Copy(t("c"), t("src"), 999);
            b.AddInPlace(t("a"), t("src"), n);
        }, Out("z", n), Out("c", n), Out("a", n), In("src", n));
        Assert.All(r["z"].Take(777), v => Assert.Equal(0f, v));
        Assert.NotEqual(0f, r["z"][777]); // beyond n: untouched
    }

    [VulkanFact]
    public void Scale()
    {
        const int n = 1003;
        var r = Parity(Forward, (b, t) =>
        {
            b.Scale(t("x"), MathF.Sqrt(640), n - 2); // Gemma 3 270m's embedding scale
            b.Scale(t("y"), -0.5f, n);
        }, Out("x", n), Out("y", n));
        Assert.NotEqual(0f, r["x"][n - 1]); // beyond n: untouched (and compared)
    }

    [VulkanTheory]
    [InlineData(GluActivation.Silu)]
    [InlineData(GluActivation.GeluTanh)]
    public void Glu(GluActivation activation)
    {
        const int n = 1003;
        var gate = In("gate", n, 3);
        Parity(Forward, (b, t) => b.GluForward(t("h"), t("gate"), t("up"), n, activation), Overwritten("h", n), gate, In("up", n));
        Parity(Backward, (b, t) => b.GluBackward(t("dGate"), t("dUp"), t("dh"), t("gate"), t("up"), n, activation),
            Overwritten("dGate", n), Overwritten("dUp", n), In("dh", n), gate, In("up", n));
        // In place: dUp is dh's own tensor, as the trainer passes it.
        Parity(Backward, (b, t) => b.GluBackward(t("dGate"), t("dh"), t("dh"), t("gate"), t("up"), n, activation),
            Out("dGate", n), Out("dh", n), gate, In("up", n));

        // Gates far out, where e^x overflows: a tanh computed as (e^2x − 1)/(e^2x + 1) gives NaN there.
        float[] far = [-1e4f, -300f, -60f, -20f, -9.5f, -4f, 4f, 9.5f, 20f, 60f, 300f];
        var farGate = new Operand("gate", far);
        int m = far.Length;
        var h = Parity(Forward, (b, t) => b.GluForward(t("h"), t("gate"), t("up"), m, activation), Out("h", m), farGate, In("up", m));
        var d = Parity(Backward, (b, t) => b.GluBackward(t("dGate"), t("dh"), t("dh"), t("gate"), t("up"), m, activation),
            Out("dGate", m), Out("dh", m), farGate, In("up", m));
        Assert.All(h["h"].Concat(d["dGate"]).Concat(d["dh"]), v => Assert.True(float.IsFinite(v)));
    }

    [VulkanFact]
    public void Embedding()
    {
        const int T = 7, C = 37, vocab = 53;
        int[] tokens = [3, 52, 0, 3, 17, 40, 9, 11];
        Parity(Forward, (b, t) => b.EmbeddingForward(t("x"), tokens, t("table"), T, C), Out("x", T * C + 5), In("table", vocab * C));
    }

    // ---------------------------------------------------------------- norms and RoPE

    [VulkanTheory]
    [InlineData(7, 37, 0f)]
    [InlineData(3, 533, 0f)]      // wider than a workgroup: the strided loops and the reduction
    [InlineData(7, 37, 1f)]       // Gemma's (1 + w)
    [InlineData(3, 533, 1f)]
    [InlineData(13 * 3, 16, 0f)]  // a per-head norm (Qwen3's q_norm): T·heads rows of headDim, narrower than a workgroup
    [InlineData(7 * 4, 16, 1f)]   // Gemma 3's q_norm on narrow heads
    [InlineData(5 * 4, 256, 1f)]  // Gemma 3's heads of 256
    public void RmsNorm(int T, int C, float weightOffset)
    {
        // Gemma stores its norm weights around 0, Llama around 1.
        var w = new Operand("w", Random(C, 0.3f).Select(v => v + 1 - weightOffset).ToArray());
        Parity(Forward, (b, t) => b.RmsNormForward(t("y"), t("rstd"), t("x"), t("w"), T, C, 1e-5f, weightOffset),
            Out("y", T * C), Out("rstd", T), In("x", T * C), w);
        foreach (bool accumulate in new[] { true, false })
            Parity(Backward, (b, t) =>
            {
                b.RmsNormForward(t("y"), t("rstd"), t("x"), t("w"), T, C, 1e-6f, weightOffset);
                b.RmsNormBackward(t("dx"), t("dy"), t("x"), t("w"), t("rstd"), T, C, weightOffset, accumulate);
            }, accumulate ? Out("dx", T * C) : Overwritten("dx", T * C), In("dy", T * C), In("x", T * C), w, In("y", T * C), In("rstd", T));
    }

    [VulkanFact]
    public void Rope()
    {
        const int T = 7, heads = 6, headDim = 10;
        var (cos, sin) = Runtime.Backends.Rope.Tables(T + 2, headDim, 10000, null);
        var tables = new[] { new Operand("cos", cos), new Operand("sin", sin) };
        Parity(Forward, (b, t) => b.RopeForward(t("x"), t("cos"), t("sin"), T, heads, headDim), [Out("x", T * heads * headDim), .. tables]);
        Parity(Backward, (b, t) => b.RopeBackward(t("dx"), t("cos"), t("sin"), T, heads, headDim), [Out("dx", T * heads * headDim), .. tables]);
    }

    [VulkanTheory]
    [InlineData(11, 3, 5, 42)]  // half = 21: T·heads·half is not a multiple of the workgroup
    [InlineData(15, 1, 6, 10)]  // one new token at the tables' last row
    [InlineData(0, 4, 2, 64)]
    public void RopeAt(int position, int T, int heads, int headDim)
    {
        var (cos, sin) = Runtime.Backends.Rope.Tables(16, headDim, 10000, null);
        var tables = new[] { new Operand("cos", cos), new Operand("sin", sin) };
        Parity(Forward, (b, t) => b.RopeForwardAt(t("x"), t("cos"), t("sin"), position, T, heads, headDim), [Out("x", T * heads * headDim), .. tables]);
        var vk = fixture.Backend;
        using Tensor x = vk.Allocate("x", T * heads * headDim), c = vk.Upload("cos", cos), s = vk.Upload("sin", sin);
        Assert.ThrowsAny<ArgumentException>(() => vk.RopeForwardAt(x, c, s, 16 - T + 1, T, heads, headDim)); // past the tables
        Assert.Throws<ArgumentOutOfRangeException>(() => vk.RopeForwardAt(x, c, s, -1, T, heads, headDim));
    }

    [VulkanFact]
    public void CopyRange()
    {
        const int n = 1001;
        Parity(Forward, (b, t) =>
        {
            b.CopyRange(t("dst"), 7, t("src"), 300, 555);
            b.CopyRange(t("dst"), n - 1, t("src"), 0, 1);
            b.CopyRange(t("dst"), n, t("src"), n, 0);
            b.CopyRange(t("src"), 0, t("src"), 600, 400); // within one tensor, after it was read above
            b.AddInPlace(t("dst"), t("src"), n);           // in order with the kernels around it
            b.CopyRange(t("cache"), 2 * 64, t("dst"), 5, 64); // a k row into row 2 of a cache
        }, Out("dst", n), Out("src", n), Out("cache", 5 * 64));
        var vk = fixture.Backend;
        using Tensor a = vk.Allocate("a", 100), c = vk.Allocate("c", 50);
        Assert.Throws<ArgumentOutOfRangeException>(() => vk.CopyRange(c, 0, a, 90, 11));
        Assert.Throws<ArgumentOutOfRangeException>(() => vk.CopyRange(c, 45, a, 0, 6));
        Assert.Throws<ArgumentOutOfRangeException>(() => vk.CopyRange(c, -1, a, 0, 1));
        Assert.Throws<ArgumentOutOfRangeException>(() => vk.CopyRange(c, 0, a, 0, -1));
        var overlap = Assert.Throws<ArgumentException>(() => vk.CopyRange(a, 10, a, 0, 11));
        Assert.Contains("overlap", overlap.Message);
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    // ---------------------------------------------------------------- attention

    [VulkanTheory]
    [InlineData(7, 6, 2, 10)]
    [InlineData(13, 4, 4, 6)]    // no grouping
    [InlineData(33, 6, 2, 10)]   // one row past a multiple of 32
    [InlineData(70, 6, 2, 10)]   // two blocks of 64 rows, the second partial
    [InlineData(300, 2, 1, 8)]   // several blocks and several shared-memory tiles per block
    [InlineData(70, 2, 1, 256)]  // the largest head dimension: a tile of twelve rows
    [InlineData(70, 2, 1, 250)]  // a partial vec4 chunk
    [InlineData(256, 14, 2, 64)] // Qwen2.5-0.5B's heads at sequence 256: seven query heads per kv head
    public void Attention(int T, int heads, int kvHeads, int headDim)
    {
        long qn = (long)T * heads * headDim, kn = (long)T * kvHeads * headDim, rows = (long)heads * T;
        Parity(Forward, (b, t) => b.AttentionForward(t("out"), t("lse"), t("q"), t("k"), t("v"), T, heads, kvHeads, headDim, 1f / MathF.Sqrt(headDim), 0),
            Out("out", qn), Out("lse", rows), In("q", qn), In("k", kn), In("v", kn));
        Parity(Backward, (b, t) =>
        {
            b.AttentionForward(t("out"), t("lse"), t("q"), t("k"), t("v"), T, heads, kvHeads, headDim, 1f / MathF.Sqrt(headDim), 0);
            b.AttentionBackward(t("dq"), t("dk"), t("dv"), t("dOut"), t("out"), t("lse"), t("q"), t("k"), t("v"), T, heads, kvHeads, headDim, 1f / MathF.Sqrt(headDim), 0);
        }, Out("dq", qn), Out("dk", kn), Out("dv", kn), In("dOut", qn), In("out", qn), In("lse", rows),
           In("q", qn), In("k", kn), In("v", kn));
    }

    /// <summary>Attention with a scale other than 1/√hd, causal and within sliding windows (Gemma 3's local layers).</summary>
    [VulkanTheory]
    [InlineData(33, 6, 2, 10, 0)]     // causal, another scale
    [InlineData(37, 4, 2, 10, 5)]     // W = 5: every block starts past the first keys
    [InlineData(37, 2, 1, 8, 1)]      // W = 1: each query sees only itself
    [InlineData(37, 2, 2, 8, 37)]     // W = T: causal
    [InlineData(20, 3, 1, 8, 64)]     // W > T: causal
    [InlineData(150, 2, 2, 32, 64)]   // W = the block width, three blocks, the last partial
    [InlineData(200, 2, 1, 64, 70)]   // windows that straddle shared-memory tiles (60 rows at head dimension 64)
    [InlineData(70, 4, 1, 256, 9)]    // Gemma 3 1B's heads: four of 256 on one kv head
    public void AttentionWithScaleAndWindow(int T, int heads, int kvHeads, int headDim, int window)
    {
        float scale = 1.7f / MathF.Sqrt(headDim);
        long qn = (long)T * heads * headDim, kn = (long)T * kvHeads * headDim, rows = (long)heads * T;
        Parity(Forward, (b, t) => b.AttentionForward(t("out"), t("lse"), t("q"), t("k"), t("v"), T, heads, kvHeads, headDim, scale, window),
            Out("out", qn), Out("lse", rows), In("q", qn), In("k", kn), In("v", kn));
        // With W = 1 each row's softmax is the constant 1, so dq and dk are 0 but for rounding (in both
        // backends, differently): they are checked against 0 instead of compared.
        bool single = window == 1;
        var r = Parity(Backward, (b, t) =>
        {
            b.AttentionForward(t("out"), t("lse"), t("q"), t("k"), t("v"), T, heads, kvHeads, headDim, scale, window);
            b.AttentionBackward(t("dq"), t("dk"), t("dv"), t("dOut"), t("out"), t("lse"), t("q"), t("k"), t("v"), T, heads, kvHeads, headDim, scale, window);
        }, Overwritten("dq", qn) with { Compare = !single }, Overwritten("dk", kn) with { Compare = !single }, Overwritten("dv", kn),
           In("dOut", qn), In("out", qn), In("lse", rows), In("q", qn), In("k", kn), In("v", kn));
        if (single)
            Assert.All(r["dq"].Concat(r["dk"]), d => Assert.InRange(d, -1e-5f, 1e-5f));
    }

    [VulkanFact]
    public void SlidingWindowAttentionRunsWhereCausalWouldNot()
    {
        // Eight query heads per kv head at T = 1200: causal attention would pass lavapipe's loop limit
        // (and is refused there), a window of 64 stays far below it because the shaders skip the key
        // tiles outside the window. Were those keys only masked inside the causal loops, lavapipe would
        // cut the dk/dv pass short and the gradients would be wrong.
        const int T = 1200, heads = 8, kvHeads = 1, headDim = 64, window = 64;
        Assert.True(VulkanBackend.AttentionLoops(T, heads / kvHeads, headDim, 60, 64, backward: true) > 65535);
        Assert.True(VulkanBackend.AttentionLoops(T, heads / kvHeads, headDim, 60, 64, backward: true, window) < 65535 / 8);
        Assert.True(VulkanBackend.AttentionLoops(4096, 8, 64, 60, 64, backward: true, window: 512) < 65535); // Gemma 3's window
        float scale = 1f / MathF.Sqrt(headDim);
        long qn = (long)T * heads * headDim, kn = (long)T * kvHeads * headDim, rows = (long)heads * T;
        Parity(Backward, (b, t) =>
        {
            b.AttentionForward(t("out"), t("lse"), t("q"), t("k"), t("v"), T, heads, kvHeads, headDim, scale, window);
            b.AttentionBackward(t("dq"), t("dk"), t("dv"), t("dOut"), t("out"), t("lse"), t("q"), t("k"), t("v"), T, heads, kvHeads, headDim, scale, window);
        }, Out("out", qn), Out("lse", rows), Out("dq", qn), Out("dk", kn), Out("dv", kn), In("dOut", qn), In("q", qn), In("k", kn), In("v", kn));
    }

    [VulkanFact]
    public void Attention_beyond_what_the_shaders_can_do_is_refused()
    {
        var vk = fixture.Backend;
        using (Tensor o = vk.Allocate("o", 4 * 260), l = vk.Allocate("lse", 4), q = vk.Allocate("q", 4 * 260))
        {
            var e = Assert.Throws<ArgumentOutOfRangeException>(() => vk.AttentionForward(o, l, q, q, q, 4, 1, 1, 260, 1f / 16, 0));
            Assert.Contains("256", e.Message);
            Assert.Throws<ArgumentOutOfRangeException>(() => vk.AttentionForward(o, l, q, q, q, 4, 1, 1, 8, 1f / 16, -1));
        }

        // lavapipe silently cuts a shader short after 65,535 loop iterations: long sequences are an
        // error there rather than wrong gradients.
        Assert.True(VulkanBackend.AttentionLoops(256, 7, 64, 60, 64, backward: true) < 65535); // Qwen2.5-0.5B at 256
        Assert.True(VulkanBackend.AttentionLoops(4096, 8, 64, 60, 64, backward: true) > 65535);
        if (!vk.Name.Contains("llvmpipe"))
            return;
        const int T = 4096, heads = 8, headDim = 64;
        using Tensor big = vk.Allocate("q", (long)T * heads * headDim), kv = vk.Allocate("kv", (long)T * headDim), lse = vk.Allocate("lse", heads * T);
        var refused = Assert.Throws<VulkanException>(() => vk.AttentionBackward(big, kv, kv, big, big, lse, big, kv, kv, T, heads, 1, headDim, 1f / MathF.Sqrt(headDim), 0));
        Assert.Contains("shorter --seq", refused.Message);
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    /// <summary>A KV cache of <paramref name="capacity"/> rows whose rows past <paramref name="count"/> are NaN, which any read of them would spread.</summary>
    private Operand Cache(string name, int count, int capacity, int width)
    {
        var data = Random((long)capacity * width);
        data.AsSpan(count * width).Fill(float.NaN);
        return new Operand(name, data);
    }

    [VulkanTheory]
    [InlineData(1, 4, 2, 16, 1.0)]     // the first token
    [InlineData(37, 6, 2, 10, 1.0)]    // GQA, a partial tile of keys
    [InlineData(257, 4, 4, 10, 1.7)]   // one key past a tile of 256, another scale
    [InlineData(300, 14, 2, 64, 1.0)]  // Qwen2.5-0.5B's heads
    [InlineData(301, 4, 1, 256, 1.0)]  // Gemma 3's heads of 256
    [InlineData(77, 2, 1, 250, 1.0)]   // a head dimension not a multiple of four
    [InlineData(3000, 8, 1, 64, 1.0)]  // a long cache
    [InlineData(20000, 2, 1, 64, 1.0)] // a longer one: a loop over every key per invocation would pass lavapipe's limit
    public void AttentionDecode(int count, int heads, int kvHeads, int headDim, double scaleFactor)
    {
        float scale = (float)(scaleFactor / Math.Sqrt(headDim));
        int width = kvHeads * headDim, capacity = count + 3;
        Parity(Forward, (b, t) => b.AttentionDecode(t("out"), t("q"), t("k"), t("v"), count, heads, kvHeads, headDim, scale),
            Overwritten("out", heads * headDim), In("q", heads * headDim, 2), Cache("k", count, capacity, width), Cache("v", count, capacity, width));
        Assert.True(VulkanBackend.DecodeLoops(count, headDim, 256) < 65535);
    }

    [VulkanFact]
    public void AttentionDecode_refuses_what_it_cannot_do()
    {
        var vk = fixture.Backend;
        using (Tensor o = vk.Allocate("o", 4 * 260), q = vk.Allocate("q", 4 * 260), kv = vk.Allocate("kv", 4 * 260))
        {
            Assert.Contains("256", Assert.Throws<ArgumentOutOfRangeException>(() => vk.AttentionDecode(o, q, kv, kv, 4, 1, 1, 260, 1f)).Message);
            Assert.Throws<ArgumentOutOfRangeException>(() => vk.AttentionDecode(o, q, kv, kv, 0, 4, 2, 8, 1f));  // no key
            Assert.Throws<ArgumentException>(() => vk.AttentionDecode(o, q, kv, kv, 3, 4, 3, 8, 1f));            // 4 heads on 3 kv heads
            Assert.Throws<ArgumentOutOfRangeException>(() => vk.AttentionDecode(o, q, kv, kv, 66, 4, 2, 8, 1f)); // past the cache
        }

        // The loops of an invocation grow as count / 256: lavapipe's limit is far off for real contexts, and a
        // cache long enough to reach it is an error there rather than a wrong output.
        Assert.True(VulkanBackend.DecodeLoops(32768, 256, 256) < 65535);
        Assert.True(VulkanBackend.DecodeLoops(200_000, 8, 256) > 65535);
        if (!vk.Name.Contains("llvmpipe"))
            return;
        const int count = 200_000, headDim = 8;
        using Tensor out1 = vk.Allocate("o", headDim), q1 = vk.Allocate("q", headDim), cache = vk.Allocate("cache", (long)count * headDim);
        var refused = Assert.Throws<VulkanException>(() => vk.AttentionDecode(out1, q1, cache, cache, count, 1, 1, headDim, 1f));
        Assert.Contains("shorter context", refused.Message);
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    [VulkanFact]
    public void DecodingStepMatchesTheLastRowOfCausalAttention()
    {
        // Rows written into a cache with CopyRange, rotated with RopeForwardAt, then one token's attention:
        // the same as row T−1 of full causal attention over the rotated sequence.
        const int T = 70, heads = 6, kvHeads = 2, headDim = 32, capacity = 80;
        var vk = fixture.Backend;
        var (cos, sin) = Runtime.Backends.Rope.Tables(capacity, headDim, 10000, null);
        float scale = 1f / MathF.Sqrt(headDim);
        int qw = heads * headDim, kw = kvHeads * headDim;
        float[] q = Random(T * qw), k = Random(T * kw), v = Random(T * kw);
        using Tensor c = vk.Upload("cos", cos), s = vk.Upload("sin", sin);
        using Tensor qAll = vk.Upload("q", q), kAll = vk.Upload("k", k), vAll = vk.Upload("v", v);
        using Tensor outAll = vk.Allocate("out", T * qw), lse = vk.Allocate("lse", heads * T);
        vk.RopeForward(qAll, c, s, T, heads, headDim);
        vk.RopeForward(kAll, c, s, T, kvHeads, headDim);
        vk.AttentionForward(outAll, lse, qAll, kAll, vAll, T, heads, kvHeads, headDim, scale, 0);

        using Tensor kCache = vk.Allocate("kCache", capacity * kw), vCache = vk.Allocate("vCache", capacity * kw);
        using Tensor qRow = vk.Allocate("qRow", qw), kRow = vk.Allocate("kRow", kw), outRow = vk.Allocate("outRow", qw);
        using Tensor kSrc = vk.Upload("k", k), vSrc = vk.Upload("v", v), qSrc = vk.Upload("q", q);
        for (int t = 0; t < T; t++)
        {
            vk.CopyRange(kRow, 0, kSrc, t * kw, kw);
            vk.RopeForwardAt(kRow, c, s, t, 1, kvHeads, headDim);
            vk.CopyRange(kCache, t * kw, kRow, 0, kw);
            vk.CopyRange(vCache, t * kw, vSrc, t * kw, kw);
        }
        vk.CopyRange(qRow, 0, qSrc, (T - 1) * qw, qw);
        vk.RopeForwardAt(qRow, c, s, T - 1, 1, heads, headDim);
        vk.AttentionDecode(outRow, qRow, kCache, vCache, T, heads, kvHeads, headDim, scale);

        var full = new float[T * qw];
        var row = new float[qw];
        vk.Download(outAll, full);
        vk.Download(outRow, row);
        VulkanTestDevice.AssertNoValidationErrors(vk);
        double error = ModelFixture.RelativeError(row, full.AsSpan((T - 1) * qw, qw).ToArray());
        output.WriteLine($"decoded row against causal attention: relative error {error:E2}");
        Assert.True(error < Forward, $"relative error {error:E2}");
    }

    // ---------------------------------------------------------------- products

    [VulkanTheory]
    [InlineData(13, 37, 29)]
    [InlineData(70, 130, 150)]  // several 64-tiles in every dimension
    [InlineData(1, 5, 3)]
    public void Linear(int T, int din, int dout)
    {
        Parity(Forward, (b, t) => b.LinearForward(t("y"), t("x"), t("w"), t("bias"), T, din, dout),
            Out("y", T * dout), In("x", T * din), In("w", dout * din), In("bias", dout));
        Parity(Forward, (b, t) => b.LinearForward(t("y"), t("x"), t("w"), null, T, din, dout),
            Out("y", T * dout), In("x", T * din), In("w", dout * din));
        foreach (bool accumulate in new[] { false, true })
            Parity(Backward, (b, t) => b.LinearBackwardInput(t("dx"), t("dy"), t("w"), T, din, dout, accumulate),
                Out("dx", T * din), In("dy", T * dout), In("w", dout * din));
    }

    [VulkanTheory]
    [InlineData(13, 37, 29, 5)]
    [InlineData(70, 130, 66, 8)]
    public void Lora(int T, int din, int dout, int r)
    {
        const float scale = 1.7f;
        Parity(Forward, (b, t) => b.LoraForward(t("y"), t("h"), t("x"), t("a"), t("b"), scale, T, din, dout, r),
            Out("y", T * dout), Out("h", T * r), In("x", T * din), In("a", r * din), In("b", dout * r));
        Parity(Backward, (b, t) => b.LoraBackward(t("dx"), t("da"), t("db"), t("h"), t("dh"), t("dy"), t("x"), t("a"), t("b"), scale, T, din, dout, r),
            Out("dx", T * din), Out("da", r * din), Out("db", dout * r), Out("h", T * r), Out("dh", T * r),
            In("dy", T * dout), In("x", T * din), In("a", r * din), In("b", dout * r));
    }

    [VulkanTheory]
    [InlineData(7, 37, 301, 64, 0f, 0.5f)]   // a partial last chunk
    [InlineData(5, 16, 50, 128, 0f, 0.5f)]   // one chunk wider than the vocabulary
    [InlineData(9, 20, 600, 600, 0f, 0.5f)]  // rows longer than a workgroup
    [InlineData(7, 37, 301, 64, 30f, 0.5f)]  // softcapped (Gemma 2's final_logit_softcapping), a partial last chunk
    [InlineData(7, 37, 301, 64, 2f, 0.5f)]   // a cap below most logits
    [InlineData(9, 20, 600, 600, 5f, 20f)]   // logits around ±100, deep in the cap's saturation
    public void LmHeadCrossEntropy(int T, int C, int V, int chunk, float softcap, float weightScale)
    {
        var targets = Enumerable.Range(0, T).Select(t => t % 3 == 1 ? -1 : _rng.Next(V)).ToArray();
        targets[0] = V - 1;
        float cpuLoss = 0, vkLoss = 0;
        Parity(Backward, (b, t) =>
        {
            float loss = b.LmHeadCrossEntropy(t("dx"), t("logits"), t("x"), t("w"), targets, T, C, V, chunk, softcap);
            if (b is CpuBackend) cpuLoss = loss; else vkLoss = loss;
        }, Out("dx", T * C), In("logits", T * Math.Min(chunk, V)), In("x", T * C), In("w", V * C, weightScale));
        output.WriteLine($"loss cpu {cpuLoss} vulkan {vkLoss}");
        Assert.InRange(Math.Abs(vkLoss - cpuLoss), 0, Forward * Math.Abs(cpuLoss));
    }

    [VulkanFact]
    public void LmHeadWithoutLabelsIsZero()
    {
        int[] targets = [-1, -1, -1];
        var r = Parity(Forward, (b, t) => Assert.Equal(0f, b.LmHeadCrossEntropy(t("dx"), t("logits"), t("x"), t("w"), targets, 3, 8, 20, 8, 0f)),
            In("dx", 24), In("logits", 24), In("x", 24), In("w", 160));
        Assert.All(r["dx"], v => Assert.Equal(0f, v));
    }

    [VulkanTheory]
    [InlineData(1, 37, 301, 0f, 0.5f)]   // one token (decoding), a partial 64-tile of the vocabulary
    [InlineData(3, 37, 301, 0f, 0.5f)]
    [InlineData(70, 20, 130, 0f, 0.5f)]  // several tiles in both dimensions
    [InlineData(3, 37, 301, 2f, 0.5f)]   // a cap below most logits
    [InlineData(5, 16, 1000, 30f, 20f)]  // logits around ±100, deep in the cap's saturation
    public void LmHeadLogits(int T, int C, int V, float softcap, float weightScale)
    {
        var r = Parity(Forward, (b, t) => b.LmHeadLogits(t("logits"), t("x"), t("w"), T, C, V, softcap),
            Overwritten("logits", T * V), In("x", T * C), In("w", V * C, weightScale));
        Assert.All(r["logits"], l => Assert.True(float.IsFinite(l) && (softcap == 0 || Math.Abs(l) <= softcap)));
        var vk = fixture.Backend;
        using Tensor logits = vk.Allocate("logits", T * V), x = vk.Allocate("x", T * C), w = vk.Allocate("w", V * C);
        Assert.Throws<ArgumentOutOfRangeException>(() => vk.LmHeadLogits(logits, x, w, T, C, V, -1f));
        Assert.Throws<ArgumentOutOfRangeException>(() => vk.LmHeadLogits(logits, x, w, T, C, V + 1, 0f)); // w has V rows
    }

    // ---------------------------------------------------------------- optimizer

    [VulkanFact]
    public void AdamWAndSgdMatchTheirFormulas()
    {
        const int n = 1111;
        var vk = fixture.Backend;
        float[] parameter = Random(n), expected = (float[])parameter.Clone(), mRef = new float[n], vRef = new float[n];
        using var p = vk.Upload("p", parameter);
        using var m = vk.Allocate("m", n);
        using var v = vk.Allocate("v", n);
        using var g = vk.Allocate("g", n);
        const float lr = 1e-2f, decay = 0.01f, scale = 0.5f;
        for (int step = 1; step <= 4; step++)
        {
            // Step 3 is a layer LCSB skipped: gradient scale 0, whatever the gradient buffer holds.
            float stepScale = step == 3 ? 0 : scale;
            var gradient = Random(n);
            for (int i = 0; i < n; i++)
            {
                double gi = gradient[i] * (double)stepScale;
                mRef[i] = (float)(0.9 * mRef[i] + 0.1 * gi);
                vRef[i] = (float)(0.999 * vRef[i] + 0.001 * gi * gi);
                double update = mRef[i] / (1 - Math.Pow(0.9, step)) / (Math.Sqrt(vRef[i] / (1 - Math.Pow(0.999, step))) + 1e-8);
                expected[i] -= (float)(lr * (update + decay * expected[i]));
            }
            vk.Write(g, gradient);
            vk.AdamWUpdate(p, m, v, g, n, new AdamWStep(step, lr, 0.9f, 0.999f, 1e-8f, decay, stepScale));
        }
        var result = new float[n];
        vk.Download(p, result);
        VulkanTestDevice.AssertNoValidationErrors(vk);
        double error = ModelFixture.RelativeError(result, expected);
        Assert.True(error < Forward, $"AdamW: relative error {error:E2}");

        // SGD: p −= lr·g·s; scale 0 leaves p alone.
        var grad = Random(n);
        vk.Write(g, grad);
        vk.SgdUpdate(p, g, n, 0.1f, 0.5f);
        vk.SgdUpdate(p, g, n, 0.1f, 0);
        var sgd = new float[n];
        vk.Download(p, sgd);
        var expectedSgd = result.Select((x, i) => x - 0.1f * grad[i] * 0.5f).ToArray();
        Assert.True(ModelFixture.RelativeError(sgd, expectedSgd) < Forward);
    }

    [VulkanFact]
    public void OptimizerChecksAndNoiseMatchTheCpu()
    {
        const int n = 5000;
        var vk = fixture.Backend;
        var cpu = new CpuBackend();
        float[] start = Random(n);
        using var cp = cpu.Upload("p", start);
        using var cm = cpu.Allocate("m", n);
        using var cv = cpu.Allocate("v", n);
        using var cg = cpu.Upload("g", Random(n));
        using var vp = vk.Upload("p", start);
        using var vm = vk.Allocate("m", n);
        using var vv = vk.Allocate("v", n);
        using var vg = vk.Upload("g", ((CpuTensor)cg).Span);
        foreach (var b in new IBackend[] { cpu, vk })
        {
            var (p, m, v, g) = b == cpu ? (cp, cm, cv, cg) : (vp, vm, vv, vg);
            b.AdamWUpdate(p, m, v, g, n, new AdamWStep(1, 1e-3f, 0.9f, 0.999f, 1e-8f, 0, 1));
            b.AddNoise(p, n, NoiseKey.For(42, 3), 0.25f);
        }
        var fromVulkan = new float[n];
        vk.Download(vp, fromVulkan);
        Assert.True(ModelFixture.RelativeError(fromVulkan, ((CpuTensor)cp).Span.ToArray()) < Forward);

        // The noise itself: standard normal (mean 0, variance 1 over 5000 values), and the same values on both.
        using var zeros = vk.Allocate("z", n);
        vk.AddNoise(zeros, n, NoiseKey.For(7, 0), 1);
        var z = new float[n];
        vk.Download(zeros, z);
        Assert.InRange(z.Average(), -0.05, 0.05);
        Assert.InRange(z.Select(x => (double)x * x).Average(), 0.93, 1.07);
        for (int i = 0; i < n; i++)
            Assert.True(Math.Abs(z[i] - CounterNoise.Normal(NoiseKey.For(7, 0), i)) < 1e-4, $"value {i}: {z[i]}");

        // Finite checks: nothing found, then the lowest check with a bad value, a NaN told from an infinity.
        Assert.Null(vk.TakeNonFinite());
        vk.CheckFinite(vp, n, 5);
        Assert.Null(vk.TakeNonFinite());
        var bad = (float[])fromVulkan.Clone();
        bad[4321] = float.PositiveInfinity;
        vk.Write(vp, bad);
        vk.CheckFinite(vp, n, 9);
        bad[17] = float.NaN;
        vk.Write(vg, bad);
        vk.CheckFinite(vg, n, 4);
        vk.CheckFinite(vm, n, 2);
        Assert.Equal((4, true), vk.TakeNonFinite());
        Assert.Null(vk.TakeNonFinite());
        vk.CheckFinite(vp, n, 9);
        Assert.Equal((9, false), vk.TakeNonFinite());
        cpu.CheckFinite(new CpuTensor("bad", bad), n, 4);
        Assert.Equal((4, true), cpu.TakeNonFinite());
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    // ---------------------------------------------------------------- device limits

    [VulkanFact]
    public void TensorsSplitAcrossBuffers()
    {
        // Parts of 100 floats: the table, the weights and the elementwise operands span several
        // buffers, with rows straddling the part boundaries; activations stay within one part.
        using var vk = VulkanTestDevice.Create(new VulkanBackendOptions { MaxBufferBytes = 400 });
        Assert.Equal(100, vk.PartLength);
        const int T = 3, C = 7, V = 53, dout = 19;
        int[] tokens = [52, 0, 29];
        int[] targets = [5, -1, 51];

        Parity(vk, Forward, (b, t) => b.EmbeddingForward(t("x"), tokens, t("table"), T, C), Out("x", T * C), In("table", V * C));
        Parity(vk, Forward, (b, t) => b.LinearForward(t("y"), t("x"), t("w"), t("bias"), T, C, dout),
            Out("y", T * dout), In("x", T * C), In("w", dout * C), In("bias", dout));
        Parity(vk, Backward, (b, t) => b.LinearBackwardInput(t("dx"), t("dy"), t("w"), T, C, dout, accumulate: true),
            Out("dx", T * C), In("dy", T * dout), In("w", dout * C));
        Parity(vk, Backward, (b, t) => b.LmHeadCrossEntropy(t("dx"), t("logits"), t("x"), t("w"), targets, T, C, V, 16, 0f),
            Out("dx", T * C), In("logits", T * 16), In("x", T * C), In("w", V * C));
        Parity(vk, Backward, (b, t) => b.LmHeadCrossEntropy(t("dx"), t("logits"), t("x"), t("w"), targets, T, C, V, 16, 1.5f),
            Out("dx", T * C), In("logits", T * 16), In("x", T * C), In("w", V * C));
        // Decoding: the logits of one token through the split table (a row straddles each seam), capped and not.
        foreach (float softcap in new[] { 0f, 1.5f })
            Parity(vk, Forward, (b, t) => b.LmHeadLogits(t("logits"), t("x"), t("w"), 1, C, V, softcap),
                Overwritten("logits", V), In("x", C), In("w", V * C));
        // KV-cache rows copied across the seams of both tensors, and the cache read back whole.
        Parity(vk, Forward, (b, t) =>
        {
            b.CopyRange(t("cache"), 95, t("rows"), 0, 110);   // parts 0, 1 and 2 of the cache
            b.CopyRange(t("cache"), 250, t("rows"), 190, 40); // part 1 of rows into part 2 of the cache
            b.CopyRange(t("cache"), 0, t("cache"), 300, 50);  // within one split tensor
        }, Out("cache", 350), In("rows", 230));
        const int n = 333;
        Parity(vk, Forward, (b, t) =>
        {
            b.AddInPlace(t("a"), t("src"), n);
            b.Copy(t("c"), t("src"), n - 7);
            b.Zero(t("z"), n - 50);
            b.GluForward(t("h"), t("a"), t("src"), n, GluActivation.Silu);
            b.GluForward(t("g"), t("a"), t("src"), n, GluActivation.GeluTanh);
            b.Scale(t("s"), 3.5f, n - 3);
        }, Out("a", n), Out("c", n), Out("z", n), Out("h", n), Out("g", n), Out("s", n), In("src", n));

        // Upload, Write and Download across parts.
        var data = Random(250);
        using var tensor = vk.Upload("split", data);
        Assert.Equal(3, ((VulkanTensor)tensor).PartCount);
        var back = new float[250];
        vk.Download(tensor, back);
        Assert.Equal(data, back);

        // An activation that does not fit one buffer is an error that says what to do.
        using var big = vk.Allocate("big", 200);
        using var w = vk.Allocate("w", 100);
        var e = Assert.Throws<VulkanException>(() => vk.RmsNormForward(big, w, big, w, 20, 10, 1e-5f, 0f));
        Assert.Contains("shorter --seq", e.Message);
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    [VulkanFact]
    public void UploadsLargerThanTheStagingMemoryGoInPieces()
    {
        // 64 KiB of staging: a 400 KB upload takes several pieces and batches, in order with the kernels.
        using var vk = VulkanTestDevice.Create(new VulkanBackendOptions { StagingBytes = 1 << 16 });
        const int n = 100_003;
        var first = Random(n);
        var second = Random(n);
        using var a = vk.Upload("a", first);
        using var b = vk.Allocate("b", n);
        vk.Copy(b, a, n);        // reads the first contents...
        vk.Write(a, second);     // ...before this overwrites them
        vk.AddInPlace(b, a, n);
        var result = new float[n];
        vk.Download(b, result);
        Assert.True(vk.Submissions > 3);
        Assert.Equal(first.Zip(second, (x, y) => x + y).ToArray(), result);
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    [VulkanFact]
    public void DispatchesFoldAndSplitPastTheWorkgroupCountLimit()
    {
        // At most 3 workgroups per dimension: elementwise dispatches fold into y, products run in several dispatches.
        using var vk = VulkanTestDevice.Create(new VulkanBackendOptions { MaxWorkgroupCount = 3 });
        const int T = 200, din = 37, dout = 250;
        Parity(vk, Forward, (b, t) => b.LinearForward(t("y"), t("x"), t("w"), t("bias"), T, din, dout),
            Out("y", T * dout), In("x", T * din), In("w", dout * din), In("bias", dout));
        const int n = 2000; // 8 workgroups of 256: 3 × 3 after folding
        Parity(vk, Forward, (b, t) => b.GluForward(t("h"), t("gate"), t("up"), n, GluActivation.Silu), Out("h", n), In("gate", n), In("up", n));
        // Attention: 3 heads × 3 blocks of query rows = 9 workgroups, 3 × 3 after folding.
        const int aT = 130, heads = 3, headDim = 8;
        long qn = aT * heads * headDim, kn = aT * headDim;
        Parity(vk, Backward, (b, t) =>
        {
            b.AttentionForward(t("out"), t("lse"), t("q"), t("k"), t("v"), aT, heads, 1, headDim, 1f / MathF.Sqrt(headDim), 0);
            b.AttentionBackward(t("dq"), t("dk"), t("dv"), t("dOut"), t("out"), t("lse"), t("q"), t("k"), t("v"), aT, heads, 1, headDim, 1f / MathF.Sqrt(headDim), 0);
        }, Out("out", qn), Out("lse", heads * aT), Out("dq", qn), Out("dk", kn), Out("dv", kn), In("dOut", qn), In("q", qn), In("k", kn), In("v", kn));
        // One token's attention: 7 heads, one workgroup each, 3 × 3 after folding.
        Parity(vk, Forward, (b, t) => b.AttentionDecode(t("out"), t("q"), t("k"), t("v"), 300, 7, 1, headDim, 0.3f),
            Overwritten("out", 7 * headDim), In("q", 7 * headDim), In("k", 300 * headDim), In("v", 300 * headDim));
        Assert.Throws<VulkanException>(() =>
        {
            using var big = vk.Allocate("big", 3 * 3 * 256 + 1);
            vk.Zero(big, big.Length);
        });
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    [VulkanFact]
    public void ReportsTheDeviceAndBatchesCommands()
    {
        var vk = fixture.Backend;
        output.WriteLine($"{vk.Name}; validation {(vk.Device.ValidationEnabled ? "on" : "off (layer not installed)")}");
        Assert.StartsWith("vulkan (", vk.Name);
        Assert.Contains(vk.Device.Name, vk.Name);

        using var a = vk.Allocate("a", 100);
        using var b = vk.Upload("b", Random(100));
        int before = vk.Submissions;
        for (int i = 0; i < 50; i++)
            vk.AddInPlace(a, b, 100);
        Assert.Equal(before, vk.Submissions); // recorded, not submitted
        var result = new float[100];
        vk.Download(a, result);
        Assert.Equal(before + 1, vk.Submissions);
    }
}
