namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// What every tensor of a <see cref="VulkanBackend"/> shares: the backend that owns its buffers, and
/// a <see cref="Dispose"/> that gives them back once the commands recorded so far no longer need them,
/// unless the backend keeps the tensor resident (a base weight; the backend frees it when it is disposed).
/// </summary>
public abstract class VulkanDeviceTensor : Tensor
{
    private bool _disposed;

    private protected VulkanDeviceTensor(VulkanBackend owner, string name, long length) : base(name, length) => Owner = owner;

    internal VulkanBackend Owner { get; }

    /// <summary>
    /// True when <see cref="VulkanBackend.MapWeight"/> keeps the weight resident: it belongs to the backend,
    /// which frees it when it is disposed, and <see cref="Dispose"/> leaves it alone.
    /// </summary>
    public override bool IsResident => Resident;

    internal bool Resident { get; set; }

    /// <summary>Every buffer that holds the tensor.</summary>
    internal abstract IEnumerable<VulkanBuffer> Buffers { get; }

    /// <summary>Bytes of device memory the tensor occupies.</summary>
    public long DeviceBytes => Buffers.Sum(b => (long)b.Bytes);

    public override void Dispose()
    {
        if (_disposed || Resident)
            return;
        _disposed = true;
        Owner.Release(this, Buffers.ToArray());
    }
}

/// <summary>Rows [FirstRow, FirstRow + Rows) of a weight split by whole rows, and the buffers that hold them.</summary>
internal interface IRowPart
{
    int FirstRow { get; }
    int Rows { get; }
    IEnumerable<VulkanBuffer> Buffers { get; }
}

/// <summary>
/// A base weight [Rows, Columns] in device memory as it is stored (4-bit or 16-bit), split by whole
/// rows into parts of at most the backend's buffer limit.
/// </summary>
internal abstract class VulkanRowSplitWeight<TPart> : VulkanDeviceTensor where TPart : struct, IRowPart
{
    private protected VulkanRowSplitWeight(VulkanBackend owner, string name, int rows, int columns, int rowsPerPart, TPart[] parts)
        : base(owner, name, (long)rows * columns)
    {
        Rows = rows;
        Columns = columns;
        RowsPerPart = rowsPerPart;
        Parts = parts;
        foreach (var buffer in Buffers)
            owner.Device.Assign(buffer, DeviceBufferRole.Weight);
    }

    public int Rows { get; }
    public int Columns { get; }

    /// <summary>Rows per part (the last part may hold fewer).</summary>
    public int RowsPerPart { get; }

    /// <summary>How many parts hold this weight.</summary>
    public int PartCount => Parts.Length;

    internal TPart[] Parts { get; }

    internal override IEnumerable<VulkanBuffer> Buffers => Parts.SelectMany(p => p.Buffers);

    /// <summary>Rows [first, first + count) as runs that each lie in one part: (part, first row within it, rows).</summary>
    internal IEnumerable<(TPart Part, int Offset, long FirstRow, int Rows)> Segments(long first, long count)
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
}
