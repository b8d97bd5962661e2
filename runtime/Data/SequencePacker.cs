namespace LoraCompiler.Runtime.Data;

/// <summary>How examples become training sequences of at most the maximum length.</summary>
public enum PackingMode
{
    /// <summary>One example per sequence, cut to the maximum length.</summary>
    Truncate,

    /// <summary>
    /// Whole examples one after another in a sequence while the next still fits (an example longer
    /// than the maximum is cut and goes alone). Sequences vary in length and no example is split.
    /// </summary>
    Pack,

    /// <summary>
    /// All examples as one stream cut into sequences of exactly the maximum length (the last of an
    /// epoch may be shorter); an example can continue into the next sequence.
    /// </summary>
    Concatenate,
}

/// <summary>
/// Where a <see cref="SequencePacker"/> is in the data: the epoch, the index of the next example in
/// that epoch's order, and the token in that example to continue from (nonzero only in
/// <see cref="PackingMode.Concatenate"/>). A checkpoint saves it; <see cref="SequencePacker.Seek"/>
/// restores it.
/// </summary>
public readonly record struct DataPosition(int Epoch, int Example, int Offset);

/// <summary>One training sequence, where it began in the data, and the examples it holds (indices into the data).</summary>
public sealed record TrainingSequence(int[] Tokens, int[] Targets, DataPosition Start, int[] Examples);

/// <summary>
/// Cuts or packs examples into sequences for training, epoch after epoch, each epoch in its own
/// order: a shuffle of the examples drawn from the seed and the epoch number alone, so the stream
/// of sequences is the same on every run and machine, and <see cref="Seek"/> to a saved
/// <see cref="Position"/> continues it exactly where it was.
/// </summary>
/// <remarks>
/// Examples packed into one sequence are separated only by their targets: an example's last
/// position predicts nothing (−1), so no loss crosses from one example into the next, but attention
/// is causal over the whole sequence, as in Hugging Face's packing. A sequence with no position in
/// the loss (a conversation whose assistant turn lies past the cut) is skipped. A cut keeps the
/// target of the last position before it: the first token past the cut, which is the true next token.
/// </remarks>
public sealed class SequencePacker
{
    private readonly IReadOnlyList<TrainingExample> _examples;
    private int[] _order;
    private int _orderEpoch;

    public SequencePacker(IReadOnlyList<TrainingExample> examples, int maxLength, PackingMode mode = PackingMode.Pack,
        int seed = 0, bool shuffle = true)
    {
        ArgumentNullException.ThrowIfNull(examples);
        if (examples.Count == 0)
            throw new ArgumentException("There are no examples to pack.", nameof(examples));
        ArgumentOutOfRangeException.ThrowIfLessThan(maxLength, 2);
        foreach (var e in examples)
            if (e.Tokens.Length != e.Targets.Length)
                throw new ArgumentException($"The example of line {e.Line} has {e.Tokens.Length} tokens but {e.Targets.Length} targets.", nameof(examples));
        _examples = examples;
        MaxLength = maxLength;
        Mode = mode;
        Seed = seed;
        Shuffle = shuffle;
        _orderEpoch = 0;
        _order = Order(0);
    }

    public int MaxLength { get; }
    public PackingMode Mode { get; }
    public int Seed { get; }
    public bool Shuffle { get; }

    /// <summary>Where the next sequence begins.</summary>
    public DataPosition Position { get; private set; }

    /// <summary>Continues from a position that <see cref="Position"/> gave, on the same examples and settings.</summary>
    public void Seek(DataPosition position)
    {
        if (position.Epoch < 0 || position.Example < 0 || position.Example > _examples.Count || position.Offset < 0)
            throw new ArgumentOutOfRangeException(nameof(position), position, $"Not a position in {_examples.Count} examples.");
        if (position.Offset > 0 && (Mode != PackingMode.Concatenate || position.Example == _examples.Count
                                    || position.Offset >= ExampleAt(position.Epoch, position.Example).Length))
            throw new ArgumentOutOfRangeException(nameof(position), position, "The offset is not inside an example that a sequence can start in.");
        Position = Normalize(position);
    }

    /// <summary>
    /// The order in which an epoch visits the examples: a Fisher-Yates shuffle driven by SplitMix64
    /// seeded from (seed, epoch), or the file's order without shuffling.
    /// </summary>
    public int[] Order(int epoch)
    {
        var order = new int[_examples.Count];
        for (int i = 0; i < order.Length; i++)
            order[i] = i;
        if (!Shuffle)
            return order;
        ulong state = Mix(((ulong)(uint)Seed << 32) | (uint)epoch);
        for (int i = order.Length - 1; i > 0; i--)
        {
            state += 0x9E3779B97F4A7C15UL;
            int j = (int)(((UInt128)Mix(state) * (ulong)(i + 1)) >> 64);
            (order[i], order[j]) = (order[j], order[i]);
        }
        return order;
    }

    /// <summary>The next sequence, going on into the next epoch at the end of one.</summary>
    public TrainingSequence Next()
    {
        var start = Advance();
        int length = Length(_parts);
        var (tokens, targets) = (new int[length], new int[length]);
        Copy(_parts, tokens, targets);
        return new TrainingSequence(tokens, targets, start, _parts.Select(p => p.Example).Distinct().ToArray());
    }

    /// <summary>
    /// As <see cref="Next()"/>, into the caller's buffers (at least <see cref="MaxLength"/> long); returns
    /// the sequence's length. Allocates nothing: a training step reads its sequence this way.
    /// </summary>
    public int Next(Span<int> tokens, Span<int> targets)
    {
        Advance();
        int length = Length(_parts);
        Copy(_parts, tokens[..length], targets[..length]);
        return length;
    }

    private readonly List<Part> _parts = [];

    /// <summary>Plans the next sequence that has a position in the loss into <see cref="_parts"/>, moves past it, and returns where it starts.</summary>
    private DataPosition Advance()
    {
        int emptyRun = 0;
        while (true)
        {
            var start = Position;
            Position = Plan(start, _parts);
            foreach (var part in _parts)
                if (HasLoss(part))
                    return start;
            // Skipped: nothing in it is learned. Give up after a whole epoch of such sequences.
            emptyRun += _parts.Count;
            if (emptyRun > _examples.Count)
                throw new InvalidOperationException(
                    $"No sequence of {MaxLength} tokens has a position in the loss: every example's learned tokens lie past the cut.");
        }
    }

    /// <summary>The next <paramref name="count"/> sequences.</summary>
    public IReadOnlyList<TrainingSequence> Next(int count)
    {
        var batch = new TrainingSequence[count];
        for (int i = 0; i < count; i++)
            batch[i] = Next();
        return batch;
    }

    /// <summary>How many sequences an epoch yields (skipped ones not counted), without moving <see cref="Position"/>.</summary>
    public int CountSequences(int epoch)
    {
        var position = new DataPosition(epoch, 0, 0);
        var parts = new List<Part>();
        int count = 0;
        while (position.Epoch == epoch)
        {
            position = Plan(position, parts);
            if (parts.Any(HasLoss))
                count++;
        }
        return count;
    }

    /// <summary>A piece of an example: which one (index into the data), from which token, how many.</summary>
    private readonly record struct Part(int Example, int Start, int Length);

    /// <summary>Fills <paramref name="parts"/> with the parts of the sequence that starts at a position; returns the position after it.</summary>
    private DataPosition Plan(DataPosition position, List<Part> parts)
    {
        parts.Clear();
        int epoch = position.Epoch;
        int index = position.Example;
        int n = _examples.Count;
        switch (Mode)
        {
            case PackingMode.Truncate:
            {
                int example = OrderOf(epoch)[index];
                parts.Add(new Part(example, 0, Math.Min(_examples[example].Length, MaxLength)));
                index++;
                break;
            }
            case PackingMode.Pack:
            {
                int used = 0;
                while (index < n)
                {
                    int example = OrderOf(epoch)[index];
                    int length = _examples[example].Length;
                    if (used == 0 && length >= MaxLength)
                    {
                        parts.Add(new Part(example, 0, MaxLength));
                        index++;
                        break;
                    }
                    if (used + length > MaxLength)
                        break;
                    parts.Add(new Part(example, 0, length));
                    used += length;
                    index++;
                }
                break;
            }
            case PackingMode.Concatenate:
            {
                int used = 0;
                int offset = position.Offset;
                while (index < n && used < MaxLength)
                {
                    int example = OrderOf(epoch)[index];
                    int take = Math.Min(_examples[example].Length - offset, MaxLength - used);
                    if (take > 0)
                        parts.Add(new Part(example, offset, take));
                    used += take;
                    offset += take;
                    if (offset >= _examples[example].Length)
                    {
                        index++;
                        offset = 0;
                    }
                }
                return Normalize(new DataPosition(epoch, index, offset));
            }
        }
        return Normalize(new DataPosition(epoch, index, 0));
    }

    private static int Length(List<Part> parts)
    {
        int length = 0;
        foreach (var part in parts)
            length += part.Length;
        return length;
    }

    private void Copy(List<Part> parts, Span<int> tokens, Span<int> targets)
    {
        int at = 0;
        foreach (var part in parts)
        {
            var example = _examples[part.Example];
            example.Tokens.AsSpan(part.Start, part.Length).CopyTo(tokens[at..]);
            example.Targets.AsSpan(part.Start, part.Length).CopyTo(targets[at..]);
            at += part.Length;
        }
    }

    private bool HasLoss(Part part) => _examples[part.Example].Targets.AsSpan(part.Start, part.Length).ContainsAnyExcept(-1);

    /// <summary>The end of an epoch is the start of the next.</summary>
    private DataPosition Normalize(DataPosition position) =>
        position.Example >= _examples.Count ? new DataPosition(position.Epoch + 1, 0, 0) : position;

    private TrainingExample ExampleAt(int epoch, int index) => _examples[OrderOf(epoch)[index]];

    private int[] OrderOf(int epoch)
    {
        if (_orderEpoch != epoch)
        {
            _order = Order(epoch);
            _orderEpoch = epoch;
        }
        return _order;
    }

    /// <summary>SplitMix64's output function.</summary>
    private static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
