using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LoraCompiler.Tests.Reference;

/// <summary>
/// Shape and hyper-parameters of a decoder-only transformer with LoRA adapters. The positional
/// members and the defaults of the init-only ones are Hugging Face's Qwen2 / Llama; the init-only
/// members switch on what Qwen3 and Gemma 3 (text) add. <see cref="Llama3RopeScaling"/> is
/// <c>rope_scaling</c> with <c>rope_type: "llama3"</c>, or null for plain RoPE.
/// </summary>
public sealed record ReferenceConfig(
    int Hidden,
    int Intermediate,
    int Layers,
    int Heads,
    int KvHeads,
    int HeadDim,
    int Vocab,
    double RmsEps,
    double RopeTheta,
    (double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositionEmbeddings)? Llama3RopeScaling,
    bool TiedEmbeddings,
    bool AttentionBias,
    int LoraR,
    double LoraAlpha,
    string[] TargetModules)
{
    /// <summary>
    /// Qwen3 / Gemma 3: <c>q_norm</c> and <c>k_norm</c>, an RMSNorm over head_dim applied to every
    /// head of q and k after the projection and before RoPE (weights
    /// <c>model.layers.{l}.self_attn.q_norm.weight</c> / <c>k_norm.weight</c>, [head_dim]).
    /// </summary>
    public bool QkNorm { get; init; }

    /// <summary>
    /// Every RMSNorm (layer norms, q/k norms, the final norm) multiplies the normalized x by
    /// (<see cref="NormWeightOffset"/> + w): 0 for Llama / Qwen (w·x̂), 1 for Gemma ((1 + w)·x̂).
    /// </summary>
    public double NormWeightOffset { get; init; }

    /// <summary>
    /// Gemma 3's layer: input_layernorm → attention → post_attention_layernorm (of the attention
    /// output) → residual add; pre_feedforward_layernorm → MLP → post_feedforward_layernorm (of the
    /// MLP output) → residual add. Without it, Llama's: post_attention_layernorm is the pre-MLP norm.
    /// </summary>
    public bool SandwichNorms { get; init; }

    /// <summary>
    /// The embedding output is multiplied by this (Gemma: sqrt(hidden) rounded to float32, see
    /// <see cref="TorchReference.GemmaEmbeddingScale"/>). A tied LM head uses the unscaled embedding.
    /// </summary>
    public double EmbeddingScale { get; init; } = 1;

    /// <summary>The factor on q·kᵀ; null is 1/sqrt(head_dim). Gemma: <c>query_pre_attn_scalar ** -0.5</c>.</summary>
    public double? AttentionScale { get; init; }

    /// <summary>The GLU's activation on gate_proj: "silu" or "gelu_pytorch_tanh" (tanh-approximated GELU).</summary>
    public string HiddenActivation { get; init; } = "silu";

    /// <summary>
    /// Per layer (length <see cref="Layers"/>): 0 is full causal attention, W &gt; 0 a sliding window
    /// where query i sees key j iff 0 ≤ i − j &lt; W. Null: every layer full.
    /// </summary>
    public int[]? LayerWindows { get; init; }

    /// <summary>
    /// RoPE base of the sliding layers (Gemma's <c>rope_local_base_freq</c>), plain RoPE without any
    /// scaling; null: sliding layers use the full layers' frequencies.
    /// </summary>
    public double? LocalRopeTheta { get; init; }

    /// <summary>
    /// <c>rope_scaling {"rope_type": "linear", "factor": f}</c> of the full layers: inv_freq / f.
    /// Exclusive with <see cref="Llama3RopeScaling"/>.
    /// </summary>
    public double? LinearRopeFactor { get; init; }

    /// <summary><c>final_logit_softcapping</c> c: logits = c·tanh(logits / c); null: none.</summary>
    public double? FinalLogitSoftcap { get; init; }

    /// <summary>The attention window of a layer: 0 for full causal attention.</summary>
    public int WindowOf(int layer) => LayerWindows is { } w ? w[layer] : 0;
}

/// <summary>
/// The independent autograd reference: the model is written forward only, with plain TorchSharp ops
/// in float64, and libtorch's autograd computes the backward. Nothing here shares code with the
/// hand-derived backward under test.
///
/// Semantics follow transformers' modeling_qwen2.py / modeling_llama.py, modeling_qwen3.py and
/// modeling_gemma3.py (Gemma3ForCausalLM; batch 1, no padding, no KV cache, eval mode, LoRA dropout
/// off), masking_utils.py's sliding-window mask, and PEFT's LoRA Linear (scaling = alpha / r).
/// </summary>
public static class TorchReference
{
    public static readonly string[] AttentionModules = { "q_proj", "k_proj", "v_proj", "o_proj" };
    public static readonly string[] MlpModules = { "gate_proj", "up_proj", "down_proj" };
    public static readonly string[] Activations = { "silu", "gelu_pytorch_tanh" };

    /// <summary>PEFT's name of a LoRA tensor: <paramref name="ab"/> is "lora_A" or "lora_B".</summary>
    public static string AdapterName(int layer, string module, string ab)
    {
        string block = Array.IndexOf(AttentionModules, module) >= 0 ? "self_attn"
            : Array.IndexOf(MlpModules, module) >= 0 ? "mlp"
            : throw new ArgumentException($"unknown LoRA target module '{module}'", nameof(module));
        return $"base_model.model.model.layers.{layer}.{block}.{module}.{ab}.weight";
    }

    /// <summary>[out, in] of a projection.</summary>
    public static (int Out, int In) ModuleShape(ReferenceConfig cfg, string module) => module switch
    {
        "q_proj" => (cfg.Heads * cfg.HeadDim, cfg.Hidden),
        "k_proj" => (cfg.KvHeads * cfg.HeadDim, cfg.Hidden),
        "v_proj" => (cfg.KvHeads * cfg.HeadDim, cfg.Hidden),
        "o_proj" => (cfg.Hidden, cfg.Heads * cfg.HeadDim),
        "gate_proj" => (cfg.Intermediate, cfg.Hidden),
        "up_proj" => (cfg.Intermediate, cfg.Hidden),
        "down_proj" => (cfg.Hidden, cfg.Intermediate),
        _ => throw new ArgumentException($"unknown module '{module}'", nameof(module)),
    };

    /// <summary>
    /// Gemma's embedding multiplier: transformers holds <c>hidden_size ** 0.5</c> in a float32 tensor
    /// and casts it to the compute dtype, so float32 compute sees the float32-rounded square root.
    /// </summary>
    public static double GemmaEmbeddingScale(int hidden) => (float)Math.Sqrt(hidden);

    /// <summary>
    /// <see cref="ReferenceConfig.LayerWindows"/> from an older Gemma 3 config that gives only
    /// <c>sliding_window_pattern</c>: layer i slides iff (i + 1) % pattern ≠ 0.
    /// </summary>
    public static int[] SlidingWindowPattern(int layers, int window, int pattern) =>
        Enumerable.Range(0, layers).Select(i => (i + 1) % pattern != 0 ? window : 0).ToArray();

    /// <summary>
    /// RoPE inverse frequencies, as transformers' default, "linear" and "llama3" rope initializers
    /// compute them (here in double precision). A sliding layer with
    /// <see cref="ReferenceConfig.LocalRopeTheta"/> set gets plain RoPE of that base, unscaled.
    /// </summary>
    public static double[] InverseFrequencies(ReferenceConfig cfg, bool slidingLayer = false)
    {
        int d = cfg.HeadDim;
        bool local = slidingLayer && cfg.LocalRopeTheta is not null;
        double theta = local ? cfg.LocalRopeTheta!.Value : cfg.RopeTheta;
        var inv = new double[d / 2];
        for (int j = 0; j < d / 2; j++)
            inv[j] = 1.0 / Math.Pow(theta, (2.0 * j) / d);
        if (local) return inv;
        if (cfg.LinearRopeFactor is { } f)
            for (int j = 0; j < inv.Length; j++) inv[j] /= f;
        if (cfg.Llama3RopeScaling is { } s)
        {
            double lowFreqWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
            double highFreqWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
            for (int j = 0; j < inv.Length; j++)
            {
                double wavelen = 2 * Math.PI / inv[j];
                if (wavelen > lowFreqWavelen)
                    inv[j] /= s.Factor;                         // low frequency: scaled
                else if (wavelen < highFreqWavelen)
                { }                                             // high frequency: unchanged
                else
                {
                    double smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor)
                                    / (s.HighFreqFactor - s.LowFreqFactor);
                    inv[j] = (1 - smooth) * inv[j] / s.Factor + smooth * inv[j];
                }
            }
        }
        return inv;
    }

    // ---------------------------------------------------------------------------------------------
    // The ops the forward pass is made of, public so that tests can check each one by hand.

    /// <summary>
    /// A float64 constant as a 0-dimensional tensor. Every number the reference multiplies or adds is
    /// one, never a temporary TorchSharp Scalar: TorchSharp 0.107 hands a temporary Scalar's handle to libtorch
    /// without keeping the Scalar alive, so a garbage collection in between frees it under the call
    /// (seen as "Unknown scalar type" and toDouble failures in parallel test runs).
    /// </summary>
    public static Tensor Constant(double value) => torch.tensor(value, ScalarType.Float64);

    /// <summary>
    /// a + b. TorchSharp's + passes libtorch a temporary Scalar alpha = 1 that it does not keep alive
    /// either; this one lives as long as the class.
    /// </summary>
    public static Tensor Add(Tensor a, Tensor b) => a.add(b, One);

    private static readonly Scalar One = 1.0;

    /// <summary>RMSNorm over the last dimension: (offset + w) · x · rsqrt(mean(x²) + eps).</summary>
    public static Tensor RmsNorm(Tensor x, Tensor weight, double eps, double weightOffset = 0)
    {
        var normalized = x * torch.rsqrt(Add((x * x).mean(new long[] { -1 }, keepdim: true), Constant(eps)));
        return (weightOffset == 0 ? weight : Add(weight, Constant(weightOffset))) * normalized;
    }

    /// <summary>
    /// [T, T], true where query i may not see key j: j &gt; i (causal), or, for a sliding window
    /// W &gt; 0, i − j ≥ W. masking_utils' sliding mask is causal ∧ (kv_idx &gt; q_idx − W).
    /// </summary>
    public static Tensor AttentionMask(int tokens, int window)
    {
        var back = torch.arange(tokens, dtype: ScalarType.Int64).unsqueeze(1)
                   - torch.arange(tokens, dtype: ScalarType.Int64).unsqueeze(0);    // i − j
        var masked = back.lt(torch.tensor(0L));
        return window > 0 ? masked.logical_or(back.ge(torch.tensor((long)window))) : masked;
    }

    /// <summary>
    /// Scaled dot-product attention with a causal (optionally sliding) mask and grouped kv heads:
    /// q [heads, T, d], k and v [kv heads, T, d] → [heads, T, d]. kv head j serves query heads
    /// j·g .. j·g + g − 1 (transformers' repeat_kv).
    /// </summary>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, double scale, int window)
    {
        long rep = q.shape[0] / k.shape[0];
        k = k.repeat_interleave(rep, 0);
        v = v.repeat_interleave(rep, 0);
        var scores = q.matmul(k.transpose(1, 2)) * Constant(scale);              // [heads, T, T]
        scores = torch.where(AttentionMask((int)q.shape[1], window), Constant(double.NegativeInfinity), scores);
        return F.softmax(scores, -1).matmul(v);
    }

    /// <summary>The GLU's activation, by its transformers name (ACT2FN).</summary>
    public static Tensor Activation(Tensor x, string name) => name switch
    {
        "silu" => F.silu(x),
        "gelu_pytorch_tanh" => F.gelu(x, TorchSharp.Modules.GELU.Approximate.tanh),
        _ => throw new ArgumentException($"unknown hidden activation '{name}' (known: {string.Join(", ", Activations)})"),
    };

    /// <summary>Gemma's logit softcap c·tanh(x / c); the identity for a null cap.</summary>
    public static Tensor Softcap(Tensor logits, double? cap) =>
        cap is { } c ? torch.tanh(logits / Constant(c)) * Constant(c) : logits;

    /// <summary>cos and sin [T, head_dim] of RoPE: emb = cat(freqs, freqs), freqs = position ⊗ inv_freq.</summary>
    public static (Tensor Cos, Tensor Sin) RopeTables(double[] inverseFrequencies, int tokens)
    {
        var invFreq = torch.tensor(inverseFrequencies, dtype: ScalarType.Float64);
        var freqs = torch.outer(torch.arange(tokens, dtype: ScalarType.Float64), invFreq);
        var emb = torch.cat(new[] { freqs, freqs }, -1);
        return (emb.cos(), emb.sin());
    }

    /// <summary>x·cos + rotate_half(x)·sin over the last dimension, rotate_half(x) = cat(−x2, x1).</summary>
    public static Tensor ApplyRope(Tensor x, Tensor cos, Tensor sin)
    {
        long half = x.shape[^1] / 2;
        var x1 = x.narrow(-1, 0, half);
        var x2 = x.narrow(-1, half, half);
        return Add(x * cos, torch.cat(new[] { -x2, x1 }, -1) * sin);
    }

    // ---------------------------------------------------------------------------------------------

    public static (double Loss, Dictionary<string, float[]> Gradients) LossAndGradients(
        ReferenceConfig cfg, IReadOnlyDictionary<string, float[]> weights,
        IReadOnlyDictionary<string, float[]> adapter, int[] tokens, IReadOnlySet<int>? stopGradientLayers = null)
    {
        var (loss, grads) = LossAndGradients(cfg, Widen(weights), Widen(adapter), tokens, stopGradientLayers);
        return (loss, grads.ToDictionary(kv => kv.Key, kv => Array.ConvertAll(kv.Value, v => (float)v)));
    }

    /// <summary>
    /// Same, with double-precision inputs and gradients (for finite-difference checks). A layer in
    /// <paramref name="stopGradientLayers"/> is LCSB's skipped block, out = h + stopgrad(f(h)).
    /// </summary>
    public static (double Loss, Dictionary<string, double[]> Gradients) LossAndGradients(
        ReferenceConfig cfg, IReadOnlyDictionary<string, double[]> weights,
        IReadOnlyDictionary<string, double[]> adapter, int[] tokens, IReadOnlySet<int>? stopGradientLayers = null)
    {
        using (Exclusive())
            return LossAndGradientsAlone(cfg, weights, adapter, tokens, stopGradientLayers);
    }

    private static readonly SemaphoreSlim Libtorch = new(1, 1);

    /// <summary>
    /// Holds libtorch for one caller until disposed: the tests run in parallel, and libtorch calls from
    /// several threads at once now and then failed with "Unknown scalar type". A semaphore, not a
    /// lock, so a test class may take it in its constructor and give it back in Dispose.
    /// </summary>
    public static IDisposable Exclusive()
    {
        Libtorch.Wait();
        return new Release();
    }

    private sealed class Release : IDisposable
    {
        private int _released;
        public void Dispose()
        {
            if (Interlocked.Exchange(ref _released, 1) == 0)
                Libtorch.Release();
        }
    }

    private static (double Loss, Dictionary<string, double[]> Gradients) LossAndGradientsAlone(
        ReferenceConfig cfg, IReadOnlyDictionary<string, double[]> weights,
        IReadOnlyDictionary<string, double[]> adapter, int[] tokens, IReadOnlySet<int>? stopGradientLayers)
    {
        Validate(cfg, tokens);
        CheckAdapterKeys(cfg, adapter);

        using var scope = torch.NewDisposeScope();
        using var _ = torch.enable_grad();

        var lora = new Dictionary<string, Tensor>();
        foreach (var (name, shape) in AdapterShapes(cfg))
            lora[name] = Leaf(adapter, name, shape, requiresGrad: true, "adapter");

        var ids = torch.tensor(tokens.Select(t => (long)t).ToArray(), dtype: ScalarType.Int64);
        var logits = Forward(cfg, weights, lora, tokens, stopGradientLayers);
        int T = tokens.Length;

        // labels = input_ids: position t predicts token t+1, mean over the T-1 predictions.
        var shiftLogits = logits.narrow(0, 0, T - 1);
        var shiftLabels = ids.narrow(0, 1, T - 1);
        var loss = F.cross_entropy(shiftLogits, shiftLabels);
        loss.backward();

        double lossValue = loss.item<double>();
        var grads = new Dictionary<string, double[]>();
        foreach (var (name, t) in lora)
        {
            using var g = t.grad;
            grads[name] = g is null ? new double[t.numel()] : g.contiguous().data<double>().ToArray();
        }
        return (lossValue, grads);
    }

    /// <summary>
    /// The logits of every position of <paramref name="tokens"/> [T, vocab], in float64 (no cache: the
    /// whole sequence each time), for the generation tests' greedy decoding.
    /// </summary>
    public static double[,] Logits(ReferenceConfig cfg, IReadOnlyDictionary<string, float[]> weights,
        IReadOnlyDictionary<string, float[]> adapter, int[] tokens)
    {
        if (tokens.Length < 1)
            throw new ArgumentException("need at least one token");
        CheckAdapterKeys(cfg, adapter);
        using (Exclusive())
        {
            using var scope = torch.NewDisposeScope();
            var wide = Widen(adapter);
            var lora = AdapterShapes(cfg).ToDictionary(a => a.Name, a => Leaf(wide, a.Name, a.Shape, requiresGrad: false, "adapter"));
            var logits = Forward(cfg, Widen(weights), lora, tokens, null).contiguous().data<double>().ToArray();
            var result = new double[tokens.Length, cfg.Vocab];
            Buffer.BlockCopy(logits, 0, result, 0, logits.Length * sizeof(double));
            return result;
        }
    }

    /// <summary>The model's forward, written from Hugging Face's modeling code: the logits [T, vocab].</summary>
    private static Tensor Forward(ReferenceConfig cfg, IReadOnlyDictionary<string, double[]> weights, Dictionary<string, Tensor> lora,
        int[] tokens, IReadOnlySet<int>? stopGradientLayers)
    {
        Tensor W(string name, params long[] shape) => Leaf(weights, name, shape, requiresGrad: false, "weights");
        Tensor? Optional(string name, params long[] shape) => weights.ContainsKey(name) ? W(name, shape) : null;

        int T = tokens.Length, D = cfg.HeadDim;
        double scaling = cfg.LoraAlpha / cfg.LoraR;
        var targets = new HashSet<string>(cfg.TargetModules);

        // Linear with optional bias and optional LoRA: y = x Wᵀ + b + s (x Aᵀ) Bᵀ.
        Tensor Proj(Tensor x, int layer, string module, Tensor? bias)
        {
            var (o, i) = ModuleShape(cfg, module);
            string block = Array.IndexOf(AttentionModules, module) >= 0 ? "self_attn" : "mlp";
            var w = W($"model.layers.{layer}.{block}.{module}.weight", o, i);
            var y = x.matmul(w.t());
            if (bias is not null) y = Add(y, bias);
            if (targets.Contains(module))
            {
                var a = lora[AdapterName(layer, module, "lora_A")];
                var b = lora[AdapterName(layer, module, "lora_B")];
                y = Add(y, x.matmul(a.t()).matmul(b.t()) * Constant(scaling));
            }
            return y;
        }

        Tensor Norm(Tensor x, string name, int dim) => RmsNorm(x, W(name, dim), cfg.RmsEps, cfg.NormWeightOffset);

        var fullRope = RopeTables(InverseFrequencies(cfg), T);
        var slidingRope = cfg.LocalRopeTheta is null ? fullRope : RopeTables(InverseFrequencies(cfg, slidingLayer: true), T);
        double attnScale = cfg.AttentionScale ?? 1.0 / Math.Sqrt(D);

        var ids = torch.tensor(tokens.Select(t => (long)t).ToArray(), dtype: ScalarType.Int64);
        var embed = W("model.embed_tokens.weight", cfg.Vocab, cfg.Hidden);
        var h = embed.index_select(0, ids); // [T, hidden]
        if (cfg.EmbeddingScale != 1) h = h * Constant(cfg.EmbeddingScale);

        for (int l = 0; l < cfg.Layers; l++)
        {
            string p = $"model.layers.{l}.";
            int window = cfg.WindowOf(l);
            var (cos, sin) = window > 0 ? slidingRope : fullRope;
            var blockInput = h;

            // Self-attention block.
            var x = Norm(h, p + "input_layernorm.weight", cfg.Hidden);
            Tensor? qb = null, kb = null, vb = null;
            if (cfg.AttentionBias)
            {
                qb = W(p + "self_attn.q_proj.bias", cfg.Heads * D);
                kb = W(p + "self_attn.k_proj.bias", cfg.KvHeads * D);
                vb = W(p + "self_attn.v_proj.bias", cfg.KvHeads * D);
            }
            var q = Proj(x, l, "q_proj", qb).view(T, cfg.Heads, D);
            var k = Proj(x, l, "k_proj", kb).view(T, cfg.KvHeads, D);
            var v = Proj(x, l, "v_proj", vb).view(T, cfg.KvHeads, D);
            if (cfg.QkNorm)
            {
                q = Norm(q, p + "self_attn.q_norm.weight", D);   // per head, over head_dim
                k = Norm(k, p + "self_attn.k_norm.weight", D);
            }
            // [T, heads, d] -> [heads, T, d]
            q = ApplyRope(q.transpose(0, 1), cos, sin);
            k = ApplyRope(k.transpose(0, 1), cos, sin);
            v = v.transpose(0, 1);

            var attn = Attention(q, k, v, attnScale, window).transpose(0, 1).reshape(T, cfg.Heads * D);
            var attnOut = Proj(attn, l, "o_proj", Optional(p + "self_attn.o_proj.bias", cfg.Hidden));
            if (cfg.SandwichNorms) attnOut = Norm(attnOut, p + "post_attention_layernorm.weight", cfg.Hidden);
            h = Add(h, attnOut);

            // MLP block (GLU).
            x = Norm(h, p + (cfg.SandwichNorms ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight"), cfg.Hidden);
            var gate = Activation(Proj(x, l, "gate_proj", null), cfg.HiddenActivation);
            var up = Proj(x, l, "up_proj", null);
            var mlpOut = Proj(gate * up, l, "down_proj", null);
            if (cfg.SandwichNorms) mlpOut = Norm(mlpOut, p + "post_feedforward_layernorm.weight", cfg.Hidden);
            h = Add(h, mlpOut);

            if (stopGradientLayers?.Contains(l) == true)
                h = Add(blockInput, Add(h, -blockInput).detach());
        }

        h = Norm(h, "model.norm.weight", cfg.Hidden);
        var lmHead = cfg.TiedEmbeddings ? embed : W("lm_head.weight", cfg.Vocab, cfg.Hidden);
        return Softcap(h.matmul(lmHead.t()), cfg.FinalLogitSoftcap); // [T, vocab]

    }

    /// <summary>Every adapter tensor the config implies, with its shape, in layer/module order.</summary>
    public static IEnumerable<(string Name, long[] Shape)> AdapterShapes(ReferenceConfig cfg)
    {
        for (int l = 0; l < cfg.Layers; l++)
        {
            foreach (var m in AttentionModules.Concat(MlpModules))
            {
                if (Array.IndexOf(cfg.TargetModules, m) < 0) continue;
                var (o, i) = ModuleShape(cfg, m);
                yield return (AdapterName(l, m, "lora_A"), new long[] { cfg.LoraR, i });
                yield return (AdapterName(l, m, "lora_B"), new long[] { o, cfg.LoraR });
            }
        }
    }

    static void Validate(ReferenceConfig cfg, int[] tokens)
    {
        if (cfg.Heads <= 0 || cfg.KvHeads <= 0 || cfg.Heads % cfg.KvHeads != 0)
            throw new ArgumentException($"heads {cfg.Heads} must be a positive multiple of kv heads {cfg.KvHeads}");
        if (cfg.HeadDim <= 0 || cfg.HeadDim % 2 != 0)
            throw new ArgumentException($"head_dim {cfg.HeadDim} must be positive and even");
        if (cfg.LoraR <= 0) throw new ArgumentException($"LoRA rank {cfg.LoraR} must be positive");
        foreach (var m in cfg.TargetModules)
            if (Array.IndexOf(AttentionModules, m) < 0 && Array.IndexOf(MlpModules, m) < 0)
                throw new ArgumentException($"unknown LoRA target module '{m}'");
        if (Array.IndexOf(Activations, cfg.HiddenActivation) < 0)
            throw new ArgumentException($"unknown hidden activation '{cfg.HiddenActivation}' (known: {string.Join(", ", Activations)})");
        if (cfg.LayerWindows is { } windows)
        {
            if (windows.Length != cfg.Layers)
                throw new ArgumentException($"layer windows list {windows.Length} layers, the config has {cfg.Layers}");
            if (windows.Any(w => w < 0))
                throw new ArgumentException($"layer windows must be 0 (full attention) or positive: {string.Join(",", windows)}");
        }
        if (cfg.LinearRopeFactor is { } f && !(f > 0))
            throw new ArgumentException($"linear rope factor {f} must be positive");
        if (cfg.LinearRopeFactor is not null && cfg.Llama3RopeScaling is not null)
            throw new ArgumentException("rope scaling is either linear or llama3, not both");
        if (cfg.LocalRopeTheta is { } lt && !(lt > 0))
            throw new ArgumentException($"local rope theta {lt} must be positive");
        if (cfg.AttentionScale is { } a && !(a > 0 && double.IsFinite(a)))
            throw new ArgumentException($"attention scale {a} must be positive and finite");
        if (cfg.FinalLogitSoftcap is { } c && !(c > 0))
            throw new ArgumentException($"final logit softcap {c} must be positive");
        if (!double.IsFinite(cfg.EmbeddingScale) || !double.IsFinite(cfg.NormWeightOffset))
            throw new ArgumentException("embedding scale and norm weight offset must be finite");
        if (tokens is null || tokens.Length < 2)
            throw new ArgumentException("need at least two tokens for a next-token loss");
        foreach (var t in tokens)
            if (t < 0 || t >= cfg.Vocab) throw new ArgumentException($"token {t} outside the vocabulary of {cfg.Vocab}");
    }

    static void CheckAdapterKeys<T>(ReferenceConfig cfg, IReadOnlyDictionary<string, T> adapter)
    {
        var expected = new HashSet<string>(AdapterShapes(cfg).Select(s => s.Name));
        foreach (var key in adapter.Keys)
            if (!expected.Contains(key))
                throw new ArgumentException($"adapter tensor '{key}' is not implied by the config (target modules: {string.Join(",", cfg.TargetModules)})");
    }

    static Tensor Leaf(IReadOnlyDictionary<string, double[]> source, string name, long[] shape, bool requiresGrad, string what)
    {
        if (!source.TryGetValue(name, out var data))
            throw new KeyNotFoundException($"{what}: missing tensor '{name}'");
        long n = shape.Aggregate(1L, (a, b) => a * b);
        if (data.Length != n)
            throw new ArgumentException($"{what}: tensor '{name}' has {data.Length} values, expected [{string.Join(", ", shape)}] = {n}");
        return torch.tensor(data, shape, dtype: ScalarType.Float64, requires_grad: requiresGrad);
    }

    static Dictionary<string, double[]> Widen(IReadOnlyDictionary<string, float[]> d) =>
        d.ToDictionary(kv => kv.Key, kv => Array.ConvertAll(kv.Value, v => (double)v));
}
