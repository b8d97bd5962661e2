namespace LoraCompiler.Runtime.Training;

/// <summary>
/// The processes of a run that trains one adapter together (<see cref="TrainingRun.Reducer"/>): in
/// data-parallel training each sums its sequences' LoRA gradients into a layer's buffer and hands it
/// over as soon as that layer's backward ends (<see cref="StartLayer"/>); the sum over every process
/// arrives while the backward of the layers below goes on, and every process steps its optimizer
/// with the same sums. Federated averaging uses <see cref="Sum(Span{float})"/> on the adapters.
/// The MPI implementation is <c>LoraCompiler.Runtime.Distributed.MpiGradientReducer</c>.
/// </summary>
/// <remarks>
/// Every process must make the same calls in the same order. A process that cannot reach the others
/// throws (it never hangs). The calls of a steady-state step allocate nothing.
/// </remarks>
public interface IGradientReducer
{
    /// <summary>This process's rank: 0 writes the run's files, the others only train.</summary>
    int Rank { get; }

    /// <summary>The number of processes.</summary>
    int Ranks { get; }

    /// <summary>
    /// The buffer of one layer's gradients: every module of <see cref="TrainerBase.LayerModules"/> in
    /// order, its dA then its dB (<paramref name="length"/> floats in all); the same memory every step.
    /// </summary>
    Span<float> LayerBuffer(int layer, int length);

    /// <summary>The layer's buffer holds this process's sum: starts adding the other processes' into it (it may return before they arrive).</summary>
    void StartLayer(int layer);

    /// <summary>Returns once every layer started since the last call holds the sum over all processes.</summary>
    void WaitLayers();

    /// <summary>Sums each value over the processes, in place (a step's loss and tokens, a stop request).</summary>
    void Sum(Span<double> values);

    /// <summary>Sums each value over the processes, in place (federated averaging's weighted adapters).</summary>
    void Sum(Span<float> values);
}
