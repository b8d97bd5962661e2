using LoraCompiler.Runtime.IO;
using System.Runtime.InteropServices;
using Silk.NET.Vulkan;
using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>Buffers: allocation, uploads through the staging memory, readbacks, and the small buffers of token ids and labels.</summary>
public sealed unsafe partial class VulkanBackend
{
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

    internal void Release(VulkanDeviceTensor tensor, IEnumerable<VulkanBuffer> buffers)
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
}
