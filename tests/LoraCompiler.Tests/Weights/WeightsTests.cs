using System.Buffers.Binary;
using System.Text;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Weights;

/// <summary>safetensors reading and writing, model folders, PEFT adapters and atomic writes.</summary>
public sealed class WeightsTests : IDisposable
{
    readonly string _dir = Directory.CreateTempSubdirectory("lora-weights-tests-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    string PathOf(string name) => Path.Combine(_dir, name);

    /// <summary>A safetensors file assembled byte by byte, independent of <see cref="SafeTensorsWriter"/>.</summary>
    static byte[] HandMade(string header, byte[] data)
    {
        byte[] json = Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + json.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)json.Length);
        json.CopyTo(bytes, 8);
        data.CopyTo(bytes, 8 + json.Length);
        return bytes;
    }

    static byte[] LittleEndian(params ushort[] values)
    {
        var bytes = new byte[values.Length * 2];
        for (int i = 0; i < values.Length; i++)
            BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(2 * i), values[i]);
        return bytes;
    }

    static float[] Ramp(int n, float scale) => Enumerable.Range(0, n).Select(i => MathF.Sin(i * 0.37f + 0.1f) * scale).ToArray();

    // ---- round trips ----------------------------------------------------------------------------

    [Fact]
    public void F32_round_trip_is_exact_and_keeps_order_shapes_and_metadata()
    {
        var a = Ramp(12, 3f);
        float[] b = [float.MaxValue, float.Epsilon, -0f, float.PositiveInfinity, 1e-30f];
        float[] scalar = [42f];
        string path = PathOf("f32.safetensors");
        SafeTensorsWriter.Write(path, [("z.a", [3, 4], a), ("b", [5], b), ("s", [], scalar)],
            metadata: new Dictionary<string, string> { ["format"] = "pt" });

        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(["z.a", "b", "s"], file.Names);
        Assert.Equal([3, 4], file.Info("z.a").Shape);
        Assert.Equal("F32", file.Info("b").Dtype);
        Assert.Empty(file.Info("s").Shape);
        Assert.Equal("pt", file.Metadata["format"]);
        Assert.Equal(a, file.Read("z.a"));
        Assert.Equal(b, file.Read("b"));
        Assert.Equal(scalar, file.Read("s"));
    }

    [Fact]
    public void Header_is_space_padded_to_a_multiple_of_8_and_data_is_contiguous()
    {
        string path = PathOf("pad.safetensors");
        SafeTensorsWriter.Write(path, [("a", [3], [1f, 2f, 3f]), ("bb", [2], [4f, 5f])], "F16");
        byte[] bytes = File.ReadAllBytes(path);
        long n = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        Assert.Equal(0, n % 8);
        string header = Encoding.UTF8.GetString(bytes, 8, (int)n);
        Assert.EndsWith("}", header.TrimEnd(' '));
        Assert.InRange(header.Length - header.TrimEnd(' ').Length, 0, 7);
        Assert.Equal(8 + n + 5 * 2, bytes.Length);

        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(8 + n, file.Info("a").Offset);
        Assert.Equal(8 + n + 6, file.Info("bb").Offset);
    }

    [Fact]
    public void F16_round_trip_is_exact_for_representable_values_and_rounds_to_nearest_even()
    {
        float[] exact = [0f, 1f, -2f, 0.5f, 0.333251953125f, 65504f, -0.0009765625f, 1000.5f];
        float[] ties = [1024.5f, 1025.5f]; // F16 spacing is 1 here: ties go to the even neighbour
        var inexact = Ramp(1000, 50f);
        string path = PathOf("f16.safetensors");
        SafeTensorsWriter.Write(path, [("exact", [exact.Length], exact), ("ties", [2], ties), ("inexact", [10, 100], inexact)], "F16");

        using var file = SafeTensorsFile.Open(path);
        Assert.Equal("F16", file.Info("exact").Dtype);
        Assert.Equal(exact, file.Read("exact"));
        Assert.Equal([1024f, 1026f], file.Read("ties"));
        var back = file.Read("inexact");
        for (int i = 0; i < inexact.Length; i++)
            Assert.True(MathF.Abs(back[i] - inexact[i]) <= MathF.Abs(inexact[i]) * MathF.Pow(2, -11) + 3e-8f, $"element {i}: {inexact[i]} -> {back[i]}");
    }

    [Fact]
    public void BF16_round_trip_is_exact_for_representable_values_and_rounds_to_nearest_even()
    {
        float[] exact = [0f, 1f, -2f, 0.333984375f, 3.3895314e38f, float.NegativeInfinity, 1.0078125f];
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 (odd mantissa): ties to even gives 1.
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): gives 1 + 2^-6.
        float[] ties = [1f + MathF.Pow(2, -8), 1f + 3 * MathF.Pow(2, -8), 1f + 1.1f * MathF.Pow(2, -8)];
        var inexact = Ramp(1001, 7f);
        string path = PathOf("bf16.safetensors");
        SafeTensorsWriter.Write(path, [("exact", [exact.Length], exact), ("ties", [3], ties), ("inexact", [1001], inexact)], "BF16");

        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(exact, file.Read("exact"));
        Assert.Equal([1f, 1f + MathF.Pow(2, -6), 1f + MathF.Pow(2, -7)], file.Read("ties"));
        Assert.True(float.IsNaN(RoundTripBf16(float.NaN)));
        var back = file.Read("inexact");
        for (int i = 0; i < inexact.Length; i++)
            Assert.True(MathF.Abs(back[i] - inexact[i]) <= MathF.Abs(inexact[i]) * MathF.Pow(2, -8), $"element {i}: {inexact[i]} -> {back[i]}");
    }

    float RoundTripBf16(float value)
    {
        string path = PathOf("one.safetensors");
        SafeTensorsWriter.Write(path, [("x", [1], [value])], "BF16");
        using var file = SafeTensorsFile.Open(path);
        return file.Read("x")[0];
    }

    [Fact]
    public void A_hand_assembled_file_is_read_with_its_bf16_f16_and_f32_bit_patterns()
    {
        // Unpadded header, metadata first, tensors stored in a different order from the header's.
        string header = """
            {"__metadata__": {"format": "pt"},
             "h": {"dtype": "F16", "shape": [2, 2], "data_offsets": [24, 32]},
             "b": {"dtype": "BF16", "shape": [5], "data_offsets": [0, 10]},
             "f": {"dtype": "F32", "shape": [1, 1, 1], "data_offsets": [10, 14]},
             "e": {"dtype": "F32", "shape": [0], "data_offsets": [14, 14]},
             "pad": {"dtype": "U8", "shape": [10], "data_offsets": [14, 24]}}
            """;
        var data = new List<byte>();
        data.AddRange(LittleEndian(0x3F80, 0xC000, 0x3EAB, 0x7F80, 0x8001)); // 1, -2, 0.333984375, +inf, -9.18355e-41 (subnormal)
        data.AddRange(BitConverter.GetBytes(-1.5f));
        data.AddRange(new byte[10]);
        data.AddRange(LittleEndian(0x3C00, 0xC000, 0x3555, 0x7BFF)); // 1, -2, 0.333251953125, 65504
        string path = PathOf("hand.safetensors");
        File.WriteAllBytes(path, HandMade(header, data.ToArray()));

        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(["b", "f", "e", "pad", "h"], file.Names);
        Assert.Equal("pt", file.Metadata["format"]);
        Assert.Equal([1f, -2f, 0.333984375f, float.PositiveInfinity, -BitConverter.UInt32BitsToSingle(0x00010000)], file.Read("b"));
        Assert.Equal([-1.5f], file.Read("f"));
        Assert.Empty(file.Read("e"));
        Assert.Equal([1f, -2f, 0.333251953125f, 65504f], file.Read("h"));
        Assert.Equal([2, 2], file.Info("h").Shape);
        Assert.Equal(8 + Encoding.UTF8.GetByteCount(header) + 24, file.Info("h").Offset);
    }

    [Fact]
    public void Long_bf16_tensors_use_the_vector_path_and_its_tail_correctly()
    {
        var bits = Enumerable.Range(0, 77).Select(i => (ushort)(0x3F80 + i * 3)).ToArray();
        string path = PathOf("long.safetensors");
        File.WriteAllBytes(path, HandMade("""{"x":{"dtype":"BF16","shape":[77],"data_offsets":[0,154]}}""", LittleEndian(bits)));
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(bits.Select(b => BitConverter.UInt32BitsToSingle((uint)b << 16)), file.Read("x"));
    }

    // ---- errors -----------------------------------------------------------------------------------

    [Fact]
    public void A_truncated_file_names_the_file_and_the_tensor()
    {
        string path = PathOf("model.safetensors");
        SafeTensorsWriter.Write(path, [("model.embed_tokens.weight", [4, 8], Ramp(32, 1f)), ("model.norm.weight", [100], Ramp(100, 1f))]);
        long length = new FileInfo(path).Length;
        using (var stream = new FileStream(path, FileMode.Open))
            stream.SetLength(length - 50);

        var e = Assert.Throws<WeightsException>(() => SafeTensorsFile.Open(path));
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains("'model.norm.weight'", e.Message);
        Assert.Contains("truncated", e.Message);
        Assert.Contains($"{length - 400}..{length}", e.Message);
        Assert.Contains($"has {length - 50}", e.Message);
    }

    [Fact]
    public void A_file_shorter_than_its_header_is_reported_as_truncated()
    {
        string path = PathOf("short.safetensors");
        File.WriteAllBytes(path, HandMade("""{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}""", [])[..20]);
        var e = Assert.Throws<WeightsException>(() => SafeTensorsFile.Open(path));
        Assert.Contains("short.safetensors", e.Message);
        Assert.Contains("truncated", e.Message);

        File.WriteAllBytes(path, [1, 2, 3]);
        Assert.Contains("truncated", Assert.Throws<WeightsException>(() => SafeTensorsFile.Open(path)).Message);
    }

    [Fact]
    public void A_byte_range_that_disagrees_with_shape_and_dtype_is_rejected()
    {
        string path = PathOf("size.safetensors");
        File.WriteAllBytes(path, HandMade("""{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,8]}}""", new byte[8]));
        var e = Assert.Throws<WeightsException>(() => SafeTensorsFile.Open(path));
        Assert.Contains("size.safetensors", e.Message);
        Assert.Contains("'w'", e.Message);
        Assert.Contains("8 bytes", e.Message);
        Assert.Contains("needs 12", e.Message);
    }

    [Fact]
    public void An_unsupported_dtype_is_reported_on_read_with_the_supported_ones()
    {
        string path = PathOf("int8.safetensors");
        File.WriteAllBytes(path, HandMade("""{"q":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}""", [1, 2, 3, 4]));
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal("I8", file.Info("q").Dtype);
        var e = Assert.Throws<WeightsException>(() => file.Read("q"));
        Assert.Contains("int8.safetensors", e.Message);
        Assert.Contains("unsupported dtype I8 for tensor 'q'", e.Message);
        Assert.Contains("F32, F16, BF16", e.Message);

        using var model = ModelWeights.Open(path);
        e = Assert.Throws<WeightsException>(() => model.Validate([new TensorSpec("q", [4])]));
        Assert.Contains("unsupported dtype I8", e.Message);
    }

    [Theory]
    [InlineData("""{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}""")]   // unterminated
    [InlineData("""[1, 2]""")]                                                 // not an object
    [InlineData("""{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}""")] // negative dimension
    [InlineData("""{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}""")]  // reversed range
    [InlineData("""{"x":{"dtype":"F32","shape":[1]}}""")]                       // no data_offsets
    [InlineData("""{"__metadata__":{"n":1}}""")]                                // metadata value not a string
    public void Malformed_header_json_is_reported(string header)
    {
        string path = PathOf("bad.safetensors");
        File.WriteAllBytes(path, HandMade(header, new byte[4]));
        var e = Assert.Throws<WeightsException>(() => SafeTensorsFile.Open(path));
        Assert.Contains("bad.safetensors", e.Message);
        Assert.Contains("malformed header JSON", e.Message);
    }

    [Fact]
    public void A_wrong_destination_length_names_the_tensor()
    {
        string path = PathOf("d.safetensors");
        SafeTensorsWriter.Write(path, [("w", [2, 2], [1f, 2f, 3f, 4f])]);
        using var model = ModelWeights.Open(path);
        var e = Assert.Throws<ArgumentException>(() => model.Read("w", new float[3]));
        Assert.Contains("'w'", e.Message);
        Assert.Contains("d.safetensors", Assert.Throws<WeightsException>(() => model.Read("nope")).Message);
    }

    [Fact]
    public void The_writer_rejects_data_that_does_not_match_its_shape_and_writes_nothing()
    {
        string path = PathOf("w.safetensors");
        var e = Assert.Throws<WeightsException>(() => SafeTensorsWriter.Write(path, [("w", [2, 3], new float[5])]));
        Assert.Contains("'w'", e.Message);
        Assert.Contains("[2, 3]", e.Message);
        Assert.Empty(Directory.EnumerateFileSystemEntries(_dir));
    }

    // ---- model folders ----------------------------------------------------------------------------

    static readonly TensorSpec[] Expected =
    [
        new("model.embed_tokens.weight", [10, 4]),
        new("model.layers.0.mlp.up_proj.weight", [6, 4]),
        new("model.layers.1.mlp.up_proj.weight", [6, 4]),
        new("model.norm.weight", [4]),
    ];

    void WriteModel(string path, params TensorSpec[] specs) =>
        SafeTensorsWriter.Write(path, specs.Select(s => (s.Name, s.Shape, Ramp((int)s.Elements, s.Name.Length))));

    [Fact]
    public void A_single_file_model_validates_and_extra_tensors_are_fine()
    {
        WriteModel(PathOf("model.safetensors"), [.. Expected, new TensorSpec("lm_head.weight", [10, 4])]);
        foreach (string path in new[] { _dir, PathOf("model.safetensors") })
        {
            using var model = ModelWeights.Open(path);
            model.Validate(Expected);
            Assert.Equal(5, model.Names.Count);
            Assert.Equal([6, 4], model.Shape("model.layers.1.mlp.up_proj.weight"));
            Assert.Equal(PathOf("model.safetensors"), model.FileOf("model.norm.weight"));
            Assert.Equal(Ramp(4, "model.norm.weight".Length), model.Read("model.norm.weight"));
        }
    }

    [Fact]
    public void Validate_reports_the_first_missing_tensor_with_the_opened_path()
    {
        WriteModel(PathOf("model.safetensors"), Expected[0], Expected[1], Expected[3]);
        using var model = ModelWeights.Open(_dir);
        var e = Assert.Throws<WeightsException>(() => model.Validate(Expected));
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains("tensor 'model.layers.1.mlp.up_proj.weight' is missing", e.Message);
    }

    [Fact]
    public void Validate_reports_a_wrong_shape_with_both_shapes()
    {
        WriteModel(PathOf("model.safetensors"), Expected[0], Expected[1], new TensorSpec("model.layers.1.mlp.up_proj.weight", [5, 4]), Expected[3]);
        using var model = ModelWeights.Open(_dir);
        var e = Assert.Throws<WeightsException>(() => model.Validate(Expected));
        Assert.Equal($"{PathOf("model.safetensors")}: tensor 'model.layers.1.mlp.up_proj.weight' has shape [5, 4], the config expects [6, 4]", e.Message);
    }

    [Fact]
    public void A_sharded_folder_is_opened_through_its_index()
    {
        WriteModel(PathOf("model-00001-of-00002.safetensors"), Expected[0], Expected[1]);
        WriteModel(PathOf("model-00002-of-00002.safetensors"), Expected[2], Expected[3]);
        File.WriteAllText(PathOf("model.safetensors.index.json"), $$"""
            {"metadata": {"total_size": 0}, "weight_map": {
              "{{Expected[0].Name}}": "model-00001-of-00002.safetensors",
              "{{Expected[1].Name}}": "model-00001-of-00002.safetensors",
              "{{Expected[2].Name}}": "model-00002-of-00002.safetensors",
              "{{Expected[3].Name}}": "model-00002-of-00002.safetensors"
              }
            }
            """);

        using var model = ModelWeights.Open(_dir);
        model.Validate(Expected);
        Assert.Equal(4, model.Names.Count);
        Assert.Equal(PathOf("model-00002-of-00002.safetensors"), model.FileOf("model.norm.weight"));
        Assert.Equal(PathOf("model-00001-of-00002.safetensors"), model.FileOf("model.embed_tokens.weight"));
        var up = new float[24];
        model.Read(Expected[2].Name, up);
        Assert.Equal(Ramp(24, Expected[2].Name.Length), up);

        var e = Assert.Throws<WeightsException>(() => model.Validate([new TensorSpec("lm_head.weight", [10, 4])]));
        Assert.Contains("model.safetensors.index.json", e.Message);
        Assert.Contains("'lm_head.weight' is missing", e.Message);
    }

    [Fact]
    public void An_index_that_names_a_missing_shard_is_reported()
    {
        File.WriteAllText(PathOf("model.safetensors.index.json"), """{"weight_map": {"w": "model-00001-of-00009.safetensors"}}""");
        var e = Assert.Throws<WeightsException>(() => ModelWeights.Open(_dir));
        Assert.Contains("model.safetensors.index.json", e.Message);
        Assert.Contains("model-00001-of-00009.safetensors", e.Message);
        Assert.Contains("'w'", e.Message);
    }

    [Fact]
    public void A_folder_without_weights_is_reported()
    {
        File.WriteAllText(PathOf("config.json"), "{}");
        var e = Assert.Throws<WeightsException>(() => ModelWeights.Open(_dir));
        Assert.Contains(_dir, e.Message);
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains("model.safetensors.index.json", e.Message);

        Assert.Contains("no such file", Assert.Throws<WeightsException>(() => ModelWeights.Open(PathOf("absent"))).Message);
    }

    // ---- LoRA adapters ----------------------------------------------------------------------------

    static readonly LoraSettings Settings = new(4, 8f, ["q_proj", "down_proj"]);

    static readonly LoraModuleSpec[] Modules =
    [
        new("model.layers.0.self_attn.q_proj", 16, 12),
        new("model.layers.0.mlp.down_proj", 24, 16),
        new("model.layers.1.self_attn.q_proj", 16, 12),
    ];

    static LoraAdapter Trained()
    {
        var adapter = LoraAdapter.CreateNew(Settings, Modules, seed: 7);
        foreach (var module in adapter.Modules)
            for (int i = 0; i < module.B.Length; i++)
                module.B[i] = MathF.Cos(i + module.Spec.In);
        return adapter;
    }

    [Fact]
    public void CreateNew_follows_peft_init_and_is_deterministic()
    {
        var first = LoraAdapter.CreateNew(Settings, Modules, seed: 123);
        var again = LoraAdapter.CreateNew(Settings, Modules, seed: 123);
        var other = LoraAdapter.CreateNew(Settings, Modules, seed: 124);
        Assert.Equal(3, first.Modules.Count);
        for (int m = 0; m < Modules.Length; m++)
        {
            var module = first.Modules[m];
            Assert.Equal(Modules[m], module.Spec);
            Assert.Equal(Settings.R * Modules[m].In, module.A.Length);
            Assert.Equal(Modules[m].Out * Settings.R, module.B.Length);
            Assert.All(module.B, b => Assert.Equal(0f, b));
            float bound = 1f / MathF.Sqrt(Modules[m].In);
            Assert.All(module.A, a => Assert.InRange(a, -bound, bound));
            Assert.True(module.A.Max() > bound / 2 && module.A.Min() < -bound / 2, "A should spread over its range");
            Assert.Equal(module.A, again.Modules[m].A);
            Assert.NotEqual(module.A, other.Modules[m].A);
        }
    }

    [Fact]
    public void An_adapter_round_trips_through_peft_files()
    {
        var adapter = Trained();
        string dir = PathOf("adapter/nested");
        adapter.Save(dir, "Qwen/Qwen2.5-0.5B");

        Assert.Equal(["adapter_config.json", "adapter_model.safetensors"],
            Directory.EnumerateFiles(dir).Select(Path.GetFileName).Order());
        using (var file = SafeTensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors")))
        {
            Assert.Equal([4, 24], file.Info("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight").Shape);
            Assert.Equal([16, 4], file.Info("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight").Shape);
            Assert.Equal("F32", file.Info("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight").Dtype);
        }
        using (var config = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json"))))
        {
            var root = config.RootElement;
            Assert.Equal("LORA", root.GetProperty("peft_type").GetString());
            Assert.Equal("CAUSAL_LM", root.GetProperty("task_type").GetString());
            Assert.Equal(4, root.GetProperty("r").GetInt32());
            Assert.Equal(8.0, root.GetProperty("lora_alpha").GetDouble());
            Assert.Equal(["q_proj", "down_proj"], root.GetProperty("target_modules").EnumerateArray().Select(e => e.GetString()));
            Assert.Equal("Qwen/Qwen2.5-0.5B", root.GetProperty("base_model_name_or_path").GetString());
            Assert.Equal("none", root.GetProperty("bias").GetString());
            Assert.Equal(0.0, root.GetProperty("lora_dropout").GetDouble());
            Assert.False(root.GetProperty("fan_in_fan_out").GetBoolean());
            Assert.True(root.GetProperty("inference_mode").GetBoolean());
        }

        var loaded = LoraAdapter.Load(dir, Settings, Modules);
        Assert.Equal(Settings.R, loaded.Settings.R);
        Assert.Equal(Settings.Alpha, loaded.Settings.Alpha);
        for (int m = 0; m < Modules.Length; m++)
        {
            Assert.Equal(adapter.Modules[m].A, loaded.Modules[m].A);
            Assert.Equal(adapter.Modules[m].B, loaded.Modules[m].B);
        }
    }

    [Fact]
    public void An_adapter_saved_in_bf16_by_someone_else_loads()
    {
        var adapter = Trained();
        string dir = PathOf("bf16-adapter");
        adapter.Save(dir, "base");
        var tensors = adapter.Modules.SelectMany(m => new[]
        {
            (m.Spec.AName, new[] { 4, m.Spec.In }, m.A),
            (m.Spec.BName, new[] { m.Spec.Out, 4 }, m.B),
        });
        SafeTensorsWriter.Write(Path.Combine(dir, "adapter_model.safetensors"), tensors, "BF16");

        var loaded = LoraAdapter.Load(dir, Settings, Modules);
        for (int i = 0; i < adapter.Modules[1].A.Length; i++)
            Assert.Equal(adapter.Modules[1].A[i], loaded.Modules[1].A[i], MathF.Abs(adapter.Modules[1].A[i]) / 256f);
    }

    [Fact]
    public void Loading_an_adapter_with_another_rank_or_alpha_fails()
    {
        string dir = PathOf("adapter");
        Trained().Save(dir, "base");
        var e = Assert.Throws<WeightsException>(() => LoraAdapter.Load(dir, Settings with { R = 8 }, Modules));
        Assert.Contains("adapter_config.json", e.Message);
        Assert.Contains("r is 4, expected 8", e.Message);
        e = Assert.Throws<WeightsException>(() => LoraAdapter.Load(dir, Settings with { Alpha = 16f }, Modules));
        Assert.Contains("lora_alpha is 8, expected 16", e.Message);
    }

    [Fact]
    public void Loading_an_adapter_without_a_module_fails_naming_the_tensor()
    {
        string dir = PathOf("adapter");
        Trained().Save(dir, "base");
        LoraModuleSpec extra = new("model.layers.1.mlp.down_proj", 24, 16);
        var e = Assert.Throws<WeightsException>(() => LoraAdapter.Load(dir, Settings, [.. Modules, extra]));
        Assert.Contains("adapter_model.safetensors", e.Message);
        Assert.Contains($"tensor '{extra.AName}' is missing", e.Message);
    }

    [Fact]
    public void Loading_an_adapter_with_a_wrong_shape_fails_naming_tensor_and_shapes()
    {
        string dir = PathOf("adapter");
        Trained().Save(dir, "base");
        LoraModuleSpec[] wider = [Modules[0], Modules[1] with { Out = 20 }, Modules[2]];
        var e = Assert.Throws<WeightsException>(() => LoraAdapter.Load(dir, Settings, wider));
        Assert.Contains("adapter_model.safetensors", e.Message);
        Assert.Contains($"tensor '{Modules[1].BName}' has shape [16, 4], the adapter expects [20, 4]", e.Message);
    }

    [Fact]
    public void Loading_from_a_missing_folder_or_files_fails()
    {
        Assert.Contains("does not exist", Assert.Throws<WeightsException>(() => LoraAdapter.Load(PathOf("none"), Settings, Modules)).Message);
        Directory.CreateDirectory(PathOf("empty"));
        Assert.Contains("adapter_config.json", Assert.Throws<WeightsException>(() => LoraAdapter.Load(PathOf("empty"), Settings, Modules)).Message);
        File.WriteAllText(PathOf("empty/adapter_config.json"), """{"peft_type":"LORA","r":4,"lora_alpha":8}""");
        Assert.Contains("adapter_model.safetensors", Assert.Throws<WeightsException>(() => LoraAdapter.Load(PathOf("empty"), Settings, Modules)).Message);
    }

    [Fact]
    public void Gradients_are_saved_under_peft_names()
    {
        string path = PathOf("grads.safetensors");
        var spec = Modules[0];
        var dA = Ramp(4 * spec.In, 1f);
        var dB = Ramp(spec.Out * 4, 2f);
        LoraAdapter.SaveGradients(path, [(spec, dA, dB)], r: 4);
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal([spec.AName, spec.BName], file.Names);
        Assert.Equal([spec.Out, 4], file.Info(spec.BName).Shape);
        Assert.Equal(dA, file.Read(spec.AName));
        Assert.Equal(dB, file.Read(spec.BName));
    }

    // ---- atomic writes ----------------------------------------------------------------------------

    [Fact]
    public void An_atomic_write_that_fails_leaves_the_previous_file_and_no_temp_files()
    {
        string path = PathOf("state.bin");
        AtomicFile.WriteAllText(path, "old content");
        Assert.Throws<InvalidOperationException>(() => AtomicFile.Write(path, stream =>
        {
            stream.Write("new, half-writ"u8);
            throw new InvalidOperationException("disk full");
        }));
        Assert.Equal("old content", File.ReadAllText(path));
        Assert.Equal([path], Directory.EnumerateFiles(_dir));

        AtomicFile.WriteAllText(path, "new content");
        Assert.Equal("new content", File.ReadAllText(path));
        Assert.Equal([path], Directory.EnumerateFiles(_dir));
    }

    [Fact]
    public void Rewriting_a_safetensors_file_leaves_no_temp_files_and_readers_of_the_old_one_keep_working()
    {
        string path = PathOf("adapter_model.safetensors");
        SafeTensorsWriter.Write(path, [("x", [2], [1f, 2f])]);
        using var old = SafeTensorsFile.Open(path);
        SafeTensorsWriter.Write(path, [("x", [3], [3f, 4f, 5f])], "F16");
        Assert.Equal([1f, 2f], old.Read("x"));
        using var fresh = SafeTensorsFile.Open(path);
        Assert.Equal([3f, 4f, 5f], fresh.Read("x"));
        Assert.Equal([path], Directory.EnumerateFiles(_dir));
    }
}
