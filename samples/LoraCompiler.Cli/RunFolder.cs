using System.Globalization;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Cli;

/// <summary>
/// The checks a command makes on its output folder before it does any work: the folder is a folder
/// and writable, a run's folder is not silently replaced, and what killed writes left is removed.
/// </summary>
public static class OutputFolder
{
    /// <summary>
    /// Checks that <paramref name="dir"/> is a folder a file can be written in, or can be created: a
    /// probe file, created and deleted at once in it or in the nearest folder above it that exists
    /// (so permissions, a read-only mount and root are all judged as the write will be); nothing is
    /// left behind. Removes the temporary files of writes that were killed before their rename. A
    /// problem is a <see cref="UsageException"/> naming <paramref name="option"/>.
    /// </summary>
    public static void Prepare(string dir, string option)
    {
        if (File.Exists(dir))
            throw new UsageException($"{option}: {dir} is a file, not a folder.");
        string existing = Path.GetFullPath(dir);
        while (!Directory.Exists(existing))
        {
            if (File.Exists(existing))
                throw new UsageException($"{option}: {dir} cannot be created: {existing} is a file.");
            existing = Path.GetDirectoryName(existing) ?? throw new UsageException($"{option}: {dir} has no folder above it that exists.");
        }
        try
        {
            using (new FileStream(Path.Combine(existing, $".lora-write-test-{Guid.NewGuid():N}"), FileMode.CreateNew, FileAccess.Write,
                       FileShare.None, 1, FileOptions.DeleteOnClose)) { }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UsageException($"{option}: {dir} is not a folder this process can write to ({e.Message}).");
        }
        foreach (var file in AtomicFile.RemoveTemporaries(dir))
            Console.WriteLine($"Removed {file}, left by a write that was killed.");
    }

    /// <summary>The files a training run writes in its folder (checkpoints are folders of their own).</summary>
    private static readonly string[] RunFiles = [LoraAdapter.WeightsFileName, LoraAdapter.ConfigFileName, TrainingRun.MetricsFile, "loss.svg"];

    /// <summary>
    /// A new run into <paramref name="dir"/>: refused when it already holds a run (its adapter, a
    /// checkpoint or metrics.csv) unless <paramref name="overwrite"/>, which deletes that run's files first.
    /// </summary>
    public static void ClaimForNewRun(string dir, bool overwrite)
    {
        string checkpoint = Path.Combine(dir, TrainingRun.CheckpointFolder);
        var found = RunFiles.Select(f => Path.Combine(dir, f)).Where(File.Exists)
            .Concat(new[] { checkpoint, checkpoint + ".old", checkpoint + ".tmp" }.Where(Directory.Exists)).ToList();
        if (found.Count == 0)
            return;
        if (!overwrite)
        {
            bool finished = File.Exists(Path.Combine(dir, LoraAdapter.WeightsFileName));
            var info = TryReadCheckpoint(dir);
            string what = finished ? $"a finished run ({LoraAdapter.WeightsFileName})"
                : info is null ? $"a run's files ({string.Join(", ", found.Select(Path.GetFileName))})"
                : $"an unfinished run (its checkpoint is at step {info.Step} of {info.Steps})";
            throw new UsageException($"--out: {dir} holds {what}; " +
                                     $"continue it with --resume {dir}, replace it with --overwrite, or pick another --out.");
        }
        foreach (var path in found)
        {
            if (Directory.Exists(path))
                Directory.Delete(path, recursive: true);
            else
                File.Delete(path);
        }
        Console.WriteLine($"--overwrite: removed the previous run's {string.Join(", ", found.Select(Path.GetFileName))} from {dir}.");
    }

    private static CheckpointInfo? TryReadCheckpoint(string dir)
    {
        try
        {
            return TrainingRun.ReadCheckpoint(dir);
        }
        catch (TrainingRunException)
        {
            return null;
        }
    }

    /// <summary>Whether two paths name the same file or folder (after making them absolute).</summary>
    public static bool SamePath(string a, string b) =>
        string.Equals(Path.TrimEndingDirectorySeparator(Path.GetFullPath(a)), Path.TrimEndingDirectorySeparator(Path.GetFullPath(b)), StringComparison.Ordinal);
}

/// <summary>
/// The options of <c>lora train</c> that decide a run, stored in its checkpoint (<see cref="TrainingRun.Settings"/>)
/// so that <c>--resume DIR</c> alone continues it, and checked when one is given again: each one
/// typed at resume must agree with the stored value, or the resume is refused naming it.
/// </summary>
public static class RunSettings
{
    private enum Kind { Text, Integer, Number, Path }

    /// <summary>Every option that decides a run, and how its values compare.</summary>
    private static readonly Dictionary<string, Kind> Options = new(StringComparer.Ordinal)
    {
        ["model"] = Kind.Text, ["weights"] = Kind.Path, ["data"] = Kind.Path, ["tokenizer"] = Kind.Path,
        ["seq"] = Kind.Integer, ["steps"] = Kind.Integer, ["epochs"] = Kind.Integer, ["lr"] = Kind.Number,
        ["schedule"] = Kind.Text, ["warmup"] = Kind.Integer, ["grad-accum"] = Kind.Integer, ["seed"] = Kind.Integer,
        ["optimizer"] = Kind.Text, ["weight-decay"] = Kind.Number, ["method"] = Kind.Text, ["lcsb-groups"] = Kind.Integer,
        ["mezo-eps"] = Kind.Number, ["save-every"] = Kind.Integer, ["base-model"] = Kind.Text, ["adapter"] = Kind.Path,
        ["val-data"] = Kind.Path, ["val-every"] = Kind.Integer, ["val-batches"] = Kind.Integer,
        ["federated-rounds"] = Kind.Integer, ["local-steps"] = Kind.Integer,
    };

    /// <summary>Stored beside the options: the data file's size and SHA-256, so that a resume trains on the same data.</summary>
    public const string DataBytes = "data-bytes", DataSha256 = "data-sha256";

    /// <summary>The settings of a run: its options' values in canonical form (absolute paths, round-trip numbers), and its data's identity.</summary>
    public static Dictionary<string, string> Of(IReadOnlyDictionary<string, string?> values, string dataPath)
    {
        var settings = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var (key, value) in values)
            if (value is not null)
                settings[key] = Canonical(key, value);
        var (bytes, hash) = Identity(dataPath);
        settings[DataBytes] = bytes.ToString(CultureInfo.InvariantCulture);
        settings[DataSha256] = hash;
        return settings;
    }

    /// <summary>The stored options, as the values of options not given again (the data's identity is not an option).</summary>
    public static Dictionary<string, string> Fallback(IReadOnlyDictionary<string, string> stored, string resumeDir)
    {
        var fallback = stored.Where(p => Options.ContainsKey(p.Key)).ToDictionary(p => p.Key, p => p.Value, StringComparer.Ordinal);
        fallback["out"] = resumeDir;
        return fallback;
    }

    /// <summary>
    /// Refuses a resume whose typed options contradict the checkpoint's, naming the first one: another
    /// value, or an option the run did not have. A path contradicts when the stored one still exists
    /// and is another file (a moved folder is fine); the data must be the same bytes wherever it is.
    /// </summary>
    public static void CheckResume(CheckpointInfo checkpoint, Args args, string dataPath)
    {
        if (checkpoint.Settings is not { } stored)
            return; // a checkpoint from before options were stored: TrainingRun.Resume checks steps, method and optimizer
        string where = Path.Combine(checkpoint.Directory, "state.json");
        foreach (var (key, kind) in Options)
        {
            if (!args.Given(key))
                continue;
            string typed = Canonical(key, args.Optional(key)!);
            if (!stored.TryGetValue(key, out var value))
                throw new UsageException($"--{key}: the run being resumed had no --{key} ({where}); leave it out to continue that run.");
            if (typed == value)
                continue;
            if (kind == Kind.Path && (key == "data" || !File.Exists(value) && !Directory.Exists(value)))
                continue; // the data is compared by content below; another path was moved
            throw new UsageException($"--{key}: {args.Optional(key)} contradicts the run being resumed, which has {value} ({where}); " +
                                     $"leave --{key} out to continue that run, or start a new one.");
        }
        if (stored.TryGetValue(DataSha256, out var hash) && stored.TryGetValue(DataBytes, out var bytes))
        {
            var (nowBytes, nowHash) = Identity(dataPath);
            if (nowHash != hash)
                throw new UsageException($"--data: {dataPath} is not the data the run being resumed trained on " +
                                         $"({nowBytes} bytes, SHA-256 {nowHash[..12]}…; the run's: {bytes} bytes, {hash[..Math.Min(12, hash.Length)]}…, {where}).");
        }
    }

    private static string Canonical(string key, string value) =>
        Options.GetValueOrDefault(key) switch
        {
            Kind.Path => Path.TrimEndingDirectorySeparator(Path.GetFullPath(value)),
            Kind.Integer when long.TryParse(value, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long n) => n.ToString(CultureInfo.InvariantCulture),
            Kind.Number when float.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out float x) => x.ToString("R", CultureInfo.InvariantCulture),
            _ => value,
        };

    private static (long Bytes, string Sha256) Identity(string path)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
        return (stream.Length, Convert.ToHexStringLower(SHA256.HashData(stream)));
    }
}

/// <summary>
/// SIGINT (Ctrl-C) and SIGTERM during a run: the first asks the run to stop after its current step
/// (it then writes a checkpoint, and the command exits with 130 or 143, 128 + the signal's number, as
/// a shell reports a process the signal ended); a second one exits at once with that code.
/// </summary>
public sealed class StopSignals : IDisposable
{
    private readonly CancellationTokenSource _stop = new();
    private readonly List<PosixSignalRegistration> _registrations = [];

    public StopSignals()
    {
        if (OperatingSystem.IsWindows())
            return;
        foreach (var signal in new[] { PosixSignal.SIGINT, PosixSignal.SIGTERM })
            _registrations.Add(PosixSignalRegistration.Create(signal, OnSignal));
    }

    public CancellationToken Token => _stop.Token;

    /// <summary>The exit code for the first signal received: 130 for SIGINT, 143 for SIGTERM; 0 before any.</summary>
    public int ExitCode { get; private set; }

    public string SignalName => ExitCode == 130 ? "SIGINT" : "SIGTERM";

    private void OnSignal(PosixSignalContext context)
    {
        context.Cancel = true; // the process goes on: the run stops at the end of its step
        int code = context.Signal == PosixSignal.SIGINT ? 130 : 143;
        if (ExitCode != 0)
        {
            Console.Error.WriteLine($"error: {(code == 130 ? "SIGINT" : "SIGTERM")} again: stopping now; the last checkpoint written is kept.");
            Environment.Exit(code);
        }
        ExitCode = code;
        Console.Error.WriteLine($"{SignalName}: stopping after this step and writing a checkpoint (a second signal stops at once).");
        _stop.Cancel();
    }

    public void Dispose()
    {
        foreach (var registration in _registrations)
            registration.Dispose();
        _stop.Dispose();
    }
}
