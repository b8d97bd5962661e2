using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Weights;
using System.Runtime.InteropServices;
using Silk.NET.Vulkan;
using VkBuffer = Silk.NET.Vulkan.Buffer;

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
/// </summary>
public sealed unsafe partial class VulkanBackend : IBackend
{
    private const int GemmTile = 64;

    private readonly VulkanDevice _device;
    private readonly PipelineSet _pipelines;
    private readonly CommandStream _stream;
    private readonly VulkanBuffer _dummy;
    private readonly HashSet<Tensor> _live = [];
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
            _pipelines = new PipelineSet(_device, width);
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

    // ---------------------------------------------------------------- buffers

    public Tensor Allocate(string name, long length) => Create(name, length, zero: true);

    /// <summary>Device memory, as <see cref="Allocate"/>: a memory-mapped file would be host memory.</summary>
    public Tensor AllocateInFile(string name, long length, Func<MappedBuffer> file) => Allocate(name, length);

    /// <summary>A copy in device memory, as <see cref="Upload(string, ReadOnlySpan{float})"/>.</summary>
    public Tensor Adopt(string name, Memory<float> values) => Upload(name, values.Span);

    public Tensor Upload(string name, ReadOnlySpan<float> data)
    {
        var tensor = Create(name, data.Length, zero: false);
        Write(tensor, data);
        return tensor;
    }

    private VulkanTensor Create(string name, long length, bool zero)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        int count = (int)Math.Max(1, (length + PartLength - 1) / PartLength);
        var parts = new VulkanBuffer[count];
        try
        {
            for (int k = 0; k < count; k++)
            {
                long elements = Math.Max(1, Math.Min(PartLength, length - k * PartLength));
                parts[k] = DeviceBuffer((ulong)elements * sizeof(float), count == 1 ? name : $"{name} part {k + 1}/{count}");
                if (zero)
                    _stream.FillZero(parts[k].Handle);
            }
        }
        catch
        {
            _stream.Finish();
            foreach (var p in parts)
                p?.Dispose();
            throw;
        }
        var tensor = new VulkanTensor(this, name, length, PartLength, parts);
        _live.Add(tensor);
        return tensor;
    }

    internal void Release(Tensor tensor, IEnumerable<VulkanBuffer> buffers)
    {
        if (_disposed || !_live.Remove(tensor))
            return;
        foreach (var b in buffers)
            _stream.ReleaseLater(b);
    }

    private VulkanBuffer DeviceBuffer(ulong bytes, string what) => _device.CreateBuffer(bytes,
        BufferUsageFlags.StorageBufferBit | BufferUsageFlags.TransferSrcBit | BufferUsageFlags.TransferDstBit,
        0, MemoryPropertyFlags.DeviceLocalBit, what);

    public void Download(Tensor src, Span<float> dst)
    {
        var t = Vulkan(src, dst.Length, nameof(src));
        long done = 0;
        while (done < dst.Length)
        {
            int k = (int)(done / PartLength);
            long inPart = done - k * PartLength;
            long count = Math.Min(PartLength - inPart, dst.Length - done);
            var piece = dst.Slice((int)done, (int)count);
            ReadBack(t.Part(k), (ulong)inPart * sizeof(float), MemoryMarshal.AsBytes(piece));
            done += count;
        }
    }

    public void Write(Tensor dst, ReadOnlySpan<float> data)
    {
        var t = Vulkan(dst, data.Length, nameof(dst));
        long piece = (long)(_stream.StagingBytes / sizeof(float));
        long done = 0;
        while (done < data.Length)
        {
            int k = (int)(done / PartLength);
            long inPart = done - k * PartLength;
            long count = Math.Min(Math.Min(PartLength - inPart, data.Length - done), piece);
            _stream.Upload(MemoryMarshal.AsBytes(data.Slice((int)done, (int)count)), t.Part(k), (ulong)inPart * sizeof(float));
            done += count;
        }
    }

    /// <summary>Copies bytes from a device buffer to the host, through the readback buffer; waits for the device.</summary>
    private void ReadBack(VkBuffer source, ulong offset, Span<byte> destination)
    {
        ulong chunk = _stream.StagingBytes;
        int done = 0;
        while (done < destination.Length)
        {
            int count = (int)Math.Min(chunk, (ulong)(destination.Length - done));
            if (_readback is null || _readback.Bytes < (ulong)count)
            {
                _stream.Finish();
                _readback?.Dispose();
                _readback = null;
                _readback = _device.CreateBuffer(Math.Min(chunk, Math.Max((ulong)destination.Length, 1 << 16)), BufferUsageFlags.TransferDstBit,
                    MemoryPropertyFlags.HostVisibleBit | MemoryPropertyFlags.HostCoherentBit, MemoryPropertyFlags.HostCachedBit, "readback staging memory");
            }
            _stream.CopyBuffer(source, offset + (ulong)done, _readback.Handle, 0, (ulong)count);
            _stream.Finish();
            new ReadOnlySpan<byte>(_readback.Mapped, count).CopyTo(destination.Slice(done, count));
            done += count;
            _downloadedBytes += count;
        }
    }

    /// <summary>Uploads ints (token ids, labels) into a small device buffer, growing it when needed.</summary>
    private VkBuffer UploadInts(ref VulkanBuffer? buffer, ReadOnlySpan<int> values, string what)
    {
        EnsureBuffer(ref buffer, (ulong)Math.Max(values.Length, 64) * sizeof(int), what);
        _stream.Upload(MemoryMarshal.AsBytes(values), buffer!.Handle, 0);
        return buffer.Handle;
    }

    private void EnsureBuffer(ref VulkanBuffer? buffer, ulong bytes, string what)
    {
        if (buffer is not null && buffer.Bytes >= bytes)
            return;
        if (buffer is not null)
            _stream.ReleaseLater(buffer);
        buffer = DeviceBuffer(bytes, what);
    }

    // ---------------------------------------------------------------- elementwise

    public void Zero(Tensor t, long n) => Elementwise(Kernels.Zero, n, [Vulkan(t, n, nameof(t))]);

    public void Copy(Tensor dst, Tensor src, long n) => Elementwise(Kernels.Copy, n, [Vulkan(dst, n, nameof(dst)), Vulkan(src, n, nameof(src))]);

    /// <summary>
    /// A transfer (vkCmdCopyBuffer) in order with the kernels around it, one region per stretch that lies
    /// in one part of each tensor, so either may be split. Overlapping ranges of one tensor are refused.
    /// </summary>
    public void CopyRange(Tensor dst, long dstOffset, Tensor src, long srcOffset, long n)
    {
        if (dstOffset < 0 || srcOffset < 0 || n < 0)
            throw new ArgumentOutOfRangeException(nameof(n), "offsets and lengths must not be negative.");
        var d = Vulkan(dst, 0, nameof(dst));
        var s = Vulkan(src, 0, nameof(src));
        if (srcOffset > s.Length - n)
            throw new ArgumentOutOfRangeException(nameof(srcOffset), srcOffset, $"{src} holds {s.Length} floats; the copy reads [{srcOffset}, {srcOffset + n}).");
        if (dstOffset > d.Length - n)
            throw new ArgumentOutOfRangeException(nameof(dstOffset), dstOffset, $"{dst} holds {d.Length} floats; the copy writes [{dstOffset}, {dstOffset + n}).");
        if (d == s && n > 0 && srcOffset < dstOffset + n && dstOffset < srcOffset + n)
            throw new ArgumentException($"The ranges [{srcOffset}, {srcOffset + n}) and [{dstOffset}, {dstOffset + n}) of {dst} overlap.", nameof(dstOffset));
        for (long done = 0; done < n;)
        {
            long from = srcOffset + done, to = dstOffset + done;
            int sk = (int)(from / PartLength), dk = (int)(to / PartLength);
            long inSource = from - sk * PartLength, inDestination = to - dk * PartLength;
            long count = Math.Min(n - done, Math.Min(PartLength - inSource, PartLength - inDestination));
            _stream.CopyBuffer(s.Part(sk), (ulong)inSource * sizeof(float), d.Part(dk), (ulong)inDestination * sizeof(float), (ulong)count * sizeof(float));
            done += count;
        }
    }

    public void AddInPlace(Tensor dst, Tensor src, long n) => Elementwise(Kernels.Add, n, [Vulkan(dst, n, nameof(dst)), Vulkan(src, n, nameof(src))]);

    public void Scale(Tensor x, float factor, long n) =>
        Elementwise(Kernels.Scale, n, [Vulkan(x, n, nameof(x))], count => new ScaleParameters { Count = count, Factor = factor });

    /// <summary>swiglu.comp (SiLU) or geglu.comp (tanh-approximated GELU).</summary>
    public void GluForward(Tensor h, Tensor gate, Tensor up, long n, GluActivation activation) =>
        Elementwise(Glu(activation, backward: false), n, [Vulkan(h, n, nameof(h)), Vulkan(gate, n, nameof(gate)), Vulkan(up, n, nameof(up))]);

    /// <summary>swiglu_back.comp or geglu_back.comp; dUp may be dh's own tensor.</summary>
    public void GluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long n, GluActivation activation) =>
        Elementwise(Glu(activation, backward: true), n,
            [Vulkan(dGate, n, nameof(dGate)), Vulkan(dUp, n, nameof(dUp)), Vulkan(dh, n, nameof(dh)), Vulkan(gate, n, nameof(gate)), Vulkan(up, n, nameof(up))]);

    private static KernelSpec Glu(GluActivation activation, bool backward) => activation switch
    {
        GluActivation.Silu => backward ? Kernels.SwiGluBack : Kernels.SwiGlu,
        GluActivation.GeluTanh => backward ? Kernels.GeGluBack : Kernels.GeGlu,
        _ => throw new ArgumentOutOfRangeException(nameof(activation), activation, "Not a GLU activation."),
    };

    /// <summary>One dispatch per part: the tensors' parts line up, so part k of each holds the same elements.</summary>
    private void Elementwise(KernelSpec kernel, long n, VulkanTensor[] tensors) =>
        Elementwise(kernel, n, tensors, static count => new CountParameters { Count = count });

    /// <summary>As above, with the push constants <paramref name="push"/> makes for a part of <c>count</c> elements.</summary>
    private void Elementwise<T>(KernelSpec kernel, long n, VulkanTensor[] tensors, Func<uint, T> push) where T : unmanaged
    {
        Span<VkBuffer> buffers = stackalloc VkBuffer[tensors.Length];
        for (int k = 0; (long)k * PartLength < n; k++)
        {
            long count = Math.Min(PartLength, n - (long)k * PartLength);
            for (int i = 0; i < tensors.Length; i++)
                buffers[i] = tensors[i].Part(k);
            RunElements(kernel, push((uint)count), count, buffers);
        }
    }

    // ---------------------------------------------------------------- embedding, norms, RoPE

    public void EmbeddingForward(Tensor x, ReadOnlySpan<int> tokens, Tensor table, int T, int C)
    {
        var xt = Vulkan(x, (long)T * C, nameof(x));
        var q4 = table as VulkanQ4Tensor;
        if (q4 is not null)
            Check(q4, q4.Rows, C, nameof(table));
        var half = table as VulkanFloat16Tensor;
        if (half is not null)
            Check(half, half.Rows, C, nameof(table));
        long vocab = q4?.Rows ?? half?.Rows ?? Vulkan(table, 0, nameof(table)).Length / C;
        SequenceChecks.Tokens(tokens, T, vocab);
        if (q4 is null && half is null && vocab * C > uint.MaxValue)
            throw new VulkanException($"The table {table} has more than 2³² elements, which the embedding shader cannot index.");
        var x0 = Single(xt, (long)T * C);
        var ids = UploadInts(ref _tokens, tokens[..T], "token ids");
        if (q4 is not null)
        {
            foreach (var part in q4.Parts)
            {
                var push = new EmbeddingQ4Parameters
                {
                    TokenCount = (uint)T, Width = (uint)C, GroupSize = (uint)q4.GroupSize, PartFirstRow = (uint)part.FirstRow, PartRows = (uint)part.Rows,
                };
                RunElements(Kernels.EmbeddingQ4, push, (long)T * q4.WordsPerRow, [x0, ids, part.Packed.Handle, part.ScaleBias.Handle]);
            }
            return;
        }
        if (half is not null)
        {
            foreach (var part in half.Parts)
            {
                var push = new EmbeddingW16Parameters
                {
                    TokenCount = (uint)T, Width = (uint)C, Format = half.ShaderFormat, PartFirstRow = (uint)part.FirstRow, PartRows = (uint)part.Rows,
                };
                RunElements(Kernels.EmbeddingW16, push, (long)T * C, [x0, ids, part.Buffer.Handle]);
            }
            return;
        }
        var tt = Vulkan(table, 0, nameof(table));
        for (int k = 0; k < tt.PartCount; k++)
        {
            var push = new EmbeddingParameters
            {
                TokenCount = (uint)T, Width = (uint)C, PartFirst = (uint)(k * tt.PartLength), PartLength = (uint)tt.PartElements(k),
            };
            RunElements(Kernels.Embedding, push, (long)T * C, [x0, ids, tt.Part(k)]);
        }
    }

    /// <summary>rmsnorm.comp, one workgroup per row (a per-head norm passes T·heads rows of headDim).</summary>
    public void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int T, int C, float eps, float weightOffset)
    {
        long n = (long)T * C;
        var (wb, format) = StoredVector(w, C, nameof(w));
        var push = new RmsNormParameters { TokenCount = (uint)T, Width = (uint)C, Epsilon = eps, WeightOffset = weightOffset, WeightFormat = format };
        RunRows(Kernels.RmsNorm, push, T, [Single(y, n, nameof(y)), Single(rstd, T, nameof(rstd)), Single(x, n, nameof(x)), wb]);
    }

    /// <summary>rmsnorm_back.comp: without <paramref name="accumulate"/> dx's old contents are never read.</summary>
    public void RmsNormBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, Tensor rstd, int T, int C, float weightOffset, bool accumulate)
    {
        long n = (long)T * C;
        var (wb, format) = StoredVector(w, C, nameof(w));
        var push = new RmsNormBackParameters
        {
            TokenCount = (uint)T, Width = (uint)C, WeightOffset = weightOffset, Accumulate = accumulate ? 1u : 0u, WeightFormat = format,
        };
        RunRows(Kernels.RmsNormBack, push, T,
            [Single(dx, n, nameof(dx)), Single(dy, n, nameof(dy)), Single(x, n, nameof(x)), wb, Single(rstd, T, nameof(rstd))]);
    }

    public void RopeForward(Tensor x, Tensor cos, Tensor sin, int T, int heads, int headDim) => Rope(Kernels.Rope, x, cos, sin, 0, T, heads, headDim);

    /// <summary>rope.comp with the tables read from row <paramref name="position"/> on (decoding: the newest rows of a sequence).</summary>
    public void RopeForwardAt(Tensor x, Tensor cos, Tensor sin, int position, int T, int heads, int headDim)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        Rope(Kernels.Rope, x, cos, sin, position, T, heads, headDim);
    }

    public void RopeBackward(Tensor dx, Tensor cos, Tensor sin, int T, int heads, int headDim) => Rope(Kernels.RopeBack, dx, cos, sin, 0, T, heads, headDim);

    /// <summary>x [T, heads, headDim] rotated in place with the tables' rows position..position+T−1.</summary>
    private void Rope(KernelSpec kernel, Tensor x, Tensor cos, Tensor sin, int position, int T, int heads, int headDim)
    {
        if (headDim % 2 != 0)
            throw new ArgumentException($"headDim {headDim} is odd.", nameof(headDim));
        long half = (long)T * (headDim / 2), table = ((long)position + T) * (headDim / 2);
        var push = new RopeParameters { TokenCount = (uint)T, Heads = (uint)heads, HeadDim = (uint)headDim, Position = (uint)position };
        RunElements(kernel, push, half * heads,
            [Single(x, (long)T * heads * headDim, nameof(x)), Single(cos, table, nameof(cos)), Single(sin, table, nameof(sin))]);
    }

    // ---------------------------------------------------------------- attention

    /// <summary>The largest head dimension the attention shaders keep in registers (MAX_CHUNKS vec4s in attention_tiles.glsl).</summary>
    private const int MaxAttentionHeadDim = 256;

    /// <summary>
    /// llvmpipe (lavapipe) ends every loop of a shader invocation once the invocation has run this many
    /// loop iterations in all (Mesa's LP_MAX_TGSI_LOOP_ITERATIONS), without any error.
    /// </summary>
    private const long LavapipeLoopLimit = 65535;

    /// <summary>
    /// FlashAttention forward (attention.comp): one workgroup per (head, block of query rows), staging only
    /// the key tiles some row of the block sees, so a sliding window of W costs O(T·W).
    /// </summary>
    public void AttentionForward(Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v, int T, int heads, int kvHeads, int headDim,
                                 float scale, int window)
    {
        var push = Attention(T, heads, kvHeads, headDim, scale, window, backward: false);
        long qn = (long)T * heads * headDim, kn = (long)T * kvHeads * headDim;
        VkBuffer o = Single(output, qn, nameof(output)), l = Single(lse, (long)heads * T, nameof(lse));
        VkBuffer qb = Single(q, qn, nameof(q)), kb = Single(k, kn, nameof(k)), vb = Single(v, kn, nameof(v));
        RunBlocks(Kernels.Attention, push, heads, T, [o, l, qb, kb, vb]);
    }

    /// <summary>
    /// FlashAttention backward in three passes: the row statistics (lse, D) into a buffer of the backend's,
    /// [heads, T, 2] (attention_back_delta.comp); dq per (head, query block) (attention_back_dq.comp);
    /// dk and dv per (kv head, key block) (attention_back_dkv.comp). Both skip the tiles outside the window.
    /// </summary>
    public void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOutput, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
                                  int T, int heads, int kvHeads, int headDim, float scale, int window)
    {
        var push = Attention(T, heads, kvHeads, headDim, scale, window, backward: true);
        long qn = (long)T * heads * headDim, kn = (long)T * kvHeads * headDim, rows = (long)heads * T;
        VkBuffer dqb = Single(dq, qn, nameof(dq)), dkb = Single(dk, kn, nameof(dk)), dvb = Single(dv, kn, nameof(dv));
        VkBuffer dob = Single(dOutput, qn, nameof(dOutput)), ob = Single(output, qn, nameof(output)), lb = Single(lse, rows, nameof(lse));
        VkBuffer qb = Single(q, qn, nameof(q)), kb = Single(k, kn, nameof(k)), vb = Single(v, kn, nameof(v));
        EnsureBuffer(ref _attentionStats, (ulong)Math.Max(rows, 1) * 2 * sizeof(float), "attention row statistics");
        var stats = _attentionStats!.Handle;
        RunElements(Kernels.AttentionBackDelta, push, rows, [stats, dob, ob, lb]);
        RunBlocks(Kernels.AttentionBackDq, push, heads, T, [dqb, dob, stats, qb, kb, vb]);
        RunBlocks(Kernels.AttentionBackDkv, push, kvHeads, T, [dkb, dvb, dob, stats, qb, kb, vb]);
    }

    private AttentionParameters Attention(int T, int heads, int kvHeads, int headDim, float scale, int window, bool backward)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(window);
        if (kvHeads <= 0 || heads % kvHeads != 0)
            throw new ArgumentException($"heads {heads} is not a multiple of kvHeads {kvHeads}.", nameof(kvHeads));
        if (headDim <= 0 || headDim > MaxAttentionHeadDim)
            throw new ArgumentOutOfRangeException(nameof(headDim), headDim, $"The Vulkan attention kernels support head dimensions up to {MaxAttentionHeadDim}.");
        // A tile row holds two operands' chunks plus one vec4 of row statistics (the dk/dv pass's lse
        // and D); rows are consumed four at a time.
        int chunks = (headDim + 3) / 4;
        uint tileRows = _pipelines.AttentionTileVec4s / (uint)(2 * chunks + 1) / 4 * 4;
        if (tileRows == 0)
            throw new VulkanException($"{_device.Name} has too little shared memory for attention with head dimension {headDim}.");
        if (_device.Name.Contains("llvmpipe", StringComparison.OrdinalIgnoreCase))
        {
            long loops = AttentionLoops(T, heads / kvHeads, headDim, (int)tileRows, (int)_pipelines.AttentionWorkgroup, backward, window);
            if (loops > LavapipeLoopLimit)
                throw new VulkanException(
                    $"Attention over {T} tokens (head dimension {headDim}, {heads / kvHeads} query heads per kv head" +
                    (window > 0 && window < T ? $", a sliding window of {window}" : "") + $") needs about {loops} loop " +
                    $"iterations in one shader invocation; {_device.Name} silently stops a shader after {LavapipeLoopLimit}. " +
                    "Use a shorter --seq, or a GPU.");
        }
        return new AttentionParameters
        {
            TokenCount = (uint)T, Heads = (uint)heads, KvHeads = (uint)kvHeads, HeadDim = (uint)headDim,
            Scale = scale, TileRows = tileRows, Window = (uint)window,
        };
    }

    /// <summary>
    /// An upper bound on the loop iterations of the busiest invocation of an attention shader. The forward
    /// walks up to T keys once, with up to three loops over the vec4 chunks per four keys (the dot
    /// products, the rescale, the accumulation); the dk/dv pass walks up to T queries once per query
    /// head of its kv head, with two (the dq pass, which walks T keys once, does no more). Add the tile
    /// staging loops and the loops before and after. With a sliding window W &lt; T a block stages at
    /// most W + width − 1 rows and a row visits at most W, starting anywhere in a tile (one more partial
    /// quad per tile).
    /// </summary>
    internal static long AttentionLoops(int T, int queryHeadsPerKvHead, int headDim, int tileRows, int width, bool backward, int window = 0)
    {
        long chunks = (headDim + 3) / 4;
        bool sliding = window > 0 && window < T;
        long staged = sliding ? Math.Min(T, (long)window + width - 1) : T, visited = sliding ? window : T;
        long tiles = (staged + tileRows - 1) / tileRows + 1;
        long quads = (visited + 3) / 4 + (sliding ? 2 : 1) * tiles;
        long staging = (tileRows * chunks + width - 1) / width + (tileRows + width - 1) / width + 3;
        long walks = backward ? queryHeadsPerKvHead : 1, perQuad = (backward ? 2 : 3) * chunks + 1;
        return 2 * headDim + 2 * chunks + walks * (tiles * staging + quads * perQuad);
    }

    /// <summary>One workgroup per (unit, block of rows): units × ⌈T / width⌉ workgroups.</summary>
    private void RunBlocks(KernelSpec kernel, in AttentionParameters push, int units, int T, ReadOnlySpan<VkBuffer> buffers)
    {
        var pipeline = _pipelines.Get(kernel);
        long blocks = (T + pipeline.WorkgroupSize.X - 1) / pipeline.WorkgroupSize.X;
        Dispatch1D(pipeline, push, units * blocks, buffers);
    }

    /// <summary>
    /// One token's attention over the first <paramref name="count"/> rows of a KV cache (attention_decode.comp):
    /// one workgroup per head, its invocations spread over the keys, an online softmax across tiles of keys.
    /// The cache rows read must lie in the caches' first buffer.
    /// </summary>
    public void AttentionDecode(Tensor output, Tensor q, Tensor kCache, Tensor vCache, int count, int heads, int kvHeads, int headDim, float scale)
    {
        if (kvHeads <= 0 || heads % kvHeads != 0)
            throw new ArgumentException($"heads {heads} is not a multiple of kvHeads {kvHeads}.", nameof(kvHeads));
        if (count <= 0)
            throw new ArgumentOutOfRangeException(nameof(count), count, "a decoding step attends to at least its own key.");
        if (headDim <= 0 || headDim > MaxAttentionHeadDim)
            throw new ArgumentOutOfRangeException(nameof(headDim), headDim, $"The Vulkan attention kernels support head dimensions up to {MaxAttentionHeadDim}.");
        long qn = (long)heads * headDim, kn = (long)count * kvHeads * headDim;
        if (kn > uint.MaxValue)
            throw new VulkanException($"A KV cache of {count} rows of {kvHeads}×{headDim} has more elements than the decoding shader can index.");
        VkBuffer o = Single(output, qn, nameof(output)), qb = Single(q, qn, nameof(q));
        VkBuffer kb = Single(kCache, kn, nameof(kCache)), vb = Single(vCache, kn, nameof(vCache));
        uint width = _pipelines.ElementWorkgroup;
        if (_device.Name.Contains("llvmpipe", StringComparison.OrdinalIgnoreCase))
        {
            long loops = DecodeLoops(count, headDim, (int)width);
            if (loops > LavapipeLoopLimit)
                throw new VulkanException(
                    $"Decoding attention over {count} cached tokens (head dimension {headDim}) needs about {loops} loop iterations in one " +
                    $"shader invocation; {_device.Name} silently stops a shader after {LavapipeLoopLimit}. Use a shorter context, or a GPU.");
        }
        var push = new AttentionDecodeParameters { Count = (uint)count, Heads = (uint)heads, KvHeads = (uint)kvHeads, HeadDim = (uint)headDim, Scale = scale };
        RunRows(Kernels.AttentionDecode, push, heads, [o, qb, kb, vb]);
    }

    /// <summary>
    /// An upper bound on the loop iterations of one invocation of attention_decode.comp: per tile of
    /// <paramref name="width"/> keys, the dot product (four dimensions an iteration, then the tail), the
    /// two reductions (log₂ width steps each) and, for each output dimension the invocation owns, the
    /// weighted sum over the tile's keys (four keys an iteration, then the tail); plus the query load and
    /// the write. Checked on lavapipe: with a head dimension of 8, a cache of 170,000 rows (about 61,000 by
    /// this bound) comes out right and one of 215,000 comes out wrong.
    /// </summary>
    internal static long DecodeLoops(int count, int headDim, int width)
    {
        long tiles = ((long)count + width - 1) / width, dims = (MaxAttentionHeadDim + width - 1) / width; // the shader's DIMS_PER_LANE
        long steps = 0;
        for (int w = width; w > 1; w /= 2)
            steps++;
        long perTile = headDim / 4 + headDim % 4 + 2 + 2 * (steps + 1) + dims * (width / 4 + 4 + 1) + 1;
        return tiles * perTile + 3 * dims + (headDim + width - 1) / width + 2;
    }

    // ---------------------------------------------------------------- linear and LoRA

    public void LinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, int T, int din, int dout)
    {
        VkBuffer yb = Single(y, (long)T * dout, nameof(y)), xb = Single(x, (long)T * din, nameof(x));
        var (bb, biasFormat) = bias is null ? (_dummy.Handle, 0u) : StoredVector(bias, dout, nameof(bias));
        foreach (var s in RowSegments(Weight(w, dout, din, nameof(w)), 0, dout, din))
            // y[:, rows of the segment] = x · segmentᵀ (+ bias of those rows)
            WeightGemm(transposed: true, yb, xb, s, bb, new GemmParameters
            {
                Rows = (uint)T, Cols = (uint)s.Rows, Depth = (uint)din,
                StrideA = (uint)din, StrideB = (uint)din, StrideC = (uint)dout,
                OffsetC = (uint)s.FirstRow, OffsetBias = (uint)s.FirstRow,
                Alpha = 1f, HasBias = bias is null ? 0u : 1u, BiasFormat = biasFormat,
            });
    }

    public void LinearBackwardInput(Tensor dx, Tensor dy, Tensor w, int T, int din, int dout, bool accumulate)
    {
        VkBuffer dxb = Single(dx, (long)T * din, nameof(dx)), dyb = Single(dy, (long)T * dout, nameof(dy));
        bool first = true;
        foreach (var s in RowSegments(Weight(w, dout, din, nameof(w)), 0, dout, din))
        {
            // dx (=|+=) dy[:, rows of the segment] · segment
            WeightGemm(transposed: false, dxb, dyb, s, _dummy.Handle, new GemmParameters
            {
                Rows = (uint)T, Depth = (uint)s.Rows, Cols = (uint)din,
                StrideA = (uint)dout, StrideB = (uint)din, StrideC = (uint)din,
                OffsetA = (uint)s.FirstRow,
                Alpha = 1f, Accumulate = accumulate || !first ? 1u : 0u,
            });
            first = false;
        }
    }

    public void MatMul(Tensor c, Tensor a, Tensor b, int rows, int cols, int depth, MatMulForm form, float alpha, bool accumulate)
    {
        VkBuffer cb = Single(c, (long)rows * cols, nameof(c)), ab = Single(a, (long)rows * depth, nameof(a));
        VkBuffer bb = Single(b, (long)cols * depth, nameof(b));
        var (kernel, strideA, strideB) = form switch
        {
            MatMulForm.NT => (Kernels.GemmNT, depth, depth),
            MatMulForm.NN => (Kernels.GemmNN, depth, cols),
            MatMulForm.TN => (Kernels.GemmTN, rows, cols),
            _ => throw new ArgumentOutOfRangeException(nameof(form), form, null),
        };
        Gemm(kernel, cb, ab, bb, _dummy.Handle, Product(rows, cols, depth, strideA, strideB, cols, alpha, accumulate));
    }

    private static GemmParameters Product(int rows, int cols, int depth, int strideA, int strideB, int strideC, float alpha, bool accumulate) => new()
    {
        Rows = (uint)rows, Cols = (uint)cols, Depth = (uint)depth,
        StrideA = (uint)strideA, StrideB = (uint)strideB, StrideC = (uint)strideC,
        Alpha = alpha, Accumulate = accumulate ? 1u : 0u,
    };

    // ---------------------------------------------------------------- LM head + cross-entropy

    public float LmHeadCrossEntropy(Tensor dx, Tensor logits, Tensor x, Tensor w, ReadOnlySpan<int> targets, int T, int C, int V, int chunk,
                                    float softcap)
    {
        if (!(softcap >= 0) || float.IsPositiveInfinity(softcap))
            throw new ArgumentOutOfRangeException(nameof(softcap), softcap, "softcap must be 0 (none) or a positive cap.");
        if (chunk <= 0)
            throw new ArgumentOutOfRangeException(nameof(chunk), chunk, "chunk must be positive.");
        chunk = Math.Min(chunk, V);
        var dxt = Vulkan(dx, (long)T * C, nameof(dx));
        VkBuffer dxb = Single(dxt, (long)T * C), lb = Single(logits, (long)T * chunk, nameof(logits)), xb = Single(x, (long)T * C, nameof(x));
        var wt = Weight(w, V, C, nameof(w));
        int count = SequenceChecks.Labels(targets, T, V);
        Zero(dxt, (long)T * C);
        if (count == 0)
            return 0f;

        var labels = UploadInts(ref _targets, targets[..T], "labels");
        EnsureBuffer(ref _stats, (ulong)(3 * T) * sizeof(float), "cross-entropy row statistics");
        var stats = _stats!.Handle;
        float inverse = 1f / count;

        // Pass 1: logits chunk by chunk (softcapped in the shader when softcap > 0), an online log-sum-exp per row.
        for (int v0 = 0; v0 < V; v0 += chunk)
        {
            int n = Math.Min(chunk, V - v0);
            Logits(lb, xb, wt, v0, n, T, C);
            var push = new CrossEntropyParameters
            {
                TokenCount = (uint)T, ChunkWidth = (uint)n, ChunkFirst = (uint)v0, FirstChunk = v0 == 0 ? 1u : 0u, InverseCount = inverse, Softcap = softcap,
            };
            RunRows(Kernels.CrossEntropy, push, T, [stats, lb, labels]);
        }
        // Pass 2: recompute each chunk, turn it into dlogits (through the cap's derivative), dx += dlogits·w_chunk.
        for (int v0 = 0; v0 < V; v0 += chunk)
        {
            int n = Math.Min(chunk, V - v0);
            Logits(lb, xb, wt, v0, n, T, C);
            var push = new CrossEntropyParameters { TokenCount = (uint)T, ChunkWidth = (uint)n, ChunkFirst = (uint)v0, InverseCount = inverse, Softcap = softcap };
            RunElements(Kernels.CrossEntropyBack, push, (long)T * n, [lb, stats, labels]);
            foreach (var s in RowSegments(wt, v0, n, C))
                WeightGemm(transposed: false, dxb, lb, s, _dummy.Handle, new GemmParameters
                {
                    Rows = (uint)T, Depth = (uint)s.Rows, Cols = (uint)C,
                    StrideA = (uint)n, StrideB = (uint)C, StrideC = (uint)C,
                    OffsetA = (uint)(s.FirstRow - v0),
                    Alpha = 1f, Accumulate = 1,
                });
        }

        // The loss: the mean of lse − the target's capped logit over labelled rows, reduced on the
        // device from the statistics; one float comes back (waits for the device).
        EnsureBuffer(ref _loss, 16, "the loss");
        RunRows(Kernels.CrossEntropyLoss, new LossParameters { TokenCount = (uint)T, InverseCount = inverse }, 1, [_loss!.Handle, stats, labels]);
        Span<float> loss = stackalloc float[1];
        ReadBack(_loss.Handle, 0, MemoryMarshal.AsBytes(loss));
        return loss[0];
    }

    /// <summary>logits[T, n] = x·w[v0..v0+n)ᵀ, one product per part of w the rows fall in.</summary>
    private void Logits(VkBuffer logits, VkBuffer x, Tensor w, int v0, int n, int T, int C)
    {
        foreach (var s in RowSegments(w, v0, n, C))
            WeightGemm(transposed: true, logits, x, s, _dummy.Handle, new GemmParameters
            {
                Rows = (uint)T, Cols = (uint)s.Rows, Depth = (uint)C,
                StrideA = (uint)C, StrideB = (uint)C, StrideC = (uint)n,
                OffsetC = (uint)(s.FirstRow - v0),
                Alpha = 1f,
            });
    }

    /// <summary>
    /// Decoding's logits [T, V] = x·wᵀ through the LM head's products (one per part of w that its rows fall
    /// in, 4-bit or float), then c·tanh(logits / c) in place (softcap.comp) when softcap c &gt; 0.
    /// </summary>
    public void LmHeadLogits(Tensor logits, Tensor x, Tensor w, int T, int C, int V, float softcap)
    {
        if (!(softcap >= 0) || float.IsPositiveInfinity(softcap))
            throw new ArgumentOutOfRangeException(nameof(softcap), softcap, "softcap must be 0 (none) or a positive cap.");
        long n = (long)T * V;
        var lt = Vulkan(logits, n, nameof(logits));
        VkBuffer lb = Single(lt, n), xb = Single(x, (long)T * C, nameof(x));
        Logits(lb, xb, Weight(w, V, C, nameof(w)), 0, V, T, C);
        if (softcap > 0)
            Elementwise(Kernels.Softcap, n, [lt], count => new SoftcapParameters { Count = count, Cap = softcap });
    }

    // ---------------------------------------------------------------- row ranges of split weights

    /// <summary>
    /// Rows [first, first+Rows) of a weight, as they lie in one buffer: of a float or 16-bit weight
    /// (<paramref name="W16"/> not null) from element Offset; of a 4-bit weight (<paramref name="Q4"/>
    /// not null) from row Offset of its part, whose packed words are Buffer and scale/bias pairs ScaleBias.
    /// </summary>
    private readonly record struct RowSegment(VkBuffer Buffer, uint Offset, long FirstRow, int Rows, VulkanQ4Tensor? Q4 = null, VkBuffer ScaleBias = default,
                                              VulkanFloat16Tensor? W16 = null);

    /// <summary>Rows [first, first + count) of a float or 4-bit weight whose rows are <paramref name="width"/> long.</summary>
    private List<RowSegment> RowSegments(Tensor w, long first, long count, int width) => w switch
    {
        VulkanQ4Tensor q => q.Segments(first, count)
            .Select(s => new RowSegment(s.Part.Packed.Handle, (uint)s.Offset, s.FirstRow, s.Rows, q, s.Part.ScaleBias.Handle)).ToList(),
        VulkanFloat16Tensor h => h.Segments(first, count)
            .Select(s => new RowSegment(s.Part.Buffer.Handle, checked((uint)((long)s.Offset * h.Columns)), s.FirstRow, s.Rows, W16: h)).ToList(),
        VulkanTensor t => RowSegments(t, first, count, width),
        _ => throw new ArgumentException($"{w} is a {w.GetType().Name}, not a Vulkan tensor.", nameof(w)),
    };

    /// <summary>
    /// The product of <paramref name="a"/> with a segment of a weight: c = a·segmentᵀ (gemm_nt) when
    /// <paramref name="transposed"/>, else c = a·segment (gemm_nn); for a 4-bit weight the q4 shaders,
    /// which dequantize its tiles as they load them. <paramref name="p"/> has everything but the
    /// weight's offset (and, for a 4-bit one, its stride in packed words), set here.
    /// </summary>
    private void WeightGemm(bool transposed, VkBuffer c, VkBuffer a, RowSegment s, VkBuffer bias, GemmParameters p)
    {
        p.OffsetB = s.Offset;
        if (s.W16 is { } h)
        {
            Gemm(transposed ? Kernels.GemmNTW16 : Kernels.GemmNNW16, [c, a, s.Buffer, bias], p, bFormat: h.ShaderFormat);
            return;
        }
        if (s.Q4 is not { } q)
        {
            Gemm(transposed ? Kernels.GemmNT : Kernels.GemmNN, [c, a, s.Buffer, bias], p);
            return;
        }
        p.StrideB = (uint)q.WordsPerRow;
        Gemm(transposed ? Kernels.GemmNTQ4 : Kernels.GemmNNQ4, [c, a, s.Buffer, s.ScaleBias, bias], p, (uint)q.GroupSize);
    }

    /// <summary>
    /// Rows [first, first + count) of w, whose rows are <paramref name="width"/> long, as runs that each
    /// lie in one part. A row that straddles two parts is copied (in order with the other commands) into
    /// a buffer of its own, kept with the tensor.
    /// </summary>
    private List<RowSegment> RowSegments(VulkanTensor w, long first, long count, int width)
    {
        var segments = new List<RowSegment>();
        long P = w.PartLength, row = first, end = first + count;
        while (row < end)
        {
            long start = row * width;
            int k = (int)(start / P);
            long whole = Math.Min(end, (k + 1) * P / width); // rows that end inside part k
            if (whole > row)
            {
                segments.Add(new RowSegment(w.Part(k), (uint)(start - k * P), row, (int)(whole - row)));
                row = whole;
                continue;
            }
            var seam = w.Seam(row, width, () => DeviceBuffer((ulong)width * sizeof(float), $"{w.Name} row {row}"));
            for (long e = start; e < start + width;)
            {
                int part = (int)(e / P);
                long stop = Math.Min(start + width, (part + 1) * P);
                _stream.CopyBuffer(w.Part(part), (ulong)(e - part * P) * sizeof(float), seam.Handle, (ulong)(e - start) * sizeof(float), (ulong)(stop - e) * sizeof(float));
                e = stop;
            }
            segments.Add(new RowSegment(seam.Handle, 0, row, 1));
            row++;
        }
        return segments;
    }

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

    // ---------------------------------------------------------------- teardown

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        _stream.Dispose(); // waits for the device
        foreach (var t in _live)
            foreach (var b in t switch { VulkanQ4Tensor q => q.Buffers, VulkanFloat16Tensor h => h.Buffers, _ => ((VulkanTensor)t).Buffers })
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
