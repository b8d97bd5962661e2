using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Runtime.Distributed;

/// <summary>
/// <see cref="IGradientReducer"/> over Open MPI: one pinned buffer per layer, summed in place with
/// MPI_Iallreduce as soon as the layer is handed over; each later layer's hand-over polls the earlier
/// ones (Open MPI progresses a non-blocking collective inside MPI calls), so the transfer of layer l
/// overlaps the backward of layer l − 1. <see cref="WaitLayers"/> waits, with the world's deadline.
/// </summary>
public sealed unsafe class MpiGradientReducer : IGradientReducer
{
    private readonly MpiWorld _world;
    private readonly float[]?[] _buffers;
    private readonly nint[] _requests;
    private readonly int[] _started;
    private int _startedCount;

    /// <param name="layers">The trainer's layer count (<c>trainer.Model.Layers</c>).</param>
    public MpiGradientReducer(MpiWorld world, int layers)
    {
        _world = world;
        _buffers = new float[]?[layers];
        _requests = new nint[layers];
        _started = new int[layers];
    }

    public int Rank => _world.Rank;
    public int Ranks => _world.Size;

    /// <summary>Bytes of gradients this rank handed to the all-reduce, over the whole run.</summary>
    public long BytesReduced { get; private set; }

    /// <summary>Steps whose gradients were summed (calls of <see cref="WaitLayers"/>).</summary>
    public long Steps { get; private set; }

    /// <summary>Layers summed, over the whole run.</summary>
    public long LayersReduced { get; private set; }

    /// <summary>Seconds spent in <see cref="WaitLayers"/>: the part of the transfer the backward did not hide, plus the wait for slower ranks.</summary>
    public double GradientWaitSeconds { get; private set; }

    public Span<float> LayerBuffer(int layer, int length)
    {
        var buffer = _buffers[layer];
        if (buffer is null || buffer.Length != length)
            // Pinned: MPI reads and writes it after Iallreduce returns.
            _buffers[layer] = buffer = GC.AllocateArray<float>(length, pinned: true);
        return buffer;
    }

    public void StartLayer(int layer)
    {
        var buffer = _buffers[layer] ?? throw new InvalidOperationException($"layer {layer} has no buffer: call LayerBuffer first.");
        if (_requests[layer] != 0)
            throw new InvalidOperationException($"layer {layer} is already being summed.");
        // Poll the layers already in flight: this is where their transfer makes progress.
        for (int i = 0; i < _startedCount; i++)
            _world.Test(ref _requests[_started[i]]);
        if (buffer.Length == 0)
            return;
        fixed (float* p = buffer)
            _requests[layer] = _world.StartSum(p, buffer.Length);
        _started[_startedCount++] = layer;
        BytesReduced += (long)buffer.Length * sizeof(float);
        LayersReduced++;
    }

    public void WaitLayers()
    {
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        for (int i = 0; i < _startedCount; i++)
            _world.Wait(ref _requests[_started[i]], "summing the step's gradients");
        _startedCount = 0;
        Steps++;
        GradientWaitSeconds += System.Diagnostics.Stopwatch.GetElapsedTime(start).TotalSeconds;
    }

    public void Sum(Span<double> values) => _world.Sum(values, "summing the step's loss and tokens");

    public void Sum(Span<float> values) => _world.Sum(values, "averaging the adapters");
}
