using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;

namespace LoraCompiler.Generator;

public sealed partial class LoraGenerator
{
    /// <summary>PEFT's module names the trainer can adapt, in the order a layer runs them.</summary>
    internal static readonly string[] KnownTargetModules =
        { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" };

    /// <summary>
    /// The architectures the trainer implements, as Hugging Face's modeling code computes them; the
    /// planner builds each one's layer from its row.
    /// </summary>
    internal static readonly ArchitectureTraits[] Architectures =
    {
        //  architecture          family         qkvBias  attention_bias  qkNorm  w offset  sandwich  √hidden  activation field        default               sliding layers                 tied   head_dim
        new("Qwen2ForCausalLM",   Family.Qwen2,  true,    false,          false,  0,        false,    false,   "hidden_act",           "silu",               SlidingSource.UseSlidingWindow, false, null),
        new("LlamaForCausalLM",   Family.Llama,  false,   true,           false,  0,        false,    false,   "hidden_act",           "silu",               SlidingSource.None,             false, null),
        new("Qwen3ForCausalLM",   Family.Qwen3,  false,   true,           true,   0,        false,    false,   "hidden_act",           "silu",               SlidingSource.UseSlidingWindow, false, 128),
        new("Gemma3ForCausalLM",  Family.Gemma3, false,   true,           true,   1,        true,     true,    "hidden_activation",    "gelu_pytorch_tanh",  SlidingSource.Pattern,          true,  256),
    };

    private const int DefaultLoraRank = 8;
    private const double DefaultLoraAlpha = 16;
    private const int DefaultLmHeadChunk = 4096;

    /// <summary>Reads one model JSON into a <see cref="ModelSpec"/>, or the first reason it cannot be used.</summary>
    internal static Result<ModelSpec> Parse(string path, string text)
    {
        string fileName = Path.GetFileName(path);
        JsonValue root;
        try
        {
            root = JsonReader.Parse(text);
        }
        catch (JsonException e)
        {
            return Result<ModelSpec>.Fail(new DiagnosticInfo("LORA0001", path, e.Line, e.Column,
                $"{fileName}: malformed JSON at line {e.Line + 1}, column {e.Column + 1}: {e.Message}"));
        }
        try
        {
            return Result<ModelSpec>.Ok(new SpecReader(path, fileName).Read(root));
        }
        catch (SpecException e)
        {
            return Result<ModelSpec>.Fail(e.Info);
        }
    }

    /// <summary>The trainer class name for a model file: <c>qwen2.5-0.5b.json</c> gives <c>Qwen2_5_0_5BTrainer</c>.</summary>
    internal static string ClassNameFor(string modelName)
    {
        var sb = new StringBuilder();
        char previous = '\0';
        bool atSegmentStart = true;
        foreach (char c in modelName)
        {
            if (!char.IsLetterOrDigit(c) || c > 127)
            {
                atSegmentStart = true;
                continue;
            }
            if (atSegmentStart && char.IsDigit(previous) && char.IsDigit(c))
                sb.Append('_');
            bool upper = atSegmentStart || char.IsDigit(previous);
            sb.Append(upper ? char.ToUpperInvariant(c) : c);
            previous = c;
            atSegmentStart = false;
        }
        if (sb.Length == 0 || char.IsDigit(sb[0]))
            sb.Insert(0, "Model");
        return sb + "Trainer";
    }

    private sealed class SpecException(DiagnosticInfo info) : Exception(info.Message)
    {
        public DiagnosticInfo Info { get; } = info;
    }

    /// <summary>Walks the JSON tree; the first problem throws a <see cref="SpecException"/> with its location.</summary>
    private sealed class SpecReader(string path, string fileName)
    {
        public ModelSpec Read(JsonValue root)
        {
            if (root is not JsonObject config)
                throw Fail("LORA0008", root, $"{fileName}: the top level must be a JSON object, found {root.Kind}");

            var traits = ReadArchitecture(config);
            string architecture = traits.Architecture;

            int hidden = PositiveInt(config, "hidden_size");
            int intermediate = PositiveInt(config, "intermediate_size");
            int layers = PositiveInt(config, "num_hidden_layers");
            int heads = PositiveInt(config, "num_attention_heads");
            int kvHeads = config["num_key_value_heads"] is null or JsonNull ? heads : PositiveInt(config, "num_key_value_heads");
            int vocab = PositiveInt(config, "vocab_size");

            int headDim;
            if (config["head_dim"] is { } headDimValue and not JsonNull)
                headDim = PositiveInt(config, "head_dim");
            else if (traits.DefaultHeadDim is int familyDefault)
                headDim = familyDefault;
            else if (hidden % heads != 0)
                throw Fail("LORA0004", config["num_attention_heads"]!,
                    $"{fileName}: num_attention_heads ({heads}) does not divide hidden_size ({hidden}) and no head_dim is given");
            else
                headDim = hidden / heads;
            if (headDim % 2 != 0)
                throw Fail("LORA0004", config["head_dim"] ?? config["num_attention_heads"]!,
                    $"{fileName}: the head dimension ({headDim}) must be even for rotary embeddings");
            if (heads % kvHeads != 0)
                throw Fail("LORA0004", config["num_key_value_heads"]!,
                    $"{fileName}: num_key_value_heads ({kvHeads}) does not divide num_attention_heads ({heads})");

            double rmsEps = PositiveNumber(config, "rms_norm_eps", 1e-6);
            var (rope, localRope) = ReadRope(config, traits);
            bool tied = Bool(config, "tie_word_embeddings", traits.TiedByDefault);

            var activation = ReadActivation(config, traits);
            if (Bool(config, "mlp_bias", false))
                throw Fail("LORA0009", config["mlp_bias"]!, $"{fileName}: mlp_bias = true is not supported");
            bool attentionBias = traits.AttentionBiasField && Bool(config, "attention_bias", false);
            bool qkvBias = traits.QkvBias || attentionBias;

            // Gemma 3 scales the scores by query_pre_attn_scalar^-1/2; everyone else by head_dim^-1/2.
            double attentionScale = 1 / Math.Sqrt(traits.Family == Family.Gemma3
                ? PositiveNumber(config, "query_pre_attn_scalar", 256) // Gemma3TextConfig's default
                : headDim);
            if (traits.Family == Family.Gemma3 && Bool(config, "use_bidirectional_attention", false))
                throw Fail("LORA0009", config["use_bidirectional_attention"]!,
                    $"{fileName}: use_bidirectional_attention = true (EmbeddingGemma) is not supported: the trainer is a causal language model");
            var windows = ReadLayerWindows(config, traits, layers);
            double softcap = traits.Family == Family.Gemma3 ? PositiveNumber(config, "final_logit_softcapping", 0) : 0;
            var warnings = new List<DiagnosticInfo>();
            if (traits.Family == Family.Gemma3 && config["attn_logit_softcapping"] is { } attnCap and not JsonNull)
                warnings.Add(new DiagnosticInfo("LORA0011", path, attnCap.Line, attnCap.Column,
                    $"{fileName}: attn_logit_softcapping is set, but Hugging Face's Gemma 3 does not apply it, and neither does this trainer"));

            var (rank, alpha, targets) = ReadLora(config);
            int chunk = Math.Min(vocab, DefaultLmHeadChunk);
            int lcsbGroups = 1;
            bool activationsInFile = false, optimizerStateInFile = false;
            long memoryBudget = 0;
            if (config["trainer"] is { } trainerValue)
            {
                var trainer = AsObject(trainerValue, "trainer");
                if (trainer["lm_head_chunk"] is not null)
                    chunk = PositiveInt(trainer, "lm_head_chunk", "trainer.lm_head_chunk");
                if (trainer["lcsb"] is { } lcsbValue)
                    lcsbGroups = ReadLcsb(AsObject(lcsbValue, "trainer.lcsb"), layers);
                activationsInFile = Placement(trainer, "activations");
                optimizerStateInFile = Placement(trainer, "optimizer_state");
                if (trainer["memory_budget"] is { } budget and not JsonNull)
                    memoryBudget = MemoryBudget(budget);
            }

            int maxPositions = config["max_position_embeddings"] is null or JsonNull ? 0 : PositiveInt(config, "max_position_embeddings");

            string modelName = Path.GetFileNameWithoutExtension(path);
            return new ModelSpec(path, modelName, ClassNameFor(modelName), traits,
                hidden, intermediate, layers, heads, kvHeads, headDim, vocab, rmsEps, rope, localRope,
                tied, qkvBias, OutputBias: attentionBias, activation, attentionScale, windows, softcap,
                rank, alpha, targets, chunk, lcsbGroups, activationsInFile, optimizerStateInFile, ReadEosTokenIds(config, vocab),
                maxPositions, memoryBudget, warnings.ToEquatableArray());
        }

        /// <summary>eos_token_id: one id, a list of ids, or none; each within the vocabulary.</summary>
        private EquatableArray<int> ReadEosTokenIds(JsonObject config, int vocab)
        {
            var value = config["eos_token_id"];
            var items = value switch
            {
                null or JsonNull => new List<JsonValue>(),
                JsonArray array => array.Items.ToList(),
                _ => new List<JsonValue> { value },
            };
            return items.Select(item =>
            {
                int id = Integer(item, "eos_token_id");
                if (id < 0 || id >= vocab)
                    throw Fail("LORA0003", item, $"{fileName}: eos_token_id {id} is outside the vocabulary (0 to {vocab - 1})");
                return id;
            }).ToEquatableArray();
        }

        /// <summary>The MLP's activation from the family's field (hidden_act, or Gemma's hidden_activation).</summary>
        private Activation ReadActivation(JsonObject config, ArchitectureTraits traits)
        {
            var value = config[traits.ActivationField];
            string name = value switch
            {
                null or JsonNull => traits.DefaultActivation,
                JsonString s => s.Value,
                _ => throw WrongType(value, traits.ActivationField, "a string"),
            };
            if (name != traits.DefaultActivation)
                throw Fail("LORA0009", value!,
                    $"{fileName}: {traits.ActivationField} \"{name}\" is not supported for {traits.Architecture} (supported: \"{traits.DefaultActivation}\")");
            return name == "silu" ? Activation.Silu : Activation.GeluTanh;
        }

        /// <summary>
        /// Each layer's attention window (0: full). Gemma 3: layer_types, else sliding_window_pattern
        /// (layer i slides unless (i + 1) is a multiple of it, 6 by default). Qwen2/Qwen3: with
        /// use_sliding_window, layer_types, else the layers from max_window_layers on.
        /// </summary>
        private EquatableArray<int> ReadLayerWindows(JsonObject config, ArchitectureTraits traits, int layers)
        {
            var windows = new int[layers];
            if (traits.Sliding == SlidingSource.None)
            {
                if (Bool(config, "use_sliding_window", false))
                    throw Fail("LORA0009", config["use_sliding_window"]!, $"{fileName}: use_sliding_window = true is not supported for {traits.Architecture}");
                return windows.ToEquatableArray();
            }
            bool? explicitSliding = traits.Sliding == SlidingSource.UseSlidingWindow ? Bool(config, "use_sliding_window", false) : null;
            if (explicitSliding == false)
                return windows.ToEquatableArray();

            // Absent: the config classes' default, 4096. null: no window, so every layer attends fully.
            if (config["sliding_window"] is JsonNull)
                return windows.ToEquatableArray();
            int window = config["sliding_window"] is null ? 4096 : PositiveInt(config, "sliding_window");
            bool[] sliding;
            if (config["layer_types"] is { } typesValue and not JsonNull)
            {
                if (typesValue is not JsonArray types || types.Items.Count != layers)
                    throw Fail("LORA0008", typesValue, $"{fileName}: 'layer_types' must be an array of {layers} strings, one per layer");
                sliding = types.Items.Select(item => item switch
                {
                    JsonString { Value: "sliding_attention" } => true,
                    JsonString { Value: "full_attention" } => false,
                    _ => throw Fail("LORA0009", item,
                        $"{fileName}: layer_types entry {Describe(item)} is not supported (supported: \"sliding_attention\", \"full_attention\")"),
                }).ToArray();
            }
            else if (traits.Sliding == SlidingSource.Pattern)
            {
                string key = config["sliding_window_pattern"] is not null ? "sliding_window_pattern" : "_sliding_window_pattern";
                int pattern = config[key] is null or JsonNull ? 6 : PositiveInt(config, key);
                sliding = Enumerable.Range(0, layers).Select(i => (i + 1) % pattern != 0).ToArray();
            }
            else
            {
                int from = config["max_window_layers"] is null or JsonNull ? 28 : Integer(config["max_window_layers"]!, "max_window_layers");
                sliding = Enumerable.Range(0, layers).Select(i => i >= from).ToArray();
            }
            for (int i = 0; i < layers; i++)
                windows[i] = sliding[i] ? window : 0;
            return windows.ToEquatableArray();
        }

        /// <summary><c>"memory"</c> (the default) or <c>"mmap"</c>: whether a kind of state lives in a memory-mapped file.</summary>
        private bool Placement(JsonObject trainer, string key) => trainer[key] switch
        {
            null or JsonString { Value: "memory" } => false,
            JsonString { Value: "mmap" } => true,
            var other => throw Fail("LORA0009", other,
                $"{fileName}: trainer.{key} {Describe(other)} is not supported (supported: \"memory\", \"mmap\")"),
        };

        /// <summary>
        /// <c>"memory_budget": "512MB"</c> (a size as <c>--memory-budget</c> takes it: KB, MB, GB in powers of
        /// 1000, KiB, MiB, GiB in powers of 1024) or a number of bytes.
        /// </summary>
        private long MemoryBudget(JsonValue value)
        {
            if (value is JsonNumber n)
                return n.IsInteger && n.Value >= 1 && n.Value < 9.2e18 ? (long)n.Value
                    : throw Fail("LORA0012", value, $"{fileName}: trainer.memory_budget: {n.Value.ToString("R", System.Globalization.CultureInfo.InvariantCulture)} " +
                                                    "is not a positive whole number of bytes");
            if (value is not JsonString s)
                throw WrongType(value, "trainer.memory_budget", "a size like \"512MB\" or a number of bytes");
            return ByteSize.TryParse(s.Value, out string problem)
                ?? throw Fail("LORA0012", value, $"{fileName}: trainer.memory_budget: {problem}");
        }

        /// <summary><c>"lcsb": {"groups": K, "order": "cyclic"}</c>: K groups of layers, one backpropagating per step.</summary>
        private int ReadLcsb(JsonObject lcsb, int layers)
        {
            int groups = lcsb["groups"] is null ? 1 : PositiveInt(lcsb, "groups", "trainer.lcsb.groups");
            if (groups > layers)
                throw Fail("LORA0003", lcsb["groups"]!,
                    $"{fileName}: 'trainer.lcsb.groups' ({groups}) must not exceed num_hidden_layers ({layers})");
            if (lcsb["order"] is { } order && order is not JsonString { Value: "cyclic" })
                throw Fail("LORA0009", order, $"{fileName}: trainer.lcsb.order {Describe(order)} is not supported (supported: \"cyclic\")");
            return groups;
        }

        private ArchitectureTraits ReadArchitecture(JsonObject config)
        {
            var value = config["architectures"] ?? throw Missing(config, "architectures");
            if (value is not JsonArray { Items.Count: > 0 } array || array.Items[0] is not JsonString name)
                throw Fail("LORA0008", value, $"{fileName}: 'architectures' must be a non-empty array of strings");
            return Architectures.FirstOrDefault(a => a.Architecture == name.Value) ?? throw Fail("LORA0005", name,
                $"{fileName}: architecture '{name.Value}' is not supported (supported: {string.Join(", ", Architectures.Select(a => a.Architecture))})");
        }

        /// <summary>
        /// RoPE of the full-attention layers and, where the family gives them their own (Gemma 3's
        /// rope_local_base_freq, unscaled), of the sliding ones. Reads the published fields (rope_theta,
        /// rope_scaling) or transformers' newer rope_parameters, flat or per layer type.
        /// </summary>
        private (RopeSpec Full, RopeSpec? Local) ReadRope(JsonObject config, ArchitectureTraits traits)
        {
            double defaultTheta = traits.Family == Family.Gemma3 ? 1_000_000 : 10_000;
            RopeSpec full, local;
            if (config["rope_parameters"] is JsonObject parameters)
            {
                bool perType = parameters["full_attention"] is not null || parameters["sliding_attention"] is not null;
                full = ReadRopeParameters(perType ? parameters["full_attention"] : parameters, "rope_parameters" + (perType ? ".full_attention" : ""), defaultTheta, traits);
                local = perType && parameters["sliding_attention"] is { } slidingParameters
                    ? ReadRopeParameters(slidingParameters, "rope_parameters.sliding_attention", 10_000, traits)
                    : traits.Family == Family.Gemma3 ? new RopeSpec(10_000, null) : full;
            }
            else
            {
                full = new RopeSpec(PositiveNumber(config, "rope_theta", defaultTheta), ReadRopeScaling(config["rope_scaling"], "rope_scaling", traits));
                local = traits.Family == Family.Gemma3 ? new RopeSpec(PositiveNumber(config, "rope_local_base_freq", 10_000), null) : full;
            }
            return (full, local == full ? null : local);
        }

        private RopeSpec ReadRopeParameters(JsonValue? value, string name, double defaultTheta, ArchitectureTraits traits)
        {
            if (value is null or JsonNull)
                return new RopeSpec(defaultTheta, null);
            var parameters = AsObject(value, name);
            return new RopeSpec(PositiveNumber(parameters, "rope_theta", defaultTheta, name + ".rope_theta"), ReadRopeScaling(parameters, name, traits));
        }

        /// <summary>A rope_scaling object: Llama 3's ("llama3", Llama only), linear ("linear", Gemma 3), or none ("default").</summary>
        private RopeScalingSpec? ReadRopeScaling(JsonValue? value, string name, ArchitectureTraits traits)
        {
            if (value is null or JsonNull)
                return null;
            var scaling = AsObject(value, name);
            var type = scaling["rope_type"] ?? scaling["type"];
            string supported = traits.Family switch
            {
                Family.Llama => "llama3",
                Family.Gemma3 => "linear",
                _ => "",
            };
            if (type is null or JsonNull or JsonString { Value: "default" })
                return null;
            if (type is not JsonString typeName || typeName.Value != supported)
                throw Fail("LORA0009", type,
                    $"{fileName}: {name} of type {Describe(type)} is not supported for {traits.Architecture}" +
                    (supported.Length == 0 ? "" : $" (supported: \"{supported}\")"));
            if (supported == "linear")
                return new RopeScalingSpec("linear", PositiveNumber(scaling, "factor", null, name + ".factor"));
            return new RopeScalingSpec("llama3",
                PositiveNumber(scaling, "factor", null, name + ".factor"),
                PositiveNumber(scaling, "low_freq_factor", null, name + ".low_freq_factor"),
                PositiveNumber(scaling, "high_freq_factor", null, name + ".high_freq_factor"),
                PositiveInt(scaling, "original_max_position_embeddings", name + ".original_max_position_embeddings"));
        }

        private (int, double, EquatableArray<string>) ReadLora(JsonObject config)
        {
            if (config["lora"] is not { } loraValue)
                return (DefaultLoraRank, DefaultLoraAlpha, KnownTargetModules.ToEquatableArray());
            var lora = AsObject(loraValue, "lora");

            int rank = DefaultLoraRank;
            if (lora["r"] is { } r)
            {
                rank = Integer(r, "lora.r");
                if (rank <= 0)
                    throw Fail("LORA0007", r, $"{fileName}: lora.r must be a positive integer, found {rank}");
            }
            double alpha = DefaultLoraAlpha;
            if (lora["lora_alpha"] is { } a)
            {
                alpha = a is JsonNumber n ? n.Value : throw WrongType(a, "lora.lora_alpha", "a number");
                if (alpha <= 0)
                    throw Fail("LORA0007", a, $"{fileName}: lora.lora_alpha must be positive, found {alpha}");
            }

            var targets = KnownTargetModules.ToList();
            switch (lora["target_modules"])
            {
                case null:
                case JsonString { Value: "all-linear" }:
                    break;
                case JsonArray array:
                    targets.Clear();
                    foreach (var item in array.Items)
                    {
                        if (item is not JsonString module)
                            throw WrongType(item, "lora.target_modules[]", "a string");
                        if (Array.IndexOf(KnownTargetModules, module.Value) < 0)
                            throw Fail("LORA0006", item,
                                $"{fileName}: unknown LoRA target module '{module.Value}' (known: {string.Join(", ", KnownTargetModules)}, or \"all-linear\")");
                        if (!targets.Contains(module.Value))
                            targets.Add(module.Value);
                    }
                    if (targets.Count == 0)
                        throw Fail("LORA0007", array, $"{fileName}: lora.target_modules is empty");
                    break;
                case var other:
                    throw WrongType(other, "lora.target_modules", "an array of module names or \"all-linear\"");
            }
            // Keep the layer's execution order whatever order the file lists them in.
            var ordered = KnownTargetModules.Where(targets.Contains).ToEquatableArray();
            return (rank, alpha, ordered);
        }

        private int PositiveInt(JsonObject obj, string key, string? displayName = null)
        {
            string name = displayName ?? key;
            var value = obj[key] ?? throw Missing(obj, name);
            int n = Integer(value, name);
            if (n <= 0)
                throw Fail("LORA0003", value, $"{fileName}: '{name}' must be a positive integer, found {n}");
            return n;
        }

        private int Integer(JsonValue value, string name)
        {
            if (value is not JsonNumber { IsInteger: true } n || n.Value > int.MaxValue || n.Value < int.MinValue)
                throw WrongType(value, name, "an integer");
            return (int)n.Value;
        }

        private double PositiveNumber(JsonObject obj, string key, double? defaultValue, string? displayName = null)
        {
            string name = displayName ?? key;
            var value = obj[key];
            if (value is null or JsonNull)
                return defaultValue ?? throw Missing(obj, name);
            if (value is not JsonNumber n)
                throw WrongType(value, name, "a number");
            if (n.Value <= 0)
                throw Fail("LORA0003", value, $"{fileName}: '{name}' must be positive, found {n.Value}");
            return n.Value;
        }

        private bool Bool(JsonObject obj, string key, bool defaultValue) => obj[key] switch
        {
            null or JsonNull => defaultValue,
            JsonBool b => b.Value,
            var other => throw WrongType(other, key, "true or false"),
        };

        private JsonObject AsObject(JsonValue value, string name) =>
            value as JsonObject ?? throw WrongType(value, name, "an object");

        private static string Describe(JsonValue? value) => value switch
        {
            null => "(none)",
            JsonString s => $"\"{s.Value}\"",
            _ => value.Kind,
        };

        private SpecException Missing(JsonObject where, string name) =>
            Fail("LORA0002", where, $"{fileName}: required field '{name}' is missing");

        private SpecException WrongType(JsonValue value, string name, string expected) =>
            Fail("LORA0008", value, $"{fileName}: '{name}' must be {expected}, found {value.Kind}");

        private SpecException Fail(string id, JsonValue at, string message) =>
            new(new DiagnosticInfo(id, path, at.Line, at.Column, message));
    }
}
