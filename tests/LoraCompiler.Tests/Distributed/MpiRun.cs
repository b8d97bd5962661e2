using System.Diagnostics;
using System.Text;
using LoraCompiler.Runtime.Distributed;

namespace LoraCompiler.Tests.Distributed;

/// <summary>
/// <c>mpirun -np N --oversubscribe dotnet lora.dll ARGS</c> from the tests: Open MPI's launcher with
/// the command line copied beside the tests. tests/run.sh installs openmpi-bin when it is missing.
/// </summary>
internal static class MpiRun
{
    private static readonly Lazy<string?> s_mpirun = new(() =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Select(d => Path.Combine(d, "mpirun")).FirstOrDefault(File.Exists));

    /// <summary>Why MPI tests cannot run here, or null when mpirun and libmpi.so.40 are both present.</summary>
    public static string? Missing =>
        s_mpirun.Value is null ? "mpirun is not on PATH (Debian: apt-get install openmpi-bin; tests/run.sh does it)"
        : !OpenMpiAvailable(out string reason) ? reason : null;

    private static bool OpenMpiAvailable(out string reason)
    {
        bool loads = System.Runtime.InteropServices.NativeLibrary.TryLoad("libmpi.so.40", out _);
        reason = loads ? "" : "libmpi.so.40 does not load (Debian: apt-get install openmpi-bin)";
        return loads;
    }

    public static bool InCi => string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    /// <summary>Runs the job to its end (at most <paramref name="timeout"/>, 5 minutes by default): exit code, stdout and stderr together.</summary>
    public static (int Code, string Output) Run(int ranks, string[] args, TimeSpan? timeout = null)
    {
        var output = new StringBuilder();
        using var process = Start(ranks, args, output, output);
        if (!process.WaitForExit(timeout ?? TimeSpan.FromMinutes(5)))
        {
            process.Kill(entireProcessTree: true);
            Assert.Fail($"mpirun -np {ranks} {string.Join(' ', args)} did not end in time: {output}");
        }
        process.WaitForExit();
        lock (output)
            return (process.ExitCode, output.ToString());
    }

    public static Process Start(int ranks, string[] args, StringBuilder output, StringBuilder error)
    {
        if (Missing is { } missing)
            Assert.Fail($"Open MPI is missing: {missing}" + (InCi ? " (CI=true: the MPI tests must run)" : ""));
        var start = new ProcessStartInfo(s_mpirun.Value!) { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
        foreach (var a in new[] { "-np", $"{ranks}", "--oversubscribe", "--mca", "btl_vader_single_copy_mechanism", "none", "dotnet",
                     Path.Combine(AppContext.BaseDirectory, "lora.dll") }.Concat(args))
            start.ArgumentList.Add(a);
        // Open MPI refuses root unless told twice; containers and CI machines often run as root.
        start.Environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
        start.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
        // This test process may itself be a rank of another job; the ranks must not think they are.
        foreach (var name in start.Environment.Keys.Where(k => k.StartsWith("OMPI_COMM_WORLD", StringComparison.Ordinal) || k.StartsWith("PMIX_", StringComparison.Ordinal)).ToList())
            start.Environment.Remove(name);
        var process = Process.Start(start)!;
        process.StandardInput.Close();
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (error) error.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }

    /// <summary>The process id of one rank of a running job: a child of mpirun with that OMPI_COMM_WORLD_RANK.</summary>
    public static int RankProcess(Process mpirun, int rank)
    {
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (DateTime.UtcNow < deadline)
        {
            foreach (var dir in Directory.EnumerateDirectories("/proc"))
            {
                if (!int.TryParse(Path.GetFileName(dir), out int pid))
                    continue;
                try
                {
                    // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so read after the last ')'.
                    string stat = File.ReadAllText(Path.Combine(dir, "stat"));
                    int ppid = int.Parse(stat[(stat.LastIndexOf(')') + 2)..].Split(' ')[1]);
                    if (ppid != mpirun.Id)
                        continue;
                    string environ = File.ReadAllText(Path.Combine(dir, "environ"));
                    if (environ.Split('\0').Contains($"OMPI_COMM_WORLD_RANK={rank}"))
                        return pid;
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
                {
                    // gone meanwhile, or not ours
                }
            }
            Thread.Sleep(50);
        }
        throw new InvalidOperationException($"no rank {rank} under mpirun ({mpirun.Id})");
    }
}

/// <summary>A fact that needs Open MPI: skipped with the reason when it is missing, unless CI=true, where it runs and fails.</summary>
public sealed class MpiFactAttribute : FactAttribute
{
    public MpiFactAttribute()
    {
        if (MpiRun.Missing is { } missing && !MpiRun.InCi)
            Skip = $"Open MPI is missing: {missing}; set CI=true to make this a failure.";
    }
}

/// <summary>As <see cref="MpiFactAttribute"/>, for theories.</summary>
public sealed class MpiTheoryAttribute : TheoryAttribute
{
    public MpiTheoryAttribute()
    {
        if (MpiRun.Missing is { } missing && !MpiRun.InCi)
            Skip = $"Open MPI is missing: {missing}; set CI=true to make this a failure.";
    }
}
