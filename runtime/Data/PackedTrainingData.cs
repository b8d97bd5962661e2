using System.Text.Json;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Runtime.Data;

/// <summary>JSONL examples through a <see cref="SequencePacker"/>, as the stream a training run reads.</summary>
public sealed class PackedTrainingData : ITrainingData
{
    private readonly TrainingData _data;
    private readonly SequencePacker _packer;
    private readonly int[] _tokens, _targets; // the sequence Next hands out, reused

    /// <summary>
    /// The stream of <paramref name="packer"/> over <paramref name="data"/>'s examples. Data of which no
    /// sequence learns anything (no example with a token in the loss, or every such token past the
    /// cut) throws a <see cref="TrainingDataException"/>: a run on it could only fail later.
    /// </summary>
    public PackedTrainingData(TrainingData data, SequencePacker packer)
    {
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(packer);
        _data = data;
        _packer = packer;
        (_tokens, _targets) = (new int[packer.MaxLength], new int[packer.MaxLength]);
        Coverage = data.Coverage(packer.MaxLength, packer.Mode);
        if (Coverage.NothingToLearnProblem() is { } problem)
            throw new TrainingDataException(data.Source, null, problem);
    }

    /// <summary>What the sequences keep of the examples: the ones cut or dropped, the tokens in the loss never learned.</summary>
    public DataCoverage Coverage { get; }

    public string Description =>
        $"{_data.Source} ({_data.Examples.Count:N0} examples, {_data.TokenCount:N0} tokens, " +
        (Coverage.LostLossTokens > 0
            ? $"{Coverage.LearnedLossTokens:N0} of their {Coverage.LossTokens:N0} in the loss within reach"
            : $"{Coverage.LossTokens:N0} in the loss") +
        (Coverage.Dropped + Coverage.Cut > 0 ? $" ({Coverage.Dropped:N0} examples dropped, {Coverage.Cut:N0} cut)" : "") +
        $", {_packer.Mode} into {_packer.MaxLength})";

    public (ReadOnlyMemory<int> Tokens, ReadOnlyMemory<int> Targets) Next()
    {
        int length = _packer.Next(_tokens, _targets);
        return (_tokens.AsMemory(0, length), _targets.AsMemory(0, length));
    }

    public string Position
    {
        get => JsonSerializer.Serialize(_packer.Position);
        set => _packer.Seek(JsonSerializer.Deserialize<DataPosition>(value));
    }

    /// <summary>Sequences in one epoch, for <c>--epochs</c>.</summary>
    public int SequencesPerEpoch => _packer.CountSequences(0);
}
