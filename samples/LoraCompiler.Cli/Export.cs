using System.Text.Json;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Cli;

/// <summary>
/// <c>lora export</c>: a PEFT adapter in another runtime's format: a GGUF LoRA file for llama.cpp
/// (<see cref="GgufAdapter"/>) or an mlx-lm adapter folder (<see cref="MlxAdapter"/>).
/// </summary>
public static class Export
{
    public const string Usage = """
          export --model NAME --adapter DIR --format gguf|mlx --out PATH [--base-model ID] [--weights PATH] [--dtype f32|f16]
                                                      the adapter for another runtime: gguf writes a LoRA file that
                                                      llama.cpp loads with --lora; mlx writes an mlx-lm adapter folder
                                                      (adapters.safetensors, adapter_config.json). The base model is
                                                      --base-model, else _name_or_path in the config.json of --weights
        """;

    public static int Run(Args args)
    {
        var model = Commands.Model(args);
        string adapterDir = args.Required("adapter");
        string format = args.Required("format").ToLowerInvariant();
        string outPath = args.Required("out");
        string? baseModel = args.Optional("base-model");
        string? weightsPath = args.Optional("weights");
        string dtype = Fuse.FloatDtype(args.Get("dtype", "f32"), "f32|f16", "F32", "F16");
        args.RejectUnknown();
        if (format is not ("gguf" or "mlx"))
            throw new UsageException($"Unknown --format '{format}' (available: gguf, mlx).");
        if (format == "gguf" && GgufAdapter.ArchitectureName(model.Architecture) is null)
            throw new UsageException($"{model.Name} is {model.Architecture}, which has no llama.cpp architecture this exporter knows.");

        var adapter = LoadWhole(adapterDir, model);
        string baseId = BaseModelId(baseModel, weightsPath, adapterDir, model);
        if (format == "gguf")
        {
            string path = Directory.Exists(outPath) ? Path.Combine(outPath, "adapter.gguf") : outPath;
            if (Path.GetDirectoryName(Path.GetFullPath(path)) is { } parent)
                Directory.CreateDirectory(parent);
            string name = Path.GetFileName(Path.GetFullPath(adapterDir).TrimEnd('/'));
            GgufAdapter.Write(adapter, model, path, name, baseId, dtype == "F16" ? GgmlType.F16 : GgmlType.F32);
            Console.WriteLine($"Wrote {path}: {adapter.Modules.Count * 2} LoRA tensors ({dtype}) for llama.cpp's " +
                              $"{GgufAdapter.ArchitectureName(model.Architecture)}, r={adapter.Settings.R}, alpha={adapter.Settings.Alpha}, base {baseId}.");
        }
        else
        {
            MlxAdapter.Write(adapter, model.Layers, outPath, baseId, dtype);
            Console.WriteLine($"Wrote {Path.Combine(outPath, MlxAdapter.WeightsFileName)} and {MlxAdapter.ConfigFileName}: " +
                              $"{adapter.Modules.Count * 2} LoRA tensors ({dtype}), rank {adapter.Settings.R}, scale {adapter.Settings.Scale}, base {baseId}.");
        }
        return 0;
    }

    /// <summary>
    /// The PEFT adapter for the model, whole: <see cref="LoraAdapter.Load"/> checks its rank, alpha and
    /// that it adapts exactly the model's modules (refusing the tensors of any other, which would be
    /// lost), with the model's name in its messages.
    /// </summary>
    internal static LoraAdapter LoadWhole(string adapterDir, ModelInfo model) =>
        LoraAdapter.Load(adapterDir, model.Lora, model.LoraModules, model.Name);

    /// <summary>
    /// The base model an exported adapter names: <c>--base-model</c>; else <c>_name_or_path</c> in the
    /// config.json of the <c>--weights</c> folder; else the PEFT adapter's <c>base_model_name_or_path</c>; else
    /// the model JSON's name.
    /// </summary>
    internal static string BaseModelId(string? explicitId, string? weightsPath, string? adapterDir, ModelInfo model)
    {
        if (!string.IsNullOrWhiteSpace(explicitId))
            return explicitId;
        if (weightsPath is not null && StringEntry(Path.Combine(Commands.FolderOf(weightsPath), "config.json"), "_name_or_path") is { } name)
            return name;
        return (adapterDir is null ? null : StringEntry(Path.Combine(adapterDir, LoraAdapter.ConfigFileName), "base_model_name_or_path")) ?? model.Name;
    }

    /// <summary>A non-empty string entry of a JSON file's top object; null when the file, the entry or the string is missing.</summary>
    private static string? StringEntry(string path, string key)
    {
        if (!File.Exists(path))
            return null;
        try
        {
            using var document = JsonDocument.Parse(File.ReadAllBytes(path));
            return document.RootElement.ValueKind == JsonValueKind.Object
                   && document.RootElement.TryGetProperty(key, out var value)
                   && value.ValueKind == JsonValueKind.String && !string.IsNullOrWhiteSpace(value.GetString())
                ? value.GetString()
                : null;
        }
        catch (JsonException e)
        {
            throw new WeightsException(path, $"malformed JSON: {e.Message}", e);
        }
    }
}
