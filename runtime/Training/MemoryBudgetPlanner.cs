using System.Globalization;
using LoraCompiler.Runtime.IO;

namespace LoraCompiler.Runtime.Training;

/// <summary>
/// What one training step's private memory is made of, for the planner: what every plan has, what
/// a mapped file can take out of private memory, and what each layer that keeps its activations adds.
/// </summary>
/// <param name="BufferBytes">The memory plan's buffers less the mapped weights and the checkpoints: one layer's activations, gradients and scratch, the LoRA parameters and one layer's gradients.</param>
/// <param name="CheckpointBytes">The checkpoints x00..xL (MeBP), in private memory unless they go to a mapped file (<c>--activations mmap</c>).</param>
/// <param name="OptimizerStateBytes">AdamW's two moments per LoRA parameter (and the sums of gradient accumulation), unless they go to mapped files (<c>--optimizer-state mmap</c>); 0 for SGD.</param>
/// <param name="KeptBytesPerLayer">One layer's activations kept from forward to backward (the plan's <see cref="BufferRole.KeptActivations"/> buffer).</param>
/// <param name="RuntimeBytes">An allowance for the process itself: the .NET runtime, JIT code, thread stacks and the managed heap.</param>
public sealed record MemoryCosts(int Layers, long BufferBytes, long CheckpointBytes, long OptimizerStateBytes, long KeptBytesPerLayer, long RuntimeBytes)
{
    /// <summary>
    /// The allowance for the process beside the trainer's buffers: measured with <c>lora bench memory</c> on
    /// Qwen2.5-0.5B (peak RssAnon less the trainer's buffers: 33 MiB with SGD), rounded up.
    /// </summary>
    public const long DefaultRuntimeBytes = 40L << 20;

    /// <summary>
    /// The costs of a step of <paramref name="model"/> on sequences of up to <paramref name="sequence"/> tokens
    /// with <paramref name="optimizer"/> ("adamw" keeps two moments per parameter, "sgd" nothing) and
    /// <paramref name="gradientAccumulation"/> sequences per step (more than one keeps a sum per parameter).
    /// </summary>
    public static MemoryCosts For(ModelInfo model, int sequence, string optimizer = "adamw", int gradientAccumulation = 1,
        long runtimeBytes = DefaultRuntimeBytes)
    {
        var plan = model.Plan(sequence);
        long checkpoints = plan.BytesOf(BufferRole.Checkpoint);
        long buffers = plan.TotalBytes - plan.BytesOf(BufferRole.Weights) - checkpoints;
        long parameters = model.LoraParameterCount * sizeof(float);
        long state = (optimizer == "adamw" ? 2 * parameters : 0) + (gradientAccumulation > 1 ? parameters : 0);
        long kept = plan.Buffers.Where(b => b.Role == BufferRole.KeptActivations).Sum(b => b.Bytes(sequence));
        return new MemoryCosts(model.Layers, buffers, checkpoints, state, kept, runtimeBytes);
    }

    /// <summary>The private bytes of a plan: what is not in a mapped file, and <paramref name="keptLayers"/> layers' activations.</summary>
    public long PeakBytes(int keptLayers, bool activationsInFile, bool optimizerStateInFile) =>
        RuntimeBytes + BufferBytes + (activationsInFile ? 0 : CheckpointBytes) + (optimizerStateInFile ? 0 : OptimizerStateBytes)
        + keptLayers * KeptBytesPerLayer;
}

/// <summary>
/// What <see cref="MemoryBudgetPlanner"/> chose for a budget: how many layers keep their activations
/// from forward to backward (the last ones: their backward runs first), whether the checkpoints and the
/// optimizer state go to mapped files, and the private memory that plan should peak at.
/// </summary>
public sealed record MemoryBudgetPlan(long BudgetBytes, int KeptLayers, bool ActivationsInFile, bool OptimizerStateInFile,
    long PlannedPeakBytes, MemoryCosts Costs)
{
    /// <summary>The trainer options of this plan (over <paramref name="options"/>, whose other settings stay).</summary>
    public TrainerOptions ToOptions(TrainerOptions? options = null) =>
        (options ?? new TrainerOptions()) with
        {
            KeptLayers = KeptLayers, ActivationsInFile = ActivationsInFile, OptimizerStateInFile = OptimizerStateInFile, MemoryBudget = BudgetBytes,
        };

    /// <summary>The layers that keep their activations: layers L−K..L−1.</summary>
    public string KeptDescription => KeptLayers switch
    {
        0 => "none (every layer recomputed from its checkpoint)",
        _ when KeptLayers == Costs.Layers => $"all {KeptLayers} (nothing recomputed)",
        1 => $"layer {Costs.Layers - 1}",
        _ => $"layers {Costs.Layers - KeptLayers}..{Costs.Layers - 1} ({KeptLayers} of {Costs.Layers})",
    };

    /// <summary>A few lines for <c>plan --memory-budget</c> and <c>train</c>.</summary>
    public string Describe()
    {
        static string Mb(long bytes) => ByteSize.Format(bytes);
        return string.Join(Environment.NewLine,
            $"memory budget {Mb(BudgetBytes)}: planned peak {Mb(PlannedPeakBytes)} of private memory",
            $"  layers keeping their activations: {KeptDescription}, {Mb(Costs.KeptBytesPerLayer)} each",
            $"  checkpoints ({Mb(Costs.CheckpointBytes)}): {(ActivationsInFile ? "mapped file" : "memory")}; " +
            $"optimizer state ({Mb(Costs.OptimizerStateBytes)}): {(Costs.OptimizerStateBytes == 0 ? "none" : OptimizerStateInFile ? "mapped files" : "memory")}",
            $"  the rest: trainer buffers {Mb(Costs.BufferBytes)}, runtime allowance {Mb(Costs.RuntimeBytes)}");
    }
}

/// <summary>A budget no plan fits: the message gives the budget and the smallest plan.</summary>
public sealed class MemoryBudgetException(string message) : ArgumentException(message);

/// <summary>
/// Places MeBP's checkpoints for a memory budget. Every plan keeps each layer's input (the
/// checkpoints); a layer that also keeps its activations skips its recompute in backward, which buys
/// speed with memory. The planner first fits what every plan needs, in private memory where it fits
/// and in mapped files (checkpoints, then the optimizer state) where it does not, then spends what is
/// left of the budget on kept layers, the last layers first (their backward runs first, so their
/// activations are held the shortest). It picks the placement that keeps the most layers, and of
/// those the one with the fewest mapped files. More budget never keeps fewer layers.
/// </summary>
public static class MemoryBudgetPlanner
{
    /// <summary>
    /// The plan for <paramref name="budgetBytes"/>. <paramref name="activationsInFile"/> and
    /// <paramref name="optimizerStateInFile"/>, where given, fix that placement (the command line's
    /// <c>--activations</c> and <c>--optimizer-state</c>). A budget below the smallest plan throws a
    /// <see cref="MemoryBudgetException"/> that names both.
    /// </summary>
    public static MemoryBudgetPlan Plan(MemoryCosts costs, long budgetBytes, bool? activationsInFile = null, bool? optimizerStateInFile = null)
    {
        MemoryBudgetPlan? best = null;
        foreach (var (checkpointsInFile, stateInFile) in Placements(activationsInFile, optimizerStateInFile, costs))
        {
            long fixedBytes = costs.PeakBytes(0, checkpointsInFile, stateInFile);
            if (fixedBytes > budgetBytes)
                continue;
            int kept = costs.KeptBytesPerLayer <= 0 ? costs.Layers
                : (int)Math.Min(costs.Layers, (budgetBytes - fixedBytes) / costs.KeptBytesPerLayer);
            if (best is null || kept > best.KeptLayers)
                best = new MemoryBudgetPlan(budgetBytes, kept, checkpointsInFile, stateInFile,
                    costs.PeakBytes(kept, checkpointsInFile, stateInFile), costs);
        }
        return best ?? throw new MemoryBudgetException(Refusal(costs, budgetBytes, activationsInFile, optimizerStateInFile));
    }

    /// <summary>The smallest plan: checkpoints and optimizer state in mapped files unless fixed otherwise, every layer recomputed.</summary>
    public static long SmallestPeakBytes(MemoryCosts costs, bool? activationsInFile = null, bool? optimizerStateInFile = null) =>
        costs.PeakBytes(0, activationsInFile ?? true, optimizerStateInFile ?? true);

    /// <summary>The placements to try, in order of preference: private memory first, then mapped files.</summary>
    private static IEnumerable<(bool Checkpoints, bool State)> Placements(bool? checkpoints, bool? state, MemoryCosts costs)
    {
        foreach (var placement in new[] { (false, false), (true, false), (false, true), (true, true) })
        {
            if (checkpoints is bool c && placement.Item1 != c)
                continue;
            if (state is bool s && placement.Item2 != s)
                continue;
            if (placement.Item2 && costs.OptimizerStateBytes == 0 && state is null)
                continue; // nothing to map: SGD keeps no state
            yield return placement;
        }
    }

    private static string Refusal(MemoryCosts costs, long budget, bool? checkpoints, bool? state)
    {
        bool c = checkpoints ?? true, s = state ?? true;
        long smallest = SmallestPeakBytes(costs, checkpoints, state);
        string where = (c, s && costs.OptimizerStateBytes > 0) switch
        {
            (true, true) => "with the checkpoints and the optimizer state in mapped files",
            (true, false) => "with the checkpoints in a mapped file",
            (false, true) => "with the optimizer state in mapped files",
            _ => "with everything in memory",
        };
        string atLeast = (Math.Ceiling(smallest / 1e5) / 10).ToString("F1", CultureInfo.InvariantCulture) + " MB";
        return $"{ByteSize.Format(budget)} is below the smallest plan, {atLeast} ({where} and every layer recomputed: " +
            $"trainer buffers {ByteSize.Format(costs.BufferBytes)}" +
            (c ? "" : $" + checkpoints {ByteSize.Format(costs.CheckpointBytes)}") +
            (s || costs.OptimizerStateBytes == 0 ? "" : $" + optimizer state {ByteSize.Format(costs.OptimizerStateBytes)}") +
            $" + runtime allowance {ByteSize.Format(costs.RuntimeBytes)})";
    }
}
