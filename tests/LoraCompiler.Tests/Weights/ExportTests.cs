using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using LoraCompiler.Tests.Training;

namespace LoraCompiler.Tests.Weights;

/// <summary>
/// <c>lora export</c>: the GGUF file read back by Hugging Face's JavaScript GGUF parser and, without
/// any parser, byte by byte against the spec; the MLX folder read back with <see cref="SafeTensorsFile"/>.
/// Names, dimensions and Llama's row order are written out here from llama.cpp's and mlx-lm's
/// conventions, not taken from the exporter.
/// </summary>
public sealed class ExportTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("lora-export-tests-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    /// <summary>llama.cpp's tensor names (gguf-py's tensor map) for the Hugging Face projections.</summary>
    private static readonly Dictionary<string, string> LlamaCppNames = new()
    {
        ["self_attn.q_proj"] = "attn_q", ["self_attn.k_proj"] = "attn_k", ["self_attn.v_proj"] = "attn_v",
        ["self_attn.o_proj"] = "attn_output", ["mlp.gate_proj"] = "ffn_gate", ["mlp.up_proj"] = "ffn_up",
        ["mlp.down_proj"] = "ffn_down",
    };

    /// <summary>model.layers.N.self_attn.q_proj → (N, "self_attn.q_proj").</summary>
    private static (int Layer, string Path) Split(string module)
    {
        var parts = module.Split('.');
        Assert.Equal(("model", "layers"), (parts[0], parts[1]));
        return (int.Parse(parts[2]), string.Join('.', parts.Skip(3)));
    }

    /// <summary>
    /// The rows of B as llama.cpp's converter leaves a Llama q/k weight: reshape(heads, 2, D/2, r),
    /// swap axes 1 and 2, flatten (written here from numpy's semantics, index by index).
    /// </summary>
    private static float[] LlamaCppRowOrder(float[] b, int rows, int r, int heads)
    {
        int d = rows / heads, half = d / 2;
        var result = new float[b.Length];
        int next = 0;
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++)     // axis 1 after the swap (was axis 2)
                for (int j = 0; j < 2; j++)    // axis 2 after the swap (was axis 1)
                {
                    int source = h * d + j * half + i;
                    Array.Copy(b, source * r, result, next * r, r);
                    next++;
                }
        return result;
    }

    private static float[] ReadData(byte[] file, long offset, long count, int dtype)
    {
        var values = new float[count];
        for (long i = 0; i < count; i++)
            values[i] = dtype == 0
                ? BinaryPrimitives.ReadSingleLittleEndian(file.AsSpan((int)(offset + 4 * i)))
                : (float)BinaryPrimitives.ReadHalfLittleEndian(file.AsSpan((int)(offset + 2 * i)));
        return values;
    }

    // ================================================================ GGUF

    [Theory]
    [InlineData("tiny-qwen2", "qwen2", "f32")]
    [InlineData("tiny-qwen3", "qwen3", "f16")]
    [InlineData("tiny-gemma3", "gemma3", "f32")]
    [InlineData("tiny-llama", "llama", "f32")]
    public void The_GGUF_export_reads_back_in_huggingface_gguf_as_llama_cpp_expects_it(string modelName, string architecture, string dtype)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 31, sequence: 4);
        string path = PathOf("adapter.gguf");
        Assert.Equal(0, Export.Run(new Args(["--model", modelName, "--adapter", fixture.AdapterPath, "--format", "gguf",
            "--out", path, "--base-model", "org/base-model", "--dtype", dtype])));

        using var parsed = GgufJs.Parse(path);
        var root = parsed.RootElement;
        Assert.True(root.GetProperty("littleEndian").GetBoolean());
        var kv = root.GetProperty("typedMetadata");
        (JsonElement Value, int Type) Kv(string key) => (kv.GetProperty(key).GetProperty("value"), kv.GetProperty(key).GetProperty("type").GetInt32());
        const int Uint32 = 4, Float32 = 6, String = 8;
        Assert.Equal(3, Kv("version").Value.GetInt32());
        Assert.Equal((architecture, String), (Kv("general.architecture").Value.GetString(), Kv("general.architecture").Type));
        Assert.Equal(("adapter", String), (Kv("general.type").Value.GetString(), Kv("general.type").Type));
        Assert.Equal(("lora", String), (Kv("adapter.type").Value.GetString(), Kv("adapter.type").Type));
        Assert.Equal(((double)model.Lora.Alpha, Float32), (Kv("adapter.lora.alpha").Value.GetDouble(), Kv("adapter.lora.alpha").Type));
        Assert.Equal((32, Uint32), (Kv("general.alignment").Value.GetInt32(), Kv("general.alignment").Type));
        Assert.Equal((dtype == "f16" ? 1 : 0, Uint32), (Kv("general.file_type").Value.GetInt32(), Kv("general.file_type").Type));
        Assert.Equal(("adapter", String), (Kv("general.name").Value.GetString(), Kv("general.name").Type));
        Assert.Equal("org/base-model", Kv("general.base_model.0.name").Value.GetString());

        int r = model.Lora.R, ggmlType = dtype == "f16" ? 1 : 0;
        long dataStart = root.GetProperty("tensorDataOffset").GetInt64();
        Assert.Equal(0, dataStart % 32);
        var infos = root.GetProperty("tensorInfos").EnumerateArray().ToDictionary(t => t.GetProperty("name").GetString()!);
        Assert.Equal(2 * model.LoraModules.Count, infos.Count);
        var file = File.ReadAllBytes(path);
        var adapter = fixture.Adapter;
        int permuted = 0;
        foreach (var spec in model.LoraModules)
        {
            var (layer, module) = Split(spec.Module);
            string name = $"blk.{layer}.{LlamaCppNames[module]}.weight";
            float[] a = adapter[spec.AName], b = adapter[spec.BName];
            int heads = module == "self_attn.q_proj" ? model.Heads : module == "self_attn.k_proj" ? model.KvHeads : 0;
            if (architecture == "llama" && heads > 0)
            {
                b = LlamaCppRowOrder(b, spec.Out, r, heads);
                Assert.NotEqual(adapter[spec.BName], b);
                permuted++;
            }
            foreach (var (suffix, dims, expected) in new[] { ("lora_a", new long[] { spec.In, r }, a), ("lora_b", new long[] { r, spec.Out }, b) })
            {
                Assert.True(infos.TryGetValue($"{name}.{suffix}", out var info), $"{name}.{suffix} is missing");
                Assert.Equal(2, info.GetProperty("n_dims").GetInt32());
                Assert.Equal(dims, info.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()));
                Assert.Equal(ggmlType, info.GetProperty("dtype").GetInt32());
                long offset = info.GetProperty("offset").GetInt64();
                Assert.Equal(0, offset % 32);
                var got = ReadData(file, dataStart + offset, expected.Length, ggmlType);
                var want = dtype == "f16" ? expected.Select(v => (float)(Half)v).ToArray() : expected;
                Assert.Equal(want, got);
            }
        }
        // tiny-llama adapts q_proj (but not k_proj) in each of its 3 layers.
        Assert.Equal(architecture == "llama" ? model.Layers : 0, permuted);
    }

    [Fact]
    public void Llama_head_rows_are_interleaved_as_llama_cpp_permutes_them()
    {
        // 2 heads of 4 rows, rows numbered: each head's halves (0 1 | 2 3) become pairs (0 2 1 3).
        float[] rows = [0, 1, 2, 3, 4, 5, 6, 7];
        Assert.Equal([0f, 2, 1, 3, 4, 6, 5, 7], GgufAdapter.PermuteHeads(rows, 8, 1, 2));
        Assert.Equal(LlamaCppRowOrder(rows, 8, 1, 2), GgufAdapter.PermuteHeads(rows, 8, 1, 2));
        var wide = Enumerable.Range(0, 48 * 3).Select(i => (float)i).ToArray();
        Assert.Equal(LlamaCppRowOrder(wide, 48, 3, 6), GgufAdapter.PermuteHeads(wide, 48, 3, 6));
    }

    /// <summary>The file walked by hand as ggml's spec lays it out, with no GGUF reader at all.</summary>
    [Fact]
    public void The_GGUF_bytes_are_laid_out_as_the_spec_says()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 32, sequence: 4);
        string path = PathOf("adapter.gguf");
        Assert.Equal(0, Export.Run(new Args(["--model", "tiny-qwen2", "--adapter", fixture.AdapterPath, "--format", "gguf", "--out", path])));
        var bytes = File.ReadAllBytes(path);
        int at = 0;
        uint U32() { uint v = BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(at)); at += 4; return v; }
        ulong U64() { ulong v = BinaryPrimitives.ReadUInt64LittleEndian(bytes.AsSpan(at)); at += 8; return v; }
        string Str() { int n = checked((int)U64()); string s = Encoding.UTF8.GetString(bytes, at, n); at += n; return s; }

        Assert.Equal("GGUF"u8.ToArray(), bytes[..4]);
        at = 4;
        Assert.Equal(3u, U32());
        ulong tensors = U64(), kvs = U64();
        Assert.Equal((ulong)(2 * model.LoraModules.Count), tensors);
        var metadata = new Dictionary<string, object>();
        for (ulong i = 0; i < kvs; i++)
        {
            string key = Str();
            metadata[key] = U32() switch
            {
                4 => U32(),
                6 => BitConverter.UInt32BitsToSingle(U32()),
                8 => Str(),
                var type => throw new Xunit.Sdk.XunitException($"{key}: unexpected value type {type}"),
            };
        }
        Assert.Equal("general.architecture", metadata.Keys.First()); // as gguf-py writes it, first
        Assert.Equal("qwen2", metadata["general.architecture"]);
        Assert.Equal(16f, metadata["adapter.lora.alpha"]);
        // The base model: the PEFT adapter's base_model_name_or_path, which train and init-adapter write as the model's name.
        Assert.Equal("tiny-qwen2", metadata["general.base_model.0.name"]);

        long expectedOffset = 0;
        var first = (Name: "", Offset: 0UL);
        for (ulong i = 0; i < tensors; i++)
        {
            string name = Str();
            Assert.Equal(2u, U32());
            ulong ne0 = U64(), ne1 = U64();
            Assert.Equal(0u, U32()); // F32
            ulong offset = U64();
            Assert.Equal((ulong)expectedOffset, offset);
            expectedOffset += ((long)(ne0 * ne1 * 4) + 31) / 32 * 32;
            if (i == 0)
                first = (name, offset);
        }
        long dataStart = (at + 31) / 32 * 32;
        Assert.All(bytes[at..(int)dataStart], b => Assert.Equal(0, b));
        Assert.Equal(dataStart + expectedOffset, bytes.Length);
        Assert.Equal("blk.0.attn_q.weight.lora_a", first.Name);
        var a = fixture.Adapter[model.LoraModules[0].AName];
        Assert.Equal(a, ReadData(bytes, dataStart + (long)first.Offset, a.Length, 0));
    }

    // ================================================================ MLX

    [Theory]
    [InlineData("f32")]
    [InlineData("f16")]
    public void The_MLX_export_holds_the_transposed_matrices_and_mlx_lm_config(string dtype)
    {
        // tiny-llama: LoRA on q_proj, v_proj, o_proj, up_proj and down_proj of 3 layers.
        var model = TrainerCatalog.Find("tiny-llama")!;
        using var fixture = new ModelFixture(model, seed: 33, sequence: 4);
        File.WriteAllText(Path.Combine(fixture.WeightsPath, "config.json"), """{"_name_or_path": "meta-llama/Llama-3.2-1B"}""");
        string output = PathOf("mlx");
        Assert.Equal(0, Export.Run(new Args(["--model", "tiny-llama", "--adapter", fixture.AdapterPath, "--format", "mlx",
            "--out", output, "--weights", fixture.WeightsPath, "--dtype", dtype])));

        using var file = SafeTensorsFile.Open(Path.Combine(output, "adapters.safetensors"));
        Assert.Equal(2 * model.LoraModules.Count, file.Names.Count);
        int r = model.Lora.R;
        foreach (var spec in model.LoraModules)
        {
            float[] a = fixture.Adapter[spec.AName], b = fixture.Adapter[spec.BName];
            var loraA = file.Info($"{spec.Module}.lora_a");
            var loraB = file.Info($"{spec.Module}.lora_b");
            Assert.Equal(dtype.ToUpperInvariant(), loraA.Dtype);
            Assert.Equal([spec.In, r], loraA.Shape);
            Assert.Equal([r, spec.Out], loraB.Shape);
            float[] gotA = file.Read(loraA.Name), gotB = file.Read(loraB.Name);
            float Stored(float v) => dtype == "f16" ? (float)(Half)v : v;
            for (int i = 0; i < spec.In; i++)
                for (int k = 0; k < r; k++)
                    Assert.Equal(Stored(a[k * spec.In + i]), gotA[i * r + k]); // lora_a = Aᵀ
            for (int k = 0; k < r; k++)
                for (int o = 0; o < spec.Out; o++)
                    Assert.Equal(Stored(b[o * r + k]), gotB[k * spec.Out + o]); // lora_b = Bᵀ
        }

        using var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "adapter_config.json")));
        var root = config.RootElement;
        Assert.Equal("lora", root.GetProperty("fine_tune_type").GetString());
        Assert.Equal(model.Layers, root.GetProperty("num_layers").GetInt32());
        Assert.Equal("meta-llama/Llama-3.2-1B", root.GetProperty("base_model_name_or_path").GetString());
        Assert.Equal("meta-llama/Llama-3.2-1B", root.GetProperty("model").GetString());
        var lora = root.GetProperty("lora_parameters");
        Assert.Equal(r, lora.GetProperty("rank").GetInt32());
        Assert.Equal(model.Lora.Alpha / model.Lora.R, lora.GetProperty("scale").GetDouble());
        Assert.Equal(0.0, lora.GetProperty("dropout").GetDouble());
        Assert.Equal(["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"],
            lora.GetProperty("keys").EnumerateArray().Select(k => k.GetString()));
    }

    [Fact]
    public void Export_errors_name_the_option_or_the_file()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 34, sequence: 4);
        Args ExportArgs(params string[] more) => new(["--model", "tiny-qwen2", "--adapter", fixture.AdapterPath, "--out", PathOf("x"), .. more]);
        Assert.Contains("--format", Assert.Throws<UsageException>(() => Export.Run(ExportArgs("--format", "onnx"))).Message);
        Assert.Contains("--dtype", Assert.Throws<UsageException>(() => Export.Run(ExportArgs("--format", "gguf", "--dtype", "bf16"))).Message);
        var e = Assert.Throws<WeightsException>(() => Export.Run(new Args(["--model", "tiny-llama", "--adapter", fixture.AdapterPath,
            "--format", "mlx", "--out", PathOf("x")])));
        Assert.Equal($"{Path.Combine(fixture.AdapterPath, "adapter_config.json")}: r is 8, expected 4", e.Message);
        Assert.False(File.Exists(PathOf("x")) || Directory.Exists(PathOf("x")));
    }
}
