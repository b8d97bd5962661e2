using System.Diagnostics;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Cli;

/// <summary>
/// <c>lora fuse</c>: the base model with the adapter folded in (<see cref="ModelFuser"/>), written as a
/// Hugging Face model folder: safetensors (sharded with an index past <c>--max-shard-size</c>), the base's
/// config.json (or the model JSON) without this project's sections, and the tokenizer files.
/// </summary>
public static class Fuse
{
    public const string Usage = """
          fuse --model NAME --weights PATH --adapter DIR --out DIR [--dtype bf16|f16|f32] [--max-shard-size 5GB]
                                                      fold the adapter into the base (W + alpha/r·B·A) and write a
                                                      Hugging Face model folder: safetensors (shards of at most the
                                                      size, with model.safetensors.index.json), config.json and the
                                                      tokenizer files; a 4-bit base is dequantized (default BF16)
        """;

    public static int Run(Args args)
    {
        var model = Commands.Model(args);
        string weightsPath = args.Required("weights");
        string adapterDir = args.Required("adapter");
        string outDir = args.Required("out");
        string dtype = FloatDtype(args.Get("dtype", "bf16"), "bf16|f16|f32", "BF16", "F16", "F32");
        long maxShardBytes = ShardSize(args.Get("max-shard-size", "5GB"));
        args.RejectUnknown();

        string sourceDir = Commands.FolderOf(weightsPath);
        if (Path.GetFullPath(outDir).TrimEnd('/') == Path.GetFullPath(sourceDir).TrimEnd('/'))
            throw new UsageException($"--out {outDir} is the base model's folder; write the fused model to another folder.");
        OutputFolder.Prepare(outDir, "--out");
        var watch = Stopwatch.StartNew();
        var adapter = Export.LoadWhole(adapterDir, model);
        ModelFuser.FusedModel fused;
        using (var source = ModelWeights.Open(weightsPath))
        {
            source.Validate(model.BaseTensors);
            Directory.CreateDirectory(outDir);
            fused = ModelFuser.Fuse(source, adapter, outDir, dtype, maxShardBytes, Console.WriteLine);
        }

        string config = Path.Combine(sourceDir, "config.json");
        if (File.Exists(config))
            ModelFuser.WriteConfig(File.ReadAllText(config), config, Path.Combine(outDir, "config.json"), dtype);
        else
            ModelFuser.WriteConfig(Commands.ModelJson(model), model.SourceFile, Path.Combine(outDir, "config.json"), dtype);
        var copied = ModelFuser.CopyModelFiles(sourceDir, outDir);
        using (var written = ModelWeights.Open(outDir))
            written.Validate(model.BaseTensors);

        int shards = fused.Files.Count(f => f.EndsWith(".safetensors", StringComparison.Ordinal));
        Console.WriteLine($"Wrote {outDir}: {fused.Tensors} tensors ({fused.FusedModules} with the adapter folded in), {fused.Dtype}, " +
                          $"{fused.TotalBytes / 1048576.0:F1} MiB in {shards} file{(shards > 1 ? "s" : "")}, " +
                          $"config.json {(File.Exists(config) ? "from the base" : $"from {model.SourceFile}")}" +
                          (copied.Count > 0 ? $", copied {string.Join(", ", copied)}" : "") + $" in {watch.Elapsed.TotalSeconds:F1} s.");
        return 0;
    }

    /// <summary><c>bf16</c>/<c>f16</c>/<c>f32</c> (any case) → the safetensors dtype, among those allowed.</summary>
    internal static string FloatDtype(string text, string choices, params string[] allowed)
    {
        string dtype = text.ToUpperInvariant();
        return allowed.Contains(dtype) ? dtype : throw new UsageException($"Unknown --dtype '{text}' (available: {choices}).");
    }

    private static long ShardSize(string text)
    {
        try
        {
            return ModelFuser.ParseSize(text);
        }
        catch (FormatException e)
        {
            throw new UsageException($"--max-shard-size: {e.Message}.");
        }
    }
}
