using System.Text.Json;
using System.Text.RegularExpressions;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Runtime.Weights;

/// <summary>
/// A LoRA adapter as mlx-lm's tuner saves one and <c>mlx_lm.generate --adapter-path</c> /
/// <c>mlx_lm.fuse</c> load it (<c>tuner/utils.py</c> <c>load_adapters</c>): a folder with
/// <list type="bullet">
/// <item><c>adapters.safetensors</c>: per adapted projection <c>model.layers.N.self_attn.q_proj.lora_a</c>
/// [in, r] = Aᵀ and <c>….lora_b</c> [r, out] = Bᵀ, since MLX's <c>LoRALinear</c> computes
/// <c>y = x·Wᵀ + scale·(x·lora_a)·lora_b</c>;</item>
/// <item><c>adapter_config.json</c>: <c>fine_tune_type</c> "lora", <c>num_layers</c> (the LoRA layers are
/// the last num_layers blocks) and <c>lora_parameters</c> {<c>rank</c>, <c>scale</c> = alpha/r,
/// <c>dropout</c>, <c>keys</c>: the module paths inside a block, like "self_attn.q_proj"}, which
/// <c>linear_to_lora_layers</c> reads, plus <c>model</c> and <c>base_model_name_or_path</c> naming the base.</item>
/// </list>
/// </summary>
public static partial class MlxAdapter
{
    public const string WeightsFileName = "adapters.safetensors";
    public const string ConfigFileName = "adapter_config.json";

    [GeneratedRegex(@"^model\.layers\.([0-9]+)\.(.+)$")]
    private static partial Regex LayerModule();

    /// <summary>
    /// Writes <paramref name="adapter"/> into <paramref name="dir"/> (created), tensors as
    /// <paramref name="dtype"/> (F32 or F16), each file atomically. Every one of the model's
    /// <paramref name="layers"/> blocks must have the same adapted modules (mlx-lm applies one set of
    /// keys to every LoRA block); throws <see cref="ArgumentException"/> otherwise.
    /// </summary>
    public static void Write(LoraAdapter adapter, int layers, string dir, string baseModel, string dtype = "F32")
    {
        if (dtype is not ("F32" or "F16"))
            throw new ArgumentException($"MLX adapters are written as F32 or F16, not {dtype}", nameof(dtype));
        var keys = Keys(adapter, layers);
        int r = adapter.Settings.R;
        Directory.CreateDirectory(dir);
        SafeTensorsWriter.Write(Path.Combine(dir, WeightsFileName), adapter.Modules.SelectMany(m => new[]
        {
            (m.Spec.Module + ".lora_a", new[] { m.Spec.In, r }, Transpose(m.A, r, m.Spec.In)),
            (m.Spec.Module + ".lora_b", new[] { r, m.Spec.Out }, Transpose(m.B, m.Spec.Out, r)),
        }), dtype, new Dictionary<string, string> { ["format"] = "mlx" });
        AtomicFile.Write(Path.Combine(dir, ConfigFileName), stream =>
        {
            using var json = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true });
            json.WriteStartObject();
            json.WriteString("fine_tune_type", "lora");
            json.WriteString("model", baseModel);
            json.WriteString("base_model_name_or_path", baseModel);
            json.WriteNumber("num_layers", layers);
            json.WriteStartObject("lora_parameters");
            json.WriteNumber("rank", r);
            json.WriteNumber("scale", adapter.Settings.Scale);
            json.WriteNumber("dropout", 0.0);
            json.WriteStartArray("keys");
            foreach (string key in keys)
                json.WriteStringValue(key);
            json.WriteEndArray();
            json.WriteEndObject();
            json.WriteEndObject();
        });
    }

    /// <summary>The module paths inside a block (<c>self_attn.q_proj</c>, …), in the adapter's order, checked to be the same in every block.</summary>
    public static IReadOnlyList<string> Keys(LoraAdapter adapter, int layers)
    {
        var perLayer = new List<string>[layers];
        foreach (var module in adapter.Modules)
        {
            var match = LayerModule().Match(module.Spec.Module);
            if (!match.Success || !int.TryParse(match.Groups[1].Value, out int layer) || layer >= layers)
                throw new ArgumentException($"LoRA module '{module.Spec.Module}' is not in one of the model's {layers} blocks (model.layers.N.…)");
            (perLayer[layer] ??= []).Add(match.Groups[2].Value);
        }
        var keys = perLayer[0] ?? [];
        for (int layer = 0; layer < layers; layer++)
            if (!(perLayer[layer] ?? []).SequenceEqual(keys))
                throw new ArgumentException(
                    $"block {layer} adapts [{string.Join(", ", perLayer[layer] ?? [])}] but block 0 adapts [{string.Join(", ", keys)}]; " +
                    "mlx-lm's adapter config gives one set of keys for every LoRA block");
        return keys;
    }

    /// <summary>The transpose of a row-major [rows, columns] matrix.</summary>
    public static float[] Transpose(float[] matrix, int rows, int columns)
    {
        var result = new float[matrix.Length];
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < columns; j++)
                result[(long)j * rows + i] = matrix[(long)i * columns + j];
        return result;
    }
}
