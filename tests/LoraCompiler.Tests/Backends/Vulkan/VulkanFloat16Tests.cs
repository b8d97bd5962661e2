using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Weights;
using Xunit.Abstractions;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>
/// 16-bit (F16 and BF16) base weights on the Vulkan backend, kept 16-bit on the device
/// (<see cref="VulkanFloat16Tensor"/>): the shaders' conversion of every finite bit pattern against
/// .NET's (System.Half) and the definition of bfloat16, exactly; every kernel that reads one
/// (gemm_nt_w16, gemm_nn_w16, embedding_w16, the LM head built from the gemm ones, the norms and the
/// bias through their storage-format push constants) against the CPU backend's float32 kernel on the
/// same values as float32, relative error under 1e-5, at sizes that are not multiples of any tile and
/// with the weight split over several buffers.
/// </summary>
public sealed class VulkanFloat16Tests(VulkanBackendFixture fixture, ITestOutputHelper output) : IClassFixture<VulkanBackendFixture>
{
    private const double Tolerance = 1e-5;

    private readonly Random _rng = new(1616);

    private float[] Random(long n, float scale = 1f) => ModelFixture.Normal(_rng, n, 0, scale);

    /// <summary>
    /// Runs <paramref name="op"/> on the CPU backend with the weight as float32 and on
    /// <paramref name="vulkan"/> with it 16-bit, from the same float operands, and compares the named outputs.
    /// </summary>
    private Dictionary<string, float[]> Parity(VulkanBackend vulkan, (Float16Weight Weight, float[] Values) w,
        Action<IBackend, Func<string, Tensor>, Tensor> op, string[] compare, params (string Name, float[] Data)[] operands)
    {
        var expected = Run(new CpuBackend(2), b => b.Upload(w.Weight.Name, w.Values), op, operands);
        VulkanFloat16Tensor? stored = null;
        var actual = Run(vulkan, b => stored = vulkan.Upload(w.Weight), op, operands);
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
        Assert.NotNull(stored);
        Assert.Equal(DeviceBytes(w.Weight, stored!.RowsPerPart), stored.DeviceBytes); // 16 bits a value on the device
        foreach (var name in compare)
        {
            double error = ModelFixture.RelativeError(actual[name], expected[name]);
            output.WriteLine($"{name} ({w.Weight}, {stored.PartCount} parts): relative error {error:E2}");
            Assert.True(error < Tolerance, $"{name}: relative error {error:E2} ≥ {Tolerance:E0}");
        }
        return actual;
    }

    /// <summary>The device bytes a 16-bit weight takes in parts of rowsPerPart rows: 2 a value, each part rounded up to whole uints.</summary>
    private static long DeviceBytes(Float16Weight w, int rowsPerPart)
    {
        long bytes = 0;
        for (int first = 0; first < w.Rows; first += rowsPerPart)
            bytes += ((long)Math.Min(rowsPerPart, w.Rows - first) * w.Columns + 1) / 2 * 4;
        return bytes;
    }

    private static Dictionary<string, float[]> Run(IBackend backend, Func<IBackend, Tensor> mapWeight, Action<IBackend, Func<string, Tensor>, Tensor> op,
        (string Name, float[] Data)[] operands)
    {
        var tensors = operands.ToDictionary(o => o.Name, o => backend.Upload(o.Name, o.Data));
        var weight = mapWeight(backend);
        op(backend, name => tensors[name], weight);
        backend.ReleaseWeight(weight);
        var results = new Dictionary<string, float[]>();
        foreach (var (name, data) in operands)
        {
            results[name] = new float[data.Length];
            backend.Download(tensors[name], results[name]);
            tensors[name].Dispose();
        }
        return results;
    }

    private static (Float16Weight, float[]) Random16(Float16Format format, int rows, int columns, int seed) =>
        Float16Tests.Random16(format, rows, columns, seed);

    // ---------------------------------------------------------------- the conversion

    [VulkanTheory]
    [InlineData(Float16Format.F16)]
    [InlineData(Float16Format.BF16)]
    public void The_shaders_convert_every_finite_bit_pattern_exactly(Float16Format format)
    {
        // Every finite pattern (subnormals and both zeros included) as rows of an embedding table.
        ushort exponent = format == Float16Format.F16 ? (ushort)0x7C00 : (ushort)0x7F80;
        var bits = Enumerable.Range(0, 65536).Select(i => (ushort)i).Where(b => (b & exponent) != exponent).ToList();
        const int C = 512;
        while (bits.Count % C != 0)
            bits.Add(0);
        int rows = bits.Count / C;
        var table = new Float16Weight("table", format, rows, C, bits.ToArray());
        int[] tokens = Enumerable.Range(0, rows).ToArray();
        var vk = fixture.Backend;
        using var stored = vk.Upload(table);
        using var x = vk.Allocate("x", (long)rows * C);
        vk.EmbeddingForward(x, tokens, stored, rows, C);
        var actual = new float[rows * C];
        vk.Download(x, actual);
        VulkanTestDevice.AssertNoValidationErrors(vk);
        for (int i = 0; i < bits.Count; i++)
        {
            float want = format == Float16Format.F16 ? (float)BitConverter.UInt16BitsToHalf(bits[i]) : BitConverter.Int32BitsToSingle(bits[i] << 16);
            Assert.True(BitConverter.SingleToUInt32Bits(want) == BitConverter.SingleToUInt32Bits(actual[i]),
                $"{format} {bits[i]:X4}: {actual[i]:R}, expected {want:R}");
        }
    }

    // ---------------------------------------------------------------- kernels

    [VulkanTheory]
    [InlineData(Float16Format.BF16, 13, 96, 29)]   // rows, columns and depth not multiples of the 64-tile
    [InlineData(Float16Format.F16, 70, 160, 150)]  // several tiles in every dimension
    [InlineData(Float16Format.BF16, 1, 63, 3)]     // odd width: rows start at odd elements (high halves)
    [InlineData(Float16Format.F16, 5, 201, 67)]
    public void Linear(Float16Format format, int T, int din, int dout)
    {
        var w = Random16(format, dout, din, seed: din + dout);
        var vk = fixture.Backend;
        Parity(vk, w, (b, t, wt) => b.LinearForward(t("y"), t("x"), wt, t("bias"), T, din, dout),
            ["y"], ("y", Random(T * dout)), ("x", Random(T * din)), ("bias", Random(dout)));
        Parity(vk, w, (b, t, wt) => b.LinearForward(t("y"), t("x"), wt, null, T, din, dout),
            ["y"], ("y", Random(T * dout)), ("x", Random(T * din)));
        foreach (bool accumulate in new[] { false, true })
            Parity(vk, w, (b, t, wt) => b.LinearBackwardInput(t("dx"), t("dy"), wt, T, din, dout, accumulate),
                ["dx"], ("dx", Random(T * din)), ("dy", Random(T * dout)));
    }

    [VulkanTheory]
    [InlineData(Float16Format.BF16)]
    [InlineData(Float16Format.F16)]
    public void Norm_weights_and_biases_read_as_16bit_vectors(Float16Format format)
    {
        const int T = 5, C = 77, din = 40;
        var vk = fixture.Backend;
        foreach (float offset in new[] { 0f, 1f })
        {
            var norm = Random16(format, 1, C, seed: 3 + (int)offset);
            Parity(vk, norm, (b, t, wt) => b.RmsNormForward(t("y"), t("rstd"), t("x"), wt, T, C, 1e-6f, offset),
                ["y", "rstd"], ("y", Random(T * C)), ("rstd", Random(T)), ("x", Random(T * C)));
            foreach (bool accumulate in new[] { false, true })
                Parity(vk, norm, (b, t, wt) => b.RmsNormBackward(t("dx"), t("dy"), t("x"), wt, t("rstd"), T, C, offset, accumulate),
                    ["dx"], ("dx", Random(T * C)), ("dy", Random(T * C)), ("x", Random(T * C)), ("rstd", ModelFixture.Normal(_rng, T, 1, 0.1f)));
        }
        // A 16-bit bias on a float weight: the bias is the mapped weight here.
        var bias = Random16(format, 1, C, seed: 5);
        float[] weight = Random(C * din);
        Parity(vk, bias, (b, t, wt) =>
        {
            using var w = b.Upload("w", weight);
            b.LinearForward(t("y"), t("x"), w, wt, T, din, C);
        }, ["y"], ("y", Random(T * C)), ("x", Random(T * din)));
    }

    [VulkanTheory]
    [InlineData(Float16Format.BF16)]
    [InlineData(Float16Format.F16)]
    public void Embedding(Float16Format format)
    {
        const int T = 7, C = 95, vocab = 53;
        int[] tokens = [3, 52, 0, 3, 17, 40, 9, 11];
        var table = Random16(format, vocab, C, seed: 8);
        var r = Parity(fixture.Backend, table, (b, t, wt) => b.EmbeddingForward(t("x"), tokens, wt, T, C), ["x"], ("x", Random(T * C + 5)));
        Assert.Equal(table.Item2.AsSpan(52 * C, C).ToArray(), r["x"].AsSpan(C, C).ToArray()); // row 52 exactly
    }

    [VulkanTheory]
    [InlineData(Float16Format.BF16, 7, 32, 301, 64, 0f)]  // a partial last chunk
    [InlineData(Float16Format.F16, 9, 64, 600, 600, 0f)]  // rows longer than a workgroup
    [InlineData(Float16Format.BF16, 7, 33, 301, 64, 3f)]  // softcapped, odd width
    public void LmHeadCrossEntropy(Float16Format format, int T, int C, int V, int chunk, float softcap)
    {
        var targets = Enumerable.Range(0, T).Select(t => t % 3 == 1 ? -1 : _rng.Next(V)).ToArray();
        targets[0] = V - 1;
        var losses = new Dictionary<string, float>();
        var w = Random16(format, V, C, seed: V);
        Parity(fixture.Backend, w, (b, t, wt) => losses[b.Name] = b.LmHeadCrossEntropy(t("dx"), t("logits"), t("x"), wt, targets, T, C, V, chunk, softcap),
            ["dx"], ("dx", Random(T * C)), ("logits", Random(T * Math.Min(chunk, V))), ("x", Random(T * C)));
        float cpu = losses.Single(l => l.Key.StartsWith("cpu")).Value, vk = losses.Single(l => l.Key.StartsWith("vulkan")).Value;
        Assert.InRange(Math.Abs(vk - cpu), 0, Tolerance * Math.Abs(cpu));
    }

    [VulkanFact]
    public void WeightsSplitAcrossBuffers()
    {
        // Buffers of 1200 bytes: a row of 95 16-bit values is 190 bytes, so 6 rows per part (9 parts of
        // a 53-row table), each part starting on a uint while rows start on odd elements inside it.
        using var vk = VulkanTestDevice.Create(new VulkanBackendOptions { MaxBufferBytes = 1200 });
        const int T = 3, C = 95, V = 53, dout = 29;
        int[] tokens = [52, 0, 29];
        int[] targets = [5, -1, 51];
        var table = Random16(Float16Format.BF16, V, C, seed: 11);
        Parity(vk, table, (b, t, wt) =>
        {
            if (wt is VulkanFloat16Tensor h)
                Assert.Equal(9, h.PartCount);
            b.EmbeddingForward(t("x"), tokens, wt, T, C);
        }, ["x"], ("x", Random(T * C)));
        var w = Random16(Float16Format.F16, dout, C, seed: 12);
        Parity(vk, w, (b, t, wt) => b.LinearForward(t("y"), t("x"), wt, t("bias"), T, C, dout),
            ["y"], ("y", Random(T * dout)), ("x", Random(T * C)), ("bias", Random(dout)));
        Parity(vk, w, (b, t, wt) => b.LinearBackwardInput(t("dx"), t("dy"), wt, T, C, dout, accumulate: false),
            ["dx"], ("dx", Random(T * C)), ("dy", Random(T * dout)));
        Parity(vk, table, (b, t, wt) => b.LmHeadCrossEntropy(t("dx"), t("logits"), t("x"), wt, targets, T, C, V, 12, 0f),
            ["dx"], ("dx", Random(T * C)), ("logits", Random(T * 12)), ("x", Random(T * C)));

        // A row that does not fit one buffer is an error that says so.
        var e = Assert.Throws<VulkanException>(() => vk.Upload(Random16(Float16Format.BF16, 2, 700, 13).Item1));
        Assert.Contains("'w'", e.Message);
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    [VulkanFact]
    public void MapWeightUploadsBF16TensorsAs16Bit()
    {
        string dir = Directory.CreateTempSubdirectory("lora-vk-f16-").FullName;
        try
        {
            string path = Path.Combine(dir, "model.safetensors");
            SafeTensorsWriter.Write(path, [("w", [40, 64], Random(40 * 64)), ("norm", [64], Random(64))], "BF16");
            using var weights = ModelWeights.Open(path);
            var vk = fixture.Backend;
            foreach (var name in new[] { "w", "norm" })
            {
                var mapped = Assert.IsType<VulkanFloat16Tensor>(vk.MapWeight(weights, name));
                Assert.Equal(Float16Format.BF16, mapped.Format);
                Assert.Equal(weights.Info(name).Elements * 2, mapped.DeviceBytes); // 2 bytes a value, not 4
                vk.ReleaseWeight(mapped);
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
