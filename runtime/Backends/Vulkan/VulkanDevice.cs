using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Silk.NET.Core;
using Silk.NET.Core.Native;
using Silk.NET.Vulkan;
using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>One physical device as <see cref="VulkanDevice.List"/> reports it.</summary>
public sealed record VulkanDeviceInfo(int Index, string Name, PhysicalDeviceType Type, string ApiVersion, bool HasCompute, uint MaxStorageBufferRange)
{
    public override string ToString() =>
        $"{Index}: {Name} ({TypeName(Type)}, Vulkan {ApiVersion}, maxStorageBufferRange {VulkanDevice.Megabytes(MaxStorageBufferRange)}" +
        $"{(HasCompute ? "" : ", no compute queue")})";

    internal static string TypeName(PhysicalDeviceType type) => type switch
    {
        PhysicalDeviceType.DiscreteGpu => "discrete GPU",
        PhysicalDeviceType.IntegratedGpu => "integrated GPU",
        PhysicalDeviceType.VirtualGpu => "virtual GPU",
        PhysicalDeviceType.Cpu => "CPU",
        _ => "other",
    };
}

/// <summary>
/// The Vulkan instance, the chosen physical device, its logical device and compute queue, and the
/// limits the backend must respect. Device choice: <see cref="VulkanBackendOptions.DeviceIndex"/> or
/// <see cref="VulkanBackendOptions.DeviceName"/> when given, otherwise the first discrete GPU, then
/// integrated, virtual, other, and last a CPU implementation such as Mesa's lavapipe.
/// </summary>
public sealed unsafe class VulkanDevice : IDisposable
{
    private const string ValidationLayer = "VK_LAYER_KHRONOS_validation";
    private const string DebugUtilsExtension = "VK_EXT_debug_utils";
    private const string MemoryBudgetExtension = "VK_EXT_memory_budget";

    private readonly List<string> _validationErrors = [];
    private GCHandle _self;
    private DebugUtilsMessengerEXT _messenger;
    private bool _disposed;

    internal Vk Vk { get; }
    internal Instance Instance { get; }
    internal PhysicalDevice Physical { get; }
    internal Device Device { get; }
    internal Queue Queue { get; }
    internal uint QueueFamily { get; }
    internal PhysicalDeviceLimits Limits { get; }
    private readonly PhysicalDeviceMemoryProperties _memory;
    private readonly MemoryCounter _counter = new();

    /// <summary>The device's name as its driver reports it, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)".</summary>
    public string Name { get; }
    public PhysicalDeviceType Type { get; }
    public int Index { get; }

    /// <summary>True when the validation layer is loaded and its errors are collected.</summary>
    public bool ValidationEnabled { get; }

    /// <summary>The validation layer's error messages so far (empty without validation).</summary>
    public IReadOnlyList<string> ValidationErrors
    {
        get { lock (_validationErrors) return _validationErrors.ToArray(); }
    }

    public uint MaxStorageBufferRange => Limits.MaxStorageBufferRange;

    /// <summary>maxComputeWorkGroupCount: workgroups one dispatch may have in x, y and z.</summary>
    public (uint X, uint Y, uint Z) MaxWorkGroupCount { get; }

    /// <summary>maxComputeWorkGroupSize: invocations a workgroup may have in x, y and z.</summary>
    public (uint X, uint Y, uint Z) MaxWorkGroupSize { get; }

    public uint MaxWorkGroupInvocations => Limits.MaxComputeWorkGroupInvocations;

    /// <summary>The options the device was opened with (the backend reads its residency limit from them).</summary>
    internal VulkanBackendOptions Options { get; }

    /// <summary>The PCI vendor id the driver reports (0x10DE NVIDIA, 0x1002 AMD, 0x8086 Intel, 0x5143 Qualcomm, 0x13B5 Arm, 0x10005 Mesa's lavapipe).</summary>
    public uint VendorId { get; }

    /// <summary>Invocations per subgroup (0 on a Vulkan 1.0 device, which reports none).</summary>
    public uint SubgroupSize { get; }

    /// <summary>Whether compute shaders may use subgroup arithmetic (subgroupAdd, subgroupMax): Vulkan 1.1's subgroup properties.</summary>
    public bool SubgroupArithmetic { get; }

    /// <summary>Whether the device reads and writes 16-bit values in storage buffers (<c>storageBuffer16BitAccess</c>, VK_KHR_16bit_storage, core in 1.1).</summary>
    public bool Storage16Bit { get; }

    /// <summary>Whether shaders may compute in 16-bit floats (<c>shaderFloat16</c>, VK_KHR_shader_float16_int8, core in 1.2).</summary>
    public bool Float16Arithmetic { get; }

    /// <summary>True when the device offers <c>VK_EXT_memory_budget</c> and it is enabled: <see cref="Budget"/> then asks the driver.</summary>
    public bool HasMemoryBudget { get; }

    /// <summary>The memory heap device-local buffers are allocated from (the heap of the first device-local memory type).</summary>
    public int DeviceLocalHeap { get; }

    /// <summary>The size of <see cref="DeviceLocalHeap"/> in bytes, as the driver reports it.</summary>
    public long DeviceLocalHeapBytes => (long)_memory.MemoryHeaps[DeviceLocalHeap].Size;

    public VulkanDevice(VulkanBackendOptions? options = null)
    {
        options ??= new VulkanBackendOptions();
        Options = options;
        Vk = LoadApi();
        bool wantValidation = options.Validation ?? Environment.GetEnvironmentVariable("LORA_VULKAN_VALIDATION") == "1";
        ValidationEnabled = wantValidation && HasLayer(Vk, ValidationLayer);
        bool debugUtils = ValidationEnabled && HasExtension(Vk, DebugUtilsExtension, ValidationLayer);
        Instance = CreateInstance(Vk, ValidationEnabled, debugUtils);
        try
        {
            if (debugUtils)
                CreateMessenger();

            var candidates = Enumerate(Vk, Instance);
            var (physical, info) = Choose(candidates, options);
            Physical = physical;
            Index = info.Index;
            Name = info.Name;
            Type = info.Type;
            Vk.GetPhysicalDeviceProperties(Physical, out var properties);
            Limits = properties.Limits;
            var limits = properties.Limits;
            MaxWorkGroupCount = (limits.MaxComputeWorkGroupCount[0], limits.MaxComputeWorkGroupCount[1], limits.MaxComputeWorkGroupCount[2]);
            MaxWorkGroupSize = (limits.MaxComputeWorkGroupSize[0], limits.MaxComputeWorkGroupSize[1], limits.MaxComputeWorkGroupSize[2]);
            Vk.GetPhysicalDeviceMemoryProperties(Physical, out _memory);
            DeviceLocalHeap = FindDeviceLocalHeap(_memory);
            QueueFamily = ComputeFamily(Vk, Physical)!.Value;
            VendorId = properties.VendorID;
            if (properties.ApiVersion >= Vk.Version11)
                (SubgroupSize, SubgroupArithmetic, Storage16Bit, Float16Arithmetic) = Features(Vk, Physical);
            // VK_EXT_memory_budget is read through vkGetPhysicalDeviceMemoryProperties2, core in Vulkan 1.1.
            HasMemoryBudget = properties.ApiVersion >= Vk.Version11 && HasDeviceExtension(Vk, Physical, MemoryBudgetExtension);
            var budgetExtension = (byte*)SilkMarshal.StringToPtr(MemoryBudgetExtension);

            float priority = 1f;
            var queueInfo = new DeviceQueueCreateInfo
            {
                SType = StructureType.DeviceQueueCreateInfo,
                QueueFamilyIndex = QueueFamily,
                QueueCount = 1,
                PQueuePriorities = &priority,
            };
            var deviceInfo = new DeviceCreateInfo
            {
                SType = StructureType.DeviceCreateInfo,
                QueueCreateInfoCount = 1,
                PQueueCreateInfos = &queueInfo,
                EnabledExtensionCount = HasMemoryBudget ? 1u : 0u,
                PpEnabledExtensionNames = HasMemoryBudget ? &budgetExtension : null,
            };
            Device device;
            try
            {
                VulkanException.Check(Vk.CreateDevice(Physical, &deviceInfo, null, &device), "vkCreateDevice", $"opening {Name}");
            }
            finally
            {
                SilkMarshal.Free((nint)budgetExtension);
            }
            Device = device;
            Queue queue;
            Vk.GetDeviceQueue(Device, QueueFamily, 0, &queue);
            Queue = queue;
        }
        catch
        {
            DestroyInstance();
            throw;
        }
    }

    /// <summary>The physical devices this machine's Vulkan loader reports, in its order (the order --device N counts in).</summary>
    public static IReadOnlyList<VulkanDeviceInfo> List()
    {
        var vk = LoadApi();
        var instance = CreateInstance(vk, validation: false, debugUtils: false);
        try
        {
            return Enumerate(vk, instance).Select(c => c.Info).ToArray();
        }
        finally
        {
            vk.DestroyInstance(instance, null);
        }
    }

    /// <summary>True when a Vulkan loader and at least one device with a compute queue are present; otherwise why not.</summary>
    public static bool IsAvailable(out string reason)
    {
        try
        {
            var devices = List();
            if (devices.Any(d => d.HasCompute))
            {
                reason = "";
                return true;
            }
            reason = devices.Count == 0 ? $"the Vulkan loader reports no device. {VulkanException.InstallHint}" : "no Vulkan device has a compute queue.";
            return false;
        }
        catch (VulkanException e)
        {
            reason = e.Message;
            return false;
        }
    }

    /// <summary>What a Vulkan 1.1 device offers the kernels: its subgroups, 16-bit storage and 16-bit arithmetic.</summary>
    private static (uint SubgroupSize, bool Arithmetic, bool Storage16, bool Float16) Features(Vk vk, PhysicalDevice physical)
    {
        var subgroup = new PhysicalDeviceSubgroupProperties { SType = StructureType.PhysicalDeviceSubgroupProperties };
        var properties = new PhysicalDeviceProperties2 { SType = StructureType.PhysicalDeviceProperties2, PNext = &subgroup };
        vk.GetPhysicalDeviceProperties2(physical, &properties);
        bool arithmetic = (subgroup.SupportedOperations & SubgroupFeatureFlags.ArithmeticBit) != 0
                          && (subgroup.SupportedStages & ShaderStageFlags.ComputeBit) != 0;

        bool hasFloat16 = HasDeviceExtension(vk, physical, "VK_KHR_shader_float16_int8");
        var float16 = new PhysicalDeviceShaderFloat16Int8Features { SType = StructureType.PhysicalDeviceShaderFloat16Int8Features };
        var storage = new PhysicalDevice16BitStorageFeatures
        {
            SType = StructureType.PhysicalDevice16BitStorageFeatures,
            // Chained only where the extension is offered: the instance asks for Vulkan 1.1.
            PNext = hasFloat16 ? &float16 : null,
        };
        var features = new PhysicalDeviceFeatures2 { SType = StructureType.PhysicalDeviceFeatures2, PNext = &storage };
        vk.GetPhysicalDeviceFeatures2(physical, &features);
        return (subgroup.SubgroupSize, arithmetic, storage.StorageBuffer16BitAccess, hasFloat16 && float16.ShaderFloat16);
    }

    // ---------------------------------------------------------------- memory

    /// <summary>
    /// A buffer with its own memory, of a type that has <paramref name="required"/> and preferably
    /// <paramref name="preferred"/>. It is counted in <see cref="Memory"/>: as host-visible staging
    /// memory when <paramref name="required"/> asks for host-visible memory, else as device-local
    /// memory of the backend's own (<see cref="DeviceBufferRole.Backend"/>) until <see cref="Assign"/>
    /// says what it holds.
    /// </summary>
    internal VulkanBuffer CreateBuffer(ulong bytes, BufferUsageFlags usage, MemoryPropertyFlags required, MemoryPropertyFlags preferred, string what)
    {
        var info = new BufferCreateInfo
        {
            SType = StructureType.BufferCreateInfo,
            Size = Math.Max(bytes, 4),
            Usage = usage,
            SharingMode = SharingMode.Exclusive,
        };
        VkBuffer buffer;
        VulkanException.Check(Vk.CreateBuffer(Device, &info, null, &buffer), "vkCreateBuffer", $"creating {what} ({Megabytes(bytes)})");
        MemoryRequirements requirements;
        Vk.GetBufferMemoryRequirements(Device, buffer, &requirements);
        int type = MemoryType(requirements.MemoryTypeBits, required | preferred);
        if (type < 0)
            type = MemoryType(requirements.MemoryTypeBits, required);
        if (type < 0)
        {
            Vk.DestroyBuffer(Device, buffer, null);
            throw new VulkanException($"{Name} has no memory type with {required} for {what}.");
        }
        var allocate = new MemoryAllocateInfo
        {
            SType = StructureType.MemoryAllocateInfo,
            AllocationSize = requirements.Size,
            MemoryTypeIndex = (uint)type,
        };
        DeviceMemory memory;
        var result = Vk.AllocateMemory(Device, &allocate, null, &memory);
        if (result != Result.Success)
        {
            Vk.DestroyBuffer(Device, buffer, null);
            throw VulkanException.From(result, "vkAllocateMemory", $"allocating {Megabytes(bytes)} for {what}");
        }
        VulkanException.Check(Vk.BindBufferMemory(Device, buffer, memory, 0), "vkBindBufferMemory", $"binding memory for {what}");
        void* mapped = null;
        bool staging = (required & MemoryPropertyFlags.HostVisibleBit) != 0;
        if ((_memory.MemoryTypes[type].PropertyFlags & MemoryPropertyFlags.HostVisibleBit) != 0 && staging)
        {
            var mapResult = Vk.MapMemory(Device, memory, 0, Vk.WholeSize, 0, &mapped);
            if (mapResult != Result.Success)
            {
                Vk.DestroyBuffer(Device, buffer, null);
                Vk.FreeMemory(Device, memory, null);
                throw VulkanException.From(mapResult, "vkMapMemory", $"mapping {what}");
            }
        }
        var created = new VulkanBuffer(this, buffer, memory, bytes, (long)requirements.Size, mapped,
            staging ? DeviceBufferRole.Staging : DeviceBufferRole.Backend);
        _counter.Add(created);
        return created;
    }

    /// <summary>Counts <paramref name="buffer"/> as holding <paramref name="role"/> from now on (a device-local buffer only).</summary>
    internal void Assign(VulkanBuffer buffer, DeviceBufferRole role)
    {
        if (buffer.Role == DeviceBufferRole.Staging || role == DeviceBufferRole.Staging)
            throw new ArgumentException("Staging buffers keep their role.", nameof(role));
        _counter.Move(buffer, role);
    }

    /// <summary>Called by <see cref="VulkanBuffer.Dispose"/> once its memory is freed.</summary>
    internal void Freed(VulkanBuffer buffer) => _counter.Remove(buffer);

    /// <summary>
    /// The device memory this device's buffers hold now and at their peak, device-local apart from
    /// host-visible staging, with the driver's budget and usage of <see cref="DeviceLocalHeap"/> where
    /// <c>VK_EXT_memory_budget</c> is present. Still readable after <see cref="Dispose"/> (then every count is 0
    /// unless a buffer leaked).
    /// </summary>
    public VulkanDeviceMemory Memory
    {
        get
        {
            var budget = _disposed ? null : Budget();
            return _counter.Snapshot(DeviceLocalHeapBytes, budget?.Budget, budget?.Usage);
        }
    }

    /// <summary>Starts the peaks of <see cref="Memory"/> again from what is allocated now.</summary>
    public void ResetPeakMemory() => _counter.ResetPeak();

    /// <summary>
    /// <c>VK_EXT_memory_budget</c>'s heapBudget and heapUsage of <see cref="DeviceLocalHeap"/>: how much this
    /// process may allocate from the heap and how much it uses (other processes' use already taken out
    /// of the budget); null without the extension.
    /// </summary>
    public (long Budget, long Usage)? Budget()
    {
        if (!HasMemoryBudget || _disposed)
            return null;
        var budget = new PhysicalDeviceMemoryBudgetPropertiesEXT { SType = StructureType.PhysicalDeviceMemoryBudgetPropertiesExt };
        var properties = new PhysicalDeviceMemoryProperties2 { SType = StructureType.PhysicalDeviceMemoryProperties2, PNext = &budget };
        Vk.GetPhysicalDeviceMemoryProperties2(Physical, &properties);
        return ((long)budget.HeapBudget[DeviceLocalHeap], (long)budget.HeapUsage[DeviceLocalHeap]);
    }

    private static int FindDeviceLocalHeap(in PhysicalDeviceMemoryProperties memory)
    {
        for (int i = 0; i < memory.MemoryTypeCount; i++)
            if ((memory.MemoryTypes[i].PropertyFlags & MemoryPropertyFlags.DeviceLocalBit) != 0)
                return (int)memory.MemoryTypes[i].HeapIndex;
        return memory.MemoryTypeCount > 0 ? (int)memory.MemoryTypes[0].HeapIndex : 0;
    }

    private int MemoryType(uint typeBits, MemoryPropertyFlags flags)
    {
        for (int i = 0; i < _memory.MemoryTypeCount; i++)
            if ((typeBits & (1u << i)) != 0 && (_memory.MemoryTypes[i].PropertyFlags & flags) == flags)
                return i;
        return -1;
    }

    internal static string Megabytes(ulong bytes) => bytes >= 1 << 20 ? $"{bytes / 1048576.0:F1} MB" : $"{bytes} bytes";

    // ---------------------------------------------------------------- instance and device choice

    private static Vk LoadApi()
    {
        try
        {
            return Vk.GetApi();
        }
        catch (Exception e) when (e is not VulkanException)
        {
            throw new VulkanException($"The Vulkan loader (libvulkan.so.1) could not be loaded: {e.Message}. {VulkanException.InstallHint}", null, e);
        }
    }

    private static Instance CreateInstance(Vk vk, bool validation, bool debugUtils)
    {
        var appName = (byte*)SilkMarshal.StringToPtr("LoraCompiler");
        var layer = (byte*)SilkMarshal.StringToPtr(ValidationLayer);
        var extension = (byte*)SilkMarshal.StringToPtr(DebugUtilsExtension);
        try
        {
            var app = new ApplicationInfo
            {
                SType = StructureType.ApplicationInfo,
                PApplicationName = appName,
                ApplicationVersion = 1,
                PEngineName = appName,
                EngineVersion = 1,
                ApiVersion = Vk.Version11,
            };
            var info = new InstanceCreateInfo
            {
                SType = StructureType.InstanceCreateInfo,
                PApplicationInfo = &app,
                EnabledLayerCount = validation ? 1u : 0u,
                PpEnabledLayerNames = validation ? &layer : null,
                EnabledExtensionCount = debugUtils ? 1u : 0u,
                PpEnabledExtensionNames = debugUtils ? &extension : null,
            };
            Instance instance;
            var result = vk.CreateInstance(&info, null, &instance);
            if (result != Result.Success)
                throw VulkanException.From(result, "vkCreateInstance", "starting Vulkan");
            return instance;
        }
        finally
        {
            SilkMarshal.Free((nint)appName);
            SilkMarshal.Free((nint)layer);
            SilkMarshal.Free((nint)extension);
        }
    }

    private static List<(PhysicalDevice Device, VulkanDeviceInfo Info)> Enumerate(Vk vk, Instance instance)
    {
        uint count = 0;
        var result = vk.EnumeratePhysicalDevices(instance, &count, null);
        if (result != Result.Success && result != Result.Incomplete)
            throw VulkanException.From(result, "vkEnumeratePhysicalDevices", "listing Vulkan devices");
        var devices = new PhysicalDevice[count];
        fixed (PhysicalDevice* p = devices)
            vk.EnumeratePhysicalDevices(instance, &count, p);
        var list = new List<(PhysicalDevice, VulkanDeviceInfo)>();
        for (int i = 0; i < count; i++)
        {
            vk.GetPhysicalDeviceProperties(devices[i], out var properties);
            string name = SilkMarshal.PtrToString((nint)properties.DeviceName) ?? $"device {i}";
            uint v = properties.ApiVersion;
            string version = $"{v >> 22}.{(v >> 12) & 0x3ff}.{v & 0xfff}";
            list.Add((devices[i], new VulkanDeviceInfo(i, name, properties.DeviceType, version, ComputeFamily(vk, devices[i]) is not null,
                properties.Limits.MaxStorageBufferRange)));
        }
        return list;
    }

    private static (PhysicalDevice, VulkanDeviceInfo) Choose(List<(PhysicalDevice Device, VulkanDeviceInfo Info)> all, VulkanBackendOptions options)
    {
        string listing = all.Count == 0 ? "none" : string.Join("; ", all.Select(c => c.Info.ToString()));
        if (all.Count(c => c.Info.HasCompute) == 0)
            throw new VulkanException($"No Vulkan device with a compute queue was found (devices: {listing}). {VulkanException.InstallHint}");
        if (options.DeviceIndex is int index)
        {
            if (index < 0 || index >= all.Count)
                throw new VulkanException($"There is no Vulkan device {index}; the devices are: {listing}.");
            if (!all[index].Info.HasCompute)
                throw new VulkanException($"Vulkan device {all[index].Info} has no compute queue; choose another: {listing}.");
            return all[index];
        }
        var usable = all.Where(c => c.Info.HasCompute).ToList();
        if (options.DeviceName is { Length: > 0 } name)
        {
            foreach (var c in usable)
                if (c.Info.Name.Contains(name, StringComparison.OrdinalIgnoreCase))
                    return c;
            throw new VulkanException($"No Vulkan device's name contains '{name}'; the devices are: {listing}.");
        }
        return usable.OrderBy(c => Rank(c.Info.Type)).ThenBy(c => c.Info.Index).First();
    }

    private static int Rank(PhysicalDeviceType type) => type switch
    {
        PhysicalDeviceType.DiscreteGpu => 0,
        PhysicalDeviceType.IntegratedGpu => 1,
        PhysicalDeviceType.VirtualGpu => 2,
        PhysicalDeviceType.Other => 3,
        _ => 4, // Cpu: lavapipe and other software implementations last
    };

    private static uint? ComputeFamily(Vk vk, PhysicalDevice device)
    {
        uint count = 0;
        vk.GetPhysicalDeviceQueueFamilyProperties(device, &count, null);
        var families = new QueueFamilyProperties[count];
        fixed (QueueFamilyProperties* p = families)
            vk.GetPhysicalDeviceQueueFamilyProperties(device, &count, p);
        // A compute-only family first (a dedicated compute queue), then any family that can compute.
        for (uint i = 0; i < count; i++)
            if ((families[i].QueueFlags & QueueFlags.ComputeBit) != 0 && (families[i].QueueFlags & QueueFlags.GraphicsBit) == 0)
                return i;
        for (uint i = 0; i < count; i++)
            if ((families[i].QueueFlags & QueueFlags.ComputeBit) != 0)
                return i;
        return null;
    }

    private static bool HasLayer(Vk vk, string name)
    {
        uint count = 0;
        if (vk.EnumerateInstanceLayerProperties(&count, null) != Result.Success || count == 0)
            return false;
        var layers = new LayerProperties[count];
        fixed (LayerProperties* p = layers)
            vk.EnumerateInstanceLayerProperties(&count, p);
        for (int i = 0; i < count; i++)
            fixed (byte* n = layers[i].LayerName)
                if (SilkMarshal.PtrToString((nint)n) == name)
                    return true;
        return false;
    }

    private static bool HasExtension(Vk vk, string name, string layer)
    {
        foreach (string? source in new[] { null, layer })
        {
            var layerName = source is null ? null : (byte*)SilkMarshal.StringToPtr(source);
            try
            {
                uint count = 0;
                if (vk.EnumerateInstanceExtensionProperties(layerName, &count, null) != Result.Success)
                    continue;
                var extensions = new ExtensionProperties[count];
                fixed (ExtensionProperties* p = extensions)
                    vk.EnumerateInstanceExtensionProperties(layerName, &count, p);
                for (int i = 0; i < count; i++)
                    fixed (byte* n = extensions[i].ExtensionName)
                        if (SilkMarshal.PtrToString((nint)n) == name)
                            return true;
            }
            finally
            {
                if (layerName is not null)
                    SilkMarshal.Free((nint)layerName);
            }
        }
        return false;
    }

    private static bool HasDeviceExtension(Vk vk, PhysicalDevice device, string name)
    {
        uint count = 0;
        if (vk.EnumerateDeviceExtensionProperties(device, (byte*)null, &count, null) != Result.Success || count == 0)
            return false;
        var extensions = new ExtensionProperties[count];
        fixed (ExtensionProperties* p = extensions)
            if (vk.EnumerateDeviceExtensionProperties(device, (byte*)null, &count, p) is not (Result.Success or Result.Incomplete))
                return false;
        for (int i = 0; i < count; i++)
            fixed (byte* n = extensions[i].ExtensionName)
                if (SilkMarshal.PtrToString((nint)n) == name)
                    return true;
        return false;
    }

    // ---------------------------------------------------------------- validation messages

    // Silk.NET.Vulkan.Extensions.EXT is not available here, so vkCreateDebugUtilsMessengerEXT is
    // looked up with vkGetInstanceProcAddr and called through a function pointer.
    private void CreateMessenger()
    {
        _self = GCHandle.Alloc(this);
        var info = new DebugUtilsMessengerCreateInfoEXT
        {
            SType = StructureType.DebugUtilsMessengerCreateInfoExt,
            MessageSeverity = DebugUtilsMessageSeverityFlagsEXT.ErrorBitExt | DebugUtilsMessageSeverityFlagsEXT.WarningBitExt,
            MessageType = DebugUtilsMessageTypeFlagsEXT.GeneralBitExt | DebugUtilsMessageTypeFlagsEXT.ValidationBitExt,
            PfnUserCallback = new PfnDebugUtilsMessengerCallbackEXT(&OnMessage),
            PUserData = (void*)GCHandle.ToIntPtr(_self),
        };
        var create = (delegate* unmanaged<Instance, DebugUtilsMessengerCreateInfoEXT*, AllocationCallbacks*, DebugUtilsMessengerEXT*, Result>)
            Proc("vkCreateDebugUtilsMessengerEXT");
        if (create is null)
            return;
        DebugUtilsMessengerEXT messenger;
        VulkanException.Check(create(Instance, &info, null, &messenger), "vkCreateDebugUtilsMessengerEXT", "enabling validation messages");
        _messenger = messenger;
    }

    private nint Proc(string name)
    {
        var p = (byte*)SilkMarshal.StringToPtr(name);
        try
        {
            return (nint)Vk.GetInstanceProcAddr(Instance, p).Handle;
        }
        finally
        {
            SilkMarshal.Free((nint)p);
        }
    }

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static Bool32 OnMessage(DebugUtilsMessageSeverityFlagsEXT severity, DebugUtilsMessageTypeFlagsEXT types,
                                    DebugUtilsMessengerCallbackDataEXT* data, void* user)
    {
        try
        {
            if (GCHandle.FromIntPtr((nint)user).Target is VulkanDevice device)
            {
                string message = SilkMarshal.PtrToString((nint)data->PMessage) ?? "(no message)";
                bool error = (severity & DebugUtilsMessageSeverityFlagsEXT.ErrorBitExt) != 0;
                Console.Error.WriteLine($"vulkan validation {(error ? "error" : "warning")}: {message}");
                if (error)
                    lock (device._validationErrors)
                        device._validationErrors.Add(message);
            }
        }
        catch
        {
            // Never let an exception cross into the driver.
        }
        return new Bool32(false);
    }

    // ---------------------------------------------------------------- teardown

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        if (Device.Handle != 0)
        {
            Vk.DeviceWaitIdle(Device);
            Vk.DestroyDevice(Device, null);
        }
        DestroyInstance();
    }

    private void DestroyInstance()
    {
        if (_messenger.Handle != 0)
        {
            var destroy = (delegate* unmanaged<Instance, DebugUtilsMessengerEXT, AllocationCallbacks*, void>)Proc("vkDestroyDebugUtilsMessengerEXT");
            if (destroy is not null)
                destroy(Instance, _messenger, null);
            _messenger = default;
        }
        if (Instance.Handle != 0)
            Vk.DestroyInstance(Instance, null);
        if (_self.IsAllocated)
            _self.Free();
    }
}

/// <summary>One VkBuffer with its own device memory (mapped when host-visible).</summary>
internal sealed unsafe class VulkanBuffer : IDisposable
{
    private readonly VulkanDevice _device;
    private bool _disposed;

    public VulkanBuffer(VulkanDevice device, VkBuffer handle, DeviceMemory memory, ulong bytes, long allocationBytes, void* mapped, DeviceBufferRole role)
    {
        _device = device;
        Handle = handle;
        Memory = memory;
        Bytes = bytes;
        AllocationBytes = allocationBytes;
        Mapped = mapped;
        Role = role;
    }

    public VkBuffer Handle { get; }
    public DeviceMemory Memory { get; }

    /// <summary>The bytes asked for.</summary>
    public ulong Bytes { get; }

    /// <summary>The bytes of device memory allocated for it (the buffer's memory requirements: Bytes rounded up by the driver).</summary>
    public long AllocationBytes { get; }

    public void* Mapped { get; }

    /// <summary>What the buffer holds, as <see cref="VulkanDevice.Memory"/> counts it (changed by <see cref="VulkanDevice.Assign"/>).</summary>
    public DeviceBufferRole Role { get; internal set; }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        if (Mapped is not null)
            _device.Vk.UnmapMemory(_device.Device, Memory);
        _device.Vk.DestroyBuffer(_device.Device, Handle, null);
        _device.Vk.FreeMemory(_device.Device, Memory, null);
        _device.Freed(this);
    }
}

/// <summary>What a device buffer holds, as <see cref="VulkanDeviceMemory"/> counts it.</summary>
public enum DeviceBufferRole
{
    /// <summary>A tensor allocated or uploaded through the backend (<see cref="IBackend.Allocate"/>, Upload, Adopt): a trainer's buffers and LoRA parameters.</summary>
    Tensor,

    /// <summary>A base weight from <see cref="IBackend.MapWeight"/>, resident or streamed.</summary>
    Weight,

    /// <summary>The backend's own device buffers: token ids, labels, the loss statistics, copies of rows straddling two parts, an unused binding.</summary>
    Backend,

    /// <summary>Host-visible staging memory: the upload batches and the readback buffer.</summary>
    Staging,
}

/// <summary>Bytes and count of one kind of device allocation, now and at the peak since the device was opened or the peak was reset.</summary>
/// <param name="Bytes">Bytes of device memory allocated (each buffer's memory requirements, as the driver rounds them).</param>
public readonly record struct DeviceMemoryCount(long Bytes, long PeakBytes, int Allocations, int PeakAllocations);

/// <summary>
/// What a <see cref="VulkanDevice"/>'s buffers hold (<see cref="VulkanDevice.Memory"/>,
/// <see cref="VulkanBackend.DeviceMemory"/>): device-local memory (every buffer the kernels use) apart
/// from host-visible staging memory, each with its peak; the device-local bytes by what they hold, in
/// the bytes the buffers asked for (<see cref="TensorBytes"/> is what a trainer's
/// <c>AllocatedBytes</c> counts); and the driver's view of the device-local heap.
/// </summary>
/// <param name="HeapBytes">The size of the device-local heap.</param>
/// <param name="Budget"><c>VK_EXT_memory_budget</c>'s heapBudget of the device-local heap; null without the extension.</param>
/// <param name="Usage"><c>VK_EXT_memory_budget</c>'s heapUsage of the device-local heap (this process's use as the driver counts it); null without the extension.</param>
public sealed record VulkanDeviceMemory(
    DeviceMemoryCount DeviceLocal, DeviceMemoryCount HostVisible,
    long TensorBytes, long WeightBytes, long BackendBytes,
    long HeapBytes, long? Budget, long? Usage)
{
    /// <summary>Device-local and staging memory together, now.</summary>
    public long AllocatedBytes => DeviceLocal.Bytes + HostVisible.Bytes;

    /// <summary>Buffers of both kinds, now.</summary>
    public int Allocations => DeviceLocal.Allocations + HostVisible.Allocations;
}

/// <summary>The counts behind <see cref="VulkanDeviceMemory"/>, updated as buffers are created, reassigned and freed.</summary>
internal sealed class MemoryCounter
{
    private readonly Lock _lock = new();
    private long _local, _localPeak, _staging, _stagingPeak;
    private int _localCount, _localCountPeak, _stagingCount, _stagingCountPeak;
    private readonly long[] _byRole = new long[4];

    public void Add(VulkanBuffer b)
    {
        lock (_lock)
        {
            if (b.Role == DeviceBufferRole.Staging)
            {
                _staging += b.AllocationBytes;
                _stagingCount++;
                _stagingPeak = Math.Max(_stagingPeak, _staging);
                _stagingCountPeak = Math.Max(_stagingCountPeak, _stagingCount);
            }
            else
            {
                _local += b.AllocationBytes;
                _localCount++;
                _localPeak = Math.Max(_localPeak, _local);
                _localCountPeak = Math.Max(_localCountPeak, _localCount);
            }
            _byRole[(int)b.Role] += (long)b.Bytes;
        }
    }

    public void Move(VulkanBuffer b, DeviceBufferRole role)
    {
        lock (_lock)
        {
            _byRole[(int)b.Role] -= (long)b.Bytes;
            _byRole[(int)role] += (long)b.Bytes;
            b.Role = role;
        }
    }

    public void Remove(VulkanBuffer b)
    {
        lock (_lock)
        {
            if (b.Role == DeviceBufferRole.Staging)
            {
                _staging -= b.AllocationBytes;
                _stagingCount--;
            }
            else
            {
                _local -= b.AllocationBytes;
                _localCount--;
            }
            _byRole[(int)b.Role] -= (long)b.Bytes;
        }
    }

    public void ResetPeak()
    {
        lock (_lock)
        {
            (_localPeak, _localCountPeak) = (_local, _localCount);
            (_stagingPeak, _stagingCountPeak) = (_staging, _stagingCount);
        }
    }

    public VulkanDeviceMemory Snapshot(long heapBytes, long? budget, long? usage)
    {
        lock (_lock)
            return new VulkanDeviceMemory(
                new DeviceMemoryCount(_local, _localPeak, _localCount, _localCountPeak),
                new DeviceMemoryCount(_staging, _stagingPeak, _stagingCount, _stagingCountPeak),
                _byRole[(int)DeviceBufferRole.Tensor], _byRole[(int)DeviceBufferRole.Weight], _byRole[(int)DeviceBufferRole.Backend],
                heapBytes, budget, usage);
    }
}
