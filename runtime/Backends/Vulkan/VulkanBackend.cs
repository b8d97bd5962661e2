namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// <see cref="IBackend"/> on a Vulkan compute device: every kernel is a compute shader from shaders/
/// (compiled to SPIR-V at build time and embedded), recorded into command buffers and submitted in
/// batches (<see cref="CommandStream"/>); the host waits only when it needs data back
/// (<see cref="Download"/>, the loss of <see cref="LmHeadCrossEntropy"/>, <see cref="Flush"/>).
/// Results equal <see cref="CpuBackend"/>'s within float32 rounding.
///
/// Tensors live in device-local memory; uploads and readbacks go through host-visible staging
/// buffers. A tensor larger than the device's maxStorageBufferRange is split into several buffers
/// (<see cref="VulkanTensor"/>): the elementwise kernels run per part, the embedding gather per part of
/// the table, and the products whose weight is split (linear layers, the LM head) run one dispatch per
/// row range of the weight, with a row that straddles two parts copied whole into a small buffer.
/// Activations, which the trainer sizes by sequence length, must each fit one buffer.
///
/// Decoding reads a KV cache (<see cref="AttentionDecode"/>, attention_decode.comp) whose rows
/// <see cref="CopyRange"/> writes with transfers, in order with the kernels; the LM head's logits
/// (<see cref="LmHeadLogits"/>) go through the same products as its cross-entropy, then softcap.comp.
///
/// A 4-bit base weight (<see cref="MapWeight"/> of a quantized tensor) stays packed on the device
/// (<see cref="VulkanQ4Tensor"/>, split by whole rows when needed): the products (gemm_nt_q4, gemm_nn_q4)
/// and the embedding gather (embedding_q4) dequantize its tiles as they read them. A 16-bit (F16 or
/// BF16) weight stays 16-bit on the device the same way (<see cref="VulkanFloat16Tensor"/>): gemm_nt_w16,
/// gemm_nn_w16 and embedding_w16 convert each value as they read it, and the norms and the bias of a
/// product read a 16-bit vector through a storage-format push constant (shaders/common/float16.glsl).
///
/// The class is split by concern: this file (construction, teardown), <c>.Memory</c> (buffers,
/// uploads, readbacks), <c>.Weights</c> (base weights: resident or streamed), <c>.Ops</c> (elementwise,
/// embedding, norms, RoPE), <c>.Attention</c>, <c>.Products</c> (linear, MatMul, LM head, split
/// weights), <c>.Optimizer</c> (AdamW, SGD, finite checks, MeZO noise), <c>.Dispatch</c> (kernels and
/// the checks of their bindings); device quirks are <see cref="VulkanQuirks"/>.
/// </summary>
public sealed unsafe partial class VulkanBackend : IBackend
{
    private const int GemmTile = 64;

    private readonly VulkanDevice _device;
    private readonly PipelineSet _pipelines;
    private readonly CommandStream _stream;
    private readonly VulkanBuffer _dummy;
    private readonly HashSet<VulkanDeviceTensor> _live = [];
    private VulkanBuffer? _readback, _tokens, _targets, _stats, _loss, _attentionStats;
    private readonly (uint X, uint Y) _maxGroups;
    private bool _disposed;

    public VulkanBackend(VulkanBackendOptions? options = null)
    {
        options ??= new VulkanBackendOptions();
        _device = new VulkanDevice(options);
        try
        {
            var limits = _device.Limits;
            long range = limits.MaxStorageBufferRange;
            if (options.MaxBufferBytes is long max)
            {
                if (max < 64)
                    throw new ArgumentOutOfRangeException(nameof(options), max, "MaxBufferBytes must be at least 64.");
                range = Math.Min(range, max);
            }
            PartLength = range / sizeof(float) / 4 * 4; // whole 16-byte units

            var count = _device.MaxWorkGroupCount;
            uint cap = options.MaxWorkgroupCount is uint c and > 0 ? c : uint.MaxValue;
            _maxGroups = (Math.Min(count.X, cap), Math.Min(count.Y, cap));

            uint width = 256;
            while (width > 1 && (width > _device.MaxWorkGroupSize.X || width > _device.MaxWorkGroupInvocations))
                width /= 2;
            _pipelines = new PipelineSet(_device, width, VulkanQuirks.UseSubgroups(_device, options.Subgroups));
            _stream = new CommandStream(_device, (ulong)Math.Max(options.StagingBytes, 1 << 16), options.CommandsPerBatch);
            _dummy = DeviceBuffer(16, "an unused binding");
        }
        catch
        {
            _pipelines?.Dispose();
            _device.Dispose();
            throw;
        }
    }

    public string Name => $"vulkan ({_device.Name})";

    /// <summary>The device this backend runs on, with its validation messages.</summary>
    public VulkanDevice Device => _device;

    /// <summary>Whether the per-row kernels (norms, the LM head's statistics and loss, decoding attention) reduce through subgroup arithmetic.</summary>
    public bool Subgroups => _pipelines.Subgroups;

    /// <summary>The workgroup width of the elementwise and per-row kernels: the largest power of two up to 256 within maxComputeWorkGroupSize and maxComputeWorkGroupInvocations.</summary>
    public uint WorkgroupWidth => _pipelines.ElementWorkgroup;

    /// <summary>Elements per buffer: a tensor with more is split into parts of this many.</summary>
    public long PartLength { get; }

    /// <summary>Command batches submitted so far.</summary>
    public int Submissions => _stream.Submissions;

    /// <summary>Submits everything recorded and waits for the device to finish it (for timing; downloads do this themselves).</summary>
    public void Synchronize() => _stream.Finish();

    /// <summary>Bytes uploaded through the staging memory and read back from the device so far.</summary>
    public long TransferredBytes => _stream.UploadedBytes + _downloadedBytes;

    private long _downloadedBytes;

    /// <summary>False: the tensors live in device memory.</summary>
    public bool TryGetHostSpan(Tensor tensor, out Span<float> values)
    {
        values = default;
        return false;
    }

    // ---------------------------------------------------------------- teardown

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        _stream.Dispose(); // waits for the device
        foreach (var t in _live)
            foreach (var b in t.Buffers)
                b.Dispose();
        _live.Clear(); // resident weights among them
        _resident.Clear();
        ResidentWeightBytes = 0;
        _dummy.Dispose();
        _readback?.Dispose();
        _tokens?.Dispose();
        _targets?.Dispose();
        _stats?.Dispose();
        _loss?.Dispose();
        _attentionStats?.Dispose();
        _finiteStatus?.Dispose();
        _pipelines.Dispose();
        _device.Dispose();
    }
}
