using System.Runtime.InteropServices;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using LoraCompiler.Tests.Reference;
using Xunit.Abstractions;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>
/// 4-bit base weights on the Vulkan backend, used packed (<see cref="VulkanQ4Tensor"/>): every kernel that
/// reads one (gemm_nt_q4, gemm_nn_q4, embedding_q4, and the LM head built from the gemm ones) against the
/// CPU backend's float32 kernel on the same weight dequantized (<see cref="Q4Weight.Dequantize"/>), the
/// same math: relative error under 1e-5, at sizes that are not multiples of any tile, with group sizes 16,
/// 32 and 64, with the weight split over several buffers; and a whole training step on a 4-bit tiny-qwen2
/// against the CPU backend and TorchSharp on the same weights within 1e-4.
/// </summary>
public sealed class VulkanQ4Tests(VulkanBackendFixture fixture, ITestOutputHelper output) : IClassFixture<VulkanBackendFixture>
{
    private const double Tolerance = 1e-5, GradientTolerance = 1e-4;

    private readonly Random _rng = new(4242);

    private float[] Random(long n, float scale = 1f) => ModelFixture.Normal(_rng, n, 0, scale);

    private Q4Weight RandomQ4(string name, int rows, int columns, int groupSize, float scale = 1f) =>
        Q4.Quantize(name, Random((long)rows * columns, scale), rows, columns, groupSize);

    private static float[] Dequantized(Q4Weight w)
    {
        var values = new float[(long)w.Rows * w.Columns];
        w.Dequantize(values);
        return values;
    }

    /// <summary>
    /// Runs <paramref name="op"/> on the CPU backend with the weight dequantized and on <paramref name="vulkan"/>
    /// with it packed, from the same float operands, and compares the named outputs.
    /// </summary>
    private Dictionary<string, float[]> Parity(VulkanBackend vulkan, Q4Weight weight, Action<IBackend, Func<string, Tensor>, Tensor> op,
        string[] compare, params (string Name, float[] Data)[] operands)
    {
        var expected = Run(new CpuBackend(2), b => b.Upload(weight.Name, Dequantized(weight)), op, operands);
        VulkanQ4Tensor? packed = null;
        var actual = Run(vulkan, b => packed = vulkan.Upload(weight), op, operands);
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
        Assert.NotNull(packed);
        foreach (var name in compare)
        {
            double error = ModelFixture.RelativeError(actual[name], expected[name]);
            output.WriteLine($"{name} ({weight.Rows}×{weight.Columns}, groups of {weight.GroupSize}, {packed!.PartCount} parts): relative error {error:E2}");
            Assert.True(error < Tolerance, $"{name}: relative error {error:E2} ≥ {Tolerance:E0}");
        }
        return actual;
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

    // ---------------------------------------------------------------- kernels

    [VulkanTheory]
    [InlineData(13, 96, 29, 16)]    // rows, columns and depth not multiples of the 64-tile
    [InlineData(70, 160, 150, 32)]  // several tiles in every dimension
    [InlineData(1, 64, 3, 64)]
    [InlineData(5, 200, 67, 8)]     // the smallest group: one word
    public void Linear(int T, int din, int dout, int groupSize)
    {
        var w = RandomQ4("w", dout, din, groupSize, 0.5f);
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
    [InlineData(16)]
    [InlineData(32)]
    public void Embedding(int groupSize)
    {
        const int T = 7, C = 96, vocab = 53;
        int[] tokens = [3, 52, 0, 3, 17, 40, 9, 11];
        var table = RandomQ4("table", vocab, C, groupSize);
        var r = Parity(fixture.Backend, table, (b, t, wt) => b.EmbeddingForward(t("x"), tokens, wt, T, C), ["x"], ("x", Random(T * C + 5)));
        // Row 52 exactly as dequantized on the host; beyond T·C untouched.
        var row = new float[C];
        table.DequantizeRow(52, row);
        Assert.Equal(row, r["x"].AsSpan(C, C).ToArray());
    }

    [VulkanTheory]
    [InlineData(7, 32, 301, 64, 16, 0f)]   // a partial last chunk
    [InlineData(5, 16, 50, 128, 16, 0f)]   // one chunk wider than the vocabulary
    [InlineData(9, 64, 600, 600, 32, 0f)]  // rows longer than a workgroup
    [InlineData(7, 32, 301, 64, 16, 3f)]   // softcapped logits, a partial last chunk
    [InlineData(9, 64, 600, 256, 32, 30f)] // softcapped, chunks across a workgroup's width, the last partial
    public void LmHeadCrossEntropy(int T, int C, int V, int chunk, int groupSize, float softcap)
    {
        var targets = Enumerable.Range(0, T).Select(t => t % 3 == 1 ? -1 : _rng.Next(V)).ToArray();
        targets[0] = V - 1;
        var losses = new Dictionary<string, float>();
        var w = RandomQ4("lm_head", V, C, groupSize, 0.5f);
        Parity(fixture.Backend, w, (b, t, wt) => losses[b.Name] = b.LmHeadCrossEntropy(t("dx"), t("logits"), t("x"), wt, targets, T, C, V, chunk, softcap),
            ["dx"], ("dx", Random(T * C)), ("logits", Random(T * Math.Min(chunk, V))), ("x", Random(T * C)));
        float cpu = losses.Single(l => l.Key.StartsWith("cpu")).Value, vk = losses.Single(l => l.Key.StartsWith("vulkan")).Value;
        output.WriteLine($"loss cpu {cpu} vulkan {vk}");
        Assert.InRange(Math.Abs(vk - cpu), 0, Tolerance * Math.Abs(cpu));
    }

    [VulkanTheory]
    [InlineData(1, 32, 301, 16, 0f)]   // one token (decoding), a partial 64-tile of the vocabulary
    [InlineData(3, 64, 600, 32, 0f)]
    [InlineData(1, 32, 301, 16, 3f)]   // softcapped
    [InlineData(70, 96, 130, 32, 2f)]  // several tiles in both dimensions, a cap below most logits
    public void LmHeadLogits(int T, int C, int V, int groupSize, float softcap)
    {
        var w = RandomQ4("lm_head", V, C, groupSize, 0.5f);
        Parity(fixture.Backend, w, (b, t, wt) => b.LmHeadLogits(t("logits"), t("x"), wt, T, C, V, softcap),
            ["logits"], ("logits", Enumerable.Repeat(float.NaN, T * V).ToArray()), ("x", Random(T * C)));
    }

    // ---------------------------------------------------------------- split weights

    [VulkanFact]
    public void WeightsSplitAcrossBuffers()
    {
        // Buffers of 1200 bytes: a row of 96 4-bit columns is 48 bytes of packed words, so 25 rows per
        // part; every product and the gather cross part boundaries (the LM head's chunks too), while
        // the activations (at most 288 floats) fit one buffer.
        using var vk = VulkanTestDevice.Create(new VulkanBackendOptions { MaxBufferBytes = 1200 });
        const int T = 3, C = 96, V = 53, dout = 29;
        int[] tokens = [52, 0, 29];
        int[] targets = [5, -1, 51];

        var table = RandomQ4("table", V, C, 16);
        Parity(vk, table, (b, t, wt) =>
        {
            if (wt is VulkanQ4Tensor q)
                Assert.Equal(3, q.PartCount);
            b.EmbeddingForward(t("x"), tokens, wt, T, C);
        }, ["x"], ("x", Random(T * C)));

        var w = RandomQ4("w", dout, C, 32, 0.5f);
        Parity(vk, w, (b, t, wt) => b.LinearForward(t("y"), t("x"), wt, t("bias"), T, C, dout),
            ["y"], ("y", Random(T * dout)), ("x", Random(T * C)), ("bias", Random(dout)));
        Parity(vk, w, (b, t, wt) => b.LinearBackwardInput(t("dx"), t("dy"), wt, T, C, dout, accumulate: false),
            ["dx"], ("dx", Random(T * C)), ("dy", Random(T * dout)));
        Parity(vk, table, (b, t, wt) => b.LmHeadCrossEntropy(t("dx"), t("logits"), t("x"), wt, targets, T, C, V, 12, 0f),
            ["dx"], ("dx", Random(T * C)), ("logits", Random(T * 12)), ("x", Random(T * C)));
        foreach (float softcap in new[] { 0f, 2f })
            Parity(vk, table, (b, t, wt) => b.LmHeadLogits(t("logits"), t("x"), wt, T, C, V, softcap),
                ["logits"], ("logits", Random(T * V)), ("x", Random(T * C)));

        // A row that does not fit one buffer is an error that says so.
        var e = Assert.Throws<VulkanException>(() => vk.Upload(RandomQ4("wide", 2, 4096, 64)));
        Assert.Contains("'wide'", e.Message);
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    [VulkanFact]
    public void Qwen2_5EmbeddingStaysPacked()
    {
        // The real Qwen2.5-0.5B embedding, 151936 × 896 in groups of 64 (random packed words and F16
        // scales, not quantized here: that would take long), under a 32 MB buffer limit: device memory
        // is the packed 68 MB plus 4 bytes per group, in three parts, and the gather reads all three.
        const int V = 151936, C = 896, G = 64;
        using var vk = VulkanTestDevice.Create(new VulkanBackendOptions { MaxBufferBytes = 32L << 20 });
        var packed = new uint[(long)V * C / 8];
        var bytes = MemoryMarshal.AsBytes(packed.AsSpan());
        _rng.NextBytes(bytes);
        var scales = Enumerable.Range(0, V * (C / G)).Select(_ => (Half)(0.01 + 0.02 * _rng.NextDouble())).ToArray();
        var biases = Enumerable.Range(0, V * (C / G)).Select(_ => (Half)(-0.15 * _rng.NextDouble())).ToArray();
        var weight = new Q4Weight("model.embed_tokens.weight", V, C, G, packed, scales, biases);

        var table = vk.Upload(weight);
        long expectedBytes = (long)V * C / 2 + (long)V * (C / G) * sizeof(uint);
        output.WriteLine($"{table}: {table.DeviceBytes / 1048576.0:F1} MB of device memory in {table.PartCount} parts (float32 would be {(long)V * C * 4 / 1048576.0:F0} MB)");
        Assert.Equal(expectedBytes, table.DeviceBytes);
        Assert.Equal(3, table.PartCount);

        int[] tokens = [0, V - 1, 74_898, 37_449, 112_347, 151_000, 5];
        int T = tokens.Length;
        using var x = vk.Allocate("x", (long)T * C);
        vk.EmbeddingForward(x, tokens, table, T, C);
        vk.ReleaseWeight(table);
        var actual = new float[T * C];
        vk.Download(x, actual);
        var expected = new float[T * C];
        for (int t = 0; t < T; t++)
            weight.DequantizeRow(tokens[t], expected.AsSpan(t * C, C));
        Assert.Equal(expected, actual);
        VulkanTestDevice.AssertNoValidationErrors(vk);
    }

    // ---------------------------------------------------------------- from a file

    [VulkanFact]
    public void MapWeightUploadsQuantizedTensorsPacked()
    {
        const int rows = 40, columns = 64, groupSize = 32;
        var dir = Directory.CreateTempSubdirectory("lora-q4-");
        try
        {
            var q = RandomQ4("model.layers.0.mlp.up_proj.weight", rows, columns, groupSize);
            var norm = Random(columns);
            string path = Path.Combine(dir.FullName, ModelWeights.SingleFileName);
            SafeTensorsWriter.WriteRaw(path, [.. Q4Tensors(q), Raw("model.norm.weight", [columns], norm)],
                new Dictionary<string, string> { [Q4.MetadataKey] = Q4.Metadata(groupSize) });
            using var weights = ModelWeights.Open(path);
            Assert.Null(weights.MapF32(q.Name)); // not F32: the CPU backend dequantizes it (it once got an empty mapping)
            Assert.Equal(columns, weights.MapF32("model.norm.weight")!.Value.Length);
            var vk = fixture.Backend;

            var mapped = Assert.IsType<VulkanQ4Tensor>(vk.MapWeight(weights, q.Name));
            Assert.Equal((rows, columns, groupSize), (mapped.Rows, mapped.Columns, mapped.GroupSize));
            Assert.Equal((long)rows * columns / 2 + rows * (columns / groupSize) * sizeof(uint), mapped.DeviceBytes);
            var floats = Assert.IsType<VulkanTensor>(vk.MapWeight(weights, "model.norm.weight"));

            // y = x·Wᵀ through the mapped weight equals the product with the dequantized file contents.
            const int T = 5;
            var x = Random(T * columns);
            using var xt = vk.Upload("x", x);
            using var y = vk.Allocate("y", T * rows);
            vk.LinearForward(y, xt, mapped, null, T, columns, rows);
            vk.ReleaseWeight(mapped);
            vk.ReleaseWeight(floats);
            var actual = new float[T * rows];
            vk.Download(y, actual);
            var cpu = new CpuBackend(1);
            var cy = cpu.Allocate("y", T * rows);
            cpu.LinearForward(cy, cpu.Upload("x", x), cpu.MapWeight(weights, q.Name), null, T, columns, rows);
            var expected = new float[T * rows];
            cpu.Download(cy, expected);
            Assert.True(ModelFixture.RelativeError(actual, expected) < Tolerance);

            // A packed weight is read only by the kernels that take weights.
            var again = vk.MapWeight(weights, q.Name);
            var e = Assert.Throws<ArgumentException>(() => vk.RmsNormForward(y, y, xt, again, 1, columns, 1e-5f, 0f));
            Assert.Contains("4-bit", e.Message);
            vk.ReleaseWeight(again);
            VulkanTestDevice.AssertNoValidationErrors(vk);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    // ---------------------------------------------------------------- a training step

    [VulkanTheory]
    [InlineData(19, null)]
    [InlineData(7, 6144L)]  // the embedding (and tied head) in two parts of 192 rows; an LM-head chunk spans both
    public void TrainingStepOn4BitTinyQwen2MatchesCpuAndTorch(int tokens, long? maxBufferBytes)
    {
        const int groupSize = 16; // divides tiny-qwen2's 64 and 176
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 13, tokens);
        string path = Path.Combine(fixture.Dir, "model-q4");
        var dequantized = WriteQuantized(model, fixture.Weights, groupSize, path);
        using var weights = ModelWeights.Open(path);
        Assert.True(weights.IsQuantized("model.embed_tokens.weight"));
        Assert.True(weights.IsQuantized("model.layers.0.mlp.down_proj.weight"));

        var (cpuLoss, cpuGradients) = Step(new CpuBackend(), model, fixture, weights);
        using var vulkan = VulkanTestDevice.Create(new VulkanBackendOptions { MaxBufferBytes = maxBufferBytes });
        using (var embedding = vulkan.Upload(weights.MapQ4("model.embed_tokens.weight")))
            Assert.Equal(maxBufferBytes is null ? 1 : 2, embedding.PartCount);
        var (loss, gradients) = Step(vulkan, model, fixture, weights);
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
        var (torchLoss, torchGradients) = TorchReference.LossAndGradients(fixture.ReferenceConfig, dequantized, fixture.Adapter, fixture.Tokens);
        output.WriteLine($"{vulkan.Name}: loss {loss} (cpu {cpuLoss}, torch on the dequantized weights {torchLoss})");

        Assert.InRange(Math.Abs(loss - cpuLoss), 0, 1e-5 * Math.Max(1, Math.Abs(cpuLoss)));
        Assert.InRange(Math.Abs(loss - torchLoss), 0, 1e-5 * Math.Max(1, Math.Abs(torchLoss)));
        Assert.Equal(torchGradients.Count, gradients.Count);
        double worst = 0;
        foreach (var (name, gradient) in gradients)
        {
            double vsCpu = ModelFixture.RelativeError(gradient, cpuGradients[name]);
            double vsTorch = ModelFixture.RelativeError(gradient, torchGradients[name]);
            Assert.True(vsCpu < GradientTolerance, $"{name}: relative error against the CPU backend {vsCpu:E2}");
            Assert.True(vsTorch < GradientTolerance, $"{name}: relative error against TorchSharp {vsTorch:E2}");
            worst = Math.Max(worst, Math.Max(vsCpu, vsTorch));
        }
        output.WriteLine($"worst relative error {worst:E2} over {gradients.Count} gradients");
    }

    private static (float Loss, Dictionary<string, float[]> Gradients) Step(IBackend backend, ModelInfo model, ModelFixture fixture, ModelWeights weights)
    {
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        using var trainer = model.Create(backend, weights, adapter, fixture.Tokens.Length);
        float loss = trainer.ForwardBackward(fixture.Tokens);
        var gradients = new Dictionary<string, float[]>();
        foreach (var (spec, da, db) in trainer.DownloadGradients())
        {
            gradients[spec.AName] = da;
            gradients[spec.BName] = db;
        }
        return (loss, gradients);
    }

    // ---------------------------------------------------------------- 4-bit files

    /// <summary>
    /// Writes <paramref name="floats"/> as a 4-bit model (every tensor <see cref="Q4.IsQuantizable"/> says,
    /// in groups of <paramref name="groupSize"/>; the rest F32) into <paramref name="folder"/>, and returns
    /// the weights as the file holds them, dequantized.
    /// </summary>
    internal static Dictionary<string, float[]> WriteQuantized(ModelInfo model, IReadOnlyDictionary<string, float[]> floats, int groupSize, string folder)
    {
        Directory.CreateDirectory(folder);
        var tensors = new List<(RawTensorSpec, ReadOnlyMemory<byte>)>();
        var values = new Dictionary<string, float[]>();
        foreach (var spec in model.BaseTensors)
        {
            if (Q4.IsQuantizable(spec.Name, spec.Shape))
            {
                var q = Q4.Quantize(spec.Name, floats[spec.Name], spec.Shape[0], spec.Shape[1], groupSize);
                tensors.AddRange(Q4Tensors(q));
                values[spec.Name] = Dequantized(q);
            }
            else
            {
                tensors.Add(Raw(spec.Name, spec.Shape, floats[spec.Name]));
                values[spec.Name] = floats[spec.Name];
            }
        }
        SafeTensorsWriter.WriteRaw(Path.Combine(folder, ModelWeights.SingleFileName), tensors,
            new Dictionary<string, string> { [Q4.MetadataKey] = Q4.Metadata(groupSize) });
        return values;
    }

    /// <summary>A 4-bit weight's three tensors as MLX names and stores them.</summary>
    private static IEnumerable<(RawTensorSpec, ReadOnlyMemory<byte>)> Q4Tensors(Q4Weight q)
    {
        yield return (new RawTensorSpec(q.Name, "U32", [q.Rows, q.WordsPerRow]), MemoryMarshal.AsBytes(q.Packed.Span).ToArray());
        yield return (new RawTensorSpec(Q4.ScalesName(q.Name), "F16", [q.Rows, q.GroupsPerRow]), MemoryMarshal.AsBytes(q.Scales.Span).ToArray());
        yield return (new RawTensorSpec(Q4.BiasesName(q.Name), "F16", [q.Rows, q.GroupsPerRow]), MemoryMarshal.AsBytes(q.Biases.Span).ToArray());
    }

    private static (RawTensorSpec, ReadOnlyMemory<byte>) Raw(string name, int[] shape, float[] values) =>
        (new RawTensorSpec(name, "F32", shape), MemoryMarshal.AsBytes(values.AsSpan()).ToArray());
}
