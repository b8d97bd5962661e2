using System.Globalization;
using System.Numerics.Tensors;
using Tensor = LoraCompiler.Runtime.Backends.Tensor;

namespace LoraCompiler.Runtime.Training;

/// <summary>
/// Training across processes (<see cref="Reducer"/>): data-parallel steps whose LoRA gradients are
/// summed over the processes layer by layer, or federated averaging of the adapters every
/// <see cref="TrainingOptions.FederatedLocalSteps"/> steps. Without a reducer none of this runs and
/// the single-process step is untouched.
/// </summary>
public sealed partial class TrainingRun
{
    private readonly IGradientReducer? _reducer;

    /// <summary>
    /// The processes this run trains with (null: this one alone); every process makes a run of the
    /// same options with the same data. Data parallel (<see cref="TrainingOptions.FederatedLocalSteps"/> 0):
    /// the data is each process's <c>RankShare</c> of the stream and a step takes
    /// <see cref="TrainingOptions.GradientAccumulation"/> sequences on each, summed over all, so a run
    /// of R processes equals one process with R times the accumulation. Federated: each process
    /// trains on its own data and the adapters are averaged, weighted by tokens, after every round.
    /// Rank 0 alone writes metrics, checkpoints and the adapter; the others write nothing.
    /// </summary>
    public IGradientReducer? Reducer
    {
        get => _reducer;
        init
        {
            _reducer = value;
            _addToLayer = AddToLayer;
        }
    }

    /// <summary>Whether this process writes the run's files: alone, or rank 0.</summary>
    private bool Writes => _reducer is null || _reducer.Rank == 0;

    private bool DataParallel => _reducer is not null && _options.FederatedLocalSteps == 0;

    /// <summary>The processes agree with the options (one for a run without a reducer).</summary>
    private void CheckProcesses()
    {
        int processes = _reducer?.Ranks ?? 1;
        if (processes != _options.Processes)
            throw new ArgumentException($"The run's options are for {_options.Processes} process{(_options.Processes == 1 ? "" : "es")} but it runs on {processes}" +
                                        (_options.Processes > 1 ? $"; launch it with mpirun -np {_options.Processes}." : "."));
        if (_options.FederatedLocalSteps > 0 && _reducer is null)
            throw new ArgumentException("Federated averaging needs the processes to average with (a reducer).");
    }

    // ----- data parallel -----

    private readonly TrainerBase.GradientVisitor? _addToLayer;
    private readonly double[] _stepSums = new double[2];
    private bool _firstSequence;
    private int _layer, _offset; // the layer being added or updated, and the place in its buffer

    /// <summary>
    /// One data-parallel step: this process's sequences (its share of the step), each layer's
    /// gradients summed into its buffer and handed to the reducer as the backward finishes the layer,
    /// then, once every sum is in, the same update on every process. Every check that stops a run is
    /// made on the sums (the loss, the gradients), so every process stops at the same step.
    /// </summary>
    private float DataParallelStep(int step, float lr, ref long tokens)
    {
        var reducer = _reducer!;
        int micro = _options.GradientAccumulation;
        (_step, _learningRate, _gradientScale) = (step, lr, 1f / (micro * reducer.Ranks));
        _optimizer.BeginStep();
        double loss = 0;
        long ownTokens = 0;
        for (int i = 0; i < micro; i++)
        {
            var (x, y) = _data.Next();
            (_firstSequence, _lastSequence) = (i == 0, i == micro - 1);
            loss += _trainer.ForwardBackward(x.Span, y.Span, step - 1);
            ownTokens += x.Length;
        }
        reducer.WaitLayers();
        (_stepSums[0], _stepSums[1]) = (loss, ownTokens);
        reducer.Sum(_stepSums);
        tokens += (long)_stepSums[1];
        float mean = (float)(_stepSums[0] / (micro * reducer.Ranks));
        if (!float.IsFinite(mean))
            throw new TrainingDivergedException(step, $"the loss is {mean.ToString(CultureInfo.InvariantCulture)}");
        for (int layer = 0; layer < _trainer.Model.Layers; layer++)
        {
            // The summed gradients go back into the trainer's gradient buffers (free now: the
            // backward is done) and the update runs there, as in a step of one process.
            var buffer = reducer.LayerBuffer(layer, LayerLength(layer));
            var modules = _trainer.LayerModules(layer);
            int offset = 0;
            for (int i = 0; i < modules.Count; i++)
            {
                var m = modules[i];
                int check = 4 * ModuleIndex(m);
                ApplySum(m.Spec.AName, m.A, m.DA, buffer.Slice(offset, (int)m.A.Length), check);
                offset += (int)m.A.Length;
                ApplySum(m.Spec.BName, m.B, m.DB, buffer.Slice(offset, (int)m.B.Length), check + 2);
                offset += (int)m.B.Length;
            }
        }
        ThrowIfNotFinite(step);
        return mean;
    }

    /// <summary>A layer's gradients are final: added to its buffer; after this process's last sequence of the step, handed to the reducer.</summary>
    private void DataParallelLayerReady(LayerGradients layer)
    {
        var buffer = _reducer!.LayerBuffer(layer.Layer, LayerLength(layer.Layer));
        if (_firstSequence)
            buffer.Clear();
        // A layer LCSB skipped has zero gradients on every process (the schedule follows the step):
        // nothing to add and nothing to send.
        if (layer.Skipped)
            return;
        (_layer, _offset) = (layer.Layer, 0);
        _trainer.VisitGradients(layer, _addToLayer!);
        if (_lastSequence)
            _reducer.StartLayer(layer.Layer);
    }

    private void AddToLayer(LoraModuleSpec spec, ReadOnlySpan<float> da, ReadOnlySpan<float> db)
    {
        var buffer = _reducer!.LayerBuffer(_layer, LayerLength(_layer));
        Span<float> sumA = buffer.Slice(_offset, da.Length), sumB = buffer.Slice(_offset + da.Length, db.Length);
        TensorPrimitives.Add(sumA, da, sumA);
        TensorPrimitives.Add(sumB, db, sumB);
        _offset += da.Length + db.Length;
    }

    private void ApplySum(string name, Tensor parameter, Tensor gradient, ReadOnlySpan<float> sum, int check)
    {
        _trainer.Backend.Write(gradient, sum);
        Apply(name, parameter, gradient, check, zeroGradient: false);
    }

    private int[]? _layerLengths;

    /// <summary>Floats in a layer's buffer: every module's A and B.</summary>
    private int LayerLength(int layer)
    {
        _layerLengths ??= Enumerable.Range(0, _trainer.Model.Layers)
            .Select(l => _trainer.LayerModules(l).Sum(m => checked((int)(m.A.Length + m.B.Length)))).ToArray();
        return _layerLengths[layer];
    }

    // ----- stopping together -----

    private readonly double[] _stopVote = new double[1];

    /// <summary>
    /// Whether the run stops before <paramref name="step"/>: this process's token alone, or, across
    /// processes, any process's (so all stop after the same step). A federated run stops between
    /// rounds only, where the adapters agree.
    /// </summary>
    private bool StopRequested(CancellationToken stop, int step)
    {
        if (_reducer is null)
            return stop.IsCancellationRequested;
        if (_options.FederatedLocalSteps > 0 && (step - 1) % _options.FederatedLocalSteps != 0)
            return false;
        _stopVote[0] = stop.IsCancellationRequested ? 1 : 0;
        _reducer.Sum(_stopVote);
        return _stopVote[0] > 0;
    }

    // ----- federated averaging -----

    private long _roundStartTokens;
    private readonly double[] _roundTokens = new double[1];

    /// <summary>
    /// After the last step of a round: every process's adapter, weighted by the tokens it trained on
    /// in the round, summed over the processes (FedAvg). Only the adapters travel; each process keeps
    /// its own optimizer state.
    /// </summary>
    private void FederatedRoundEnd(int step, long runTokens)
    {
        if (_options.FederatedLocalSteps == 0 || step % _options.FederatedLocalSteps != 0)
            return;
        var reducer = _reducer!;
        long own = runTokens - _roundStartTokens;
        _roundStartTokens = runTokens;
        _roundTokens[0] = own;
        reducer.Sum(_roundTokens);
        float share = (float)(own / _roundTokens[0]);
        _trainer.DownloadAdapter();
        foreach (var module in _trainer.Adapter.Modules)
        {
            TensorPrimitives.Multiply(module.A, share, module.A);
            reducer.Sum(module.A);
            TensorPrimitives.Multiply(module.B, share, module.B);
            reducer.Sum(module.B);
            CheckFinite(step, "the averaged", module.Spec.AName, module.A);
            CheckFinite(step, "the averaged", module.Spec.BName, module.B);
        }
        _trainer.UploadAdapter();
    }
}
