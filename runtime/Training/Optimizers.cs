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

    /// <summary>Every state tensor, by name, for a checkpoint.</summary>
    public abstract IEnumerable<(string Name, float[] Values)> State();

    /// <summary>Restores what <see cref="State"/> returned, and the step count.</summary>
    public void Restore(int step, IReadOnlyDictionary<string, float[]> state)
    {
        Step = step;
        RestoreState(state);
    }

    protected abstract void RestoreState(IReadOnlyDictionary<string, float[]> state);

    /// <summary>Writes the state and step to one safetensors file (atomically).</summary>
    public void Save(string path)
    {
        var tensors = State().Select(s => (s.Name, new[] { s.Values.Length }, s.Values)).ToList();
        SafeTensorsWriter.Write(path, tensors, metadata: new Dictionary<string, string> { ["optimizer"] = Name, ["step"] = Step.ToString() });
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
        var state = new Dictionary<string, float[]>(StringComparer.Ordinal);
        foreach (var tensor in file.Names)
        {
            var values = file.Read(tensor);
            int dot = tensor.LastIndexOf('.');
            if (parameterLengths is not null && (dot < 0 || !parameterLengths.TryGetValue(tensor[..dot], out int length) || length != values.Length))
                throw new WeightsException(path, $"state tensor '{tensor}' ({values.Length} values) belongs to no LoRA parameter of this trainer");
            state[tensor] = values;
        }
        try
        {
            Restore(step, state);
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

    public override IEnumerable<(string Name, float[] Values)> State() => [];
    protected override void RestoreState(IReadOnlyDictionary<string, float[]> state) { }
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

    public override IEnumerable<(string Name, float[] Values)> State() =>
        _moments.OrderBy(p => p.Key, StringComparer.Ordinal)
            .SelectMany(p => new[] { (p.Key + ".exp_avg", p.Value.M.ToArray()), (p.Key + ".exp_avg_sq", p.Value.V.ToArray()) });

    protected override void RestoreState(IReadOnlyDictionary<string, float[]> state)
    {
        _moments.Clear();
        foreach (var (name, values) in state)
            if (name.EndsWith(".exp_avg", StringComparison.Ordinal))
            {
                string parameter = name[..^".exp_avg".Length];
                if (!state.TryGetValue(parameter + ".exp_avg_sq", out var squares) || squares.Length != values.Length)
                    throw new ArgumentException($"'{name}' has no '{parameter}.exp_avg_sq' of {values.Length} values beside it");
                var (m, v) = (Allocate(name, values.Length), Allocate(parameter + ".exp_avg_sq", values.Length));
                values.CopyTo(m);
                squares.CopyTo(v);
                _moments[parameter] = (m, v);
            }
    }
}
