using System.IO.MemoryMappedFiles;
using System.Numerics;
using System.Numerics.Tensors;
using System.Runtime.Intrinsics;
using System.Text.Json;

namespace LoraCompiler.Runtime.Weights;

/// <summary>One tensor of a safetensors file: its dtype, shape, and where its bytes lie in the file.</summary>
/// <param name="Offset">Absolute byte offset of the tensor's data in the file (not relative to the data section).</param>
public sealed record SafeTensorInfo(string Name, string Dtype, int[] Shape, long Offset, long ByteLength)
{
    public long Elements => Shape.Aggregate(1L, (n, d) => n * d);
}

/// <summary>
/// A <c>.safetensors</c> file, memory-mapped read-only. Layout: an 8-byte little-endian header length
/// N, N bytes of UTF-8 JSON (<c>{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}</c>,
/// offsets relative to the data section), then the data section. <see cref="Open"/> checks the whole
/// header against the file before any tensor byte is touched, as the format's reference
/// implementation does: N within 1..100 MB and the file; the header valid UTF-8 and a JSON object; a
/// known dtype, non-negative dimensions and [begin, end] of non-negative integers per tensor, element
/// count × dtype size equal to end − begin (all in overflow-checked arithmetic); every name once; the
/// byte ranges, in order, contiguous from 0 and covering the data section exactly (no overlap, no
/// hole, no trailing bytes); <c>__metadata__</c> an object of strings. Any problem is one
/// <see cref="WeightsException"/> naming the file and, where there is one, the tensor.
/// </summary>
public sealed unsafe class SafeTensorsFile : IDisposable
{
    /// <summary>The reference implementation refuses headers above 100 MB; so do we.</summary>
    const long MaxHeaderBytes = 100_000_000;

    readonly FileStream _stream;
    readonly MemoryMappedFile _map;
    readonly MemoryMappedViewAccessor _view;
    readonly byte* _base;
    readonly long _length;
    readonly Dictionary<string, SafeTensorInfo> _tensors = new(StringComparer.Ordinal);
    readonly Dictionary<string, string> _metadata = new(StringComparer.Ordinal);
    string[] _names = [];
    bool _disposed;

    SafeTensorsFile(string path, FileStream stream)
    {
        Path = path;
        _stream = stream;
        _length = stream.Length;
        // The handle stays ours (leaveOpen) so that CheckLength can fstat it while the file is mapped.
        _map = MemoryMappedFile.CreateFromFile(stream, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: true);
        try
        {
            _view = _map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
        }
        catch
        {
            _map.Dispose();
            throw;
        }
        byte* pointer = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
        _base = pointer + _view.PointerOffset;
    }

    /// <summary>The path the file was opened with.</summary>
    public string Path { get; }

    /// <summary>The file's length in bytes when it was opened (and mapped).</summary>
    public long Length => _length;

    /// <summary>Tensor names in the order of their data in the file.</summary>
    public IReadOnlyCollection<string> Names => _names;

    /// <summary>The header's <c>__metadata__</c> (empty when there is none).</summary>
    public IReadOnlyDictionary<string, string> Metadata => _metadata;

    /// <summary>Maps <paramref name="path"/> and validates its header; throws <see cref="WeightsException"/> on any problem.</summary>
    public static SafeTensorsFile Open(string path)
    {
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("safetensors data is little-endian; this machine is not.");
        if (Directory.Exists(path))
            throw new WeightsException(path, "is a folder, not a safetensors file");
        // stat before open: a FIFO, a device or a /proc file reports no bytes, and opening a FIFO
        // would block; a file of fewer than 8 bytes cannot be one anyway.
        var before = new FileInfo(path);
        if (before.Exists && before.Length < 8)
            throw new WeightsException(path,
                $"file is truncated or not a regular file: it has {before.Length} bytes, fewer than the 8-byte header length");
        FileStream stream;
        try
        {
            stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read | FileShare.Delete);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or NotSupportedException)
        {
            throw new WeightsException(path, e is FileNotFoundException or DirectoryNotFoundException
                ? "file does not exist" : $"cannot open file: {e.Message}", e);
        }
        long length;
        try
        {
            length = stream.CanSeek ? stream.Length : -1;
        }
        catch (IOException)
        {
            length = -1;
        }
        if (length < 8)
        {
            stream.Dispose();
            throw new WeightsException(path, length < 0
                ? "not a regular file"
                : $"file is truncated: it has {length} bytes, fewer than the 8-byte header length");
        }

        SafeTensorsFile file;
        try
        {
            file = new SafeTensorsFile(path, stream);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
        {
            stream.Dispose();
            throw new WeightsException(path, $"cannot map file: {e.Message}", e);
        }
        try
        {
            file.ParseHeader();
            return file;
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Checks that the file still has the length it had when it was mapped (one fstat of the open
    /// handle). A file truncated under the mapping makes any read of its lost pages a SIGBUS, which
    /// kills the process; callers check here before they use a tensor's bytes, so a file shortened or
    /// rewritten in place between two uses is an exception instead.
    /// </summary>
    public void CheckLength()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        long now;
        try
        {
            now = RandomAccess.GetLength(_stream.SafeFileHandle);
        }
        catch (IOException e)
        {
            throw new WeightsException(Path, $"cannot check the file's size: {e.Message}", e);
        }
        if (now != _length)
            throw new WeightsException(Path,
                $"the file changed size while in use: it had {_length} bytes when opened and has {now} now " +
                "(it was truncated or rewritten in place; do not modify a model or adapter file while a run uses it, and start the run again)");
    }

    /// <summary>True when the file holds a tensor named <paramref name="name"/>.</summary>
    public bool Contains(string name) => _tensors.ContainsKey(name);

    /// <summary>The header entry of <paramref name="name"/>; throws <see cref="WeightsException"/> when it is missing.</summary>
    public SafeTensorInfo Info(string name) =>
        _tensors.TryGetValue(name, out var info) ? info : throw new WeightsException(Path, $"tensor '{name}' is missing");

    /// <summary>
    /// Converts tensor <paramref name="name"/> (F32, F16 or BF16) to float32 into
    /// <paramref name="destination"/>, whose length must be the tensor's element count.
    /// </summary>
    public void Read(string name, Span<float> destination)
    {
        var info = Info(name);
        if (destination.Length != info.Elements)
            throw new ArgumentException(
                $"{Path}: tensor '{name}' has {info.Elements} elements {WeightsException.Format(info.Shape)} but the destination holds {destination.Length}",
                nameof(destination));
        Read(name, 0, destination);
    }

    /// <summary>
    /// Converts elements [start, start + destination.Length) of tensor <paramref name="name"/> (F32,
    /// F16 or BF16, flattened row-major) to float32: a tensor read piece by piece.
    /// </summary>
    public void Read(string name, long start, Span<float> destination)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var info = Info(name);
        if (start < 0 || start > info.Elements - destination.Length)
            throw new ArgumentOutOfRangeException(nameof(start),
                $"{Path}: {destination.Length} elements from {start} are outside tensor '{name}' of {info.Elements} elements");

        int count = destination.Length;
        switch (info.Dtype)
        {
            case "F32":
                new ReadOnlySpan<float>(_base + info.Offset + start * 4, count).CopyTo(destination);
                break;
            case "F16":
                TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>(_base + info.Offset + start * 2, count), destination);
                break;
            case "BF16":
                Dtypes.BFloat16ToSingle(new ReadOnlySpan<ushort>(_base + info.Offset + start * 2, count), destination);
                break;
            default:
                throw new WeightsException(Path, $"unsupported dtype {info.Dtype} for tensor '{name}' (supported: {Dtypes.Readable})");
        }
    }

    /// <summary>The tensor's bytes as the file holds them, in place in the read-only mapping.</summary>
    public ReadOnlySpan<byte> Bytes(string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var info = Info(name);
        if (info.ByteLength > int.MaxValue)
            throw new WeightsException(Path, $"tensor '{name}' has {info.ByteLength} bytes, more than one span can hold");
        return new ReadOnlySpan<byte>(_base + info.Offset, (int)info.ByteLength);
    }

    /// <summary>Where a tensor's data begins in the mapping (valid while the file is open; never write to it).</summary>
    internal byte* Data(string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        return _base + Info(name).Offset;
    }

    /// <summary>
    /// Where an F32 tensor's data lies in the mapping, for using it in place; null for another dtype or
    /// a tensor not aligned to 4 bytes (then <see cref="Read(string, Span{float})"/> converts it).
    /// </summary>
    internal float* F32Data(string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var info = Info(name);
        byte* data = _base + info.Offset;
        return info.Dtype == "F32" && (nuint)data % sizeof(float) == 0 ? (float*)data : null;
    }

    /// <summary>Tensor <paramref name="name"/> converted to a new float32 array.</summary>
    public float[] Read(string name)
    {
        var info = Info(name);
        if (info.Elements > Array.MaxLength)
            throw new WeightsException(Path, $"tensor '{name}' has {info.Elements} elements, more than one array can hold");
        var values = new float[info.Elements];
        Read(name, values);
        return values;
    }

    /// <summary>
    /// The first element of a float tensor (F32, F16 or BF16; 4-bit scales and biases are F16) that is
    /// NaN or infinite, or −1 when all are finite (and for any other dtype). One vectorized pass over
    /// the tensor's bytes, testing the exponent bits, without converting anything.
    /// </summary>
    public long IndexOfNonFinite(string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var info = Info(name);
        byte* data = _base + info.Offset;
        return info.Dtype switch
        {
            "F32" => NonFinite.IndexOfSingle(data, info.Elements),
            "F16" => NonFinite.IndexOf16(data, info.Elements, NonFinite.HalfExponent),
            "BF16" => NonFinite.IndexOf16(data, info.Elements, NonFinite.BFloat16Exponent),
            _ => -1,
        };
    }

    /// <summary>
    /// Throws <see cref="WeightsException"/> naming the tensor, the value and where it is when
    /// <paramref name="name"/> holds a NaN or an infinity (see <see cref="IndexOfNonFinite"/>).
    /// </summary>
    public void CheckFinite(string name)
    {
        long index = IndexOfNonFinite(name);
        if (index < 0)
            return;
        Span<float> value = stackalloc float[1];
        Read(name, index, value);
        throw new WeightsException(Path, $"tensor '{name}' holds {NonFinite.Describe(value[0], index, Info(name).Shape)}; weights must be finite");
    }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _map.Dispose();
        _stream.Dispose();
    }

    /// <summary>A tensor's header entry before its place in the data section is checked: offsets relative to it.</summary>
    readonly record struct Entry(string Name, string Dtype, int[] Shape, ulong Begin, ulong End);

    void ParseHeader()
    {
        ulong headerLength = *(ulong*)_base;
        if (headerLength == 0 || headerLength > MaxHeaderBytes)
            throw new WeightsException(Path,
                $"the first 8 bytes are not a header length of 1..{MaxHeaderBytes} bytes; is this a safetensors file?");
        if (headerLength > (ulong)(_length - 8))
            throw new WeightsException(Path, $"file is truncated: the header needs bytes 8..{8 + headerLength} but the file has {_length}");
        long dataStart = 8 + (long)headerLength;
        ulong dataLength = (ulong)(_length - dataStart);

        var header = new ReadOnlySpan<byte>(_base + 8, (int)headerLength);
        if (!System.Text.Unicode.Utf8.IsValid(header))
            throw new WeightsException(Path, $"the header is not valid UTF-8 (at byte {8 + InvalidUtf8At(header)} of the file)");

        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(header.ToArray());
        }
        catch (JsonException e)
        {
            throw new WeightsException(Path, $"malformed header JSON: {e.Message}", e);
        }

        var entries = new List<Entry>();
        using (document)
        {
            try
            {
                var root = document.RootElement;
                if (root.ValueKind != JsonValueKind.Object)
                    throw new WeightsException(Path, $"malformed header JSON: expected an object, found {root.ValueKind}");
                var names = new HashSet<string>(StringComparer.Ordinal);
                bool metadata = false;
                foreach (var property in root.EnumerateObject())
                {
                    string name = Text(() => property.Name, "a tensor name");
                    if (name == "__metadata__")
                    {
                        if (metadata)
                            throw new WeightsException(Path, "malformed header JSON: '__metadata__' appears twice");
                        metadata = true;
                        ParseMetadata(property.Value);
                    }
                    else if (!names.Add(name))
                        throw new WeightsException(Path, $"tensor '{name}' appears twice in the header");
                    else
                        entries.Add(ParseEntry(name, property.Value, dataStart, dataLength));
                }
            }
            catch (InvalidOperationException e)
            {
                // System.Text.Json unescapes lazily: a \ud800 without its pair throws when the string is compared or read.
                throw new WeightsException(Path, $"malformed header JSON: a string is not valid text: {e.Message}", e);
            }
        }

        // The byte ranges, in order, must tile the data section: each begins where the one before ends.
        entries.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin)
            : a.End != b.End ? a.End.CompareTo(b.End) : string.CompareOrdinal(a.Name, b.Name));
        ulong covered = 0;
        string? previous = null;
        foreach (var entry in entries)
        {
            if (entry.Begin < covered)
                throw new WeightsException(Path,
                    $"tensor '{entry.Name}' (bytes {entry.Begin}..{entry.End} of the data section) overlaps tensor '{previous}' (which ends at {covered})");
            if (entry.Begin > covered)
                throw new WeightsException(Path,
                    $"bytes {covered}..{entry.Begin} of the data section belong to no tensor (a hole before tensor '{entry.Name}')");
            covered = entry.End;
            previous = entry.Name;
        }
        if (covered != dataLength)
            throw new WeightsException(Path,
                $"the data section has {dataLength} bytes but the tensors cover {covered}: {dataLength - covered} trailing bytes belong to no tensor");

        foreach (var entry in entries)
            _tensors.Add(entry.Name, new SafeTensorInfo(entry.Name, entry.Dtype, entry.Shape,
                dataStart + (long)entry.Begin, (long)(entry.End - entry.Begin)));
        _names = entries.Select(e => e.Name).ToArray();
    }

    /// <summary>Where the first invalid UTF-8 sequence of <paramref name="bytes"/> starts.</summary>
    static int InvalidUtf8At(ReadOnlySpan<byte> bytes)
    {
        for (int i = 0; i < bytes.Length;)
        {
            if (System.Text.Rune.DecodeFromUtf8(bytes[i..], out _, out int consumed) != System.Buffers.OperationStatus.Done)
                return i;
            i += consumed;
        }
        return bytes.Length;
    }

    /// <summary>A string of the header; an escape that is not valid UTF-16 (a lone surrogate, \ud800) is a malformed header.</summary>
    string Text(Func<string?> read, string what)
    {
        try
        {
            return read() ?? throw new WeightsException(Path, $"malformed header JSON: {what} is null");
        }
        catch (InvalidOperationException e)
        {
            throw new WeightsException(Path, $"malformed header JSON: {what} is not valid text: {e.Message}", e);
        }
    }

    void ParseMetadata(JsonElement element)
    {
        if (element.ValueKind != JsonValueKind.Object)
            throw new WeightsException(Path, "malformed header JSON: '__metadata__' must be an object of strings");
        foreach (var entry in element.EnumerateObject())
        {
            string key = Text(() => entry.Name, "a '__metadata__' key");
            if (entry.Value.ValueKind != JsonValueKind.String)
                throw new WeightsException(Path, $"malformed header JSON: '__metadata__' entry '{key}' must be a string");
            if (!_metadata.TryAdd(key, Text(() => entry.Value.GetString(), $"'__metadata__' entry '{key}'")))
                throw new WeightsException(Path, $"malformed header JSON: '__metadata__' entry '{key}' appears twice");
        }
    }

    Entry ParseEntry(string name, JsonElement entry, long dataStart, ulong dataLength)
    {
        WeightsException Malformed(string what) => new(Path, $"malformed header JSON: tensor '{name}': {what}");

        if (entry.ValueKind != JsonValueKind.Object)
            throw Malformed("entry must be an object with dtype, shape and data_offsets");
        if (!entry.TryGetProperty("dtype", out var dtypeElement) || dtypeElement.ValueKind != JsonValueKind.String)
            throw Malformed("'dtype' must be a string");
        string dtype = Text(() => dtypeElement.GetString(), $"the dtype of tensor '{name}'");
        if (Dtypes.ElementSize(dtype) is not int size)
            throw new WeightsException(Path, $"tensor '{name}' has unknown dtype '{dtype}' (the safetensors dtypes are {Dtypes.Known})");

        if (!entry.TryGetProperty("shape", out var shapeElement) || shapeElement.ValueKind != JsonValueKind.Array)
            throw Malformed("'shape' must be an array of non-negative integers");
        var shape = new int[shapeElement.GetArrayLength()];
        int i = 0;
        foreach (var dim in shapeElement.EnumerateArray())
        {
            if (dim.ValueKind != JsonValueKind.Number || !dim.TryGetInt64(out long d) || d < 0)
                throw Malformed("'shape' must be an array of non-negative integers");
            if (d > int.MaxValue)
                throw Malformed($"dimension {d} is too large (at most {int.MaxValue})");
            shape[i++] = (int)d;
        }

        if (!entry.TryGetProperty("data_offsets", out var offsetsElement) || offsetsElement.ValueKind != JsonValueKind.Array
            || offsetsElement.GetArrayLength() != 2
            || offsetsElement[0].ValueKind != JsonValueKind.Number || offsetsElement[1].ValueKind != JsonValueKind.Number
            || !offsetsElement[0].TryGetUInt64(out ulong begin) || !offsetsElement[1].TryGetUInt64(out ulong end)
            || end < begin)
            throw Malformed("'data_offsets' must be [begin, end] with 0 <= begin <= end");

        // end <= dataLength (< 2^63) is checked before anything is added to it, so nothing below overflows.
        if (end > dataLength)
            throw new WeightsException(Path,
                $"file is truncated: tensor '{name}' needs bytes {(UInt128)(ulong)dataStart + begin}..{(UInt128)(ulong)dataStart + end} but the file has {_length}");

        ulong bytes;
        try
        {
            bytes = checked(shape.Aggregate(1UL, (n, d) => n * (ulong)d) * (ulong)size);
        }
        catch (OverflowException)
        {
            throw new WeightsException(Path, $"tensor '{name}': {dtype} {WeightsException.Format(shape)} is too large (its byte count overflows)");
        }
        if (bytes != end - begin)
            throw new WeightsException(Path,
                $"tensor '{name}' has {end - begin} bytes of data but {dtype} {WeightsException.Format(shape)} needs {bytes}");
        return new Entry(name, dtype, shape, begin, end);
    }
}

/// <summary>Finds NaN and infinity by their exponent bits (all ones), 512, 256 or 128 bits at a time.</summary>
internal static unsafe class NonFinite
{
    public const ushort HalfExponent = 0x7C00;
    public const ushort BFloat16Exponent = 0x7F80;
    public const uint SingleExponent = 0x7F800000;

    /// <summary>The first of <paramref name="count"/> F32 values at <paramref name="data"/> that is not finite, or −1.</summary>
    public static long IndexOfSingle(void* data, long count) => IndexOf((uint*)data, count, SingleExponent);

    /// <summary>The same for 16-bit floats: F16 with <see cref="HalfExponent"/>, BF16 with <see cref="BFloat16Exponent"/>.</summary>
    public static long IndexOf16(void* data, long count, ushort exponent) => IndexOf((ushort*)data, count, exponent);

    /// <summary>The first of <paramref name="values"/> that is not finite, or −1.</summary>
    public static long IndexOf(ReadOnlySpan<float> values)
    {
        if (TensorPrimitives.IsFiniteAll(values))
            return -1;
        fixed (float* p = values)
            return IndexOfSingle(p, values.Length);
    }

    /// <summary>The first element whose bits under <paramref name="mask"/> are all set, or −1.</summary>
    static long IndexOf<T>(T* data, long count, T mask) where T : unmanaged, System.Numerics.IBinaryInteger<T>
    {
        long i = 0;
        // Unaligned loads: safetensors packs tensors without padding, so data may lie at any address.
        if (Vector512.IsHardwareAccelerated)
        {
            var m = Vector512.Create(mask);
            for (; i <= count - Vector512<T>.Count; i += Vector512<T>.Count)
                if (Vector512.EqualsAny(Vector512.Load(data + i) & m, m))
                    break;
        }
        else if (Vector256.IsHardwareAccelerated)
        {
            var m = Vector256.Create(mask);
            for (; i <= count - Vector256<T>.Count; i += Vector256<T>.Count)
                if (Vector256.EqualsAny(Vector256.Load(data + i) & m, m))
                    break;
        }
        else if (Vector128.IsHardwareAccelerated)
        {
            var m = Vector128.Create(mask);
            for (; i <= count - Vector128<T>.Count; i += Vector128<T>.Count)
                if (Vector128.EqualsAny(Vector128.Load(data + i) & m, m))
                    break;
        }
        for (; i < count; i++)
            if ((data[i] & mask) == mask)
                return i;
        return -1;
    }

    /// <summary>"NaN at element 12 [1, 4]", for a message.</summary>
    public static string Describe(float value, long index, IReadOnlyList<int> shape)
    {
        string what = float.IsNaN(value) ? "NaN" : value > 0 ? "+Infinity" : "-Infinity";
        if (shape.Count < 2 || shape.Contains(0))
            return $"{what} at element {index}";
        var position = new int[shape.Count];
        long rest = index;
        for (int d = shape.Count - 1; d >= 0; d--)
        {
            position[d] = (int)(rest % shape[d]);
            rest /= shape[d];
        }
        return $"{what} at element {index} {WeightsException.Format(position)}";
    }
}

/// <summary>safetensors dtype names, their sizes, and the float conversions the readers and writer share.</summary>
internal static class Dtypes
{
    /// <summary>The dtypes this runtime converts to and from float32.</summary>
    public const string Readable = "F32, F16, BF16";

    public static bool IsReadable(string dtype) => dtype is "F32" or "F16" or "BF16";

    /// <summary>The dtypes the safetensors format defines (whole bytes per element).</summary>
    public const string Known = "F64, F32, F16, BF16, F8_E4M3, F8_E5M2, F8_E8M0, C64, I64, I32, I16, I8, U64, U32, U16, U8, BOOL";

    /// <summary>Bytes per element of a dtype the safetensors format defines; null for one it does not know.</summary>
    public static int? ElementSize(string dtype) => dtype switch
    {
        "F64" or "I64" or "U64" or "C64" => 8,
        "F32" or "I32" or "U32" => 4,
        "F16" or "BF16" or "I16" or "U16" => 2,
        "I8" or "U8" or "BOOL" or "F8_E4M3" or "F8_E5M2" or "F8_E8M0" => 1,
        _ => null,
    };

    /// <summary>bfloat16 is the upper half of a float32: widen to 32 bits and shift left by 16.</summary>
    public static void BFloat16ToSingle(ReadOnlySpan<ushort> source, Span<float> destination)
    {
        int i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            for (; i <= source.Length - Vector<ushort>.Count; i += Vector<ushort>.Count)
            {
                Vector.Widen(new Vector<ushort>(source[i..]), out Vector<uint> low, out Vector<uint> high);
                Vector.AsVectorSingle(low << 16).CopyTo(destination[i..]);
                Vector.AsVectorSingle(high << 16).CopyTo(destination[(i + Vector<uint>.Count)..]);
            }
        }
        for (; i < source.Length; i++)
            destination[i] = BitConverter.UInt32BitsToSingle((uint)source[i] << 16);
    }

    /// <summary>float32 to bfloat16, rounding to nearest with ties to even; NaN stays a (quiet) NaN.</summary>
    public static ushort SingleToBFloat16(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        if (float.IsNaN(value))
            return (ushort)((bits >> 16) | 0x0040);
        return (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1)) >> 16);
    }
}
