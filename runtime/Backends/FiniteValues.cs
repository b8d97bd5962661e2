using System.Numerics.Tensors;

namespace LoraCompiler.Runtime.Backends;

/// <summary>Whether host values are all finite: one vectorized pass (the largest magnitude is NaN or ∞ when one is not).</summary>
public static class FiniteValues
{
    /// <summary>True when every value is finite; otherwise <paramref name="hasNaN"/> tells a NaN from an infinity.</summary>
    public static bool All(ReadOnlySpan<float> values, out bool hasNaN)
    {
        hasNaN = false;
        if (values.IsEmpty || float.IsFinite(TensorPrimitives.MaxMagnitude(values)))
            return true;
        foreach (float v in values)
            hasNaN |= float.IsNaN(v);
        return false;
    }
}
