using System.Globalization;
using LoraCompiler.Benchmarks;

namespace LoraCompiler.Bench;

/// <summary>
/// <c>lora-bench memory</c>: for each sequence length (or memory budget), <c>lora-bench memory-ours</c>
/// (ours: the benchmarks library's measurement, the same as <c>lora bench memory --no-reference</c>) and
/// <c>lora-bench memory-reference</c> (TorchSharp autograd), each in a fresh process, then the two side
/// by side with their ratio.
/// </summary>
public static class MemoryComparison
{
    /// <summary>The issue's target: ours at most one fifth of the reference's peak private memory.</summary>
    private const double TargetRatio = 1.0 / 5;

    public static int Run(MemoryBenchOptions options)
    {
        var self = ChildCommand.ForAssembly(typeof(MemoryComparison).Assembly.Location);
        if (options.SeveralBudgets)
            return RunBudgets(options, self);
        var ours = self;
        bool single = options.Sequences.Count == 1;
        var rows = new List<(MemoryBenchResult Ours, MemoryBenchResult? Reference)>();
        foreach (int seq in options.Sequences)
        {
            Console.WriteLine($"seq {seq}: LoraCompiler ({ours} memory-ours)...");
            var a = ChildProcess.RunForResult(ours, ["memory-ours", .. options.ChildArguments(seq)], single ? Console.Out : null);
            MemoryBenchResult? b = null;
            if (options.Backend == "cpu")
            {
                Console.WriteLine($"seq {seq}: TorchSharp autograd reference ({self} memory-reference)...");
                b = ChildProcess.RunForResult(self, ["memory-reference", .. options.ChildArguments(seq)], single ? Console.Out : null);
            }
            else
                Console.WriteLine("(no reference: TorchSharp-cpu runs on the CPU only, so it is compared with --backend cpu)");
            rows.Add((a, b));
        }

        Console.WriteLine();
        Console.WriteLine($"{options.Model.Name}, LoRA r={options.Model.Lora.R} on {string.Join(",", options.Model.Lora.TargetModules)}, batch 1, SGD, " +
                          $"{options.Steps} steps, {Environment.ProcessorCount} threads; each side in a fresh process");
        if (single)
            PrintSideBySide(rows[0].Ours, rows[0].Reference);
        else
            PrintRows(rows);
        Console.WriteLine("peak private memory: RssAnon sampled every 1 ms by a thread (and, for ours, at every layer boundary of the backward), " +
                          "from creating the model to the end of the last optimizer step; file-backed pages are not counted.");
        return 0;
    }

    /// <summary><c>lora-bench memory-ours</c>: our side alone, in this process, as <c>lora bench memory --no-reference</c> runs it.</summary>
    public static int RunOurs(MemoryBenchOptions options)
    {
        if (options.SeveralSequences || options.SeveralBudgets)
            throw new UsageException("memory-ours measures one run: give --seq (and --memory-budget), not --seqs or --budgets.");
        return MemoryBench.RunOne(options, Console.Out);
    }

    /// <summary>The smallest plan and each budget (ours), the reference once, the table and the plot.</summary>
    private static int RunBudgets(MemoryBenchOptions options, ChildCommand self)
    {
        int seq = options.Sequences[0];
        Console.WriteLine($"{options.Model.Name}, LoRA r={options.Model.Lora.R} on {string.Join(",", options.Model.Lora.TargetModules)}, seq {seq}, batch 1, SGD, " +
                          $"{options.Steps} steps, {Environment.ProcessorCount} threads; each run in a fresh process");
        var ours = MemoryBudgetSweep.Run(options, self, ["memory-ours"], Console.Out);
        MemoryBenchResult? reference = null;
        if (options.Backend == "cpu")
        {
            Console.WriteLine($"TorchSharp autograd reference ({self} memory-reference)...");
            reference = ChildProcess.RunForResult(self, ["memory-reference", .. options.ChildArguments(seq)]);
        }
        Console.WriteLine();
        MemoryBudgetSweep.PrintTable(ours, reference, Console.Out);
        if (options.PlotPath is { } plot)
        {
            MemoryBudgetSweep.Plot(plot, $"{options.Model.Name}, seq {seq}: step time against peak memory", ours, reference);
            Console.WriteLine($"Wrote {plot}.");
        }
        return 0;
    }

    private static void PrintSideBySide(MemoryBenchResult a, MemoryBenchResult? b)
    {
        Console.WriteLine($"seq {a.Sequence}; weights {a.Weights} ({a.WeightsDtype})");
        Console.WriteLine($"{"",-44} {"LoraCompiler",14} {"TorchSharp autograd",20} {"ours / reference",18}");
        Line("peak private memory (RssAnon)", a.PeakPrivateBytes, b?.PeakPrivateBytes, Target(a.PeakPrivateBytes, b?.PeakPrivateBytes));
        Line("process baseline (before the model)", a.BaselinePrivateBytes, b?.BaselinePrivateBytes);
        Line("after creating the model, before step 1", a.CreatedPrivateBytes, b?.CreatedPrivateBytes);
        Line("peak above the baseline", a.PeakPrivateBytes - a.BaselinePrivateBytes, b is null ? null : b.PeakPrivateBytes - b.BaselinePrivateBytes);
        Line("trainer buffers (AllocatedBytes)", a.TrainerBufferBytes, null);
        Line("planned peak (plan less mapped weights)", a.PlannedBufferBytes, null);
        Line("peak file-backed resident (not counted)", a.PeakFileBytes, b?.PeakFileBytes);
        Line("VmHWM (all resident pages)", a.HighWaterMarkBytes, b?.HighWaterMarkBytes);
        Console.WriteLine($"{"step time, median after the first",-44} {Seconds(a.SteadyStepSeconds),14} {Seconds(b?.SteadyStepSeconds),20} {Ratio(a.SteadyStepSeconds, b?.SteadyStepSeconds),18}");
        Console.WriteLine($"{"first step",-44} {Seconds(a.FirstStepSeconds),14} {Seconds(b?.FirstStepSeconds),20}");
        Console.WriteLine($"{"loss at step 1",-44} {a.Losses[0],14:F4} {(b is null ? "-" : b.Losses[0].ToString("F4", CultureInfo.InvariantCulture)),20}");
        Console.WriteLine($"peak of ours at {a.PeakAt}" + (b is null ? "" : $"; of the reference at {b.PeakAt}"));
    }

    private static void PrintRows(List<(MemoryBenchResult Ours, MemoryBenchResult? Reference)> rows)
    {
        Console.WriteLine($"{"seq",5} {"ours peak",12} {"buffers",11} {"planned",11} {"ref peak",12} {"ours/ref",9} " +
                          $"{"ours KiB/token",15} {"ref KiB/token",14} {"ours step",10} {"ref step",10}");
        for (int i = 0; i < rows.Count; i++)
        {
            var (a, b) = rows[i];
            var (pa, pb) = i > 0 ? rows[i - 1] : (null, null);
            Console.WriteLine($"{a.Sequence,5} {MemoryBench.Mib(a.PeakPrivateBytes),12} {Mib(a.TrainerBufferBytes),11} {Mib(a.PlannedBufferBytes),11} " +
                              $"{Mib(b?.PeakPrivateBytes),12} {Ratio(a.PeakPrivateBytes, b?.PeakPrivateBytes),9} " +
                              $"{Growth(a, pa),15} {Growth(b, pb),14} {Seconds(a.SteadyStepSeconds),10} {Seconds(b?.SteadyStepSeconds),10}");
        }
        Console.WriteLine("KiB/token: the change of the peak per added token from the row above.");
    }

    private static string Growth(MemoryBenchResult? r, MemoryBenchResult? previous) =>
        r is null || previous is null ? "" :
            ((r.PeakPrivateBytes - previous.PeakPrivateBytes) / 1024.0 / (r.Sequence - previous.Sequence)).ToString("F1", CultureInfo.InvariantCulture);

    private static void Line(string what, long? ours, long? reference, string ratio = "") =>
        Console.WriteLine($"{what,-44} {Mib(ours),14} {Mib(reference),20} {(ratio.Length > 0 ? ratio : Ratio(ours, reference)),18}");

    private static string Target(long ours, long? reference) =>
        reference is long r && r > 0
            ? $"1/{(double)r / ours:F1} {((double)ours / r <= TargetRatio ? "(≤ 1/5: met)" : "(> 1/5: missed)")}"
            : "";

    private static string Ratio(double? ours, double? reference) =>
        ours is double a && reference is double b && b > 0 ? (a / b).ToString("F3", CultureInfo.InvariantCulture) : "";

    private static string Mib(long? bytes) => bytes is long b ? MemoryBench.Mib(b) : "-";

    private static string Seconds(double? s) => s is double v ? v.ToString("F2", CultureInfo.InvariantCulture) + " s" : "-";
}
