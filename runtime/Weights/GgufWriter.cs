using System.Buffers.Binary;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using System.Text;
using LoraCompiler.Runtime.IO;

namespace LoraCompiler.Runtime.Weights;

/// <summary>GGUF metadata value types (the spec's <c>gguf_metadata_value_type</c>).</summary>
public enum GgufValueType : uint
{
    UInt8 = 0, Int8 = 1, UInt16 = 2, Int16 = 3, UInt32 = 4, Int32 = 5, Float32 = 6, Bool = 7,
    String = 8, Array = 9, UInt64 = 10, Int64 = 11, Float64 = 12,
}

/// <summary>The ggml tensor types this writer stores (<c>ggml_type</c>: F32 = 0, F16 = 1).</summary>
public enum GgmlType : uint
{
    F32 = 0,
    F16 = 1,
}

/// <summary>
/// Writes a GGUF file (version 3, little-endian), as ggml's spec lays one out:
/// <code>
///   "GGUF"  uint32 version  uint64 tensor_count  uint64 kv_count
///   kv_count × (string key, uint32 value_type, value)
///   tensor_count × (string name, uint32 n_dims, uint64 ne[n_dims], uint32 ggml_type, uint64 offset)
///   padding to the alignment, then each tensor's data at its offset (relative to here), each padded to the alignment
/// </code>
/// A string is a uint64 byte length and UTF-8 bytes without a terminator. <c>ne</c> lists dimensions
/// fastest-varying first, the reverse of a row-major (numpy) shape: a matrix [rows, columns] has
/// ne = [columns, rows]. Metadata and tensors keep the order they were added in. The alignment is 32
/// unless a <c>general.alignment</c> entry says otherwise.
/// </summary>
public sealed class GgufWriter
{
    public const string Magic = "GGUF";
    public const uint Version = 3;
    public const uint DefaultAlignment = 32;
    public const string AlignmentKey = "general.alignment";

    readonly List<(string Key, GgufValueType Type, byte[] Value)> _metadata = [];
    readonly List<(string Name, int[] Shape, GgmlType Type, float[] Data)> _tensors = [];

    /// <summary>The data alignment: <c>general.alignment</c> when added, else 32.</summary>
    public uint Alignment { get; private set; } = DefaultAlignment;

    public GgufWriter AddString(string key, string value)
    {
        var bytes = Encoding.UTF8.GetBytes(value);
        var encoded = new byte[8 + bytes.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(encoded, (ulong)bytes.Length);
        bytes.CopyTo(encoded, 8);
        return Add(key, GgufValueType.String, encoded);
    }

    public GgufWriter AddUInt32(string key, uint value)
    {
        var encoded = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(encoded, value);
        if (key == AlignmentKey)
        {
            if (value == 0 || value % 8 != 0)
                throw new ArgumentException($"{AlignmentKey} must be a positive multiple of 8, got {value}", nameof(value));
            Alignment = value;
        }
        return Add(key, GgufValueType.UInt32, encoded);
    }

    public GgufWriter AddFloat32(string key, float value)
    {
        var encoded = new byte[4];
        BinaryPrimitives.WriteSingleLittleEndian(encoded, value);
        return Add(key, GgufValueType.Float32, encoded);
    }

    public GgufWriter AddBool(string key, bool value) => Add(key, GgufValueType.Bool, [value ? (byte)1 : (byte)0]);

    /// <summary>
    /// A tensor of row-major float32 <paramref name="data"/> with numpy shape <paramref name="shape"/>,
    /// stored as <paramref name="type"/> (F16 rounds to nearest even). Its GGUF dimensions are the shape reversed.
    /// </summary>
    public GgufWriter AddTensor(string name, int[] shape, GgmlType type, float[] data)
    {
        if (_tensors.Any(t => t.Name == name))
            throw new ArgumentException($"tensor '{name}' is added twice", nameof(name));
        if (Encoding.UTF8.GetByteCount(name) >= 64)
            throw new ArgumentException($"tensor name '{name}' is 64 bytes or longer (ggml's limit)", nameof(name));
        if (shape.Length is < 1 or > 4 || shape.Any(d => d <= 0))
            throw new ArgumentException($"tensor '{name}': shape [{string.Join(", ", shape)}] needs 1 to 4 positive dimensions", nameof(shape));
        if (shape.Aggregate(1L, (n, d) => n * d) != data.Length)
            throw new ArgumentException($"tensor '{name}': shape [{string.Join(", ", shape)}] does not hold {data.Length} values", nameof(data));
        if (type is not (GgmlType.F32 or GgmlType.F16))
            throw new ArgumentException($"tensor '{name}': type {type} is not F32 or F16", nameof(type));
        _tensors.Add((name, shape, type, data));
        return this;
    }

    /// <summary>Writes the file atomically (<see cref="AtomicFile"/>).</summary>
    public void Write(string path) => AtomicFile.Write(path, stream =>
    {
        var header = new MemoryStream();
        header.Write(Encoding.ASCII.GetBytes(Magic));
        WriteUInt32(header, Version);
        WriteUInt64(header, (ulong)_tensors.Count);
        WriteUInt64(header, (ulong)_metadata.Count);
        foreach (var (key, type, value) in _metadata)
        {
            WriteString(header, key);
            WriteUInt32(header, (uint)type);
            header.Write(value);
        }
        ulong offset = 0;
        foreach (var (name, shape, type, data) in _tensors)
        {
            WriteString(header, name);
            WriteUInt32(header, (uint)shape.Length);
            for (int i = shape.Length - 1; i >= 0; i--)
                WriteUInt64(header, (ulong)shape[i]);
            WriteUInt32(header, (uint)type);
            WriteUInt64(header, offset);
            offset += Padded(ByteLength(type, data.Length));
        }
        Pad(header, header.Length);
        header.Position = 0;
        header.CopyTo(stream);

        foreach (var (_, _, type, data) in _tensors)
        {
            long start = stream.Position;
            if (type == GgmlType.F32)
                stream.Write(MemoryMarshal.AsBytes(data.AsSpan()));
            else
            {
                var half = new Half[data.Length];
                TensorPrimitives.ConvertToHalf(data, half);
                stream.Write(MemoryMarshal.AsBytes(half.AsSpan()));
            }
            Pad(stream, stream.Position - start);
        }
    });

    /// <summary>Bytes of <paramref name="elements"/> values of a type.</summary>
    public static long ByteLength(GgmlType type, long elements) => elements * (type == GgmlType.F32 ? 4 : 2);

    GgufWriter Add(string key, GgufValueType type, byte[] value)
    {
        if (_metadata.Any(m => m.Key == key))
            throw new ArgumentException($"metadata key '{key}' is added twice", nameof(key));
        _metadata.Add((key, type, value));
        return this;
    }

    ulong Padded(long length) => (ulong)((length + Alignment - 1) / Alignment * Alignment);

    void Pad(Stream stream, long length)
    {
        long padding = (long)Padded(length) - length;
        for (long i = 0; i < padding; i++)
            stream.WriteByte(0);
    }

    static void WriteString(Stream stream, string value)
    {
        var bytes = Encoding.UTF8.GetBytes(value);
        WriteUInt64(stream, (ulong)bytes.Length);
        stream.Write(bytes);
    }

    static void WriteUInt32(Stream stream, uint value)
    {
        Span<byte> bytes = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(bytes, value);
        stream.Write(bytes);
    }

    static void WriteUInt64(Stream stream, ulong value)
    {
        Span<byte> bytes = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, value);
        stream.Write(bytes);
    }
}
