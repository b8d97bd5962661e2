using System.Buffers.Binary;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using System.Text.Json;
using LoraCompiler.Runtime.IO;

namespace LoraCompiler.Runtime.Weights;

/// <summary>A tensor as it lies in a safetensors file: its name, dtype and shape (the data comes separately).</summary>
public sealed record RawTensorSpec(string Name, string Dtype, int[] Shape)
{
    public long Elements => Shape.Aggregate(1L, (n, d) => n * d);

    /// <summary>Bytes of data: elements times the dtype's size.</summary>
    public long ByteLength => Elements * (Dtypes.ElementSize(Dtype)
        ?? throw new ArgumentException($"tensor '{Name}': unknown safetensors dtype {Dtype}"));

    public override string ToString() => $"{Name} {Dtype} [{string.Join(", ", Shape)}]";
}

/// <summary>
/// Writes <c>.safetensors</c> files. One writer underneath (<see cref="WriteRaw(string, IReadOnlyList{RawTensorSpec}, Action{RawTensorSpec, Stream}, IReadOnlyDictionary{string, string}?)"/>):
/// each tensor's bytes in any safetensors dtype (U32 packed 4-bit weights, F16 scales, ...); the
/// float overloads convert float32 values to F32, F16 or BF16 on the way through it.
/// </summary>
public static class SafeTensorsWriter
{
    /// <summary>Elements converted per chunk when writing F16 or BF16.</summary>
    const int ChunkElements = 1 << 16;

    /// <summary>
    /// Writes tensors whose bytes <paramref name="data"/> writes to the stream, once per tensor in the
    /// given order, so a file larger than memory can be written piece by piece. The callback must
    /// write exactly the tensor's <see cref="RawTensorSpec.ByteLength"/> bytes, little-endian. Data is
    /// contiguous and the header padded with spaces to a multiple of 8 bytes, as the reference
    /// implementation does. The file is written atomically (<see cref="AtomicFile"/>).
    /// </summary>
    public static void WriteRaw(string path, IReadOnlyList<RawTensorSpec> tensors, Action<RawTensorSpec, Stream> data,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        byte[] header = Header(path, tensors, metadata);
        AtomicFile.Write(path, stream =>
        {
            Span<byte> length = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(length, (ulong)header.Length);
            stream.Write(length);
            stream.Write(header);
            foreach (var spec in tensors)
            {
                long start = stream.Position;
                data(spec, stream);
                long written = stream.Position - start;
                if (written != spec.ByteLength)
                    throw new WeightsException(path, $"tensor '{spec.Name}' got {written} bytes of data but {spec.Dtype} {WeightsException.Format(spec.Shape)} needs {spec.ByteLength}");
            }
        });
    }

    /// <summary>Writes tensors whose bytes are in memory (little-endian, as the file holds them).</summary>
    public static void WriteRaw(string path, IEnumerable<(RawTensorSpec Spec, ReadOnlyMemory<byte> Data)> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.ToList();
        int next = 0;
        WriteRaw(path, list.Select(t => t.Spec).ToList(), (_, stream) => stream.Write(list[next++].Data.Span), metadata);
    }

    /// <summary>A tensor of unmanaged values as <see cref="WriteRaw(string, IEnumerable{ValueTuple{RawTensorSpec, ReadOnlyMemory{byte}}}, IReadOnlyDictionary{string, string}?)"/> takes it.</summary>
    public static (RawTensorSpec Spec, ReadOnlyMemory<byte> Data) Raw<T>(string name, string dtype, int[] shape, ReadOnlySpan<T> values)
        where T : unmanaged
        => (new RawTensorSpec(name, dtype, shape), MemoryMarshal.AsBytes(values).ToArray());

    /// <summary>
    /// Writes float32 <paramref name="tensors"/> in the given order as <paramref name="dtype"/> (F32,
    /// F16 or BF16; F16 and BF16 round to nearest, ties to even).
    /// </summary>
    public static void Write(string path, IEnumerable<(string Name, int[] Shape, float[] Data)> tensors,
        string dtype = "F32", IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.ToList();
        foreach (var (name, shape, data) in list)
            if (!shape.Any(d => d < 0) && new TensorSpec(name, shape).Elements != data.Length)
                throw new WeightsException(path, $"tensor '{name}' has {data.Length} values but shape {WeightsException.Format(shape)} needs {new TensorSpec(name, shape).Elements}");
        // The data callback is called once per tensor, in order.
        int next = 0;
        Write(path, list.Select(t => new TensorSpec(t.Name, t.Shape)).ToList(), _ => list[next++].Data, dtype, metadata);
    }

    /// <summary>
    /// Writes float32 tensors whose data is produced one at a time by <paramref name="data"/>, so a file
    /// larger than memory (a full-size random model) can be written. Same format and atomicity as above.
    /// </summary>
    public static void Write(string path, IReadOnlyList<TensorSpec> tensors, Func<TensorSpec, ReadOnlyMemory<float>> data,
        string dtype = "F32", IReadOnlyDictionary<string, string>? metadata = null)
    {
        CheckFloatDtype(path, dtype);
        int next = 0; // the callback is called once per tensor, in order
        WriteRaw(path, tensors.Select(t => new RawTensorSpec(t.Name, dtype, t.Shape)).ToList(), (_, stream) =>
        {
            var spec = tensors[next++];
            var values = data(spec);
            if (values.Length != spec.Elements)
                throw new WeightsException(path, $"tensor '{spec.Name}' has {values.Length} values but shape {WeightsException.Format(spec.Shape)} needs {spec.Elements}");
            WriteFloats(stream, values.Span, dtype);
        }, metadata);
    }

    /// <summary>Throws unless <paramref name="dtype"/> is one the float overloads write.</summary>
    internal static void CheckFloatDtype(string path, string dtype)
    {
        if (!Dtypes.IsReadable(dtype))
            throw new WeightsException(path, $"cannot write dtype {dtype} (supported: {Dtypes.Readable})");
    }

    /// <summary>float32 values as <paramref name="dtype"/> (F32, F16 or BF16) to the stream, converted in chunks.</summary>
    internal static void WriteFloats(Stream stream, ReadOnlySpan<float> data, string dtype)
    {
        if (dtype == "F32")
        {
            stream.Write(MemoryMarshal.AsBytes(data));
            return;
        }
        var chunk = new ushort[Math.Min(ChunkElements, data.Length)];
        for (int start = 0; start < data.Length; start += chunk.Length)
        {
            var source = data.Slice(start, Math.Min(chunk.Length, data.Length - start));
            var target = chunk.AsSpan(0, source.Length);
            if (dtype == "F16")
                TensorPrimitives.ConvertToHalf(source, MemoryMarshal.Cast<ushort, Half>(target));
            else
                for (int i = 0; i < source.Length; i++)
                    target[i] = Dtypes.SingleToBFloat16(source[i]);
            stream.Write(MemoryMarshal.AsBytes(target));
        }
    }

    static byte[] Header(string path, IReadOnlyList<RawTensorSpec> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        using var buffer = new MemoryStream();
        using (var json = new Utf8JsonWriter(buffer))
        {
            json.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                json.WriteStartObject("__metadata__");
                foreach (var (key, value) in metadata)
                    json.WriteString(key, value);
                json.WriteEndObject();
            }
            long offset = 0;
            foreach (var (name, dtype, shape) in tensors)
            {
                if (name == "__metadata__" || !names.Add(name))
                    throw new WeightsException(path, $"tensor name '{name}' is reserved or appears twice");
                if (shape.Any(d => d < 0))
                    throw new WeightsException(path, $"tensor '{name}' has a negative dimension in {WeightsException.Format(shape)}");
                if (Dtypes.ElementSize(dtype) is not int elementSize)
                    throw new WeightsException(path, $"tensor '{name}': unknown safetensors dtype {dtype}");
                long elements = shape.Aggregate(1L, (n, d) => n * d);
                json.WriteStartObject(name);
                json.WriteString("dtype", dtype);
                json.WriteStartArray("shape");
                foreach (int d in shape)
                    json.WriteNumberValue(d);
                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(offset);
                json.WriteNumberValue(offset += elements * elementSize);
                json.WriteEndArray();
                json.WriteEndObject();
            }
            json.WriteEndObject();
        }
        int padding = (int)((8 - buffer.Length % 8) % 8);
        for (int i = 0; i < padding; i++)
            buffer.WriteByte((byte)' ');
        return buffer.ToArray();
    }
}
