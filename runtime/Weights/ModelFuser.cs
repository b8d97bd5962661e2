using System.Globalization;
using System.Numerics.Tensors;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Runtime.Weights;

/// <summary>
/// Folds a LoRA adapter into its base model and writes the result as a Hugging Face model folder:
/// <c>W' = W + (alpha/r)·B·A</c> for every adapted projection (PEFT's A [r, in], B [out, r]), every
/// other tensor copied, all in one float dtype (BF16 by default). A 4-bit base (MLX's affine layout) is
/// dequantized first, so the result is the dequantized weight plus the delta, never quantized again.
/// <para>
/// Streaming, as <see cref="QuantizedModelWriter"/>: a tensor is read, fused and written a block of
/// rows at a time, and the source's pages are released once it is written, so neither the model nor
/// (beyond one block) a whole tensor is ever in memory. Large models are sharded as
/// <c>save_pretrained</c> shards them: tensors in order, a new shard when the next tensor would take the
/// current one past the maximum shard size, files <c>model-00001-of-00003.safetensors</c> and
/// <c>model.safetensors.index.json</c> (<c>{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}</c>);
/// a model that fits one shard is a single <c>model.safetensors</c>. Every file is written atomically.
/// </para>
/// </summary>
public static partial class ModelFuser
{
    /// <summary>save_pretrained's default <c>max_shard_size="5GB"</c> (Hugging Face counts GB as 10⁹ bytes).</summary>
    public const long DefaultMaxShardBytes = 5_000_000_000;

    /// <summary>The model folder's files besides weights and config that a fused model keeps (those that exist are copied).</summary>
    public static readonly IReadOnlyList<string> ModelFiles =
    [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
        "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    ];

    /// <summary>config.json entries that describe a trainer or a quantized checkpoint, not the fused model.</summary>
    static readonly string[] DroppedConfigEntries = ["lora", "trainer", Q4.MetadataKey];

    /// <summary>About this many float values are read, fused and written at a time.</summary>
    const int BlockElements = 1 << 20;

    /// <summary>What <see cref="Fuse"/> wrote: the weight files (shards, then the index when sharded), in order.</summary>
    public sealed record FusedModel(IReadOnlyList<string> Files, int Tensors, int FusedModules, long TotalBytes, string Dtype);

    /// <summary>One tensor of the output: its source, its shape, and the LoRA module folded into it (if any).</summary>
    sealed record Planned(string Name, int[] Shape, string Dtype, LoraModule? Lora)
    {
        public long Elements => Shape.Aggregate(1L, (n, d) => n * d);
        public long ByteLength => Elements * (Dtypes.ElementSize(Dtype) ?? 1);
    }

    /// <summary>
    /// Writes <paramref name="source"/> with <paramref name="adapter"/> folded in to <paramref name="outDir"/>
    /// (which must exist) as <paramref name="dtype"/> (F32, F16 or BF16) safetensors, sharded at
    /// <paramref name="maxShardBytes"/>. Tensors keep the source's order; 4-bit tensors are written
    /// dequantized under their own name (their <c>.scales</c> and <c>.biases</c> are not written), tensors
    /// of a dtype that is not a float (rare) are copied as they are. Weight files a previous model left in
    /// the folder under the names this writes (<c>model.safetensors</c>, shards, the index) are removed
    /// once the new ones are complete, so the folder never holds two models. Throws
    /// <see cref="WeightsException"/> when an adapted module's weight is missing or of another shape.
    /// </summary>
    public static FusedModel Fuse(ModelWeights source, LoraAdapter adapter, string outDir, string dtype = "BF16",
        long maxShardBytes = DefaultMaxShardBytes, Action<string>? progress = null)
    {
        SafeTensorsWriter.CheckFloatDtype(outDir, dtype);
        if (maxShardBytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(maxShardBytes), maxShardBytes, "the maximum shard size must be positive");
        if (!Directory.Exists(outDir))
            throw new WeightsException(outDir, "output folder does not exist");

        // Every adapted module's weight must be there, [out, in] (a 4-bit one in its logical shape).
        source.Validate(adapter.Modules.Select(m => new TensorSpec(WeightName(m.Spec), [m.Spec.Out, m.Spec.In])));
        var loraOf = adapter.Modules.ToDictionary(m => WeightName(m.Spec), StringComparer.Ordinal);

        var plan = Plan(source, loraOf, dtype);
        var shards = Shard(plan, maxShardBytes);
        var files = new List<string>();
        var weightMap = new SortedDictionary<string, string>(StringComparer.Ordinal);
        float scale = adapter.Settings.Scale;
        int index = 0;
        for (int s = 0; s < shards.Count; s++)
        {
            string file = shards.Count == 1 ? ModelWeights.SingleFileName : ShardName(s + 1, shards.Count);
            string path = Path.Combine(outDir, file);
            var shard = shards[s];
            if (shards.Count > 1)
                progress?.Invoke($"{file}: {shard.Count} tensors, {shard.Sum(t => t.ByteLength) / 1048576.0:F1} MiB");
            var byName = shard.ToDictionary(t => t.Name, StringComparer.Ordinal);
            SafeTensorsWriter.WriteRaw(path, shard.Select(t => new RawTensorSpec(t.Name, t.Dtype, t.Shape)).ToList(), (spec, stream) =>
            {
                var tensor = byName[spec.Name];
                progress?.Invoke($"[{++index}/{plan.Count}] {tensor.Name} {WeightsException.Format(tensor.Shape)}" +
                                 (source.IsQuantized(tensor.Name) ? " 4-bit, dequantized" : "") +
                                 (tensor.Lora is not null ? $" + LoRA (r={adapter.Settings.R}, scale {scale.ToString(CultureInfo.InvariantCulture)})" : "") +
                                 $" -> {tensor.Dtype}");
                WriteTensor(source, tensor, adapter.Settings.R, scale, stream);
                source.ReleasePages(tensor.Name); // the source's pages leave memory as it goes
            }, new Dictionary<string, string> { ["format"] = "pt" });
            files.Add(path);
            foreach (var t in shard)
                weightMap[t.Name] = file;
        }

        long totalBytes = plan.Sum(t => t.ByteLength);
        if (shards.Count > 1)
        {
            string indexPath = Path.Combine(outDir, ModelWeights.IndexFileName);
            AtomicFile.Write(indexPath, stream =>
            {
                using var json = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true });
                json.WriteStartObject();
                json.WriteStartObject("metadata");
                json.WriteNumber("total_size", totalBytes);
                json.WriteEndObject();
                json.WriteStartObject("weight_map");
                foreach (var (name, file) in weightMap)
                    json.WriteString(name, file);
                json.WriteEndObject();
                json.WriteEndObject();
            });
            files.Add(indexPath);
        }
        RemoveStaleWeights(outDir, files);
        return new FusedModel(files, plan.Count, plan.Count(t => t.Lora is not null), totalBytes, dtype);
    }

    /// <summary>The base weight a LoRA module adapts: <c>{module}.weight</c>.</summary>
    public static string WeightName(LoraModuleSpec spec) => spec.Module + ".weight";

    /// <summary>save_pretrained's shard file name: <c>model-00002-of-00005.safetensors</c>.</summary>
    public static string ShardName(int shard, int count) =>
        string.Create(CultureInfo.InvariantCulture, $"model-{shard:D5}-of-{count:D5}.safetensors");

    /// <summary>A size as save_pretrained's <c>max_shard_size</c> takes it (<see cref="ByteSize.Parse"/>: 5GB, 500MB, 2MiB or bytes).</summary>
    public static long ParseSize(string text) => ByteSize.Parse(text);

    /// <summary>
    /// The fused model's config.json from the base's (or the model JSON): without the <c>lora</c> and
    /// <c>trainer</c> sections this project adds, without MLX's <c>quantization</c> entry (and its
    /// <c>quantization_config</c> copy, one without a <c>quant_method</c>), and with <c>torch_dtype</c> (and
    /// <c>dtype</c>, where the config has it) naming the written dtype. Written atomically;
    /// <paramref name="sourceName"/> (the file the JSON came from) names it in errors.
    /// </summary>
    public static void WriteConfig(string configJson, string sourceName, string path, string dtype)
    {
        JsonNode? parsed;
        try
        {
            parsed = JsonNode.Parse(configJson, documentOptions: new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
        }
        catch (JsonException e)
        {
            throw new WeightsException(sourceName, $"malformed JSON: {e.Message}", e);
        }
        if (parsed is not JsonObject config)
            throw new WeightsException(sourceName, "the model's config is not a JSON object");
        foreach (string entry in DroppedConfigEntries)
            config.Remove(entry);
        if (config["quantization_config"] is JsonObject quantization && !quantization.ContainsKey("quant_method"))
            config.Remove("quantization_config");
        string torchDtype = dtype switch { "F32" => "float32", "F16" => "float16", _ => "bfloat16" };
        config["torch_dtype"] = torchDtype;
        if (config.ContainsKey("dtype"))
            config["dtype"] = torchDtype;
        AtomicFile.WriteAllText(path, config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }

    /// <summary>
    /// Copies those of <see cref="ModelFiles"/> that <paramref name="sourceDir"/> holds into
    /// <paramref name="outDir"/>, each atomically; returns the names copied.
    /// </summary>
    public static IReadOnlyList<string> CopyModelFiles(string sourceDir, string outDir)
    {
        var copied = new List<string>();
        foreach (string file in ModelFiles)
        {
            string from = Path.Combine(sourceDir, file), to = Path.Combine(outDir, file);
            if (!File.Exists(from) || Path.GetFullPath(from) == Path.GetFullPath(to))
                continue;
            AtomicFile.Write(to, stream =>
            {
                using var input = File.OpenRead(from);
                input.CopyTo(stream);
            });
            copied.Add(file);
        }
        return copied;
    }

    /// <summary>The output tensors in the source's order (file, then offset): 4-bit companions folded into their weight.</summary>
    static List<Planned> Plan(ModelWeights source, Dictionary<string, LoraModule> loraOf, string dtype)
    {
        var companions = new HashSet<string>(StringComparer.Ordinal);
        foreach (string name in source.Names)
            if (source.IsQuantized(name))
            {
                companions.Add(Q4.ScalesName(name));
                companions.Add(Q4.BiasesName(name));
            }
        var plan = new List<Planned>();
        foreach (string name in source.Names.OrderBy(n => source.FileOf(n), StringComparer.Ordinal).ThenBy(n => source.Info(n).Offset))
        {
            if (companions.Contains(name))
                continue;
            var info = source.Info(name);
            bool quantized = source.IsQuantized(name);
            if (quantized)
                source.MapQ4(name); // checks the packed data, scales, biases and metadata, naming the file
            // A float (or 4-bit) tensor is written in the output dtype; anything else as it is.
            string outDtype = quantized || Dtypes.IsReadable(info.Dtype) ? dtype : info.Dtype;
            plan.Add(new Planned(name, source.Shape(name), outDtype, loraOf.GetValueOrDefault(name)));
        }
        return plan;
    }

    /// <summary>save_pretrained's sharding: in order, a new shard when the next tensor would pass the limit (a tensor larger than it gets a shard of its own).</summary>
    static List<List<Planned>> Shard(List<Planned> plan, long maxShardBytes)
    {
        var shards = new List<List<Planned>> { new() };
        long size = 0;
        foreach (var tensor in plan)
        {
            if (shards[^1].Count > 0 && size + tensor.ByteLength > maxShardBytes)
            {
                shards.Add([]);
                size = 0;
            }
            shards[^1].Add(tensor);
            size += tensor.ByteLength;
        }
        return shards;
    }

    /// <summary>One tensor's bytes: copied as they are (a non-float dtype), or read as float32 a block of rows at a time, fused and converted.</summary>
    static void WriteTensor(ModelWeights source, Planned tensor, int rank, float scale, Stream stream)
    {
        bool quantized = source.IsQuantized(tensor.Name);
        if (!quantized && !Dtypes.IsReadable(source.Info(tensor.Name).Dtype))
        {
            stream.Write(source.Bytes(tensor.Name));
            return;
        }
        // Rows of a 2-D tensor (a LoRA module's or a 4-bit one's rows are needed whole); other shapes as one flat row.
        long columns = tensor.Shape.Length == 2 ? tensor.Shape[1] : tensor.Elements;
        long rows = tensor.Shape.Length == 2 ? tensor.Shape[0] : 1;
        var q4 = quantized ? source.MapQ4(tensor.Name) : null;
        float[]? scaledB = null;
        if (tensor.Lora is { } lora)
        {
            scaledB = new float[lora.B.Length];
            TensorPrimitives.Multiply(lora.B, scale, scaledB);
        }

        if (rows == 1 && q4 is null && scaledB is null)
        {
            // A flat tensor (a norm, a bias, or anything not 2-D): blocks of elements.
            var buffer = new float[Math.Min(BlockElements, Math.Max(1, columns))];
            for (long start = 0; start < columns; start += buffer.Length)
            {
                var block = buffer.AsSpan(0, (int)Math.Min(buffer.Length, columns - start));
                source.ReadRange(tensor.Name, start, block);
                source.ReleasePages(tensor.Name, start, block.Length);
                SafeTensorsWriter.WriteFloats(stream, block, tensor.Dtype);
            }
            return;
        }

        int width = checked((int)columns);
        int blockRows = (int)Math.Min(rows, Math.Max(1, BlockElements / Math.Max(1, width)));
        var values = new float[(long)blockRows * width];
        for (long r0 = 0; r0 < rows; r0 += blockRows)
        {
            int n = (int)Math.Min(blockRows, rows - r0);
            var block = values.AsSpan(0, n * width);
            if (q4 is not null)
            {
                for (int i = 0; i < n; i++)
                    q4.DequantizeRow((int)(r0 + i), block.Slice(i * width, width));
            }
            else
            {
                source.ReadRange(tensor.Name, r0 * width, block);
                source.ReleasePages(tensor.Name, r0 * width, block.Length);
            }
            if (scaledB is not null)
            {
                // Row o of s·B·A: Σ_k (s·B[o, k])·A[k, :], added to row o of W.
                var a = tensor.Lora!.A;
                for (int i = 0; i < n; i++)
                {
                    var row = block.Slice(i * width, width);
                    long o = r0 + i;
                    for (int k = 0; k < rank; k++)
                        TensorPrimitives.MultiplyAdd(a.AsSpan(k * width, width), scaledB[o * rank + k], row, row);
                }
            }
            SafeTensorsWriter.WriteFloats(stream, block, tensor.Dtype);
        }
    }

    /// <summary>Removes weight files under save_pretrained's names that are not among <paramref name="keep"/> (a previous model's).</summary>
    static void RemoveStaleWeights(string outDir, IReadOnlyList<string> keep)
    {
        var kept = new HashSet<string>(keep.Select(Path.GetFullPath), StringComparer.Ordinal);
        var candidates = Directory.EnumerateFiles(outDir, "model-*-of-*.safetensors")
            .Where(f => ShardPattern().IsMatch(Path.GetFileName(f)))
            .Append(Path.Combine(outDir, ModelWeights.SingleFileName))
            .Append(Path.Combine(outDir, ModelWeights.IndexFileName));
        foreach (string file in candidates)
            if (File.Exists(file) && !kept.Contains(Path.GetFullPath(file)))
                File.Delete(file);
    }

    [GeneratedRegex(@"^model-[0-9]+-of-[0-9]+\.safetensors$")]
    private static partial Regex ShardPattern();
}
