using System.Text.Json;

namespace LoraCompiler.Runtime.Weights;

/// <summary>
/// A model's base weights as a user brings them: one <c>.safetensors</c> file, a folder holding
/// <c>model.safetensors</c>, or a folder holding <c>model.safetensors.index.json</c>
/// (<c>{"weight_map": {name: shard}}</c>) and its shards. Every file is memory-mapped, so opening is
/// cheap and a tensor's bytes are only touched when it is read.
/// <para>
/// What is checked: every file's header when it is opened (<see cref="SafeTensorsFile"/>); an index's
/// shard names before any shard is opened (a regular file inside the model folder, symbolic links
/// resolved; no absolute path, no <c>..</c>; Hugging Face's cache layout, a snapshot folder whose files
/// link to its repository's <c>blobs</c> folder, is allowed), each tensor in one shard only; the first
/// time a tensor's values are used (mapped or read), that they are all finite, once per tensor; and
/// each time, that its file still has the size it had when it was mapped.
/// </para>
/// </summary>
public sealed class ModelWeights : IDisposable
{
    public const string SingleFileName = "model.safetensors";
    public const string IndexFileName = "model.safetensors.index.json";

    /// <summary>The largest index file read (Hugging Face's are around 100 kB).</summary>
    const long MaxIndexBytes = 100_000_000;

    readonly string _path;
    readonly List<SafeTensorsFile> _files;
    readonly Dictionary<string, SafeTensorsFile> _fileOf;
    /// <summary>Tensors whose values were found finite, so they are not scanned again.</summary>
    readonly HashSet<string> _finite = new(StringComparer.Ordinal);
    /// <summary>4-bit tensors already checked by <see cref="CheckQ4"/>, with their layout.</summary>
    readonly Dictionary<string, Q4Layout> _q4 = new(StringComparer.Ordinal);

    ModelWeights(string path, List<SafeTensorsFile> files, Dictionary<string, SafeTensorsFile> fileOf)
    {
        _path = path;
        _files = files;
        _fileOf = fileOf;
    }

    /// <summary>Every tensor name, across all shards.</summary>
    public IReadOnlyCollection<string> Names => _fileOf.Keys;

    /// <summary>Opens a file or folder (see the class summary); throws <see cref="WeightsException"/> when there is nothing to open.</summary>
    public static ModelWeights Open(string path)
    {
        if (File.Exists(path))
            return path.EndsWith(".index.json", StringComparison.OrdinalIgnoreCase) ? OpenIndex(path) : OpenSingle(path);
        if (!Directory.Exists(path))
            throw new WeightsException(path, "no such file or folder");
        string single = System.IO.Path.Combine(path, SingleFileName);
        if (File.Exists(single))
            return OpenSingle(single);
        string index = System.IO.Path.Combine(path, IndexFileName);
        if (File.Exists(index))
            return OpenIndex(index);
        throw new WeightsException(path, $"folder holds neither {SingleFileName} nor {IndexFileName}");
    }

    /// <summary>True when the model has a tensor named <paramref name="name"/>.</summary>
    public bool Contains(string name) => _fileOf.ContainsKey(name);

    /// <summary>The header entry of <paramref name="name"/>: dtype, shape and byte range.</summary>
    public SafeTensorInfo Info(string name) => Holder(name).Info(name);

    /// <summary>
    /// The shape of <paramref name="name"/> as the model uses it: as stored, except that a 4-bit
    /// tensor (U32 [out, in/8]) has its logical shape [out, in].
    /// </summary>
    public int[] Shape(string name)
    {
        var info = Info(name);
        if (!IsQuantized(name) || info.Shape.Length != 2)
            return info.Shape;
        if ((long)info.Shape[1] * Q4.PerWord > int.MaxValue)
            throw new WeightsException(FileOf(name), $"tensor '{name}' is 4-bit packed U32 {WeightsException.Format(info.Shape)}: rows of {(long)info.Shape[1] * Q4.PerWord} elements are too many");
        return [info.Shape[0], info.Shape[1] * Q4.PerWord];
    }

    /// <summary>
    /// True when <paramref name="name"/> is stored as 4-bit packed words (dtype U32, MLX's affine
    /// layout, with <c>.scales</c> and <c>.biases</c> beside it); <see cref="MapQ4"/> uses it in place and
    /// <see cref="Read(string, Span{float})"/> dequantizes it.
    /// </summary>
    public bool IsQuantized(string name) => Info(name).Dtype == "U32";

    /// <summary>The path of the file (shard) that holds <paramref name="name"/>.</summary>
    public string FileOf(string name) => Holder(name).Path;

    /// <summary>
    /// Reads <paramref name="name"/> as float32; <paramref name="destination"/> must hold exactly its
    /// elements. A 4-bit tensor is dequantized (scale·q + bias per group).
    /// </summary>
    public void Read(string name, Span<float> destination)
    {
        if (!IsQuantized(name))
        {
            CheckUse(name);
            Holder(name).Read(name, destination);
            return;
        }
        var q4 = MapQ4(name);
        if (destination.Length != (long)q4.Rows * q4.Columns)
            throw new ArgumentException(
                $"{FileOf(name)}: tensor '{name}' has {(long)q4.Rows * q4.Columns} elements [{q4.Rows}, {q4.Columns}] (4-bit) but the destination holds {destination.Length}",
                nameof(destination));
        q4.Dequantize(destination);
    }

    /// <summary>Reads <paramref name="name"/> into a new float32 array (a 4-bit tensor dequantized).</summary>
    public float[] Read(string name)
    {
        if (!IsQuantized(name))
        {
            CheckUse(name);
            return Holder(name).Read(name);
        }
        var q4 = MapQ4(name);
        long elements = (long)q4.Rows * q4.Columns;
        if (elements > Array.MaxLength)
            throw new WeightsException(FileOf(name), $"tensor '{name}' has {elements} elements, more than one array can hold");
        var values = new float[elements];
        q4.Dequantize(values);
        return values;
    }

    /// <summary>
    /// Elements [start, start + destination.Length) of a float tensor (F32, F16 or BF16, flattened
    /// row-major) as float32: a large tensor read a block at a time. Throws <see cref="WeightsException"/>
    /// when the block holds a value that is not finite, or the file changed size since it was mapped.
    /// </summary>
    public void ReadRange(string name, long start, Span<float> destination)
    {
        var file = Holder(name);
        file.CheckLength();
        file.Read(name, start, destination);
        long index = NonFinite.IndexOf(destination);
        if (index >= 0)
            throw new WeightsException(file.Path,
                $"tensor '{name}' holds {NonFinite.Describe(destination[(int)index], start + index, file.Info(name).Shape)}; weights must be finite");
    }

    /// <summary>
    /// Lets the pages of a tensor (and, for a 4-bit one, of its scales and biases) leave memory
    /// (madvise DONTNEED): they are read again from the file if touched. For a caller that has read
    /// a tensor once and is done with it.
    /// </summary>
    public unsafe void ReleasePages(string name)
    {
        var names = IsQuantized(name) && Contains(Q4.ScalesName(name)) && Contains(Q4.BiasesName(name))
            ? new[] { name, Q4.ScalesName(name), Q4.BiasesName(name) } : [name];
        foreach (var n in names)
            IO.Posix.DontNeed(Holder(n).Data(n), Info(n).ByteLength);
    }

    /// <summary>As <see cref="ReleasePages(string)"/> for elements [start, start + count) of a float tensor (whole pages inside the range).</summary>
    public unsafe void ReleasePages(string name, long start, long count)
    {
        var info = Info(name);
        long size = Dtypes.ElementSize(info.Dtype) ?? 1;
        if (start < 0 || count < 0 || start > info.Elements - count)
            throw new ArgumentOutOfRangeException(nameof(start), $"elements {start}..{start + count} are outside tensor '{name}' of {info.Elements} elements");
        IO.Posix.DontNeed(Holder(name).Data(name) + start * size, count * size);
    }

    /// <summary>A tensor's bytes as stored, in place in the read-only mapping.</summary>
    public ReadOnlySpan<byte> Bytes(string name) => Holder(name).Bytes(name);

    /// <summary>
    /// A 4-bit tensor in place: its packed words, scales and biases as memory of the read-only file
    /// mappings (valid while this object is open; never write to it). Throws
    /// <see cref="WeightsException"/>, naming the tensor and the file, when the packed data, the scales
    /// or the biases are missing or of the wrong dtype or shape, or when the file's
    /// <c>quantization</c> metadata says something else (bits other than 4, another group size or mode).
    /// </summary>
    public unsafe Q4Weight MapQ4(string name)
    {
        Q4Layout layout;
        lock (_q4)
        {
            if (!_q4.TryGetValue(name, out layout))
                _q4[name] = layout = CheckQ4(name, expected: null);
        }
        CheckUse(Q4.ScalesName(name));
        CheckUse(Q4.BiasesName(name));
        Holder(name).CheckLength();
        return new Q4Weight(name, layout.Rows, layout.Columns, layout.GroupSize,
            Map<uint>(name, (long)layout.Rows * (layout.Columns / Q4.PerWord)),
            Map<Half>(Q4.ScalesName(name), (long)layout.Rows * layout.Groups),
            Map<Half>(Q4.BiasesName(name), (long)layout.Rows * layout.Groups));
    }

    /// <summary>
    /// An F32 tensor in place, as memory of the read-only file mapping (valid while this object is
    /// open; never write to it); null when the tensor is stored in another dtype.
    /// </summary>
    public unsafe Memory<float>? MapF32(string name)
    {
        CheckUse(name);
        float* data = Holder(name).F32Data(name);
        // Not a conditional expression: its null would convert to Memory<float> (through float[]) and come back empty, not null.
        if (data is null)
            return null;
        return new IO.UnmanagedMemory<float>(data, checked((int)Info(name).Elements)).Memory;
    }

    /// <summary>
    /// An F16 or BF16 tensor as stored: its bits in place in the read-only file mapping (valid while
    /// this object is open; never write to it), or a copy of them when the data is not aligned to 2
    /// bytes (then <see cref="Float16Weight.IsFileMapped"/> is false). Null for another dtype. A
    /// vector is one row; more than two dimensions fold into rows. Checked as every use is: the file
    /// still has its size and, the first time, every value is finite.
    /// </summary>
    public unsafe Float16Weight? MapFloat16(string name)
    {
        var info = Info(name);
        if (Float16Weight.FormatOf(info.Dtype) is not Float16Format format)
            return null;
        CheckUse(name);
        int[] shape = info.Shape;
        long columns = shape.Length == 0 ? 1 : shape[^1];
        long rows = columns == 0 ? 0 : info.Elements / columns;
        if (rows > int.MaxValue)
            throw new WeightsException(FileOf(name), $"tensor '{name}' {WeightsException.Format(shape)} has {rows} rows, more than the kernels index");
        bool aligned = (nuint)Holder(name).Data(name) % sizeof(ushort) == 0;
        return new Float16Weight(name, format, (int)rows, (int)columns, Map<ushort>(name, info.Elements)) { IsFileMapped = aligned };
    }

    /// <summary>
    /// Checks that every expected tensor is present with the expected shape and a dtype this runtime
    /// reads; throws <see cref="WeightsException"/> for the first that is not. Extra tensors are fine
    /// (for example <c>lm_head.weight</c> in a model with tied embeddings). A 2-D tensor [out, in] may
    /// be stored in 4 bits: packed U32 [out, in/8] with F16 scales and biases [out, in/groupSize].
    /// </summary>
    public void Validate(IEnumerable<TensorSpec> expected)
    {
        foreach (var spec in expected)
        {
            if (!_fileOf.TryGetValue(spec.Name, out var file))
                throw new WeightsException(_path, $"tensor '{spec.Name}' is missing (the config expects {WeightsException.Format(spec.Shape)})");
            var info = file.Info(spec.Name);
            if (info.Dtype == "U32")
            {
                CheckQ4(spec.Name, spec.Shape);
                continue;
            }
            if (!info.Shape.SequenceEqual(spec.Shape))
                throw new WeightsException(file.Path,
                    $"tensor '{spec.Name}' has shape {WeightsException.Format(info.Shape)}, the config expects {WeightsException.Format(spec.Shape)}");
            if (!Dtypes.IsReadable(info.Dtype))
                throw new WeightsException(file.Path, $"unsupported dtype {info.Dtype} for tensor '{spec.Name}' (supported: {Dtypes.Readable})");
        }
    }

    public void Dispose()
    {
        foreach (var file in _files)
            file.Dispose();
    }

    /// <summary>A 4-bit tensor's dimensions, from its packed data and scales.</summary>
    readonly record struct Q4Layout(int Rows, int Columns, int Groups, int GroupSize);

    /// <summary>
    /// Checks a 4-bit tensor: packed U32 [out, in/8], F16 scales and biases [out, groups] with in a
    /// whole number of groups of a multiple of 8, consistent with the file's metadata and, when
    /// given, with the logical shape the config expects.
    /// </summary>
    Q4Layout CheckQ4(string name, int[]? expected)
    {
        var file = Holder(name);
        var info = file.Info(name);
        string expects = expected is null ? "" : $", the config expects {WeightsException.Format(expected)}";
        if (info.Dtype != "U32" || info.Shape.Length != 2)
            throw new WeightsException(file.Path,
                $"tensor '{name}' is {info.Dtype} {WeightsException.Format(info.Shape)}, not 4-bit packed data (U32 [out, in/8]){expects}");
        int rows = info.Shape[0];
        long columnsLong = (long)info.Shape[1] * Q4.PerWord;
        if (expected is not null && (expected.Length != 2 || expected[0] != rows || expected[1] != columnsLong))
            throw new WeightsException(file.Path,
                $"tensor '{name}' is 4-bit packed U32 {WeightsException.Format(info.Shape)}, which holds [{rows}, {columnsLong}]{expects}");
        if (columnsLong > int.MaxValue)
            throw new WeightsException(file.Path, $"tensor '{name}' has rows of {columnsLong} elements, too many");
        int columns = (int)columnsLong;

        int groups = 0;
        foreach (var companion in new[] { Q4.ScalesName(name), Q4.BiasesName(name) })
        {
            if (!_fileOf.TryGetValue(companion, out var holder))
                throw new WeightsException(file.Path, $"tensor '{name}' is 4-bit packed but '{companion}' is missing");
            var c = holder.Info(companion);
            if (c.Dtype != "F16")
                throw new WeightsException(holder.Path,
                    $"tensor '{companion}' of 4-bit '{name}' is {c.Dtype}, expected F16" +
                    (c.Dtype == "BF16" ? " (convert MLX models with --dtype float16, or quantize the original with 'lora quantize')" : ""));
            if (c.Shape.Length != 2 || c.Shape[0] != rows || c.Shape[1] <= 0 || columns % c.Shape[1] != 0
                || (groups != 0 && c.Shape[1] != groups))
                throw new WeightsException(holder.Path,
                    $"tensor '{companion}' of 4-bit '{name}' [{rows}, {columns}] has shape {WeightsException.Format(c.Shape)}, expected [{rows}, groups] with groups dividing {columns}" +
                    (groups != 0 ? $" and equal to the scales' {groups}" : ""));
            groups = c.Shape[1];
        }
        int groupSize = columns / groups;
        if (Q4.GroupSizeProblem(groupSize) is { } problem)
            throw new WeightsException(file.Path, $"tensor '{name}': {problem}");

        if (file.Metadata.TryGetValue(Q4.MetadataKey, out var json))
        {
            (int Bits, int? GroupSize, string? Mode) meta;
            try
            {
                meta = Q4.ParseMetadata(json);
            }
            catch (FormatException e)
            {
                throw new WeightsException(file.Path, e.Message, e);
            }
            if (meta.Bits != Q4.Bits)
                throw new WeightsException(file.Path, $"tensor '{name}': the file is quantized to {meta.Bits} bits; only {Q4.Bits}-bit weights are supported");
            if (meta.Mode is not (null or "affine"))
                throw new WeightsException(file.Path, $"tensor '{name}': quantization mode '{meta.Mode}' is not supported (only affine)");
            if (meta.GroupSize is int g && g != groupSize)
                throw new WeightsException(file.Path,
                    $"tensor '{name}' has groups of {groupSize} ({groups} per row of {columns}) but the file's metadata says group_size {g}");
        }
        return new Q4Layout(rows, columns, groups, groupSize);
    }

    /// <summary>
    /// A tensor's data in place as memory of <typeparamref name="T"/>, or a copy when it is not aligned
    /// to <typeparamref name="T"/> (safetensors packs tensors without padding).
    /// </summary>
    unsafe Memory<T> Map<T>(string name, long count) where T : unmanaged
    {
        var file = Holder(name);
        if (count > int.MaxValue)
            throw new WeightsException(file.Path, $"tensor '{name}' has {count} elements, more than one mapping view can hold");
        byte* data = file.Data(name);
        if ((nuint)data % (nuint)sizeof(T) == 0)
            return new IO.UnmanagedMemory<T>((T*)data, (int)count).Memory;
        var copy = new T[count];
        long bytes = count * sizeof(T); // may pass 2^31 (a span of bytes could not hold it)
        fixed (T* destination = copy)
            Buffer.MemoryCopy(data, destination, bytes, bytes);
        return copy;
    }

    /// <summary>
    /// The checks every read and map of <paramref name="name"/> makes, for a caller that uses its raw
    /// <see cref="Bytes"/>: its file still has the size it was mapped with and its values (a float
    /// tensor's; 4-bit scales and biases are checked as tensors of their own) are all finite. Throws
    /// <see cref="WeightsException"/> naming the tensor.
    /// </summary>
    public void CheckValues(string name) => CheckUse(name);

    /// <summary>
    /// Before a tensor's values are used: its file still has the size it was mapped with (a file
    /// truncated under the mapping would kill the process with SIGBUS on the next read of a lost
    /// page), and, the first time, every value is finite (one vectorized pass over its bytes).
    /// </summary>
    void CheckUse(string name)
    {
        var file = Holder(name);
        file.CheckLength();
        lock (_finite)
        {
            if (_finite.Contains(name))
                return;
        }
        file.CheckFinite(name);
        lock (_finite)
            _finite.Add(name);
    }

    SafeTensorsFile Holder(string name) =>
        _fileOf.TryGetValue(name, out var file) ? file : throw new WeightsException(_path, $"tensor '{name}' is missing");

    static ModelWeights OpenSingle(string path)
    {
        var file = SafeTensorsFile.Open(path);
        return new ModelWeights(path, [file], file.Names.ToDictionary(n => n, _ => file, StringComparer.Ordinal));
    }

    static ModelWeights OpenIndex(string indexPath)
    {
        var weightMap = ReadWeightMap(indexPath);
        string folder = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(indexPath))!;

        // Every shard name is checked before any file is opened: a name out of the folder is refused
        // without reading a byte of what it names.
        string realFolder = IO.FilePaths.Resolve(folder);
        var shardPaths = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var (name, shardName) in weightMap)
        {
            if (!shardPaths.ContainsKey(shardName))
                shardPaths[shardName] = ShardPath(indexPath, folder, realFolder, name, shardName);
        }

        var shards = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
        try
        {
            foreach (var (shardName, shardPath) in shardPaths)
                shards[shardName] = SafeTensorsFile.Open(shardPath);
            var fileOf = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
            var shardOf = weightMap.ToDictionary(e => e.Name, e => e.Shard, StringComparer.Ordinal);
            foreach (var (name, shardName) in weightMap)
            {
                var shard = shards[shardName];
                if (!shard.Contains(name))
                    throw new WeightsException(shard.Path, $"tensor '{name}' is missing (the index {System.IO.Path.GetFileName(indexPath)} places it in this shard)");
                fileOf[name] = shard;
            }
            foreach (var (shardName, shard) in shards)
                foreach (string name in shard.Names)
                    if (shardOf.TryGetValue(name, out var listed) && listed != shardName)
                        throw new WeightsException(shard.Path,
                            $"tensor '{name}' is also in this shard, but the index {System.IO.Path.GetFileName(indexPath)} places it in '{listed}': a tensor must be in one shard only");
            return new ModelWeights(indexPath, shards.Values.ToList(), fileOf);
        }
        catch
        {
            foreach (var shard in shards.Values)
                shard.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Where a shard named by the index lies, refused unless it is a regular file inside the model
    /// folder: a relative name without <c>..</c>, which with every symbolic link resolved stays in the
    /// folder (or, in Hugging Face's cache, in the <c>blobs</c> folder of the snapshot's repository).
    /// </summary>
    static string ShardPath(string indexPath, string folder, string realFolder, string tensor, string shardName)
    {
        WeightsException Refused(string why) =>
            new(indexPath, $"shard '{Printable(shardName)}' of tensor '{tensor}' {why}; a shard must be a file inside the model folder {folder}");

        if (shardName.Length == 0)
            throw Refused("is an empty name");
        if (shardName.Any(char.IsControl))
            throw Refused("has a control character in its name");
        if (System.IO.Path.IsPathRooted(shardName) || System.IO.Path.IsPathFullyQualified(shardName))
            throw Refused("is an absolute path");
        if (shardName.Split('/', '\\').Any(part => part == ".."))
            throw Refused("has a '..' in its path, which leaves the model folder");

        string path = System.IO.Path.Join(folder, shardName);
        string real;
        try
        {
            real = IO.FilePaths.Resolve(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw Refused($"cannot be resolved: {e.Message}");
        }
        if (!IO.FilePaths.IsInside(real, realFolder) && !InHuggingFaceBlobs(real, realFolder))
            throw Refused($"resolves (through a symbolic link) to {real}, outside the folder");
        if (Directory.Exists(real))
            throw Refused("is a folder, not a file");
        if (!File.Exists(real))
            throw new WeightsException(indexPath, $"shard '{shardName}' of tensor '{tensor}' does not exist (looked for {path})");
        return path;
    }

    /// <summary>Hugging Face's hub cache: <c>models--X/snapshots/REV/f</c> links to <c>models--X/blobs/HASH</c>.</summary>
    static bool InHuggingFaceBlobs(string real, string realFolder)
    {
        var snapshots = Directory.GetParent(realFolder);
        if (snapshots is null || snapshots.Name != "snapshots" || snapshots.Parent is null)
            return false;
        return IO.FilePaths.IsInside(real, System.IO.Path.Join(snapshots.Parent.FullName, "blobs"));
    }

    /// <summary>A name as it may appear in a message: control characters escaped.</summary>
    static string Printable(string text) =>
        string.Concat(text.Select(c => char.IsControl(c) ? $"\\u{(int)c:x4}" : c.ToString()));

    static List<(string Name, string Shard)> ReadWeightMap(string indexPath)
    {
        byte[] bytes = WeightsException.ReadSmallJson(indexPath, "index", MaxIndexBytes, "malformed index JSON");
        try
        {
            using var document = JsonDocument.Parse(bytes);
            if (document.RootElement.ValueKind != JsonValueKind.Object
                || !document.RootElement.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
                throw new WeightsException(indexPath, "index has no 'weight_map' object ({\"weight_map\": {tensor: shard file}})");
            var entries = new List<(string, string)>();
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var entry in map.EnumerateObject())
            {
                string name = entry.Name;
                if (entry.Value.ValueKind != JsonValueKind.String)
                    throw new WeightsException(indexPath, $"weight_map entry for tensor '{name}' must be a shard file name (a string), not {entry.Value.ValueKind}");
                if (!seen.Add(name))
                    throw new WeightsException(indexPath, $"tensor '{name}' is listed twice in weight_map: a tensor must be in one shard only");
                entries.Add((name, entry.Value.GetString()!));
            }
            if (entries.Count == 0)
                throw new WeightsException(indexPath, "weight_map lists no tensors");
            return entries;
        }
        catch (JsonException e)
        {
            throw new WeightsException(indexPath, $"malformed index JSON: {e.Message}", e);
        }
        catch (InvalidOperationException e)
        {
            throw new WeightsException(indexPath, $"malformed index JSON: {e.Message}", e);
        }
    }
}
