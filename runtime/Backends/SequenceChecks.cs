namespace LoraCompiler.Runtime.Backends;

/// <summary>
/// The checks of a sequence's token ids and labels, made in one place for the trainer and every
/// backend: an id outside the vocabulary would read outside the embedding table (on a GPU, memory
/// no check protects), a label outside it would pick no logit. The messages are for a person: an
/// <see cref="ArgumentException"/> whose message is one sentence.
/// </summary>
public static class SequenceChecks
{
    /// <summary>Each of the first <paramref name="T"/> tokens is a row of a table of <paramref name="vocab"/>.</summary>
    public static void Tokens(ReadOnlySpan<int> tokens, int T, long vocab)
    {
        if (tokens.Length < T)
            throw new ArgumentException($"{tokens.Length} tokens were given for a sequence of {T}.", nameof(tokens));
        for (int t = 0; t < T; t++)
            if (tokens[t] < 0 || tokens[t] >= vocab)
                throw new ArgumentException($"Token {tokens[t]} at position {t} is outside the vocabulary (0 to {vocab - 1}).");
    }

    /// <summary>Each of the first <paramref name="T"/> labels is a token of <paramref name="vocab"/> or −1 (none); returns how many rows have one.</summary>
    public static int Labels(ReadOnlySpan<int> targets, int T, long vocab)
    {
        if (targets.Length < T)
            throw new ArgumentException($"{targets.Length} targets were given for a sequence of {T}.", nameof(targets));
        int labelled = 0;
        for (int t = 0; t < T; t++)
        {
            if (targets[t] < -1 || targets[t] >= vocab)
                throw new ArgumentException($"Target {targets[t]} at position {t} is neither a token of the vocabulary (0 to {vocab - 1}) nor -1.");
            if (targets[t] >= 0)
                labelled++;
        }
        return labelled;
    }
}
