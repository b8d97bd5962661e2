using LoraCompiler.Runtime.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LoraCompiler.Bench;

// A Qwen2 / Llama causal LM with PEFT-style LoRA, written the way a PyTorch user writes it: nn.Module
// classes whose fields carry Hugging Face's names (model.layers.3.self_attn.q_proj.weight), float32,
// frozen base weights, LoRA A and B as the only trainable parameters, the full [T, vocab] logits and
// F.cross_entropy, and libtorch's autograd for the backward. No checkpointing, no fused loss.
// Each forward runs in a dispose scope and hands on only its output, so an intermediate tensor is
// released when its module returns, as Python's reference counting releases it; what autograd
// saved for the backward stays alive through the graph's own references.
// Semantics follow transformers' modeling_qwen2.py / modeling_llama.py (batch 1, sdpa attention) and
// PEFT's lora.Linear (scaling = alpha / r, dropout off).

/// <summary>PEFT's <c>lora.Linear</c>: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with W and b frozen.</summary>
public sealed class LoraLinear : nn.Module<Tensor, Tensor>
{
    private readonly Parameter weight;
    private readonly Parameter? bias;
    private readonly Parameter? lora_A;
    private readonly Parameter? lora_B;
    private readonly double _scaling;

    public LoraLinear(long inFeatures, long outFeatures, bool hasBias, LoraSettings? lora) : base(nameof(LoraLinear))
    {
        weight = new Parameter(empty(outFeatures, inFeatures), requires_grad: false);
        if (hasBias)
            bias = new Parameter(empty(outFeatures), requires_grad: false);
        if (lora is not null)
        {
            lora_A = new Parameter(empty(lora.R, inFeatures));
            lora_B = new Parameter(zeros(outFeatures, lora.R));
            _scaling = lora.Scale;
        }
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var y = F.linear(x, weight, bias);
        return scope.MoveToOuter(lora_A is null ? y : y + F.linear(F.linear(x, lora_A), lora_B!) * _scaling);
    }
}

/// <summary>Qwen2RMSNorm / LlamaRMSNorm.</summary>
public sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    private readonly Parameter weight;
    private readonly double _eps;

    public RmsNorm(long hidden, double eps) : base(nameof(RmsNorm))
    {
        weight = new Parameter(ones(hidden), requires_grad: false);
        _eps = eps;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var variance = x.pow(2).mean([-1], keepdim: true);
        return scope.MoveToOuter(weight * (x * rsqrt(variance + _eps)));
    }
}

/// <summary>Self-attention with GQA, RoPE and a causal mask, through scaled_dot_product_attention (transformers' default "sdpa").</summary>
public sealed class Attention : nn.Module<Tensor, Tensor, Tensor, Tensor>
{
    private readonly LoraLinear q_proj, k_proj, v_proj, o_proj;
    private readonly int _heads, _kvHeads, _headDim;

    public Attention(ModelInfo m, LoraSettings lora) : base(nameof(Attention))
    {
        (_heads, _kvHeads, _headDim) = (m.Heads, m.KvHeads, m.HeadDim);
        q_proj = new LoraLinear(m.Hidden, m.Heads * m.HeadDim, m.AttentionBias, Target(lora, "q_proj"));
        k_proj = new LoraLinear(m.Hidden, m.KvHeads * m.HeadDim, m.AttentionBias, Target(lora, "k_proj"));
        v_proj = new LoraLinear(m.Hidden, m.KvHeads * m.HeadDim, m.AttentionBias, Target(lora, "v_proj"));
        o_proj = new LoraLinear(m.Heads * m.HeadDim, m.Hidden, false, Target(lora, "o_proj"));
        RegisterComponents();
    }

    /// <summary><paramref name="x"/> is [1, T, hidden]; cos and sin are [T, head_dim].</summary>
    public override Tensor forward(Tensor x, Tensor cos, Tensor sin)
    {
        using var scope = NewDisposeScope();
        long T = x.shape[1];
        var q = q_proj.forward(x).view(1, T, _heads, _headDim).transpose(1, 2);   // [1, heads, T, d]
        var k = k_proj.forward(x).view(1, T, _kvHeads, _headDim).transpose(1, 2); // [1, kv, T, d]
        var v = v_proj.forward(x).view(1, T, _kvHeads, _headDim).transpose(1, 2);
        q = q * cos + RotateHalf(q) * sin;
        k = k * cos + RotateHalf(k) * sin;
        k = RepeatKv(k, _heads / _kvHeads);
        v = RepeatKv(v, _heads / _kvHeads);
        var attn = F.scaled_dot_product_attention(q, k, v, is_casual: true);      // [1, heads, T, d]
        return scope.MoveToOuter(o_proj.forward(attn.transpose(1, 2).reshape(1, T, _heads * _headDim)));
    }

    /// <summary>rotate_half: cat(−x2, x1) over the last dimension.</summary>
    private static Tensor RotateHalf(Tensor x)
    {
        long half = x.shape[^1] / 2;
        return cat([-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
    }

    /// <summary>repeat_kv: kv head j serves query heads j·n .. j·n + n − 1.</summary>
    private static Tensor RepeatKv(Tensor x, int n)
    {
        if (n == 1)
            return x;
        long kv = x.shape[1], T = x.shape[2], d = x.shape[3];
        return x.unsqueeze(2).expand(1, kv, n, T, d).reshape(1, kv * n, T, d);
    }

    internal static LoraSettings? Target(LoraSettings lora, string module) =>
        lora.TargetModules.Contains(module) ? lora : null;
}

/// <summary>The SwiGLU MLP: down(silu(gate(x)) · up(x)).</summary>
public sealed class Mlp : nn.Module<Tensor, Tensor>
{
    private readonly LoraLinear gate_proj, up_proj, down_proj;

    public Mlp(ModelInfo m, LoraSettings lora) : base(nameof(Mlp))
    {
        gate_proj = new LoraLinear(m.Hidden, m.Intermediate, false, Attention.Target(lora, "gate_proj"));
        up_proj = new LoraLinear(m.Hidden, m.Intermediate, false, Attention.Target(lora, "up_proj"));
        down_proj = new LoraLinear(m.Intermediate, m.Hidden, false, Attention.Target(lora, "down_proj"));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return scope.MoveToOuter(down_proj.forward(F.silu(gate_proj.forward(x)) * up_proj.forward(x)));
    }
}

/// <summary>A pre-norm decoder layer.</summary>
public sealed class DecoderLayer : nn.Module<Tensor, Tensor, Tensor, Tensor>
{
    private readonly RmsNorm input_layernorm, post_attention_layernorm;
    private readonly Attention self_attn;
    private readonly Mlp mlp;

    public DecoderLayer(ModelInfo m, LoraSettings lora) : base(nameof(DecoderLayer))
    {
        input_layernorm = new RmsNorm(m.Hidden, m.RmsEps);
        self_attn = new Attention(m, lora);
        post_attention_layernorm = new RmsNorm(m.Hidden, m.RmsEps);
        mlp = new Mlp(m, lora);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor cos, Tensor sin)
    {
        using var scope = NewDisposeScope();
        var h = x + self_attn.forward(input_layernorm.forward(x), cos, sin);
        return scope.MoveToOuter(h + mlp.forward(post_attention_layernorm.forward(h)));
    }
}

/// <summary>Qwen2Model / LlamaModel: embeddings, the layers, the final norm.</summary>
public sealed class DecoderModel : nn.Module<Tensor, Tensor>
{
    private readonly Embedding embed_tokens;
    private readonly ModuleList<DecoderLayer> layers;
    private readonly RmsNorm norm;
    private readonly Tensor _invFreq;

    public DecoderModel(ModelInfo m, LoraSettings lora) : base(nameof(DecoderModel))
    {
        embed_tokens = nn.Embedding(m.Vocab, m.Hidden);
        embed_tokens.weight!.requires_grad = false;
        layers = new ModuleList<DecoderLayer>(Enumerable.Range(0, m.Layers).Select(_ => new DecoderLayer(m, lora)).ToArray());
        norm = new RmsNorm(m.Hidden, m.RmsEps);
        RegisterComponents();
        _invFreq = tensor(InverseFrequencies(m), dtype: ScalarType.Float32);
    }

    public Parameter EmbeddingWeight => embed_tokens.weight!;

    /// <summary><paramref name="ids"/> is [1, T]; returns the final norm's output [1, T, hidden].</summary>
    public override Tensor forward(Tensor ids)
    {
        using var scope = NewDisposeScope();
        var h = embed_tokens.forward(ids);
        // RotaryEmbedding: emb = cat(freqs, freqs), freqs = position ⊗ inv_freq.
        var freqs = outer(arange(ids.shape[1], dtype: ScalarType.Float32), _invFreq);
        var emb = cat([freqs, freqs], -1);
        var (cos, sin) = (emb.cos(), emb.sin());
        foreach (var layer in layers)
        {
            var next = layer.forward(h, cos, sin);
            h.Dispose(); // as Python drops its reference: what autograd saved of it stays alive
            h = next;
        }
        return scope.MoveToOuter(norm.forward(h));
    }

    /// <summary>RoPE inverse frequencies: theta^(−2j/d), with Llama 3's rescaling of long wavelengths when configured.</summary>
    private static double[] InverseFrequencies(ModelInfo m)
    {
        int d = m.HeadDim;
        var inv = Enumerable.Range(0, d / 2).Select(j => 1.0 / Math.Pow(m.RopeTheta, 2.0 * j / d)).ToArray();
        if (m.RopeScaling is not LoraCompiler.Runtime.Backends.Llama3RopeScaling s)
            return inv;
        double lowWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
        double highWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
        for (int j = 0; j < inv.Length; j++)
        {
            double wavelen = 2 * Math.PI / inv[j];
            if (wavelen > lowWavelen)
                inv[j] /= s.Factor;
            else if (wavelen >= highWavelen)
            {
                double smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
                inv[j] = (1 - smooth) * inv[j] / s.Factor + smooth * inv[j];
            }
        }
        return inv;
    }
}

/// <summary>Qwen2ForCausalLM / LlamaForCausalLM with LoRA: returns the mean next-token cross-entropy.</summary>
public sealed class CausalLM : nn.Module<Tensor, Tensor>
{
    private readonly DecoderModel model;
    private readonly LoraLinear? lm_head;
    private readonly long _vocab;

    public CausalLM(ModelInfo m) : base(nameof(CausalLM))
    {
        model = new DecoderModel(m, m.Lora);
        if (!m.TiedEmbeddings)
            lm_head = new LoraLinear(m.Hidden, m.Vocab, false, null);
        _vocab = m.Vocab;
        RegisterComponents();
    }

    /// <summary>The loss of <paramref name="ids"/> [1, T] with labels = input_ids (position t predicts t+1).</summary>
    public override Tensor forward(Tensor ids)
    {
        using var scope = NewDisposeScope();
        var h = model.forward(ids);
        var logits = lm_head is null ? F.linear(h, model.EmbeddingWeight) : lm_head.forward(h); // [1, T, vocab]
        long T = ids.shape[1];
        var shiftLogits = logits.narrow(1, 0, T - 1).reshape(-1, _vocab);
        var shiftLabels = ids.narrow(1, 1, T - 1).reshape(-1);
        return scope.MoveToOuter(F.cross_entropy(shiftLogits, shiftLabels));
    }
}
