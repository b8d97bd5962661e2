using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;

namespace LoraCompiler.Runtime.Distributed;

/// <summary>
/// This process's place in an Open MPI job (<c>MPI_COMM_WORLD</c>): its rank, the number of ranks,
/// and the collectives a training run needs. Every collective is started non-blocking and waited
/// for with a deadline (<see cref="Timeout"/>): a rank that stopped answering (killed, hung, cut off
/// by the network) is a <see cref="DistributedException"/> naming what was being waited for, never
/// a hang. Ranks must call the collectives in the same order, as MPI requires.
/// </summary>
/// <remarks>
/// MPI is initialized once per process (MPI_THREAD_FUNNELED: only the thread that created the world
/// calls MPI; the CPU backend's worker threads never do). <see cref="Dispose"/> finalizes it.
/// </remarks>
public sealed unsafe class MpiWorld : IDisposable
{
    private readonly OpenMpi.Api _mpi;
    private bool _finalized;

    private MpiWorld(OpenMpi.Api mpi, int rank, int size, string host, string library, TimeSpan timeout)
    {
        (_mpi, Rank, Size, Host, Library, Timeout) = (mpi, rank, size, host, library, timeout);
    }

    /// <summary>This process's rank, 0 to <see cref="Size"/> − 1.</summary>
    public int Rank { get; }

    /// <summary>The number of ranks (processes) of the job.</summary>
    public int Size { get; }

    /// <summary>The machine this rank runs on (MPI_Get_processor_name).</summary>
    public string Host { get; }

    /// <summary>The MPI library's version line (MPI_Get_library_version).</summary>
    public string Library { get; }

    /// <summary>How long a collective may wait for the other ranks before the run gives up.</summary>
    public TimeSpan Timeout { get; set; }

    /// <summary>Seconds this rank spent waiting in collectives (the other ranks' work it waited for, and the transfer).</summary>
    public double WaitSeconds { get; private set; }

    /// <summary>
    /// Whether this process was started by <c>mpirun</c> (Open MPI sets <c>OMPI_COMM_WORLD_SIZE</c>
    /// in every rank's environment; PMIx launchers set <c>PMIX_RANK</c>).
    /// </summary>
    public static bool LaunchedByMpirun =>
        Environment.GetEnvironmentVariable("OMPI_COMM_WORLD_SIZE") is not null || Environment.GetEnvironmentVariable("PMIX_RANK") is not null;

    private static MpiWorld? s_world;

    /// <summary>Initializes MPI (once per process) and returns the world.</summary>
    public static MpiWorld Initialize(TimeSpan timeout)
    {
        if (s_world is { _finalized: false })
        {
            s_world.Timeout = timeout;
            return s_world;
        }
        if (s_world is not null)
            throw new DistributedException("MPI was finalized in this process already; it cannot be initialized again.");
        var mpi = OpenMpi.Functions;
        int flag;
        OpenMpi.Check(mpi.Finalized(&flag), "MPI_Finalized");
        if (flag != 0)
            throw new DistributedException("MPI was finalized in this process already; it cannot be initialized again.");
        OpenMpi.Check(mpi.Initialized(&flag), "MPI_Initialized");
        if (flag == 0)
        {
            int provided;
            OpenMpi.Check(mpi.InitThread(null, null, OpenMpi.ThreadFunneled, &provided), "MPI_Init_thread");
        }
        int rank, size;
        OpenMpi.Check(mpi.CommRank(mpi.CommWorld, &rank), "MPI_Comm_rank");
        OpenMpi.Check(mpi.CommSize(mpi.CommWorld, &size), "MPI_Comm_size");
        return s_world = new MpiWorld(mpi, rank, size, Text(mpi.GetProcessorName, 256), Text(mpi.GetLibraryVersion, 8192), timeout);
    }

    private static string Text(delegate* unmanaged<byte*, int*, int> get, int capacity)
    {
        var buffer = new byte[capacity];
        int length;
        fixed (byte* p = buffer)
            OpenMpi.Check(get(p, &length), "MPI_Get_*");
        return Encoding.UTF8.GetString(buffer, 0, Math.Clamp(length, 0, capacity)).TrimEnd('\0', '\n', ' ');
    }

    // ----- non-blocking: start, test, wait with the deadline -----

    /// <summary>Starts summing <paramref name="count"/> floats at <paramref name="buffer"/> across the ranks, in place; the memory must not move (pinned) until the request completes.</summary>
    public nint StartSum(float* buffer, int count) => StartAllreduce(buffer, count, _mpi.Float, _mpi.OpSum);

    private nint StartAllreduce(void* buffer, int count, nint type, nint op)
    {
        nint request;
        OpenMpi.Check(_mpi.Iallreduce(OpenMpi.InPlace, (nint)buffer, count, type, op, _mpi.CommWorld, &request), "MPI_Iallreduce");
        return request;
    }

    /// <summary>Whether the request is complete (it is then released and set to null); lets MPI progress the transfer.</summary>
    public bool Test(ref nint request)
    {
        if (request == 0)
            return true;
        int done;
        fixed (nint* r = &request)
            OpenMpi.Check(_mpi.Test(r, &done, 0), "MPI_Test");
        if (done != 0)
            request = 0;
        return done != 0;
    }

    /// <summary>Waits for a request, at most <see cref="Timeout"/>; then a <see cref="DistributedException"/> saying what it was.</summary>
    public void Wait(ref nint request, string what)
    {
        if (Test(ref request))
            return;
        long start = Stopwatch.GetTimestamp();
        int spins = 0;
        while (!Test(ref request))
        {
            // Give the core away between polls: on a machine with more ranks than cores the rank
            // being waited for may need it.
            Thread.Yield();
            if ((++spins & 255) == 0 && Stopwatch.GetElapsedTime(start) > Timeout)
                throw new DistributedException($"rank {Rank}: the other ranks did not answer for {Timeout.TotalSeconds:0.#} s while {what} " +
                                               "(a rank stopped, hangs, or the network between them is down; --mpi-timeout sets this limit).");
        }
        WaitSeconds += Stopwatch.GetElapsedTime(start).TotalSeconds;
    }

    // ----- blocking collectives (each waits with the deadline) -----

    /// <summary>Sums each value across the ranks, in place.</summary>
    public void Sum(Span<float> values, string what) => Allreduce(values, _mpi.Float, _mpi.OpSum, what);

    /// <summary>Sums each value across the ranks, in place.</summary>
    public void Sum(Span<double> values, string what) => Allreduce(values, _mpi.Double, _mpi.OpSum, what);

    /// <summary>Sums each value across the ranks, in place.</summary>
    public void Sum(Span<long> values, string what) => Allreduce(values, _mpi.LongLong, _mpi.OpSum, what);

    /// <summary>The smallest of the ranks' values.</summary>
    public int Min(int value, string what)
    {
        Span<int> one = [value];
        Allreduce(one, _mpi.Int, _mpi.OpMin, what);
        return one[0];
    }

    /// <summary>The largest of the ranks' values.</summary>
    public int Max(int value, string what)
    {
        Span<int> one = [value];
        Allreduce(one, _mpi.Int, _mpi.OpMax, what);
        return one[0];
    }

    private void Allreduce<T>(Span<T> values, nint type, nint op, string what) where T : unmanaged
    {
        if (values.IsEmpty)
            return;
        fixed (T* p = values)
        {
            nint request = StartAllreduce(p, values.Length, type, op);
            Wait(ref request, what);
        }
    }

    /// <summary>Copies <paramref name="buffer"/> of rank <paramref name="root"/> into every rank's (the same length on each).</summary>
    public void BroadcastInPlace(Span<byte> buffer, int root, string what)
    {
        for (int offset = 0; offset < buffer.Length; offset += 1 << 30)
        {
            var part = buffer.Slice(offset, Math.Min(1 << 30, buffer.Length - offset));
            fixed (byte* p = part)
            {
                nint request;
                OpenMpi.Check(_mpi.Ibcast((nint)p, part.Length, _mpi.Byte, root, _mpi.CommWorld, &request), "MPI_Ibcast");
                Wait(ref request, what);
            }
        }
    }

    /// <summary>A byte string of <paramref name="root"/>'s (what the others pass is ignored) handed to every rank.</summary>
    public byte[] Broadcast(byte[]? data, int root, string what)
    {
        Span<long> length = [Rank == root ? data!.LongLength : 0];
        BroadcastInPlace(MemoryMarshal.AsBytes(length), root, what);
        var result = Rank == root ? data! : new byte[length[0]];
        BroadcastInPlace(result, root, what);
        return result;
    }

    /// <summary>Returns when every rank has called it.</summary>
    public void Barrier(string what)
    {
        nint request;
        OpenMpi.Check(_mpi.Ibarrier(_mpi.CommWorld, &request), "MPI_Ibarrier");
        Wait(ref request, what);
    }

    /// <summary>
    /// A point every rank passes with its own outcome: null when it is ready to go on, or what stopped
    /// it. Returns null when every rank is ready; otherwise every rank gets the lowest failing rank's
    /// error: its rank, its message and an exit code, the same on every rank.
    /// </summary>
    public (int Rank, string Message, int Code)? Agree(string? failure, int code)
    {
        int first = Min(failure is null ? int.MaxValue : Rank, "agreeing that every rank is ready");
        if (first == int.MaxValue)
            return null;
        var message = Broadcast(first == Rank ? Encoding.UTF8.GetBytes(failure!) : null, first, "hearing why a rank stopped");
        Span<int> exit = [code];
        fixed (int* p = exit)
        {
            nint request;
            OpenMpi.Check(_mpi.Ibcast((nint)p, 1, _mpi.Int, first, _mpi.CommWorld, &request), "MPI_Ibcast");
            Wait(ref request, "hearing why a rank stopped");
        }
        return (first, Encoding.UTF8.GetString(message), exit[0]);
    }

    /// <summary>Ends every rank of the job with <paramref name="code"/> (MPI_Abort): for a rank that cannot go on while the others wait for it.</summary>
    public void Abort(int code)
    {
        _mpi.Abort(_mpi.CommWorld, code);
        Environment.Exit(code); // MPI_Abort does not return; should it, the process still ends
    }

    /// <summary>Finalizes MPI (once): every rank must get here.</summary>
    public void Dispose()
    {
        if (_finalized)
            return;
        _finalized = true;
        OpenMpi.Check(_mpi.FinalizeMpi(), "MPI_Finalize");
    }
}
