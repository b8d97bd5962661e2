using System.Reflection;
using Silk.NET.Vulkan;
using VkPipeline = Silk.NET.Vulkan.Pipeline;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// One compute pipeline: the shader's name, its descriptor-set and pipeline layouts, how many
/// storage buffers it binds, its push-constant size and its workgroup size. A dispatch checks the
/// buffers and push constants it is given against these.
/// </summary>
internal sealed record ComputePipeline(
    KernelSpec Spec,
    VkPipeline Handle,
    PipelineLayout Layout,
    DescriptorSetLayout SetLayout,
    int BindingCount,
    int PushConstantBytes,
    (uint X, uint Y, uint Z) WorkgroupSize)
{
    public string Name => Spec.Name;
}

/// <summary>
/// Creates the pipelines from the SPIR-V embedded in this assembly (compiled from shaders/ at build
/// time) on first use, through one VkPipelineCache, and destroys them with the device.
/// </summary>
internal sealed unsafe class PipelineSet : IDisposable
{
    private readonly VulkanDevice _device;
    private readonly Dictionary<string, ComputePipeline> _pipelines = [];
    private readonly PipelineCache _cache;

    public PipelineSet(VulkanDevice device, uint elementWorkgroup, bool subgroups)
    {
        _device = device;
        ElementWorkgroup = elementWorkgroup;
        Subgroups = subgroups;
        AttentionWorkgroup = Math.Min(64u, elementWorkgroup);
        AttentionTileVec4s = Math.Min(device.Limits.MaxComputeSharedMemorySize, MaxAttentionTileBytes) / (4 * sizeof(float));
        var info = new PipelineCacheCreateInfo { SType = StructureType.PipelineCacheCreateInfo };
        PipelineCache cache;
        VulkanException.Check(device.Vk.CreatePipelineCache(device.Device, &info, null, &cache), "vkCreatePipelineCache", "creating the pipeline cache");
        _cache = cache;
    }

    /// <summary>Shared memory the attention tiles use at most; more would not make lavapipe or small GPUs faster.</summary>
    private const uint MaxAttentionTileBytes = 32 << 10;

    /// <summary>Whether the per-row kernels are the <c>.subgroups</c> variants, which reduce through subgroup arithmetic.</summary>
    public bool Subgroups { get; }

    /// <summary>The SPIR-V a kernel runs: the per-row kernels' subgroup variant where <see cref="Subgroups"/>, else the kernel's own.</summary>
    public string ShaderOf(KernelSpec spec) => Subgroups && spec.Shape == KernelShape.Rows ? spec.Name + ".subgroups" : spec.Name;

    /// <summary>The width of the elementwise and per-row workgroups (a power of two within the device's limits).</summary>
    public uint ElementWorkgroup { get; }

    /// <summary>Rows per block of the attention kernels: one invocation per row, at most 64.</summary>
    public uint AttentionWorkgroup { get; }

    /// <summary>vec4s of shared memory the attention kernels stage tiles in, within maxComputeSharedMemorySize.</summary>
    public uint AttentionTileVec4s { get; }

    public ComputePipeline Get(KernelSpec spec)
    {
        if (_pipelines.TryGetValue(spec.Name, out var pipeline))
            return pipeline;
        pipeline = Create(spec);
        _pipelines.Add(spec.Name, pipeline);
        return pipeline;
    }

    /// <summary>The SPIR-V of shaders/&lt;name&gt;.comp, as the build embedded it.</summary>
    public static byte[] SpirV(string name)
    {
        string resource = $"LoraCompiler.Shaders.{name}.spv";
        using var stream = Assembly.GetExecutingAssembly().GetManifestResourceStream(resource)
            ?? throw new VulkanException($"The SPIR-V of shader '{name}' ({resource}) is not embedded in {Assembly.GetExecutingAssembly().GetName().Name}; " +
                                         "rebuild the runtime with glslc installed (apt-get install glslc).");
        var bytes = new byte[stream.Length];
        stream.ReadExactly(bytes);
        return bytes;
    }

    private ComputePipeline Create(KernelSpec spec)
    {
        var vk = _device.Vk;
        var device = _device.Device;
        byte[] code = SpirV(ShaderOf(spec));
        if (spec.PushConstantBytes > _device.Limits.MaxPushConstantsSize)
            throw new VulkanException($"Shader {spec.Name} needs {spec.PushConstantBytes} bytes of push constants; {_device.Name} allows {_device.Limits.MaxPushConstantsSize}.");
        if (spec.Bindings > _device.Limits.MaxPerStageDescriptorStorageBuffers)
            throw new VulkanException($"Shader {spec.Name} binds {spec.Bindings} storage buffers; {_device.Name} allows {_device.Limits.MaxPerStageDescriptorStorageBuffers} per stage.");

        ShaderModule module;
        fixed (byte* pCode = code)
        {
            var moduleInfo = new ShaderModuleCreateInfo
            {
                SType = StructureType.ShaderModuleCreateInfo,
                CodeSize = (nuint)code.Length,
                PCode = (uint*)pCode,
            };
            VulkanException.Check(vk.CreateShaderModule(device, &moduleInfo, null, &module), "vkCreateShaderModule", $"loading shader {spec.Name}");
        }
        try
        {
            var bindings = stackalloc DescriptorSetLayoutBinding[spec.Bindings];
            for (int i = 0; i < spec.Bindings; i++)
                bindings[i] = new DescriptorSetLayoutBinding
                {
                    Binding = (uint)i,
                    DescriptorType = DescriptorType.StorageBuffer,
                    DescriptorCount = 1,
                    StageFlags = ShaderStageFlags.ComputeBit,
                };
            var setInfo = new DescriptorSetLayoutCreateInfo
            {
                SType = StructureType.DescriptorSetLayoutCreateInfo,
                BindingCount = (uint)spec.Bindings,
                PBindings = bindings,
            };
            DescriptorSetLayout setLayout;
            VulkanException.Check(vk.CreateDescriptorSetLayout(device, &setInfo, null, &setLayout), "vkCreateDescriptorSetLayout", $"creating {spec.Name}");

            var range = new PushConstantRange { StageFlags = ShaderStageFlags.ComputeBit, Offset = 0, Size = (uint)spec.PushConstantBytes };
            var layoutInfo = new PipelineLayoutCreateInfo
            {
                SType = StructureType.PipelineLayoutCreateInfo,
                SetLayoutCount = 1,
                PSetLayouts = &setLayout,
                PushConstantRangeCount = 1,
                PPushConstantRanges = &range,
            };
            PipelineLayout layout;
            VulkanException.Check(vk.CreatePipelineLayout(device, &layoutInfo, null, &layout), "vkCreatePipelineLayout", $"creating {spec.Name}");

            // Specialization constant 0: the workgroup width of the elementwise, per-row and attention
            // kernels; constant 1: the attention kernels' shared tile, in vec4s.
            bool attention = spec.Shape == KernelShape.Attention;
            uint width = attention ? AttentionWorkgroup : ElementWorkgroup;
            var constants = stackalloc uint[] { width, AttentionTileVec4s };
            var entries = stackalloc SpecializationMapEntry[]
            {
                new() { ConstantID = 0, Offset = 0, Size = sizeof(uint) },
                new() { ConstantID = 1, Offset = sizeof(uint), Size = sizeof(uint) },
            };
            uint count = attention ? 2u : 1u;
            var specialization = new SpecializationInfo { MapEntryCount = count, PMapEntries = entries, DataSize = count * sizeof(uint), PData = constants };
            var main = (byte*)Silk.NET.Core.Native.SilkMarshal.StringToPtr("main");
            try
            {
                var pipelineInfo = new ComputePipelineCreateInfo
                {
                    SType = StructureType.ComputePipelineCreateInfo,
                    Stage = new PipelineShaderStageCreateInfo
                    {
                        SType = StructureType.PipelineShaderStageCreateInfo,
                        Stage = ShaderStageFlags.ComputeBit,
                        Module = module,
                        PName = main,
                        PSpecializationInfo = spec.Shape == KernelShape.Gemm ? null : &specialization,
                    },
                    Layout = layout,
                };
                VkPipeline handle;
                VulkanException.Check(vk.CreateComputePipelines(device, _cache, 1, &pipelineInfo, null, &handle), "vkCreateComputePipelines", $"creating {spec.Name}");
                var size = spec.Shape == KernelShape.Gemm ? (16u, 8u, 1u) : (width, 1u, 1u);
                return new ComputePipeline(spec, handle, layout, setLayout, spec.Bindings, spec.PushConstantBytes, size);
            }
            finally
            {
                Silk.NET.Core.Native.SilkMarshal.Free((nint)main);
            }
        }
        finally
        {
            vk.DestroyShaderModule(device, module, null);
        }
    }

    public void Dispose()
    {
        var vk = _device.Vk;
        foreach (var p in _pipelines.Values)
        {
            vk.DestroyPipeline(_device.Device, p.Handle, null);
            vk.DestroyPipelineLayout(_device.Device, p.Layout, null);
            vk.DestroyDescriptorSetLayout(_device.Device, p.SetLayout, null);
        }
        _pipelines.Clear();
        vk.DestroyPipelineCache(_device.Device, _cache, null);
    }
}
