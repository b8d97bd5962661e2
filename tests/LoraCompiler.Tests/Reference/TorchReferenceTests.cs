using TorchSharp;
using Xunit.Abstractions;

namespace LoraCompiler.Tests.Reference;

/// <summary>
/// Checks of the autograd reference itself: its gradients against finite differences of its own
/// loss, its loss against a second, scalar-loop implementation of the same forward pass, the
/// LoRA / tied-embedding properties the trainer relies on, and the Qwen3 / Gemma 3 ops by hand.
/// </summary>
public class TorchReferenceTests(ITestOutputHelper output)
{
    static readonly string[] AllModules = { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" };

    /// <summary>Qwen2-like: q/k/v bias, tied embeddings, plain RoPE, GQA 2:1, every module targeted.</summary>
    static readonly ReferenceConfig QwenLike = new(
        Hidden: 16, Intermediate: 24, Layers: 2, Heads: 2, KvHeads: 1, HeadDim: 8, Vocab: 23,
        RmsEps: 1e-6, RopeTheta: 10000.0, Llama3RopeScaling: null, TiedEmbeddings: true, AttentionBias: true,
        LoraR: 4, LoraAlpha: 8.0, TargetModules: AllModules);

    /// <summary>
    /// Llama-3-like: no bias, untied lm_head, llama3 rope scaling whose three frequency regimes all
    /// occur at head_dim 8 (wavelengths 6.3, 63, 628, 6283 against 16 and 64), heads*head_dim (32)
    /// different from hidden (16), GQA 4:2, some modules targeted.
    /// </summary>
    static readonly ReferenceConfig LlamaLike = new(
        Hidden: 16, Intermediate: 20, Layers: 2, Heads: 4, KvHeads: 2, HeadDim: 8, Vocab: 23,
        RmsEps: 1e-5, RopeTheta: 10000.0, Llama3RopeScaling: (8.0, 1.0, 4.0, 64), TiedEmbeddings: false,
        AttentionBias: false, LoraR: 2, LoraAlpha: 16.0, TargetModules: new[] { "q_proj", "v_proj", "o_proj", "down_proj" });

    /// <summary>
    /// Gemma-3-like: (1 + w) norms, q/k norms, sandwich norms, tanh-GELU, the embedding scaled by
    /// float32 sqrt(18), query_pre_attn_scalar 12 (≠ head_dim), layers sliding, sliding, full
    /// (sliding_window_pattern 3) with a window of 3 against 7 tokens, local RoPE base 10⁴ on the
    /// sliding layers and base 10⁶ with linear factor 8 on the full one, logits softcapped at 3
    /// (enough to change the loss), tied embeddings, MQA 2:1, every module targeted.
    /// </summary>
    static readonly ReferenceConfig GemmaLike = new(
        Hidden: 18, Intermediate: 24, Layers: 3, Heads: 2, KvHeads: 1, HeadDim: 8, Vocab: 23,
        RmsEps: 1e-6, RopeTheta: 1_000_000.0, Llama3RopeScaling: null, TiedEmbeddings: true, AttentionBias: false,
        LoraR: 4, LoraAlpha: 8.0, TargetModules: AllModules)
    {
        QkNorm = true,
        NormWeightOffset = 1,
        SandwichNorms = true,
        EmbeddingScale = TorchReference.GemmaEmbeddingScale(18),
        AttentionScale = Math.Pow(12, -0.5),
        HiddenActivation = "gelu_pytorch_tanh",
        LayerWindows = TorchReference.SlidingWindowPattern(layers: 3, window: 3, pattern: 3),
        LocalRopeTheta = 10000.0,
        LinearRopeFactor = 8.0,
        FinalLogitSoftcap = 3.0,
    };

    /// <summary>
    /// Qwen3-like: q/k norms, head_dim 6 against hidden / heads = 4 (q_proj [24, 16], o_proj
    /// [16, 24]), untied lm_head, no bias, GQA 4:2, some modules targeted. "qwen3-bias" is the same
    /// with attention_bias, which in Qwen3 puts a bias on o_proj too.
    /// </summary>
    static readonly ReferenceConfig Qwen3Like = new(
        Hidden: 16, Intermediate: 20, Layers: 2, Heads: 4, KvHeads: 2, HeadDim: 6, Vocab: 23,
        RmsEps: 1e-6, RopeTheta: 1_000_000.0, Llama3RopeScaling: null, TiedEmbeddings: false, AttentionBias: false,
        LoraR: 2, LoraAlpha: 4.0, TargetModules: new[] { "q_proj", "k_proj", "o_proj", "up_proj", "down_proj" })
    {
        QkNorm = true,
    };

    static readonly int[] Tokens = { 3, 17, 0, 22, 9, 9, 14 };

    public static TheoryData<string> Configs() => new() { "qwen", "llama", "gemma", "qwen3", "qwen3-bias" };

    static ReferenceConfig Config(string name) => name switch
    {
        "qwen" => QwenLike,
        "llama" => LlamaLike,
        "gemma" => GemmaLike,
        "qwen3" => Qwen3Like,
        "qwen3-bias" => Qwen3Like with { AttentionBias = true },
        _ => throw new ArgumentException(name),
    };

    /// <summary>The random weights of a named config; only "qwen3-bias" has an o_proj bias.</summary>
    static Dictionary<string, double[]> Weights(string which, int seed) =>
        RandomWeights(Config(which), seed, oProjBias: which == "qwen3-bias");

    static double Uniform(Random rng, double scale) => (rng.NextDouble() * 2 - 1) * scale;

    /// <summary>
    /// Every base tensor the config reads. Norm weights are stored so that (offset + w) is 1 ± 0.2:
    /// around 1 for Llama / Qwen, around 0 for Gemma.
    /// </summary>
    static Dictionary<string, double[]> RandomWeights(ReferenceConfig cfg, int seed, bool oProjBias = false)
    {
        var rng = new Random(seed);
        var w = new Dictionary<string, double[]>();
        double[] Mat(int rows, int cols) => Enumerable.Range(0, rows * cols).Select(_ => Uniform(rng, 1.0 / Math.Sqrt(cols))).ToArray();
        double[] Norm(int n) => Enumerable.Range(0, n).Select(_ => 1.0 - cfg.NormWeightOffset + Uniform(rng, 0.2)).ToArray();
        double[] Vec(int n) => Enumerable.Range(0, n).Select(_ => Uniform(rng, 0.1)).ToArray();

        w["model.embed_tokens.weight"] = Enumerable.Range(0, cfg.Vocab * cfg.Hidden).Select(_ => Uniform(rng, 1.0)).ToArray();
        for (int l = 0; l < cfg.Layers; l++)
        {
            string p = $"model.layers.{l}.";
            w[p + "input_layernorm.weight"] = Norm(cfg.Hidden);
            w[p + "post_attention_layernorm.weight"] = Norm(cfg.Hidden);
            if (cfg.SandwichNorms)
            {
                w[p + "pre_feedforward_layernorm.weight"] = Norm(cfg.Hidden);
                w[p + "post_feedforward_layernorm.weight"] = Norm(cfg.Hidden);
            }
            if (cfg.QkNorm)
            {
                w[p + "self_attn.q_norm.weight"] = Norm(cfg.HeadDim);
                w[p + "self_attn.k_norm.weight"] = Norm(cfg.HeadDim);
            }
            foreach (var m in AllModules)
            {
                var (o, i) = TorchReference.ModuleShape(cfg, m);
                string block = m is "q_proj" or "k_proj" or "v_proj" or "o_proj" ? "self_attn" : "mlp";
                w[$"{p}{block}.{m}.weight"] = Mat(o, i);
            }
            if (cfg.AttentionBias)
            {
                w[p + "self_attn.q_proj.bias"] = Vec(cfg.Heads * cfg.HeadDim);
                w[p + "self_attn.k_proj.bias"] = Vec(cfg.KvHeads * cfg.HeadDim);
                w[p + "self_attn.v_proj.bias"] = Vec(cfg.KvHeads * cfg.HeadDim);
            }
            if (oProjBias)
                w[p + "self_attn.o_proj.bias"] = Vec(cfg.Hidden);
        }
        w["model.norm.weight"] = Norm(cfg.Hidden);
        if (!cfg.TiedEmbeddings)
            w["lm_head.weight"] = Mat(cfg.Vocab, cfg.Hidden);
        return w;
    }

    static Dictionary<string, double[]> RandomAdapter(ReferenceConfig cfg, int seed, bool zeroB = false)
    {
        var rng = new Random(seed);
        var a = new Dictionary<string, double[]>();
        foreach (var (name, shape) in TorchReference.AdapterShapes(cfg))
        {
            long n = shape[0] * shape[1];
            bool isB = name.Contains(".lora_B.");
            a[name] = Enumerable.Range(0, (int)n).Select(_ => isB && zeroB ? 0.0 : Uniform(rng, 0.5)).ToArray();
        }
        return a;
    }

    // libtorch on CPU is not bitwise reproducible from run to run (a few ulps in float64), so "the same
    // value" means equal to 1e-12 relative.
    static void AssertClose(double expected, double actual, double rel = 1e-12) =>
        Assert.True(Math.Abs(expected - actual) <= rel * Math.Abs(expected), $"expected {expected:R}, got {actual:R}");

    static Dictionary<string, float[]> ToFloat(Dictionary<string, double[]> d) =>
        d.ToDictionary(kv => kv.Key, kv => Array.ConvertAll(kv.Value, v => (float)v));

    // ---------------------------------------------------------------------------------------------
    // (a) autograd gradients against central finite differences of the float64 loss.

    [Theory]
    [MemberData(nameof(Configs))]
    public void GradientsMatchFiniteDifferences(string which)
    {
        var cfg = Config(which);
        var weights = Weights(which, 1);
        var adapter = RandomAdapter(cfg, 2);
        var (loss, grads) = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens);
        Assert.True(double.IsFinite(loss) && loss > 0);
        Assert.Equal(TorchReference.AdapterShapes(cfg).Select(s => s.Name).OrderBy(s => s), grads.Keys.OrderBy(s => s));

        var rng = new Random(3);
        const double h = 1e-5;
        int checkedEntries = 0;
        double worst = 0;
        foreach (var (name, _) in TorchReference.AdapterShapes(cfg))
        {
            var values = adapter[name];
            Assert.Equal(values.Length, grads[name].Length);
            for (int k = 0; k < 3; k++)
            {
                int idx = rng.Next(values.Length);
                double orig = values[idx];
                values[idx] = orig + h;
                double plus = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens).Loss;
                values[idx] = orig - h;
                double minus = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens).Loss;
                values[idx] = orig;
                double fd = (plus - minus) / (2 * h);
                double ad = grads[name][idx];
                double err = Math.Abs(fd - ad);
                worst = Math.Max(worst, err / Math.Max(1e-3, Math.Abs(ad)));
                Assert.True(err <= 1e-8 + 1e-6 * Math.Abs(ad), $"{name}[{idx}]: autograd {ad:R}, finite difference {fd:R}");
                checkedEntries++;
            }
        }
        output.WriteLine($"{which}: loss {loss:R}, {checkedEntries} entries checked, worst relative error {worst:E2}");
        Assert.True(checkedEntries >= 3 * 2 * cfg.Layers * cfg.TargetModules.Length);
        // The gradients are not trivially zero.
        Assert.All(grads.Values, g => Assert.Contains(g, v => v != 0));
    }

    // ---------------------------------------------------------------------------------------------
    // (b) PEFT's initialization: B = 0, A random -> dA == 0 exactly, dB != 0.

    [Theory]
    [MemberData(nameof(Configs))]
    public void ZeroBGivesZeroGradientForA(string which)
    {
        var cfg = Config(which);
        var weights = ToFloat(Weights(which, 4));
        var adapter = ToFloat(RandomAdapter(cfg, 5, zeroB: true));
        var (loss, grads) = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens);

        // With B = 0 the adapter is the identity: same loss as with the adapter absent (A = 0 too).
        var none = adapter.ToDictionary(kv => kv.Key, kv => new float[kv.Value.Length]);
        AssertClose(TorchReference.LossAndGradients(cfg, weights, none, Tokens).Loss, loss);

        foreach (var (name, g) in grads)
        {
            if (name.Contains(".lora_A."))
                Assert.All(g, v => Assert.Equal(0f, v));
            else
                Assert.Contains(g, v => v != 0f);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // (c) lm_head.weight is used exactly when the embeddings are untied.

    [Fact]
    public void LmHeadIsUsedOnlyWhenUntied()
    {
        foreach (bool tied in new[] { true, false })
        {
            var cfg = QwenLike with { TiedEmbeddings = tied };
            var weights = RandomWeights(cfg with { TiedEmbeddings = false }, 6); // always holds an lm_head.weight
            var adapter = RandomAdapter(cfg, 7);
            double before = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens).Loss;

            var changed = new Dictionary<string, double[]>(weights);
            changed["lm_head.weight"] = weights["lm_head.weight"].Select(v => v * 1.5 + 0.01).ToArray();
            double after = TorchReference.LossAndGradients(cfg, changed, adapter, Tokens).Loss;

            if (tied) AssertClose(before, after);
            else Assert.True(Math.Abs(before - after) > 1e-3, $"untied: loss {before:R} unchanged by lm_head ({after:R})");
        }

        // Untied with lm_head equal to the embedding is the tied model.
        {
            var tiedCfg = QwenLike;
            var weights = RandomWeights(tiedCfg, 8);
            var adapter = RandomAdapter(tiedCfg, 9);
            var untied = new Dictionary<string, double[]>(weights) { ["lm_head.weight"] = weights["model.embed_tokens.weight"] };
            var a = TorchReference.LossAndGradients(tiedCfg, weights, adapter, Tokens);
            var b = TorchReference.LossAndGradients(tiedCfg with { TiedEmbeddings = false }, untied, adapter, Tokens);
            AssertClose(a.Loss, b.Loss);
            foreach (var (name, g) in a.Gradients)
                for (int i = 0; i < g.Length; i++)
                    Assert.True(Math.Abs(g[i] - b.Gradients[name][i]) <= 1e-14 + 1e-10 * Math.Abs(g[i]), $"{name}[{i}]");
        }
    }

    // ---------------------------------------------------------------------------------------------
    // The forward pass against a second implementation written with scalar loops.

    [Theory]
    [MemberData(nameof(Configs))]
    public void LossMatchesScalarLoopForward(string which)
    {
        var cfg = Config(which);
        var weights = Weights(which, 10);
        var adapter = RandomAdapter(cfg, 11);
        double torchLoss = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens).Loss;
        double loopLoss = NaiveLoss(cfg, weights, adapter, Tokens);
        output.WriteLine($"{which}: torch loss {torchLoss:R}, scalar-loop loss {loopLoss:R}");
        Assert.True(Math.Abs(torchLoss - loopLoss) <= 1e-12 * Math.Abs(loopLoss), $"torch {torchLoss:R}, loops {loopLoss:R}");

        // And with fewer tokens (the loss is over T-1 predictions).
        var shortTokens = Tokens.Take(2).ToArray();
        AssertClose(NaiveLoss(cfg, weights, adapter, shortTokens),
                     TorchReference.LossAndGradients(cfg, weights, adapter, shortTokens).Loss);
    }

    [Fact]
    public void Llama3RopeScalingHasThreeRegimes()
    {
        // theta 10000, head_dim 8: inv_freq = 1, 0.1, 0.01, 0.001; wavelengths 2π/inv_freq.
        // original 64, low 1, high 4: low-frequency wavelength 64, high-frequency wavelength 16.
        var inv = TorchReference.InverseFrequencies(LlamaLike);
        Assert.Equal(1.0, inv[0], 15);                          // 6.28 < 16: unchanged
        double smooth = (64 / (2 * Math.PI / 0.1) - 1) / (4 - 1);
        Assert.Equal((1 - smooth) * 0.1 / 8 + smooth * 0.1, inv[1], 15); // 62.8 in [16, 64]: interpolated
        Assert.Equal(0.01 / 8, inv[2], 15);                     // 628 > 64: divided by factor
        Assert.Equal(0.001 / 8, inv[3], 15);

        var plain = TorchReference.InverseFrequencies(QwenLike);
        Assert.Equal(new[] { 1.0, 0.1, 0.01, 0.001 }, plain.Select(v => Math.Round(v, 15)));
    }

    [Fact]
    public void MissingOrMisshapedTensorsAreRejected()
    {
        var cfg = LlamaLike;
        var weights = RandomWeights(cfg, 12);
        var adapter = RandomAdapter(cfg, 13);
        var missing = new Dictionary<string, double[]>(adapter);
        missing.Remove(missing.Keys.First());
        Assert.Throws<KeyNotFoundException>(() => TorchReference.LossAndGradients(cfg, weights, missing, Tokens));
        var extra = new Dictionary<string, double[]>(adapter)
        {
            [TorchReference.AdapterName(0, "k_proj", "lora_A")] = new double[cfg.LoraR * cfg.Hidden],
        };
        Assert.Throws<ArgumentException>(() => TorchReference.LossAndGradients(cfg, weights, extra, Tokens));
        var bad = new Dictionary<string, double[]>(weights) { ["model.norm.weight"] = new double[3] };
        Assert.Throws<ArgumentException>(() => TorchReference.LossAndGradients(cfg, bad, adapter, Tokens));
    }

    // ---------------------------------------------------------------------------------------------
    // Qwen3 and Gemma 3: each new op by hand, then its effect on the loss.

    static double[] Values(torch.Tensor t) => t.contiguous().data<double>().ToArray();

    static double MaxAbsDiff(torch.Tensor a, torch.Tensor b) => (a - b).abs().max().item<double>();

    static torch.Tensor RandomTensor(Random rng, params long[] shape) =>
        torch.tensor(Enumerable.Range(0, (int)shape.Aggregate(1L, (x, y) => x * y)).Select(_ => Uniform(rng, 1.0)).ToArray(),
            shape, dtype: torch.ScalarType.Float64);

    [Fact]
    public void GemmaNormIsOnePlusWeightTimesNormalized()
    {
        using var scope = torch.NewDisposeScope();
        // mean(x²) of [1, 2, 3, 4] is 30 / 4 = 7.5; of [−2, 0, 0, 2] it is 2.
        var x = torch.tensor(new double[] { 1, 2, 3, 4, -2, 0, 0, 2 }, new long[] { 2, 4 }, dtype: torch.ScalarType.Float64);
        var w = torch.tensor(new double[] { 0.5, -0.25, 0, 1 }, dtype: torch.ScalarType.Float64);
        const double eps = 1e-6;
        double r0 = Math.Sqrt(7.5 + eps), r1 = Math.Sqrt(2 + eps);

        var gemma = Values(TorchReference.RmsNorm(x, w, eps, weightOffset: 1));
        double[] gemmaExpected = { 1.5 / r0, 1.5 / r0, 3 / r0, 8 / r0, -3 / r1, 0, 0, 4 / r1 };   // (1 + w)·x̂
        var llama = Values(TorchReference.RmsNorm(x, w, eps));
        double[] llamaExpected = { 0.5 / r0, -0.5 / r0, 0, 4 / r0, -1 / r1, 0, 0, 2 / r1 };     // w·x̂
        for (int i = 0; i < 8; i++)
        {
            Assert.Equal(gemmaExpected[i], gemma[i], 14);
            Assert.Equal(llamaExpected[i], llama[i], 14);
        }
        // Gemma's weights are stored around 0: w = 0 is the plain normalization.
        var zero = Values(TorchReference.RmsNorm(x, torch.zeros(4, dtype: torch.ScalarType.Float64), eps, weightOffset: 1));
        Assert.Equal(1 / r0, zero[0], 14);
        Assert.Equal(2 / r1, zero[7], 14);
    }

    [Fact]
    public void SlidingMaskLetsQueryISeeKeysIMinusWPlusOneToI()
    {
        using var scope = torch.NewDisposeScope();
        // x: visible. W = 2 over 5 tokens: query i sees i − 1 and i (kv_idx > q_idx − W, kv_idx ≤ q_idx).
        string Grid(int window)
        {
            var masked = TorchReference.AttentionMask(5, window).data<bool>().ToArray();
            return string.Join("|", Enumerable.Range(0, 5).Select(i =>
                new string(Enumerable.Range(0, 5).Select(j => masked[i * 5 + j] ? '.' : 'x').ToArray())));
        }
        Assert.Equal("x....|xx...|xxx..|xxxx.|xxxxx", Grid(0));
        Assert.Equal("x....|.x...|..x..|...x.|....x", Grid(1));
        Assert.Equal("x....|xx...|.xx..|..xx.|...xx", Grid(2));
        Assert.Equal("x....|xx...|xxx..|.xxx.|..xxx", Grid(3));
        Assert.Equal(Grid(0), Grid(5));
    }

    [Fact]
    public void SlidingWindowAtLeastTIsFullAttentionAndWindowOneReturnsV()
    {
        using var scope = torch.NewDisposeScope();
        var rng = new Random(20);
        const int T = 6;
        var q = RandomTensor(rng, 4, T, 8);
        var k = RandomTensor(rng, 2, T, 8);
        var v = RandomTensor(rng, 2, T, 8);
        var full = TorchReference.Attention(q, k, v, 0.4, window: 0);
        Assert.Equal(0.0, MaxAbsDiff(full, TorchReference.Attention(q, k, v, 0.4, window: T)));
        Assert.Equal(0.0, MaxAbsDiff(full, TorchReference.Attention(q, k, v, 0.4, window: 50)));
        Assert.True(MaxAbsDiff(full, TorchReference.Attention(q, k, v, 0.4, window: 2)) > 1e-3);

        // W = 1: each token attends only itself, so query head h at position t returns v of its kv head (h / 2) at t.
        var self = Values(TorchReference.Attention(q, k, v, 0.4, window: 1));
        var vs = Values(v);
        for (int h = 0; h < 4; h++)
            for (int t = 0; t < T; t++)
                for (int d = 0; d < 8; d++)
                    Assert.Equal(vs[((h / 2) * T + t) * 8 + d], self[(h * T + t) * 8 + d]);
        // The first query sees only the first key in any case.
        Assert.Equal(0.0, MaxAbsDiff(full.narrow(1, 0, 1), v.repeat_interleave(2, 0).narrow(1, 0, 1)));

        // On the loss: windows ≥ T on every layer, with one RoPE for all, are the full model.
        var cfg = GemmaLike with { LocalRopeTheta = null };
        var weights = Weights("gemma", 21);
        var adapter = RandomAdapter(cfg, 22);
        double fullLoss = TorchReference.LossAndGradients(cfg with { LayerWindows = null }, weights, adapter, Tokens).Loss;
        AssertClose(fullLoss, TorchReference.LossAndGradients(cfg with { LayerWindows = new[] { 7, 7, 7 } }, weights, adapter, Tokens).Loss);
        AssertClose(fullLoss, TorchReference.LossAndGradients(cfg with { LayerWindows = new[] { 0, 100, 0 } }, weights, adapter, Tokens).Loss);
        double windowed = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens).Loss;
        Assert.True(Math.Abs(windowed - fullLoss) > 1e-4, $"a window of 3 on 7 tokens left the loss at {fullLoss:R}");
    }

    [Fact]
    public void GeluTanhMatchesItsFormula()
    {
        using var scope = torch.NewDisposeScope();
        var xs = Enumerable.Range(0, 241).Select(i => -6 + i * 0.05).ToArray();
        var x = torch.tensor(xs, dtype: torch.ScalarType.Float64);
        var gelu = Values(TorchReference.Activation(x, "gelu_pytorch_tanh"));
        var silu = Values(TorchReference.Activation(x, "silu"));
        var exact = Values(torch.nn.functional.gelu(x));   // erf GELU, which Gemma does not use
        double worstToErf = 0;
        for (int i = 0; i < xs.Length; i++)
        {
            double z = xs[i];
            Assert.Equal(0.5 * z * (1 + Math.Tanh(Math.Sqrt(2 / Math.PI) * (z + 0.044715 * z * z * z))), gelu[i], 14);
            Assert.Equal(z / (1 + Math.Exp(-z)), silu[i], 14);
            worstToErf = Math.Max(worstToErf, Math.Abs(gelu[i] - exact[i]));
        }
        output.WriteLine($"tanh GELU against erf GELU on [-6, 6]: max difference {worstToErf:E2}");
        Assert.True(worstToErf > 1e-5, "the tanh approximation is indistinguishable from erf GELU");
        Assert.Throws<ArgumentException>(() => TorchReference.Activation(x, "gelu"));
    }

    [Fact]
    public void SoftcapBoundsLogitsAndAHugeCapIsNoCap()
    {
        using var scope = torch.NewDisposeScope();
        double[] xs = { -1000, -10, -1, 0, 2, 10 };
        var x = torch.tensor(xs, dtype: torch.ScalarType.Float64);
        var capped = Values(TorchReference.Softcap(x, 5));
        for (int i = 0; i < xs.Length; i++) Assert.Equal(5 * Math.Tanh(xs[i] / 5), capped[i], 14);
        Assert.Equal(-5, capped[0], 14);                           // saturates at −c
        Assert.True(capped[5] < 5 && capped[5] > 4.8);             // 5·tanh(2) = 4.82
        Assert.Equal(0.0, capped[3]);
        Assert.Equal(xs, Values(TorchReference.Softcap(x, null)));

        var weights = Weights("gemma", 23);
        var adapter = RandomAdapter(GemmaLike, 24);
        double none = TorchReference.LossAndGradients(GemmaLike with { FinalLogitSoftcap = null }, weights, adapter, Tokens).Loss;
        AssertClose(none, TorchReference.LossAndGradients(GemmaLike with { FinalLogitSoftcap = 1e9 }, weights, adapter, Tokens).Loss, 1e-10);
        double capped3 = TorchReference.LossAndGradients(GemmaLike, weights, adapter, Tokens).Loss;
        Assert.True(Math.Abs(capped3 - none) > 1e-3, $"a cap of 3 left the loss at {none:R}");
    }

    [Fact]
    public void LocalRopeBaseAppliesToSlidingLayersOnlyAndLinearFactorToFullOnes()
    {
        // head_dim 8: inv_freq = base^(−j/4). Full layers: base 10⁶, divided by the linear factor 8.
        var full = TorchReference.InverseFrequencies(GemmaLike);
        double[] fullExpected = { 1.0 / 8, Math.Pow(10, -1.5) / 8, 1e-3 / 8, Math.Pow(10, -4.5) / 8 };
        var sliding = TorchReference.InverseFrequencies(GemmaLike, slidingLayer: true);
        double[] slidingExpected = { 1, 0.1, 0.01, 0.001 };           // base 10⁴, no scaling
        for (int j = 0; j < 4; j++)
        {
            Assert.Equal(fullExpected[j], full[j], 15);
            Assert.Equal(slidingExpected[j], sliding[j], 15);
        }
        // Without a local base, sliding layers use the full layers' frequencies.
        Assert.Equal(full, TorchReference.InverseFrequencies(GemmaLike with { LocalRopeTheta = null }, slidingLayer: true));

        var weights = Weights("gemma", 25);
        var adapter = RandomAdapter(GemmaLike, 26);
        double Loss(ReferenceConfig c) => TorchReference.LossAndGradients(c, weights, adapter, Tokens).Loss;
        var allFull = GemmaLike with { LayerWindows = null };
        AssertClose(Loss(allFull), Loss(allFull with { LocalRopeTheta = 500 }));
        Assert.True(Math.Abs(Loss(GemmaLike) - Loss(GemmaLike with { LocalRopeTheta = 500 })) > 1e-6);
        Assert.True(Math.Abs(Loss(GemmaLike) - Loss(GemmaLike with { LinearRopeFactor = null })) > 1e-6);
        // The default attention scale is 1/sqrt(head_dim).
        AssertClose(Loss(GemmaLike with { AttentionScale = null }), Loss(GemmaLike with { AttentionScale = 1 / Math.Sqrt(8) }));
        Assert.True(Math.Abs(Loss(GemmaLike) - Loss(GemmaLike with { AttentionScale = null })) > 1e-6);
    }

    [Fact]
    public void GemmaEmbeddingScaleIsFloat32SquareRoot()
    {
        Assert.Equal(4.2426404953002930, TorchReference.GemmaEmbeddingScale(18), 15);    // sqrt(18) = 4.242640687…
        Assert.NotEqual(Math.Sqrt(18), TorchReference.GemmaEmbeddingScale(18));
        Assert.Equal(33.941123962402344, TorchReference.GemmaEmbeddingScale(1152), 15);  // gemma-3-1b: sqrt(1152) = 33.9411254…
        Assert.Equal(new[] { 512, 512, 512, 512, 512, 0, 512, 512 }, TorchReference.SlidingWindowPattern(8, 512, 6));

        // The scale multiplies the input embedding only: the tied head stays the unscaled table, so
        // untying it with lm_head = embed_tokens is the same model.
        var weights = Weights("gemma", 27);
        var adapter = RandomAdapter(GemmaLike, 28);
        var untied = new Dictionary<string, double[]>(weights) { ["lm_head.weight"] = weights["model.embed_tokens.weight"] };
        double tied = TorchReference.LossAndGradients(GemmaLike, weights, adapter, Tokens).Loss;
        AssertClose(tied, TorchReference.LossAndGradients(GemmaLike with { TiedEmbeddings = false }, untied, adapter, Tokens).Loss);
        Assert.True(Math.Abs(tied - TorchReference.LossAndGradients(GemmaLike with { EmbeddingScale = 1 }, weights, adapter, Tokens).Loss) > 1e-4);
    }

    /// <summary>The base tensors each family reads: every one is required, and nothing else is.</summary>
    [Theory]
    [InlineData("qwen", "input_layernorm post_attention_layernorm self_attn.q_proj.bias self_attn.k_proj.bias self_attn.v_proj.bias")]
    [InlineData("llama", "input_layernorm post_attention_layernorm")]
    [InlineData("qwen3", "input_layernorm post_attention_layernorm self_attn.q_norm self_attn.k_norm")]
    [InlineData("qwen3-bias", "input_layernorm post_attention_layernorm self_attn.q_norm self_attn.k_norm self_attn.q_proj.bias self_attn.k_proj.bias self_attn.v_proj.bias self_attn.o_proj.bias")]
    [InlineData("gemma", "input_layernorm post_attention_layernorm pre_feedforward_layernorm post_feedforward_layernorm self_attn.q_norm self_attn.k_norm")]
    public void EachFamilyReadsItsTensors(string which, string layerTensors)
    {
        var cfg = Config(which);
        var weights = Weights(which, 29);
        var adapter = RandomAdapter(cfg, 30);

        var perLayer = layerTensors.Split(' ').Select(n => n.EndsWith(".bias") ? n : n + ".weight")
            .Concat(AllModules.Select(m => $"{(m.EndsWith("_proj") && "qkvo".Contains(m[0]) ? "self_attn" : "mlp")}.{m}.weight"));
        var expected = Enumerable.Range(0, cfg.Layers).SelectMany(l => perLayer.Select(n => $"model.layers.{l}.{n}"))
            .Append("model.embed_tokens.weight").Append("model.norm.weight");
        if (!cfg.TiedEmbeddings) expected = expected.Append("lm_head.weight");
        Assert.Equal(expected.OrderBy(n => n, StringComparer.Ordinal), weights.Keys.OrderBy(n => n, StringComparer.Ordinal));

        foreach (var name in weights.Keys)
        {
            var without = new Dictionary<string, double[]>(weights);
            without.Remove(name);
            if (name.EndsWith("o_proj.bias"))
            {
                // Optional: used iff present (Qwen3 and Gemma 3 with attention_bias; never Qwen2).
                double with = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens).Loss;
                Assert.True(Math.Abs(with - TorchReference.LossAndGradients(cfg, without, adapter, Tokens).Loss) > 1e-6, name);
                continue;
            }
            var e = Assert.Throws<KeyNotFoundException>(() => TorchReference.LossAndGradients(cfg, without, adapter, Tokens));
            Assert.Contains(name, e.Message);
        }
    }

    /// <summary>LCSB's skipped layer: out = h + stopgrad(f(h)).</summary>
    [Theory]
    [MemberData(nameof(Configs))]
    public void StopGradientLayerKeepsTheLossAndCutsItsJacobian(string which)
    {
        var cfg = Config(which);
        var weights = Weights(which, 31);
        var adapter = RandomAdapter(cfg, 32);
        int skipped = cfg.Layers - 2;
        var full = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens);
        var lcsb = TorchReference.LossAndGradients(cfg, weights, adapter, Tokens, new HashSet<int> { skipped });
        AssertClose(full.Loss, lcsb.Loss);
        foreach (var (name, g) in lcsb.Gradients)
        {
            int layer = int.Parse(name.Split('.')[4]);
            var f = full.Gradients[name];
            if (layer == skipped)
                Assert.All(g, v => Assert.Equal(0.0, v));
            else if (layer > skipped)   // above the skipped layer nothing changes
                for (int i = 0; i < g.Length; i++)
                    Assert.True(Math.Abs(g[i] - f[i]) <= 1e-12 + 1e-9 * Math.Abs(f[i]), $"{name}[{i}]: {g[i]:R} against {f[i]:R}");
            else                        // below it, the skipped layer's Jacobian is missing
                Assert.True(g.Zip(f).Max(p => Math.Abs(p.First - p.Second)) > 1e-6 * f.Max(Math.Abs), name);
        }
    }

    [Fact]
    public void BadNewFieldsAreRejected()
    {
        var weights = Weights("gemma", 33);
        var adapter = RandomAdapter(GemmaLike, 34);
        foreach (var bad in new[]
                 {
                     GemmaLike with { LayerWindows = new[] { 3, 0 } },
                     GemmaLike with { LayerWindows = new[] { 3, -1, 0 } },
                     GemmaLike with { HiddenActivation = "gelu" },
                     GemmaLike with { Llama3RopeScaling = (8.0, 1.0, 4.0, 64) },
                     GemmaLike with { LinearRopeFactor = 0 },
                     GemmaLike with { FinalLogitSoftcap = 0 },
                     GemmaLike with { AttentionScale = -1 },
                 })
            Assert.Throws<ArgumentException>(() => TorchReference.LossAndGradients(bad, weights, adapter, Tokens));
    }

    /// <summary>The same model, one scalar at a time, straight from the Hugging Face definitions.</summary>
    static double NaiveLoss(ReferenceConfig cfg, Dictionary<string, double[]> w, Dictionary<string, double[]> lora, int[] tokens)
    {
        int T = tokens.Length, H = cfg.Hidden, D = cfg.HeadDim;
        double s = cfg.LoraAlpha / cfg.LoraR;

        double[][] Linear(double[][] x, int layer, string block, string module, string? biasName)
        {
            var (o, i) = TorchReference.ModuleShape(cfg, module);
            var W = w[$"model.layers.{layer}.{block}.{module}.weight"];
            double[]? b = biasName is not null && w.TryGetValue(biasName, out var bb) ? bb : null;
            bool lo = cfg.TargetModules.Contains(module);
            double[]? A = lo ? lora[TorchReference.AdapterName(layer, module, "lora_A")] : null;
            double[]? B = lo ? lora[TorchReference.AdapterName(layer, module, "lora_B")] : null;
            var y = new double[x.Length][];
            for (int t = 0; t < x.Length; t++)
            {
                y[t] = new double[o];
                var hr = new double[cfg.LoraR];
                if (lo)
                    for (int r = 0; r < cfg.LoraR; r++)
                        for (int c = 0; c < i; c++) hr[r] += x[t][c] * A![r * i + c];
                for (int n = 0; n < o; n++)
                {
                    double acc = b?[n] ?? 0;
                    for (int c = 0; c < i; c++) acc += x[t][c] * W[n * i + c];
                    if (lo)
                        for (int r = 0; r < cfg.LoraR; r++) acc += s * hr[r] * B![n * cfg.LoraR + r];
                    y[t][n] = acc;
                }
            }
            return y;
        }

        // RMSNorm of each run of g.Length values (a whole row, or one head of q / k).
        double[][] Norm(double[][] x, double[] g)
        {
            int n = g.Length;
            return x.Select(row =>
            {
                var outRow = new double[row.Length];
                for (int start = 0; start < row.Length; start += n)
                {
                    double ms = 0;
                    for (int c = 0; c < n; c++) ms += row[start + c] * row[start + c];
                    double inv = 1.0 / Math.Sqrt(ms / n + cfg.RmsEps);
                    for (int c = 0; c < n; c++) outRow[start + c] = (cfg.NormWeightOffset + g[c]) * (row[start + c] * inv);
                }
                return outRow;
            }).ToArray();
        }

        double[][] Add(double[][] a, double[][] b) => a.Select((row, t) => row.Select((val, c) => val + b[t][c]).ToArray()).ToArray();

        double Act(double z) => cfg.HiddenActivation switch
        {
            "silu" => z / (1 + Math.Exp(-z)),
            "gelu_pytorch_tanh" => 0.5 * z * (1 + Math.Tanh(Math.Sqrt(2 / Math.PI) * (z + 0.044715 * z * z * z))),
            _ => throw new ArgumentException(cfg.HiddenActivation),
        };

        void Rope(double[][] x, int heads, bool sliding)
        {
            // Independent inverse frequencies (same published formulas).
            bool local = sliding && cfg.LocalRopeTheta is not null;
            var invFreq = new double[D / 2];
            for (int j = 0; j < D / 2; j++)
            {
                double f = Math.Pow(local ? cfg.LocalRopeTheta!.Value : cfg.RopeTheta, -2.0 * j / D);
                if (!local && cfg.LinearRopeFactor is { } lf) f /= lf;
                if (!local && cfg.Llama3RopeScaling is { } sc)
                {
                    double wl = 2 * Math.PI / f;
                    double lowWl = sc.OriginalMaxPositionEmbeddings / sc.LowFreqFactor;
                    double highWl = sc.OriginalMaxPositionEmbeddings / sc.HighFreqFactor;
                    if (wl > lowWl) f /= sc.Factor;
                    else if (wl >= highWl)
                    {
                        double sm = (sc.OriginalMaxPositionEmbeddings / wl - sc.LowFreqFactor) / (sc.HighFreqFactor - sc.LowFreqFactor);
                        f = (1 - sm) * f / sc.Factor + sm * f;
                    }
                }
                invFreq[j] = f;
            }
            for (int t = 0; t < x.Length; t++)
                for (int hh = 0; hh < heads; hh++)
                    for (int j = 0; j < D / 2; j++)
                    {
                        double angle = t * invFreq[j];
                        double c = Math.Cos(angle), sn = Math.Sin(angle);
                        int i1 = hh * D + j, i2 = hh * D + j + D / 2;
                        double a = x[t][i1], b = x[t][i2];
                        x[t][i1] = a * c - b * sn;
                        x[t][i2] = b * c + a * sn;
                    }
        }

        var emb = w["model.embed_tokens.weight"];
        var hs = tokens.Select(tok => emb.Skip(tok * H).Take(H).Select(e => e * cfg.EmbeddingScale).ToArray()).ToArray();
        int rep = cfg.Heads / cfg.KvHeads;
        double scale = cfg.AttentionScale ?? 1 / Math.Sqrt(D);
        for (int l = 0; l < cfg.Layers; l++)
        {
            string p = $"model.layers.{l}.";
            int window = cfg.LayerWindows?[l] ?? 0;
            var x = Norm(hs, w[p + "input_layernorm.weight"]);
            var q = Linear(x, l, "self_attn", "q_proj", cfg.AttentionBias ? p + "self_attn.q_proj.bias" : null);
            var k = Linear(x, l, "self_attn", "k_proj", cfg.AttentionBias ? p + "self_attn.k_proj.bias" : null);
            var v = Linear(x, l, "self_attn", "v_proj", cfg.AttentionBias ? p + "self_attn.v_proj.bias" : null);
            if (cfg.QkNorm)
            {
                q = Norm(q, w[p + "self_attn.q_norm.weight"]);
                k = Norm(k, w[p + "self_attn.k_norm.weight"]);
            }
            Rope(q, cfg.Heads, window > 0);
            Rope(k, cfg.KvHeads, window > 0);
            var attn = new double[T][];
            for (int t = 0; t < T; t++) attn[t] = new double[cfg.Heads * D];
            for (int hh = 0; hh < cfg.Heads; hh++)
            {
                int kvh = hh / rep;
                for (int t = 0; t < T; t++)
                {
                    int first = window > 0 ? Math.Max(0, t - window + 1) : 0;   // keys first..t
                    var sc = new double[t + 1 - first];
                    for (int u = first; u <= t; u++)
                    {
                        double dot = 0;
                        for (int d = 0; d < D; d++) dot += q[t][hh * D + d] * k[u][kvh * D + d];
                        sc[u - first] = dot * scale;
                    }
                    double mx = sc.Max();
                    var e = sc.Select(z => Math.Exp(z - mx)).ToArray();
                    double sum = e.Sum();
                    for (int u = first; u <= t; u++)
                        for (int d = 0; d < D; d++) attn[t][hh * D + d] += e[u - first] / sum * v[u][kvh * D + d];
                }
            }
            var o = Linear(attn, l, "self_attn", "o_proj", p + "self_attn.o_proj.bias");
            if (cfg.SandwichNorms) o = Norm(o, w[p + "post_attention_layernorm.weight"]);
            hs = Add(hs, o);

            x = Norm(hs, w[p + (cfg.SandwichNorms ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight")]);
            var g = Linear(x, l, "mlp", "gate_proj", null);
            var u2 = Linear(x, l, "mlp", "up_proj", null);
            var act = g.Select((row, t) => row.Select((z, c) => Act(z) * u2[t][c]).ToArray()).ToArray();
            var down = Linear(act, l, "mlp", "down_proj", null);
            if (cfg.SandwichNorms) down = Norm(down, w[p + "post_feedforward_layernorm.weight"]);
            hs = Add(hs, down);
        }
        hs = Norm(hs, w["model.norm.weight"]);
        var head = cfg.TiedEmbeddings ? emb : w["lm_head.weight"];
        double total = 0;
        for (int t = 0; t < T - 1; t++)
        {
            var logits = new double[cfg.Vocab];
            for (int vv = 0; vv < cfg.Vocab; vv++)
            {
                for (int c = 0; c < H; c++) logits[vv] += hs[t][c] * head[vv * H + c];
                if (cfg.FinalLogitSoftcap is { } cap) logits[vv] = cap * Math.Tanh(logits[vv] / cap);
            }
            double mx = logits.Max();
            double lse = mx + Math.Log(logits.Sum(z => Math.Exp(z - mx)));
            total += lse - logits[tokens[t + 1]];
        }
        return total / (T - 1);
    }
}
