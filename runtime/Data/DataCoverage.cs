namespace LoraCompiler.Runtime.Data;

/// <summary>
/// What sequences of <see cref="MaxLength"/> tokens keep of a set of examples, so that a run can say
/// at its start what it will never learn. <see cref="PackingMode.Pack"/> and
/// <see cref="PackingMode.Truncate"/> cut an example longer than the maximum to its first
/// <see cref="MaxLength"/> tokens; <see cref="PackingMode.Concatenate"/> cuts nothing.
/// </summary>
/// <param name="Examples">The number of examples.</param>
/// <param name="Cut">Examples that keep some of their tokens in the loss and lose the others past the cut.</param>
/// <param name="Dropped">Examples whose tokens in the loss all lie past the cut: nothing of them is learned.</param>
/// <param name="WithoutLoss">Examples with no token in the loss at all (a conversation without an assistant turn).</param>
/// <param name="LossTokens">The tokens in the loss over all examples, whole.</param>
/// <param name="LostLossTokens">Those of them past the cut, never learned.</param>
/// <param name="MaxLength">The sequence length.</param>
/// <param name="LongestExample">The length of the longest example, in tokens.</param>
public sealed record DataCoverage(int Examples, int Cut, int Dropped, int WithoutLoss, long LossTokens, long LostLossTokens,
    int MaxLength, int LongestExample)
{
    /// <summary>The tokens in the loss that sequences hold.</summary>
    public long LearnedLossTokens => LossTokens - LostLossTokens;

    /// <summary>Whether no sequence has a token in the loss.</summary>
    public bool NothingToLearn => LearnedLossTokens == 0;

    /// <summary>Whether every example is learned whole.</summary>
    public bool Complete => Cut == 0 && Dropped == 0 && WithoutLoss == 0;

    public static DataCoverage Of(IReadOnlyList<TrainingExample> examples, int maxLength, PackingMode mode = PackingMode.Pack)
    {
        ArgumentNullException.ThrowIfNull(examples);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxLength, 1);
        int cut = 0, dropped = 0, withoutLoss = 0, longest = 0;
        long loss = 0, lost = 0;
        foreach (var example in examples)
        {
            longest = Math.Max(longest, example.Length);
            var targets = example.Targets.AsSpan();
            int all = Count(targets);
            loss += all;
            if (all == 0)
            {
                withoutLoss++;
                continue;
            }
            if (mode == PackingMode.Concatenate || targets.Length <= maxLength)
                continue;
            // The cut keeps rows 0..maxLength−1; the last of them predicts the first token past the cut.
            int kept = Count(targets[..maxLength]);
            lost += all - kept;
            if (kept == 0)
                dropped++;
            else if (kept < all)
                cut++;
        }
        return new DataCoverage(examples.Count, cut, dropped, withoutLoss, loss, lost, maxLength, longest);

        static int Count(ReadOnlySpan<int> targets)
        {
            int n = 0;
            foreach (int t in targets)
                if (t >= 0)
                    n++;
            return n;
        }
    }

    /// <summary>
    /// What is lost, as one sentence: "149 of 200 examples are dropped (all they learn lies past the
    /// first 32 tokens), 30 are cut, so 2,500 of the 3,000 tokens in the loss (83.3%) are never learned";
    /// null when every example is learned whole.
    /// </summary>
    public string? Describe()
    {
        if (Complete)
            return null;
        var parts = new List<string>();
        if (Dropped > 0)
            parts.Add($"{Count(Dropped)} {Are(Dropped)} dropped (all they learn lies past the first {MaxLength:N0} tokens)");
        if (Cut > 0)
            parts.Add($"{Count(Cut)} {Are(Cut)} cut at {MaxLength:N0} tokens");
        if (WithoutLoss > 0)
            parts.Add($"{Count(WithoutLoss)} {(WithoutLoss == 1 ? "has" : "have")} no token in the loss (a conversation needs an assistant turn)");
        string text = string.Join(", ", parts);
        if (LostLossTokens > 0)
            text += $", so {LostLossTokens:N0} of the {LossTokens:N0} tokens in the loss " +
                    $"({(double)LostLossTokens / LossTokens * 100:F1}%) are never learned; the longest example has {LongestExample:N0} tokens";
        return text;
    }

    /// <summary>"149 of 200 examples" for the first count of a sentence, a bare number after it.</summary>
    private string Count(int n) => n == Examples ? (n == 1 ? "the one example" : $"all {n:N0} examples") : $"{n:N0} of {Examples:N0} examples";

    private static string Are(int n) => n == 1 ? "is" : "are";

    /// <summary>
    /// The problem when there is nothing to learn, for a <see cref="TrainingDataException"/>; null otherwise.
    /// </summary>
    public string? NothingToLearnProblem()
    {
        if (!NothingToLearn)
            return null;
        if (LossTokens == 0)
            return $"nothing to learn: none of the {Examples:N0} examples has a token in the loss (a conversation needs an assistant turn).";
        return $"nothing to learn within sequences of {MaxLength:N0} tokens: {Describe()}.";
    }
}
