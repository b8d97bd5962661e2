using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Runtime.Distributed;

/// <summary>
/// One rank's share of a data-parallel run's stream. A step of R ranks with G sequences each reads
/// the R·G sequences one process with <c>--grad-accum R·G</c> would read, in the same seeded order:
/// rank r trains on sequences r·G to r·G + G − 1 of each step and passes over the others. Every rank
/// reads the whole stream, so at a step's end all stand at the same <see cref="Position"/> (the one
/// rank 0's checkpoint stores).
/// </summary>
/// <remarks>
/// The sequences after this rank's are passed over at the start of the next call (or of
/// <see cref="Position"/>), not right after its last one: the stream may reuse its buffers, and the
/// sequence just handed out must stay valid while the step trains on it.
/// </remarks>
public sealed class RankShare : ITrainingData
{
    private readonly ITrainingData _stream;
    private readonly int _rank, _ranks, _perRank;
    private int _taken; // this rank's sequences handed out in the current step, 0 to _perRank

    public RankShare(ITrainingData stream, int rank, int ranks, int perRank)
    {
        ArgumentNullException.ThrowIfNull(stream);
        if (ranks < 1 || rank < 0 || rank >= ranks)
            throw new ArgumentOutOfRangeException(nameof(rank), rank, $"a rank of {ranks} ranks is 0 to {ranks - 1}.");
        ArgumentOutOfRangeException.ThrowIfLessThan(perRank, 1);
        (_stream, _rank, _ranks, _perRank) = (stream, rank, ranks, perRank);
    }

    public string Description => _ranks == 1 ? _stream.Description : $"{_stream.Description}, share {_rank + 1} of {_ranks}";

    public (ReadOnlyMemory<int> Tokens, ReadOnlyMemory<int> Targets) Next()
    {
        FinishStep();
        if (_taken == 0)
            Skip(_rank * _perRank);
        _taken++;
        return _stream.Next();
    }

    /// <summary>The stream's position at the step boundary (the same on every rank); read between steps.</summary>
    public string Position
    {
        get
        {
            FinishStep();
            if (_taken != 0)
                throw new InvalidOperationException($"the position of a rank's share is read between steps, not after {_taken} of its {_perRank} sequences.");
            return _stream.Position;
        }
        set
        {
            _stream.Position = value;
            _taken = 0;
        }
    }

    /// <summary>After this rank's last sequence of a step: passes over the later ranks' sequences.</summary>
    private void FinishStep()
    {
        if (_taken < _perRank)
            return;
        Skip((_ranks - 1 - _rank) * _perRank);
        _taken = 0;
    }

    private void Skip(int sequences)
    {
        for (int i = 0; i < sequences; i++)
            _stream.Next();
    }
}
