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

    private const string StatmPath = "/proc/self/statm";

    /// <summary>Parses statm ("size resident shared text lib data dt", in pages) read at offset 0 of an open handle.</summary>
    private static ResidentMemory? ReadStatm(SafeFileHandle handle, Span<byte> buffer)
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
