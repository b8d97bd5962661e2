using System.Globalization;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.IO;

namespace LoraCompiler.CommandLine;

/// <summary><c>--backend cpu|vulkan</c> and <c>--device N|name</c>: which backend a command runs on.</summary>
public static class BackendOptions
{
    public const string Help = "--backend cpu|vulkan (cpu by default); --device N|NAME picks a Vulkan device by index or name";

    public static IBackend Create(Args args) => Create(args.Get("backend", "cpu"), args.Optional("device"));

    /// <summary>The help line of <c>--max-resident</c>, for the commands that take it (bench step, bench memory).</summary>
    public const string MaxResidentHelp =
        "--max-resident SIZE: the most bytes of base weights the Vulkan backend keeps resident on the device " +
        "(uploaded once for the run); 0 streams every weight (uploaded at each use); default: what fits the device's memory budget";

    public static IBackend Create(string backend, string? device, long? maxResident = null) =>
        backend switch
        {
            "cpu" when device is null && maxResident is null => new CpuBackend(),
            "cpu" => throw new UsageException($"{(device is null ? "--max-resident" : "--device")} applies to --backend vulkan."),
            "vulkan" => CreateVulkan(device, maxResident),
            var other => throw new UsageException($"Unknown backend '{other}' (available: cpu, vulkan)."),
        };

    /// <summary>
    /// A Vulkan backend on the device named by <paramref name="device"/> (an index or part of a name), or the
    /// best one, keeping at most <paramref name="maxResident"/> bytes of base weights resident (null: what fits).
    /// </summary>
    public static VulkanBackend CreateVulkan(string? device, long? maxResident = null) => new(Vulkan(device) with { MaxResidentBytes = maxResident });

    /// <summary><c>--max-resident SIZE</c> (0, or a size like 512MB); null when it is not given.</summary>
    public static long? MaxResident(Args args)
    {
        if (args.Optional("max-resident") is not { } text)
            return null;
        if (text.Trim() == "0")
            return 0;
        return ByteSize.TryParse(text, out string problem) ?? throw new UsageException($"--max-resident: {problem}, or 0 to stream every weight.");
    }

    /// <summary><paramref name="bytes"/> as <c>--max-resident</c> takes it, for a child process.</summary>
    public static string FormatMaxResident(long bytes) => bytes.ToString(CultureInfo.InvariantCulture);

    public static VulkanBackendOptions Vulkan(string? device) =>
        device is null ? new() :
        int.TryParse(device, out int index) ? new() { DeviceIndex = index } :
        new() { DeviceName = device };
}
