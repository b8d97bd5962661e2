using LoraCompiler.Runtime.Backends.Vulkan;
using Silk.NET.Vulkan;
using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>Device choice, its errors, and that the validation layer's errors reach the tests.</summary>
public sealed class VulkanDeviceTests
{
    [VulkanFact]
    public unsafe void ValidationErrorsAreCollected()
    {
        using var device = new VulkanDevice(new VulkanBackendOptions { Validation = true });
        Assert.True(device.ValidationEnabled, "VK_LAYER_KHRONOS_validation is not installed (tests/install-vulkan.sh installs vulkan-validationlayers)");
        Assert.Empty(device.ValidationErrors);
        // An invalid call: a buffer of size 0 (VUID-VkBufferCreateInfo-size-00912).
        var info = new BufferCreateInfo { SType = StructureType.BufferCreateInfo, Size = 0, Usage = BufferUsageFlags.StorageBufferBit };
        VkBuffer buffer;
        if (device.Vk.CreateBuffer(device.Device, &info, null, &buffer) == Result.Success)
            device.Vk.DestroyBuffer(device.Device, buffer, null);
        Assert.Contains(device.ValidationErrors, e => e.Contains("size", StringComparison.OrdinalIgnoreCase));
    }

    [VulkanFact]
    public void DeviceChoiceByIndexAndName()
    {
        var devices = VulkanDevice.List();
        Assert.NotEmpty(devices);
        var first = devices.First(d => d.HasCompute);
        using (var byIndex = new VulkanDevice(new VulkanBackendOptions { DeviceIndex = first.Index }))
            Assert.Equal(first.Name, byIndex.Name);
        using (var byName = new VulkanDevice(new VulkanBackendOptions { DeviceName = first.Name[..Math.Min(4, first.Name.Length)].ToUpperInvariant() }))
            Assert.Contains(first.Name[..Math.Min(4, first.Name.Length)], byName.Name, StringComparison.OrdinalIgnoreCase);

        var missing = Assert.Throws<VulkanException>(() => new VulkanDevice(new VulkanBackendOptions { DeviceName = "no such device" }));
        Assert.Contains(first.Name, missing.Message); // lists the devices there are
        Assert.Throws<VulkanException>(() => new VulkanDevice(new VulkanBackendOptions { DeviceIndex = devices.Count }));
    }

    [VulkanFact]
    public void OutOfMemoryIsAVulkanExceptionWithAdvice()
    {
        var e = VulkanException.From(Result.ErrorOutOfDeviceMemory, "vkAllocateMemory", "allocating 2 GB for logits");
        Assert.Contains("shorter --seq", e.Message);
        Assert.Contains("lost", VulkanException.From(Result.ErrorDeviceLost, "vkQueueSubmit", "submitting").Message);
        Assert.Contains("mesa-vulkan-drivers", VulkanException.From(Result.ErrorIncompatibleDriver, "vkCreateInstance", "starting").Message);
    }
}
