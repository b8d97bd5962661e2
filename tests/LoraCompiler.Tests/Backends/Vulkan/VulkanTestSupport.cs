using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>
/// Whether this machine has a Vulkan device, found once. Tests never skip silently in CI: with
/// <c>CI=true</c> and no device, <see cref="VulkanFactAttribute"/> does not skip and the test fails in
/// <see cref="Create"/> with the reason. Without CI a missing device skips the test with the reason.
/// </summary>
public static class VulkanTestDevice
{
    private static readonly Lazy<(bool Available, string Reason)> s_probe = new(() =>
        VulkanDevice.IsAvailable(out string reason) ? (true, "") : (false, reason));

    public static bool Available => s_probe.Value.Available;
    public static string Reason => s_probe.Value.Reason;

    public static bool InCi => string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    /// <summary>
    /// A backend on the best device (lavapipe where there is no GPU), with the validation layer on when it is
    /// installed. Fails the test with the reason when there is no device.
    /// </summary>
    public static VulkanBackend Create(VulkanBackendOptions? options = null)
    {
        if (!Available)
            Assert.Fail($"No Vulkan device: {Reason}" + (InCi ? " (CI=true: Vulkan tests must run, run tests/install-vulkan.sh)" : ""));
        return new VulkanBackend((options ?? new VulkanBackendOptions()) with { Validation = true });
    }

    /// <summary>Fails when the validation layer reported an error.</summary>
    public static void AssertNoValidationErrors(VulkanBackend backend)
    {
        var errors = backend.Device.ValidationErrors;
        Assert.True(errors.Count == 0, $"{errors.Count} Vulkan validation errors, the first: {errors.FirstOrDefault()}");
    }
}

/// <summary>A fact that needs Vulkan: skipped with the reason when there is no device, unless CI=true, where it runs and fails.</summary>
public sealed class VulkanFactAttribute : FactAttribute
{
    public VulkanFactAttribute()
    {
        if (!VulkanTestDevice.Available && !VulkanTestDevice.InCi)
            Skip = $"No Vulkan device ({VulkanTestDevice.Reason}); set CI=true to make this a failure.";
    }
}

/// <summary>As <see cref="VulkanFactAttribute"/>, for theories.</summary>
public sealed class VulkanTheoryAttribute : TheoryAttribute
{
    public VulkanTheoryAttribute()
    {
        if (!VulkanTestDevice.Available && !VulkanTestDevice.InCi)
            Skip = $"No Vulkan device ({VulkanTestDevice.Reason}); set CI=true to make this a failure.";
    }
}

/// <summary>One Vulkan backend shared by a test class (device and pipeline creation are not free on lavapipe).</summary>
public sealed class VulkanBackendFixture : IDisposable
{
    private VulkanBackend? _backend;

    public VulkanBackend Backend => _backend ??= VulkanTestDevice.Create();

    public void Dispose() => _backend?.Dispose();
}
