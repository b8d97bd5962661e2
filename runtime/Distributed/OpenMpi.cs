using System.Runtime.InteropServices;

namespace LoraCompiler.Runtime.Distributed;

/// <summary>
/// The few functions of Open MPI's C library (<c>libmpi.so.40</c>, Debian's <c>openmpi-bin</c> /
/// <c>libopenmpi3</c>) that a data-parallel run needs, called directly. NuGet's MPI.NET 1.4.0 binds
/// MS-MPI (<c>msmpi.dll</c>, integer handles) and does not load against Open MPI, whose handles are
/// pointers: <c>MPI_COMM_WORLD</c>, <c>MPI_FLOAT</c> and <c>MPI_SUM</c> are the addresses of the
/// library's objects <c>ompi_mpi_comm_world</c>, <c>ompi_mpi_float</c> and <c>ompi_mpi_op_sum</c>,
/// resolved here with <see cref="NativeLibrary.GetExport"/>.
/// </summary>
/// <remarks>
/// Every return code is checked, but with Open MPI's default error handler (MPI_ERRORS_ARE_FATAL) a
/// failing call ends the job before it returns. The C <c>int</c> counts limit one call to 2³¹−1
/// elements; the callers' buffers are a layer's gradients or one LoRA tensor.
/// </remarks>
internal static unsafe class OpenMpi
{
    public const string LibraryName = "libmpi.so.40";

    // Thread support levels of MPI_Init_thread.
    public const int ThreadFunneled = 1;

    /// <summary>MPI_IN_PLACE: ((void *) 1).</summary>
    public static readonly nint InPlace = 1;

    private static readonly Lazy<Api> s_api = new(Load);

    /// <summary>The functions and handles; a missing or foreign library is a <see cref="DistributedException"/> saying what to install.</summary>
    public static Api Functions => s_api.Value;

    /// <summary>Whether libmpi.so.40 can be loaded on this machine (no MPI call is made).</summary>
    public static bool IsAvailable(out string reason)
    {
        try
        {
            _ = s_api.Value;
            reason = "";
            return true;
        }
        catch (DistributedException e)
        {
            reason = e.Message;
            return false;
        }
    }

    public sealed class Api
    {
        public required nint Library;
        public required delegate* unmanaged<int*, int> Initialized;
        public required delegate* unmanaged<int*, int> Finalized;
        public required delegate* unmanaged<int*, byte***, int, int*, int> InitThread;
        public required delegate* unmanaged<int> FinalizeMpi;
        public required delegate* unmanaged<nint, int*, int> CommRank;
        public required delegate* unmanaged<nint, int*, int> CommSize;
        public required delegate* unmanaged<nint, nint, int, nint, nint, nint, nint*, int> Iallreduce;
        public required delegate* unmanaged<nint, int, nint, int, nint, nint*, int> Ibcast;
        public required delegate* unmanaged<nint, nint*, int> Ibarrier;
        public required delegate* unmanaged<nint*, int*, nint, int> Test;
        public required delegate* unmanaged<nint, int, int> Abort;
        public required delegate* unmanaged<byte*, int*, int> GetProcessorName;
        public required delegate* unmanaged<byte*, int*, int> GetLibraryVersion;
        public required nint CommWorld, Float, Double, LongLong, Int, Byte, OpSum, OpMin, OpMax;
    }

    private static Api Load()
    {
        if (!OperatingSystem.IsLinux())
            throw new DistributedException("distributed training needs Open MPI, which this build binds on Linux only.");
        if (!NativeLibrary.TryLoad(LibraryName, out nint library))
            throw new DistributedException($"Open MPI's {LibraryName} is not installed: install it (Debian: apt-get install openmpi-bin) " +
                                           "on every machine of the run.");
        nint Export(string name) =>
            NativeLibrary.TryGetExport(library, name, out nint address) ? address
                : throw new DistributedException($"{LibraryName} has no '{name}': it is not Open MPI 4 (the library this build binds).");
        return new Api
        {
            Library = library,
            Initialized = (delegate* unmanaged<int*, int>)Export("MPI_Initialized"),
            Finalized = (delegate* unmanaged<int*, int>)Export("MPI_Finalized"),
            InitThread = (delegate* unmanaged<int*, byte***, int, int*, int>)Export("MPI_Init_thread"),
            FinalizeMpi = (delegate* unmanaged<int>)Export("MPI_Finalize"),
            CommRank = (delegate* unmanaged<nint, int*, int>)Export("MPI_Comm_rank"),
            CommSize = (delegate* unmanaged<nint, int*, int>)Export("MPI_Comm_size"),
            Iallreduce = (delegate* unmanaged<nint, nint, int, nint, nint, nint, nint*, int>)Export("MPI_Iallreduce"),
            Ibcast = (delegate* unmanaged<nint, int, nint, int, nint, nint*, int>)Export("MPI_Ibcast"),
            Ibarrier = (delegate* unmanaged<nint, nint*, int>)Export("MPI_Ibarrier"),
            Test = (delegate* unmanaged<nint*, int*, nint, int>)Export("MPI_Test"),
            Abort = (delegate* unmanaged<nint, int, int>)Export("MPI_Abort"),
            GetProcessorName = (delegate* unmanaged<byte*, int*, int>)Export("MPI_Get_processor_name"),
            GetLibraryVersion = (delegate* unmanaged<byte*, int*, int>)Export("MPI_Get_library_version"),
            // The predefined handles are link-time objects in Open MPI: their addresses are the handles.
            CommWorld = Export("ompi_mpi_comm_world"),
            Float = Export("ompi_mpi_float"),
            Double = Export("ompi_mpi_double"),
            LongLong = Export("ompi_mpi_long_long_int"),
            Int = Export("ompi_mpi_int"),
            Byte = Export("ompi_mpi_byte"),
            OpSum = Export("ompi_mpi_op_sum"),
            OpMin = Export("ompi_mpi_op_min"),
            OpMax = Export("ompi_mpi_op_max"),
        };
    }

    /// <summary>Throws a <see cref="DistributedException"/> for a return code other than MPI_SUCCESS (0).</summary>
    public static void Check(int code, string call)
    {
        if (code != 0)
            throw new DistributedException($"{call} failed with MPI error {code}.");
    }

    /// <summary>libc's setenv: .NET's Environment.SetEnvironmentVariable does not reach the C environment that Open MPI reads.</summary>
    [DllImport("libc", EntryPoint = "setenv")]
    public static extern int SetEnv(string name, string value, int overwrite);
}

/// <summary>A distributed run that cannot go on: MPI missing, a rank that stopped answering, ranks that disagree.</summary>
public class DistributedException(string message, Exception? inner = null) : Exception(message, inner);
