using System;
using System.Linq;

namespace LoraCompiler.Generator;

/// <summary>The transformer families the generator can emit.</summary>
internal enum Family { Qwen2, Llama, Qwen3, Gemma3 }

/// <summary>The gated MLP's activation (the runtime's <c>GluActivation</c>).</summary>
internal enum Activation { Silu, GeluTanh }

/// <summary>
/// What an architecture is, as a row of the parser's table: which fields of the config it reads and
/// which ops its layer has. Everything that differs between families is here, not in the emitter.
/// </summary>
/// <param name="QkvBias">q/k/v biases always (Qwen2), whatever attention_bias says.</param>
/// <param name="AttentionBiasField">attention_bias puts biases on q, k, v and o (Llama, Qwen3, Gemma 3).</param>
/// <param name="QkNorm">q_norm and k_norm over head_dim before RoPE.</param>
/// <param name="NormWeightOffset">Every RMSNorm multiplies by (offset + w): Gemma stores w around 0.</param>
/// <param name="SandwichNorms">Gemma 3's post_attention / pre_feedforward / post_feedforward norms.</param>
/// <param name="ScaledEmbedding">The embedding's output times √hidden (Gemma).</param>
/// <param name="ActivationField">The config field naming the MLP's activation.</param>
/// <param name="DefaultActivation">Its value when the field is absent.</param>
/// <param name="Sliding">Where sliding-window layers come from in the config.</param>
/// <param name="TiedByDefault">tie_word_embeddings when the config does not say.</param>
/// <param name="DefaultHeadDim">head_dim when the config does not say; null for hidden / heads.</param>
internal sealed record ArchitectureTraits(
    string Architecture,
    Family Family,
    bool QkvBias,
    bool AttentionBiasField,
    bool QkNorm,
    double NormWeightOffset,
    bool SandwichNorms,
    bool ScaledEmbedding,
    string ActivationField,
    string DefaultActivation,
    SlidingSource Sliding,
    bool TiedByDefault,
    int? DefaultHeadDim);

/// <summary>How a family's config says which layers attend through a sliding window.</summary>
internal enum SlidingSource
{
    /// <summary>No sliding layers (Llama).</summary>
    None,

    /// <summary>use_sliding_window with sliding_window and max_window_layers (Qwen2, Qwen3).</summary>
    UseSlidingWindow,

    /// <summary>layer_types, else sliding_window_pattern (Gemma 3).</summary>
    Pattern,
}

/// <summary>A config's <c>rope_scaling</c>: Llama 3's (<c>llama3</c>) or a linear one (<c>linear</c>, Factor only).</summary>
internal sealed record RopeScalingSpec(string Type, double Factor, double LowFreqFactor = 0, double HighFreqFactor = 0, int OriginalMaxPositionEmbeddings = 0);

/// <summary>One RoPE table: its base and scaling.</summary>
internal sealed record RopeSpec(double Theta, RopeScalingSpec? Scaling);

/// <summary>What a model JSON says: the Hugging Face config plus its <c>lora</c> and <c>trainer</c> sections.</summary>
/// <param name="LayerWindows">Per layer: 0 for full causal attention, W for a sliding window of W keys.</param>
/// <param name="LocalRope">The RoPE of the sliding layers when it differs from <paramref name="Rope"/> (Gemma 3).</param>
/// <param name="EosTokenIds">eos_token_id, one id or a list: where generation stops.</param>
/// <param name="MaxPositionEmbeddings">max_position_embeddings: the positions the model was trained for; 0 when the config does not say.</param>
/// <param name="MemoryBudget">trainer.memory_budget in bytes: the default budget a run plans its kept layers and mapped files for; 0 for none.</param>
/// <param name="Warnings">Diagnostics that do not stop the build (a field the family's model ignores).</param>
internal sealed record ModelSpec(
    string FilePath,
    string ModelName,
    string ClassName,
    ArchitectureTraits Traits,
    int Hidden,
    int Intermediate,
    int Layers,
    int Heads,
    int KvHeads,
    int HeadDim,
    int Vocab,
    double RmsEps,
    RopeSpec Rope,
    RopeSpec? LocalRope,
    bool TiedEmbeddings,
    bool QkvBias,
    bool OutputBias,
    Activation Activation,
    double AttentionScale,
    EquatableArray<int> LayerWindows,
    double FinalLogitSoftcap,
    int LoraRank,
    double LoraAlpha,
    EquatableArray<string> TargetModules,
    int LmHeadChunk,
    int LcsbGroups,
    bool ActivationsInFile,
    bool OptimizerStateInFile,
    EquatableArray<int> EosTokenIds,
    int MaxPositionEmbeddings,
    long MemoryBudget,
    EquatableArray<DiagnosticInfo> Warnings)
{
    public string Architecture => Traits.Architecture;
    public Family Family => Traits.Family;
}

/// <summary>A diagnostic without Roslyn objects, so it can travel through the incremental pipeline.</summary>
internal sealed record DiagnosticInfo(string Id, string FilePath, int Line, int Column, string Message);

/// <summary>A model file's claim on a trainer class name; two claims on one name are an error (LORA0010).</summary>
internal sealed record ClassClaim(string ClassName, string FilePath);

/// <summary>A value or the errors that prevented it.</summary>
internal sealed record Result<T>(T? Value, EquatableArray<DiagnosticInfo> Errors) where T : class
{
    public static Result<T> Ok(T value) => new(value, EquatableArray<DiagnosticInfo>.Empty);
    public static Result<T> Fail(DiagnosticInfo error) => new(null, new EquatableArray<DiagnosticInfo>(new[] { error }));
}

/// <summary>
/// One buffer of the memory plan. Its size in floats is Fixed + PerToken·T for a sequence of T tokens.
/// With <see cref="SharesWith"/> set it lives in that buffer's memory instead.
/// </summary>
internal sealed record PlannedBuffer(string Field, BufferRole Role, long Fixed, long PerToken, string Purpose, string? SharesWith = null);

/// <summary>One LoRA-adapted projection of a layer: module path suffix and its [in → out] shape.</summary>
/// <remarks>
/// Buffers are named by field: the projection reads <see cref="Input"/> and writes <see cref="Output"/>;
/// in backward it reads <see cref="OutputGrad"/> and writes <see cref="InputGrad"/>. In and Out name
/// the trainer's dimension constants, InSize and OutSize give their values.
/// </remarks>
internal sealed record Projection(
    string Name, string Path, string Field,
    string In, int InSize, string Out, int OutSize,
    string Input, string Output, string InputGrad, string OutputGrad,
    bool HasBias, bool Targeted);

/// <summary>
/// One op of a layer plan. Forward runs a layer's ops in order, backward in reverse; each op names the
/// buffers it reads and writes (the layer's x, output and dx are its arguments, the rest are fields).
/// </summary>
/// <param name="Module">Hugging Face's name for what the op computes, for the comments (q_proj, input_layernorm, …).</param>
internal abstract record LayerOp(string Module);

/// <summary>
/// RMSNorm: output = input·rstd·(offset + w) over rows of <see cref="Width"/>. A token norm has T rows of
/// Hidden; a head norm (q_norm, k_norm) T·heads rows of HeadDim (<see cref="Heads"/> names the count,
/// <see cref="HeadCount"/> is its value, 1 for a token norm). Backward: InputGrad (= or +=) from OutputGrad.
/// </summary>
internal sealed record NormOp(
    string Module, string WeightPath, string WeightField, string Input, string Output, string Rstd,
    string Width, int WidthSize, string? Heads, int HeadCount, string InputGrad, string OutputGrad, bool Accumulate) : LayerOp(Module);

/// <summary>A projection with its bias and LoRA: output = input·Wᵀ + b + s·(input·Aᵀ)·Bᵀ.</summary>
internal sealed record LinearOp(Projection Projection, bool Accumulate) : LayerOp(Projection.Name);

/// <summary>RoPE rotates Target [T, heads, HeadDim] in place by position, with the named table; backward rotates TargetGrad back.</summary>
internal sealed record RopeOp(string Target, string Heads, string Table, string TargetGrad) : LayerOp("rope");

/// <summary>Flash attention of q, k, v into Output, keeping one log-sum-exp per row; Window 0 is full causal attention.</summary>
internal sealed record AttentionOp(
    string Q, string K, string V, string Output, string Lse, int Window,
    string QGrad, string KGrad, string VGrad, string OutputGrad) : LayerOp("attention");

/// <summary>The gated MLP's activation: output = act(gate)·up; backward writes GateGrad, UpGrad (=) from OutputGrad.</summary>
internal sealed record GluOp(string Gate, string Up, string Output, Activation Activation,
    string GateGrad, string UpGrad, string OutputGrad) : LayerOp(Activation == Activation.Silu ? "swiglu" : "geglu");

/// <summary>A residual add on the stream: Target += Source. Its backward is the identity (dx passes on).</summary>
internal sealed record ResidualOp(string Target, string Source) : LayerOp("residual");

/// <summary>
/// A kind of layer: one forward and backward pair is emitted per kind. Layers of one kind differ only
/// in their weights. <see cref="RecomputeUntil"/> is the index of the last op backward's recompute runs:
/// nothing after it is read by backward. A layer that keeps its activations (a memory budget's choice)
/// copies <see cref="Kept"/> to its own buffer after forward and back before backward, then reruns the
/// ops <see cref="Remade"/> (indices into <see cref="Ops"/>: norms and activations, cheap to remake from
/// what is kept) instead of recomputing the layer.
/// </summary>
internal sealed record LayerKind(string Name, string Description, int Window, string RopeTable, EquatableArray<LayerOp> Ops, int RecomputeUntil,
    EquatableArray<KeptValue> Kept, EquatableArray<int> Remade)
{
    public long KeptPerToken => Kept.Sum(k => k.Width);
}

/// <summary>A value a kept layer holds from forward to backward: its buffer, floats per token, the dimension constant(s) giving them, and what it is.</summary>
internal sealed record KeptValue(string Value, long Width, string Dims, string Purpose);

/// <summary>A RoPE table pair of the plan: the fields ropeCos/ropeSin (or prefix + Cos/Sin) and what fills them.</summary>
internal sealed record RopeTable(string Prefix, RopeSpec Rope, string Purpose);

/// <summary>
/// What the trainer does, derived from a <see cref="ModelSpec"/>: the buffers of the memory plan, the
/// projections of a layer, the layer kinds with their op lists, and which kind each layer is. The
/// emitter only prints this.
/// </summary>
internal sealed record TrainerPlan(
    ModelSpec Spec,
    EquatableArray<PlannedBuffer> Buffers,
    EquatableArray<Projection> Projections,
    EquatableArray<LayerKind> Kinds,
    EquatableArray<int> Schedule,
    EquatableArray<RopeTable> RopeTables);
