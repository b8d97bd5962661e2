namespace LoraCompiler.Runtime.Backends;

/// <summary>The key of one tensor's noise (<see cref="CounterNoise"/>): two 32-bit words.</summary>
public readonly record struct NoiseKey(uint Low, uint High)
{
    /// <summary>The key of tensor <paramref name="tensor"/> under <paramref name="seed"/>: SplitMix64's finalizer of both.</summary>
    public static NoiseKey For(ulong seed, int tensor)
    {
        ulong z = seed ^ ((ulong)(tensor + 1) * 0xD1B54A32D192ED03UL);
        z += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        z ^= z >> 31;
        return new NoiseKey((uint)z, (uint)(z >> 32));
    }
}

/// <summary>
/// Counter-based Gaussian noise: value i of a tensor is a function of its key and i alone, with
/// 32-bit integer arithmetic only, so a shader (shaders/noise.comp) computes the same values as the
/// host without any state, in any order. Bits are two rounds of the PCG hash (Jarzynski and Olano,
/// "Hash Functions for GPU Rendering", 2020) over the counter and the key; each pair of values is a
/// Box–Muller pair of two uniforms in (0, 1] with 24 bits each, the angle taken in (−π, π], where a
/// GPU's sine and cosine are specified.
/// </summary>
/// <remarks>
/// Float32 logarithm, sine and cosine differ between the host and a device in their last bits (a
/// device's within the precision Vulkan allows), so the device's values may differ from these by
/// that much: each device is consistent with itself, which is all MeZO needs.
/// </remarks>
public static class CounterNoise
{
    private static uint Pcg(uint x)
    {
        uint state = x * 747796405u + 2891336453u;
        uint word = ((state >> (int)((state >> 28) + 4)) ^ state) * 277803737u;
        return (word >> 22) ^ word;
    }

    private static float Uniform(NoiseKey key, uint counter) => ((Pcg(Pcg(counter ^ key.Low) + key.High) >> 8) + 1) * (1f / 16777216f);

    /// <summary>Value <paramref name="index"/> (below 2^32) of the tensor with <paramref name="key"/>: standard normal.</summary>
    public static float Normal(NoiseKey key, long index)
    {
        uint pair = (uint)(index >> 1);
        float r = MathF.Sqrt(-2 * MathF.Log(Uniform(key, 2 * pair)));
        float angle = MathF.PI * (2 * Uniform(key, 2 * pair + 1) - 1);
        return (index & 1) == 0 ? r * MathF.Cos(angle) : r * MathF.Sin(angle);
    }
}
