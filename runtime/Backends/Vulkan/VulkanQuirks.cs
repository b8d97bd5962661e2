namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// What the kernels must know of particular drivers, in one place: limits a driver imposes without
/// saying so, and features it offers but gets wrong.
/// </summary>
public static class VulkanQuirks
{
    /// <summary>Qualcomm's PCI vendor id (Adreno GPUs).</summary>
    public const uint Qualcomm = 0x5143;

    /// <summary>
    /// llvmpipe (lavapipe) ends every loop of a shader invocation once the invocation has run this many
    /// loop iterations in all (Mesa's LP_MAX_TGSI_LOOP_ITERATIONS), without any error.
    /// </summary>
    public const long LavapipeLoopLimit = 65535;

    /// <summary>Whether the device is Mesa's lavapipe (llvmpipe), the CPU implementation.</summary>
    public static bool IsLavapipe(VulkanDevice device) => device.Name.Contains("llvmpipe", StringComparison.OrdinalIgnoreCase);

    /// <summary>The most loop iterations one shader invocation may run on the device; null where no limit is known.</summary>
    public static long? LoopLimit(VulkanDevice device) => IsLavapipe(device) ? LavapipeLoopLimit : null;

    /// <summary>
    /// Whether the per-row kernels may reduce through subgroup arithmetic: where the device offers it
    /// in compute shaders, except on Qualcomm's Adreno drivers, whose subgroup operations ggml's Vulkan
    /// backend turns off as unreliable. <paramref name="requested"/> is <see cref="VulkanBackendOptions.Subgroups"/>.
    /// </summary>
    public static bool UseSubgroups(VulkanDevice device, bool? requested) =>
        UseSubgroups(device.SubgroupArithmetic, device.VendorId, requested, device.Name);

    /// <summary>The rule of <see cref="UseSubgroups(VulkanDevice, bool?)"/> for a device that <paramref name="offered"/> subgroup arithmetic or not.</summary>
    public static bool UseSubgroups(bool offered, uint vendorId, bool? requested, string deviceName)
    {
        if (requested == true && !offered)
            throw new VulkanException($"{deviceName} does not offer subgroup arithmetic in compute shaders; Subgroups = true needs it.");
        return requested ?? (offered && vendorId != Qualcomm);
    }
}
