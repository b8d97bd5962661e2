using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using LoraCompiler.Runtime.Distributed;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Cli;

/// <summary>
/// <c>lora train</c> on several processes and machines (issue 13): under <c>mpirun</c> every rank runs
/// the same command; this class is what <see cref="Commands.Train"/> asks at the few points where a
/// rank differs (rank 0 alone claims the output folder, prints and writes the run; the others train)
/// and where the ranks must agree.
/// </summary>
/// <remarks>
/// Failures never leave a rank waiting. Before training starts the ranks pass agreement points
/// (<see cref="MpiWorld.Agree"/>): a rank that fails (a usage mistake, a missing file) makes every
/// rank stop there, the lowest failing rank prints its one error line and all exit with its code.
/// Once training runs, a failure of one rank alone prints its line and ends the job (MPI_Abort);
/// a divergence, found on the summed gradients, is the same on every rank and only rank 0 reports
/// it. A rank that stops answering (killed, cut off) is found by the deadline every wait has
/// (<c>--mpi-timeout</c>), and <c>mpirun</c> itself ends the job when a rank dies.
/// </remarks>
public static class Cluster
{
    public const string Usage = """
            [--federated-rounds R --local-steps S] [--mpi-timeout SECONDS] [--distributed]
                                                  under mpirun -np N [--host a,b]: N ranks train one
                                                  adapter over Open MPI. Data parallel: a step takes
                                                  --grad-accum G sequences on each rank, N·G in all, the
                                                  result of one process with --grad-accum N·G (the LoRA
                                                  gradients are summed layer by layer as the backward
                                                  goes); rank 0 alone writes the run; --resume needs the
                                                  same N. --federated-rounds R --local-steps S: federated
                                                  averaging instead: each rank trains S steps on its own
                                                  --data ('{rank}' in the path is the rank's number), then
                                                  the adapters are averaged weighted by tokens; R rounds
                                                  (R·S steps). --mpi-timeout: seconds a rank waits for
                                                  the others before it gives up (600). --distributed:
                                                  refuse to run unless started by mpirun
    """;

    /// <summary>Set once MPI is initialized: this process is one rank of a distributed run.</summary>
    public static MpiWorld? World { get; private set; }

    /// <summary>Whether this process writes the run (alone, or rank 0).</summary>
    public static bool Writes => World is null || World.Rank == 0;

    private static MpiGradientReducer? s_reducer;
    private static bool s_training;
    private static string? s_scratch;

    private const double DefaultTimeoutSeconds = 600;

    /// <summary>
    /// Whether <c>train</c> runs distributed: started by mpirun, or <c>--distributed</c> (taken out of
    /// <paramref name="args"/>), which makes it an error not to be.
    /// </summary>
    public static bool Requested(ref string[] args)
    {
        bool flag = args.Contains("--distributed");
        args = args.Where(a => a != "--distributed").ToArray();
        return flag || MpiWorld.LaunchedByMpirun;
    }

    /// <summary><c>lora train ARGS</c> as one rank: MPI initialized, the command run, the failures of any rank handled, MPI finalized.</summary>
    public static int Train(string[] args, bool verbose)
    {
        MpiWorld world;
        try
        {
            if (!MpiWorld.LaunchedByMpirun)
                throw new UsageException("--distributed: this process was not started by mpirun (OMPI_COMM_WORLD_SIZE is not set); " +
                                         "launch it as: mpirun -np N lora train ...");
            world = MpiWorld.Initialize(TimeSpan.FromSeconds(DefaultTimeoutSeconds));
        }
        catch (Exception e)
        {
            return Failure.Report(e, verbose, Console.Error);
        }
        World = world;
        var output = Console.Out;
        if (world.Rank != 0)
            Console.SetOut(TextWriter.Null); // one rank speaks for the run
        try
        {
            int code = Commands.Train(new Args(args));
            Report(output);
            world.Dispose();
            return code;
        }
        catch (Exception e)
        {
            int code = Failed(world, e, verbose);
            world.Dispose();
            return code;
        }
        finally
        {
            if (s_scratch is not null && Directory.Exists(s_scratch))
                Directory.Delete(s_scratch, recursive: true);
        }
    }

    /// <summary>Another rank stopped at an agreement point and has reported why.</summary>
    private sealed class PeerFailedException(int rank, int code) : Exception($"rank {rank} stopped")
    {
        public int Code { get; } = code;
    }

    private static int Failed(MpiWorld world, Exception e, bool verbose)
    {
        if (e is PeerFailedException peer)
            return peer.Code;
        var line = new StringWriter();
        int code = Failure.Report(e, verbose, line);
        string error = world.Rank == 0 ? line.ToString() : Prefixed(line.ToString(), world);
        if (!s_training)
        {
            // Setup: the others are at (or on their way to) an agreement point; the lowest failing rank speaks.
            var agreed = world.Agree(error, code);
            if (agreed is { } a && a.Rank == world.Rank)
                Console.Error.Write(error);
            return agreed?.Code ?? code;
        }
        if (e is TrainingRunException { InnerException: TrainingDivergedException } or TrainingDivergedException && s_reducer is not null
            && !Federated)
        {
            // Found on the summed gradients or loss: every rank stops at the same step, rank 0 says so.
            if (world.Rank == 0)
                Console.Error.Write(error);
            return code;
        }
        // This rank alone: the others wait in a collective for it. Say why, then end the job.
        Console.Error.Write(error);
        Console.Error.Flush();
        world.Abort(code);
        return code;
    }

    private static bool Federated { get; set; }

    /// <summary>"error: rank 1 (host): ..." for a rank other than 0.</summary>
    private static string Prefixed(string line, MpiWorld world) =>
        line.StartsWith("error: ", StringComparison.Ordinal) ? $"error: rank {world.Rank} ({world.Host}): {line["error: ".Length..]}" : line;

    /// <summary>Raises the agreement on every rank: returns when all are ready, throws when one is not (it reports).</summary>
    private static void AgreeReady(MpiWorld world)
    {
        if (world.Agree(null, 0) is { } failed)
            throw new PeerFailedException(failed.Rank, failed.Code);
    }

    // ----- what Commands.Train asks -----

    /// <summary>
    /// <c>--federated-rounds R --local-steps S</c> and <c>--mpi-timeout</c>, applied to the options: the
    /// number of processes, and for a federated run its steps (R·S) and round length.
    /// </summary>
    public static TrainingOptions Configure(Args args, TrainingOptions options, CheckpointInfo? checkpoint, out int? rounds)
    {
        rounds = args.IntOrNull("federated-rounds", min: 1);
        int? localSteps = args.IntOrNull("local-steps", min: 1);
        float? timeout = args.Optional("mpi-timeout") is null ? null : args.Float("mpi-timeout", 0, min: 0, exclusiveMin: true);
        int processes = World?.Size ?? 1;
        if (checkpoint?.Options is { } stored && stored.Processes != processes)
            throw new UsageException($"--resume: the run was trained on {stored.Processes} process{(stored.Processes == 1 ? "" : "es")}, not {processes}: continue it with " +
                                     (stored.Processes == 1 ? "lora train --resume DIR, without mpirun." : $"mpirun -np {stored.Processes} lora train --resume DIR."));
        if (options.Method == "mezo" && World is not null)
            throw new UsageException("--method mezo: MeZO runs in one process; train across processes with --method backprop.");
        if (World is null)
        {
            string? given = rounds is not null ? "--federated-rounds" : localSteps is not null ? "--local-steps" : timeout is not null ? "--mpi-timeout" : null;
            if (given is not null)
                throw new UsageException($"{given}: applies to a run of several processes; launch it with mpirun -np N lora train ...");
            return options;
        }
        if (timeout is float seconds)
            World.Timeout = TimeSpan.FromSeconds(seconds);
        if ((rounds is null) != (localSteps is null))
            throw new UsageException(rounds is null ? "--local-steps: goes with --federated-rounds R." : "--federated-rounds: goes with --local-steps S.");
        options = options with { Processes = World.Size };
        if (rounds is int r && localSteps is int s)
        {
            if (args.Given("steps") && options.Steps != (long)r * s)
                throw new UsageException($"--steps: a federated run takes --federated-rounds × --local-steps = {(long)r * s} steps, not {options.Steps}; leave --steps out.");
            if ((long)r * s > int.MaxValue)
                throw new UsageException($"--federated-rounds: {r} rounds of {s} steps are too many steps.");
            if (options.SaveEvery % s != 0)
                throw new UsageException($"--save-every: a federated run saves between rounds: give a multiple of --local-steps {s}.");
            options = options with { Steps = r * s, FederatedLocalSteps = s };
            Federated = true;
        }
        return options;
    }

    /// <summary>The file this rank reads for <c>--data</c>: a federated run's '{rank}' is the rank; a data-parallel run's data is one file for all.</summary>
    public static string DataFile(string data)
    {
        if (!data.Contains("{rank}", StringComparison.Ordinal) || World is null)
            return data;
        return data.Replace("{rank}", World.Rank.ToString(CultureInfo.InvariantCulture), StringComparison.Ordinal);
    }

    /// <summary>This rank's part of the stream: its share of every data-parallel step; a federated rank's own data whole.</summary>
    public static ITrainingData Share(ITrainingData data, TrainingOptions options, string dataOption)
    {
        if (World is null)
            return data;
        if (options.FederatedLocalSteps > 0)
            return data;
        if (dataOption.Contains("{rank}", StringComparison.Ordinal))
            throw new UsageException("--data: '{rank}' gives each rank a file of its own, for --federated-rounds; data-parallel ranks share one stream.");
        return new RankShare(data, World.Rank, World.Size, options.GradientAccumulation);
    }

    /// <summary>The reducer a distributed run sums its gradients with (null for one process).</summary>
    public static IGradientReducer? Reducer(TrainerBase trainer) =>
        World is null ? null : s_reducer = new MpiGradientReducer(World, trainer.Model.Layers);

    /// <summary>
    /// <c>--resume DIR</c> on every rank: rank 0's checkpoint, handed to the others (which may run on
    /// machines without it) and unpacked into a folder of their own; returns the folder this rank resumes from.
    /// </summary>
    public static string? ShareCheckpoint(string? resumeDir)
    {
        if (World is not { } world || resumeDir is null)
            return resumeDir;
        byte[]? packed = world.Rank == 0 ? Pack(resumeDir) : null; // a failure here reaches the others at the agreement
        AgreeReady(world);
        packed = world.Broadcast(packed, 0, "receiving rank 0's checkpoint");
        if (world.Rank == 0)
            return resumeDir;
        s_scratch = Directory.CreateTempSubdirectory($"lora-rank{world.Rank}-").FullName;
        Unpack(packed, s_scratch);
        return s_scratch;
    }

    /// <summary>The files of the checkpoint in <paramref name="runDir"/>, as one byte string (empty when it holds none).</summary>
    private static byte[] Pack(string runDir)
    {
        var info = TrainingRun.ReadCheckpoint(runDir);
        var stream = new MemoryStream();
        if (info is null)
            return [];
        using (var writer = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true))
        {
            var files = Directory.EnumerateFiles(info.Directory, "*", SearchOption.AllDirectories).Order(StringComparer.Ordinal).ToList();
            writer.Write(files.Count);
            foreach (var file in files)
            {
                writer.Write(Path.Combine(TrainingRun.CheckpointFolder, Path.GetRelativePath(info.Directory, file)));
                var bytes = File.ReadAllBytes(file);
                writer.Write(bytes.Length);
                writer.Write(bytes);
            }
        }
        return stream.ToArray();
    }

    private static void Unpack(byte[] packed, string dir)
    {
        if (packed.Length == 0)
            return;
        using var reader = new BinaryReader(new MemoryStream(packed), Encoding.UTF8);
        int count = reader.ReadInt32();
        for (int i = 0; i < count; i++)
        {
            string path = Path.GetFullPath(Path.Combine(dir, reader.ReadString()));
            if (!path.StartsWith(Path.GetFullPath(dir) + Path.DirectorySeparatorChar, StringComparison.Ordinal))
                throw new DistributedException($"rank 0's checkpoint names a file outside its folder: {path}.");
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            File.WriteAllBytes(path, reader.ReadBytes(reader.ReadInt32()));
        }
    }

    /// <summary>
    /// The last point before training: every rank ready, and every rank's run the same as rank 0's
    /// (its options, its data, its starting adapter and step; a federated rank's data is its own).
    /// Prints how the run is spread.
    /// </summary>
    public static void Ready(TrainingRun run, TrainerBase trainer, ITrainingData data, TrainingOptions options)
    {
        if (World is not { } world)
            return;
        AgreeReady(world);
        var parts = new (string What, byte[] Hash)[]
        {
            ("options", Hash(JsonSerializer.Serialize(options) + "\n" + string.Join("\n",
                (run.Settings ?? new Dictionary<string, string>()).Where(p => !IsPerMachine(p.Key, options)).OrderBy(p => p.Key, StringComparer.Ordinal)
                .Select(p => $"{p.Key}={p.Value}")))),
            ("data position", Hash(options.FederatedLocalSteps > 0 ? "" : data.Position)),
            ("starting adapter (--adapter, or the checkpoint resumed)", AdapterHash(trainer)),
            ("step", Hash(run.StartStep.ToString(CultureInfo.InvariantCulture))),
        };
        byte[] mine = parts.SelectMany(p => p.Hash).ToArray();
        byte[] rank0 = world.Broadcast(world.Rank == 0 ? mine : null, 0, "comparing the ranks' runs");
        string? problem = null;
        for (int i = 0; i < parts.Length && problem is null; i++)
            if (!rank0.AsSpan(i * 32, 32).SequenceEqual(parts[i].Hash))
                problem = $"error: rank {world.Rank} ({world.Host}): its {parts[i].What} differ from rank 0's: every rank runs the same command " +
                          "on the same files (a data-parallel run's data, the weights and --adapter at the same paths on every machine).\n";
        if (world.Agree(problem, 1) is { } failed)
        {
            if (failed.Rank == world.Rank)
                Console.Error.Write(problem);
            throw new PeerFailedException(failed.Rank, failed.Code);
        }
        s_training = true;
        Console.WriteLine(options.FederatedLocalSteps > 0
            ? $"Federated averaging over {world.Size} ranks: {options.Steps / options.FederatedLocalSteps} rounds of {options.FederatedLocalSteps} local steps, " +
              "each rank on its own data; the adapters are averaged, weighted by tokens, after every round. Rank 0 writes the run."
            : $"Data parallel over {world.Size} ranks: each step takes {options.GradientAccumulation} sequence(s) on each, " +
              $"{options.GradientAccumulation * world.Size} in all; the LoRA gradients are summed layer by layer. Rank 0 writes the run.");
    }

    /// <summary>Settings that name files (may differ between machines) or a federated rank's own data.</summary>
    private static bool IsPerMachine(string key, TrainingOptions options) =>
        key is "weights" or "tokenizer" or "adapter" or "val-data" or "out" or "data"
        || (options.FederatedLocalSteps > 0 && key is RunSettings.DataBytes or RunSettings.DataSha256);

    private static byte[] AdapterHash(TrainerBase trainer)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var module in trainer.Adapter.Modules)
        {
            hash.AppendData(System.Runtime.InteropServices.MemoryMarshal.AsBytes(module.A.AsSpan()));
            hash.AppendData(System.Runtime.InteropServices.MemoryMarshal.AsBytes(module.B.AsSpan()));
        }
        return hash.GetHashAndReset();
    }

    private static byte[] Hash(string text) => SHA256.HashData(Encoding.UTF8.GetBytes(text));

    /// <summary>After the run: what crossed between the ranks (rank 0 prints; every rank takes part).</summary>
    private static void Report(TextWriter output)
    {
        if (World is not { } world || !s_training)
            return;
        Span<double> wait = [world.WaitSeconds, s_reducer?.GradientWaitSeconds ?? 0];
        double ownWait = wait[1];
        world.Sum(wait, "the closing report");
        if (world.Rank != 0 || s_reducer is null)
            return;
        long steps = Math.Max(1, s_reducer.Steps);
        output.WriteLine(Federated
            ? $"Averaged the adapters over {world.Size} ranks; the ranks waited {wait[0] / world.Size:F2} s each on average for the others."
            : $"All-reduced {s_reducer.BytesReduced / (double)steps / 1e6:F3} MB of LoRA gradients per step ({s_reducer.BytesReduced / 1e6:F1} MB " +
              $"in {s_reducer.LayersReduced} layer sums); waiting for the sums after the backward took {ownWait:F2} s on rank 0, " +
              $"{wait[1] / world.Size:F2} s per rank on average.");
    }
}
