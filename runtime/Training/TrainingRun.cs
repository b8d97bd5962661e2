using System.Diagnostics;
using System.Globalization;
using System.Numerics.Tensors;
using System.Text.Json;
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
        if (Schedule is not ("constant" or "cosine")) throw new ArgumentException($"Unknown schedule '{Schedule}' (available: constant, cosine).");
        if (Method is not ("backprop" or "mezo")) throw new ArgumentException($"Unknown method '{Method}' (available: backprop, mezo).");
        if (WarmupSteps < 0 || WarmupSteps >= Steps && Schedule == "cosine") throw new ArgumentException("Warmup must be shorter than the run.");
    }
}

/// <summary>One line of metrics.csv; <see cref="ValidationLoss"/> is null at a step without validation.</summary>
public sealed record StepMetrics(int Step, float Loss, float LearningRate, double TokensPerSecond, double ElapsedSeconds, long PrivateBytes,
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
/// The output folder holds the final adapter (PEFT format), metrics.csv, loss.svg and
/// <c>checkpoint/</c> (adapter, optimizer state, step and data position). With
/// <see cref="ValidationOptions"/> the run also scores held-out data now and then (metrics.csv's
/// <c>val_loss</c>, a second curve in loss.svg).
/// </summary>
public sealed class TrainingRun
{
    public const string CheckpointFolder = "checkpoint";
    private const string StateFile = "state.json";
    private const string OptimizerFile = "optimizer.safetensors";

    private readonly TrainerBase _trainer;
    private readonly ITrainingData _data;
    private readonly TrainingOptions _options;
    private readonly string _outDir;
    private readonly Optimizer _optimizer;
    private readonly ValidationOptions? _validation;
    private readonly List<StepMetrics> _metrics = [];

    /// <param name="validation">Held-out data to score during the run (the <c>val_loss</c> column), or null.</param>
    public TrainingRun(TrainerBase trainer, ITrainingData data, TrainingOptions options, string outDir,
        ValidationOptions? validation = null)
    {
        options.Validate();
        validation?.Validate();
        (_trainer, _data, _options, _outDir, _validation) = (trainer, data, options, outDir, validation);
        _optimizer = Optimizer.Create(options.Optimizer, options.WeightDecay,
            trainer.OptimizerStateInFile ? InFile : null);
        trainer.CaptureGradients = false; // each layer's gradients are consumed as they arrive
        if (options.LcsbGroups is int groups)
            trainer.LcsbGroups = groups;
    }

    private readonly List<MappedBuffer> _mapped = [];

    /// <summary>trainer.optimizer_state = "mmap": optimizer state in memory-mapped files in the trainer's temporary folder.</summary>
    private Memory<float> InFile(string name, int length)
    {
        var buffer = new MappedBuffer(_trainer.TemporaryFolder, name, length);
        _mapped.Add(buffer);
        return buffer.Memory;
    }

    /// <summary>The step the run continues from (0 for a new run).</summary>
    public int StartStep { get; private set; }

    public IReadOnlyList<StepMetrics> Metrics => _metrics;

    /// <summary>Called after every step.</summary>
    public event Action<StepMetrics>? StepCompleted;

    /// <summary>Continues from the checkpoint in <paramref name="runDir"/>; false when it has none.</summary>
    public bool Resume(string runDir)
    {
        string? dir = CheckpointIn(runDir);
        if (dir is null)
            return false;
        var state = JsonSerializer.Deserialize<CheckpointState>(File.ReadAllText(Path.Combine(dir, StateFile)))
            ?? throw new IOException($"{Path.Combine(dir, StateFile)}: empty checkpoint state");
        if (state.Steps != _options.Steps || state.Method != _options.Method || state.Optimizer != _options.Optimizer)
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
            _optimizer.Load(Path.Combine(dir, OptimizerFile));
        _data.Position = state.DataPosition;
        StartStep = state.Step;
        _metrics.Clear();
        _metrics.AddRange(state.Metrics);
        return true;
    }

    /// <summary>Whether the run scores its validation data after a step.</summary>
    public bool ValidatesAt(int step) =>
        _validation is not null && (step % _validation.EveryFor(_options) == 0 || step == _options.Steps);

    public void Run()
    {
        var watch = Stopwatch.StartNew();
        double elapsedBefore = _metrics.Count > 0 ? _metrics[^1].ElapsedSeconds : 0;
        double validationSeconds = 0;
        long tokens = 0;
        for (int step = StartStep + 1; step <= _options.Steps; step++)
        {
            float lr = _options.LearningRateAt(step);
            float loss = _options.Method == "mezo" ? MeZOStep(step, lr, ref tokens) : BackpropStep(step, lr, ref tokens);
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
            StepCompleted?.Invoke(metrics);
            if (_options.SaveEvery > 0 && step % _options.SaveEvery == 0 && step < _options.Steps)
                SaveCheckpoint(step);
        }
        SaveCheckpoint(_options.Steps);
        _trainer.DownloadAdapter();
        _trainer.Adapter.Save(_outDir, _options.BaseModel ?? _trainer.Model.Name);
        WriteMetrics();
        foreach (var buffer in _mapped)
            ((IDisposable)buffer).Dispose();
        _mapped.Clear();
    }

    /// <summary>
    /// One optimizer step. On the last (or only) sequence each layer's modules are stepped as soon as
    /// that layer's gradients are final. With gradient accumulation the earlier sequences' gradients
    /// are summed into host buffers first (the trainer itself holds one layer's gradients only).
    /// </summary>
    private float BackpropStep(int step, float lr, ref long tokens)
    {
        int micro = _options.GradientAccumulation;
        float gradScale = 1f / micro;
        _optimizer.BeginStep();

        void Accumulate(LayerGradients layer) => _trainer.VisitGradients(layer, (spec, da, db) =>
        {
            TensorPrimitives.Add(Accumulator(spec.AName, da.Length), da, Accumulator(spec.AName, da.Length));
            TensorPrimitives.Add(Accumulator(spec.BName, db.Length), db, Accumulator(spec.BName, db.Length));
        });
        void StepLayer(LayerGradients layer) => _trainer.UpdateParameters(layer, (m, a, b, da, db) =>
        {
            _optimizer.Update(m.Spec.AName, a, Total(m.Spec.AName, da), lr, gradScale);
            _optimizer.Update(m.Spec.BName, b, Total(m.Spec.BName, db), lr, gradScale);
        });

        float loss = 0;
        for (int i = 0; i < micro; i++)
        {
            var (x, y) = _data.Next();
            Action<LayerGradients> handler = i == micro - 1 ? StepLayer : Accumulate;
            _trainer.LayerGradientsReady += handler;
            try
            {
                // The LCSB group follows the optimizer step, so all sequences of a step agree.
                loss += _trainer.ForwardBackward(x, y, step - 1) / micro;
            }
            finally
            {
                _trainer.LayerGradientsReady -= handler;
            }
            tokens += x.Length;
        }
        return loss;
    }

    private readonly Dictionary<string, float[]> _accumulated = new(StringComparer.Ordinal);

    private float[] Accumulator(string name, int length) =>
        _accumulated.TryGetValue(name, out var sum) ? sum : _accumulated[name] = new float[length];

    /// <summary>This sequence's gradient plus what earlier sequences of the step accumulated (then cleared).</summary>
    private ReadOnlySpan<float> Total(string name, ReadOnlySpan<float> gradient)
    {
        if (!_accumulated.TryGetValue(name, out var sum))
            return gradient;
        TensorPrimitives.Add(sum, gradient, sum);
        var total = sum.ToArray();
        Array.Clear(sum);
        return total;
    }

    private float MeZOStep(int step, float lr, ref long tokens)
    {
        var (x, y) = _data.Next();
        tokens += 2L * x.Length;
        ulong seed = (ulong)_options.Seed * 0x100000001B3UL + (ulong)step;
        return MeZO.Step(_trainer, x, y, seed, _options.MezoEpsilon, lr);
    }

    /// <summary>
    /// Writes the checkpoint into a fresh folder, then swaps it in: a run killed at any moment leaves
    /// either the previous checkpoint or the new one, whole.
    /// </summary>
    private void SaveCheckpoint(int step)
    {
        string final = Path.Combine(_outDir, CheckpointFolder);
        string temporary = final + ".tmp";
        string previous = final + ".old";
        if (Directory.Exists(temporary))
            Directory.Delete(temporary, recursive: true);
        Directory.CreateDirectory(temporary);

        _trainer.DownloadAdapter();
        _trainer.Adapter.Save(Path.Combine(temporary, "adapter"), _options.BaseModel ?? _trainer.Model.Name);
        if (_optimizer is not Sgd)
            _optimizer.Save(Path.Combine(temporary, OptimizerFile));
        var state = new CheckpointState(step, _options.Steps, _options.Method, _options.Optimizer, _data.Position, [.. _metrics]);
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
        WriteMetrics();
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

    private void WriteMetrics()
    {
        Directory.CreateDirectory(_outDir);
        var lines = new List<string> { "step,loss,learning_rate,tokens_per_second,elapsed_seconds,private_mb,val_loss" };
        lines.AddRange(_metrics.Select(m => string.Join(",",
            m.Step, F(m.Loss), F(m.LearningRate), F(m.TokensPerSecond), F(m.ElapsedSeconds), F(m.PrivateBytes / 1048576.0),
            m.ValidationLoss is float v ? v.ToString("G9", CultureInfo.InvariantCulture) : "")));
        AtomicFile.WriteAllText(Path.Combine(_outDir, "metrics.csv"), string.Join("\n", lines) + "\n");
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

    /// <summary>Six digits for reading; val_loss is written with nine, a float's round trip, to compare against <c>lora eval</c>.</summary>
    private static string F(double v) => v.ToString("G6", CultureInfo.InvariantCulture);

    private static readonly JsonSerializerOptions JsonOptions = new() { WriteIndented = true };

    private sealed record CheckpointState(int Step, int Steps, string Method, string Optimizer, string DataPosition, List<StepMetrics> Metrics);
}
