using System.Text.RegularExpressions;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Runtime.Weights;

/// <summary>
/// A LoRA adapter as a GGUF file that llama.cpp loads with <c>--lora</c>, laid out as its
/// <c>convert_lora_to_gguf.py</c> writes one:
/// <list type="bullet">
/// <item>metadata <c>general.architecture</c> (llama.cpp's name of the family: llama, qwen2, qwen3, gemma3),
/// <c>general.type</c> = adapter, <c>general.name</c>, <c>adapter.type</c> = lora, <c>adapter.lora.alpha</c>
/// (float32), <c>general.file_type</c> (0 all F32, 1 mostly F16), <c>general.quantization_version</c> = 2,
/// <c>general.alignment</c> = 32, and the base model as <c>general.base_model.0.name</c>;</item>
/// <item>per adapted projection <c>blk.N.attn_q.weight.lora_a</c> with GGUF dimensions [in, r] (PEFT's A
/// [r, in] as it lies in memory) and <c>….lora_b</c> [r, out] (PEFT's B [out, r]); llama.cpp checks
/// that a's ne[0] is the base weight's in, b's ne[1] its out and a's ne[1] = b's ne[0] = r, and
/// applies <c>alpha / r · B·A</c>.</item>
/// </list>
/// For Llama, llama.cpp's converter reorders the rows of q_proj and k_proj per head (its
/// <c>LlamaModel.permute</c>: the two halves of each head, which Hugging Face's rotate_half pairs, become
/// interleaved pairs for ggml's RoPE); the rows of B (the output dimension) get the same order, so
/// the delta lands on the rows of the converted base weight. Qwen2, Qwen3 and Gemma 3 use NeoX RoPE
/// in llama.cpp and are not reordered.
/// </summary>
public static partial class GgufAdapter
{
    /// <summary>llama.cpp's <c>general.file_type</c> for all-F32 and mostly-F16 files.</summary>
    public const uint FileTypeF32 = 0, FileTypeF16 = 1;

    /// <summary>ggml's quantization version (GGML_QNT_VERSION), which the converter writes to every file.</summary>
    public const uint QuantizationVersion = 2;

    /// <summary>llama.cpp's architecture name for a Hugging Face <c>architectures</c> entry; null for one this project does not train.</summary>
    public static string? ArchitectureName(string huggingFaceArchitecture) => huggingFaceArchitecture switch
    {
        "LlamaForCausalLM" => "llama",
        "Qwen2ForCausalLM" => "qwen2",
        "Qwen3ForCausalLM" => "qwen3",
        "Gemma3ForCausalLM" or "Gemma3ForConditionalGeneration" => "gemma3",
        _ => null,
    };

    /// <summary>Hugging Face projection (after <c>model.layers.N.</c>) → llama.cpp's tensor name in block N.</summary>
    static readonly Dictionary<string, string> TensorNames = new(StringComparer.Ordinal)
    {
        ["self_attn.q_proj"] = "attn_q",
        ["self_attn.k_proj"] = "attn_k",
        ["self_attn.v_proj"] = "attn_v",
        ["self_attn.o_proj"] = "attn_output",
        ["mlp.gate_proj"] = "ffn_gate",
        ["mlp.up_proj"] = "ffn_up",
        ["mlp.down_proj"] = "ffn_down",
    };

    [GeneratedRegex(@"^model\.layers\.([0-9]+)\.(.+)$")]
    private static partial Regex LayerModule();

    /// <summary><c>model.layers.3.self_attn.q_proj</c> → <c>blk.3.attn_q.weight</c>; throws <see cref="ArgumentException"/> for a module llama.cpp has no name for.</summary>
    public static string BaseTensorName(string module)
    {
        var match = LayerModule().Match(module);
        if (!match.Success || !TensorNames.TryGetValue(match.Groups[2].Value, out var name))
            throw new ArgumentException($"LoRA module '{module}' has no llama.cpp tensor name (supported: model.layers.N.{string.Join("|", TensorNames.Keys)})", nameof(module));
        return $"blk.{match.Groups[1].Value}.{name}.weight";
    }

    /// <summary>
    /// Writes <paramref name="adapter"/> for <paramref name="model"/> to <paramref name="path"/>
    /// (atomically), its tensors as <paramref name="type"/>. <paramref name="name"/> is <c>general.name</c>;
    /// <paramref name="baseModel"/> names the base model (a Hugging Face id or path).
    /// </summary>
    public static void Write(LoraAdapter adapter, ModelInfo model, string path, string name, string baseModel, GgmlType type = GgmlType.F32)
    {
        string architecture = ArchitectureName(model.Architecture)
            ?? throw new ArgumentException($"{model.Name}: architecture {model.Architecture} has no llama.cpp name this exporter knows");
        var gguf = new GgufWriter()
            .AddString("general.architecture", architecture)
            .AddString("general.type", "adapter")
            .AddString("general.name", name)
            .AddUInt32("general.base_model.count", 1)
            .AddString("general.base_model.0.name", baseModel)
            .AddUInt32(GgufWriter.AlignmentKey, GgufWriter.DefaultAlignment)
            .AddString("adapter.type", "lora")
            .AddFloat32("adapter.lora.alpha", adapter.Settings.Alpha)
            .AddUInt32("general.quantization_version", QuantizationVersion)
            .AddUInt32("general.file_type", type == GgmlType.F16 ? FileTypeF16 : FileTypeF32);
        int r = adapter.Settings.R;
        foreach (var module in adapter.Modules)
        {
            string tensor = BaseTensorName(module.Spec.Module);
            gguf.AddTensor(tensor + ".lora_a", [r, module.Spec.In], type, module.A);
            gguf.AddTensor(tensor + ".lora_b", [module.Spec.Out, r], type, RowsInLlamaCppOrder(architecture, model, module));
        }
        gguf.Write(path);
    }

    /// <summary>B [out, r], its rows reordered as llama.cpp's converter reorders the base weight's (Llama's q_proj and k_proj only).</summary>
    static float[] RowsInLlamaCppOrder(string architecture, ModelInfo model, LoraModule module)
    {
        int heads = module.Spec.Module.EndsWith(".self_attn.q_proj", StringComparison.Ordinal) ? model.Heads
            : module.Spec.Module.EndsWith(".self_attn.k_proj", StringComparison.Ordinal) ? model.KvHeads : 0;
        if (architecture != "llama" || heads == 0)
            return module.B;
        return PermuteHeads(module.B, module.Spec.Out, module.B.Length / module.Spec.Out, heads);
    }

    /// <summary>
    /// llama.cpp's <c>LlamaModel.permute</c> on the rows of a [rows, columns] matrix:
    /// <c>reshape(heads, 2, rows/heads/2, columns).swapaxes(1, 2)</c>, so row <c>h·D + 2i + j</c> of the
    /// result is row <c>h·D + j·D/2 + i</c> of the input (D = rows / heads, i &lt; D/2, j ∈ {0, 1}).
    /// </summary>
    public static float[] PermuteHeads(float[] matrix, int rows, int columns, int heads)
    {
        if (heads <= 0 || rows % heads != 0 || rows / heads % 2 != 0 || (long)rows * columns != matrix.Length)
            throw new ArgumentException($"cannot permute {rows} rows into {heads} heads of an even size");
        int headDim = rows / heads, half = headDim / 2;
        var result = new float[matrix.Length];
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++)
                for (int j = 0; j < 2; j++)
                    matrix.AsSpan((h * headDim + j * half + i) * columns, columns)
                        .CopyTo(result.AsSpan((h * headDim + 2 * i + j) * columns, columns));
        return result;
    }
}
