using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Weights;

/// <summary>
/// 16-bit (F16 and BF16) weights used as stored: the conversion of every bit pattern against .NET's
/// own (System.Half) and the definition of bfloat16 (the upper half of a float32); each kernel that
/// reads a 16-bit weight against a plain float64 product of the same values as float32; and the CPU
/// backend mapping such a weight in place.
/// </summary>
public sealed class Float16Tests : IDisposable
{
    /// <summary>A float32 product against its float64 reference on the same values.</summary>
    private const double Tolerance = 1e-5;

    private readonly string _dir = Directory.CreateTempSubdirectory("lora-f16-tests-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    // ================================================================ conversion

    [Theory]
    [InlineData(Float16Format.F16)]
    [InlineData(Float16Format.BF16)]
    public unsafe void Every_bit_pattern_converts_exactly(Float16Format format)
    {
        // Every 16-bit pattern, then 7 more for the scalar tail after the widest vectors.
        var bits = Enumerable.Range(0, 65536 + 7).Select(i => (ushort)(i * 40503)).ToArray();
        var floats = new float[bits.Length];
        fixed (ushort* b = bits) fixed (float* f = floats)
            CpuKernels.Float16ToSingle(b, f, bits.Length, format);
        for (int i = 0; i < bits.Length; i++)
        {
            float want = format == Float16Format.F16
                ? (float)BitConverter.UInt16BitsToHalf(bits[i])
                : BitConverter.Int32BitsToSingle(bits[i] << 16);
            if (float.IsNaN(want))
                Assert.True(float.IsNaN(floats[i]), $"{bits[i]:X4}");
            else
                Assert.Equal(BitConverter.SingleToUInt32Bits(want), BitConverter.SingleToUInt32Bits(floats[i]));
        }
    }

    // ================================================================ kernels

    /// <summary>Sizes that are not multiples of any tile; two depth blocks; one row (decoding).</summary>
    public static TheoryData<int, int, int, int> LinearSizes => new()
    {
        { 13, 96, 53, 1 },
        { 37, 203, 61, 2 },     // odd widths: rows of W start at odd elements
        { 130, 1088, 100, 2 },  // two depth blocks in the NT product
        { 300, 64, 700, 2 },    // more rows than one tile holds, many column tiles
        { 1, 896, 301, 2 },
        { 3, 17, 5, 1 },
    };

    [Theory]
    [MemberData(nameof(LinearSizes))]
    public void Linear_forward_and_input_gradient_with_16bit_weights_match_a_float64_product(int T, int din, int dout, int threads)
    {
        foreach (var format in new[] { Float16Format.F16, Float16Format.BF16 })
        {
            var (w16, w) = Random16(format, dout, din, seed: T + din);
            float[] x = Rand(T * din, 1), bias = Rand(dout, 2), dy = Rand(T * dout, 3);
            foreach (bool withBias in new[] { false, true })
            {
                float[] actual = Rand(T * dout, 4); // = overwrites
                CpuKernels.LinearForward(actual, x, w16, withBias ? bias : default, T, din, dout, threads);
                var want = new double[T * dout];
                for (int t = 0; t < T; t++)
                    for (int r = 0; r < dout; r++)
                    {
                        double sum = withBias ? bias[r] : 0;
                        for (int k = 0; k < din; k++)
                            sum += (double)x[t * din + k] * w[r * din + k];
                        want[t * dout + r] = sum;
                    }
                AssertClose(want, actual, $"{format} y, bias {withBias}");
            }
            foreach (bool accumulate in new[] { false, true })
            {
                float[] before = Rand(T * din, 5), actual = (float[])before.Clone();
                CpuKernels.LinearBackwardInput(actual, dy, w16, T, din, dout, accumulate, threads);
                var want = new double[T * din];
                for (int t = 0; t < T; t++)
                    for (int k = 0; k < din; k++)
                    {
                        double sum = accumulate ? before[t * din + k] : 0;
                        for (int r = 0; r < dout; r++)
                            sum += (double)dy[t * dout + r] * w[r * din + k];
                        want[t * din + k] = sum;
                    }
                AssertClose(want, actual, $"{format} dx, accumulate {accumulate}");
            }
        }
    }

    [Theory]
    [InlineData(Float16Format.F16)]
    [InlineData(Float16Format.BF16)]
    public void Embedding_with_a_16bit_table_gathers_the_rows_as_float32(Float16Format format)
    {
        var (table16, table) = Random16(format, 301, 45, seed: 9);
        int[] tokens = [0, 300, 7, 7, 150];
        float[] actual = Rand(5 * 45, 10);
        CpuKernels.EmbeddingForward(actual, tokens, table16, 5, 45);
        for (int t = 0; t < tokens.Length; t++)
            Assert.Equal(table.AsSpan(tokens[t] * 45, 45).ToArray(), actual.AsSpan(t * 45, 45).ToArray());
        Assert.Throws<ArgumentException>(() => CpuKernels.EmbeddingForward(actual, [301], table16, 1, 45));
    }

    [Theory]
    [InlineData(Float16Format.BF16, 9, 48, 301, 64, 1, 0f)]  // partial last chunk, rows labelled −1
    [InlineData(Float16Format.F16, 9, 48, 301, 64, 2, 0f)]
    [InlineData(Float16Format.BF16, 13, 33, 200, 500, 2, 0f)] // one chunk bigger than V, odd width
    [InlineData(Float16Format.F16, 13, 32, 200, 64, 2, 3f)]   // softcapped
    public void LmHead_with_a_16bit_weight_matches_a_float64_reference(Float16Format format, int T, int C, int V, int chunk, int threads, float softcap)
    {
        var (w16, w) = Random16(format, V, C, seed: V + C);
        float[] x = Rand(T * C, 9);
        var rng = new Random(10);
        int[] targets = Enumerable.Range(0, T).Select(t => t % 3 == 2 ? -1 : rng.Next(V)).ToArray();
        targets[0] = V - 1; // a label in the partial last chunk
        float[] logits = new float[T * Math.Min(chunk, V)], dx = Rand(T * C, 11);
        float loss = CpuKernels.LmHeadCrossEntropy(dx, logits, x, w16, targets, T, C, V, chunk, softcap, threads);

        double wantLoss = 0;
        var wantDx = new double[T * C];
        int count = targets.Count(t => t >= 0);
        for (int t = 0; t < T; t++)
        {
            if (targets[t] < 0)
                continue;
            var z = new double[V];
            for (int v = 0; v < V; v++)
            {
                double l = 0;
                for (int i = 0; i < C; i++)
                    l += (double)x[t * C + i] * w[v * C + i];
                z[v] = softcap > 0 ? softcap * Math.Tanh(l / softcap) : l;
            }
            double max = z.Max(), sum = z.Sum(zv => Math.Exp(zv - max));
            wantLoss += (max + Math.Log(sum) - z[targets[t]]) / count;
            for (int v = 0; v < V; v++)
            {
                double tau = softcap > 0 ? z[v] / softcap : 0; // ∂z/∂l = 1 − tanh²
                double d = (Math.Exp(z[v] - max) / sum - (v == targets[t] ? 1 : 0)) / count * (1 - tau * tau);
                for (int i = 0; i < C; i++)
                    wantDx[t * C + i] += d * w[v * C + i];
            }
        }
        Assert.True(Math.Abs(loss - wantLoss) <= 1e-5 * wantLoss, $"loss {loss} vs {wantLoss}");
        double error = ModelFixture.RelativeError(dx, Array.ConvertAll(wantDx, d => (float)d));
        Assert.True(error < 1e-4, $"dx: relative error {error:E2}");
    }

    // ================================================================ the backend

    [Theory]
    [InlineData("BF16")]
    [InlineData("F16")]
    public void The_cpu_backend_maps_16bit_weights_in_place_and_its_kernels_read_them_as_float32(string dtype)
    {
        const int T = 3, C = 40, V = 50;
        string path = Path.Combine(_dir, $"{dtype}.safetensors");
        SafeTensorsWriter.Write(path, [
            ("norm.weight", [C], Rand(C, 20, 0.5, 1.5)), ("proj.bias", [C], Rand(C, 21)),
            ("proj.weight", [C, C], Rand(C * C, 22)), ("embed.weight", [V, C], Rand(V * C, 23))], dtype);
        using var model = ModelWeights.Open(path);
        using var backend = new CpuBackend(threads: 2);
        string[] names = ["norm.weight", "proj.bias", "proj.weight", "embed.weight"];
        var mapped = names.Select(n => backend.MapWeight(model, n)).ToArray();
        foreach (var weight in mapped)
        {
            var half = Assert.IsType<CpuFloat16Tensor>(weight);
            Assert.True(half.IsFileMapped);
            Assert.Equal(dtype, half.Weight.Dtype);
        }
        Assert.Equal((V, C), (((CpuFloat16Tensor)mapped[3]).Weight.Rows, ((CpuFloat16Tensor)mapped[3]).Weight.Columns));
        // The same kernels on float32 tensors holding the values the file stores (read by the file reader).
        var floats = names.Select(n => backend.Upload(n, model.Read(n))).ToArray();
        var (w, b, m, e) = (mapped[0], mapped[1], mapped[2], mapped[3]);
        var (wf, bf, mf, ef) = (floats[0], floats[1], floats[2], floats[3]);

        using var x = backend.Upload("x", Rand(T * C, 24));
        using var dy = backend.Upload("dy", Rand(T * C, 25));
        using var rstd = backend.Upload("rstd", Rand(T, 26, 0.5, 2));
        foreach (float offset in new[] { 0f, 1f })
        {
            Assert.Equal(Run(y => backend.RmsNormForward(y, Scratch(T), x, wf, T, C, 1e-6f, offset)),
                         Run(y => backend.RmsNormForward(y, Scratch(T), x, w, T, C, 1e-6f, offset)));
            Assert.Equal(Run(dx => backend.RmsNormBackward(dx, dy, x, wf, rstd, T, C, offset, accumulate: true)),
                         Run(dx => backend.RmsNormBackward(dx, dy, x, w, rstd, T, C, offset, accumulate: true)));
        }
        AssertClose(Array.ConvertAll(Run(y => backend.LinearForward(y, x, mf, bf, T, C, C)), v => (double)v),
                    Run(y => backend.LinearForward(y, x, m, b, T, C, C)), "linear with a 16-bit weight and bias");
        int[] tokens = [49, 0, 7];
        float[] gathered = Run(y => backend.EmbeddingForward(y, tokens, ef, T, C));
        Assert.Equal(gathered, Run(y => backend.EmbeddingForward(y, tokens, e, T, C)));

        backend.ReleaseWeight(e); // the pages are dropped and read again from the file when touched
        Assert.Equal(gathered, Run(y => backend.EmbeddingForward(y, tokens, e, T, C)));

        var refused = Assert.Throws<ArgumentException>(() => backend.AddInPlace(x, m, 4));
        Assert.Contains("16-bit weight", refused.Message);
    }

    /// <summary>Runs a kernel into a fresh output of T·C floats (garbage first: = must overwrite it) and returns it.</summary>
    private static float[] Run(Action<Tensor> kernel)
    {
        var output = new CpuTensor("out", Rand(3 * 40, 30));
        kernel(output);
        return output.Span.ToArray();
    }

    private static CpuTensor Scratch(int n) => new("scratch", new float[n]);

    [Fact]
    public void A_16bit_tensor_at_an_odd_offset_is_copied_not_mapped_and_reads_right()
    {
        // A one-byte tensor first puts the BF16 data at an odd offset in the file.
        string path = Path.Combine(_dir, "odd.safetensors");
        float[] values = [1.5f, -2.25f, 0.375f, 1024f, -0.0078125f, 3f];
        var bits = values.Select(v => (ushort)(BitConverter.SingleToUInt32Bits(v) >> 16)).ToArray(); // exact in BF16
        SafeTensorsWriter.WriteRaw(path, [
            SafeTensorsWriter.Raw<byte>("pad", "U8", [1], [7]),
            SafeTensorsWriter.Raw<ushort>("w", "BF16", [2, 3], bits)]);
        using var model = ModelWeights.Open(path);
        using var backend = new CpuBackend(1);
        var half = Assert.IsType<CpuFloat16Tensor>(backend.MapWeight(model, "w"));
        Assert.False(half.IsFileMapped); // a copy of the bits, still 16-bit
        float[] gathered = Run(y => backend.EmbeddingForward(y, [1, 0], half, 2, 3));
        Assert.Equal([1024f, -0.0078125f, 3f, 1.5f, -2.25f, 0.375f], gathered.AsSpan(0, 6).ToArray());
        backend.ReleaseWeight(half); // nothing to drop: the copy is not a file mapping
        Assert.Equal(gathered, Run(y => backend.EmbeddingForward(y, [1, 0], half, 2, 3)));
    }

    [Fact]
    public void A_16bit_weight_holding_a_NaN_is_refused_naming_the_file_and_the_tensor()
    {
        string path = Path.Combine(_dir, "nan.safetensors");
        SafeTensorsWriter.Write(path, [("w", [2, 3], [1f, 2f, float.NaN, 4f, 5f, 6f])], "BF16");
        using var model = ModelWeights.Open(path);
        using var backend = new CpuBackend(1);
        var e = Assert.Throws<WeightsException>(() => backend.MapWeight(model, "w"));
        Assert.Contains(path, e.Message);
        Assert.Contains("'w'", e.Message);
        Assert.Contains("NaN", e.Message);
    }

    // ================================================================ helpers

    /// <summary>A random 16-bit weight and its values as float32 (widened by .NET's Half, or by placing the bits in a float32's upper half).</summary>
    internal static (Float16Weight Weight, float[] Values) Random16(Float16Format format, int rows, int columns, int seed)
    {
        float[] original = Rand(rows * columns, seed);
        var bits = new ushort[original.Length];
        var values = new float[original.Length];
        for (int i = 0; i < bits.Length; i++)
        {
            if (format == Float16Format.F16)
            {
                bits[i] = BitConverter.HalfToUInt16Bits((Half)original[i]);
                values[i] = (float)BitConverter.UInt16BitsToHalf(bits[i]);
            }
            else
            {
                bits[i] = (ushort)(BitConverter.SingleToUInt32Bits(original[i]) >> 16); // truncation is a bfloat16 as good as any
                values[i] = BitConverter.Int32BitsToSingle(bits[i] << 16);
            }
        }
        return (new Float16Weight("w", format, rows, columns, bits), values);
    }

    private static float[] Rand(int n, int seed, double lo = -1, double hi = 1)
    {
        var rng = new Random(seed);
        var a = new float[n];
        for (int i = 0; i < n; i++)
            a[i] = (float)(lo + (hi - lo) * rng.NextDouble());
        return a;
    }

    private static void AssertClose(double[] want, float[] got, string what)
    {
        Assert.All(got, v => Assert.True(float.IsFinite(v), $"{what}: non-finite value"));
        double diff = 0, norm = 0;
        for (int i = 0; i < want.Length; i++)
        {
            diff += (got[i] - want[i]) * (got[i] - want[i]);
            norm += want[i] * want[i];
        }
        double error = Math.Sqrt(diff / norm);
        Assert.True(error < Tolerance, $"{what}: relative error {error:E2} against the float64 product");
    }
}
