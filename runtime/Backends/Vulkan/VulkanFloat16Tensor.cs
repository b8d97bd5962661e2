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
internal sealed class VulkanFloat16Tensor : VulkanRowSplitWeight<VulkanFloat16Tensor.Part>
{
    internal VulkanFloat16Tensor(VulkanBackend owner, string name, Float16Format format, int rows, int columns, int rowsPerPart, Part[] parts)
        : base(owner, name, rows, columns, rowsPerPart, parts) => Format = format;

    /// <summary>Rows [FirstRow, FirstRow + Rows) of the weight, in one buffer.</summary>
    internal readonly record struct Part(VulkanBuffer Buffer, int FirstRow, int Rows) : IRowPart
    {
        IEnumerable<VulkanBuffer> IRowPart.Buffers => [Buffer];
    }

    public Float16Format Format { get; }

    /// <summary>The format as the shaders' push constants name it (common/float16.glsl: 1 F16, 2 BF16).</summary>
    internal uint ShaderFormat => Format == Float16Format.BF16 ? 2u : 1u;

    public override string ToString() => $"{Name}[{Rows}, {Columns}] {(Format == Float16Format.BF16 ? "BF16" : "F16")}";
}
