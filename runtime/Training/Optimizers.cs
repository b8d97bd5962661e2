using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Training;

/// <summary>
/// An optimizer over the LoRA tensors, applied one module at a time as its gradients arrive, so no
/// full set of gradients is ever needed. State is kept per parameter tensor, by PEFT name.
/// </summary>
public abstract class Optimizer
{
    /// <summary>Optimizer steps taken (t in Adam's bias correction).</summary>
    public int Step { get; private set; }

    public abstract string Name { get; }

    /// <summary>Call once per optimizer step, before that step's <see cref="Update"/> calls.</summary>
    public void BeginStep() => Step++;

    /// <summary>One parameter tensor: p ← p − lr·update(g·gradScale).</summary>
    public abstract void Update(string name, Span<float> parameter, ReadOnlySpan<float> gradient, float learningRate, float gradScale = 1);

    /// <summary>Every state tensor, by name, for a checkpoint: the optimizer's own memory, not a copy.</summary>
    public abstract IEnumerable<(string Name, ReadOnlyMemory<float> Values)> State();

    /// <summary>
    /// Restores the step count and the state tensors <paramref name="read"/> fills: it is called once
    /// per name in <paramref name="names"/>, with the optimizer's own storage of that tensor's length.
    /// </summary>
    public void Restore(int step, IReadOnlyDictionary<string, int> names, Action<string, Span<float>> read)
    {
        Step = step;
        RestoreState(names, read);
    }

    protected abstract void RestoreState(IReadOnlyDictionary<string, int> names, Action<string, Span<float>> read);

    /// <summary>
    /// Writes the state and step to one safetensors file (atomically), streamed from the state tensors
    /// themselves: a checkpoint costs no copy of the moments.
    /// </summary>
    public void Save(string path)
    {
        var state = State().ToList();
        var tensors = state.Select(s => new TensorSpec(s.Name, [s.Values.Length])).ToList();
        int next = 0; // called once per tensor, in order
        SafeTensorsWriter.Write(path, tensors, _ => state[next++].Values,
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
            // Read straight into the optimizer's storage (the heap or its mapped files): no second copy.
            Restore(step, lengths, (name, destination) =>
            {
                file.Read(name, destination);
                if (!destination.IsEmpty && !float.IsFinite(System.Numerics.Tensors.TensorPrimitives.MaxMagnitude(destination)))
                    throw new WeightsException(path, $"state tensor '{name}' holds values that are not finite (NaN or infinite)");
            });
        }
        catch (ArgumentException e)
        {
            throw new WeightsException(path, e.Message, e);
        }
    }

    /// <param name="allocate">
    /// Where state tensors live: a function of (name, length), for example a memory-mapped file; the
    /// heap when null.
    /// </param>
    public static Optimizer Create(string name, float weightDecay, Func<string, int, Memory<float>>? allocate = null) => name switch
    {
        "adamw" => new AdamW(weightDecay: weightDecay, allocate: allocate),
        "sgd" => new Sgd(),
        _ => throw new ArgumentException($"Unknown optimizer '{name}' (available: adamw, sgd)."),
    };
}

/// <summary>Plain SGD: p ← p − lr·g. Keeps nothing.</summary>
public sealed class Sgd : Optimizer
{
    public override string Name => "sgd";

    public override void Update(string name, Span<float> parameter, ReadOnlySpan<float> gradient, float learningRate, float gradScale = 1)
    {
        for (int i = 0; i < parameter.Length; i++)
            parameter[i] -= learningRate * gradScale * gradient[i];
    }

    public override IEnumerable<(string Name, ReadOnlyMemory<float> Values)> State() => [];
    protected override void RestoreState(IReadOnlyDictionary<string, int> names, Action<string, Span<float>> read) { }
}

/// <summary>
/// AdamW (Loshchilov and Hutter): bias-corrected moments and decoupled weight decay,
/// p ← p − lr·(m̂ / (√v̂ + ε) + λ·p). A parameter with a zero gradient (an LCSB-skipped layer)
/// still moves with its momentum.
/// </summary>
public sealed class AdamW(float beta1 = 0.9f, float beta2 = 0.999f, float eps = 1e-8f, float weightDecay = 0f,
    Func<string, int, Memory<float>>? allocate = null) : Optimizer
{
    private readonly Dictionary<string, (Memory<float> M, Memory<float> V)> _moments = new(StringComparer.Ordinal);

    private Memory<float> Allocate(string name, int length) => allocate?.Invoke(name, length) ?? new float[length];

    public override string Name => "adamw";

    public override void Update(string name, Span<float> parameter, ReadOnlySpan<float> gradient, float learningRate, float gradScale = 1)
    {
        if (!_moments.TryGetValue(name, out var state))
            _moments[name] = state = (Allocate(name + ".exp_avg", parameter.Length), Allocate(name + ".exp_avg_sq", parameter.Length));
        float c1 = 1 - MathF.Pow(beta1, Step), c2 = 1 - MathF.Pow(beta2, Step);
        Span<float> m = state.M.Span, v = state.V.Span;
        for (int i = 0; i < parameter.Length; i++)
        {
            float g = gradient[i] * gradScale;
            m[i] = beta1 * m[i] + (1 - beta1) * g;
            v[i] = beta2 * v[i] + (1 - beta2) * g * g;
            parameter[i] -= learningRate * (m[i] / c1 / (MathF.Sqrt(v[i] / c2) + eps) + weightDecay * parameter[i]);
        }
    }

    public override IEnumerable<(string Name, ReadOnlyMemory<float> Values)> State() =>
        _moments.OrderBy(p => p.Key, StringComparer.Ordinal)
            .SelectMany(p => new[] { (p.Key + ".exp_avg", (ReadOnlyMemory<float>)p.Value.M), (p.Key + ".exp_avg_sq", (ReadOnlyMemory<float>)p.Value.V) });

    protected override void RestoreState(IReadOnlyDictionary<string, int> names, Action<string, Span<float>> read)
    {
        _moments.Clear();
        foreach (var (name, length) in names)
            if (name.EndsWith(".exp_avg", StringComparison.Ordinal))
            {
                string parameter = name[..^".exp_avg".Length];
                string squares = parameter + ".exp_avg_sq";
                if (!names.TryGetValue(squares, out int squaresLength) || squaresLength != length)
                    throw new ArgumentException($"'{name}' has no '{squares}' of {length} values beside it");
                var (m, v) = (Allocate(name, length), Allocate(squares, length));
                read(name, m.Span);
                read(squares, v.Span);
                _moments[parameter] = (m, v);
            }
    }
}
