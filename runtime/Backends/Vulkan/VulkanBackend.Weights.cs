using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using LoraCompiler.Runtime.Weights;
using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>
/// Base weights on the device: <see cref="MapWeight"/> uploads a weight as it is stored (4-bit and
/// 16-bit ones packed, F32 as float32) and keeps it resident when it fits, so a step that maps its
/// layers again (forward, then the recompute of backward, then the next step) uploads nothing.
///
/// The residency rule: a weight is kept when the resident weights with it stay within
/// <see cref="VulkanBackendOptions.MaxResidentBytes"/> and the device-local heap keeps
/// <see cref="ResidentReserveBytes"/> free after it. What is free is the driver's heapBudget less its
/// heapUsage where the device has <c>VK_EXT_memory_budget</c> (other processes' use already taken out),
/// else the heap's size less this device's own device-local allocations. The first weights mapped
/// fill the room (a trainer maps its buffers first, then the embedding and the final norm, then the
/// layers in order); a weight that does not fit is streamed as before: uploaded at each
/// <see cref="MapWeight"/>, freed at <see cref="ReleaseWeight"/>. Resident weights are cached per
/// (<see cref="ModelWeights"/> instance, tensor name) and freed when the backend is disposed.
///
/// Not done: a streamed weight is uploaded when it is mapped, not ahead of it. Its host copy into the
/// staging memory already overlaps the device running the batch before (two batches rotate, see
/// <see cref="CommandStream"/>); uploading the next layer's weights during this layer's kernels would
/// need the order the trainer maps them in, which only the generated code knows.
/// </summary>
public sealed unsafe partial class VulkanBackend
{
    private readonly Dictionary<(ModelWeights Weights, string Name), Tensor> _resident = new(WeightKeyComparer.Instance);

    /// <summary>The least the device-local heap keeps free after a resident weight (64 MiB; a larger budget keeps an eighth of it).</summary>
    public const long MinimumResidentReserveBytes = 64L << 20;

    /// <summary>
    /// Bytes of the device-local heap residency leaves free for what comes after the first steps: the
    /// streamed weights of a layer, the optimizer's state, a KV cache, other programs. An eighth of the
    /// budget (or of the heap, without <c>VK_EXT_memory_budget</c>), at least <see cref="MinimumResidentReserveBytes"/>.
    /// </summary>
    public long ResidentReserveBytes => Reserve(DeviceBudget().Budget);

    /// <summary>Bytes of device memory the resident weights hold.</summary>
    public long ResidentWeightBytes { get; private set; }

    /// <summary>How many weights are resident.</summary>
    public int ResidentWeights => _resident.Count;

    /// <summary>Bytes of base weights uploaded by <see cref="MapWeight"/> so far (resident ones once, streamed ones at every map); part of <see cref="TransferredBytes"/>.</summary>
    public long WeightUploadBytes { get; private set; }

    /// <summary>
    /// This backend's device memory (<see cref="VulkanDevice.Memory"/>): device-local and staging bytes and
    /// buffers, now and at the peak; the device-local bytes by what they hold (tensors, base weights, the
    /// backend's own); and <c>VK_EXT_memory_budget</c>'s budget and usage, null without it.
    /// </summary>
    public VulkanDeviceMemory DeviceMemory => _device.Memory;

    /// <summary>Starts the peaks of <see cref="DeviceMemory"/> again from what is allocated now (for example before a step).</summary>
    public void ResetPeakDeviceMemory() => _device.ResetPeakMemory();

    /// <summary>
    /// A base weight on the device, as it is stored: a 4-bit one packed (<see cref="Upload(Q4Weight)"/>,
    /// never dequantized), a 16-bit one as it is stored (<see cref="Upload(Float16Weight)"/>), an F32 one
    /// as float32. A resident weight (see the class remarks) is uploaded the first time and the same
    /// tensor returned after (<see cref="Tensor.IsResident"/> true); another is uploaded at every call.
    /// The file's pages of the tensor are let go once it is uploaded.
    /// </summary>
    public Tensor MapWeight(ModelWeights weights, string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(weights);
        if (_resident.TryGetValue((weights, name), out var kept))
            return kept;
        bool resident = Fits(StoredBytes(weights, name));
        if (!resident && _streamedReleased)
        {
            // The previous layer's streamed weights were released into the batch being recorded: it
            // goes to the device now, so their memory is freed as soon as it has run, while this
            // layer's weights are copied into the next batch's staging memory. A streamed step so
            // keeps about two layers of weights on the device, not a whole batch's worth of layers.
            _stream.Submit();
            _streamedReleased = false;
        }
        var tensor = UploadWeight(weights, name);
        long bytes = tensor.DeviceBytes;
        weights.ReleasePages(name);
        WeightUploadBytes += bytes;
        if (resident)
        {
            tensor.Resident = true;
            _resident[(weights, name)] = tensor;
            ResidentWeightBytes += bytes;
        }
        return tensor;
    }

    /// <summary>Uploads a weight as it is stored; an F32 one is a <see cref="VulkanTensor"/> whose buffers count as a weight's.</summary>
    private VulkanDeviceTensor UploadWeight(ModelWeights weights, string name)
    {
        if (weights.IsQuantized(name))
            return Upload(weights.MapQ4(name));
        if (weights.MapFloat16(name) is { } half)
            return Upload(half);
        var f32 = (VulkanTensor)(weights.MapF32(name) is { } mapped ? Upload(name, mapped.Span) : Upload(name, weights.Read(name)));
        foreach (var part in f32.Parts)
            _device.Assign(part, DeviceBufferRole.Weight);
        return f32;
    }

    /// <summary>
    /// Frees a streamed weight's device memory once the kernels recorded so far no longer need it; a
    /// resident weight stays (the backend frees it when it is disposed).
    /// </summary>
    public void ReleaseWeight(Tensor weight)
    {
        if (weight.IsResident)
            return;
        weight.Dispose();
        _streamedReleased = true;
    }

    /// <summary>Whether a streamed weight was released since the batch being recorded began (<see cref="MapWeight"/> then submits it).</summary>
    private bool _streamedReleased;

    /// <summary>Whether a weight of <paramref name="bytes"/> may stay resident now (the class remarks' rule).</summary>
    private bool Fits(long bytes)
    {
        long cap = _device.Options.MaxResidentBytes ?? long.MaxValue;
        if (bytes > cap - ResidentWeightBytes)
            return false;
        var (budget, used) = DeviceBudget();
        return bytes <= budget - used - Reserve(budget);
    }

    /// <summary>The device-local heap's budget and what is used of it: the driver's, else its size and this device's allocations.</summary>
    private (long Budget, long Used) DeviceBudget() => _device.Budget() ?? (_device.DeviceLocalHeapBytes, _device.Memory.DeviceLocal.Bytes);

    private static long Reserve(long budget) => Math.Max(budget / 8, MinimumResidentReserveBytes);

    /// <summary>The device bytes a weight will take, from the file's header: packed words and scale/bias pairs, 2 bytes a 16-bit value, else 4.</summary>
    private static long StoredBytes(ModelWeights weights, string name)
    {
        if (weights.IsQuantized(name))
        {
            var shape = weights.Shape(name);
            long rows = shape[0], columns = shape.Length > 1 ? shape[1] : 1;
            long groups = weights.Info(Q4.ScalesName(name)).Elements;
            return rows * columns / 2 + groups * sizeof(uint);
        }
        var info = weights.Info(name);
        return Float16Weight.FormatOf(info.Dtype) is null ? info.Elements * sizeof(float) : info.Elements * sizeof(ushort);
    }

    /// <summary>Resident weights are keyed by the <see cref="ModelWeights"/> object itself (the same files opened twice are two).</summary>
    private sealed class WeightKeyComparer : IEqualityComparer<(ModelWeights Weights, string Name)>
    {
        public static readonly WeightKeyComparer Instance = new();

        public bool Equals((ModelWeights Weights, string Name) x, (ModelWeights Weights, string Name) y) =>
            ReferenceEquals(x.Weights, y.Weights) && string.Equals(x.Name, y.Name, StringComparison.Ordinal);

        public int GetHashCode((ModelWeights Weights, string Name) key) =>
            HashCode.Combine(RuntimeHelpers.GetHashCode(key.Weights), StringComparer.Ordinal.GetHashCode(key.Name));
    }

    /// <summary>
    /// A 4-bit weight in device memory as it is stored: its packed words copied unchanged, its F16
    /// scales and biases interleaved into one uint per group (see <see cref="VulkanQ4Tensor"/>). The
    /// products and the embedding dequantize it as they read it. Split by whole rows into parts of
    /// at most the buffer limit.
    /// </summary>
    internal VulkanQ4Tensor Upload(Q4Weight weight)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(weight);
        // A row's packed words are at least its scale/bias pairs: groups hold at least 8 elements.
        var parts = RowParts(weight.Name, "4-bit", weight.Rows, (long)weight.WordsPerRow * sizeof(uint), out int rowsPerPart,
            (what, first, rows) => new VulkanQ4Tensor.Part(
                DeviceBuffer((ulong)Math.Max((long)rows * weight.WordsPerRow, 1) * sizeof(uint), $"{what} (4-bit packed)"),
                DeviceBuffer((ulong)Math.Max((long)rows * weight.GroupsPerRow, 1) * sizeof(uint), $"{what} (scales and biases)"),
                first, rows),
            part =>
            {
                UploadWords(weight.Packed.Span.Slice(part.FirstRow * weight.WordsPerRow, part.Rows * weight.WordsPerRow), part.Packed.Handle);
                int groups = part.Rows * weight.GroupsPerRow, firstGroup = part.FirstRow * weight.GroupsPerRow;
                UploadScaleBias(weight.Scales.Span.Slice(firstGroup, groups), weight.Biases.Span.Slice(firstGroup, groups), part.ScaleBias.Handle);
            });
        var tensor = new VulkanQ4Tensor(this, weight.Name, weight.Rows, weight.Columns, weight.GroupSize, rowsPerPart, parts);
        _live.Add(tensor);
        return tensor;
    }

    /// <summary>
    /// A 16-bit weight in device memory as it is stored: its bits copied unchanged, two values to a
    /// uint (see <see cref="VulkanFloat16Tensor"/>). Split by whole rows into parts of at most the
    /// buffer limit.
    /// </summary>
    internal VulkanFloat16Tensor Upload(Float16Weight weight)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(weight);
        var parts = RowParts(weight.Name, "16-bit", weight.Rows, (long)weight.Columns * sizeof(ushort), out int rowsPerPart,
            (what, first, rows) => new VulkanFloat16Tensor.Part(
                DeviceBuffer((ulong)Math.Max(((long)rows * weight.Columns + 1) / 2, 1) * sizeof(uint), $"{what} ({weight.Dtype})"), first, rows),
            part => UploadWords(weight.Bits.Span.Slice((int)((long)part.FirstRow * weight.Columns), (int)((long)part.Rows * weight.Columns)),
                part.Buffer.Handle));
        var tensor = new VulkanFloat16Tensor(this, weight.Name, weight.Format, weight.Rows, weight.Columns, rowsPerPart, parts);
        _live.Add(tensor);
        return tensor;
    }

    /// <summary>
    /// The parts of a weight of <paramref name="rows"/> rows of <paramref name="rowBytes"/> each, split
    /// by whole rows into parts of at most the buffer limit: each part's buffers made by
    /// <paramref name="create"/> (its name for messages, first row, rows), then filled by
    /// <paramref name="fill"/>. When one fails, the parts made so far are freed.
    /// </summary>
    private TPart[] RowParts<TPart>(string name, string kind, int rows, long rowBytes, out int rowsPerPart,
        Func<string, int, int, TPart> create, Action<TPart> fill) where TPart : struct, IRowPart
    {
        long partBytes = PartLength * sizeof(float);
        rowsPerPart = (int)Math.Min(Math.Max(rows, 1), partBytes / Math.Max(rowBytes, 1));
        if (rowsPerPart == 0)
            throw new VulkanException(
                $"A row of the {kind} weight '{name}' takes {VulkanDevice.Megabytes((ulong)rowBytes)}, more than {_device.Name} allows in one " +
                $"storage buffer ({VulkanDevice.Megabytes((ulong)partBytes)}).");
        int count = Math.Max(1, (rows + rowsPerPart - 1) / rowsPerPart), made = 0;
        var parts = new TPart[count];
        try
        {
            for (int k = 0; k < count; k++)
            {
                int first = k * rowsPerPart;
                parts[k] = create(count == 1 ? name : $"{name} part {k + 1}/{count}", first, Math.Min(rowsPerPart, rows - first));
                made++;
                fill(parts[k]);
            }
        }
        catch
        {
            _stream.Finish();
            foreach (var part in parts.Take(made))
                foreach (var buffer in part.Buffers)
                    buffer.Dispose();
            throw;
        }
        return parts;
    }

    /// <summary>Copies words to the start of a device buffer, a staging piece at a time.</summary>
    private void UploadWords<T>(ReadOnlySpan<T> words, VkBuffer destination) where T : unmanaged
    {
        int piece = (int)Math.Min(int.MaxValue, _stream.StagingBytes / (ulong)sizeof(T));
        for (int done = 0; done < words.Length; done += piece)
        {
            var slice = words.Slice(done, Math.Min(piece, words.Length - done));
            _stream.Upload(MemoryMarshal.AsBytes(slice), destination, (ulong)done * (ulong)sizeof(T));
        }
    }

    /// <summary>Writes (scale bits | bias bits &lt;&lt; 16) per group to the start of a device buffer, a staging piece at a time.</summary>
    private void UploadScaleBias(ReadOnlySpan<Half> scales, ReadOnlySpan<Half> biases, VkBuffer destination)
    {
        int piece = (int)Math.Min((ulong)Math.Min(scales.Length, 1 << 16), _stream.StagingBytes / sizeof(uint));
        var pairs = new uint[Math.Max(piece, 1)];
        for (int done = 0; done < scales.Length; done += piece)
        {
            int n = Math.Min(piece, scales.Length - done);
            for (int i = 0; i < n; i++)
                pairs[i] = BitConverter.HalfToUInt16Bits(scales[done + i]) | (uint)BitConverter.HalfToUInt16Bits(biases[done + i]) << 16;
            _stream.Upload(MemoryMarshal.AsBytes(pairs.AsSpan(0, n)), destination, (ulong)done * sizeof(uint));
        }
    }
}
