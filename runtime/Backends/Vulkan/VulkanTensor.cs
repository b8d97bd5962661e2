using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// A float32 tensor in device memory. A tensor larger than the backend's part size (the device's
/// maxStorageBufferRange, or a smaller configured limit) is split into several buffers: part k holds
/// elements [k·PartLength, (k+1)·PartLength). Every tensor of a backend uses the same part length, so
/// two tensors' parts line up element for element.
///
/// An F32 base weight that <see cref="VulkanBackend.MapWeight"/> keeps resident is one of these with
/// <see cref="IsResident"/> true: it belongs to the backend, which frees it when it is disposed, so
/// <see cref="Dispose"/> and <see cref="VulkanBackend.ReleaseWeight"/> leave it alone.
/// </summary>
public sealed class VulkanTensor : VulkanDeviceTensor
{
    // Copies of rows that straddle two parts, keyed by (row, row length), for kernels that need a row whole.
    private readonly Dictionary<(long Row, int Width), VulkanBuffer> _seams = [];

    internal VulkanTensor(VulkanBackend owner, string name, long length, long partLength, VulkanBuffer[] parts)
        : base(owner, name, length)
    {
        PartLength = partLength;
        Parts = parts;
        foreach (var part in parts)
            owner.Device.Assign(part, DeviceBufferRole.Tensor);
    }

    /// <summary>Elements per part (the last part may hold fewer).</summary>
    public long PartLength { get; }

    /// <summary>How many buffers hold this tensor.</summary>
    public int PartCount => Parts.Length;

    internal VulkanBuffer[] Parts { get; }

    /// <summary>The parts and the copies of straddling rows.</summary>
    internal override IEnumerable<VulkanBuffer> Buffers => Parts.Concat(_seams.Values);

    internal VkBuffer Part(int k) => Parts[k].Handle;

    /// <summary>Elements in part k.</summary>
    internal long PartElements(int k) => Math.Min(PartLength, Length - k * PartLength);

    internal VulkanBuffer Seam(long row, int width, Func<VulkanBuffer> create)
    {
        if (!_seams.TryGetValue((row, width), out var buffer))
            _seams[(row, width)] = buffer = create();
        return buffer;
    }
}
