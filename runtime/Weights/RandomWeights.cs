using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Runtime.Weights;

/// <summary>
/// Writes a full-size model of random weights with the right names and shapes, so memory and speed
/// can be measured on real shapes without downloading anything. Initialised as Hugging Face does:
/// linear and embedding weights ~ N(0, std²) with std = 0.02 by default, norms at their identity (1
/// for w·x̂; 0 for Gemma's (1 + w)·x̂), biases N(0, std²).
/// </summary>
public static class RandomWeights
{
    public const float InitStd = 0.02f;

    /// <summary>
    /// Writes <c>model.safetensors</c> into <paramref name="dir"/> and returns its path. With
    /// <paramref name="quantizeGroupSize"/> the quantizable tensors (<see cref="Q4.IsQuantizable"/>) are
    /// written in 4 bits with that group size, streaming a block of rows at a time (the values are
    /// exactly those of the float model with the same seed, quantized); the rest in <paramref name="dtype"/>.
    /// </summary>
    public static string Write(ModelInfo model, string dir, int seed, string dtype = "F32", float std = InitStd,
        Action<string>? progress = null, int? quantizeGroupSize = null)
    {
        Directory.CreateDirectory(dir);
        string path = Path.Combine(dir, ModelWeights.SingleFileName);
        string generator = $"lora init-random --seed {seed} --std {std}";
        if (quantizeGroupSize is int groupSize)
        {
            // One stream per tensor, created when the writer first asks for it and read in order.
            var sources = model.BaseTensors.Select(spec =>
            {
                NormalStream? stream = null;
                return new QuantizedModelWriter.Source(spec.Name, spec.Shape, dtype, Q4.IsQuantizable(spec.Name, spec.Shape),
                    (start, destination) =>
                    {
                        if (start == 0)
                            stream = new NormalStream(spec, seed, std, Identity(model));
                        stream!.Fill(start, destination);
                    });
            }).ToList();
            QuantizedModelWriter.Write(path, sources, groupSize,
                new Dictionary<string, string> { ["format"] = "mlx", ["generator"] = $"{generator} --quantize q4 --group-size {groupSize}" }, progress);
            return path;
        }

        int index = 0;
        SafeTensorsWriter.Write(path, model.BaseTensors, spec =>
        {
            progress?.Invoke($"[{++index}/{model.BaseTensors.Count}] {spec}");
            return Values(spec, seed, std, Identity(model));
        }, dtype, new Dictionary<string, string> { ["format"] = "pt", ["generator"] = generator });
        return path;
    }

    /// <summary>The values of one tensor: a function of its name, the seed and a norm's identity value only.</summary>
    public static float[] Values(TensorSpec spec, int seed, float std = InitStd, float normIdentity = 1f)
    {
        var values = new float[spec.Elements];
        new NormalStream(spec, seed, std, normIdentity).Fill(0, values);
        return values;
    }

    /// <summary>The norm weight that makes a norm the plain normalization: 1, or 0 where the model multiplies by (1 + w).</summary>
    private static float Identity(ModelInfo model) => 1f - model.NormWeightOffset;

    /// <summary>
    /// A tensor's values in order, a piece at a time: the identity value for a norm, otherwise normals from a
    /// generator seeded by the name and the seed, two per Box–Muller draw (cos then sin), so any split
    /// into pieces gives the same values as the whole tensor at once.
    /// </summary>
    private sealed class NormalStream(TensorSpec spec, int seed, float std, float normIdentity)
    {
        private readonly Random _rng = new(HashCode(spec.Name) ^ seed);
        private readonly bool _ones = spec.Name.EndsWith("norm.weight", StringComparison.Ordinal);
        private long _next;
        private float? _spare;

        public void Fill(long start, Span<float> destination)
        {
            if (start != _next)
                throw new InvalidOperationException($"{spec.Name}: values are produced in order; asked for {start}, next is {_next}.");
            _next += destination.Length;
            if (_ones)
            {
                destination.Fill(normIdentity);
                return;
            }
            int i = 0;
            if (_spare is float s && destination.Length > 0)
            {
                destination[i++] = s;
                _spare = null;
            }
            for (; i < destination.Length; i += 2)
            {
                // Box–Muller: two normals from two uniforms.
                double u1 = 1.0 - _rng.NextDouble(), u2 = _rng.NextDouble();
                double r = Math.Sqrt(-2 * Math.Log(u1)) * std;
                destination[i] = (float)(r * Math.Cos(2 * Math.PI * u2));
                float second = (float)(r * Math.Sin(2 * Math.PI * u2));
                if (i + 1 < destination.Length)
                    destination[i + 1] = second;
                else
                    _spare = second;
            }
        }
    }

    /// <summary>FNV-1a: a stable hash of a tensor name (string.GetHashCode changes per process).</summary>
    private static int HashCode(string name)
    {
        uint hash = 2166136261;
        foreach (char c in name)
            hash = (hash ^ c) * 16777619;
        return (int)hash;
    }
}
