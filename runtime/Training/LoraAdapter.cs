using System.Text.Json;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Training;

/// <summary>The LoRA parameters of one module: A is [r, In] and B is [Out, r], row-major (PEFT's layout).</summary>
public sealed record LoraModule(LoraModuleSpec Spec, float[] A, float[] B);

/// <summary>
/// Host-side LoRA parameters in PEFT's format: a folder with <c>adapter_config.json</c> and
/// <c>adapter_model.safetensors</c> holding <c>base_model.model.{module}.lora_A.weight</c> [r, In] and
/// <c>…lora_B.weight</c> [Out, r] per module, which PEFT's <c>PeftModel.from_pretrained</c> loads.
/// </summary>
public sealed class LoraAdapter
{
    public const string ConfigFileName = "adapter_config.json";
    public const string WeightsFileName = "adapter_model.safetensors";

    /// <summary>Wraps existing parameters; every A must hold r·In values and every B Out·r.</summary>
    public LoraAdapter(LoraSettings settings, IReadOnlyList<LoraModule> modules)
    {
        if (settings.R <= 0)
            throw new ArgumentOutOfRangeException(nameof(settings), $"LoRA rank must be positive, got {settings.R}");
        foreach (var module in modules)
        {
            if (module.A.Length != (long)settings.R * module.Spec.In || module.B.Length != (long)module.Spec.Out * settings.R)
                throw new ArgumentException(
                    $"{module.Spec.Module}: A has {module.A.Length} values and B {module.B.Length}; r={settings.R} needs " +
                    $"{(long)settings.R * module.Spec.In} and {(long)module.Spec.Out * settings.R}", nameof(modules));
        }
        Settings = settings;
        Modules = modules;
    }

    public LoraSettings Settings { get; }
    public IReadOnlyList<LoraModule> Modules { get; }

    /// <summary>
    /// PEFT's initialization: A ~ kaiming_uniform(a=√5), which is uniform(−1/√In, 1/√In), and B = 0,
    /// so the adapted model starts equal to the base model. The same seed gives the same values on any
    /// machine and .NET version (SplitMix64, one stream over the modules in order).
    /// </summary>
    public static LoraAdapter CreateNew(LoraSettings settings, IReadOnlyList<LoraModuleSpec> modules, int seed)
    {
        var random = new SplitMix64((ulong)(long)seed);
        var created = new List<LoraModule>(modules.Count);
        foreach (var spec in modules)
        {
            var a = new float[(long)settings.R * spec.In];
            float bound = 1f / MathF.Sqrt(spec.In);
            for (int i = 0; i < a.Length; i++)
                a[i] = (2f * random.NextFloat() - 1f) * bound;
            created.Add(new LoraModule(spec, a, new float[(long)spec.Out * settings.R]));
        }
        return new LoraAdapter(settings, created);
    }

    /// <summary>
    /// Loads a PEFT adapter folder for <paramref name="modules"/>, checking its rank and alpha against
    /// <paramref name="expected"/> and every tensor's presence, shape and values (all finite). Tensors
    /// may be F32, F16 or BF16. The adapter must adapt exactly the trainer's modules: a tensor of any
    /// other module (an adapter of all seven projections into a trainer of five), a missing one, or
    /// <c>target_modules</c> that name other modules than <paramref name="expected"/>'s is refused,
    /// since dropping them would change the adapter without a word. Any problem with either file is a
    /// <see cref="WeightsException"/> naming it; <paramref name="modelName"/> names the model in those messages.
    /// </summary>
    public static LoraAdapter Load(string dir, LoraSettings expected, IReadOnlyList<LoraModuleSpec> modules, string? modelName = null)
    {
        if (!Directory.Exists(dir))
            throw new WeightsException(dir, "adapter folder does not exist");
        string configPath = Path.Combine(dir, ConfigFileName);
        string weightsPath = Path.Combine(dir, WeightsFileName);
        if (!File.Exists(configPath))
            throw new WeightsException(configPath, "adapter config is missing");
        if (!File.Exists(weightsPath))
            throw new WeightsException(weightsPath, File.Exists(Path.Combine(dir, "adapter_model.bin"))
                ? "adapter weights are missing (adapter_model.bin is a pickle, which is not supported; save with safe_serialization=True)"
                : "adapter weights are missing");

        var settings = ReadConfig(configPath, expected);
        using var file = SafeTensorsFile.Open(weightsPath);
        CheckModules(file, configPath, settings, expected, modules, modelName ?? "the model");
        var loaded = new List<LoraModule>(modules.Count);
        foreach (var spec in modules)
        {
            loaded.Add(new LoraModule(spec,
                ReadTensor(file, spec.AName, [settings.R, spec.In]),
                ReadTensor(file, spec.BName, [spec.Out, settings.R])));
        }
        return new LoraAdapter(settings, loaded);
    }

    /// <summary>
    /// Writes <c>adapter_config.json</c> and <c>adapter_model.safetensors</c> (F32) into
    /// <paramref name="dir"/>, creating it; each file is replaced atomically.
    /// </summary>
    public void Save(string dir, string baseModelName)
    {
        Directory.CreateDirectory(dir);
        SafeTensorsWriter.Write(Path.Combine(dir, WeightsFileName), Tensors(), "F32",
            new Dictionary<string, string> { ["format"] = "pt" });
        AtomicFile.Write(Path.Combine(dir, ConfigFileName), stream =>
        {
            using var json = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true });
            json.WriteStartObject();
            json.WriteString("peft_type", "LORA");
            json.WriteString("task_type", "CAUSAL_LM");
            json.WriteString("base_model_name_or_path", baseModelName);
            json.WriteNumber("r", Settings.R);
            json.WriteNumber("lora_alpha", Settings.Alpha);
            json.WriteStartArray("target_modules");
            foreach (string target in Settings.TargetModules)
                json.WriteStringValue(target);
            json.WriteEndArray();
            json.WriteNumber("lora_dropout", 0.0);
            json.WriteString("bias", "none");
            json.WriteBoolean("fan_in_fan_out", false);
            json.WriteBoolean("use_rslora", false);
            json.WriteBoolean("use_dora", false);
            json.WriteBoolean("inference_mode", true);
            json.WriteEndObject();
        });
    }

    /// <summary>
    /// Writes LoRA gradients under the same PEFT names and shapes as the parameters (dA as
    /// <c>lora_A.weight</c> [r, In], dB as <c>lora_B.weight</c> [Out, r]), F32, atomically; for comparing
    /// gradients with a reference.
    /// </summary>
    public static void SaveGradients(string path, IEnumerable<(LoraModuleSpec Spec, float[] DA, float[] DB)> gradients, int r) =>
        SafeTensorsWriter.Write(path, gradients.SelectMany(g => new[]
        {
            (g.Spec.AName, new[] { r, g.Spec.In }, g.DA),
            (g.Spec.BName, new[] { g.Spec.Out, r }, g.DB),
        }));

    IEnumerable<(string Name, int[] Shape, float[] Data)> Tensors()
    {
        foreach (var module in Modules)
        {
            yield return (module.Spec.AName, [Settings.R, module.Spec.In], module.A);
            yield return (module.Spec.BName, [module.Spec.Out, Settings.R], module.B);
        }
    }

    /// <summary>Refuses an adapter whose modules are not exactly the trainer's, naming the modules that differ.</summary>
    static void CheckModules(SafeTensorsFile file, string configPath, LoraSettings settings, LoraSettings expected,
        IReadOnlyList<LoraModuleSpec> modules, string model)
    {
        string trains = $"{model} trains {string.Join(", ", expected.TargetModules)}";
        var known = modules.SelectMany(m => new[] { m.AName, m.BName }).ToHashSet(StringComparer.Ordinal);
        var extra = file.Names.Where(n => !known.Contains(n)).Order(StringComparer.Ordinal).ToList();
        if (extra.Count > 0)
            throw new WeightsException(file.Path,
                $"{extra.Count} tensor{(extra.Count > 1 ? "s belong" : " belongs")} to no LoRA module of {model}: those of {Kinds(extra)}, " +
                $"for example '{extra[0]}' ({trains}); this adapter was trained with other targets or for another model");
        var missing = modules.SelectMany(m => new[] { m.AName, m.BName }).Where(n => !file.Contains(n)).ToList();
        if (missing.Count > 0)
            throw new WeightsException(file.Path,
                $"tensor '{missing[0]}' is missing{(missing.Count > 1 ? $", and {missing.Count - 1} more" : "")}: the adapter has no LoRA tensors of {Kinds(missing)} " +
                $"for {model} ({trains}); this adapter was trained with other targets or for another model");
        var listed = settings.TargetModules.ToHashSet(StringComparer.Ordinal);
        if (!listed.SetEquals(expected.TargetModules))
        {
            var more = settings.TargetModules.Where(t => !expected.TargetModules.Contains(t)).Distinct().ToList();
            var fewer = expected.TargetModules.Where(t => !listed.Contains(t)).ToList();
            throw new WeightsException(configPath,
                $"target_modules is [{string.Join(", ", settings.TargetModules)}] but {trains}" +
                (more.Count > 0 ? $"; {string.Join(", ", more)} {(more.Count > 1 ? "are" : "is")} not trained there" : "") +
                (fewer.Count > 0 ? $"; {string.Join(", ", fewer)} {(fewer.Count > 1 ? "are" : "is")} not listed" : ""));
        }

        // "q_proj, k_proj (in 3 layers)": the module kinds of tensor names, in the order first seen.
        static string Kinds(IEnumerable<string> names)
        {
            var kinds = names.GroupBy(Kind).Select(g =>
            {
                int layers = g.Select(n => n.Contains(".layers.", StringComparison.Ordinal) ? n.Split(".layers.")[1].Split('.')[0] : "").Distinct().Count();
                return layers > 1 ? $"{g.Key} (in {layers} layers)" : g.Key;
            });
            return string.Join(", ", kinds);
        }

        static string Kind(string name)
        {
            foreach (string suffix in (string[])[".lora_A.weight", ".lora_B.weight"])
                if (name.EndsWith(suffix, StringComparison.Ordinal))
                {
                    string module = name[..^suffix.Length];
                    return module[(module.LastIndexOf('.') + 1)..];
                }
            return name;
        }
    }

    static float[] ReadTensor(SafeTensorsFile file, string name, int[] shape)
    {
        var info = file.Info(name);
        if (!info.Shape.SequenceEqual(shape))
            throw new WeightsException(file.Path,
                $"tensor '{name}' has shape {WeightsException.Format(info.Shape)}, the adapter expects {WeightsException.Format(shape)}");
        var values = file.Read(name);
        long index = NonFinite.IndexOf(values);
        if (index >= 0)
            throw new WeightsException(file.Path,
                $"tensor '{name}' holds {NonFinite.Describe(values[index], index, shape)}; an adapter's values must be finite");
        return values;
    }

    /// <summary>The largest adapter config read; PEFT's are about 1 kB.</summary>
    const long MaxConfigBytes = 16 << 20;

    /// <summary>Reads PEFT's config and checks it describes plain LoRA with the expected rank and alpha.</summary>
    static LoraSettings ReadConfig(string path, LoraSettings expected)
    {
        byte[] bytes = WeightsException.ReadSmallJson(path, "adapter config", MaxConfigBytes, "malformed JSON");
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(bytes);
        }
        catch (JsonException e)
        {
            throw new WeightsException(path, $"malformed JSON: {e.Message}", e);
        }
        try
        {
            using (document)
                return ReadConfig(path, document.RootElement, expected);
        }
        catch (InvalidOperationException e)
        {
            // An escape that is not valid UTF-16 (a lone surrogate) in a string.
            throw new WeightsException(path, $"malformed JSON: {e.Message}", e);
        }
    }

    static LoraSettings ReadConfig(string path, JsonElement root, LoraSettings expected)
    {
        if (root.ValueKind != JsonValueKind.Object)
            throw new WeightsException(path, "expected a JSON object");
        if (root.TryGetProperty("peft_type", out var type) && (type.ValueKind != JsonValueKind.String || type.GetString() != "LORA"))
            throw new WeightsException(path, $"peft_type is {type}, expected LORA");
        if (!root.TryGetProperty("r", out var rElement) || rElement.ValueKind != JsonValueKind.Number || !rElement.TryGetInt32(out int r))
            throw new WeightsException(path, $"'r' is missing or not an integer{Found(rElement)}");
        if (!root.TryGetProperty("lora_alpha", out var alphaElement) || alphaElement.ValueKind != JsonValueKind.Number
            || !alphaElement.TryGetDouble(out double alphaValue) || !float.IsFinite((float)alphaValue))
            throw new WeightsException(path, $"'lora_alpha' is missing or not a finite number{Found(alphaElement)}");
        float alpha = (float)alphaValue;
        if (r != expected.R)
            throw new WeightsException(path, $"r is {r}, expected {expected.R}");
        if (alpha != expected.Alpha)
            throw new WeightsException(path, $"lora_alpha is {alpha}, expected {expected.Alpha}");
        foreach (string flag in (string[])["use_rslora", "use_dora", "fan_in_fan_out"])
        {
            if (root.TryGetProperty(flag, out var value) && value.ValueKind == JsonValueKind.True)
                throw new WeightsException(path, $"{flag} is true; only plain LoRA (scale alpha/r, A·B, no transpose) is supported");
        }
        foreach (string pattern in (string[])["rank_pattern", "alpha_pattern"])
        {
            if (root.TryGetProperty(pattern, out var value) && value.ValueKind == JsonValueKind.Object && value.EnumerateObject().Any())
                throw new WeightsException(path, $"{pattern} is not empty; per-module ranks and alphas are not supported");
        }
        string[] targets = expected.TargetModules;
        if (root.TryGetProperty("target_modules", out var targetsElement) && targetsElement.ValueKind == JsonValueKind.Array)
        {
            if (targetsElement.EnumerateArray().FirstOrDefault(e => e.ValueKind != JsonValueKind.String) is { ValueKind: not JsonValueKind.Undefined } bad)
                throw new WeightsException(path, $"'target_modules' must be an array of module names (strings); it holds {bad.ValueKind} {Truncate(bad.GetRawText())}");
            targets = targetsElement.EnumerateArray().Select(e => e.GetString()!).ToArray();
        }
        return new LoraSettings(r, alpha, targets);
    }

    /// <summary>" (found String \"8\")" for a message about a value of the wrong kind.</summary>
    static string Found(JsonElement element) => element.ValueKind switch
    {
        JsonValueKind.Undefined => "",
        _ => $" (found {element.ValueKind} {Truncate(element.GetRawText())})",
    };

    static string Truncate(string text) => text.Length <= 40 ? text : text[..40] + "…";
}
