using System.Runtime.InteropServices;
using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// The optimizer's kernels on the device (shaders/adamw.comp), the finite checks (check_finite.comp)
/// and MeZO's noise (noise.comp): with them a training step's parameters, moments, gradient sums
/// and checks never leave the device; one uint of check status is read back per step.
/// </summary>
public sealed partial class VulkanBackend
{
    private VulkanBuffer? _finiteStatus;

    public void AdamWUpdate(Tensor parameter, Tensor m, Tensor v, Tensor gradient, long n, in AdamWStep step)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(step.Step, 1);
        var push = new OptimizerParameters
        {
            LearningRate = step.LearningRate, Beta1 = step.Beta1, Beta2 = step.Beta2, Epsilon = step.Epsilon, WeightDecay = step.WeightDecay,
            BiasCorrection1 = step.BiasCorrection1, BiasCorrection2 = step.BiasCorrection2, GradScale = step.GradScale,
        };
        Elementwise(Kernels.AdamW, n,
            [Vulkan(parameter, n, nameof(parameter)), Vulkan(m, n, nameof(m)), Vulkan(v, n, nameof(v)), Vulkan(gradient, n, nameof(gradient))],
            (count, _) => push with { Count = count });
    }

    public void SgdUpdate(Tensor parameter, Tensor gradient, long n, float learningRate, float gradScale)
    {
        if (gradScale == 0)
            return;
        var p = Vulkan(parameter, n, nameof(parameter));
        // m and v are not read by the SGD path; the parameter stands in for their bindings.
        Elementwise(Kernels.AdamW, n, [p, p, p, Vulkan(gradient, n, nameof(gradient))],
            (count, _) => new OptimizerParameters { Count = count, Sgd = 1, LearningRate = learningRate, GradScale = gradScale });
    }

    public void CheckFinite(Tensor values, long n, int check)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(check);
        Elementwise(Kernels.CheckFinite, n, [Vulkan(values, n, nameof(values))],
            (count, _) => new CheckParameters { Count = count, Check = (uint)check }, shared: FiniteStatus());
    }

    public (int Check, bool NaN)? TakeNonFinite()
    {
        if (_finiteStatus is null)
            return null;
        // Submitted first: the next batch starts with a barrier, which orders the copy after every check.
        _stream.Finish();
        Span<uint> status = stackalloc uint[1];
        ReadBack(_finiteStatus.Handle, 0, MemoryMarshal.AsBytes(status));
        if (status[0] == 0)
            return null;
        _stream.FillZero(_finiteStatus.Handle);
        uint code = ~status[0];
        return ((int)(code / 2), code % 2 == 0);
    }

    /// <summary>The check status word (zero: nothing found), made on the first check.</summary>
    private VkBuffer FiniteStatus()
    {
        if (_finiteStatus is null)
        {
            _finiteStatus = DeviceBuffer(16, "the finite-check status");
            _stream.FillZero(_finiteStatus.Handle);
        }
        return _finiteStatus.Handle;
    }

    public void AddNoise(Tensor values, long n, NoiseKey key, float scale) =>
        Elementwise(Kernels.Noise, n, [Vulkan(values, n, nameof(values))],
            (count, first) => new NoiseParameters { Count = count, First = (uint)first, KeyLow = key.Low, KeyHigh = key.High, Scale = scale });
}
