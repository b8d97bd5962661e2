using System.Runtime.InteropServices;

namespace LoraCompiler.Runtime.Weights;

/// <summary>
/// Writes a model in 4 bits (<see cref="Q4"/>'s layout), streaming: a tensor's float values are
/// produced a block of rows at a time, quantized and written, so neither the model nor a whole float
/// tensor is ever in memory (only one block, and the tensor's scales and biases, 1/16 of its packed size).
/// </summary>
public static class QuantizedModelWriter
{
    /// <summary>About this many float values are produced and quantized at a time.</summary>
    const int BlockElements = 1 << 20;

    /// <summary>
    /// One tensor to write. <see cref="Read"/> fills a destination with the float values that start at
    /// a flat element index; it is called with increasing, contiguous ranges. A tensor that is not
    /// quantized is written in <see cref="Dtype"/>, from <see cref="CopyRaw"/> (its bytes as they are)
    /// when given, else from <see cref="Read"/>. <see cref="Done"/>, when given, is called once the
    /// tensor is written (to let go of its source).
    /// </summary>
    public sealed record Source(string Name, int[] Shape, string Dtype, bool Quantize, Action<long, Span<float>> Read,
        Action<Stream>? CopyRaw = null, Action? Done = null)
    {
        public long Elements => Shape.Aggregate(1L, (n, d) => n * d);
    }

    /// <summary>
    /// Writes <paramref name="sources"/> to <paramref name="path"/>: each one to quantize as
    /// <c>P.weight</c> U32, <c>P.scales</c> F16, <c>P.biases</c> F16; the file's metadata gets
    /// <c>quantization</c> = <see cref="Q4.Metadata"/>. Throws <see cref="WeightsException"/>, naming the
    /// tensor, for a row length that is not a whole number of groups or values that cannot be quantized.
    /// </summary>
    public static void Write(string path, IReadOnlyList<Source> sources, int groupSize,
        IReadOnlyDictionary<string, string>? metadata = null, Action<string>? progress = null)
    {
        if (Q4.GroupSizeProblem(groupSize) is { } groupProblem)
            throw new ArgumentException(groupProblem, nameof(groupSize));
        var specs = new List<RawTensorSpec>();
        var sourceOf = new Dictionary<string, Source>(StringComparer.Ordinal);
        foreach (var source in sources)
        {
            if (source.Quantize)
            {
                if (source.Shape.Length != 2)
                    throw new WeightsException(path, $"tensor '{source.Name}' has shape {WeightsException.Format(source.Shape)}; only 2-D weights are quantized");
                if (Q4.RowProblem(source.Shape[1], groupSize) is { } problem)
                    throw new WeightsException(path, $"tensor '{source.Name}' {WeightsException.Format(source.Shape)} cannot be quantized: {problem}");
                int rows = source.Shape[0], groups = source.Shape[1] / groupSize;
                specs.Add(new RawTensorSpec(source.Name, "U32", [rows, source.Shape[1] / Q4.PerWord]));
                specs.Add(new RawTensorSpec(Q4.ScalesName(source.Name), "F16", [rows, groups]));
                specs.Add(new RawTensorSpec(Q4.BiasesName(source.Name), "F16", [rows, groups]));
            }
            else
            {
                if (source.CopyRaw is null)
                    SafeTensorsWriter.CheckFloatDtype(path, source.Dtype);
                specs.Add(new RawTensorSpec(source.Name, source.Dtype, source.Shape));
            }
            sourceOf[source.Name] = source;
        }

        var all = new Dictionary<string, string>(metadata ?? new Dictionary<string, string>(), StringComparer.Ordinal)
        {
            [Q4.MetadataKey] = Q4.Metadata(groupSize),
        };
        int index = 0;
        // The scales and biases of the tensor just packed, written right after its words.
        Half[] scales = [], biases = [];
        SafeTensorsWriter.WriteRaw(path, specs, (spec, stream) =>
        {
            if (sourceOf.TryGetValue(spec.Name, out var source))
            {
                progress?.Invoke($"[{++index}/{sources.Count}] {source.Name} {WeightsException.Format(source.Shape)}" + (source.Quantize ? " -> 4-bit" : $" {source.Dtype}"));
                if (source.Quantize)
                    (scales, biases) = WritePacked(path, stream, source, groupSize);
                else if (source.CopyRaw is not null)
                    source.CopyRaw(stream);
                else
                    WriteFloats(stream, source);
                source.Done?.Invoke();
            }
            else
            {
                // P.scales or P.biases of the tensor before.
                var values = spec.Name.EndsWith(".scales", StringComparison.Ordinal) ? scales : biases;
                stream.Write(MemoryMarshal.AsBytes(values.AsSpan()));
            }
        }, all);
    }

    static (Half[] Scales, Half[] Biases) WritePacked(string path, Stream stream, Source source, int groupSize)
    {
        int rows = source.Shape[0], columns = source.Shape[1], groups = columns / groupSize, words = columns / Q4.PerWord;
        var scales = new Half[(long)rows * groups];
        var biases = new Half[scales.Length];
        int blockRows = Math.Max(1, BlockElements / Math.Max(1, columns));
        var values = new float[(long)Math.Min(blockRows, rows) * columns];
        var packed = new uint[(long)Math.Min(blockRows, rows) * words];
        for (int r0 = 0; r0 < rows; r0 += blockRows)
        {
            int n = Math.Min(blockRows, rows - r0);
            var block = values.AsSpan(0, n * columns);
            source.Read((long)r0 * columns, block);
            try
            {
                Q4.Quantize(block, n, columns, groupSize, packed, scales.AsSpan(r0 * groups), biases.AsSpan(r0 * groups));
            }
            catch (ArgumentException e)
            {
                throw new WeightsException(path, $"tensor '{source.Name}' rows {r0}..{r0 + n}: {e.Message}", e);
            }
            stream.Write(MemoryMarshal.AsBytes(packed.AsSpan(0, n * words)));
        }
        return (scales, biases);
    }

    static void WriteFloats(Stream stream, Source source)
    {
        long elements = source.Elements;
        var values = new float[Math.Min(BlockElements, elements)];
        for (long start = 0; start < elements; start += values.Length)
        {
            var block = values.AsSpan(0, (int)Math.Min(values.Length, elements - start));
            source.Read(start, block);
            SafeTensorsWriter.WriteFloats(stream, block, source.Dtype);
        }
    }

    /// <summary>
    /// Quantizes a model as the <c>quantize</c> command does: every tensor of <paramref name="source"/>
    /// in its order in the files, those <see cref="Q4.IsQuantizable"/> names in 4 bits, the rest copied
    /// byte for byte in their own dtype. Each source tensor's pages are released once it is written,
    /// so resident memory stays near one tensor's worth whatever the model's size.
    /// </summary>
    public static void Quantize(ModelWeights source, string path, int groupSize, Action<string>? progress = null)
    {
        var sources = new List<Source>();
        foreach (var name in source.Names.OrderBy(n => source.FileOf(n), StringComparer.Ordinal).ThenBy(n => source.Info(n).Offset))
        {
            var info = source.Info(name);
            if (info.Dtype == "U32")
                throw new WeightsException(source.FileOf(name), $"tensor '{name}' is already quantized");
            bool quantize = Q4.IsQuantizable(name, info.Shape);
            if (quantize && !Dtypes.IsReadable(info.Dtype))
                throw new WeightsException(source.FileOf(name), $"unsupported dtype {info.Dtype} for tensor '{name}' (supported: {Dtypes.Readable})");
            string n = name;
            sources.Add(new Source(name, info.Shape, info.Dtype, quantize,
                Read: (start, destination) =>
                {
                    source.ReadRange(n, start, destination);
                    source.ReleasePages(n, start, destination.Length);
                },
                CopyRaw: quantize ? null : stream =>
                {
                    source.CheckValues(n); // a NaN norm copied as it is would only fail when the quantized model is used
                    stream.Write(source.Bytes(n));
                },
                Done: () => source.ReleasePages(n))); // the source's pages leave memory as it goes
        }
        Write(path, sources, groupSize, new Dictionary<string, string> { ["format"] = "mlx" }, progress);
    }
}
