using System.Diagnostics;
using System.Text.Json;
using LoraCompiler.CommandLine;

namespace LoraCompiler.Benchmarks;

/// <summary>A program to start: a file and the arguments that come before the command's own.</summary>
public sealed record ChildCommand(string FileName, IReadOnlyList<string> Prefix)
{
    /// <summary>
    /// Runs <paramref name="assemblyPath"/> (a .dll) with the dotnet host this process runs on, or
    /// directly when this process is an apphost of that assembly.
    /// </summary>
    public static ChildCommand ForAssembly(string assemblyPath) => new(DotnetHost(), [assemblyPath]);

    /// <summary>The dotnet executable: the one running this process, DOTNET_HOST_PATH, or 'dotnet' on the PATH.</summary>
    public static string DotnetHost()
    {
        if (Environment.ProcessPath is { } self && Path.GetFileNameWithoutExtension(self) == "dotnet")
            return self;
        if (Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host))
            return host;
        return "dotnet";
    }

    public ProcessStartInfo StartInfo(IEnumerable<string> arguments, bool redirect)
    {
        var info = new ProcessStartInfo(FileName) { UseShellExecute = false, RedirectStandardOutput = redirect };
        foreach (var a in Prefix.Concat(arguments))
            info.ArgumentList.Add(a);
        return info;
    }

    public override string ToString() => string.Join(" ", new[] { FileName }.Concat(Prefix));
}

/// <summary>Runs a child process of the benchmark.</summary>
public static class ChildProcess
{
    /// <summary>Runs the command with its stdout and stderr shown, and returns its exit code.</summary>
    public static int Run(ChildCommand command, IEnumerable<string> arguments)
    {
        using var process = Process.Start(command.StartInfo(arguments, redirect: false))
            ?? throw new IOException($"Could not start {command}.");
        process.WaitForExit();
        return process.ExitCode;
    }

    /// <summary>
    /// Runs a <c>bench memory</c> child, echoes its output (not the JSON line) and returns the result of
    /// its JSON line; fails with its exit code when it fails.
    /// </summary>
    public static MemoryBenchResult RunForResult(ChildCommand command, IEnumerable<string> arguments, TextWriter? echo = null)
    {
        var args = arguments.ToList();
        using var process = Process.Start(command.StartInfo(args, redirect: true))
            ?? throw new IOException($"Could not start {command}.");
        MemoryBenchResult? result = null;
        string? line;
        while ((line = process.StandardOutput.ReadLine()) is not null)
        {
            if (line.StartsWith(MemoryBench.JsonPrefix, StringComparison.Ordinal))
                result = JsonSerializer.Deserialize<MemoryBenchResult>(line[MemoryBench.JsonPrefix.Length..]);
            else
                echo?.WriteLine(line);
        }
        process.WaitForExit();
        if (process.ExitCode != 0 || result is null)
            throw new IOException($"'{command} {string.Join(" ", args)}' " +
                                  (process.ExitCode != 0 ? $"failed with exit code {process.ExitCode}." : "printed no result line."));
        return result;
    }
}

/// <summary>Where a built program of this repository is: beside the running one, or under its project's bin folder.</summary>
public static class ProgramLocator
{
    /// <summary>
    /// <paramref name="dll"/> (like <c>lora-bench.dll</c>) beside <paramref name="here"/>, or the newest build under
    /// <paramref name="projectFolder"/>'s bin folder (relative to <paramref name="root"/>, this build's configuration first).
    /// </summary>
    public static string? Find(string dll, string projectFolder, string here, string? root)
    {
        string beside = Path.Combine(here, dll);
        if (File.Exists(beside))
            return beside;
        if (root is null)
            return null;
        string bin = Path.Combine(root, projectFolder, "bin");
        if (!Directory.Exists(bin))
            return null;
        string configuration = here.Contains($"{Path.DirectorySeparatorChar}Debug{Path.DirectorySeparatorChar}") ? "Debug" : "Release";
        return Directory.EnumerateFiles(bin, dll, SearchOption.AllDirectories)
            .OrderByDescending(p => p.Contains($"{Path.DirectorySeparatorChar}{configuration}{Path.DirectorySeparatorChar}"))
            .ThenByDescending(File.GetLastWriteTimeUtc)
            .FirstOrDefault();
    }

    /// <summary>The folder holding LoraCompiler.sln, from <paramref name="start"/> upwards.</summary>
    public static string? RepositoryRoot(string start)
    {
        for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "LoraCompiler.sln")))
                return dir.FullName;
        return null;
    }
}
