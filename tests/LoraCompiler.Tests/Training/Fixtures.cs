using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using LoraCompiler.Tests.Reference;

namespace LoraCompiler.Tests.Training;

/// <summary>
/// Random models for the gradient tests, written to real files: weights large enough that every
/// path carries signal (N(0, 0.1²) linears, norms 1 ± 0.1 in effect) and an adapter with both A and B nonzero,
/// so that every LoRA gradient is nonzero.
/// </summary>
public sealed class ModelFixture : IDisposable
{
    /// <param name="dtype">
    /// The dtype of the weights file: F32, or F16 / BF16, which round the random values to nearest
    /// even; <see cref="Weights"/> then holds the values the file stores, read back as float32 by the
    /// file reader (<see cref="ModelWeights.Read(string)"/>), so a reference computes on exactly them.
    /// </param>
    public ModelFixture(ModelInfo model, int seed, int sequence, string dtype = "F32")
    {
        Model = model;
        Dir = Directory.CreateTempSubdirectory("lora-test-").FullName;
        var rng = new Random(seed);

        Weights = model.BaseTensors.ToDictionary(t => t.Name, t => Normal(rng, t.Elements,
            // Norm weights around their identity: 1 for w·x̂, 0 for Gemma's (1 + w)·x̂.
            mean: t.Name.EndsWith("norm.weight") ? 1f - model.NormWeightOffset : 0f,
            std: t.Name.Contains("embed_tokens") || t.Name.StartsWith("lm_head") ? 0.5f : 0.1f));
        WeightsPath = Path.Combine(Dir, "model");
        Directory.CreateDirectory(WeightsPath);
        SafeTensorsWriter.Write(Path.Combine(WeightsPath, ModelWeights.SingleFileName),
            model.BaseTensors.Select(t => (t.Name, t.Shape, Weights[t.Name])), dtype);
        if (dtype != "F32")
        {
            using var stored = ModelWeights.Open(WeightsPath);
            foreach (var t in model.BaseTensors)
                Weights[t.Name] = stored.Read(t.Name);
        }

        var modules = model.LoraModules.Select(m => new LoraModule(m,
            Normal(rng, (long)model.Lora.R * m.In, 0, 0.1f),
            Normal(rng, (long)m.Out * model.Lora.R, 0, 0.1f))).ToList();
        AdapterPath = Path.Combine(Dir, "adapter");
        new LoraAdapter(model.Lora, modules).Save(AdapterPath, model.Name);

        Tokens = Enumerable.Range(0, sequence).Select(_ => rng.Next(model.Vocab)).ToArray();
        Adapter = modules.SelectMany(m => new[] { (m.Spec.AName, m.A), (m.Spec.BName, m.B) })
            .ToDictionary(p => p.Item1, p => p.Item2);
    }

    public ModelInfo Model { get; }
    public string Dir { get; }
    public string WeightsPath { get; }
    public string AdapterPath { get; }
    public Dictionary<string, float[]> Weights { get; }
    public Dictionary<string, float[]> Adapter { get; }
    public int[] Tokens { get; }

    /// <summary>
    /// The reference's configuration: the model's JSON read as transformers' config classes read it
    /// (<see cref="HuggingFaceConfig"/>), not the generator's parse of it.
    /// </summary>
    public ReferenceConfig ReferenceConfig => HuggingFaceConfig.Read(Path.Combine(RepoRoot(), Model.SourceFile));

    /// <summary>
    /// The repository's root: the folder above the tests' sources (or, failing that, above the test
    /// binaries) that holds LoraCompiler.sln.
    /// </summary>
    public static string RepoRoot([System.Runtime.CompilerServices.CallerFilePath] string testFile = "")
    {
        foreach (string? start in new[] { Path.GetDirectoryName(testFile), AppContext.BaseDirectory })
        {
            for (var dir = string.IsNullOrEmpty(start) ? null : new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            {
                if (File.Exists(Path.Combine(dir.FullName, "LoraCompiler.sln")))
                    return dir.FullName;
            }
        }
        throw new InvalidOperationException("No folder above the tests holds LoraCompiler.sln.");
    }

    /// <summary>The TorchSharp autograd loss and LoRA gradients on the same weights, adapter and tokens.</summary>
    public (double Loss, Dictionary<string, float[]> Gradients) Reference(IReadOnlySet<int>? stopGradientLayers = null) =>
        TorchReference.LossAndGradients(ReferenceConfig, Weights, Adapter, Tokens, stopGradientLayers);

    public static float[] Normal(Random rng, long count, float mean, float std)
    {
        var values = new float[count];
        for (long i = 0; i < count; i++)
        {
            double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
            values[i] = mean + std * (float)(Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2));
        }
        return values;
    }

    /// <summary>‖a − b‖ / ‖b‖.</summary>
    public static double RelativeError(float[] actual, float[] expected)
    {
        Assert.Equal(expected.Length, actual.Length);
        double diff = 0, norm = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            diff += Math.Pow(actual[i] - expected[i], 2);
            norm += Math.Pow(expected[i], 2);
        }
        return Math.Sqrt(diff) / Math.Sqrt(norm);
    }

    private ModelWeights? _weights;

    /// <summary>The weights file, opened once and kept open (trainers read it while they run).</summary>
    public ModelWeights OpenWeights() => _weights ??= ModelWeights.Open(WeightsPath);

    /// <summary>A trainer on the fixture's weights and adapter (loaded from the files, as the CLI does).</summary>
    public TrainerBase CreateTrainer(IBackend backend, int? maxSequence = null) =>
        Model.Create(backend, OpenWeights(), LoraAdapter.Load(AdapterPath, Model.Lora, Model.LoraModules), maxSequence ?? Tokens.Length);

    public void Dispose()
    {
        _weights?.Dispose();
        Directory.Delete(Dir, recursive: true);
    }
}
