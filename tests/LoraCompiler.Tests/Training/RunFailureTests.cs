using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using LoraCompiler.Tests.Cli;

namespace LoraCompiler.Tests.Training;

/// <summary>
/// Runs that fail: divergence, interrupts, an output folder that cannot take the run or already holds
/// one, resume from the checkpoint's own options, and what killed writes leave behind.
/// </summary>
/// <remarks>In the console collection: <c>Commands.Train</c> prints, and other tests capture the console.</remarks>
[Collection(ConsoleOutputCollection.Name)]
public sealed class RunFailureTests : IDisposable
{
    private readonly ModelInfo _model = TrainerCatalog.Find("tiny-qwen2")!;
    private readonly ModelFixture _fixture;
    private readonly string _data;

    public RunFailureTests()
    {
        _fixture = new ModelFixture(_model, seed: 41, sequence: 8);
        _data = Path.Combine(_fixture.Dir, "data.txt");
        File.WriteAllText(_data, string.Concat(Enumerable.Repeat("The quick brown fox jumps over the lazy dog. ", 40)));
    }

    public void Dispose() => _fixture.Dispose();

    private string Dir(string name) => Path.Combine(_fixture.Dir, name);

    private string[] Train(string outDir, int steps, params string[] extra) =>
    [
        "--model", _model.Name, "--weights", _fixture.WeightsPath, "--data", _data, "--out", outDir,
        "--steps", $"{steps}", "--seq", "32", "--lr", "1e-3", "--seed", "3", .. extra,
    ];

    [Theory]
    [InlineData("backprop")]
    [InlineData("mezo")]
    public void A_diverging_run_stops_at_that_step_with_the_last_good_checkpoint_and_the_metrics_so_far(string method)
    {
        string run = Dir("diverged");
        var (code, _, error) = LoraProcess.Run(["train", .. Train(run, 30, "--lr", "1e6", "--save-every", "1", "--method", method)]);

        Assert.Equal(1, code);
        string line = Assert.Single(error.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
        var match = Regex.Match(line, @"^error: step (\d+): .*not finite|^error: step (\d+): the loss is");
        Assert.True(match.Success, line);
        Assert.Contains("diverged", line);
        int step = int.Parse(match.Groups[1].Success ? match.Groups[1].Value : match.Groups[2].Value);
        Assert.InRange(step, 2, 30);

        // Nothing of the diverged step: no adapter, the checkpoint of the step before, finite; the metrics up to it.
        Assert.False(File.Exists(Path.Combine(run, LoraAdapter.WeightsFileName)));
        Assert.Equal(step - 1, CheckpointStep(run));
        var saved = LoraAdapter.Load(Path.Combine(run, TrainingRun.CheckpointFolder, "adapter"), _model.Lora, _model.LoraModules);
        Assert.All(saved.Modules, m => Assert.True(m.A.All(float.IsFinite) && m.B.All(float.IsFinite), m.Spec.Module));
        var metrics = ValidationTests.ReadMetrics(run);
        Assert.Equal(Enumerable.Range(1, step - 1), metrics.Select(m => m.Step));
        Assert.All(metrics, m => Assert.True(double.IsFinite(m.Loss)));
    }

    [Theory]
    [InlineData(LoraProcess.SIGTERM, 143)]
    [InlineData(LoraProcess.SIGINT, 130)]
    public void A_signal_ends_the_run_after_its_step_with_a_checkpoint_and_resume_alone_gives_the_same_adapter(int signal, int exitCode)
    {
        const int steps = 600;
        string whole = Dir("whole");
        Assert.Equal(0, Commands.Train(new Args(Train(whole, steps, "--schedule", "cosine", "--warmup", "10"))));

        // The same run in a process of its own, with the default --save-every 0: signalled once metrics.csv shows 20 steps.
        string stopped = Dir("stopped");
        var (output, error) = (new StringBuilder(), new StringBuilder());
        using (var process = LoraProcess.Start(["train", .. Train(stopped, steps, "--schedule", "cosine", "--warmup", "10")], output, error))
        {
            var deadline = DateTime.UtcNow.AddMinutes(2);
            string metrics = Path.Combine(stopped, TrainingRun.MetricsFile);
            while (!(File.Exists(metrics) && MetricsRows(metrics) >= 20) && !process.HasExited && DateTime.UtcNow < deadline)
                Thread.Sleep(10);
            Assert.False(process.HasExited, $"the run ended before the signal; give it more steps. {error}");
            LoraProcess.Signal(process, signal);
            Assert.True(process.WaitForExit(TimeSpan.FromMinutes(1)));
            process.WaitForExit();
            Assert.Equal(exitCode, process.ExitCode);
        }
        int step = CheckpointStep(stopped);
        Assert.InRange(step, 20, steps - 1);
        Assert.Equal(Enumerable.Range(1, step), ValidationTests.ReadMetrics(stopped).Select(m => m.Step));
        Assert.False(File.Exists(Path.Combine(stopped, LoraAdapter.WeightsFileName)), "a stopped run has no final adapter");
        Assert.Contains($"after step {step}", output.ToString());

        // --resume DIR alone: model, weights, data and every option from the checkpoint.
        Assert.Equal(0, Commands.Train(new Args(["--resume", stopped])));
        AssertSameAdapter(whole, stopped);
        Assert.Equal(Enumerable.Range(1, steps), ValidationTests.ReadMetrics(stopped).Select(m => m.Step));
    }

    [Fact]
    [System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
    public void An_out_that_is_a_file_or_read_only_is_refused_before_any_step()
    {
        string file = Dir("a-file");
        File.WriteAllText(file, "not a folder");
        var e = Assert.Throws<UsageException>(() => Commands.Train(new Args(Train(file, 5))));
        Assert.StartsWith("--out: ", e.Message);
        Assert.Contains("is a file", e.Message);

        string readOnly = Dir("read-only");
        Directory.CreateDirectory(readOnly);
        File.SetUnixFileMode(readOnly, UnixFileMode.UserRead | UnixFileMode.UserExecute);
        // Root writes through permissions: then a folder under /proc, where no one can create one.
        string outDir = LoraProcess.IgnoresPermissions(readOnly) ? "/proc/lora-test-out/run" : Path.Combine(readOnly, "run");
        e = Assert.Throws<UsageException>(() => Commands.Train(new Args(Train(outDir, 5))));
        Assert.StartsWith("--out: ", e.Message);
        Assert.Contains("not a folder this process can write to", e.Message);
        File.SetUnixFileMode(readOnly, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        Assert.Empty(Directory.EnumerateFileSystemEntries(readOnly));
    }

    [Fact]
    public void A_run_folder_is_not_replaced_without_overwrite()
    {
        string run = Dir("run");
        Assert.Equal(0, Commands.Train(new Args(Train(run, 3))));
        var before = File.ReadAllBytes(Path.Combine(run, LoraAdapter.WeightsFileName));

        var e = Assert.Throws<UsageException>(() => Commands.Train(new Args(Train(run, 4, "--lr", "2e-3"))));
        Assert.StartsWith("--out: ", e.Message);
        Assert.Contains("a finished run", e.Message);
        Assert.Contains("--resume", e.Message);
        Assert.Contains("--overwrite", e.Message);
        Assert.Equal(before, File.ReadAllBytes(Path.Combine(run, LoraAdapter.WeightsFileName)));

        // An unfinished one (a checkpoint, no adapter) is refused the same way.
        File.Delete(Path.Combine(run, LoraAdapter.WeightsFileName));
        e = Assert.Throws<UsageException>(() => Commands.Train(new Args(Train(run, 4))));
        Assert.Contains("an unfinished run (its checkpoint is at step 3 of 3)", e.Message);

        // --overwrite: the new run, from step 1.
        Assert.Equal(0, Commands.Train(new Args(Train(run, 4, "--lr", "2e-3", "--overwrite"))));
        Assert.Equal(Enumerable.Range(1, 4), ValidationTests.ReadMetrics(run).Select(m => m.Step));
        Assert.Equal(4, CheckpointStep(run));
    }

    [Fact]
    public void Quantize_into_its_source_folder_is_refused_without_overwrite()
    {
        string source = Path.Combine(_fixture.WeightsPath, ModelWeights.SingleFileName);
        var before = File.ReadAllBytes(source);
        foreach (var weights in new[] { _fixture.WeightsPath, source })
        {
            var e = Assert.Throws<UsageException>(() => Commands.Quantize(new Args(["--model", _model.Name, "--weights", weights, "--out", _fixture.WeightsPath])));
            Assert.StartsWith("--out: ", e.Message);
            Assert.Contains("--overwrite", e.Message);
        }
        Assert.Equal(before, File.ReadAllBytes(source));

        Assert.Equal(0, Commands.Quantize(new Args(["--model", _model.Name, "--weights", _fixture.WeightsPath, "--out", _fixture.WeightsPath,
            "--group-size", "16", "--overwrite"])));
        using var quantized = ModelWeights.Open(_fixture.WeightsPath);
        quantized.Validate(_model.BaseTensors);
        Assert.NotEqual(before.Length, new FileInfo(source).Length);
    }

    [Fact]
    public void A_resume_refuses_an_option_that_contradicts_its_checkpoint_naming_it()
    {
        string run = Dir("finished");
        Assert.Equal(0, Commands.Train(new Args(Train(run, 4, "--save-every", "2"))));
        string[] Resume(params string[] extra) => ["--resume", run, .. extra];

        foreach (var (option, value) in new[]
                 {
                     ("lr", "2e-3"), ("seed", "4"), ("seq", "16"), ("steps", "5"), ("grad-accum", "2"), ("schedule", "cosine"),
                     ("method", "mezo"), ("optimizer", "sgd"), ("weight-decay", "0.1"), ("save-every", "1"), ("lcsb-groups", "2"),
                     ("model", "tiny-llama"), ("val-data", _data),
                 })
        {
            var e = Assert.Throws<UsageException>(() => Commands.Train(new Args(Resume($"--{option}", value))));
            Assert.StartsWith($"--{option}: ", e.Message);
        }

        // The same values, however they are written, agree: the finished run is written again as it was.
        var adapter = File.ReadAllBytes(Path.Combine(run, LoraAdapter.WeightsFileName));
        Assert.Equal(0, Commands.Train(new Args(Resume("--lr", "0.001", "--seed", "03", "--data", _data, "--steps", "4"))));
        Assert.Equal(adapter, File.ReadAllBytes(Path.Combine(run, LoraAdapter.WeightsFileName)));

        // The data is checked by its content: the file changed under the run.
        File.AppendAllText(_data, "One more sentence.");
        var changed = Assert.Throws<UsageException>(() => Commands.Train(new Args(Resume())));
        Assert.StartsWith("--data: ", changed.Message);
        Assert.Contains("is not the data the run being resumed trained on", changed.Message);
    }

    [Fact]
    public void Temporary_files_of_killed_writes_are_removed_at_the_next_start()
    {
        string run = Dir("leftovers");
        Assert.Equal(0, Commands.Train(new Args(Train(run, 4, "--save-every", "2"))));
        string checkpoint = Path.Combine(run, TrainingRun.CheckpointFolder);
        string Temporary(string path) => $"{path}.tmp-{Guid.NewGuid():N}";
        var leftovers = new[]
        {
            Temporary(Path.Combine(run, TrainingRun.MetricsFile)),
            Temporary(Path.Combine(run, LoraAdapter.WeightsFileName)),
            Temporary(Path.Combine(checkpoint, "adapter", LoraAdapter.WeightsFileName)),
            Temporary(Path.Combine(checkpoint, "state.json")),
        };
        foreach (var file in leftovers)
            File.WriteAllText(file, "half a write");
        Directory.CreateDirectory(Path.Combine(run, "checkpoint.tmp", "adapter"));
        File.WriteAllText(Path.Combine(run, "checkpoint.tmp", "state.json"), "{");
        string notOurs = Path.Combine(run, "notes.tmp-mine");
        File.WriteAllText(notOurs, "a user's file");
        // Killed mid-swap: only the previous checkpoint, under its old name.
        Directory.Move(checkpoint, checkpoint + ".old");
        var movedLeftovers = leftovers.Select(f => f.Replace(checkpoint + "/", checkpoint + ".old/")).ToArray();

        Assert.Equal(0, Commands.Train(new Args(["--resume", run])));

        Assert.All(leftovers.Concat(movedLeftovers), f => Assert.False(File.Exists(f), f));
        Assert.False(Directory.Exists(Path.Combine(run, "checkpoint.tmp")));
        Assert.False(Directory.Exists(checkpoint + ".old"));
        Assert.Equal(4, CheckpointStep(run));
        Assert.True(File.Exists(notOurs), "only the atomic writes' own temporary names are removed");
    }

    [Fact]
    public void The_mapped_files_of_a_killed_trainer_are_removed_when_the_next_one_starts()
    {
        // A process that has ended: its pid is free, as a killed trainer's is.
        using var ended = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo("true"))!;
        ended.WaitForExit();
        string stale = Directory.CreateTempSubdirectory("lora-killed-").FullName;
        File.WriteAllText(Path.Combine(stale, "owner.pid"), $"{ended.Id}");
        File.WriteAllText(Path.Combine(stale, "x00.f32"), "a checkpoint's pages");
        string alive = Directory.CreateTempSubdirectory("lora-running-").FullName;
        File.WriteAllText(Path.Combine(alive, "owner.pid"), $"{Environment.ProcessId}");

        using var trainer = _fixture.CreateTrainer(new LoraCompiler.Runtime.Backends.CpuBackend());
        Assert.True(Directory.Exists(trainer.TemporaryFolder));
        Assert.False(Directory.Exists(stale), "the folder of a process that is gone is removed");
        Assert.True(Directory.Exists(alive), "a running process's folder is left alone");
        Directory.Delete(alive, recursive: true);
    }

    private void AssertSameAdapter(string expectedDir, string actualDir)
    {
        var expected = LoraAdapter.Load(expectedDir, _model.Lora, _model.LoraModules);
        var actual = LoraAdapter.Load(actualDir, _model.Lora, _model.LoraModules);
        foreach (var (a, b) in actual.Modules.Zip(expected.Modules))
        {
            Assert.True(ModelFixture.RelativeError(a.A, b.A) < 1e-6, a.Spec.AName);
            Assert.True(ModelFixture.RelativeError(a.B, b.B) < 1e-6, a.Spec.BName);
        }
    }

    internal static int CheckpointStep(string runDir)
    {
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(runDir, TrainingRun.CheckpointFolder, "state.json")));
        return json.RootElement.GetProperty("Step").GetInt32();
    }

    private static int MetricsRows(string path)
    {
        try
        {
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            using var reader = new StreamReader(stream);
            return reader.ReadToEnd().Split('\n').Count(l => l.Length > 0 && char.IsAsciiDigit(l[0]));
        }
        catch (IOException)
        {
            return 0;
        }
    }
}
