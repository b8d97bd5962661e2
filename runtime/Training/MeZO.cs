using LoraCompiler.Runtime.Backends;

namespace LoraCompiler.Runtime.Training;

/// <summary>
/// MeZO (Malladi et al., 2023), the zeroth-order baseline: two forward passes at θ ± ε·z with z a
/// Gaussian perturbation of every LoRA tensor, regenerated from a seed instead of stored, then the
/// SPSA update θ ← θ − lr·g·z with g = (L(θ+εz) − L(θ−εz)) / 2ε.
/// </summary>
public static class MeZO
{
    /// <summary>One MeZO step; returns the mean of the two losses. Parameters end at θ − lr·g·z.</summary>
    public static float Step(TrainerBase trainer, ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, ulong seed, float epsilon, float learningRate)
    {
        float g = ProjectedGradient(trainer, tokens, targets, seed, epsilon, out float lossPlus, out float lossMinus);
        Perturb(trainer, seed, -learningRate * g);
        return (lossPlus + lossMinus) / 2;
    }

    /// <summary>
    /// The zeroth-order gradient estimate averaged over <paramref name="samples"/> perturbations:
    /// ĝ = (1/N) Σ g_i·z_i, by PEFT tensor name. Parameters are left unchanged.
    /// </summary>
    public static Dictionary<string, float[]> EstimateGradient(TrainerBase trainer, ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets,
        ulong seed, float epsilon, int samples)
    {
        var estimate = trainer.LoraModules
            .SelectMany(m => new[] { (m.Spec.AName, new float[m.A.Length]), (m.Spec.BName, new float[m.B.Length]) })
            .ToDictionary(p => p.Item1, p => p.Item2);
        for (int i = 0; i < samples; i++)
        {
            ulong sampleSeed = seed + (ulong)i * 0x9E3779B97F4A7C15UL;
            float g = ProjectedGradient(trainer, tokens, targets, sampleSeed, epsilon, out _, out _);
            foreach (var (name, index, values) in Tensors(trainer))
            {
                var z = Noise(NoiseKey.For(sampleSeed, index), values.Length);
                var target = estimate[name];
                for (int j = 0; j < target.Length; j++)
                    target[j] += g * z[j] / samples;
            }
        }
        return estimate;
    }

    private static float ProjectedGradient(TrainerBase trainer, ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets,
        ulong seed, float epsilon, out float lossPlus, out float lossMinus)
    {
        Perturb(trainer, seed, epsilon);
        lossPlus = trainer.Loss(tokens, targets);
        Perturb(trainer, seed, -2 * epsilon);
        lossMinus = trainer.Loss(tokens, targets);
        Perturb(trainer, seed, epsilon);
        return (lossPlus - lossMinus) / (2 * epsilon);
    }

    /// <summary>θ += scale·z, with z regenerated from the seed for each tensor, on the backend (<see cref="IBackend.AddNoise"/>).</summary>
    private static void Perturb(TrainerBase trainer, ulong seed, float scale)
    {
        foreach (var (_, index, values) in Tensors(trainer))
            trainer.Backend.AddNoise(values, values.Length, NoiseKey.For(seed, index), scale);
    }

    private static IEnumerable<(string Name, int Index, Tensor Values)> Tensors(TrainerBase trainer)
    {
        int index = 0;
        foreach (var m in trainer.LoraModules)
        {
            yield return (m.Spec.AName, index++, m.A);
            yield return (m.Spec.BName, index++, m.B);
        }
    }

    /// <summary>Standard normal values for one tensor, as <see cref="IBackend.AddNoise"/> adds them: a function of the key only.</summary>
    internal static float[] Noise(NoiseKey key, long length)
    {
        var z = new float[length];
        for (long i = 0; i < length; i++)
            z[i] = CounterNoise.Normal(key, i);
        return z;
    }
}
