namespace LoraCompiler.Runtime.Backends;

/// <summary>A config's <c>rope_scaling</c>: how the rotary frequencies are rescaled for long contexts.</summary>
public abstract record RopeScaling;

/// <summary>Llama 3's <c>rope_scaling</c> with <c>rope_type: "llama3"</c>.</summary>
public sealed record Llama3RopeScaling(double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositionEmbeddings) : RopeScaling;

/// <summary><c>rope_type: "linear"</c> (Gemma 3's full-attention layers): positions divided by the factor.</summary>
public sealed record LinearRopeScaling(double Factor) : RopeScaling;

/// <summary>Rotary position tables as Hugging Face's <c>RotaryEmbedding</c> computes them.</summary>
public static class Rope
{
    /// <summary>inv_freq[j] = theta^(−2j / headDim), then the rescale of <paramref name="scaling"/> if given.</summary>
    public static double[] InverseFrequencies(int headDim, double theta, RopeScaling? scaling)
    {
        var inv = new double[headDim / 2];
        for (int j = 0; j < inv.Length; j++)
            inv[j] = 1.0 / Math.Pow(theta, 2.0 * j / headDim);
        return scaling switch
        {
            null => inv,
            LinearRopeScaling linear => Array.ConvertAll(inv, f => f / linear.Factor),
            Llama3RopeScaling llama3 => Llama3(inv, llama3),
            _ => throw new ArgumentException($"rope scaling {scaling} is not supported.", nameof(scaling)),
        };
    }

    private static double[] Llama3(double[] inv, Llama3RopeScaling scaling)
    {

        // transformers' _compute_llama3_parameters: long wavelengths are divided by the factor, short
        // ones kept, and the band between is interpolated smoothly.
        double lowWavelen = scaling.OriginalMaxPositionEmbeddings / scaling.LowFreqFactor;
        double highWavelen = scaling.OriginalMaxPositionEmbeddings / scaling.HighFreqFactor;
        for (int j = 0; j < inv.Length; j++)
        {
            double wavelen = 2 * Math.PI / inv[j];
            if (wavelen > lowWavelen)
                inv[j] /= scaling.Factor;
            else if (wavelen >= highWavelen)
            {
                double smooth = (scaling.OriginalMaxPositionEmbeddings / wavelen - scaling.LowFreqFactor)
                              / (scaling.HighFreqFactor - scaling.LowFreqFactor);
                inv[j] = (1 - smooth) * inv[j] / scaling.Factor + smooth * inv[j];
            }
        }
        return inv;
    }

    /// <summary>cos and sin of position·inv_freq, each [maxSeq, headDim/2].</summary>
    public static (float[] Cos, float[] Sin) Tables(int maxSeq, int headDim, double theta, RopeScaling? scaling)
    {
        var inv = InverseFrequencies(headDim, theta, scaling);
        int half = headDim / 2;
        var cos = new float[maxSeq * half];
        var sin = new float[maxSeq * half];
        for (int t = 0; t < maxSeq; t++)
            for (int j = 0; j < half; j++)
            {
                // Hugging Face computes the angle in float32: (float)t * (float)inv_freq.
                float angle = t * (float)inv[j];
                cos[t * half + j] = MathF.Cos(angle);
                sin[t * half + j] = MathF.Sin(angle);
            }
        return (cos, sin);
    }
}
