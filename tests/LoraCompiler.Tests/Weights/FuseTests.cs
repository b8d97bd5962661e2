using System.Buffers.Binary;
using System.Diagnostics;
using System.Text.Json;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using LoraCompiler.Tests.Reference;
using LoraCompiler.Tests.Training;

namespace LoraCompiler.Tests.Weights;

/// <summary>
/// <c>lora fuse</c>: the fused weights against W + s·B·A computed here in double precision (from a
/// float32 base and from a 4-bit one, dequantized here from its bits), the fused model without an
/// adapter against the base with it (the TorchSharp reference and the trainer, on every architecture),
/// sharding against what Hugging Face's loader needs, and the command's folder and errors.
/// </summary>
public sealed class FuseTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("lora-fuse-tests-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    /// <summary>W + s·B·A in double: W [out, in], A [r, in], B [out, r].</summary>
    private static double[] Fused(double[] w, float[] a, float[] b, int outDim, int inDim, int r, double s)
    {
        var result = (double[])w.Clone();
        for (int o = 0; o < outDim; o++)
            for (int i = 0; i < inDim; i++)
            {
                double delta = 0;
                for (int k = 0; k < r; k++)
                    delta += (double)b[o * r + k] * a[k * inDim + i];
                result[o * inDim + i] += s * delta;
            }
        return result;
    }

    /// <summary>A float32 rounded to bfloat16 (its upper 16 bits), to nearest with ties to even.</summary>
    private static float RoundToBFloat16(float value)
    {
        double exact = value;
        float down = BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits(value) & 0xFFFF0000u);
        float up = BitConverter.UInt32BitsToSingle((BitConverter.SingleToUInt32Bits(down) + 0x10000u));
        double toDown = Math.Abs(exact - down), toUp = Math.Abs(up - exact);
        if (toDown != toUp)
            return toDown < toUp ? down : up;
        return (BitConverter.SingleToUInt32Bits(down) & 0x10000u) == 0 ? down : up;
    }

    private static double[] Widen(float[] values) => Array.ConvertAll(values, v => (double)v);

    /// <summary>
    /// A 4-bit tensor dequantized from its bytes, written out here from MLX's layout (element j of a row
    /// is nibble j%8 of word j/8; its value scale·q + bias with the F16 scale and bias of its group).
    /// </summary>
    private static double[] DequantizeFromBytes(ModelWeights weights, string name)
    {
        var info = weights.Info(name);
        int rows = info.Shape[0], columns = info.Shape[1] * 8;
        var packed = weights.Bytes(name);
        var scales = weights.Bytes(Q4.ScalesName(name));
        var biases = weights.Bytes(Q4.BiasesName(name));
        int groups = weights.Info(Q4.ScalesName(name)).Shape[1], groupSize = columns / groups;
        var result = new double[(long)rows * columns];
        for (int row = 0; row < rows; row++)
            for (int j = 0; j < columns; j++)
            {
                uint word = BinaryPrimitives.ReadUInt32LittleEndian(packed[((row * columns + j) / 8 * 4)..]);
                int q = (int)((word >> (4 * (j % 8))) & 0xF);
                int g = row * groups + j / groupSize;
                double scale = (double)BinaryPrimitives.ReadHalfLittleEndian(scales[(g * 2)..]);
                double bias = (double)BinaryPrimitives.ReadHalfLittleEndian(biases[(g * 2)..]);
                result[(long)row * columns + j] = scale * q + bias;
            }
        return result;
    }

    // ================================================================ the arithmetic

    [Fact]
    public void Fused_float_weights_are_W_plus_alpha_over_r_times_B_A()
    {
        // tiny-llama: LoRA on 5 of its 7 projections, so some linears pass through; untied head.
        var model = TrainerCatalog.Find("tiny-llama")!;
        using var fixture = new ModelFixture(model, seed: 21, sequence: 4);
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        string output = PathOf("fused");
        Directory.CreateDirectory(output);
        using (var source = ModelWeights.Open(fixture.WeightsPath))
        {
            var result = ModelFuser.Fuse(source, adapter, output, "F32");
            Assert.Equal(model.LoraModules.Count, result.FusedModules);
            Assert.Equal([Path.Combine(output, "model.safetensors")], result.Files);
        }

        using var fused = ModelWeights.Open(output);
        Assert.Equal(model.BaseTensors.Select(t => t.Name).Order(), fused.Names.Order());
        var modules = adapter.Modules.ToDictionary(m => m.Spec.Module + ".weight");
        double s = model.Lora.Alpha / model.Lora.R;
        Assert.Equal(2.0, s);
        foreach (var spec in model.BaseTensors)
        {
            Assert.Equal("F32", fused.Info(spec.Name).Dtype);
            Assert.Equal(spec.Shape, fused.Shape(spec.Name));
            float[] got = fused.Read(spec.Name), w = fixture.Weights[spec.Name];
            if (!modules.TryGetValue(spec.Name, out var module))
            {
                Assert.Equal(w, got); // passed through exactly
                continue;
            }
            var expected = Fused(Widen(w), module.A, module.B, module.Spec.Out, module.Spec.In, model.Lora.R, s);
            double maxDelta = 0;
            for (int i = 0; i < got.Length; i++)
            {
                Assert.True(Math.Abs(got[i] - expected[i]) <= 1e-6, $"{spec.Name}[{i}]: {got[i]} vs {expected[i]}");
                maxDelta = Math.Max(maxDelta, Math.Abs(expected[i] - w[i]));
            }
            Assert.True(maxDelta > 0.05, $"{spec.Name}: the delta is too small ({maxDelta}) for the test to see a mistake");
        }
    }

    [Fact]
    public void A_4bit_base_fuses_to_the_dequantized_weight_plus_the_delta_in_BF16_by_default()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 22, sequence: 4);
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        string quantized = PathOf("q4"), bf16 = PathOf("bf16"), f32 = PathOf("f32");
        Directory.CreateDirectory(quantized);
        using (var source = ModelWeights.Open(fixture.WeightsPath))
            QuantizedModelWriter.Quantize(source, Path.Combine(quantized, "model.safetensors"), groupSize: 16);
        using var q4 = ModelWeights.Open(quantized);
        foreach (var dir in new[] { bf16, f32 })
        {
            Directory.CreateDirectory(dir);
            if (dir == bf16)
                ModelFuser.Fuse(q4, adapter, dir); // the default dtype
            else
                ModelFuser.Fuse(q4, adapter, dir, "F32");
        }

        using var fusedBf16 = ModelWeights.Open(bf16);
        using var fusedF32 = ModelWeights.Open(f32);
        // The 4-bit companions are gone: the fused model has exactly the model's tensors.
        Assert.Equal(model.BaseTensors.Select(t => t.Name).Order(), fusedBf16.Names.Order());
        var modules = adapter.Modules.ToDictionary(m => m.Spec.Module + ".weight");
        int quantizedSeen = 0;
        foreach (var spec in model.BaseTensors)
        {
            bool isQ4 = q4.IsQuantized(spec.Name);
            quantizedSeen += isQ4 ? 1 : 0;
            double[] w = isQ4 ? DequantizeFromBytes(q4, spec.Name) : Widen(q4.Read(spec.Name));
            double[] expected = modules.TryGetValue(spec.Name, out var m)
                ? Fused(w, m.A, m.B, m.Spec.Out, m.Spec.In, model.Lora.R, model.Lora.Scale)
                : w;
            Assert.Equal(("BF16", "F32"), (fusedBf16.Info(spec.Name).Dtype, fusedF32.Info(spec.Name).Dtype));
            Assert.Equal(spec.Shape, fusedBf16.Info(spec.Name).Shape);
            float[] gotBf16 = fusedBf16.Read(spec.Name), gotF32 = fusedF32.Read(spec.Name);
            for (int i = 0; i < expected.Length; i++)
            {
                Assert.True(Math.Abs(gotF32[i] - expected[i]) <= 1e-6, $"{spec.Name}[{i}] F32: {gotF32[i]} vs {expected[i]}");
                // BF16 is the float32 result rounded to 8 significant bits, to nearest even.
                Assert.True(RoundToBFloat16(gotF32[i]) == gotBf16[i], $"{spec.Name}[{i}] BF16: {gotBf16[i]}, the float32 result {gotF32[i]}");
            }
        }
        Assert.Equal(1 + 7 * model.Layers, quantizedSeen); // the embedding and every projection were 4-bit
    }

    /// <summary>
    /// The fused model with a zero adapter is the base model with the adapter: the TorchSharp reference
    /// on both, and the generated trainer on both (the fused folder read as any model folder, with a
    /// new adapter, whose B is 0).
    /// </summary>
    [Theory]
    [InlineData("tiny-qwen2", false)]
    [InlineData("tiny-llama", false)]
    [InlineData("tiny-qwen3", false)]
    [InlineData("tiny-gemma3", false)]
    [InlineData("tiny-qwen2", true)]
    [InlineData("tiny-gemma3", true)]
    public void The_fused_model_without_adapter_has_the_loss_of_the_base_with_it(string modelName, bool fromQ4)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 5, sequence: 19);
        string basePath = fixture.WeightsPath;
        if (fromQ4)
        {
            basePath = PathOf("q4");
            Directory.CreateDirectory(basePath);
            using var source = ModelWeights.Open(fixture.WeightsPath);
            QuantizedModelWriter.Quantize(source, Path.Combine(basePath, "model.safetensors"), groupSize: 8);
        }
        string fusedPath = PathOf("fused");
        Directory.CreateDirectory(fusedPath);
        using var baseWeights = ModelWeights.Open(basePath);
        ModelFuser.Fuse(baseWeights, LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules), fusedPath, "F32",
            maxShardBytes: 30_000); // and read back through the index
        using var fusedWeights = ModelWeights.Open(fusedPath);
        Assert.True(File.Exists(Path.Combine(fusedPath, ModelWeights.IndexFileName)));

        var cfg = fixture.ReferenceConfig;
        var zero = fixture.Adapter.ToDictionary(kv => kv.Key, kv => new float[kv.Value.Length]);
        var baseFloats = model.BaseTensors.ToDictionary(t => t.Name, t => baseWeights.Read(t.Name)); // dequantized where 4-bit
        var fusedFloats = model.BaseTensors.ToDictionary(t => t.Name, t => fusedWeights.Read(t.Name));
        double referenceBase = TorchReference.LossAndGradients(cfg, baseFloats, fixture.Adapter, fixture.Tokens).Loss;
        double referenceFused = TorchReference.LossAndGradients(cfg, fusedFloats, zero, fixture.Tokens).Loss;
        double referenceWithout = TorchReference.LossAndGradients(cfg, baseFloats, zero, fixture.Tokens).Loss;

        var targets = TrainerBase.NextTokenTargets(fixture.Tokens);
        using var backend = new CpuBackend();
        float trainerBase, trainerFused;
        using (var trainer = model.Create(backend, baseWeights, LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules), fixture.Tokens.Length))
            trainerBase = trainer.Loss(fixture.Tokens, targets);
        var fresh = LoraAdapter.CreateNew(model.Lora, model.LoraModules, seed: 3);
        Assert.All(fresh.Modules, m => Assert.All(m.B, b => Assert.Equal(0f, b)));
        using (var trainer = model.Create(backend, fusedWeights, fresh, fixture.Tokens.Length))
            trainerFused = trainer.Loss(fixture.Tokens, targets);

        const double Tolerance = 1e-5;
        Assert.True(Math.Abs(referenceWithout - referenceBase) > 1e-3,
            $"the adapter barely changes the loss ({referenceWithout} without, {referenceBase} with): the test would prove nothing");
        Assert.True(Math.Abs(referenceFused - referenceBase) <= Tolerance * referenceBase, $"reference: fused {referenceFused} vs base with adapter {referenceBase}");
        Assert.True(Math.Abs(trainerBase - referenceBase) <= Tolerance * referenceBase, $"trainer on the base with adapter {trainerBase} vs reference {referenceBase}");
        Assert.True(Math.Abs(trainerFused - referenceBase) <= Tolerance * referenceBase, $"trainer on the fused model {trainerFused} vs reference {referenceBase}");
    }

    // ================================================================ the files

    [Fact]
    public void Sharding_with_a_tiny_max_shard_size_writes_an_index_Hugging_Face_reads()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 23, sequence: 4);
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        string output = PathOf("sharded"), single = PathOf("single");
        Directory.CreateDirectory(output);
        Directory.CreateDirectory(single);
        // A previous model in the folder: a single file and a shard of another count must not survive.
        File.Copy(Path.Combine(fixture.WeightsPath, "model.safetensors"), Path.Combine(output, "model.safetensors"));
        File.WriteAllText(Path.Combine(output, "model-00001-of-00099.safetensors"), "stale");
        const long MaxShard = 40_000; // BF16: the embedding (320·64·2 = 40,960 bytes) is larger than a shard
        using (var source = ModelWeights.Open(fixture.WeightsPath))
        {
            ModelFuser.Fuse(source, adapter, output, "BF16", MaxShard);
            ModelFuser.Fuse(source, adapter, single, "BF16");
        }

        var files = Directory.GetFiles(output).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToList();
        Assert.DoesNotContain("model.safetensors", files);
        Assert.DoesNotContain("model-00001-of-00099.safetensors", files);
        var shards = files.Where(f => f!.EndsWith(".safetensors")).ToList();
        int n = shards.Count;
        Assert.True(n > 3, $"{n} shards");
        Assert.Equal(Enumerable.Range(1, n).Select(i => $"model-{i:D5}-of-{n:D5}.safetensors"), shards);
        Assert.Equal([.. shards, "model.safetensors.index.json"], files);

        using var index = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "model.safetensors.index.json")));
        var weightMap = index.RootElement.GetProperty("weight_map").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString()!);
        long totalSize = index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64();

        // Every tensor in exactly one shard, the one the map names; total_size the sum of the data.
        var holder = new Dictionary<string, string>();
        long dataBytes = 0;
        long previousShardBytes = -1;
        foreach (var shard in shards)
        {
            using var file = SafeTensorsFile.Open(Path.Combine(output, shard!));
            long shardBytes = file.Names.Sum(name => file.Info(name).ByteLength);
            Assert.True(shardBytes <= MaxShard || file.Names.Count == 1, $"{shard}: {shardBytes} bytes in {file.Names.Count} tensors");
            foreach (var name in file.Names)
            {
                Assert.True(holder.TryAdd(name, shard!), $"{name} is in {holder.GetValueOrDefault(name)} and {shard}");
                Assert.Equal(shard, weightMap[name]);
            }
            // Filled greedily, as save_pretrained does: the next shard's first tensor did not fit this one.
            long first = file.Names.Select(name => file.Info(name)).MinBy(i => i.Offset)!.ByteLength;
            if (previousShardBytes >= 0)
                Assert.True(previousShardBytes + first > MaxShard, $"{shard}'s first tensor would have fit the shard before");
            previousShardBytes = shardBytes;
            dataBytes += shardBytes;
        }
        Assert.Equal(weightMap.Keys.Order(), holder.Keys.Order());
        Assert.Equal(model.BaseTensors.Select(t => t.Name).Order(), holder.Keys.Order());
        Assert.Equal(dataBytes, totalSize);
        Assert.Equal(model.BaseTensors.Sum(t => t.Elements * 2), totalSize);

        // The sharded model opens through its index and holds the same bytes as the single file.
        using var sharded = ModelWeights.Open(output);
        using var one = ModelWeights.Open(single);
        sharded.Validate(model.BaseTensors);
        foreach (var spec in model.BaseTensors)
            Assert.True(sharded.Bytes(spec.Name).SequenceEqual(one.Bytes(spec.Name)), spec.Name);

        // Fusing again without shards leaves no index or shard behind.
        using (var source = ModelWeights.Open(fixture.WeightsPath))
            ModelFuser.Fuse(source, adapter, output, "BF16");
        Assert.Equal(["model.safetensors"], Directory.GetFiles(output).Select(Path.GetFileName));
    }

    [Theory]
    [InlineData("5GB", 5_000_000_000L)]
    [InlineData("500MB", 500_000_000L)]
    [InlineData("2MiB", 2_097_152L)]
    [InlineData("1.5kb", 1500L)]
    [InlineData("12345", 12345L)]
    public void Shard_sizes_read_as_save_pretrained_reads_them(string text, long bytes) =>
        Assert.Equal(bytes, ModelFuser.ParseSize(text));

    [Fact]
    public void The_fuse_command_writes_a_Hugging_Face_model_folder()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 24, sequence: 4);
        string folder = fixture.WeightsPath;
        File.WriteAllText(Path.Combine(folder, "config.json"), """
            {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "_name_or_path": "Qwen/Qwen2.5-0.5B",
             "torch_dtype": "float32", "lora": {"r": 8}, "trainer": {"lm_head_chunk": 128},
             "quantization": {"group_size": 64, "bits": 4}, "quantization_config": {"group_size": 64, "bits": 4}}
            """);
        var tokenizerFiles = new[] { "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json" };
        foreach (var file in tokenizerFiles)
            File.WriteAllText(Path.Combine(folder, file), $$"""{"file": "{{file}}"}""");
        string output = PathOf("fused");

        Assert.Equal(0, Fuse.Run(new Args(["--model", "tiny-qwen2", "--weights", folder, "--adapter", fixture.AdapterPath, "--out", output])));

        using (var fused = ModelWeights.Open(output))
        {
            fused.Validate(model.BaseTensors);
            Assert.All(model.BaseTensors, t => Assert.Equal("BF16", fused.Info(t.Name).Dtype));
        }
        using (var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "config.json"))))
        {
            var root = config.RootElement;
            foreach (var dropped in new[] { "lora", "trainer", "quantization", "quantization_config" })
                Assert.False(root.TryGetProperty(dropped, out _), $"config.json still has '{dropped}'");
            Assert.Equal("bfloat16", root.GetProperty("torch_dtype").GetString());
            Assert.Equal(64, root.GetProperty("hidden_size").GetInt32());
            Assert.Equal("Qwen/Qwen2.5-0.5B", root.GetProperty("_name_or_path").GetString());
        }
        foreach (var file in tokenizerFiles)
            Assert.Equal(File.ReadAllText(Path.Combine(folder, file)), File.ReadAllText(Path.Combine(output, file)));

        // A folder without config.json: the model JSON's, without its lora and trainer sections.
        File.Delete(Path.Combine(folder, "config.json"));
        string second = PathOf("fused-f16");
        Assert.Equal(0, Fuse.Run(new Args(["--model", "tiny-qwen2", "--weights", Path.Combine(folder, "model.safetensors"),
            "--adapter", fixture.AdapterPath, "--out", second, "--dtype", "F16"])));
        using (var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(second, "config.json"))))
        {
            var root = config.RootElement;
            Assert.Equal("Qwen2ForCausalLM", root.GetProperty("architectures")[0].GetString());
            Assert.Equal(320, root.GetProperty("vocab_size").GetInt32());
            Assert.False(root.TryGetProperty("lora", out _));
            Assert.False(root.TryGetProperty("trainer", out _));
            Assert.Equal("float16", root.GetProperty("torch_dtype").GetString());
        }
        using (var fused = ModelWeights.Open(second))
            Assert.Equal("F16", fused.Info("model.norm.weight").Dtype);
    }

    [Fact]
    public void Fuse_errors_are_one_line_naming_the_file()
    {
        var qwen = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(qwen, seed: 25, sequence: 4);
        Args FuseArgs(params string[] more) => new(["--model", "tiny-qwen2", "--weights", fixture.WeightsPath,
            "--adapter", fixture.AdapterPath, "--out", PathOf("out"), .. more]);

        // An adapter of another rank (tiny-llama's r = 4) for the same weights.
        var llama = TrainerCatalog.Find("tiny-llama")!;
        string llamaAdapter = PathOf("llama-adapter");
        LoraAdapter.CreateNew(llama.Lora, llama.LoraModules, seed: 1).Save(llamaAdapter, llama.Name);
        var e = Assert.Throws<WeightsException>(() => Fuse.Run(new Args(["--model", "tiny-qwen2", "--weights", fixture.WeightsPath,
            "--adapter", llamaAdapter, "--out", PathOf("out")])));
        Assert.Equal($"{Path.Combine(llamaAdapter, "adapter_config.json")}: r is 4, expected 8", e.Message);

        // The weights of another model.
        e = Assert.Throws<WeightsException>(() => Fuse.Run(new Args(["--model", "tiny-llama", "--weights", fixture.WeightsPath,
            "--adapter", llamaAdapter, "--out", PathOf("out")])));
        Assert.StartsWith(fixture.WeightsPath, e.Message);
        Assert.DoesNotContain('\n', e.Message);

        // An adapter with a module the model does not adapt (tiny-llama's LoRA leaves out k_proj): refused, not dropped.
        using (var llamaFixture = new ModelFixture(llama, seed: 26, sequence: 4))
        {
            string weights = Path.Combine(llamaFixture.AdapterPath, "adapter_model.safetensors");
            var tensors = llama.LoraModules.SelectMany(m => new[]
            {
                (m.AName, new[] { llama.Lora.R, m.In }, llamaFixture.Adapter[m.AName]),
                (m.BName, new[] { m.Out, llama.Lora.R }, llamaFixture.Adapter[m.BName]),
            }).Append(("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", [llama.Lora.R, llama.Hidden], new float[llama.Lora.R * llama.Hidden]));
            SafeTensorsWriter.Write(weights, tensors);
            e = Assert.Throws<WeightsException>(() => Fuse.Run(new Args(["--model", "tiny-llama", "--weights", llamaFixture.WeightsPath,
                "--adapter", llamaFixture.AdapterPath, "--out", PathOf("out")])));
            Assert.StartsWith($"{weights}: 1 tensor belongs to no LoRA module of tiny-llama", e.Message);
            Assert.Contains("'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight'", e.Message);
            Assert.Throws<WeightsException>(() => Export.Run(new Args(["--model", "tiny-llama", "--adapter", llamaFixture.AdapterPath,
                "--format", "gguf", "--out", PathOf("out")])));
        }

        Assert.Contains("--dtype", Assert.Throws<UsageException>(() => Fuse.Run(FuseArgs("--dtype", "q4"))).Message);
        Assert.Contains("--max-shard-size", Assert.Throws<UsageException>(() => Fuse.Run(FuseArgs("--max-shard-size", "big"))).Message);
        Assert.Contains("base model's folder", Assert.Throws<UsageException>(() => Fuse.Run(new Args(["--model", "tiny-qwen2",
            "--weights", fixture.WeightsPath, "--adapter", fixture.AdapterPath, "--out", fixture.WeightsPath]))).Message);
        Assert.False(Directory.Exists(PathOf("out")));
    }

    [Fact]
    public void Fuse_and_export_print_their_usage_with_help()
    {
        foreach (var command in new[] { "fuse", "export" })
        {
            var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
            start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "lora.dll"));
            start.ArgumentList.Add(command);
            start.ArgumentList.Add("--help");
            using var process = Process.Start(start)!;
            string output = process.StandardOutput.ReadToEnd();
            process.WaitForExit();
            Assert.Equal(0, process.ExitCode);
            Assert.StartsWith($"lora {command} --model NAME", output);
            Assert.DoesNotContain("Commands:", output); // its own usage, not the whole list
        }
    }
}
