using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// A 16-bit (F16 or BF16) base weight [Rows, Columns] in device memory as it is stored: the shaders
/// convert each value as they read it (shaders/common/float16.glsl), so no float copy of it exists on
/// the host or the device. A vector (a norm weight, a bias) is one row. Its <see cref="Tensor.Length"/>
/// is Rows·Columns.
///
/// Each part holds whole rows [FirstRow, FirstRow + Rows) in one buffer of uints, two values to a
/// uint (element e of the part in the low half of uint e/2 when e is even, the high half when it is
/// odd: the file's bytes unchanged). Device memory is 2 bytes a value. A weight larger than the
/// backend's buffer limit is split into as many parts as it takes.
/// </summary>
public sealed class VulkanFloat16Tensor : Tensor
{
    private readonly VulkanBackend _owner;
    private bool _disposed;

    internal VulkanFloat16Tensor(VulkanBackend owner, string name, Float16Format format, int rows, int columns, int rowsPerPart, Part[] parts)
        : base(name, (long)rows * columns)
    {
        _owner = owner;
        Format = format;
        Rows = rows;
        Columns = columns;
        RowsPerPart = rowsPerPart;
        Parts = parts;
        foreach (var buffer in Buffers)
            owner.Device.Assign(buffer, DeviceBufferRole.Weight);
    }

    /// <summary>
    /// True when <see cref="VulkanBackend.MapWeight"/> keeps the weight resident: it belongs to the backend,
    /// which frees it when it is disposed, and <see cref="Dispose"/> leaves it alone.
    /// </summary>
    public override bool IsResident => Resident;

    internal bool Resident { get; set; }

    /// <summary>Rows [FirstRow, FirstRow + Rows) of the weight, in one buffer.</summary>
    internal readonly record struct Part(VulkanBuffer Buffer, int FirstRow, int Rows);

    public Float16Format Format { get; }
    public int Rows { get; }
    public int Columns { get; }

    /// <summary>Rows per part (the last part may hold fewer).</summary>
    public int RowsPerPart { get; }

    /// <summary>How many buffers hold this weight.</summary>
    public int PartCount => Parts.Length;

    /// <summary>Bytes of device memory the weight occupies.</summary>
    public long DeviceBytes => Parts.Sum(p => (long)p.Buffer.Bytes);

    /// <summary>The format as the shaders' push constants name it (common/float16.glsl: 1 F16, 2 BF16).</summary>
    internal uint ShaderFormat => Format == Float16Format.BF16 ? 2u : 1u;

    internal Part[] Parts { get; }

    internal VulkanBackend Owner => _owner;

    internal IEnumerable<VulkanBuffer> Buffers => Parts.Select(p => p.Buffer);

    /// <summary>Rows [first, first + count) as runs that each lie in one part: (part, first row within it, rows).</summary>
    internal IEnumerable<(Part Part, int Offset, long FirstRow, int Rows)> Segments(long first, long count)
    {
        long row = first, end = first + count;
        while (row < end)
        {
            int k = (int)(row / RowsPerPart);
            var part = Parts[k];
            int offset = (int)(row - part.FirstRow);
            int rows = (int)Math.Min(end - row, part.Rows - offset);
            yield return (part, offset, row, rows);
            row += rows;
        }
    }

    public override void Dispose()
    {
        if (_disposed || Resident)
            return;
        _disposed = true;
        _owner.Release(this, Buffers.ToArray());
    }

    public override string ToString() => $"{Name}[{Rows}, {Columns}] {(Format == Float16Format.BF16 ? "BF16" : "F16")}";
}
