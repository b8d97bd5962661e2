using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Weights;

/// <summary>
/// 4-bit weights: the format against hand-computed bits, files assembled byte by byte, the checks
/// on a quantized model, each kernel that reads 4-bit weights against the float32 kernel on the
/// dequantized weights, and a whole gradient step with 4-bit weights against the same step on a
/// float32 file of the dequantized weights.
/// </summary>
public sealed class Q4Tests : IDisposable
{
    /// <summary>The 4-bit kernels do the float kernels' arithmetic on the same values: equal to rounding.</summary>
    private const double SameMath = 1e-5;

    private readonly string _dir = Directory.CreateTempSubdirectory("lora-q4-tests-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    // ================================================================ the format

    [Fact]
    public void Packing_puts_element_j_in_bits_4j_of_word_j_over_8()
    {
        // Row 0: levels 0..15 (scale 1, bias 0). Row 1: bias −1, scale 0.5, levels in a scrambled
        // order. Row 2: a constant row (scale 0: every level 0, the value in the bias).
        int[] scrambled = [3, 0, 15, 7, 1, 2, 9, 4, 8, 5, 6, 10, 11, 12, 13, 14];
        float[] w =
        [
            .. Enumerable.Range(0, 16).Select(q => (float)q),
            .. scrambled.Select(q => -1f + 0.5f * q),
            .. Enumerable.Repeat(0.3f, 16),
        ];
        var q4 = Q4.Quantize("p.weight", w, 3, 16, groupSize: 16);

        Assert.Equal([0x76543210u, 0xFEDCBA98u, 0x49217F03u, 0xEDCBA658u, 0u, 0u], q4.Packed.ToArray());
        Assert.Equal([(Half)1f, (Half)0.5f, (Half)0f], q4.Scales.ToArray());
        Assert.Equal([(Half)0f, (Half)(-1f), (Half)0.3f], q4.Biases.ToArray());

        var back = new float[48];
        q4.Dequantize(back);
        Assert.Equal(w.AsSpan(0, 32).ToArray(), back.AsSpan(0, 32).ToArray()); // every value on a level: exact
        Assert.All(back.AsSpan(32).ToArray(), v => Assert.Equal((float)(Half)0.3f, v));
    }

    [Fact]
    public void Each_group_has_its_own_scale_and_bias()
    {
        // Groups of 8: 10 + 2q and −3 + q/4, each using levels 0 and 15.
        int[] first = [0, 15, 1, 2, 3, 4, 5, 6], second = [15, 14, 13, 12, 11, 10, 9, 0];
        float[] w = [.. first.Select(q => 10f + 2f * q), .. second.Select(q => -3f + 0.25f * q)];
        var q4 = Q4.Quantize("p.weight", w, 1, 16, groupSize: 8);
        Assert.Equal([0x654321F0u, 0x09ABCDEFu], q4.Packed.ToArray());
        Assert.Equal([(Half)2f, (Half)0.25f], q4.Scales.ToArray());
        Assert.Equal([(Half)10f, (Half)(-3f)], q4.Biases.ToArray());
        var row = new float[16];
        q4.DequantizeRow(0, row);
        Assert.Equal(w, row);
    }

    [Theory]
    [InlineData(64)]
    [InlineData(32)]
    [InlineData(40)] // 5 words a group: the vector path's two-word steps and its one-word tail
    public void Dequantized_values_are_within_half_a_step_and_decode_as_the_bits_say(int groupSize)
    {
        const int Rows = 37, Columns = 320;
        var rng = new Random(groupSize);
        // Weights as trained models have them, with an offset per row.
        var w = ModelFixture.Normal(rng, Rows * Columns, 0, 0.02f);
        for (int r = 0; r < Rows; r++)
            for (int j = 0; j < Columns; j++)
                w[r * Columns + j] += 0.01f * (r % 5 - 2);
        var q4 = Q4.Quantize("p.weight", w, Rows, Columns, groupSize);
        var back = new float[Rows * Columns];
        q4.Dequantize(back);

        int groups = Columns / groupSize;
        for (int r = 0; r < Rows; r++)
            for (int j = 0; j < Columns; j++)
            {
                int g = r * groups + j / groupSize;
                float scale = (float)q4.Scales.Span[g], bias = (float)q4.Biases.Span[g];
                // Decoded here from the words, independently of Q4's vector code.
                uint q = (q4.Packed.Span[r * (Columns / 8) + j / 8] >> (4 * (j % 8))) & 0xF;
                int i = r * Columns + j;
                Assert.Equal(MathF.FusedMultiplyAdd(scale, q, bias), back[i]);
                Assert.True(MathF.Abs(w[i] - back[i]) <= scale / 2 + 1e-7f, $"[{r}, {j}]: {w[i]} -> {back[i]}, scale {scale}");
            }
        // The levels are used: each group's minimum is level 0 and its maximum level 15 (or 14 when
        // the F16 rounding of the scale pushes it just past 14.5).
        Assert.Contains(q4.Packed.ToArray(), word => (word & 0xF) == 0xF || (word >> 28) == 0xF);
    }

    [Fact]
    public void Quantize_refuses_rows_that_are_not_whole_groups_and_values_that_are_not_finite()
    {
        Assert.Contains("not a whole number of groups of 64", Assert.Throws<ArgumentException>(() => Q4.Quantize("p.weight", new float[96], 1, 96)).Message);
        Assert.Contains("multiple of 8", Assert.Throws<ArgumentException>(() => Q4.Quantize("p.weight", new float[96], 1, 96, 12)).Message);
        var w = new float[16];
        w[3] = float.NaN;
        Assert.Contains("not finite", Assert.Throws<ArgumentException>(() => Q4.Quantize("p.weight", w, 1, 16, 16)).Message);
        w[3] = 1e6f;
        Assert.Contains("F16", Assert.Throws<ArgumentException>(() => Q4.Quantize("p.weight", w, 1, 16, 16)).Message);
    }

    [Fact]
    public void Names_follow_MLX_and_only_linear_and_embedding_weights_are_quantized()
    {
        Assert.Equal("model.layers.3.mlp.up_proj.scales", Q4.ScalesName("model.layers.3.mlp.up_proj.weight"));
        Assert.Equal("lm_head.biases", Q4.BiasesName("lm_head.weight"));
        Assert.True(Q4.IsQuantizable("model.layers.0.self_attn.q_proj.weight", [64, 64]));
        Assert.True(Q4.IsQuantizable("model.embed_tokens.weight", [320, 64]));
        Assert.True(Q4.IsQuantizable("lm_head.weight", [320, 64]));
        Assert.False(Q4.IsQuantizable("model.layers.0.self_attn.q_proj.bias", [64]));
        Assert.False(Q4.IsQuantizable("model.layers.0.input_layernorm.weight", [64]));
        Assert.False(Q4.IsQuantizable("model.norm.weight", [64]));
    }

    // ================================================================ files

    /// <summary>A safetensors file assembled byte by byte, independent of the writer.</summary>
    private static byte[] HandMade(string header, params byte[][] data)
    {
        byte[] json = Encoding.UTF8.GetBytes(header);
        var bytes = new List<byte>(BitConverter.GetBytes((ulong)json.Length));
        bytes.AddRange(json);
        foreach (var d in data)
            bytes.AddRange(d);
        return bytes.ToArray();
    }

    private static byte[] U32(params uint[] values) => values.SelectMany(v => { var b = new byte[4]; BinaryPrimitives.WriteUInt32LittleEndian(b, v); return b; }).ToArray();

    /// <summary>The two groups of <see cref="Each_group_has_its_own_scale_and_bias"/>, as the file holds them.</summary>
    private static string HandMadeQ4(string dir, string metadata = """{"bits":4,"group_size":8,"mode":"affine"}""",
        string scalesDtype = "F16", string scalesShape = "[1, 2]", string biasesShape = "[1, 2]", bool withBiases = true)
    {
        // Scales and biases hold the two groups' values, as many as the (possibly wrong) shape says.
        static int Count(string shape) => shape.Trim('[', ']').Split(',').Aggregate(1, (n, d) => n * int.Parse(d));
        float[] scaleValues = [.. new[] { 2f, 0.25f }.Take(Count(scalesShape))];
        Half[] biasValues = [.. new[] { (Half)10f, (Half)(-3f) }.Take(Count(biasesShape))];
        byte[] scales = scalesDtype == "F32"
            ? [.. scaleValues.SelectMany(BitConverter.GetBytes)]
            : [.. scaleValues.SelectMany(v => BitConverter.GetBytes((Half)v))];
        byte[] biases = withBiases ? [.. biasValues.SelectMany(BitConverter.GetBytes)] : [];
        string header = $$"""
            {"__metadata__": {"format": "mlx", "quantization": {{JsonSerializer.Serialize(metadata)}}},
             "layer.weight": {"dtype": "U32", "shape": [1, 2], "data_offsets": [0, 8]},
             "layer.scales": {"dtype": "{{scalesDtype}}", "shape": {{scalesShape}}, "data_offsets": [8, {{8 + scales.Length}}]}
             {{(withBiases ? $$""", "layer.biases": {"dtype": "F16", "shape": {{biasesShape}}, "data_offsets": [{{8 + scales.Length}}, {{8 + scales.Length + biases.Length}}]}""" : "")}}}
            """;
        string path = Path.Combine(dir, "model.safetensors");
        Directory.CreateDirectory(dir);
        File.WriteAllBytes(path, HandMade(header, U32(0x654321F0, 0x09ABCDEF), scales, biases));
        return path;
    }

    private static readonly float[] HandMadeValues = [10, 40, 12, 14, 16, 18, 20, 22, 0.75f, 0.5f, 0.25f, 0, -0.25f, -0.5f, -0.75f, -3];

    [Fact]
    public void A_hand_assembled_4bit_file_is_mapped_in_place_and_read_dequantized()
    {
        string path = HandMadeQ4(PathOf("hand"));
        using var model = ModelWeights.Open(path);

        Assert.True(model.IsQuantized("layer.weight"));
        Assert.Equal([1, 16], model.Shape("layer.weight"));
        Assert.Equal("U32", model.Info("layer.weight").Dtype);
        model.Validate([new TensorSpec("layer.weight", [1, 16])]);

        var q4 = model.MapQ4("layer.weight");
        Assert.Equal((1, 16, 8), (q4.Rows, q4.Columns, q4.GroupSize));
        Assert.Equal([0x654321F0u, 0x09ABCDEFu], q4.Packed.ToArray());
        Assert.Equal([(Half)10f, (Half)(-3f)], q4.Biases.ToArray());
        Assert.Equal(HandMadeValues, model.Read("layer.weight"));
        var span = new float[16];
        model.Read("layer.weight", span);
        Assert.Equal(HandMadeValues, span);
        Assert.Throws<ArgumentException>(() => model.Read("layer.weight", new float[15]));
    }

    [Fact]
    public void The_writer_writes_raw_tensors_that_read_back_as_the_hand_assembled_file()
    {
        string path = PathOf("raw.safetensors");
        SafeTensorsWriter.WriteRaw(path,
        [
            SafeTensorsWriter.Raw<uint>("layer.weight", "U32", [1, 2], [0x654321F0, 0x09ABCDEF]),
            SafeTensorsWriter.Raw<Half>("layer.scales", "F16", [1, 2], [(Half)2f, (Half)0.25f]),
            SafeTensorsWriter.Raw<Half>("layer.biases", "F16", [1, 2], [(Half)10f, (Half)(-3f)]),
        ], new Dictionary<string, string> { [Q4.MetadataKey] = Q4.Metadata(8) });
        using var model = ModelWeights.Open(path);
        Assert.Equal(HandMadeValues, model.Read("layer.weight"));
        using (var file = SafeTensorsFile.Open(path))
            Assert.Equal(Q4.Metadata(8), file.Metadata[Q4.MetadataKey]);

        var e = Assert.Throws<WeightsException>(() => SafeTensorsWriter.WriteRaw(PathOf("short.safetensors"),
            [new RawTensorSpec("w", "U32", [3])], (_, stream) => stream.Write(new byte[8])));
        Assert.Contains("tensor 'w' got 8 bytes of data but U32 [3] needs 12", e.Message);
        Assert.False(File.Exists(PathOf("short.safetensors")));
    }

    [Fact]
    public void Validate_and_MapQ4_name_the_tensor_and_the_file_for_every_inconsistency()
    {
        void Fails(string dir, string expected, Action<ModelWeights> act)
        {
            using var model = ModelWeights.Open(PathOf(dir));
            var e = Assert.Throws<WeightsException>(() => act(model));
            Assert.Contains(Path.Combine(PathOf(dir), "model.safetensors"), e.Message);
            Assert.Contains(expected, e.Message);
        }
        HandMadeQ4(PathOf("ok"));
        Fails("ok", "tensor 'layer.weight' is 4-bit packed U32 [1, 2], which holds [1, 16], the config expects [1, 24]",
            m => m.Validate([new TensorSpec("layer.weight", [1, 24])]));
        Fails("ok", "the config expects [16]", m => m.Validate([new TensorSpec("layer.weight", [16])]));

        HandMadeQ4(PathOf("f32-scales"), scalesDtype: "F32");
        Fails("f32-scales", "tensor 'layer.scales' of 4-bit 'layer.weight' is F32, expected F16", m => m.Validate([new TensorSpec("layer.weight", [1, 16])]));
        Fails("f32-scales", "expected F16", m => m.MapQ4("layer.weight"));

        HandMadeQ4(PathOf("no-biases"), withBiases: false);
        Fails("no-biases", "tensor 'layer.weight' is 4-bit packed but 'layer.biases' is missing", m => m.MapQ4("layer.weight"));

        HandMadeQ4(PathOf("bad-scales"), scalesShape: "[2, 1]");
        Fails("bad-scales", "tensor 'layer.scales' of 4-bit 'layer.weight' [1, 16] has shape [2, 1]", m => m.MapQ4("layer.weight"));

        HandMadeQ4(PathOf("bad-biases"), biasesShape: "[1, 1]", metadata: """{"bits":4}""");
        Fails("bad-biases", "tensor 'layer.biases' of 4-bit 'layer.weight' [1, 16] has shape [1, 1]", m => m.Read("layer.weight"));

        HandMadeQ4(PathOf("8-bit"), metadata: """{"bits":8,"group_size":8}""");
        Fails("8-bit", "quantized to 8 bits", m => m.MapQ4("layer.weight"));

        HandMadeQ4(PathOf("other-group"), metadata: """{"bits":4,"group_size":16}""");
        Fails("other-group", "tensor 'layer.weight' has groups of 8 (2 per row of 16) but the file's metadata says group_size 16", m => m.MapQ4("layer.weight"));

        HandMadeQ4(PathOf("not-json"), metadata: "four bits");
        Fails("not-json", "'quantization' metadata is not JSON", m => m.MapQ4("layer.weight"));

        string path = PathOf("float.safetensors");
        SafeTensorsWriter.Write(path, [("layer.weight", [1, 16], new float[16])]);
        using (var model = ModelWeights.Open(path))
        {
            Assert.False(model.IsQuantized("layer.weight"));
            Assert.Contains("tensor 'layer.weight' is F32 [1, 16], not 4-bit packed data", Assert.Throws<WeightsException>(() => model.MapQ4("layer.weight")).Message);
        }

        // Groups of 4 (4 scales for 16 columns): not whole words.
        SafeTensorsWriter.WriteRaw(Path.Combine(Directory.CreateDirectory(PathOf("groups-of-4")).FullName, "model.safetensors"),
        [
            SafeTensorsWriter.Raw<uint>("layer.weight", "U32", [1, 2], [0, 0]),
            SafeTensorsWriter.Raw<Half>("layer.scales", "F16", [1, 4], new Half[4]),
            SafeTensorsWriter.Raw<Half>("layer.biases", "F16", [1, 4], new Half[4]),
        ]);
        Fails("groups-of-4", "tensor 'layer.weight': group size 4 is not a positive multiple of 8", m => m.Validate([new TensorSpec("layer.weight", [1, 16])]));
    }

    // ================================================================ kernels

    /// <summary>A random weight [rows, columns] in 4 bits, and its dequantized float32 values.</summary>
    private static (Q4Weight Q4, float[] Dequantized) RandomQ4(int rows, int columns, int groupSize, int seed)
    {
        var w = ModelFixture.Normal(new Random(seed), (long)rows * columns, 0, 0.5f);
        var q4 = Q4.Quantize("w", w, rows, columns, groupSize);
        var dequantized = new float[rows * columns];
        q4.Dequantize(dequantized);
        return (q4, dequantized);
    }

    private static float[] Rand(int n, int seed) => ModelFixture.Normal(new Random(seed), n, 0, 1);

    private static void AssertSame(float[] expected, float[] actual, string what)
    {
        Assert.All(actual, v => Assert.True(float.IsFinite(v), $"{what}: non-finite value"));
        double error = ModelFixture.RelativeError(actual, expected);
        Assert.True(error < SameMath, $"{what}: relative error {error:E2} against the float32 kernel");
    }

    public static TheoryData<int, int, int, int, int> LinearSizes => new()
    {
        { 13, 96, 53, 32, 1 },
        { 37, 200, 61, 40, 2 },    // groups of 5 words; no size a multiple of a tile
        { 130, 1088, 100, 64, 2 }, // two depth blocks in the NT product
        { 300, 64, 700, 16, 2 },   // more rows than one tile holds, many column tiles
        { 1, 16, 5, 8, 2 },
    };

    [Theory]
    [MemberData(nameof(LinearSizes))]
    public void Linear_forward_and_input_gradient_with_4bit_weights_match_the_float_kernels(int T, int din, int dout, int groupSize, int threads)
    {
        var (q4, w) = RandomQ4(dout, din, groupSize, seed: T + din);
        float[] x = Rand(T * din, 1), bias = Rand(dout, 2), dy = Rand(T * dout, 3);
        foreach (bool withBias in new[] { false, true })
        {
            float[] expected = new float[T * dout], actual = Rand(T * dout, 4); // = overwrites
            CpuKernels.LinearForward(expected, x, w, withBias ? bias : default, T, din, dout, threads);
            CpuKernels.LinearForward(actual, x, q4, withBias ? bias : default, T, din, dout, threads);
            AssertSame(expected, actual, $"y, bias {withBias}");
        }
        foreach (bool accumulate in new[] { false, true })
        {
            float[] expected = Rand(T * din, 5), actual = Rand(T * din, 5);
            CpuKernels.LinearBackwardInput(expected, dy, w, T, din, dout, accumulate, threads);
            CpuKernels.LinearBackwardInput(actual, dy, q4, T, din, dout, accumulate, threads);
            AssertSame(expected, actual, $"dx, accumulate {accumulate}");
        }
    }

    /// <summary>
    /// Decoding shapes (T ≤ <see cref="CpuKernels.NibbleDotMaxRows"/>: the dot products on the nibbles),
    /// and one just above, which takes the dequantizing product. The word counts cover each vector
    /// width's range and its tails at 512 bits (16 words, then 8, 4 and single words), groups that
    /// straddle vectors, and row counts that leave 1 to 3 rows for the last micro-kernel.
    /// </summary>
    public static TheoryData<int, int, int, int, int> DecodingSizes => new()
    {
        { 1, 896, 301, 64, 1 },    // Qwen2.5-0.5B's width, 112 words: 7 vectors of 16
        { 1, 896, 1001, 64, 2 },   // threads' chunks of 128 rows, the last one partial
        { 2, 896, 77, 32, 2 },
        { 3, 1024, 129, 128, 1 },  // a group is a whole vector of 16 words
        { 3, 4864, 61, 64, 2 },    // the MLP's width
        { 1, 200, 37, 40, 2 },     // 25 words = 16 + 8 + 1, groups of 5 words across vectors
        { 3, 1000, 3, 40, 1 },     // 125 words = 7·16 + 8 + 4 + 1
        { 2, 136, 9, 8, 2 },       // 17 words, a group per word
        { 1, 96, 5, 32, 1 },       // 12 words = 8 + 4
        { 1, 128, 1, 128, 2 },     // one row
        { CpuKernels.NibbleDotMaxRows + 1, 896, 301, 64, 2 },
        { CpuKernels.NibbleDotMaxRows + 2, 200, 37, 40, 1 },
    };

    /// <summary>
    /// The linear layer's forward for T rows against Σ_k w·x in float64 on the dequantized weights, each
    /// row of y on its own; and the nibble dot products called directly, so that they stay right for T
    /// above the threshold too.
    /// </summary>
    [Theory]
    [MemberData(nameof(DecodingSizes))]
    public unsafe void Linear_forward_for_a_few_rows_matches_a_float64_product_of_the_dequantized_weights(int T, int din, int dout, int groupSize, int threads)
    {
        var (q4, w) = RandomQ4(dout, din, groupSize, seed: 7 * T + din + dout);
        float[] x = Rand(T * din, 11), bias = Rand(dout, 12);
        foreach (bool withBias in new[] { false, true })
        {
            float[] actual = Rand(T * dout, 13); // = overwrites
            CpuKernels.LinearForward(actual, x, q4, withBias ? bias : default, T, din, dout, threads);
            AssertRowsMatch(actual, w, x, withBias ? bias : null, T, din, dout, $"LinearForward, bias {withBias}");
        }
        float[] direct = Rand(T * dout, 14);
        using (var pin = new CpuKernels.Q4Pin(q4))
        fixed (float* py = direct) fixed (float* px = x)
            CpuKernels.NibbleDotsQ4(py, px, pin.Matrix, T, threads);
        AssertRowsMatch(direct, w, x, null, T, din, dout, "NibbleDotsQ4");
    }

    private static void AssertRowsMatch(float[] actual, float[] w, float[] x, float[]? bias, int T, int din, int dout, string what)
    {
        Assert.All(actual, v => Assert.True(float.IsFinite(v), $"{what}: non-finite value"));
        for (int t = 0; t < T; t++)
        {
            double diff = 0, norm = 0;
            for (int r = 0; r < dout; r++)
            {
                double expected = bias is null ? 0 : bias[r];
                for (int k = 0; k < din; k++)
                    expected += (double)w[(long)r * din + k] * x[t * din + k];
                diff += Math.Pow(actual[t * dout + r] - expected, 2);
                norm += expected * expected;
            }
            double error = Math.Sqrt(diff / norm);
            Assert.True(error < SameMath, $"{what}, y[{t}]: relative error {error:E2} against the float64 product");
        }
    }

    [Fact]
    public unsafe void The_decoding_product_converts_every_F16_scale_exactly()
    {
        // Every F16 bit pattern, then 5 more for the scalar tail after the vectors of 16.
        var halves = Enumerable.Range(0, 65536 + 5).Select(i => BitConverter.UInt16BitsToHalf((ushort)(i * 40503))).ToArray();
        var floats = new float[halves.Length];
        fixed (Half* h = halves) fixed (float* f = floats)
            CpuKernels.HalfToSingle(h, f, halves.Length);
        for (int i = 0; i < halves.Length; i++)
            if (Half.IsNaN(halves[i]))
                Assert.True(float.IsNaN(floats[i]), $"{BitConverter.HalfToUInt16Bits(halves[i]):X4}");
            else
                Assert.Equal(BitConverter.SingleToUInt32Bits((float)halves[i]), BitConverter.SingleToUInt32Bits(floats[i]));
    }

    [Fact]
    public void Embedding_with_a_4bit_table_gathers_the_dequantized_rows()
    {
        var (q4, table) = RandomQ4(301, 48, 16, seed: 9);
        int[] tokens = [0, 300, 7, 7, 150];
        float[] expected = new float[5 * 48], actual = new float[5 * 48];
        CpuKernels.EmbeddingForward(expected, tokens, table, 5, 48);
        CpuKernels.EmbeddingForward(actual, tokens, q4, 5, 48);
        Assert.Equal(expected, actual);
        Assert.Throws<ArgumentException>(() => CpuKernels.EmbeddingForward(actual, [301], q4, 1, 48));
    }

    [Theory]
    [InlineData(9, 48, 301, 64, 1, true, 0f)]    // partial last chunk, rows labelled −1
    [InlineData(9, 48, 301, 64, 2, false, 0f)]
    [InlineData(64, 96, 1001, 256, 2, true, 0f)]
    [InlineData(64, 96, 1001, 2000, 2, false, 0f)] // one chunk bigger than V
    [InlineData(9, 48, 301, 64, 2, true, 5f)]      // softcapped, partial last chunk
    [InlineData(64, 96, 1001, 256, 2, false, 8f)]
    public void LmHead_with_a_4bit_weight_matches_the_float_kernel(int T, int C, int V, int chunk, int threads, bool someIgnored, float softcap)
    {
        var (q4, w) = RandomQ4(V, C, 16, seed: V);
        float[] x = Rand(T * C, 6);
        var rng = new Random(7);
        int[] targets = Enumerable.Range(0, T).Select(t => someIgnored && t % 4 == 1 ? -1 : rng.Next(V)).ToArray();
        targets[0] = V - 1;
        float[] logits = new float[T * Math.Min(chunk, V)];
        float[] expectedDx = new float[T * C], actualDx = Rand(T * C, 8);
        float expected = CpuKernels.LmHeadCrossEntropy(expectedDx, logits, x, w, targets, T, C, V, chunk, softcap, threads);
        float actual = CpuKernels.LmHeadCrossEntropy(actualDx, logits, x, q4, targets, T, C, V, chunk, softcap, threads);
        Assert.True(Math.Abs(actual - expected) <= SameMath * Math.Abs(expected), $"loss {actual} vs {expected}");
        AssertSame(expectedDx, actualDx, "dx");
    }

    [Theory]
    [InlineData(9, 48, 301, 64, 1, 5f)]   // partial last chunk (301 = 4·64 + 45)
    [InlineData(13, 32, 200, 64, 2, 3f)]  // partial last chunk of 8
    [InlineData(13, 32, 200, 500, 2, 3f)] // one chunk bigger than V
    public void LmHead_with_a_4bit_weight_and_a_softcap_matches_a_float64_reference(int T, int C, int V, int chunk, int threads, float softcap)
    {
        // Against cross-entropy over z = c·tanh(x·wᵀ/c) in double on the dequantized weights.
        var (q4, w) = RandomQ4(V, C, 16, seed: V + 1);
        float[] x = Rand(T * C, 9);
        var rng = new Random(10);
        int[] targets = Enumerable.Range(0, T).Select(t => t % 3 == 2 ? -1 : rng.Next(V)).ToArray();
        targets[0] = V - 1; // a label in the partial last chunk
        float[] logits = new float[T * Math.Min(chunk, V)], dx = Rand(T * C, 11);
        float loss = CpuKernels.LmHeadCrossEntropy(dx, logits, x, q4, targets, T, C, V, chunk, softcap, threads);

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
                z[v] = softcap * Math.Tanh(l / softcap);
            }
            double max = z.Max(), sum = z.Sum(zv => Math.Exp(zv - max));
            wantLoss += (max + Math.Log(sum) - z[targets[t]]) / count;
            for (int v = 0; v < V; v++)
            {
                double tau = z[v] / softcap; // ∂z/∂l = 1 − tanh²
                double d = (Math.Exp(z[v] - max) / sum - (v == targets[t] ? 1 : 0)) / count * (1 - tau * tau);
                for (int i = 0; i < C; i++)
                    wantDx[t * C + i] += d * w[v * C + i];
            }
        }
        Assert.True(Math.Abs(loss - wantLoss) <= 1e-5 * wantLoss, $"loss {loss} vs {wantLoss}");
        double error = ModelFixture.RelativeError(dx, Array.ConvertAll(wantDx, d => (float)d));
        Assert.True(error < 1e-4, $"dx: relative error {error:E2}");
        for (int t = 0; t < T; t++)
            if (targets[t] < 0)
                Assert.All(dx.AsSpan(t * C, C).ToArray(), d => Assert.Equal(0f, d));
    }

    [Fact]
    public void The_cpu_backend_maps_a_4bit_weight_packed_and_releases_its_pages()
    {
        string path = HandMadeQ4(PathOf("backend"));
        using var model = ModelWeights.Open(path);
        using var backend = new CpuBackend(threads: 1);
        var weight = backend.MapWeight(model, "layer.weight");
        var q4 = Assert.IsType<CpuQ4Tensor>(weight);
        Assert.True(q4.IsFileMapped);
        Assert.Equal(16, q4.Length);

        float[] x = [.. Enumerable.Range(0, 16).Select(i => i == 3 ? 1f : 0f)]; // picks column 3
        using var input = backend.Upload("x", x);
        using var y = backend.Allocate("y", 1);
        backend.LinearForward(y, input, weight, null, 1, 16, 1);
        var result = new float[1];
        backend.Download(y, result);
        Assert.Equal(HandMadeValues[3], result[0]);

        backend.ReleaseWeight(weight); // the pages are dropped and read again from the file when touched
        backend.LinearForward(y, input, weight, null, 1, 16, 1);
        backend.Download(y, result);
        Assert.Equal(HandMadeValues[3], result[0]);

        var e = Assert.Throws<ArgumentException>(() => backend.RmsNormForward(y, y, input, weight, 1, 16, 1e-6f, 0f));
        Assert.Contains("4-bit weight", e.Message);
    }

    // ================================================================ a whole step, and the commands

    /// <summary>
    /// The fused path, proved end to end: a forward and backward of tiny-qwen2 whose linear,
    /// embedding and (tied) LM-head weights are 4-bit equals the same step on a float32 file of the
    /// dequantized weights.
    /// </summary>
    [Fact]
    public void A_gradient_step_with_4bit_weights_equals_the_float_step_on_the_dequantized_weights()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 13, sequence: 23);
        string quantized = PathOf("q4.safetensors"), dequantized = PathOf("dequantized.safetensors");
        using (var source = ModelWeights.Open(fixture.WeightsPath))
            QuantizedModelWriter.Quantize(source, quantized, groupSize: 16);
        using var q4Weights = ModelWeights.Open(quantized);
        SafeTensorsWriter.Write(dequantized, model.BaseTensors.Select(t => (t.Name, t.Shape, q4Weights.Read(t.Name))));
        using var f32Weights = ModelWeights.Open(dequantized);

        using var backend = new CpuBackend();
        Assert.IsType<CpuQ4Tensor>(backend.MapWeight(q4Weights, "model.embed_tokens.weight"));
        Assert.IsType<CpuQ4Tensor>(backend.MapWeight(q4Weights, "model.layers.2.mlp.down_proj.weight"));
        Assert.IsType<CpuTensor>(backend.MapWeight(q4Weights, "model.layers.2.self_attn.q_proj.bias"));

        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        using var q4Trainer = model.Create(backend, q4Weights, adapter, 23);
        using var f32Trainer = model.Create(backend, f32Weights, adapter, 23);
        float q4Loss = q4Trainer.ForwardBackward(fixture.Tokens);
        float f32Loss = f32Trainer.ForwardBackward(fixture.Tokens);

        Assert.True(Math.Abs(q4Loss - f32Loss) <= 1e-5 * f32Loss, $"loss {q4Loss} vs {f32Loss}");
        var expected = f32Trainer.DownloadGradients().ToDictionary(g => g.Spec.Module);
        int compared = 0;
        foreach (var (spec, da, db) in q4Trainer.DownloadGradients())
        {
            foreach (var (name, got, want) in new[] { ("dA", da, expected[spec.Module].DA), ("dB", db, expected[spec.Module].DB) })
            {
                Assert.True(want.Any(v => v != 0), $"{spec.Module} {name}: zero gradient, the test would prove nothing");
                double error = ModelFixture.RelativeError(got, want);
                Assert.True(error < 1e-4, $"{spec.Module} {name}: relative error {error:E2}");
                compared++;
            }
        }
        Assert.Equal(2 * model.LoraModules.Count, compared);

        // And 4 bits are not float32: the quantized model's loss differs from the original's.
        using var original = ModelWeights.Open(fixture.WeightsPath);
        using var originalTrainer = model.Create(backend, original, adapter, 23);
        Assert.NotEqual(f32Loss, originalTrainer.ForwardBackward(fixture.Tokens));
    }

    [Fact]
    public void The_quantize_command_writes_a_4bit_model_and_copies_the_config_and_tokenizer()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 17, sequence: 4);
        File.WriteAllText(Path.Combine(fixture.WeightsPath, "config.json"), """{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64}""");
        File.WriteAllText(Path.Combine(fixture.WeightsPath, "tokenizer.json"), """{"model": {}}""");
        string output = PathOf("quantized");

        Assert.Equal(0, Commands.Quantize(new Args(["--model", "tiny-qwen2", "--weights", fixture.WeightsPath, "--out", output, "--group-size", "16"])));

        using var weights = ModelWeights.Open(output);
        weights.Validate(model.BaseTensors);
        using (var file = SafeTensorsFile.Open(Path.Combine(output, "model.safetensors")))
            Assert.Equal(Q4.Metadata(16), file.Metadata[Q4.MetadataKey]);
        using var source = ModelWeights.Open(fixture.WeightsPath);
        foreach (var spec in model.BaseTensors)
        {
            bool quantizable = Q4.IsQuantizable(spec.Name, spec.Shape);
            Assert.Equal(quantizable, weights.IsQuantized(spec.Name));
            Assert.Equal(spec.Shape, weights.Shape(spec.Name));
            float[] original = fixture.Weights[spec.Name], read = weights.Read(spec.Name);
            if (!quantizable)
            {
                Assert.True(source.Bytes(spec.Name).SequenceEqual(weights.Bytes(spec.Name)), $"{spec.Name} is copied byte for byte");
                continue;
            }
            var q4 = weights.MapQ4(spec.Name);
            for (int i = 0; i < original.Length; i++)
                Assert.True(MathF.Abs(read[i] - original[i]) <= (float)q4.Scales.Span[i / 16] / 2 + 1e-7f, $"{spec.Name}[{i}]");
        }

        using var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "config.json")));
        Assert.Equal(64, config.RootElement.GetProperty("hidden_size").GetInt32());
        var quantization = config.RootElement.GetProperty("quantization");
        Assert.Equal((16, 4), (quantization.GetProperty("group_size").GetInt32(), quantization.GetProperty("bits").GetInt32()));
        Assert.Equal("""{"model": {}}""", File.ReadAllText(Path.Combine(output, "tokenizer.json")));
        Assert.False(File.Exists(Path.Combine(output, "tokenizer_config.json")));

        // Rows of 64 are not groups of 48; 12 is not whole words.
        var e = Assert.Throws<WeightsException>(() => Commands.Quantize(new Args(["--model", "tiny-qwen2", "--weights", fixture.WeightsPath, "--out", PathOf("bad"), "--group-size", "48"])));
        Assert.Contains("tensor 'model.embed_tokens.weight' [320, 64] cannot be quantized: its rows of 64 elements are not a whole number of groups of 48", e.Message);
        Assert.Throws<UsageException>(() => Commands.Quantize(new Args(["--model", "tiny-qwen2", "--weights", fixture.WeightsPath, "--out", PathOf("bad"), "--group-size", "12"])));
        // A model that is already 4-bit is not quantized again.
        Assert.Contains("already quantized", Assert.Throws<WeightsException>(() =>
            Commands.Quantize(new Args(["--model", "tiny-qwen2", "--weights", output, "--out", PathOf("again"), "--group-size", "16"]))).Message);
    }

    [Fact]
    public void Random_4bit_weights_are_the_random_float_weights_quantized()
    {
        string f32 = PathOf("random-f32"), q4 = PathOf("random-q4"), quantized = PathOf("random-quantized");
        Assert.Equal(0, Commands.InitRandom(new Args(["--model", "tiny-llama", "--out", f32, "--seed", "5"])));
        Assert.Equal(0, Commands.InitRandom(new Args(["--model", "tiny-llama", "--out", q4, "--seed", "5", "--quantize", "q4", "--group-size", "8"])));
        // tiny-llama's MLP is 136 wide: groups of 8.
        Assert.Equal(0, Commands.Quantize(new Args(["--model", "tiny-llama", "--weights", f32, "--out", quantized, "--group-size", "8"])));

        using var a = ModelWeights.Open(q4);
        using var b = ModelWeights.Open(quantized);
        var model = TrainerCatalog.Find("tiny-llama")!;
        a.Validate(model.BaseTensors);
        Assert.Equal(b.Names.Order(), a.Names.Order());
        foreach (var name in a.Names)
            Assert.True(a.Bytes(name).SequenceEqual(b.Bytes(name)), name);
        Assert.True(a.IsQuantized("lm_head.weight")); // tiny-llama's head is untied
        Assert.Throws<UsageException>(() => Commands.InitRandom(new Args(["--model", "tiny-llama", "--out", q4, "--quantize", "q8"])));
        Assert.Throws<UsageException>(() => Commands.InitRandom(new Args(["--model", "tiny-llama", "--out", q4, "--group-size", "16"])));
    }
}
