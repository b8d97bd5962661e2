using System.Globalization;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Benchmarks;

/// <summary>
/// <c>bench memory --budgets A,B,...</c>: the smallest plan, then one run per budget, each in a fresh
/// process (peaks do not mix), and optionally a reference run; a table of what each budget bought
/// (kept layers, planned and measured peak, step time, speedup over the smallest plan) and a plot of
/// step time against peak memory.
/// </summary>
public static class MemoryBudgetSweep
{
    /// <summary>Runs the smallest plan and each budget through <paramref name="ours"/> (a command printing a JSON result line).</summary>
    public static List<MemoryBenchResult> Run(MemoryBenchOptions options, ChildCommand ours, IReadOnlyList<string> command, TextWriter o)
    {
        int seq = options.Sequences[0];
        var budgets = new List<long> { options.SmallestBudget(seq) };
        budgets.AddRange(options.Budgets.Where(b => b != budgets[0]).Distinct().Order());
        var results = new List<MemoryBenchResult>();
        foreach (long budget in budgets)
        {
            var plan = options.BudgetPlan(budget, seq)!;
            o.WriteLine($"budget {ByteSize.Format(budget)}{(results.Count == 0 ? " (the smallest plan)" : "")}: kept {plan.KeptDescription}, " +
                        $"checkpoints in {(plan.ActivationsInFile ? "a mapped file" : "memory")}; planned peak {ByteSize.Format(plan.PlannedPeakBytes)}...");
            results.Add(ChildProcess.RunForResult(ours, [.. command, .. options.ChildArguments(seq, budget)]));
        }
        return results;
    }

    /// <summary>The table of a sweep: one row per budget, the reference's last when there is one.</summary>
    public static void PrintTable(IReadOnlyList<MemoryBenchResult> ours, MemoryBenchResult? reference, TextWriter o)
    {
        var smallest = ours[0];
        o.WriteLine($"{"budget",10} {"kept",5} {"ckpt",6} {"planned",11} {"peak RssAnon",13} {"step s",8} {"cpu s",8} {"vs smallest",12}" +
                    (reference is null ? "" : $" {"vs reference: step",19} {"memory",8}"));
        foreach (var r in ours)
            o.WriteLine($"{ByteSize.Format(r.MemoryBudgetBytes ?? 0),10} {r.KeptLayers,5} {(r.CheckpointsInFile ? "mmap" : "memory"),6} " +
                        $"{MemoryBench.Mib(r.PlannedPeakBytes ?? 0),11} {MemoryBench.Mib(r.PeakPrivateBytes),13} {r.SteadyStepSeconds,8:F2} {r.SteadyStepCpuSeconds,8:F2} " +
                        $"{smallest.SteadyStepSeconds / r.SteadyStepSeconds,11:F2}x" +
                        (reference is null ? "" :
                            $" {reference.SteadyStepSeconds / r.SteadyStepSeconds,18:F2}x {"1/" + ((double)reference.PeakPrivateBytes / r.PeakPrivateBytes).ToString("F1", CultureInfo.InvariantCulture),8}"));
        if (reference is not null)
            o.WriteLine($"{"reference",10} {"all",5} {"",6} {"",11} {MemoryBench.Mib(reference.PeakPrivateBytes),13} {reference.SteadyStepSeconds,8:F2} {reference.SteadyStepCpuSeconds,8:F2} " +
                        $"{smallest.SteadyStepSeconds / reference.SteadyStepSeconds,11:F2}x  ({reference.Implementation}: keeps every activation)");
        o.WriteLine("kept: the last layers that keep their activations (no recompute); step s: wall time, cpu s: processor time of all threads " +
                    "(medians after the first step); vs smallest: wall-time speedup over the first row; " +
                    "vs reference: its wall time over ours (above 1: ours is faster), ours as a fraction of its peak.");
    }

    /// <summary>Step time against peak private memory, one labelled point per budget (and the reference), as SVG.</summary>
    public static void Plot(string path, string title, IReadOnlyList<MemoryBenchResult> ours, MemoryBenchResult? reference)
    {
        static double MiB(long bytes) => bytes / 1048576.0;
        var series = new List<SvgPlot.Series>
        {
            new("LoraCompiler, by budget", ours.Select(r => new SvgPlot.Point(MiB(r.PeakPrivateBytes), r.SteadyStepSeconds,
                $"{ByteSize.Format(r.MemoryBudgetBytes ?? 0)}: {r.KeptLayers} kept")).ToList()),
        };
        if (reference is not null)
            series.Add(new(reference.Implementation, [new(MiB(reference.PeakPrivateBytes), reference.SteadyStepSeconds, "keeps everything")]));
        SvgPlot.Write(path, title, "peak private memory (RssAnon), MiB", "step time, s", series, markers: true, logX: reference is not null);
    }
}
