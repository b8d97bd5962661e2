namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>How <see cref="VulkanBackend"/> picks and uses a device.</summary>
public sealed record VulkanBackendOptions
{
    /// <summary>Use the physical device at this index of <see cref="VulkanDevice.List"/> instead of the best one.</summary>
    public int? DeviceIndex { get; init; }

    /// <summary>Use the first device whose name contains this text (case-insensitive).</summary>
    public string? DeviceName { get; init; }

    /// <summary>
    /// Enable <c>VK_LAYER_KHRONOS_validation</c> and collect its errors in
    /// <see cref="VulkanDevice.ValidationErrors"/>. Default: on when the environment variable
    /// <c>LORA_VULKAN_VALIDATION=1</c>. Ignored (with <see cref="VulkanDevice.ValidationEnabled"/> false) when the
    /// layer is not installed.
    /// </summary>
    public bool? Validation { get; init; }

    /// <summary>
    /// The largest buffer, in bytes, one tensor part may have; a larger tensor is split into parts. Default:
    /// the device's maxStorageBufferRange. Tests set a small value to exercise the splitting on any device.
    /// </summary>
    public long? MaxBufferBytes { get; init; }

    /// <summary>
    /// Caps the workgroups per dispatch dimension below the device's maxComputeWorkGroupCount, so that
    /// tests reach the paths that fold or split dispatches on any device. Default: the device's limit.
    /// </summary>
    public uint? MaxWorkgroupCount { get; init; }

    /// <summary>Bytes of host-visible staging memory per in-flight batch for uploads (default 8 MiB; two batches rotate). Larger uploads go in pieces.</summary>
    public long StagingBytes { get; init; } = 8L << 20;

    /// <summary>Commands recorded before a batch is submitted without waiting (default 1024).</summary>
    public int CommandsPerBatch { get; init; } = 1024;

    /// <summary>
    /// The most bytes of base weights <see cref="VulkanBackend.MapWeight"/> keeps resident in device memory
    /// (uploaded once, kept until the backend is disposed); a weight past it is streamed (uploaded when it is
    /// mapped, freed when it is released). 0 streams every weight. Default (null): as many as fit the
    /// device's memory budget, less a reserve (<see cref="VulkanBackend.ResidentReserveBytes"/>).
    /// </summary>
    public long? MaxResidentBytes
    {
        get => _maxResidentBytes;
        init => _maxResidentBytes = value is null or >= 0 ? value
            : throw new ArgumentOutOfRangeException(nameof(MaxResidentBytes), value, "MaxResidentBytes must be 0 (stream every weight) or more.");
    }

    private readonly long? _maxResidentBytes;

    /// <summary>
    /// Whether the per-row kernels reduce through subgroup arithmetic (the <c>.subgroups</c> shader
    /// variants). Default (null): where the device offers it in compute shaders and
    /// <see cref="VulkanQuirks"/> does not rule it out; false: the plain kernels; true: the variants,
    /// an error on a device without subgroup arithmetic. Tests force both on one device.
    /// </summary>
    public bool? Subgroups { get; init; }
}
