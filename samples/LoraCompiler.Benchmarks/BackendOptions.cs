using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;

namespace LoraCompiler.CommandLine;

/// <summary><c>--backend cpu|vulkan</c> and <c>--device N|name</c>: which backend a command runs on.</summary>
public static class BackendOptions
{
    public const string Help = "--backend cpu|vulkan (cpu by default); --device N|NAME picks a Vulkan device by index or name";

    public static IBackend Create(Args args) => Create(args.Get("backend", "cpu"), args.Optional("device"));

    public static IBackend Create(string backend, string? device) =>
        backend switch
        {
            "cpu" when device is null => new CpuBackend(),
            "cpu" => throw new UsageException("--device applies to --backend vulkan."),
            "vulkan" => CreateVulkan(device),
            var other => throw new UsageException($"Unknown backend '{other}' (available: cpu, vulkan)."),
        };

    /// <summary>A Vulkan backend on the device named by <paramref name="device"/> (an index or part of a name), or the best one.</summary>
    public static VulkanBackend CreateVulkan(string? device) => new(Vulkan(device));

    public static VulkanBackendOptions Vulkan(string? device) =>
        device is null ? new() :
        int.TryParse(device, out int index) ? new() { DeviceIndex = index } :
        new() { DeviceName = device };
}
