using LoraCompiler.Benchmarks;
using LoraCompiler.Models;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Cli;

/// <summary>
/// <c>--memory-budget</c> on <c>plan</c>, <c>train</c> and <c>bench memory</c>, and <c>--budgets</c> with
/// <c>--plot</c>: what the commands print and refuse, in processes of their own.
/// </summary>
[Collection(ProcessMemoryCollection.Name)]
public sealed class MemoryBudgetCommandTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("memory-budget-cli-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Plan_prints_the_choice_and_the_planned_peak()
    {
        var model = TrainerCatalog.Find("qwen2.5-0.5b")!;
        var (code, output, error) = LoraProcess.Run("plan", "--model", model.Name, "--memory-budget", "256MB");

        Assert.True(code == 0, error);
        // The same plan, worked out here from the planner's parts: the placement that keeps the most layers.
        var costs = MemoryCosts.For(model, 256);
        var plan = MemoryBudgetPlanner.Plan(costs, 256_000_000);
        Assert.InRange(plan.PlannedPeakBytes, 0, 256_000_000);
        Assert.Contains($"memory budget 256.0 MB: planned peak {ByteSize.Format(plan.PlannedPeakBytes)} of private memory", output);
        Assert.Contains($"layers keeping their activations: {plan.KeptDescription}", output);
        Assert.Contains($"(× {plan.KeptLayers} kept layers)", output);
    }

    [Fact]
    public void A_budget_below_the_smallest_plan_is_one_error_line_with_the_numbers()
    {
        var (code, output, error) = LoraProcess.Run("plan", "--model", "qwen2.5-0.5b", "--memory-budget", "50MB");

        Assert.Equal(2, code);
        var line = Assert.Single(error.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.StartsWith("error: --memory-budget: 50.0 MB is below the smallest plan, ", line);
        long smallest = MemoryBudgetPlanner.SmallestPeakBytes(MemoryCosts.For(TrainerCatalog.Find("qwen2.5-0.5b")!, 256));
        Assert.Contains((Math.Ceiling(smallest / 1e5) / 10).ToString("F1", System.Globalization.CultureInfo.InvariantCulture) + " MB", line);
        Assert.Contains("with adamw", line);
        Assert.DoesNotContain("   at ", error);
        Assert.Equal("", output.Trim());
    }

    [Theory]
    [InlineData("train", "--memory-budget", "lots")]
    [InlineData("plan", "--memory-budget", "12XB")]
    [InlineData("bench", "--budgets", "128MB,,x")]
    public void A_size_that_is_not_one_is_refused_naming_the_option(string command, string option, string value)
    {
        string[] args = command switch
        {
            "train" => ["train", "--model", "tiny-qwen2", "--weights", _dir, "--data", "x.txt", "--out", Path.Combine(_dir, "out"), option, value],
            "plan" => ["plan", "--model", "tiny-qwen2", option, value],
            _ => ["bench", "memory", "--model", "tiny-qwen2", "--weights", _dir, "--no-reference", option, value],
        };
        RandomWeights.Write(TrainerCatalog.Find("tiny-qwen2")!, _dir, seed: 1);
        var (code, _, error) = LoraProcess.Run(args);

        Assert.Equal(2, code);
        Assert.StartsWith($"error: {option}: ", Assert.Single(error.Split('\n', StringSplitOptions.RemoveEmptyEntries)));
    }

    [Fact]
    public void Bench_options_that_do_not_go_together_are_refused()
    {
        RandomWeights.Write(TrainerCatalog.Find("tiny-qwen2")!, _dir, seed: 1);
        Args Bench(params string[] more) => new(["--model", "tiny-qwen2", "--weights", _dir, "--no-reference", .. more]);

        Assert.Contains("--plot draws the runs of --budgets", Assert.Throws<UsageException>(() => MemoryBenchOptions.Parse(Bench("--plot", "a.svg"))).Message);
        Assert.Contains("leave out --seqs", Assert.Throws<UsageException>(() => MemoryBenchOptions.Parse(Bench("--budgets", "1GB", "--seqs", "8,16"))).Message);
        Assert.Contains("not an .svg", Assert.Throws<UsageException>(() => MemoryBenchOptions.Parse(Bench("--budgets", "1GB", "--plot", "a.png"))).Message);
        Assert.StartsWith("--budgets: 1.0 KB is below the smallest plan",
            Assert.Throws<UsageException>(() => MemoryBenchOptions.Parse(Bench("--budgets", "1KB,1GB"))).Message);
    }

    [Fact]
    public void Bench_memory_budgets_measure_each_plan_and_draw_them()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        RandomWeights.Write(model, _dir, seed: 1);
        var costs = MemoryCosts.For(model, 16, "sgd");
        long all = costs.PeakBytes(model.Layers, false, false); // every layer kept, everything in memory
        string plot = Path.Combine(_dir, "budgets.svg");

        var (code, output, error) = LoraProcess.Run("bench", "memory", "--model", model.Name, "--weights", _dir, "--seq", "16", "--steps", "2",
            "--no-reference", "--budgets", all.ToString(System.Globalization.CultureInfo.InvariantCulture), "--plot", plot);

        Assert.True(code == 0, error + output);
        var rows = output.Split('\n').Where(l => l.TrimStart().Length > 0 && char.IsDigit(l.TrimStart()[0])).ToList();
        Assert.Equal(2, rows.Count); // the smallest plan, then the budget
        Assert.Equal(["0", $"{model.Layers}"], rows.Select(r => r.Split(' ', StringSplitOptions.RemoveEmptyEntries)[2]));
        string svg = File.ReadAllText(plot);
        Assert.StartsWith("<svg", svg);
        Assert.Equal(2, svg.Split("<circle").Length - 1);
        Assert.Contains($"{model.Layers} kept", svg);
    }
}
