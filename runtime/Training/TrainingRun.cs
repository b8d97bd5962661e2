using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.IO;

namespace LoraCompiler.Runtime.Training;

/// <summary>How a run trains: everything that decides the adapter it ends with.</summary>
public sealed record TrainingOptions
{
    public int Steps { get; init; } = 100;
    public float LearningRate { get; init; } = 1e-3f;
    /// <summary>"constant", or "cosine": linear warmup, then a cosine decay to zero at the last step.</summary>
    public string Schedule { get; init; } = "constant";
    public int WarmupSteps { get; init; }
    /// <summary>Sequences whose gradients are summed (and averaged) into one optimizer step.</summary>
    public int GradientAccumulation { get; init; } = 1;
    public int Seed { get; init; }
    /// <summary>"adamw" or "sgd".</summary>
    public string Optimizer { get; init; } = "adamw";
    public float WeightDecay { get; init; }
    /// <summary>"backprop" (exact gradients, with the LCSB schedule) or "mezo" (zeroth order).</summary>
    public string Method { get; init; } = "backprop";
    /// <summary>LCSB groups; null keeps the model JSON's.</summary>
    public int? LcsbGroups { get; init; }
    public float MezoEpsilon { get; init; } = 1e-3f;
    /// <summary>Write a checkpoint every this many steps (0: only at the end).</summary>
    public int SaveEvery { get; init; }
    /// <summary>The adapter's <c>base_model_name_or_path</c>: the base model's id; null writes the model JSON's name.</summary>
    public string? BaseModel { get; init; }
    /// <summary>Processes training together (<see cref="TrainingRun.Reducer"/>); a step takes GradientAccumulation sequences on each.</summary>
    public int Processes { get; init; } = 1;
    /// <summary>Federated averaging: the adapters of the processes are averaged every this many steps (a round); 0 for data-parallel steps.</summary>
    public int FederatedLocalSteps { get; init; }

    public float LearningRateAt(int step)
    {
        if (Schedule == "constant")
            return step <= WarmupSteps ? LearningRate * step / Math.Max(1, WarmupSteps) : LearningRate;
        if (step <= WarmupSteps)
            return LearningRate * step / Math.Max(1, WarmupSteps);
        double progress = (double)(step - WarmupSteps) / Math.Max(1, Steps - WarmupSteps);
        return (float)(LearningRate * 0.5 * (1 + Math.Cos(Math.PI * progress)));
    }

    public void Validate()
    {
        if (Steps < 1) throw new ArgumentException("Steps must be at least 1.");
        if (GradientAccumulation < 1) throw new ArgumentException("Gradient accumulation must be at least 1.");
        if (!float.IsFinite(LearningRate) || LearningRate < 0) throw new ArgumentException($"The learning rate must be a finite number of at least 0, not {LearningRate}.");
        if (!float.IsFinite(WeightDecay) || WeightDecay < 0) throw new ArgumentException($"Weight decay must be a finite number of at least 0, not {WeightDecay}.");
        if (!float.IsFinite(MezoEpsilon) || MezoEpsilon <= 0) throw new ArgumentException($"MeZO's epsilon must be a finite number above 0, not {MezoEpsilon}.");
        if (SaveEvery < 0) throw new ArgumentException($"The save interval must be at least 0 steps, not {SaveEvery}.");
        if (LcsbGroups is < 1) throw new ArgumentException($"LCSB groups must be at least 1, not {LcsbGroups}.");
        if (Schedule is not ("constant" or "cosine")) throw new ArgumentException($"Unknown schedule '{Schedule}' (available: constant, cosine).");
        if (Method is not ("backprop" or "mezo")) throw new ArgumentException($"Unknown method '{Method}' (available: backprop, mezo).");
        if (Optimizer is not ("adamw" or "sgd")) throw new ArgumentException($"Unknown optimizer '{Optimizer}' (available: adamw, sgd).");
        if (WarmupSteps < 0 || WarmupSteps >= Steps && Schedule == "cosine") throw new ArgumentException("Warmup must be shorter than the run.");
        if (Processes < 1) throw new ArgumentException($"A run takes at least 1 process, not {Processes}.");
        if (Processes > 1 && Method == "mezo") throw new ArgumentException("MeZO runs in one process: train across processes with backprop.");
        if (FederatedLocalSteps < 0) throw new ArgumentException($"Federated local steps must be at least 0, not {FederatedLocalSteps}.");
        if (FederatedLocalSteps > 0 && (Steps % FederatedLocalSteps != 0 || SaveEvery % FederatedLocalSteps != 0))
            throw new ArgumentException($"A federated run's steps ({Steps}) and save interval ({SaveEvery}) are whole rounds of {FederatedLocalSteps} local steps.");
    }

    /// <summary>The names of the properties whose values differ between two options (empty when they agree).</summary>
    public IReadOnlyList<string> Differences(TrainingOptions other) =>
        typeof(TrainingOptions).GetProperties()
            .Where(p => p.GetIndexParameters().Length == 0 && !Equals(p.GetValue(this), p.GetValue(other)))
            .Select(p => p.Name).ToList();
}

/// <summary>
/// A run that cannot go on: a damaged checkpoint, or (<see cref="TrainingDivergedException"/>) a loss
/// or gradient that is no longer a finite number. The message starts with the file or the step.
/// </summary>
public class TrainingRunException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// A non-finite loss, gradient or parameter at <see cref="Step"/>. Nothing of that step is saved: the
/// checkpoint on disk is the last one written before it, and metrics.csv holds the steps before it.
/// </summary>
public sealed class TrainingDivergedException(int step, string detail)
    : TrainingRunException($"step {step}: {detail}")
{
    public int Step { get; } = step;
}

/// <summary>What a run's checkpoint says about the run, read before anything is loaded (<see cref="TrainingRun.ReadCheckpoint"/>).</summary>
/// <param name="Directory">The checkpoint folder.</param>
/// <param name="Step">The last step it holds.</param>
/// <param name="Options">The run's options; null in a checkpoint written before they were stored.</param>
/// <param name="Settings">What the caller stored with it (<see cref="TrainingRun.Settings"/>: the command line's options); null if none.</param>
public sealed record CheckpointInfo(string Directory, int Step, int Steps, TrainingOptions? Options, IReadOnlyDictionary<string, string>? Settings);

/// <summary>One line of metrics.csv; <see cref="ValidationLoss"/> is null at a step without validation (a struct: a step allocates nothing).</summary>
public readonly record struct StepMetrics(int Step, float Loss, float LearningRate, double TokensPerSecond, double ElapsedSeconds, long PrivateBytes,
    float? ValidationLoss = null);

/// <summary>
/// Held-out data a run scores while it trains (<see cref="EvaluationData.Evaluate"/>, forward only):
/// every <see cref="Every"/> steps and after the last. It is read from its own start each time, so
/// the training stream, its seeded order, the checkpoints and the adapter a run ends with are the
/// same as without it.
/// </summary>
public sealed record ValidationOptions(EvaluationData Data)
{
    /// <summary>Steps between two validations; null: the save interval, else a tenth of the steps, at least 1.</summary>
    public int? Every { get; init; }

    /// <summary>How many of the data's sequences each validation scores, from the first; null: all.</summary>
    public int? Sequences { get; init; }

    /// <summary>The interval a run of these options validates at.</summary>
    public int EveryFor(TrainingOptions options) =>
        Every ?? (options.SaveEvery > 0 ? options.SaveEvery : Math.Max(1, options.Steps / 10));

    public void Validate()
    {
        if (Every is < 1) throw new ArgumentException("The validation interval must be at least 1 step.");
        if (Sequences is < 1) throw new ArgumentException("Validation must score at least 1 sequence.");
    }
}

/// <summary>
/// A fine-tuning run: steps of the generated trainer with an optimizer applied layer by layer as
/// gradients arrive (or MeZO), checkpoints written atomically, and resume from the last one.
/// The output folder holds the final adapter (PEFT format), metrics.csv (a row per step, flushed as
/// the run goes), loss.svg and <c>checkpoint/</c> (adapter, optimizer state, step, data position and
/// the run's options). With <see cref="ValidationOptions"/> the run also scores held-out data now and
/// then (metrics.csv's <c>val_loss</c>, a second curve in loss.svg).
/// </summary>
/// <remarks>
/// Nothing non-finite is saved: each step's loss, every gradient as its layer's become final and every
/// parameter after its update are checked (one vectorized pass each), and the first NaN or infinity
/// stops the run with a <see cref="TrainingDivergedException"/> before that step is checkpointed.
/// <see cref="Run"/> with a cancelled token ends after the running step with a checkpoint of it.
/// </remarks>
public sealed partial class TrainingRun
{
    public const string CheckpointFolder = "checkpoint";
    public const string MetricsFile = "metrics.csv";
    private const string StateFile = "state.json";
    private const string OptimizerFile = "optimizer.safetensors";

    private readonly TrainerBase _trainer;
    private readonly ITrainingData _data;
    private readonly TrainingOptions _options;
    private readonly string _outDir;
    private readonly Optimizer _optimizer;
    private readonly ValidationOptions? _validation;
    private readonly List<StepMetrics> _metrics;

    /// <param name="validation">Held-out data to score during the run (the <c>val_loss</c> column), or null.</param>
    public TrainingRun(TrainerBase trainer, ITrainingData data, TrainingOptions options, string outDir,
        ValidationOptions? validation = null)
    {
        options.Validate();
        validation?.Validate();
        (_trainer, _data, _options, _outDir, _validation) = (trainer, data, options, outDir, validation);
        _metrics = new(Math.Min(options.Steps, 1 << 16)); // a row a step, without growing as the run goes
        _optimizer = Optimizer.Create(options.Optimizer, options.WeightDecay, trainer.Backend,
            trainer.OptimizerStateInFile ? InFile : null);
        trainer.CaptureGradients = false; // each layer's gradients are consumed as they arrive
        _layerReady = LayerReady;
        if (options.LcsbGroups is int groups)
            trainer.LcsbGroups = groups;
    }

    /// <summary>
    /// trainer.optimizer_state = "mmap": optimizer state in memory-mapped files in the trainer's
    /// temporary folder, where the backend keeps tensors in host memory (device memory on a GPU).
    /// </summary>
    private Tensor InFile(string name, long length) =>
        _trainer.Backend.AllocateInFile(name, length, () => new MappedBuffer(_trainer.TemporaryFolder, name, length));

    /// <summary>The step the run continues from (0 for a new run).</summary>
    public int StartStep { get; private set; }

    /// <summary>The step of the newest checkpoint on disk (the one resumed from, or written since); null if none.</summary>
    public int? LastCheckpointStep { get; private set; }

    /// <summary>
    /// Stored in every checkpoint beside the options and handed back by <see cref="ReadCheckpoint"/>:
    /// what else the caller needs to continue the run (the command line keeps its options there).
    /// </summary>
    public IReadOnlyDictionary<string, string>? Settings { get; set; }

    public IReadOnlyList<StepMetrics> Metrics => _metrics;

    /// <summary>Called after every step.</summary>
    public event Action<StepMetrics>? StepCompleted;

    /// <summary>
    /// What the checkpoint in <paramref name="runDir"/> says about its run, without loading it; null
    /// when the folder holds none. A damaged state.json is a <see cref="TrainingRunException"/> naming it.
    /// </summary>
    public static CheckpointInfo? ReadCheckpoint(string runDir)
    {
        string? dir = CheckpointIn(runDir);
        if (dir is null)
            return null;
        var state = ReadState(dir);
        return new CheckpointInfo(dir, state.Step, state.Steps, state.Options, state.Settings);
    }

    /// <summary>
    /// Continues from the checkpoint in <paramref name="runDir"/>; false when it has none. Options that
    /// differ from the checkpoint's are an <see cref="ArgumentException"/> naming them.
    /// </summary>
    public bool Resume(string runDir)
    {
        string? dir = CheckpointIn(runDir);
        if (dir is null)
            return false;
        string statePath = Path.Combine(dir, StateFile);
        var state = ReadState(dir);
        if (state.Options is { } stored)
        {
            var differences = stored.Differences(_options);
            if (differences.Count > 0)
                throw new ArgumentException($"{statePath}: the checkpoint is of a run with other options: " +
                    string.Join(", ", differences.Select(d => $"{d} {Value(stored, d)}, not {Value(_options, d)}")) + "; resume with the same options.");
        }
        else if (state.Steps != _options.Steps || state.Method != _options.Method || state.Optimizer != _options.Optimizer)
            throw new ArgumentException($"{dir}: the checkpoint is of a run with {state.Steps} steps, method {state.Method}, " +
                                        $"optimizer {state.Optimizer}; resume with the same options.");
        var adapter = LoraAdapter.Load(Path.Combine(dir, "adapter"), _trainer.Model.Lora, _trainer.Model.LoraModules);
        foreach (var (target, source) in _trainer.Adapter.Modules.Zip(adapter.Modules))
        {
            source.A.CopyTo(target.A, 0);
            source.B.CopyTo(target.B, 0);
        }
        _trainer.UploadAdapter();
        if (_optimizer is not Sgd)
        {
            string optimizerPath = Path.Combine(dir, OptimizerFile);
            _optimizer.Load(optimizerPath, _trainer.LoraModules.SelectMany(m => new[] { (m.Spec.AName, m.A.Length), (m.Spec.BName, m.B.Length) })
                .ToDictionary(p => p.Item1, p => (int)p.Item2, StringComparer.Ordinal));
            if (_options.Method == "backprop" && _optimizer.Step != state.Step)
                throw new TrainingRunException($"{optimizerPath}: the optimizer state is at step {_optimizer.Step}, the checkpoint at step {state.Step}.");
        }
        try
        {
            _data.Position = state.DataPosition;
        }
        catch (Exception e) when (e is FormatException or OverflowException or ArgumentException or JsonException
                                      or KeyNotFoundException or IndexOutOfRangeException or InvalidOperationException)
        {
            throw new TrainingRunException($"{statePath}: DataPosition '{state.DataPosition}' is not a position in {_data.Description} ({e.Message})", e);
        }
        StartStep = state.Step;
        LastCheckpointStep = state.Step;
        _metrics.Clear();
        _metrics.AddRange(state.Metrics);
        return true;
    }

    private static string Value(TrainingOptions options, string property) =>
        Convert.ToString(typeof(TrainingOptions).GetProperty(property)!.GetValue(options), CultureInfo.InvariantCulture) ?? "null";

    /// <summary>Whether the run scores its validation data after a step.</summary>
    public bool ValidatesAt(int step) =>
        _validation is not null && (step % _validation.EveryFor(_options) == 0 || step == _options.Steps);

    /// <summary>
    /// Trains from <see cref="StartStep"/> to the last step and writes the adapter; true when it got
    /// there. When <paramref name="stop"/> is cancelled the running step is finished, checkpointed, and
    /// the run returns false without an adapter (resume it from the checkpoint). A non-finite loss,
    /// gradient or parameter throws <see cref="TrainingDivergedException"/> with nothing of that step saved.
    /// </summary>
    public bool Run(CancellationToken stop = default)
    {
        var watch = Stopwatch.StartNew();
        double elapsedBefore = _metrics.Count > 0 ? _metrics[^1].ElapsedSeconds : 0;
        double validationSeconds = 0;
        long tokens = 0;
        CheckProcesses();
        if (Writes)
        {
            Directory.CreateDirectory(_outDir);
            _log = MetricsLog.Open(Path.Combine(_outDir, MetricsFile), _metrics);
        }
        _trainer.LayerGradientsReady += _layerReady;
        try
        {
            for (int step = StartStep + 1; step <= _options.Steps; step++)
            {
                if (StopRequested(stop, step))
                {
                    if (step - 1 > (LastCheckpointStep ?? 0))
                        SaveCheckpoint(step - 1);
                    return false;
                }
                float lr = _options.LearningRateAt(step);
                float loss = _options.Method == "mezo" ? MeZOStep(step, lr, ref tokens) : BackpropStep(step, lr, ref tokens);
                if (!float.IsFinite(loss))
                    throw new TrainingDivergedException(step, $"the loss is {loss.ToString(CultureInfo.InvariantCulture)}");
                FederatedRoundEnd(step, tokens);
                float? validationLoss = null;
                if (ValidatesAt(step))
                {
                    // After the step's update, before its checkpoint: the checkpoint's metrics hold it.
                    var validationWatch = Stopwatch.StartNew();
                    validationLoss = (float)_validation!.Data.Evaluate(_trainer, _validation.Sequences).Loss;
                    validationSeconds += validationWatch.Elapsed.TotalSeconds;
                }
                // Throughput of training alone; the elapsed time is the run's wall time, validation included.
                var metrics = new StepMetrics(step, loss, lr, tokens / (watch.Elapsed.TotalSeconds - validationSeconds),
                    elapsedBefore + watch.Elapsed.TotalSeconds, ProcessMemory.PrivateBytes(), validationLoss);
                _metrics.Add(metrics);
                _log?.Append(metrics);
                StepCompleted?.Invoke(metrics);
                if (_options.SaveEvery > 0 && step % _options.SaveEvery == 0 && step < _options.Steps)
                    SaveCheckpoint(step);
            }
            SaveCheckpoint(_options.Steps);
            if (Writes)
                _trainer.Adapter.Save(_outDir, _options.BaseModel ?? _trainer.Model.Name);
            return true;
        }
        finally
        {
            _trainer.LayerGradientsReady -= _layerReady;
            _log?.Dispose();
            _log = null;
            WritePlot();
            _optimizer.Dispose();
            foreach (var sum in _sums.Values)
                sum.Dispose();
            _sums.Clear();
        }
    }

    private MetricsLog? _log;

    /// <summary>
    /// One optimizer step. On the last (or only) sequence each layer's modules are stepped as soon as
    /// that layer's gradients are final. With gradient accumulation the earlier sequences' gradients
    /// are summed on the backend first (the trainer itself holds one layer's gradients only). Every
    /// gradient is checked before it is used, and every parameter after its update, on the backend
    /// too; the checks are read once, at the end of the step. So on a GPU nothing but the tokens, the
    /// targets, the losses and that one check word crosses between host and device. A step in the
    /// steady state allocates nothing: the handler is made once, the sums are kept from step to
    /// step, and the sequence comes in the data's own buffers.
    /// </summary>
    private float BackpropStep(int step, float lr, ref long tokens)
    {
        if (DataParallel)
            return DataParallelStep(step, lr, ref tokens);
        int micro = _options.GradientAccumulation;
        (_step, _learningRate, _gradientScale) = (step, lr, 1f / micro);
        _optimizer.BeginStep();
        float loss = 0;
        for (int i = 0; i < micro; i++)
        {
            var (x, y) = _data.Next();
            _lastSequence = i == micro - 1;
            // The LCSB group follows the optimizer step, so all sequences of a step agree.
            float sequenceLoss = _trainer.ForwardBackward(x.Span, y.Span, step - 1);
            if (!float.IsFinite(sequenceLoss))
                throw new TrainingDivergedException(step, $"the loss is {sequenceLoss.ToString(CultureInfo.InvariantCulture)}");
            loss += sequenceLoss / micro;
            tokens += x.Length;
        }
        ThrowIfNotFinite(step);
        return loss;
    }

    // What the handler below needs of the running step (set by BackpropStep; fields, so that the
    // handler is made once and a step allocates no closures).
    private int _step;
    private float _learningRate, _gradientScale;
    private bool _lastSequence;
    private readonly Action<LayerGradients> _layerReady;

    /// <summary>A layer's gradients are final: summed for later (an earlier sequence of the step), or the layer is stepped (the last).</summary>
    private void LayerReady(LayerGradients layer)
    {
        if (DataParallel)
        {
            DataParallelLayerReady(layer);
            return;
        }
        var modules = _trainer.LayerModules(layer.Layer);
        for (int i = 0; i < modules.Count; i++)
        {
            var m = modules[i];
            int check = 4 * ModuleIndex(m);
            StepParameter(m.Spec.AName, m.A, m.DA, check, layer.Skipped);
            StepParameter(m.Spec.BName, m.B, m.DB, check + 2, layer.Skipped);
        }
    }

    /// <summary>
    /// One parameter at a layer's end of backward: an earlier sequence's gradient is added to the
    /// step's sum; at the last sequence the total is checked, the optimizer steps, the parameter is
    /// checked and the sum zeroed for the next step. A layer LCSB skipped has a zero gradient on every
    /// sequence of the step: nothing is added, and the optimizer steps with gradient scale 0.
    /// </summary>
    private void StepParameter(string name, Tensor parameter, Tensor gradient, int check, bool skipped)
    {
        var backend = _trainer.Backend;
        long n = parameter.Length;
        bool sums = _options.GradientAccumulation > 1 && !skipped;
        if (!_lastSequence)
        {
            if (sums)
                backend.AddInPlace(Sum(name, n), gradient, n);
            return;
        }
        var total = gradient;
        if (sums)
        {
            total = Sum(name, n);
            backend.AddInPlace(total, gradient, n);
        }
        Apply(name, parameter, total, check, skipped);
        if (sums)
            backend.Zero(total, n);
    }

    /// <summary>The optimizer's update of one parameter by its step's total gradient, both checked (check and check + 1).</summary>
    private void Apply(string name, Tensor parameter, Tensor total, int check, bool zeroGradient)
    {
        var backend = _trainer.Backend;
        if (!zeroGradient)
            backend.CheckFinite(total, parameter.Length, check);
        _optimizer.Update(name, parameter, total, _learningRate, zeroGradient ? 0 : _gradientScale);
        backend.CheckFinite(parameter, parameter.Length, check + 1);
    }

    private Dictionary<LoraTensors, int>? _moduleIndex;

    /// <summary>A module's place in <see cref="TrainerBase.LoraModules"/>: its checks are 4·index (A's gradient, A) and 4·index + 2 (B's).</summary>
    private int ModuleIndex(LoraTensors module)
    {
        if (_moduleIndex is null)
        {
            _moduleIndex = new Dictionary<LoraTensors, int>(ReferenceEqualityComparer.Instance);
            for (int i = 0; i < _trainer.LoraModules.Count; i++)
                _moduleIndex[_trainer.LoraModules[i]] = i;
        }
        return _moduleIndex[module];
    }

    /// <summary>
    /// The first NaN or infinity the step's checks found on the backend stops the run, naming the
    /// tensor: nothing of the step is saved.
    /// </summary>
    private void ThrowIfNotFinite(int step)
    {
        if (_trainer.Backend.TakeNonFinite() is not { } found)
            return;
        var module = _trainer.LoraModules[found.Check / 4];
        string what = found.Check % 2 == 0 ? "the gradient of" : "the update of";
        string name = found.Check % 4 < 2 ? module.Spec.AName : module.Spec.BName;
        throw new TrainingDivergedException(step, $"{what} {name} is not finite ({(found.NaN ? "NaN" : "infinite")})");
    }

    /// <summary>NaN or an infinity anywhere in <paramref name="values"/> (host values: a checkpoint's, an average's) stops the run.</summary>
    private static void CheckFinite(int step, string what, string name, ReadOnlySpan<float> values)
    {
        if (!FiniteValues.All(values, out bool nan))
            throw new TrainingDivergedException(step, $"{what} {name} is not finite ({(nan ? "NaN" : "infinite")})");
    }

    private readonly Dictionary<string, Tensor> _sums = new(StringComparer.Ordinal);

    /// <summary>The sum of a gradient over a step's earlier sequences, on the backend (kept from step to step; mapped like the optimizer state with trainer.optimizer_state = "mmap").</summary>
    private Tensor Sum(string name, long length)
    {
        if (!_sums.TryGetValue(name, out var sum))
            _sums[name] = sum = _trainer.OptimizerStateInFile ? InFile(name + ".sum", length) : _trainer.Backend.Allocate(name + ".sum", length);
        return sum;
    }

    private float MeZOStep(int step, float lr, ref long tokens)
    {
        var (x, y) = _data.Next();
        tokens += 2L * x.Length;
        ulong seed = (ulong)_options.Seed * 0x100000001B3UL + (ulong)step;
        return MeZO.Step(_trainer, x.Span, y.Span, seed, _options.MezoEpsilon, lr);
    }

    /// <summary>
    /// Writes the checkpoint into a fresh folder, then swaps it in: a run killed at any moment leaves
    /// either the previous checkpoint or the new one, whole. Parameters that are not finite are never
    /// written (the run has diverged: <see cref="TrainingDivergedException"/>).
    /// </summary>
    private void SaveCheckpoint(int step)
    {
        if (!Writes)
        {
            LastCheckpointStep = step; // rank 0 writes it
            return;
        }
        _trainer.DownloadAdapter();
        foreach (var module in _trainer.Adapter.Modules)
        {
            CheckFinite(step, "the parameter", module.Spec.AName, module.A);
            CheckFinite(step, "the parameter", module.Spec.BName, module.B);
        }
        string final = Path.Combine(_outDir, CheckpointFolder);
        string temporary = final + ".tmp";
        string previous = final + ".old";
        if (Directory.Exists(temporary))
            Directory.Delete(temporary, recursive: true);
        Directory.CreateDirectory(temporary);

        _trainer.Adapter.Save(Path.Combine(temporary, "adapter"), _options.BaseModel ?? _trainer.Model.Name);
        if (_optimizer is not Sgd)
            _optimizer.Save(Path.Combine(temporary, OptimizerFile));
        var state = new CheckpointState(step, _options.Steps, _options.Method, _options.Optimizer, _data.Position, [.. _metrics],
            _options, Settings is null ? null : new Dictionary<string, string>(Settings, StringComparer.Ordinal));
        AtomicFile.WriteAllText(Path.Combine(temporary, StateFile), JsonSerializer.Serialize(state, JsonOptions));

        if (Directory.Exists(final))
        {
            if (Directory.Exists(previous))
                Directory.Delete(previous, recursive: true);
            Directory.Move(final, previous);
        }
        Directory.Move(temporary, final);
        if (Directory.Exists(previous))
            Directory.Delete(previous, recursive: true);
        LastCheckpointStep = step;
        WritePlot();
    }

    /// <summary>The checkpoint folder of a run, or the one it was replacing when it was killed mid-swap.</summary>
    private static string? CheckpointIn(string runDir)
    {
        foreach (var name in new[] { CheckpointFolder, CheckpointFolder + ".old" })
        {
            string dir = Path.Combine(runDir, name);
            if (File.Exists(Path.Combine(dir, StateFile)))
                return dir;
        }
        return null;
    }

    /// <summary>
    /// What writes killed mid-way left in a run's folder: the atomic writes' temporary files (in the
    /// folder and its checkpoint), a checkpoint being assembled (<c>checkpoint.tmp</c>) and one being
    /// replaced (<c>checkpoint.old</c>, put back when it is the only one). Returns what was removed.
    /// </summary>
    public static IReadOnlyList<string> RemoveLeftovers(string runDir)
    {
        if (!Directory.Exists(runDir))
            return [];
        var removed = new List<string>(AtomicFile.RemoveTemporaries(runDir));
        string final = Path.Combine(runDir, CheckpointFolder), temporary = final + ".tmp", previous = final + ".old";
        if (Directory.Exists(temporary))
        {
            Directory.Delete(temporary, recursive: true);
            removed.Add(temporary);
        }
        if (Directory.Exists(previous))
        {
            if (File.Exists(Path.Combine(final, StateFile)))
            {
                Directory.Delete(previous, recursive: true);
                removed.Add(previous);
            }
            else if (File.Exists(Path.Combine(previous, StateFile)))
            {
                if (Directory.Exists(final))
                    Directory.Delete(final, recursive: true);
                Directory.Move(previous, final);
            }
        }
        removed.AddRange(AtomicFile.RemoveTemporaries(final, SearchOption.AllDirectories));
        return removed;
    }

    private static CheckpointState ReadState(string dir)
    {
        string path = Path.Combine(dir, StateFile);
        CheckpointState? state;
        try
        {
            state = JsonSerializer.Deserialize<CheckpointState>(File.ReadAllBytes(path), JsonOptions);
        }
        catch (Exception e) when (e is JsonException or NotSupportedException or InvalidOperationException or ArgumentException)
        {
            throw new TrainingRunException($"{path}: not a checkpoint state ({e.Message})", e);
        }
        string? problem = state switch
        {
            null => "empty (null)",
            { DataPosition: null } or { Method: null } or { Optimizer: null } or { Metrics: null } => "DataPosition, Method, Optimizer or Metrics is missing",
            { Steps: < 1 } => $"Steps is {state.Steps}",
            _ when state.Step < 0 || state.Step > state.Steps => $"Step {state.Step} is not a step of a run of {state.Steps}",
            _ when state.Metrics.Count != state.Step || state.Metrics.Where((m, i) => m.Step != i + 1).Any() =>
                $"its Metrics do not hold steps 1 to {state.Step}",
            _ => null,
        };
        if (problem is null && state!.Options is { } options)
        {
            try
            {
                options.Validate();
                if (options.Steps != state.Steps || options.Method != state.Method || options.Optimizer != state.Optimizer)
                    problem = "its Options disagree with its Steps, Method or Optimizer";
            }
            catch (ArgumentException e)
            {
                problem = $"its Options are not valid ({e.Message})";
            }
        }
        if (problem is not null)
            throw new TrainingRunException($"{path}: not a valid checkpoint state: {problem}.");
        return state!;
    }

    private void WritePlot()
    {
        if (!Writes)
            return;
        var series = new List<(string, IReadOnlyList<(double, double)>)>
        {
            (_options.Method, _metrics.Select(m => ((double)m.Step, (double)m.Loss)).ToList()),
        };
        var validation = _metrics.Where(m => m.ValidationLoss is not null).Select(m => ((double)m.Step, (double)m.ValidationLoss!.Value)).ToList();
        if (validation.Count > 0)
            series.Add(("validation", validation));
        SvgPlot.Write(Path.Combine(_outDir, "loss.svg"), $"{_trainer.Model.Name}: {(validation.Count > 0 ? "training and validation" : "training")} loss",
            "step", "loss", series);
    }

    /// <summary>
    /// metrics.csv as the run goes: rewritten at the start with the rows the run already has (a resumed
    /// run's, from its checkpoint, dropping any a killed run wrote after it), then a row appended and
    /// flushed after every step, so the run can be watched (<c>tail -f</c>).
    /// </summary>
    private sealed class MetricsLog : IDisposable
    {
        private const string Header = "step,loss,learning_rate,tokens_per_second,elapsed_seconds,private_mb,val_loss";
        private readonly StreamWriter _writer;

        private MetricsLog(StreamWriter writer) => _writer = writer;

        public static MetricsLog Open(string path, IEnumerable<StepMetrics> existing)
        {
            AtomicFile.WriteAllText(path, string.Join("", existing.Select(m => Row(m) + "\n").Prepend(Header + "\n")));
            var stream = new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read);
            return new MetricsLog(new StreamWriter(stream, new System.Text.UTF8Encoding(false)) { NewLine = "\n" });
        }

        public void Append(StepMetrics m)
        {
            _writer.WriteLine(Row(m, _row));
            _writer.Flush();
        }

        public void Dispose() => _writer.Dispose();

        private readonly char[] _row = new char[256];

        private static string Row(StepMetrics m) => new(Row(m, new char[256]));

        /// <summary>
        /// The row of <paramref name="m"/>, formatted into <paramref name="buffer"/> (no strings: a step
        /// allocates nothing). Six digits for reading; val_loss with nine, a float's round trip, to
        /// compare against <c>lora eval</c>.
        /// </summary>
        private static ReadOnlySpan<char> Row(StepMetrics m, char[] buffer)
        {
            int n = 0;
            Append(buffer, ref n, m.Step, "");
            Append(buffer, ref n, m.Loss, "G6");
            Append(buffer, ref n, m.LearningRate, "G6");
            Append(buffer, ref n, m.TokensPerSecond, "G6");
            Append(buffer, ref n, m.ElapsedSeconds, "G6");
            Append(buffer, ref n, m.PrivateBytes / 1048576.0, "G6");
            if (m.ValidationLoss is float v)
            {
                Append(buffer, ref n, v, "G9");
                n--; // the last column has no comma after it
            }
            return buffer.AsSpan(0, n);
        }

        /// <summary>
        /// <paramref name="value"/> and a comma at <paramref name="n"/>. A constrained call, not an
        /// interpolated string: that boxes its values until the JIT optimizes it, in a run's first steps.
        /// </summary>
        private static void Append<T>(char[] buffer, ref int n, T value, string format) where T : ISpanFormattable
        {
            if (!value.TryFormat(buffer.AsSpan(n), out int written, format, CultureInfo.InvariantCulture) || n + written >= buffer.Length)
                throw new InvalidOperationException("A metrics row outgrew its buffer.");
            n += written;
            buffer[n++] = ',';
        }
    }

    private static readonly JsonSerializerOptions JsonOptions = new()
    {
        WriteIndented = true,
        NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals,
    };

    /// <param name="Options">The run's options (null in checkpoints written before they were stored).</param>
    /// <param name="Settings">The caller's <see cref="TrainingRun.Settings"/>.</param>
    private sealed record CheckpointState(int Step, int Steps, string Method, string Optimizer, string DataPosition, List<StepMetrics> Metrics,
        TrainingOptions? Options = null, Dictionary<string, string>? Settings = null);
}
