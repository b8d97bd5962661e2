using System.Text.Json;

namespace LoraCompiler.Tests.Reference;

/// <summary>
/// A model JSON read as transformers' config classes read it (Qwen2Config, LlamaConfig, Qwen3Config,
/// Gemma3TextConfig: their field defaults and derived values), with System.Text.Json: the reference's
/// side of the gradient tests, independent of the generator's parser and planner.
/// </summary>
public static class HuggingFaceConfig
{
    /// <summary>The reference configuration of a model file, with LoRA settings from its lora section.</summary>
    public static ReferenceConfig Read(string path)
    {
        using var document = JsonDocument.Parse(File.ReadAllText(path));
        var c = document.RootElement;
        string architecture = c.GetProperty("architectures")[0].GetString()!;
        bool gemma = architecture == "Gemma3ForCausalLM", qwen3 = architecture == "Qwen3ForCausalLM", qwen2 = architecture == "Qwen2ForCausalLM";

        int hidden = c.GetProperty("hidden_size").GetInt32();
        int heads = c.GetProperty("num_attention_heads").GetInt32();
        int layers = c.GetProperty("num_hidden_layers").GetInt32();
        int headDim = Int(c, "head_dim") ?? (gemma ? 256 : qwen3 ? 128 : hidden / heads);
        bool attentionBias = Bool(c, "attention_bias") ?? false;

        (double, double, double, int)? llama3 = null;
        double? linear = null;
        if (c.TryGetProperty("rope_scaling", out var scaling) && scaling.ValueKind == JsonValueKind.Object)
        {
            string type = (scaling.TryGetProperty("rope_type", out var t) ? t : scaling.GetProperty("type")).GetString()!;
            if (type == "llama3")
                llama3 = (scaling.GetProperty("factor").GetDouble(), scaling.GetProperty("low_freq_factor").GetDouble(),
                          scaling.GetProperty("high_freq_factor").GetDouble(), scaling.GetProperty("original_max_position_embeddings").GetInt32());
            else if (type == "linear")
                linear = scaling.GetProperty("factor").GetDouble();
            else
                throw new NotSupportedException($"{path}: rope_scaling {type}");
        }

        // Which layers slide. Gemma3TextConfig: layer_types, else sliding_window_pattern (default 6),
        // layer i sliding iff (i + 1) % pattern != 0. Qwen2Config / Qwen3Config: sliding_window only with
        // use_sliding_window, layer_types else the layers i >= max_window_layers.
        int[] windows = new int[layers];
        // sliding_window defaults to 4096 when absent; an explicit null means no window.
        int? configured = c.TryGetProperty("sliding_window", out _) ? Int(c, "sliding_window") : 4096;
        int? window = gemma || ((qwen2 || qwen3) && Bool(c, "use_sliding_window") == true) ? configured : null;
        if (window is int w)
        {
            bool[] sliding;
            if (c.TryGetProperty("layer_types", out var types) && types.ValueKind == JsonValueKind.Array)
                sliding = types.EnumerateArray().Select(e => e.GetString() == "sliding_attention").ToArray();
            else if (gemma)
            {
                int pattern = Int(c, "sliding_window_pattern") ?? Int(c, "_sliding_window_pattern") ?? 6;
                sliding = Enumerable.Range(0, layers).Select(i => (i + 1) % pattern != 0).ToArray();
            }
            else
            {
                int from = Int(c, "max_window_layers") ?? 28;
                sliding = Enumerable.Range(0, layers).Select(i => i >= from).ToArray();
            }
            windows = sliding.Select(s => s ? w : 0).ToArray();
        }

        var lora = c.TryGetProperty("lora", out var l) ? l : default;
        int r = lora.ValueKind == JsonValueKind.Object && lora.TryGetProperty("r", out var rv) ? rv.GetInt32() : 8;
        double alpha = lora.ValueKind == JsonValueKind.Object && lora.TryGetProperty("lora_alpha", out var av) ? av.GetDouble() : 16;
        string[] all = [.. TorchReference.AttentionModules, .. TorchReference.MlpModules];
        string[] targets = lora.ValueKind == JsonValueKind.Object && lora.TryGetProperty("target_modules", out var tm) && tm.ValueKind == JsonValueKind.Array
            ? all.Where(m => tm.EnumerateArray().Any(e => e.GetString() == m)).ToArray()
            : all;

        return new ReferenceConfig(
            hidden, c.GetProperty("intermediate_size").GetInt32(), layers, heads, Int(c, "num_key_value_heads") ?? heads, headDim,
            c.GetProperty("vocab_size").GetInt32(), Double(c, "rms_norm_eps") ?? 1e-6,
            Double(c, "rope_theta") ?? (gemma ? 1_000_000 : 10_000), llama3,
            Bool(c, "tie_word_embeddings") ?? gemma,
            qwen2 || attentionBias, r, alpha, targets)
        {
            QkNorm = gemma || qwen3,
            NormWeightOffset = gemma ? 1 : 0,
            SandwichNorms = gemma,
            EmbeddingScale = gemma ? (float)Math.Sqrt(hidden) : 1,
            AttentionScale = gemma ? Math.Pow(Double(c, "query_pre_attn_scalar") ?? headDim, -0.5) : null,
            HiddenActivation = gemma ? c.TryGetProperty("hidden_activation", out var act) && act.ValueKind == JsonValueKind.String
                ? act.GetString()! : "gelu_pytorch_tanh" : "silu",
            LayerWindows = windows,
            LocalRopeTheta = gemma ? Double(c, "rope_local_base_freq") ?? 10_000 : null,
            LinearRopeFactor = linear,
            FinalLogitSoftcap = gemma ? Double(c, "final_logit_softcapping") : null,
        };
    }

    private static JsonElement? Get(JsonElement o, string key) =>
        o.TryGetProperty(key, out var v) && v.ValueKind != JsonValueKind.Null ? v : null;

    private static int? Int(JsonElement o, string key) => Get(o, key)?.GetInt32();
    private static double? Double(JsonElement o, string key) => Get(o, key)?.GetDouble();
    private static bool? Bool(JsonElement o, string key) => Get(o, key)?.GetBoolean();
}
