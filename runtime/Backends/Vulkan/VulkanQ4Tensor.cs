namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// A 4-bit base weight [Rows, Columns] in device memory, used packed (MLX's affine layout, see
/// <see cref="Weights.Q4Weight"/>): the products and the embedding gather dequantize it inside their
/// shaders (shaders/common/q4.glsl), so no float copy of it exists on the host or the device. Its
/// <see cref="Tensor.Length"/> is the logical Rows·Columns.
///
/// Each part holds whole rows [FirstRow, FirstRow + Rows) in two buffers: the packed words
/// (uint [rows, Columns/8], as in the file) and one uint per group holding the group's F16 scale in
/// the low half and its F16 bias in the high half (the file's two F16 arrays interleaved, the bits
/// unchanged). Device memory is Rows·Columns/2 bytes plus 4 bytes per group. A weight whose packed
/// words exceed the backend's buffer limit is split into as many parts as it takes.
/// </summary>
public sealed class VulkanQ4Tensor : Tensor
{
    private readonly VulkanBackend _owner;
    private bool _disposed;

    internal VulkanQ4Tensor(VulkanBackend owner, string name, int rows, int columns, int groupSize, int rowsPerPart, Part[] parts)
        : base(name, (long)rows * columns)
    {
        _owner = owner;
        Rows = rows;
        Columns = columns;
        GroupSize = groupSize;
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

    /// <summary>Rows [FirstRow, FirstRow + Rows) of the weight: their packed words and their scale/bias pairs.</summary>
    internal readonly record struct Part(VulkanBuffer Packed, VulkanBuffer ScaleBias, int FirstRow, int Rows);

    public int Rows { get; }
    public int Columns { get; }

    /// <summary>Elements per (scale, bias) group of a row.</summary>
    public int GroupSize { get; }

    /// <summary>Rows per part (the last part may hold fewer).</summary>
    public int RowsPerPart { get; }

    /// <summary>How many pairs of buffers hold this weight.</summary>
    public int PartCount => Parts.Length;

    /// <summary>Bytes of device memory the weight occupies: packed words and scale/bias pairs.</summary>
    public long DeviceBytes => Parts.Sum(p => (long)p.Packed.Bytes + (long)p.ScaleBias.Bytes);

    /// <summary>32-bit words per row of packed data.</summary>
    internal int WordsPerRow => Columns / Weights.Q4.PerWord;

    internal int GroupsPerRow => Columns / GroupSize;

    internal Part[] Parts { get; }

    internal VulkanBackend Owner => _owner;

    internal IEnumerable<VulkanBuffer> Buffers => Parts.SelectMany(p => new[] { p.Packed, p.ScaleBias });

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

    public override string ToString() => $"{Name}[{Rows}, {Columns}] 4-bit (groups of {GroupSize})";
}
