using Microsoft.Win32.SafeHandles;

namespace LoraCompiler.Runtime.Training;

/// <summary>The process's memory as Linux counts it in /proc/self/status and /proc/self/statm.</summary>
public static class ProcessMemory
{
    /// <summary>
    /// Private anonymous resident memory (RssAnon): the heap, the trainer's buffers and the runtime,
    /// not the pages of memory-mapped weight files. Falls back to the working set elsewhere. A
    /// training step calls it: it allocates nothing.
    /// </summary>
    public static long PrivateBytes() => Resident()?.AnonymousBytes ?? StatusField("RssAnon:") ?? Environment.WorkingSet;

    /// <summary>
    /// VmHWM of /proc/self/status: the kernel's high-water mark of all resident pages, anonymous and
    /// file-backed (mapped weight files included); null off Linux.
    /// </summary>
    public static long? HighWaterMarkBytes() => StatusField("VmHWM:");

    /// <summary>
    /// Resident memory split into anonymous and file-backed pages, from /proc/self/statm (resident
    /// minus shared is exactly status's RssAnon; shared is RssFile + RssShmem). A read costs a few
    /// microseconds, which is what a sampler needs; null off Linux.
    /// </summary>
    public static ResidentMemory? Resident()
    {
        if (Statm.Value is not { } handle)
            return null;
        Span<byte> buffer = stackalloc byte[128];
        lock (handle)
            return ReadStatm(handle, buffer);
    }

    /// <summary>statm, kept open: a read allocates nothing.</summary>
    private static readonly Lazy<SafeFileHandle?> Statm = new(() =>
    {
        try { return File.OpenHandle(StatmPath); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return null; }
    });

    internal const string StatmPath = "/proc/self/statm";

    /// <summary>Parses statm ("size resident shared text lib data dt", in pages) read at offset 0 of an open handle.</summary>
    internal static ResidentMemory? ReadStatm(SafeFileHandle handle, Span<byte> buffer)
    {
        int n = RandomAccess.Read(handle, buffer, 0);
        Span<long> fields = stackalloc long[3];
        int field = 0;
        long value = 0;
        bool inNumber = false;
        for (int i = 0; i < n && field < 3; i++)
        {
            byte c = buffer[i];
            if (c is >= (byte)'0' and <= (byte)'9')
            {
                value = value * 10 + (c - '0');
                inNumber = true;
            }
            else if (inNumber)
            {
                fields[field++] = value;
                (value, inNumber) = (0, false);
            }
        }
        if (field < 3)
            return null;
        long page = Environment.SystemPageSize;
        return new ResidentMemory((fields[1] - fields[2]) * page, fields[2] * page);
    }

    private static long? StatusField(string prefix)
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith(prefix, StringComparison.Ordinal))
                    return long.Parse(line.AsSpan(prefix.Length).Trim().TrimEnd("kB").Trim()) * 1024;
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return null;
    }
}

/// <summary>Resident pages of the process: anonymous (private: heaps, buffers, stacks) and file-backed (mapped files, shared memory).</summary>
public readonly record struct ResidentMemory(long AnonymousBytes, long FileBytes);

/// <summary>
/// The peak of the process's private (anonymous) resident memory over a stretch of time: a background
/// thread reads /proc/self/statm every <see cref="Interval"/>, and <see cref="Sample"/> adds a reading
/// at a moment the caller knows matters (a layer boundary). Linux keeps a high-water mark of all
/// resident memory (VmHWM) but none of the anonymous part alone, so it has to be sampled.
/// </summary>
public sealed class PeakMemorySampler : IDisposable
{
    private readonly object _gate = new();
    private readonly SafeFileHandle? _statm;
    private readonly byte[] _buffer = new byte[128];
    private readonly Thread? _thread;
    private volatile bool _stopping;

    public PeakMemorySampler(TimeSpan interval)
    {
        Interval = interval;
        try
        {
            _statm = File.OpenHandle(ProcessMemory.StatmPath);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _statm = null; // not Linux: samples fall back to status/the working set
        }
        Sample("start");
        _thread = new Thread(Run) { IsBackground = true, Name = "peak-memory-sampler", Priority = ThreadPriority.AboveNormal };
        _thread.Start();
    }

    /// <summary>How often the background thread reads.</summary>
    public TimeSpan Interval { get; }

    /// <summary>What the process is doing, recorded with the peak (set it at phase changes: "step 3").</summary>
    public string Phase { get; set; } = "start";

    /// <summary>The highest private (anonymous) resident bytes seen.</summary>
    public long PeakPrivateBytes { get; private set; }

    /// <summary>The <see cref="Phase"/> (and the caller's label) at the sample that set <see cref="PeakPrivateBytes"/>.</summary>
    public string PeakAt { get; private set; } = "";

    /// <summary>The highest file-backed resident bytes seen (mapped weights; not private memory).</summary>
    public long PeakFileBytes { get; private set; }

    /// <summary>Readings taken so far, by the thread and by <see cref="Sample"/>.</summary>
    public long Samples { get; private set; }

    /// <summary>Takes one reading now; <paramref name="label"/> says where, for <see cref="PeakAt"/>.</summary>
    public void Sample(string? label = null)
    {
        lock (_gate)
        {
            var memory = _statm is null
                ? new ResidentMemory(ProcessMemory.PrivateBytes(), 0)
                : ProcessMemory.ReadStatm(_statm, _buffer) ?? new ResidentMemory(ProcessMemory.PrivateBytes(), 0);
            Samples++;
            if (memory.AnonymousBytes > PeakPrivateBytes)
            {
                PeakPrivateBytes = memory.AnonymousBytes;
                PeakAt = label is null ? Phase : $"{Phase}, {label}";
            }
            PeakFileBytes = Math.Max(PeakFileBytes, memory.FileBytes);
        }
    }

    /// <summary>Stops the background thread after one last reading; the peaks stay readable.</summary>
    public void Stop()
    {
        if (_stopping)
            return;
        Sample("end");
        _stopping = true;
        _thread?.Join();
    }

    private void Run()
    {
        while (!_stopping)
        {
            Thread.Sleep(Interval);
            if (!_stopping)
                Sample();
        }
    }

    public void Dispose()
    {
        Stop();
        _statm?.Dispose();
    }
}
