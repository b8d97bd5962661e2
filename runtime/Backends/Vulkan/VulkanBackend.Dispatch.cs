using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>Dispatching kernels, and the checks that map tensors to the buffers a kernel binds.</summary>
public sealed unsafe partial class VulkanBackend
{
    // ---------------------------------------------------------------- dispatch

    /// <summary>One invocation per item: groups of the workgroup width, folded into y past maxComputeWorkGroupCount[0].</summary>
    private void RunElements<T>(KernelSpec kernel, in T push, long invocations, ReadOnlySpan<VkBuffer> buffers) where T : unmanaged
    {
        var pipeline = _pipelines.Get(kernel);
        if (invocations > uint.MaxValue)
            throw new VulkanException($"Kernel {kernel.Name} would need {invocations} invocations, more than a 32-bit index reaches; use a shorter --seq.");
        long groups = (invocations + pipeline.WorkgroupSize.X - 1) / pipeline.WorkgroupSize.X;
        Dispatch1D(pipeline, push, groups, buffers);
    }

    /// <summary>One workgroup per row.</summary>
    private void RunRows<T>(KernelSpec kernel, in T push, long rows, ReadOnlySpan<VkBuffer> buffers) where T : unmanaged
        => Dispatch1D(_pipelines.Get(kernel), push, rows, buffers);

    private void Dispatch1D<T>(ComputePipeline pipeline, in T push, long groups, ReadOnlySpan<VkBuffer> buffers) where T : unmanaged
    {
        if (groups <= 0)
            return;
        long maxX = _maxGroups.X;
        long x = Math.Min(groups, maxX), y = (groups + x - 1) / x;
        if (y > _maxGroups.Y)
            throw new VulkanException($"Kernel {pipeline.Name} would need {groups} workgroups, more than {_device.Name} can dispatch; use a shorter --seq.");
        _stream.Dispatch(pipeline, buffers, push, (uint)x, (uint)y);
    }

    private void Gemm(KernelSpec kernel, VkBuffer c, VkBuffer a, VkBuffer b, VkBuffer bias, GemmParameters p) => Gemm(kernel, [c, a, b, bias], p);

    /// <summary>
    /// A matrix product, in several dispatches when its tiles exceed maxComputeWorkGroupCount. A q4
    /// kernel (<paramref name="groupSize"/> &gt; 0) takes the group size after the product's parameters,
    /// a w16 kernel (<paramref name="bFormat"/> &gt; 0) the weight's storage format.
    /// </summary>
    private void Gemm(KernelSpec kernel, ReadOnlySpan<VkBuffer> buffers, GemmParameters p, uint groupSize = 0, uint bFormat = 0)
    {
        if (p.Rows == 0 || p.Cols == 0)
            return;
        var pipeline = _pipelines.Get(kernel);
        uint rowTiles = (p.Rows + GemmTile - 1) / GemmTile, colTiles = (p.Cols + GemmTile - 1) / GemmTile;
        uint maxX = _maxGroups.X, maxY = _maxGroups.Y;
        for (uint r0 = 0; r0 < rowTiles; r0 += maxY)
            for (uint c0 = 0; c0 < colTiles; c0 += maxX)
            {
                p.FirstRowTile = r0;
                p.FirstColTile = c0;
                uint x = Math.Min(maxX, colTiles - c0), y = Math.Min(maxY, rowTiles - r0);
                if (groupSize != 0)
                    _stream.Dispatch(pipeline, buffers, new Q4GemmParameters { Gemm = p, GroupSize = groupSize }, x, y);
                else if (bFormat != 0)
                    _stream.Dispatch(pipeline, buffers, new W16GemmParameters { Gemm = p, BFormat = bFormat }, x, y);
                else
                    _stream.Dispatch(pipeline, buffers, p, x, y);
            }
    }

    // ---------------------------------------------------------------- checks

    private VulkanTensor Vulkan(Tensor t, long n, string name)
    {
        var v = t as VulkanTensor ?? throw new ArgumentException(t switch
        {
            VulkanQ4Tensor => $"{t} is a 4-bit weight, which only the products and the embedding read.",
            VulkanFloat16Tensor => $"{t} is a 16-bit weight, which only the products, the embedding, the norms and the bias read.",
            _ => $"{t} is a {t.GetType().Name}, not a VulkanTensor.",
        }, name);
        if (v.Owner != this)
            throw new ArgumentException($"{t} belongs to another VulkanBackend.", name);
        if (n < 0 || n > v.Length)
            throw new ArgumentOutOfRangeException(name, n, $"{t} holds {v.Length} floats, the kernel needs {n}.");
        return v;
    }

    /// <summary>
    /// The weight of a product, [rows, columns] (at least that many rows of a float weight): a
    /// <see cref="VulkanTensor"/> or a <see cref="VulkanQ4Tensor"/> of exactly that shape.
    /// </summary>
    private Tensor Weight(Tensor w, long rows, int columns, string name)
    {
        if (w is VulkanQ4Tensor q)
        {
            Check(q, rows, columns, name);
            return q;
        }
        if (w is VulkanFloat16Tensor h)
        {
            Check(h, rows, columns, name);
            return h;
        }
        return Vulkan(w, rows * columns, name);
    }

    private void Check(VulkanFloat16Tensor h, long rows, int columns, string name)
    {
        if (h.Owner != this)
            throw new ArgumentException($"{h} belongs to another VulkanBackend.", name);
        if (h.Columns != columns || h.Rows < rows)
            throw new ArgumentException($"{h} is [{h.Rows}, {h.Columns}]; the kernel needs [{rows}, {columns}].", name);
    }

    /// <summary>
    /// A vector a kernel reads through a storage-format push constant (a norm weight, a bias): the
    /// buffer holding its first n values and its format (shaders/common/float16.glsl: 0 for a float
    /// tensor, 1 or 2 for a 16-bit weight, whose vector is one part).
    /// </summary>
    private (VkBuffer Buffer, uint Format) StoredVector(Tensor t, long n, string name)
    {
        if (t is not VulkanFloat16Tensor h)
            return (Single(t, n, name), 0u);
        if (h.Owner != this)
            throw new ArgumentException($"{h} belongs to another VulkanBackend.", name);
        if (n < 0 || n > h.Length || h.PartCount != 1)
            throw new ArgumentOutOfRangeException(name, n, $"{h} in {h.PartCount} parts holds {h.Length} values, the kernel needs {n} in one.");
        return (h.Parts[0].Buffer.Handle, h.ShaderFormat);
    }

    private void Check(VulkanQ4Tensor q, long rows, int columns, string name)
    {
        if (q.Owner != this)
            throw new ArgumentException($"{q} belongs to another VulkanBackend.", name);
        if (q.Columns != columns || q.Rows < rows)
            throw new ArgumentException($"{q} is [{q.Rows}, {q.Columns}]; the kernel needs [{rows}, {columns}].", name);
    }

    private VkBuffer Single(Tensor t, long n, string name) => Single(Vulkan(t, n, name), n);

    /// <summary>The buffer holding the first n elements, which must all lie in part 0.</summary>
    private VkBuffer Single(VulkanTensor t, long n)
    {
        if (n > t.PartLength)
            throw new VulkanException(
                $"{t.Name} needs {VulkanDevice.Megabytes((ulong)n * sizeof(float))} in one buffer, more than {_device.Name} allows in one " +
                $"storage buffer ({VulkanDevice.Megabytes((ulong)t.PartLength * sizeof(float))}). Use a shorter --seq or a smaller model.");
        return t.Part(0);
    }
}
