using System.Runtime.CompilerServices;
using System.Runtime.ExceptionServices;

namespace LoraCompiler.Runtime.Backends;

/// <summary>The body of a parallel loop: <see cref="Run"/> once for every index of the loop, in any order, on any thread.</summary>
internal interface IParallelBody
{
    void Run(int index);
}

/// <summary>
/// Parallel loops that allocate nothing: the loop's body is a struct (its fields are what a lambda
/// would capture), handed to dedicated worker threads by address, and the caller works on the loop
/// too. <see cref="Parallel.For(int, int, ParallelOptions, Action{int})"/> allocates a closure and
/// its tasks on every call, thousands of times a training step; this is what keeps a steady-state
/// step off the managed heap.
/// </summary>
/// <remarks>
/// One loop runs at a time. A loop started while another runs (another trainer on another thread,
/// or a loop inside a loop's body) runs on its caller's thread alone: correct, only not parallel.
/// The first exception a body throws stops the loop from taking further indices and is rethrown
/// on the caller once every worker has left it.
/// </remarks>
internal static unsafe class WorkerPool
{
    private static int s_busy; // 1 while a loop runs
    private static readonly object s_growLock = new();
    private static readonly SemaphoreSlim s_start = new(0);
    // A semaphore, not a ManualResetEventSlim: that one allocates its lock object on the first wait
    // that has to block, which made one step in many allocate 24 bytes. A semaphore makes its lock
    // object in its constructor.
    private static readonly SemaphoreSlim s_done = new(0);
    private static int s_workers;

    // The running loop, read by the workers after s_start lets them in.
    private static delegate*<void*, int, void> s_run;
    private static void* s_body;
    private static int s_count, s_next, s_pending;
    private static ExceptionDispatchInfo? s_error;

    /// <summary>body.Run(i) for i in [0, count), on up to <paramref name="threads"/> threads (the caller's among them).</summary>
    public static void For<TBody>(int count, int threads, TBody body) where TBody : struct, IParallelBody
    {
        int helpers = Math.Min(Math.Min(threads, count), Environment.ProcessorCount) - 1;
        if (helpers <= 0 || Interlocked.CompareExchange(ref s_busy, 1, 0) != 0)
        {
            for (int i = 0; i < count; i++)
                body.Run(i);
            return;
        }
        try
        {
            EnsureWorkers(helpers);
            // body is this frame's own copy, so its address holds until the workers have left.
            s_run = &Run<TBody>;
            s_body = Unsafe.AsPointer(ref body);
            (s_count, s_next, s_pending, s_error) = (count, 0, helpers, null);
            s_start.Release(helpers);
            Work();
            s_done.Wait();
            s_error?.Throw();
        }
        finally
        {
            s_body = null;
            Volatile.Write(ref s_busy, 0);
        }
    }

    private static void Run<TBody>(void* body, int index) where TBody : struct, IParallelBody => Unsafe.AsRef<TBody>(body).Run(index);

    /// <summary>Takes indices of the running loop until none is left.</summary>
    private static void Work()
    {
        int i;
        while ((i = Interlocked.Increment(ref s_next) - 1) < s_count)
        {
            try
            {
                s_run(s_body, i);
            }
            catch (Exception e)
            {
                Interlocked.CompareExchange(ref s_error, ExceptionDispatchInfo.Capture(e), null);
                Volatile.Write(ref s_next, s_count);
            }
        }
    }

    private static void EnsureWorkers(int count)
    {
        if (Volatile.Read(ref s_workers) >= count)
            return;
        lock (s_growLock)
        {
            while (s_workers < count)
            {
                new Thread(Worker) { IsBackground = true, Name = $"lora-cpu-{s_workers + 1}" }.Start();
                s_workers++;
            }
        }
    }

    /// <summary>A worker: each release of s_start is one loop to help with, then it reports that it left the loop.</summary>
    private static void Worker()
    {
        while (true)
        {
            s_start.Wait();
            Work();
            if (Interlocked.Decrement(ref s_pending) == 0)
                s_done.Release();
        }
    }
}
