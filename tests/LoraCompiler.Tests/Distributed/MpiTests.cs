using System.Diagnostics;
using System.Text;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Distributed;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Tests.Cli;
using LoraCompiler.Tests.Training;

namespace LoraCompiler.Tests.Distributed;

/// <summary>
/// <c>lora train</c> under <c>mpirun -np 2 --oversubscribe</c>: the two-rank adapter against one
/// process with the same sequences per step (<c>--grad-accum</c>), a rank killed mid-run, a rank that
/// fails before training, resume with the same and another number of ranks, and federated averaging
/// against plain training and against the token-weighted mean of the ranks' own runs.
/// </summary>
/// <remarks>
/// Alone in its collection: each test runs two processes on a machine of two cores, and the
/// single-process references run in this process (<c>Commands.Train</c> prints to the console).
/// </remarks>
[Collection(MpiCollection.Name)]
public sealed class MpiTests : IDisposable
{
    private readonly ModelInfo _model = TrainerCatalog.Find("tiny-qwen2")!;
    private readonly ModelFixture _fixture;
    private readonly string _data;

    public MpiTests()
    {
        _fixture = new ModelFixture(_model, seed: 13, sequence: 8);
        _data = Path.Combine(_fixture.Dir, "data.txt");
        File.WriteAllText(_data, Text(seed: 1, 6000));
    }

    public void Dispose() => _fixture.Dispose();

    private string Dir(string name) => Path.Combine(_fixture.Dir, name);

    /// <summary>Text whose windows differ from one another (so that a rank given the wrong one is seen).</summary>
    private static string Text(int seed, int length)
    {
        var rng = new Random(seed);
        const string letters = "abcdefghijklmnopqrstuvwxyz     .,";
        return new string(Enumerable.Range(0, length).Select(_ => letters[rng.Next(letters.Length)]).ToArray());
    }

    private string[] Train(string outDir, int steps, params string[] extra) =>
    [
        "train", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--data", _data, "--out", outDir,
        "--steps", $"{steps}", "--seq", "32", "--lr", "1e-2", "--seed", "5", .. extra,
    ];

    /// <summary>The command line in this process, as one process runs it.</summary>
    private static void Single(string[] args) => Assert.Equal(0, Commands.Train(new Args(args.Skip(1))));

    [MpiTheory]
    [InlineData(1, 1, "adamw")]
    [InlineData(2, 2, "adamw")] // two sequences per rank, and LCSB: the skipped layers are not sent
    [InlineData(1, 1, "sgd")]
    public void Two_ranks_train_the_adapter_of_one_process_with_twice_the_accumulation(int perRank, int lcsbGroups, string optimizer)
    {
        const int steps = 6;
        string single = Dir("single"), ranks = Dir("ranks");
        string[] common = ["--lcsb-groups", $"{lcsbGroups}", "--optimizer", optimizer, "--save-every", "3"];
        Single(Train(single, steps, [.. common, "--grad-accum", $"{2 * perRank}"]));

        var run = MpiRun.Run(2, Train(ranks, steps, [.. common, "--grad-accum", $"{perRank}"]));
        Assert.True(run.Code == 0, run.Output);
        Assert.Contains("Data parallel over 2 ranks", run.Output);
        Assert.Contains("All-reduced", run.Output);

        // Two ranks of one sequence each add the same two gradients one process adds (in either order:
        // a sum of two floats is exact to the bit); two of two sum them in another order.
        AssertSameAdapter(single, ranks, perRank == 1 ? 0 : 1e-5);
        // The losses are the mean over both ranks' sequences, as one process's over its accumulation.
        var expected = ValidationTests.ReadMetrics(single);
        var actual = ValidationTests.ReadMetrics(ranks);
        Assert.Equal(expected.Select(m => m.Step), actual.Select(m => m.Step));
        Assert.All(expected.Zip(actual), p => Assert.InRange(Math.Abs(p.First.Loss - p.Second.Loss), 0, 1e-4 * p.First.Loss));
        // Rank 0 alone wrote the run: one metrics.csv of one row per step, one step line each.
        Assert.Single(run.Output.Split('\n'), l => l.StartsWith($"step     {steps}/{steps}", StringComparison.Ordinal));
        Assert.Equal(steps, RunFailureTests.CheckpointStep(ranks));
    }

    [MpiFact]
    public void A_killed_rank_ends_the_job_with_a_clear_error_and_the_run_resumes_from_its_checkpoint_on_two_ranks()
    {
        const int steps = 150;
        string killed = Dir("killed"), single = Dir("single");
        var (output, error) = (new StringBuilder(), new StringBuilder());
        var watch = Stopwatch.StartNew();
        using (var mpirun = MpiRun.Start(2, Train(killed, steps, "--save-every", "2"), output, error))
        {
            string metrics = Path.Combine(killed, TrainingRun.MetricsFile);
            var deadline = DateTime.UtcNow.AddMinutes(2);
            while (!(File.Exists(metrics) && File.ReadAllLines(metrics).Length > 5) && !mpirun.HasExited && DateTime.UtcNow < deadline)
                Thread.Sleep(10);
            Assert.False(mpirun.HasExited, $"the run ended before the kill: {output}{error}");
            int rank1 = MpiRun.RankProcess(mpirun, 1);
            Process.GetProcessById(rank1).Kill();
            watch.Restart();
            Assert.True(mpirun.WaitForExit(TimeSpan.FromSeconds(60)), "the job still runs a minute after one of its ranks was killed");
            mpirun.WaitForExit();
            Assert.NotEqual(0, mpirun.ExitCode);
        }
        string all = output.ToString() + error;
        Assert.Matches(@"process rank 1 .* exited on signal 9 \(Killed\)", all.Replace("\n", " "));
        Assert.DoesNotContain("   at ", all); // no stack trace

        // What rank 0 wrote is whole: a checkpoint of an even step, the metrics up to it once resumed.
        int saved = RunFailureTests.CheckpointStep(killed);
        Assert.InRange(saved, 2, steps - 1);
        Assert.Equal(0, saved % 2);
        Assert.False(File.Exists(Path.Combine(killed, LoraAdapter.WeightsFileName)));

        // Resume on another number of ranks is refused; on two it finishes the adapter of one process with --grad-accum 2.
        var three = MpiRun.Run(3, ["train", "--resume", killed]);
        Assert.Equal(2, three.Code);
        Assert.Contains("error: --resume: the run was trained on 2 processes, not 3: continue it with mpirun -np 2", three.Output);
        var resumed = MpiRun.Run(2, ["train", "--resume", killed]);
        Assert.True(resumed.Code == 0, resumed.Output);
        Assert.Contains($"resuming after step {saved}", resumed.Output);
        Single(Train(single, steps, "--save-every", "2", "--grad-accum", "2"));
        AssertSameAdapter(single, killed, 1e-5);
        Assert.Equal(Enumerable.Range(1, steps), ValidationTests.ReadMetrics(killed).Select(m => m.Step));
    }

    [MpiFact]
    public void A_rank_that_stops_answering_is_given_up_after_the_mpi_timeout_with_a_clear_error()
    {
        const int SIGSTOP = 19, SIGCONT = 18;
        string frozen = Dir("frozen");
        var (output, error) = (new StringBuilder(), new StringBuilder());
        using var mpirun = MpiRun.Start(2, Train(frozen, 2000, "--mpi-timeout", "5"), output, error);
        string metrics = Path.Combine(frozen, TrainingRun.MetricsFile);
        var deadline = DateTime.UtcNow.AddMinutes(2);
        while (!(File.Exists(metrics) && File.ReadAllLines(metrics).Length > 3) && !mpirun.HasExited && DateTime.UtcNow < deadline)
            Thread.Sleep(10);
        Assert.False(mpirun.HasExited, $"the run ended early: {output}{error}");
        // Stopped, not killed: mpirun sees nothing wrong, and rank 0 waits for it in a collective.
        var rank1 = Process.GetProcessById(MpiRun.RankProcess(mpirun, 1));
        LoraProcess.Signal(rank1, SIGSTOP);
        try
        {
            Assert.True(mpirun.WaitForExit(TimeSpan.FromSeconds(60)), "the job still runs a minute after a rank stopped answering");
            mpirun.WaitForExit();
        }
        finally
        {
            if (!rank1.HasExited)
                LoraProcess.Signal(rank1, SIGCONT);
        }
        Assert.NotEqual(0, mpirun.ExitCode);
        string line = Assert.Single((output.ToString() + error).Split('\n'), l => l.StartsWith("error:", StringComparison.Ordinal));
        Assert.StartsWith("error: rank 0: the other ranks did not answer for 5 s while ", line);
        Assert.Contains("--mpi-timeout", line);
    }

    [MpiFact]
    public void A_rank_that_fails_before_training_stops_every_rank_with_its_one_error_line()
    {
        // A federated run's '{rank}' data: rank 1's file is missing, rank 0's is there.
        string shards = Dir("shard{rank}.txt");
        File.WriteAllText(Dir("shard0.txt"), Text(seed: 2, 4000));
        var run = MpiRun.Run(2, ["train", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--data", shards, "--out", Dir("fed"),
            "--seq", "32", "--federated-rounds", "2", "--local-steps", "2"]);
        Assert.Equal(1, run.Code);
        var errors = run.Output.Split('\n').Where(l => l.StartsWith("error:", StringComparison.Ordinal)).ToList();
        string line = Assert.Single(errors);
        Assert.StartsWith("error: rank 1 (", line);
        Assert.Contains(Dir("shard1.txt"), line);
        Assert.False(Directory.Exists(Path.Combine(Dir("fed"), TrainingRun.CheckpointFolder)));

        // A usage mistake every rank makes is reported once, by rank 0, with exit code 2.
        var usage = MpiRun.Run(2, Train(Dir("usage"), 4, "--local-steps", "2"));
        Assert.Equal(2, usage.Code);
        Assert.Equal("error: --local-steps: goes with --federated-rounds R.", Assert.Single(usage.Output.Split('\n'), l => l.StartsWith("error:", StringComparison.Ordinal)));
    }

    [MpiFact]
    public void Federated_averaging_of_identical_data_is_plain_training_and_of_two_shards_the_token_weighted_mean()
    {
        // Identical data on both ranks: each trains what one process trains, and the mean of equal adapters is that adapter.
        string plain = Dir("plain"), fed = Dir("fed");
        Single(Train(plain, 6));
        var run = MpiRun.Run(2, ["train", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--data", _data, "--out", fed,
            "--seq", "32", "--lr", "1e-2", "--seed", "5", "--federated-rounds", "3", "--local-steps", "2"]);
        Assert.True(run.Code == 0, run.Output);
        Assert.Contains("Federated averaging over 2 ranks: 3 rounds of 2 local steps", run.Output);
        AssertSameAdapter(plain, fed, 1e-6);

        // One round on two different files of different lengths ('{rank}'): the mean of the two
        // single-process adapters, weighted by the tokens each trained on (steps × sequence: equal here,
        // so the plain mean), computed here in float64.
        File.WriteAllText(Dir("shard0.txt"), Text(seed: 3, 3000));
        File.WriteAllText(Dir("shard1.txt"), Text(seed: 4, 5000));
        string[] Options(string data, string outDir) => ["train", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--data", data,
            "--out", outDir, "--seq", "32", "--lr", "1e-2", "--seed", "5", "--steps", "4"];
        Single(Options(Dir("shard0.txt"), Dir("own0")));
        Single(Options(Dir("shard1.txt"), Dir("own1")));
        string sharded = Dir("sharded");
        run = MpiRun.Run(2, ["train", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--data", Dir("shard{rank}.txt"), "--out", sharded,
            "--seq", "32", "--lr", "1e-2", "--seed", "5", "--federated-rounds", "1", "--local-steps", "4"]);
        Assert.True(run.Code == 0, run.Output);
        var own0 = LoraAdapter.Load(Dir("own0"), _model.Lora, _model.LoraModules);
        var own1 = LoraAdapter.Load(Dir("own1"), _model.Lora, _model.LoraModules);
        var averaged = LoraAdapter.Load(sharded, _model.Lora, _model.LoraModules);
        foreach (var ((a, b), m) in own0.Modules.Zip(own1.Modules).Zip(averaged.Modules))
        {
            AssertClose(a.A.Zip(b.A, (x, y) => (float)((x + (double)y) / 2)).ToArray(), m.A, 1e-6, m.Spec.AName);
            AssertClose(a.B.Zip(b.B, (x, y) => (float)((x + (double)y) / 2)).ToArray(), m.B, 1e-6, m.Spec.BName);
            Assert.False(a.B.SequenceEqual(b.B), "the two shards trained the same adapter: the test would prove nothing");
        }
    }

    [Fact]
    public void A_rank_share_reads_the_sequences_one_process_reads_and_stands_where_it_does_between_steps()
    {
        int[] tokens = Enumerable.Range(0, 100).ToArray();
        var one = new TokenWindows(tokens, 4, "tokens");
        var shares = Enumerable.Range(0, 3).Select(r => new RankShare(new TokenWindows(tokens, 4, "tokens"), r, 3, 2)).ToArray();
        for (int step = 0; step < 5; step++)
        {
            foreach (var share in shares)
                for (int i = 0; i < 2; i++)
                    Assert.Equal(one.Next().Tokens.ToArray(), share.Next().Tokens.ToArray());
            Assert.All(shares, s => Assert.Equal(one.Position, s.Position));
        }
        shares[1].Position = "8";
        Assert.Equal(new[] { 16, 17, 18, 19 }, shares[1].Next().Tokens.ToArray());
        Assert.Throws<InvalidOperationException>(() => shares[1].Position);
    }

    [Fact]
    public void Without_mpirun_the_distributed_options_are_refused_and_the_help_lists_them()
    {
        var e = Assert.Throws<UsageException>(() => Commands.Train(new Args(Train(Dir("x"), 4, "--federated-rounds", "2", "--local-steps", "2").Skip(1))));
        Assert.StartsWith("--federated-rounds: applies to a run of several processes", e.Message);
        var (code, output, _) = LoraProcess.Run("train", "--help");
        Assert.Equal(0, code);
        foreach (var option in new[] { "--federated-rounds", "--local-steps", "--mpi-timeout", "--distributed", "mpirun -np N" })
            Assert.Contains(option, output);
        if (!MpiWorld.LaunchedByMpirun)
        {
            var (distributed, _, error) = LoraProcess.Run([.. Train(Dir("y"), 2), "--distributed"]);
            Assert.Equal(2, distributed);
            Assert.StartsWith("error: --distributed: this process was not started by mpirun", error.Trim());
        }
    }

    private void AssertSameAdapter(string expectedDir, string actualDir, double tolerance)
    {
        var expected = LoraAdapter.Load(expectedDir, _model.Lora, _model.LoraModules);
        var actual = LoraAdapter.Load(actualDir, _model.Lora, _model.LoraModules);
        foreach (var (a, b) in actual.Modules.Zip(expected.Modules))
        {
            AssertClose(b.A, a.A, tolerance, a.Spec.AName);
            AssertClose(b.B, a.B, tolerance, a.Spec.BName);
        }
    }

    /// <summary>Relative error (the norm of the difference over the norm of the reference) at most <paramref name="tolerance"/>; 0: the same floats.</summary>
    private static void AssertClose(float[] expected, float[] actual, double tolerance, string name)
    {
        if (tolerance == 0)
        {
            Assert.True(expected.SequenceEqual(actual), $"{name}: not the same floats");
            return;
        }
        double error = ModelFixture.RelativeError(actual, expected);
        Assert.True(error <= tolerance, $"{name}: relative error {error:E3}");
    }
}

[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class MpiCollection
{
    public const string Name = "mpi";
}
