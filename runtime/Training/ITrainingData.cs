namespace LoraCompiler.Runtime.Training;

/// <summary>A stream of training sequences that can say where it is and go back there (resume).</summary>
public interface ITrainingData
{
    /// <summary>What the data is, for the progress output.</summary>
    string Description { get; }

    /// <summary>
    /// The next sequence: tokens, and per row the token it must predict or −1 (not in the loss). The
    /// memory may be the stream's own, reused by the next call (a step allocates nothing for its data).
    /// </summary>
    (ReadOnlyMemory<int> Tokens, ReadOnlyMemory<int> Targets) Next();

    /// <summary>The position in the stream, as a string a checkpoint stores.</summary>
    string Position { get; set; }
}

/// <summary>
/// A flat token stream cut into consecutive windows of <c>sequence</c> tokens, wrapping at the end.
/// For a text file (its UTF-8 bytes as tokens) or a JSON array of token ids.
/// </summary>
public sealed class TokenWindows : ITrainingData
{
    private readonly int[] _tokens;
    private readonly int _sequence;
    private int _offset;

    public TokenWindows(int[] tokens, int sequence, string description)
    {
        if (tokens.Length < sequence + 1)
            throw new ArgumentException($"{description} holds {tokens.Length} tokens, fewer than one sequence of {sequence} plus its next token.");
        (_tokens, _sequence, Description) = (tokens, sequence, description);
    }

    public string Description { get; }

    public (ReadOnlyMemory<int> Tokens, ReadOnlyMemory<int> Targets) Next()
    {
        if (_offset + _sequence + 1 > _tokens.Length)
            _offset = 0;
        var window = (_tokens.AsMemory(_offset, _sequence), _tokens.AsMemory(_offset + 1, _sequence));
        _offset += _sequence;
        return window;
    }

    public string Position
    {
        get => _offset.ToString(System.Globalization.CultureInfo.InvariantCulture);
        set => _offset = int.TryParse(value, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int offset)
                         && offset <= _tokens.Length
            ? offset
            : throw new ArgumentException($"'{value}' is not a token offset in {Description} (0 to {_tokens.Length}).");
    }
}
