using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Training;

/// <summary>Creates a generated trainer over a backend, base weights and an adapter, for sequences up to maxSequence.</summary>
public delegate TrainerBase TrainerFactory(IBackend backend, ModelWeights weights, LoraAdapter adapter, int maxSequence,
    TrainerOptions? options = null);

/// <summary>
/// The run's settings that the model JSON's <c>trainer</c> section may give defaults for (null keeps
/// the default): the LCSB schedule, where the checkpoints and the optimizer state live, how many
/// layers keep their activations from forward to backward, and the memory budget that chooses those.
/// They are choices of a run, not of the generated code: <see cref="ModelInfo.Defaults"/> holds the
/// JSON's, the command line's options override them.
/// </summary>
/// <param name="KeptLayers">
/// The last K layers keep their activations for their backward instead of recomputing them from their
/// checkpoint (<see cref="MemoryBudgetPlanner"/> chooses K for a budget); 0, the default, recomputes every layer.
/// </param>
/// <param name="MemoryBudget">
/// Bytes of private memory the run may use (<c>trainer.memory_budget</c>, <c>--memory-budget</c>): a trainer
/// given a budget and no <paramref name="KeptLayers"/> plans them with <see cref="MemoryBudgetPlanner"/>.
/// </param>
public sealed record TrainerOptions(bool? ActivationsInFile = null, bool? OptimizerStateInFile = null, int? LcsbGroups = null,
    int? KeptLayers = null, long? MemoryBudget = null)
{
    /// <summary>"memory" or "mmap" from the command line; null for an absent option.</summary>
    public static bool? ParsePlacement(string? value, string option) => value switch
    {
        null => null,
        "memory" => false,
        "mmap" => true,
        _ => throw new ArgumentException($"{option} takes memory or mmap, not '{value}'."),
    };

    /// <summary>These options where they are set, <paramref name="fallback"/>'s where they are not.</summary>
    public TrainerOptions Or(TrainerOptions? fallback) => new(
        ActivationsInFile ?? fallback?.ActivationsInFile,
        OptimizerStateInFile ?? fallback?.OptimizerStateInFile,
        LcsbGroups ?? fallback?.LcsbGroups,
        KeptLayers ?? fallback?.KeptLayers,
        MemoryBudget ?? fallback?.MemoryBudget);
}

/// <summary>Everything a generated trainer states about itself: its config, tensors, memory plan and factory.</summary>
public sealed record ModelInfo
{
    /// <summary>The model file's name without <c>.json</c>; what <c>--model</c> takes.</summary>
    public required string Name { get; init; }
    public required string ClassName { get; init; }
    public required string Architecture { get; init; }
    public required string SourceFile { get; init; }

    public required int Hidden { get; init; }
    public required int Intermediate { get; init; }
    public required int Layers { get; init; }
    public required int Heads { get; init; }
    public required int KvHeads { get; init; }
    public required int HeadDim { get; init; }
    public required int Vocab { get; init; }
    public required float RmsEps { get; init; }

    /// <summary>RoPE base and scaling of the full-attention layers (every layer, for most models).</summary>
    public required double RopeTheta { get; init; }
    public required RopeScaling? RopeScaling { get; init; }

    /// <summary>RoPE base of the sliding-window layers where it differs (Gemma 3's rope_local_base_freq, unscaled); else null.</summary>
    public double? LocalRopeTheta { get; init; }

    public required bool TiedEmbeddings { get; init; }

    /// <summary>q_proj, k_proj and v_proj have a bias (Qwen2; attention_bias elsewhere).</summary>
    public required bool AttentionBias { get; init; }

    /// <summary>o_proj has a bias (attention_bias on Llama, Qwen3, Gemma 3).</summary>
    public bool OutputBias { get; init; }

    /// <summary>q_norm and k_norm: an RMSNorm over head_dim on each head of q and k, before RoPE (Qwen3, Gemma 3).</summary>
    public bool QkNorm { get; init; }

    /// <summary>Every RMSNorm multiplies by (offset + w): 0 for Llama's form, 1 for Gemma's (1 + w).</summary>
    public float NormWeightOffset { get; init; }

    /// <summary>
    /// Gemma 3's sandwich norms: post_attention_layernorm on the attention output, pre_feedforward_layernorm
    /// before the MLP and post_feedforward_layernorm on its output, each branch normed before its residual add.
    /// </summary>
    public bool SandwichNorms { get; init; }

    /// <summary>The embedding's output is multiplied by this (Gemma: √hidden as a float32); 1 elsewhere.</summary>
    public float EmbeddingScale { get; init; } = 1f;

    /// <summary>The attention scores' scale: 1/√head_dim, or Gemma 3's query_pre_attn_scalar^−½.</summary>
    public required float AttentionScale { get; init; }

    /// <summary>The gated MLP's activation.</summary>
    public GluActivation Activation { get; init; } = GluActivation.Silu;

    /// <summary>Each layer's attention window: 0 for full causal attention, W for a sliding window of W keys.</summary>
    public required IReadOnlyList<int> LayerWindows { get; init; }

    /// <summary>final_logit_softcapping (logits = c·tanh(logits / c)), or 0 for none.</summary>
    public float FinalLogitSoftcap { get; init; }

    public required int LmHeadChunk { get; init; }

    /// <summary>The config's eos_token_id (one or several): generation stops at any of them.</summary>
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];

    /// <summary>
    /// The config's max_position_embeddings, the positions the model was trained for (a sequence
    /// longer than it is refused); 0 when the config does not say.
    /// </summary>
    public int MaxPositionEmbeddings { get; init; }

    /// <summary>The run settings the model JSON's <c>trainer</c> section gives (LCSB groups, mmap placement).</summary>
    public TrainerOptions Defaults { get; init; } = new();

    public required LoraSettings Lora { get; init; }
    public required IReadOnlyList<TensorSpec> BaseTensors { get; init; }
    public required IReadOnlyList<LoraModuleSpec> LoraModules { get; init; }
    public required IReadOnlyList<BufferPlan> Buffers { get; init; }
    public required TrainerFactory Create { get; init; }

    public MemoryPlan Plan(int sequence, int keptLayers = 0) => new(sequence, Buffers, keptLayers);

    public long ParameterCount => BaseTensors.Sum(t => t.Elements);
    public long LoraParameterCount => LoraModules.Sum(m => (long)Lora.R * (m.In + m.Out));

    public override string ToString() =>
        $"{Name}: {Architecture}, {Layers} layers, hidden {Hidden}, {Heads} heads ({KvHeads} kv), vocab {Vocab}, " +
        $"LoRA r={Lora.R} alpha={Lora.Alpha} on {string.Join(",", Lora.TargetModules)}";
}
