using System.Runtime.InteropServices;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>How a kernel's invocations are laid out, which decides its workgroup size.</summary>
internal enum KernelShape
{
    /// <summary>One invocation per element; a 1-D workgroup of the backend's width (specialization constant 0).</summary>
    Elementwise,
    /// <summary>One workgroup per row; the same width, reduced through shared memory.</summary>
    Rows,
    /// <summary>The tiled matrix product: 16 × 8 invocations per 64 × 64 tile of the output.</summary>
    Gemm,
    /// <summary>
    /// FlashAttention tiles: one workgroup per block of rows, one invocation per row (width
    /// <see cref="PipelineSet.AttentionWorkgroup"/>, specialization constant 0), staging tiles through
    /// <see cref="PipelineSet.AttentionTileVec4s"/> vec4s of shared memory (specialization constant 1).
    /// </summary>
    Attention,
}

/// <summary>
/// What the backend knows about one shader (<c>shaders/&lt;Name&gt;.comp</c>): its storage-buffer bindings
/// (0..Bindings−1, in the shader's order), which of them it writes (for the barriers), its push-constant
/// block and its workgroup shape.
/// </summary>
internal sealed record KernelSpec(string Name, int Bindings, uint WriteMask, int PushConstantBytes, KernelShape Shape)
{
    public bool Writes(int binding) => (WriteMask & (1u << binding)) != 0;
}

/// <summary>Every kernel of the backend, named after its shader.</summary>
internal static unsafe class Kernels
{
    public static readonly KernelSpec Zero = new("zero", 1, 0b1, sizeof(CountParameters), KernelShape.Elementwise);
    public static readonly KernelSpec Copy = new("copy", 2, 0b01, sizeof(CountParameters), KernelShape.Elementwise);
    public static readonly KernelSpec Add = new("add", 2, 0b01, sizeof(CountParameters), KernelShape.Elementwise);
    public static readonly KernelSpec Scale = new("scale", 1, 0b1, sizeof(ScaleParameters), KernelShape.Elementwise);
    public static readonly KernelSpec Embedding = new("embedding", 3, 0b001, sizeof(EmbeddingParameters), KernelShape.Elementwise);
    public static readonly KernelSpec RmsNorm = new("rmsnorm", 4, 0b0011, sizeof(RmsNormParameters), KernelShape.Rows);
    public static readonly KernelSpec RmsNormBack = new("rmsnorm_back", 5, 0b00001, sizeof(RmsNormBackParameters), KernelShape.Rows);
    public static readonly KernelSpec Rope = new("rope", 3, 0b001, sizeof(RopeParameters), KernelShape.Elementwise);
    public static readonly KernelSpec RopeBack = new("rope_back", 3, 0b001, sizeof(RopeParameters), KernelShape.Elementwise);
    public static readonly KernelSpec AttentionDecode = new("attention_decode", 4, 0b0001, sizeof(AttentionDecodeParameters), KernelShape.Rows);
    public static readonly KernelSpec Attention = new("attention", 5, 0b00011, sizeof(AttentionParameters), KernelShape.Attention);
    public static readonly KernelSpec AttentionBackDelta = new("attention_back_delta", 4, 0b0001, sizeof(AttentionParameters), KernelShape.Elementwise);
    public static readonly KernelSpec AttentionBackDq = new("attention_back_dq", 6, 0b000001, sizeof(AttentionParameters), KernelShape.Attention);
    public static readonly KernelSpec AttentionBackDkv = new("attention_back_dkv", 7, 0b0000011, sizeof(AttentionParameters), KernelShape.Attention);
    public static readonly KernelSpec SwiGlu = new("swiglu", 3, 0b001, sizeof(CountParameters), KernelShape.Elementwise);
    public static readonly KernelSpec SwiGluBack = new("swiglu_back", 5, 0b00011, sizeof(CountParameters), KernelShape.Elementwise);
    public static readonly KernelSpec GeGlu = new("geglu", 3, 0b001, sizeof(CountParameters), KernelShape.Elementwise);
    public static readonly KernelSpec GeGluBack = new("geglu_back", 5, 0b00011, sizeof(CountParameters), KernelShape.Elementwise);
    public static readonly KernelSpec GemmNT = new("gemm_nt", 4, 0b0001, sizeof(GemmParameters), KernelShape.Gemm);
    public static readonly KernelSpec GemmNN = new("gemm_nn", 4, 0b0001, sizeof(GemmParameters), KernelShape.Gemm);
    public static readonly KernelSpec GemmTN = new("gemm_tn", 4, 0b0001, sizeof(GemmParameters), KernelShape.Gemm);
    public static readonly KernelSpec GemmNTQ4 = new("gemm_nt_q4", 5, 0b00001, sizeof(Q4GemmParameters), KernelShape.Gemm);
    public static readonly KernelSpec GemmNNQ4 = new("gemm_nn_q4", 5, 0b00001, sizeof(Q4GemmParameters), KernelShape.Gemm);
    public static readonly KernelSpec EmbeddingQ4 = new("embedding_q4", 4, 0b0001, sizeof(EmbeddingQ4Parameters), KernelShape.Elementwise);
    public static readonly KernelSpec GemmNTW16 = new("gemm_nt_w16", 4, 0b0001, sizeof(W16GemmParameters), KernelShape.Gemm);
    public static readonly KernelSpec GemmNNW16 = new("gemm_nn_w16", 4, 0b0001, sizeof(W16GemmParameters), KernelShape.Gemm);
    public static readonly KernelSpec EmbeddingW16 = new("embedding_w16", 3, 0b001, sizeof(EmbeddingW16Parameters), KernelShape.Elementwise);
    public static readonly KernelSpec CrossEntropy = new("cross_entropy", 3, 0b001, sizeof(CrossEntropyParameters), KernelShape.Rows);
    public static readonly KernelSpec CrossEntropyLoss = new("cross_entropy_loss", 3, 0b001, sizeof(LossParameters), KernelShape.Rows);
    public static readonly KernelSpec CrossEntropyBack = new("cross_entropy_back", 3, 0b001, sizeof(CrossEntropyParameters), KernelShape.Elementwise);
    public static readonly KernelSpec Softcap = new("softcap", 1, 0b1, sizeof(SoftcapParameters), KernelShape.Elementwise);
    public static readonly KernelSpec AdamW = new("adamw", 4, 0b0111, sizeof(OptimizerParameters), KernelShape.Elementwise);
    // The status binding is only folded into with atomics, which commute: no barrier between checks (see the shader).
    public static readonly KernelSpec CheckFinite = new("check_finite", 2, 0b00, sizeof(CheckParameters), KernelShape.Elementwise);
    public static readonly KernelSpec Noise = new("noise", 1, 0b1, sizeof(NoiseParameters), KernelShape.Elementwise);

    public static IEnumerable<KernelSpec> All =>
    [
        Zero, Copy, Add, Scale, Embedding, RmsNorm, RmsNormBack, Rope, RopeBack, AttentionDecode, Attention, AttentionBackDelta,
        AttentionBackDq, AttentionBackDkv, SwiGlu, SwiGluBack, GeGlu, GeGluBack, GemmNT, GemmNN, GemmTN, GemmNTQ4, GemmNNQ4,
        EmbeddingQ4, GemmNTW16, GemmNNW16, EmbeddingW16, CrossEntropy, CrossEntropyLoss, CrossEntropyBack, Softcap, AdamW, CheckFinite, Noise,
    ];
}

// Push-constant blocks, field for field as the shaders declare them (std430: 4-byte scalars in order).

[StructLayout(LayoutKind.Sequential)]
internal struct CountParameters
{
    public uint Count;
}

/// <summary>scale: x[0..Count) *= Factor.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct ScaleParameters
{
    public uint Count;
    public float Factor;
}

[StructLayout(LayoutKind.Sequential)]
internal struct EmbeddingParameters
{
    public uint TokenCount, Width, PartFirst, PartLength;
}

/// <summary>embedding_q4: the table is a 4-bit weight, one part of whole rows per dispatch.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct EmbeddingQ4Parameters
{
    public uint TokenCount, Width, GroupSize, PartFirstRow, PartRows;
}

/// <summary>embedding_w16: the table is a 16-bit weight, one part of whole rows per dispatch.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct EmbeddingW16Parameters
{
    public uint TokenCount, Width;
    /// <summary>How the table is stored (shaders/common/float16.glsl): 1 F16, 2 BF16.</summary>
    public uint Format;
    public uint PartFirstRow, PartRows;
}

[StructLayout(LayoutKind.Sequential)]
internal struct RmsNormParameters
{
    public uint TokenCount, Width;
    public float Epsilon;
    /// <summary>0: y = x·rstd·w (Llama); 1: y = x·rstd·(1 + w) (Gemma).</summary>
    public float WeightOffset;
    /// <summary>How w is stored (shaders/common/float16.glsl): 0 F32, 1 F16, 2 BF16.</summary>
    public uint WeightFormat;
}

[StructLayout(LayoutKind.Sequential)]
internal struct RmsNormBackParameters
{
    public uint TokenCount, Width;
    public float WeightOffset;
    /// <summary>1: dx += the gradient; 0: dx = the gradient.</summary>
    public uint Accumulate;
    /// <summary>How w is stored (shaders/common/float16.glsl): 0 F32, 1 F16, 2 BF16.</summary>
    public uint WeightFormat;
}

[StructLayout(LayoutKind.Sequential)]
internal struct RopeParameters
{
    public uint TokenCount, Heads, HeadDim;
    /// <summary>The tables' row of x's row 0 (0 in training; the first new token's position when decoding).</summary>
    public uint Position;
}

/// <summary>attention_decode: one token's queries against the first Count rows of a KV cache.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct AttentionDecodeParameters
{
    public uint Count, Heads, KvHeads, HeadDim;
    public float Scale;
}

[StructLayout(LayoutKind.Sequential)]
internal struct AttentionParameters
{
    public uint TokenCount, Heads, KvHeads, HeadDim;
    public float Scale;
    public uint TileRows;
    /// <summary>0: causal; W &gt; 0: query t sees key s iff 0 ≤ t − s &lt; W.</summary>
    public uint Window;
}

[StructLayout(LayoutKind.Sequential)]
internal struct GemmParameters
{
    public uint Rows, Cols, Depth;
    public uint StrideA, StrideB, StrideC;
    public uint OffsetA, OffsetB, OffsetC, OffsetBias;
    public float Alpha;
    public uint Accumulate, HasBias;
    public uint FirstRowTile, FirstColTile;
    /// <summary>How the bias is stored (shaders/common/float16.glsl): 0 F32, 1 F16, 2 BF16.</summary>
    public uint BiasFormat;
}

/// <summary>
/// gemm_nt_q4 and gemm_nn_q4: B is a 4-bit weight, <see cref="GemmParameters.OffsetB"/> its first row in
/// the part and <see cref="GemmParameters.StrideB"/> its packed words per row; then the group size.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct Q4GemmParameters
{
    public GemmParameters Gemm;
    public uint GroupSize;
}

/// <summary>
/// gemm_nt_w16 and gemm_nn_w16: B is a 16-bit weight, <see cref="GemmParameters.OffsetB"/> and
/// <see cref="GemmParameters.StrideB"/> in elements as for a float B; then its format (1 F16, 2 BF16).
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct W16GemmParameters
{
    public GemmParameters Gemm;
    public uint BFormat;
}

[StructLayout(LayoutKind.Sequential)]
internal struct CrossEntropyParameters
{
    public uint TokenCount, ChunkWidth, ChunkFirst, FirstChunk;
    public float InverseCount;
    /// <summary>c &gt; 0: the loss sees c·tanh(logit / c); 0: the logits as they are.</summary>
    public float Softcap;
}

/// <summary>softcap: x[0..Count) = Cap·tanh(x / Cap).</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct SoftcapParameters
{
    public uint Count;
    public float Cap;
}

[StructLayout(LayoutKind.Sequential)]
internal struct OptimizerParameters
{
    public uint Count, Sgd;
    public float LearningRate, Beta1, Beta2, Epsilon, WeightDecay, BiasCorrection1, BiasCorrection2, GradScale;
}

[StructLayout(LayoutKind.Sequential)]
internal struct CheckParameters
{
    public uint Count, Check;
}

[StructLayout(LayoutKind.Sequential)]
internal struct NoiseParameters
{
    public uint Count, First, KeyLow, KeyHigh;
    public float Scale;
}

[StructLayout(LayoutKind.Sequential)]
internal struct LossParameters
{
    public uint TokenCount;
    public float InverseCount;
}
