using LoraCompiler.Runtime.Data;

namespace LoraCompiler.Runtime.Training;

/// <summary>
/// The loss of a model over held-out data: the token-weighted mean cross-entropy, the sum over every
/// labelled row of every sequence divided by the number of those rows (not a mean of per-sequence
/// means), and its exponential.
/// </summary>
public readonly record struct EvaluationResult(double Loss, long Tokens, int Sequences)
{
    public double Perplexity => Math.Exp(Loss);
}

/// <summary>
/// Held-out sequences scored forward only, always the same ones in the same order: the data is cut
/// or packed as training cuts or packs it (<see cref="TokenWindows"/>, <see cref="PackedTrainingData"/>),
/// but not shuffled, one pass, and each <see cref="Evaluate"/> starts from the beginning again, so
/// scoring holds no position and touches no training stream.
/// </summary>
public sealed class EvaluationData
{
    private readonly Func<IEnumerable<(int[] Tokens, int[] Targets)>> _sequences;

    private EvaluationData(string description, int count, Func<IEnumerable<(int[] Tokens, int[] Targets)>> sequences) =>
        (Description, Count, _sequences) = (description, count, sequences);

    /// <summary>What the data is, for the progress output.</summary>
    public string Description { get; }

    /// <summary>What the sequences keep of JSONL examples (the ones cut or dropped); null for a token stream, which loses nothing.</summary>
    public DataCoverage? Coverage { get; private init; }

    /// <summary>How many sequences one pass scores.</summary>
    public int Count { get; }

    /// <summary>The sequences in their fixed order: tokens, and per row the token it must predict or −1.</summary>
    public IEnumerable<(int[] Tokens, int[] Targets)> Sequences() => _sequences();

    /// <summary>
    /// A flat token stream (a JSON array of ids, a text file's bytes) cut into consecutive windows of
    /// <paramref name="sequence"/> tokens, each row predicting the token after it, as
    /// <see cref="TokenWindows"/> cuts it for training; a last, shorter window scores the tokens left
    /// over, so every token after the first is predicted exactly once.
    /// </summary>
    public static EvaluationData Windows(int[] tokens, int sequence, string description)
    {
        ArgumentNullException.ThrowIfNull(tokens);
        ArgumentOutOfRangeException.ThrowIfLessThan(sequence, 1);
        if (tokens.Length < 2)
            throw new ArgumentException($"{description} holds {tokens.Length} token{(tokens.Length == 1 ? "" : "s")}; scoring needs at least 2 (one to predict the next).");
        int predictions = tokens.Length - 1;
        int count = (predictions + sequence - 1) / sequence;

        IEnumerable<(int[], int[])> Cut()
        {
            for (int offset = 0; offset < predictions; offset += sequence)
            {
                int length = Math.Min(sequence, predictions - offset);
                yield return (tokens.AsSpan(offset, length).ToArray(), tokens.AsSpan(offset + 1, length).ToArray());
            }
        }
        return new EvaluationData($"{description} ({tokens.Length:N0} tokens in {Plural(count, "window")} of up to {sequence})", count, Cut);
    }

    /// <summary>
    /// JSONL examples packed whole into sequences of up to <paramref name="sequence"/> tokens as
    /// training packs them (<see cref="PackingMode.Pack"/>), in the file's order instead of a shuffled
    /// one, one epoch; a sequence with no row in the loss is skipped, as in training.
    /// </summary>
    public static EvaluationData Packed(TrainingData data, int sequence)
    {
        ArgumentNullException.ThrowIfNull(data);
        var coverage = data.Coverage(sequence);
        if (coverage.NothingToLearnProblem() is { } problem)
            throw new TrainingDataException(data.Source, null, problem.Replace("nothing to learn", "nothing to score", StringComparison.Ordinal));
        var counter = new SequencePacker(data.Examples, sequence, PackingMode.Pack, shuffle: false);
        int count = counter.CountSequences(0);

        IEnumerable<(int[], int[])> Pack()
        {
            var packer = new SequencePacker(data.Examples, sequence, PackingMode.Pack, shuffle: false);
            for (int i = 0; i < count; i++)
            {
                var next = packer.Next();
                yield return (next.Tokens, next.Targets);
            }
        }
        return new EvaluationData(
            $"{data.Source} ({data.Examples.Count:N0} examples, " +
            (coverage.LostLossTokens > 0
                ? $"{coverage.LearnedLossTokens:N0} of their {coverage.LossTokens:N0} tokens in the loss within reach ({coverage.Dropped:N0} examples dropped, {coverage.Cut:N0} cut)"
                : $"{data.LossTokenCount:N0} tokens in the loss") +
            $", in {Plural(count, "sequence")} of up to {sequence})",
            count, Pack) { Coverage = coverage };
    }

    private static string Plural(int count, string noun) => $"{count:N0} {noun}{(count == 1 ? "" : "s")}";

    /// <summary>
    /// Scores the first <paramref name="maxSequences"/> sequences (all when null) with
    /// <see cref="TrainerBase.Loss"/>, forward only: each sequence's mean loss times its number of
    /// labelled rows, summed, over the total number of labelled rows. <paramref name="progress"/>
    /// gets the running result after each sequence. The trainer's parameters and gradients are not touched.
    /// </summary>
    public EvaluationResult Evaluate(TrainerBase trainer, int? maxSequences = null, Action<EvaluationResult>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(trainer);
        if (maxSequences is < 1)
            throw new ArgumentOutOfRangeException(nameof(maxSequences), maxSequences, "At least one sequence must be scored.");
        double sum = 0;
        long tokens = 0;
        int scored = 0;
        foreach (var (x, y) in Sequences().Take(maxSequences ?? int.MaxValue))
        {
            int labelled = 0;
            foreach (int target in y)
                if (target >= 0)
                    labelled++;
            if (labelled > 0)
            {
                sum += (double)trainer.Loss(x, y) * labelled;
                tokens += labelled;
            }
            scored++;
            progress?.Invoke(new EvaluationResult(tokens > 0 ? sum / tokens : double.NaN, tokens, scored));
        }
        return new EvaluationResult(tokens > 0 ? sum / tokens : double.NaN, tokens, scored);
    }
}
