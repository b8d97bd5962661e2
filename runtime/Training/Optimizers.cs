using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Training;

/// <summary>
/// An optimizer over the LoRA tensors, applied one module at a time as its gradients arrive, so no
/// full set of gradients is ever needed. Its state lives on the backend beside the parameters (the
/// device's memory on a GPU), kept per parameter tensor by PEFT name; every update is one kernel
/// (<see cref="IBackend.AdamWUpdate"/>, <see cref="IBackend.SgdUpdate"/>), so a step's parameters
/// and moments never travel between host and device. Only a checkpoint reads the state back.
/// </summary>
public abstract class Optimizer(IBackend backend) : IDisposable
{
    protected IBackend Backend { get; } = backend;

    /// <summary>Optimizer steps taken (t in Adam's bias correction).</summary>
    public int Step { get; private set; }

    public abstract string Name { get; }

    /// <summary>Call once per optimizer step, before that step's <see cref="Update"/> calls.</summary>
    public void BeginStep() => Step++;

    /// <summary>
    /// One parameter tensor: p ← p − lr·update(g·gradScale). gradScale 0 stands for a zero gradient
    /// (the gradient is not read): a layer LCSB skipped, which AdamW still moves with its momentum.
    /// </summary>
    public abstract void Update(string name, Tensor parameter, Tensor gradient, float learningRate, float gradScale = 1);

    /// <summary>Every state tensor, by name, for a checkpoint.</summary>
    public abstract IEnumerable<(string Name, Tensor Values)> State();

    /// <summary>
    /// Restores the step count and the state tensors <paramref name="read"/> fills: it is called once
    /// per name in <paramref name="names"/>, with a host buffer of that tensor's length, which is then
    /// written to the optimizer's own tensor.
    /// </summary>
    public void Restore(int step, IReadOnlyDictionary<string, int> names, Action<string, Span<float>> read)
    {
        Step = step;
        RestoreState(names, (name, tensor) =>
        {
            var host = HostBuffer(tensor.Length).Span;
            read(name, host);
            Backend.Write(tensor, host);
        });
    }

    protected abstract void RestoreState(IReadOnlyDictionary<string, int> names, Action<string, Tensor> read);

    private float[] _host = [];

    /// <summary>One tensor's worth of host memory, reused for each tensor a checkpoint reads or writes.</summary>
    private Memory<float> HostBuffer(long length)
    {
        if (_host.Length < length)
            _host = new float[length];
        return _host.AsMemory(0, (int)length);
    }

    /// <summary>
    /// Writes the state and step to one safetensors file (atomically), streamed a tensor at a time
    /// through one host buffer: a checkpoint costs no copy of the moments.
    /// </summary>
    public void Save(string path)
    {
        var state = State().ToList();
        var tensors = state.Select(s => new TensorSpec(s.Name, [checked((int)s.Values.Length)])).ToList();
        int next = 0; // called once per tensor, in order
        SafeTensorsWriter.Write(path, tensors, _ =>
            {
                var tensor = state[next++].Values;
                var host = HostBuffer(tensor.Length);
                Backend.Download(tensor, host.Span);
                return host;
            },
            metadata: new Dictionary<string, string> { ["optimizer"] = Name, ["step"] = Step.ToString() });
    }

    /// <summary>
    /// Reads what <see cref="Save"/> wrote. With <paramref name="parameterLengths"/> (each parameter
    /// tensor's name and length) every state tensor must belong to one of them and have its length.
    /// </summary>
    public void Load(string path, IReadOnlyDictionary<string, int>? parameterLengths = null)
    {
        using var file = SafeTensorsFile.Open(path);
        if (!file.Metadata.TryGetValue("optimizer", out var name) || name != Name || !file.Metadata.TryGetValue("step", out var stepText))
            throw new WeightsException(path, $"not a {Name} optimizer state (metadata optimizer={name ?? "missing"})");
        if (!int.TryParse(stepText, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int step))
            throw new WeightsException(path, $"the step '{stepText}' in its metadata is not a step count");
        var lengths = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var tensor in file.Names)
        {
            long values = file.Info(tensor).Elements;
            int dot = tensor.LastIndexOf('.');
            if (parameterLengths is not null && (dot < 0 || !parameterLengths.TryGetValue(tensor[..dot], out int length) || length != values))
                throw new WeightsException(path, $"state tensor '{tensor}' ({values} values) belongs to no LoRA parameter of this trainer");
            if (values > Array.MaxLength)
                throw new WeightsException(path, $"state tensor '{tensor}' has {values} values, more than a state tensor can hold");
            lengths[tensor] = (int)values;
        }
        try
        {
            Restore(step, lengths, (name, destination) =>
            {
                file.Read(name, destination);
                if (!FiniteValues.All(destination, out _))
                    throw new WeightsException(path, $"state tensor '{name}' holds values that are not finite (NaN or infinite)");
            });
        }
        catch (ArgumentException e)
        {
            throw new WeightsException(path, e.Message, e);
        }
    }

    /// <param name="backend">Where the state lives and the updates run.</param>
    /// <param name="allocate">
    /// How a state tensor is made, of (name, length), for example in a memory-mapped file; zeros from
    /// <see cref="IBackend.Allocate"/> when null.
    /// </param>
    public static Optimizer Create(string name, float weightDecay, IBackend backend, Func<string, long, Tensor>? allocate = null) => name switch
    {
        "adamw" => new AdamW(backend, weightDecay: weightDecay, allocate: allocate),
        "sgd" => new Sgd(backend),
        _ => throw new ArgumentException($"Unknown optimizer '{name}' (available: adamw, sgd)."),
    };

    public virtual void Dispose() => GC.SuppressFinalize(this);
}

/// <summary>Plain SGD: p ← p − lr·g. Keeps nothing.</summary>
public sealed class Sgd(IBackend backend) : Optimizer(backend)
{
    public override string Name => "sgd";

    public override void Update(string name, Tensor parameter, Tensor gradient, float learningRate, float gradScale = 1) =>
        Backend.SgdUpdate(parameter, gradient, parameter.Length, learningRate, gradScale);

    public override IEnumerable<(string Name, Tensor Values)> State() => [];
    protected override void RestoreState(IReadOnlyDictionary<string, int> names, Action<string, Tensor> read) { }
}

/// <summary>
/// AdamW (Loshchilov and Hutter): bias-corrected moments and decoupled weight decay,
/// p ← p − lr·(m̂ / (√v̂ + ε) + λ·p) (<see cref="IBackend.AdamWUpdate"/>). A parameter with a zero
/// gradient (an LCSB-skipped layer) still moves with its momentum.
/// </summary>
public sealed class AdamW(IBackend backend, float beta1 = 0.9f, float beta2 = 0.999f, float eps = 1e-8f, float weightDecay = 0f,
    Func<string, long, Tensor>? allocate = null) : Optimizer(backend)
{
    private readonly Dictionary<string, (Tensor M, Tensor V)> _moments = new(StringComparer.Ordinal);

    private Tensor Allocate(string name, long length) => allocate?.Invoke(name, length) ?? Backend.Allocate(name, length);

    public override string Name => "adamw";

    public override void Update(string name, Tensor parameter, Tensor gradient, float learningRate, float gradScale = 1)
    {
        if (!_moments.TryGetValue(name, out var state))
            _moments[name] = state = (Allocate(name + ".exp_avg", parameter.Length), Allocate(name + ".exp_avg_sq", parameter.Length));
        Backend.AdamWUpdate(parameter, state.M, state.V, gradient, parameter.Length,
            new AdamWStep(Step, learningRate, beta1, beta2, eps, weightDecay, gradScale));
    }

    public override IEnumerable<(string Name, Tensor Values)> State() =>
        _moments.OrderBy(p => p.Key, StringComparer.Ordinal)
            .SelectMany(p => new[] { (p.Key + ".exp_avg", p.Value.M), (p.Key + ".exp_avg_sq", p.Value.V) });

    protected override void RestoreState(IReadOnlyDictionary<string, int> names, Action<string, Tensor> read)
    {
        DisposeMoments();
        foreach (var (name, length) in names)
            if (name.EndsWith(".exp_avg", StringComparison.Ordinal))
            {
                string parameter = name[..^".exp_avg".Length];
                string squares = parameter + ".exp_avg_sq";
                if (!names.TryGetValue(squares, out int squaresLength) || squaresLength != length)
                    throw new ArgumentException($"'{name}' has no '{squares}' of {length} values beside it");
                var (m, v) = (Allocate(name, length), Allocate(squares, length));
                _moments[parameter] = (m, v);
                read(name, m);
                read(squares, v);
            }
    }

    private void DisposeMoments()
    {
        foreach (var (m, v) in _moments.Values)
        {
            m.Dispose();
            v.Dispose();
        }
        _moments.Clear();
    }

    public override void Dispose()
    {
        DisposeMoments();
        base.Dispose();
    }
}
