using System.Globalization;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Tests.Cli;

namespace LoraCompiler.Tests.Training;

/// <summary>
/// <c>train --val-data</c>: the held-out loss at the expected steps, equal to <c>lora eval</c> of the
/// adapter the run wrote, and a run that validates trains exactly as one that does not.
/// </summary>
[Collection(ConsoleOutputCollection.Name)]
public class ValidationTests
{
    [Theory]
    [InlineData("tiny-qwen2", "backprop")]
    [InlineData("tiny-qwen2", "mezo")]
    [InlineData("tiny-gemma3", "backprop")]
    public void Validation_is_written_at_its_steps_equals_eval_and_does_not_change_training(string modelName, string method)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 61, sequence: 8);
        string train = Path.Combine(fixture.Dir, "train.txt"), held = Path.Combine(fixture.Dir, "held-out.txt");
        File.WriteAllText(train, string.Concat(Enumerable.Repeat("The quick brown fox jumps over the lazy dog. ", 20)));
        File.WriteAllText(held, "Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump!");
        string[] Train(string outDir) => [
            "--model", model.Name, "--weights", fixture.WeightsPath, "--data", train, "--out", outDir,
            "--steps", "12", "--seq", "32", "--lr", "1e-2", "--method", method, "--seed", "3", "--save-every", "4"];

        string validated = Path.Combine(fixture.Dir, "validated");
        var (code, lines) = ConsoleOutput.Capture(() => Commands.Train(new Args([.. Train(validated), "--val-data", held, "--val-every", "5"])));
        Assert.Equal(0, code);
        string plain = Path.Combine(fixture.Dir, "plain");
        Assert.Equal(0, ConsoleOutput.Capture(() => Commands.Train(new Args(Train(plain)))).Code);

        // metrics.csv: val_loss at steps 5 and 10 and at the end, empty elsewhere; shown in the progress line.
        var metrics = ReadMetrics(validated);
        Assert.Equal(Enumerable.Range(1, 12), metrics.Select(m => m.Step));
        Assert.Equal([5, 10, 12], metrics.Where(m => m.ValidationLoss is not null).Select(m => m.Step));
        Assert.All(metrics.Where(m => m.ValidationLoss is not null), m => Assert.True(m.ValidationLoss > 0 && double.IsFinite(m.ValidationLoss.Value)));
        Assert.Contains(lines, l => l.StartsWith("step     5/12", StringComparison.Ordinal) && l.Contains("val_loss"));
        Assert.NotEqual(metrics[4].ValidationLoss, metrics[^1].ValidationLoss); // training moved it
        Assert.Contains("validation", File.ReadAllText(Path.Combine(validated, "loss.svg")));

        // The last val_loss is lora eval of the adapter the run wrote, on the same data.
        var eval = EvalTests.Score(["--model", model.Name, "--weights", fixture.WeightsPath, "--adapter", validated,
            "--data", held, "--seq", "32", "--json"]);
        Assert.InRange(Math.Abs(metrics[^1].ValidationLoss!.Value - eval.Loss), 0, 1e-5);
        Assert.Equal(File.ReadAllText(held).Length - 1, eval.Tokens);

        // Validation does not disturb training: the same losses at every step, the same adapter.
        var without = ReadMetrics(plain);
        Assert.All(without, m => Assert.Null(m.ValidationLoss));
        Assert.Equal(without.Select(m => m.Loss), metrics.Select(m => m.Loss));
        var expected = LoraAdapter.Load(plain, model.Lora, model.LoraModules);
        var actual = LoraAdapter.Load(validated, model.Lora, model.LoraModules);
        foreach (var (a, b) in actual.Modules.Zip(expected.Modules))
        {
            Assert.Equal(b.A, a.A);
            Assert.Equal(b.B, a.B);
        }
    }

    [Fact]
    public void Validation_defaults_to_the_save_interval_else_a_tenth_of_the_steps()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 67, sequence: 9);
        using var trainer = fixture.CreateTrainer(new CpuBackend());
        var data = new TokenWindows(fixture.Tokens, 8, "tokens");
        var validation = new ValidationOptions(EvaluationData.Windows(fixture.Tokens, 8, "tokens"));
        int[] Steps(TrainingOptions options, ValidationOptions? v = null)
        {
            var run = new TrainingRun(trainer, data, options, fixture.Dir, v ?? validation);
            return Enumerable.Range(1, options.Steps).Where(run.ValidatesAt).ToArray();
        }

        Assert.Equal([7, 14, 20], Steps(new TrainingOptions { Steps = 20, SaveEvery = 7 }));
        Assert.Equal([3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31], Steps(new TrainingOptions { Steps = 31 }));
        Assert.Equal([1, 2, 3, 4, 5], Steps(new TrainingOptions { Steps = 5 }));
        Assert.Equal([4, 8, 10], Steps(new TrainingOptions { Steps = 10, SaveEvery = 7 }, validation with { Every = 4 }));
        var unvalidated = new TrainingRun(trainer, data, new TrainingOptions { Steps = 10 }, fixture.Dir);
        Assert.DoesNotContain(Enumerable.Range(1, 10), unvalidated.ValidatesAt);
        Assert.Throws<ArgumentException>(() => new TrainingRun(trainer, data, new TrainingOptions(), fixture.Dir, validation with { Every = 0 }));
        Assert.Throws<ArgumentException>(() => new TrainingRun(trainer, data, new TrainingOptions(), fixture.Dir, validation with { Sequences = 0 }));
    }

    [Fact]
    public void Val_batches_scores_only_the_first_sequences()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 71, sequence: 5 * 8 + 1);
        using var trainer = fixture.CreateTrainer(new CpuBackend(), 8);
        var held = EvaluationData.Windows(fixture.Tokens, 8, "held-out");
        Assert.Equal(5, held.Count);
        var run = new TrainingRun(trainer, new TokenWindows(fixture.Tokens, 8, "train"), new TrainingOptions { Steps = 3, LearningRate = 1e-2f },
            Path.Combine(fixture.Dir, "run"), new ValidationOptions(held) { Sequences = 2 });
        run.Run();

        // The trainer holds the final adapter: the first two windows alone give the last val_loss.
        var firstTwo = EvaluationData.Windows(fixture.Tokens[..(2 * 8 + 1)], 8, "first two").Evaluate(trainer);
        var all = held.Evaluate(trainer);
        Assert.Equal((2 * 8, 2), (firstTwo.Tokens, firstTwo.Sequences));
        Assert.Equal((float)firstTwo.Loss, run.Metrics[^1].ValidationLoss);
        Assert.True(Math.Abs(all.Loss - firstTwo.Loss) > 1e-4, "all five windows must score differently, or this test proves nothing");
    }

    /// <summary>metrics.csv's step, loss and val_loss columns (found by name).</summary>
    internal static List<(int Step, double Loss, double? ValidationLoss)> ReadMetrics(string runDir)
    {
        var lines = File.ReadAllLines(Path.Combine(runDir, "metrics.csv"));
        var header = lines[0].Split(',');
        int step = Array.IndexOf(header, "step"), loss = Array.IndexOf(header, "loss"), val = Array.IndexOf(header, "val_loss");
        Assert.True(val >= 0, "metrics.csv has no val_loss column");
        return lines.Skip(1).Select(l => l.Split(',')).Select(c => (
            int.Parse(c[step], CultureInfo.InvariantCulture),
            double.Parse(c[loss], CultureInfo.InvariantCulture),
            c[val] == "" ? (double?)null : double.Parse(c[val], CultureInfo.InvariantCulture))).ToList();
    }
}
