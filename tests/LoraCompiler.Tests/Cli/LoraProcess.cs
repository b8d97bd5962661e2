using System.Diagnostics;
using System.Runtime.InteropServices;

namespace LoraCompiler.Tests.Cli;

/// <summary>The <c>lora</c> command line in a process of its own (lora.dll is copied beside the tests): its exit code, stdout and stderr.</summary>
internal static partial class LoraProcess
{
    public const int SIGINT = 2, SIGTERM = 15;

    /// <summary>Runs <c>lora ARGS</c> to its end.</summary>
    public static (int Code, string Output, string Error) Run(params string[] args)
    {
        using var process = Process.Start(StartInfo(args))!;
        var error = process.StandardError.ReadToEndAsync();
        string output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, output, error.Result);
    }

    /// <summary>Starts <c>lora ARGS</c>; its output is collected into <paramref name="output"/> and <paramref name="error"/>.</summary>
    public static Process Start(string[] args, System.Text.StringBuilder output, System.Text.StringBuilder error)
    {
        var process = Process.Start(StartInfo(args))!;
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (error) error.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }

    /// <summary>Sends a POSIX signal to a process.</summary>
    public static void Signal(Process process, int signal)
    {
        if (Kill(process.Id, signal) != 0)
            throw new InvalidOperationException($"kill({process.Id}, {signal}) failed: errno {Marshal.GetLastPInvokeError()}");
    }

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);

    /// <summary>Whether this process may write where permissions say it may not (root): a read-only folder then needs another test.</summary>
    public static bool IgnoresPermissions(string dir)
    {
        try
        {
            File.WriteAllText(Path.Combine(dir, "probe"), "");
            File.Delete(Path.Combine(dir, "probe"));
            return true;
        }
        catch (UnauthorizedAccessException)
        {
            return false;
        }
    }

    private static ProcessStartInfo StartInfo(string[] args)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "lora.dll"));
        foreach (var a in args)
            start.ArgumentList.Add(a);
        return start;
    }
}
