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
internal sealed class VulkanQ4Tensor : VulkanRowSplitWeight<VulkanQ4Tensor.Part>
{
    internal VulkanQ4Tensor(VulkanBackend owner, string name, int rows, int columns, int groupSize, int rowsPerPart, Part[] parts)
        : base(owner, name, rows, columns, rowsPerPart, parts) => GroupSize = groupSize;

    /// <summary>Rows [FirstRow, FirstRow + Rows) of the weight: their packed words and their scale/bias pairs.</summary>
    internal readonly record struct Part(VulkanBuffer Packed, VulkanBuffer ScaleBias, int FirstRow, int Rows) : IRowPart
    {
        IEnumerable<VulkanBuffer> IRowPart.Buffers => [Packed, ScaleBias];
    }

    /// <summary>Elements per (scale, bias) group of a row.</summary>
    public int GroupSize { get; }

    /// <summary>32-bit words per row of packed data.</summary>
    internal int WordsPerRow => Columns / Weights.Q4.PerWord;

    internal int GroupsPerRow => Columns / GroupSize;

    public override string ToString() => $"{Name}[{Rows}, {Columns}] 4-bit (groups of {GroupSize})";
}
