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
        Optimizer(push, n, Vulkan(parameter, n, nameof(parameter)), Vulkan(m, n, nameof(m)), Vulkan(v, n, nameof(v)), Vulkan(gradient, n, nameof(gradient)));
    }

    public void SgdUpdate(Tensor parameter, Tensor gradient, long n, float learningRate, float gradScale)
    {
        if (gradScale == 0)
            return;
        var p = Vulkan(parameter, n, nameof(parameter));
        var push = new OptimizerParameters { Sgd = 1, LearningRate = learningRate, GradScale = gradScale };
        // m and v are not read by the SGD path; the parameter stands in for their bindings.
        Optimizer(push, n, p, p, p, Vulkan(gradient, n, nameof(gradient)));
    }

    private void Optimizer(OptimizerParameters push, long n, params VulkanTensor[] tensors)
    {
        Span<VkBuffer> buffers = stackalloc VkBuffer[tensors.Length];
        for (int k = 0; (long)k * PartLength < n; k++)
        {
            long count = Math.Min(PartLength, n - (long)k * PartLength);
            for (int i = 0; i < tensors.Length; i++)
                buffers[i] = tensors[i].Part(k);
            push.Count = (uint)count;
            RunElements(Kernels.AdamW, push, count, buffers);
        }
    }

    public void CheckFinite(Tensor values, long n, int check)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(check);
        var t = Vulkan(values, n, nameof(values));
        var status = FiniteStatus();
        for (int k = 0; (long)k * PartLength < n; k++)
        {
            long count = Math.Min(PartLength, n - (long)k * PartLength);
            RunElements(Kernels.CheckFinite, new CheckParameters { Count = (uint)count, Check = (uint)check }, count, [t.Part(k), status]);
        }
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

    public void AddNoise(Tensor values, long n, NoiseKey key, float scale)
    {
        var t = Vulkan(values, n, nameof(values));
        for (int k = 0; (long)k * PartLength < n; k++)
        {
            long count = Math.Min(PartLength, n - (long)k * PartLength);
            var push = new NoiseParameters
            {
                Count = (uint)count, First = (uint)(k * PartLength), KeyLow = key.Low, KeyHigh = key.High, Scale = scale,
            };
            RunElements(Kernels.Noise, push, count, [t.Part(k)]);
        }
    }
}
