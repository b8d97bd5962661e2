using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Benchmarks;

/// <summary>
/// The peak of the process's private (anonymous) resident memory over a stretch of time: a background
/// thread reads /proc/self/statm every <see cref="Interval"/>, and <see cref="Sample"/> adds a reading
/// at a moment the caller knows matters (a layer boundary). Linux keeps a high-water mark of all
/// resident memory (VmHWM) but none of the anonymous part alone, so it has to be sampled.
/// </summary>
public sealed class PeakMemorySampler : IDisposable
{
    private readonly object _gate = new();
    private readonly Thread? _thread;
    private volatile bool _stopping;

    public PeakMemorySampler(TimeSpan interval)
    {
        Interval = interval;
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
            // statm through ProcessMemory's kept handle; off Linux, status or the working set.
            var memory = ProcessMemory.Resident() ?? new ResidentMemory(ProcessMemory.PrivateBytes(), 0);
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
    }
}
