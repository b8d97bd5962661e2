using Silk.NET.Vulkan;
using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// Records the backend's commands into command buffers and submits them in batches. Kernels are
/// recorded as they are called; a batch is submitted when the host needs a result
/// (<see cref="Finish"/>: downloads, the loss), when its staging memory is full, or after
/// <see cref="VulkanBackendOptions.CommandsPerBatch"/> commands (then without waiting, while the next
/// batch records). Two batches rotate, each with its own command buffer, fence, descriptor pools and
/// staging memory, so a batch's resources are reused only after its fence signalled.
///
/// Barriers: the stream tracks the buffers written and read since the last barrier and inserts one
/// (a global memory barrier between compute and transfer work) only before a command that reads or
/// writes something already written, or writes something already read. Every batch starts with one,
/// which orders it after all earlier submissions on the queue.
/// </summary>
internal sealed unsafe class CommandStream : IDisposable
{
    private const int FrameCount = 2;
    private const uint SetsPerPool = 512;

    private readonly VulkanDevice _device;
    private readonly Vk _vk;
    private readonly CommandPool _pool;
    private readonly Frame[] _frames = new Frame[FrameCount];
    private readonly int _commandsPerBatch;
    private readonly HashSet<ulong> _written = [], _read = [];
    private int _current;

    private sealed class Frame
    {
        public CommandBuffer Commands;
        public Fence Fence;
        public bool Recording, Submitted;
        public int CommandCount;
        public readonly List<DescriptorPool> Pools = [];
        public int PoolIndex;
        public VulkanBuffer Staging = null!;
        public ulong StagingUsed;
        public readonly List<IDisposable> Releases = [];
    }

    public CommandStream(VulkanDevice device, ulong stagingBytes, int commandsPerBatch)
    {
        _device = device;
        _vk = device.Vk;
        _commandsPerBatch = Math.Max(1, commandsPerBatch);
        StagingBytes = stagingBytes;
        var poolInfo = new CommandPoolCreateInfo
        {
            SType = StructureType.CommandPoolCreateInfo,
            Flags = CommandPoolCreateFlags.ResetCommandBufferBit,
            QueueFamilyIndex = device.QueueFamily,
        };
        CommandPool pool;
        VulkanException.Check(_vk.CreateCommandPool(device.Device, &poolInfo, null, &pool), "vkCreateCommandPool", "creating the command pool");
        _pool = pool;
        for (int i = 0; i < FrameCount; i++)
        {
            var frame = new Frame();
            var allocate = new CommandBufferAllocateInfo
            {
                SType = StructureType.CommandBufferAllocateInfo,
                CommandPool = _pool,
                Level = CommandBufferLevel.Primary,
                CommandBufferCount = 1,
            };
            VulkanException.Check(_vk.AllocateCommandBuffers(device.Device, &allocate, out frame.Commands), "vkAllocateCommandBuffers", "creating command buffers");
            var fenceInfo = new FenceCreateInfo { SType = StructureType.FenceCreateInfo };
            VulkanException.Check(_vk.CreateFence(device.Device, &fenceInfo, null, out frame.Fence), "vkCreateFence", "creating fences");
            frame.Staging = device.CreateBuffer(stagingBytes, BufferUsageFlags.TransferSrcBit,
                MemoryPropertyFlags.HostVisibleBit | MemoryPropertyFlags.HostCoherentBit, 0, "upload staging memory");
            _frames[i] = frame;
        }
    }

    /// <summary>Bytes of staging memory per batch: the most one upload piece can be.</summary>
    public ulong StagingBytes { get; }

    /// <summary>Bytes copied from the host through the staging memory so far.</summary>
    public long UploadedBytes { get; private set; }

    /// <summary>Batches submitted so far (for tests and the benchmark).</summary>
    public int Submissions { get; private set; }

    private Frame Current => _frames[_current];

    /// <summary>The command buffer being recorded, begun if needed.</summary>
    private CommandBuffer Recording()
    {
        var frame = Current;
        if (!frame.Recording)
        {
            var begin = new CommandBufferBeginInfo
            {
                SType = StructureType.CommandBufferBeginInfo,
                Flags = CommandBufferUsageFlags.OneTimeSubmitBit,
            };
            VulkanException.Check(_vk.BeginCommandBuffer(frame.Commands, &begin), "vkBeginCommandBuffer", "recording commands");
            frame.Recording = true;
            frame.CommandCount = 0;
            Barrier(frame.Commands);
        }
        return frame.Commands;
    }

    // ---------------------------------------------------------------- hazards

    /// <summary>Notes what the next command reads and writes, with a barrier first if it depends on earlier work.</summary>
    private void Access(CommandBuffer commands, ReadOnlySpan<VkBuffer> buffers, Func<int, bool> writes)
    {
        bool hazard = false;
        for (int i = 0; i < buffers.Length && !hazard; i++)
        {
            ulong h = buffers[i].Handle;
            hazard = _written.Contains(h) || (writes(i) && _read.Contains(h));
        }
        if (hazard)
            Barrier(commands);
        for (int i = 0; i < buffers.Length; i++)
            (writes(i) ? _written : _read).Add(buffers[i].Handle);
    }

    private void Barrier(CommandBuffer commands)
    {
        var barrier = new MemoryBarrier
        {
            SType = StructureType.MemoryBarrier,
            SrcAccessMask = AccessFlags.ShaderWriteBit | AccessFlags.TransferWriteBit,
            DstAccessMask = AccessFlags.ShaderReadBit | AccessFlags.ShaderWriteBit | AccessFlags.TransferReadBit | AccessFlags.TransferWriteBit,
        };
        var stages = PipelineStageFlags.ComputeShaderBit | PipelineStageFlags.TransferBit;
        _vk.CmdPipelineBarrier(commands, stages, stages, 0, 1, &barrier, 0, null, 0, null);
        _written.Clear();
        _read.Clear();
    }

    private void Recorded()
    {
        if (++Current.CommandCount >= _commandsPerBatch)
            Submit();
    }

    // ---------------------------------------------------------------- commands

    /// <summary>Records one dispatch of <paramref name="pipeline"/> over the given buffers (binding order) and push constants.</summary>
    public void Dispatch<T>(ComputePipeline pipeline, ReadOnlySpan<VkBuffer> buffers, in T push, uint groupsX, uint groupsY = 1, uint groupsZ = 1)
        where T : unmanaged
    {
        if (buffers.Length != pipeline.BindingCount)
            throw new InvalidOperationException($"Kernel {pipeline.Name} binds {pipeline.BindingCount} buffers; {buffers.Length} were given.");
        if (sizeof(T) != pipeline.PushConstantBytes)
            throw new InvalidOperationException($"Kernel {pipeline.Name} takes {pipeline.PushConstantBytes} bytes of push constants; {typeof(T).Name} has {sizeof(T)}.");
        var max = _device.MaxWorkGroupCount;
        if (groupsX == 0 || groupsY == 0 || groupsZ == 0)
            return;
        if (groupsX > max.X || groupsY > max.Y || groupsZ > max.Z)
            throw new InvalidOperationException($"Kernel {pipeline.Name}: {groupsX}×{groupsY}×{groupsZ} workgroups exceed the device's maxComputeWorkGroupCount.");

        var commands = Recording();
        var set = AllocateSet(pipeline.SetLayout);
        var infos = stackalloc DescriptorBufferInfo[buffers.Length];
        var writes = stackalloc WriteDescriptorSet[buffers.Length];
        for (int i = 0; i < buffers.Length; i++)
        {
            infos[i] = new DescriptorBufferInfo { Buffer = buffers[i], Offset = 0, Range = Vk.WholeSize };
            writes[i] = new WriteDescriptorSet
            {
                SType = StructureType.WriteDescriptorSet,
                DstSet = set,
                DstBinding = (uint)i,
                DescriptorCount = 1,
                DescriptorType = DescriptorType.StorageBuffer,
                PBufferInfo = &infos[i],
            };
        }
        _vk.UpdateDescriptorSets(_device.Device, (uint)buffers.Length, writes, 0, null);

        var spec = pipeline.Spec;
        Access(commands, buffers, spec.Writes);
        _vk.CmdBindPipeline(commands, PipelineBindPoint.Compute, pipeline.Handle);
        _vk.CmdBindDescriptorSets(commands, PipelineBindPoint.Compute, pipeline.Layout, 0, 1, &set, 0, null);
        fixed (T* p = &push)
            _vk.CmdPushConstants(commands, pipeline.Layout, ShaderStageFlags.ComputeBit, 0, (uint)sizeof(T), p);
        _vk.CmdDispatch(commands, groupsX, groupsY, groupsZ);
        Recorded();
    }

    /// <summary>Records a copy between device buffers.</summary>
    public void CopyBuffer(VkBuffer source, ulong sourceOffset, VkBuffer destination, ulong destinationOffset, ulong bytes)
    {
        if (bytes == 0)
            return;
        var commands = Recording();
        ReadOnlySpan<VkBuffer> both = [source, destination];
        Access(commands, both, i => i == 1);
        var region = new BufferCopy { SrcOffset = sourceOffset, DstOffset = destinationOffset, Size = bytes };
        _vk.CmdCopyBuffer(commands, source, destination, 1, &region);
        Recorded();
    }

    /// <summary>Records a fill of a whole buffer with zero bytes.</summary>
    public void FillZero(VkBuffer buffer)
    {
        var commands = Recording();
        ReadOnlySpan<VkBuffer> one = [buffer];
        Access(commands, one, _ => true);
        _vk.CmdFillBuffer(commands, buffer, 0, Vk.WholeSize, 0);
        Recorded();
    }

    /// <summary>
    /// Copies <paramref name="data"/> into this batch's staging memory and records its copy to
    /// <paramref name="destination"/>, in order with the kernels around it. Submits first when the
    /// staging memory is full; <paramref name="data"/> must fit in <see cref="StagingBytes"/>.
    /// </summary>
    public void Upload(ReadOnlySpan<byte> data, VkBuffer destination, ulong destinationOffset)
    {
        ulong bytes = (ulong)data.Length;
        if (bytes == 0)
            return;
        if (bytes > StagingBytes)
            throw new ArgumentException($"An upload piece of {bytes} bytes is larger than the staging memory ({StagingBytes}).");
        ulong at = (Current.StagingUsed + 15) & ~15ul;
        if (at + bytes > StagingBytes)
        {
            Submit();
            at = 0;
        }
        var frame = Current;
        data.CopyTo(new Span<byte>((byte*)frame.Staging.Mapped + at, data.Length));
        UploadedBytes += data.Length;
        frame.StagingUsed = at + bytes;
        var commands = Recording();
        ReadOnlySpan<VkBuffer> one = [destination];
        Access(commands, one, _ => true);
        var region = new BufferCopy { SrcOffset = at, DstOffset = destinationOffset, Size = bytes };
        _vk.CmdCopyBuffer(commands, frame.Staging.Handle, destination, 1, &region);
        Recorded();
    }

    /// <summary>Disposes <paramref name="resource"/> once the commands recorded so far have run.</summary>
    public void ReleaseLater(IDisposable resource)
    {
        if (Current.Recording)
            Current.Releases.Add(resource);
        else
        {
            // Nothing recorded in this batch can use it; earlier batches may.
            Finish();
            resource.Dispose();
        }
    }

    // ---------------------------------------------------------------- submission

    /// <summary>Submits the batch being recorded (if any) without waiting, and moves to the next.</summary>
    public void Submit()
    {
        var frame = Current;
        if (!frame.Recording)
            return;
        VulkanException.Check(_vk.EndCommandBuffer(frame.Commands), "vkEndCommandBuffer", "finishing a batch of commands");
        frame.Recording = false;
        var commands = frame.Commands;
        var submit = new SubmitInfo
        {
            SType = StructureType.SubmitInfo,
            CommandBufferCount = 1,
            PCommandBuffers = &commands,
        };
        VulkanException.Check(_vk.QueueSubmit(_device.Queue, 1, &submit, frame.Fence), "vkQueueSubmit", "submitting work to the device");
        frame.Submitted = true;
        Submissions++;
        _written.Clear();
        _read.Clear();
        _current = (_current + 1) % FrameCount;
        Wait(Current);
    }

    /// <summary>Submits everything recorded and waits until the device has run it.</summary>
    public void Finish()
    {
        Submit();
        foreach (var frame in _frames)
            Wait(frame);
    }

    private void Wait(Frame frame)
    {
        if (frame.Submitted)
        {
            var fence = frame.Fence;
            VulkanException.Check(_vk.WaitForFences(_device.Device, 1, &fence, true, ulong.MaxValue), "vkWaitForFences", "waiting for the device");
            VulkanException.Check(_vk.ResetFences(_device.Device, 1, &fence), "vkResetFences", "reusing a fence");
            frame.Submitted = false;
        }
        if (frame.Recording)
            return;
        foreach (var pool in frame.Pools)
            _vk.ResetDescriptorPool(_device.Device, pool, 0);
        frame.PoolIndex = 0;
        frame.StagingUsed = 0;
        foreach (var r in frame.Releases)
            r.Dispose();
        frame.Releases.Clear();
    }

    private DescriptorSet AllocateSet(DescriptorSetLayout layout)
    {
        var frame = Current;
        while (true)
        {
            if (frame.PoolIndex == frame.Pools.Count)
                frame.Pools.Add(CreatePool());
            var info = new DescriptorSetAllocateInfo
            {
                SType = StructureType.DescriptorSetAllocateInfo,
                DescriptorPool = frame.Pools[frame.PoolIndex],
                DescriptorSetCount = 1,
                PSetLayouts = &layout,
            };
            DescriptorSet set;
            var result = _vk.AllocateDescriptorSets(_device.Device, &info, &set);
            if (result == Result.Success)
                return set;
            if (result is Result.ErrorOutOfPoolMemory or Result.ErrorFragmentedPool)
            {
                frame.PoolIndex++;
                continue;
            }
            throw VulkanException.From(result, "vkAllocateDescriptorSets", "binding buffers to a kernel");
        }
    }

    private DescriptorPool CreatePool()
    {
        var size = new DescriptorPoolSize { Type = DescriptorType.StorageBuffer, DescriptorCount = SetsPerPool * 6 };
        var info = new DescriptorPoolCreateInfo
        {
            SType = StructureType.DescriptorPoolCreateInfo,
            MaxSets = SetsPerPool,
            PoolSizeCount = 1,
            PPoolSizes = &size,
        };
        DescriptorPool pool;
        VulkanException.Check(_vk.CreateDescriptorPool(_device.Device, &info, null, &pool), "vkCreateDescriptorPool", "creating descriptor pools");
        return pool;
    }

    public void Dispose()
    {
        try
        {
            Finish();
        }
        catch (VulkanException)
        {
            // A lost device: tear down what can be torn down.
        }
        foreach (var frame in _frames)
        {
            foreach (var r in frame.Releases)
                r.Dispose();
            foreach (var pool in frame.Pools)
                _vk.DestroyDescriptorPool(_device.Device, pool, null);
            _vk.DestroyFence(_device.Device, frame.Fence, null);
            frame.Staging.Dispose();
        }
        _vk.DestroyCommandPool(_device.Device, _pool, null);
    }
}
