using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using Xunit.Abstractions;

namespace LoraCompiler.Tests.Backends.Vulkan;

/// <summary>
/// Base weights resident in device memory (<see cref="VulkanBackend.MapWeight"/>) and the device memory
/// count (<see cref="VulkanBackend.DeviceMemory"/>): a second step uploads no weight and computes the
/// gradients a streamed run does; a residency limit that fits some weights streams the rest; the count
/// returns to its start; a trainer's device buffers are its memory plan plus the resident weights.
/// </summary>
public sealed class VulkanMemoryTests(ITestOutputHelper output)
{
    private const double GradientTolerance = 1e-4;
    private const int Tokens = 17;

    /// <summary>What one run measured: its second step's gradients and traffic, and the backend's residency.</summary>
    private sealed record Run(Dictionary<string, float[]> Gradients, long SecondStepTransfer, long SecondStepWeightUploads,
                              int ResidentWeights, long ResidentWeightBytes, long TrainerBytes, long TensorBytesOnDevice, long WeightBytesOnDevice);

    [VulkanTheory]
    [InlineData("F32")]
    [InlineData("BF16")]
    [InlineData("Q4")]
    public void A_second_step_uploads_no_weight_and_matches_the_streamed_run_and_the_cpu(string dtype)
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 5, Tokens, dtype == "Q4" ? "F32" : dtype);
        using var weights = OpenWeights(fixture, dtype);
        long weightBytes = StoredBytes(weights, model.BaseTensors.Select(t => t.Name));
        long layerWeightBytes = StoredBytes(weights, model.BaseTensors.Select(t => t.Name).Where(n => n.StartsWith("model.layers.", StringComparison.Ordinal)));
        long gradientBytes = model.LoraParameterCount * sizeof(float);

        var resident = Measure(model, fixture, weights, new VulkanBackendOptions());
        var streamed = Measure(model, fixture, weights, new VulkanBackendOptions { MaxResidentBytes = 0 });
        var cpu = CpuGradients(model, fixture, weights);
        output.WriteLine($"{dtype}: weights {weightBytes} bytes ({layerWeightBytes} in layers); second step: resident {resident.SecondStepTransfer} bytes " +
                         $"host<->device, streamed {streamed.SecondStepTransfer} ({streamed.SecondStepWeightUploads} of them weights)");

        // Every weight resident, each counted at its stored size (4-bit packed, 2 bytes a 16-bit value).
        Assert.Equal(model.BaseTensors.Count, resident.ResidentWeights);
        Assert.Equal(weightBytes, resident.ResidentWeightBytes);
        Assert.Equal((0, 0L), (streamed.ResidentWeights, streamed.ResidentWeightBytes));

        // The second step uploads no weight; the streamed one uploads every layer's at least once, and
        // that is all the difference in traffic: what is left is the gradients read back and the tokens.
        Assert.Equal(0, resident.SecondStepWeightUploads);
        Assert.True(streamed.SecondStepWeightUploads >= layerWeightBytes, $"streamed weight uploads {streamed.SecondStepWeightUploads} < {layerWeightBytes}");
        Assert.Equal(streamed.SecondStepTransfer - streamed.SecondStepWeightUploads, resident.SecondStepTransfer);
        Assert.InRange(resident.SecondStepTransfer - gradientBytes, 0, weightBytes / 16);

        AssertSameGradients(streamed.Gradients, resident.Gradients);
        AssertNear(cpu, resident.Gradients);
    }

    [VulkanFact]
    public void A_limit_that_fits_some_weights_streams_the_rest_with_the_same_gradients()
    {
        var model = TrainerCatalog.Find("tiny-llama")!;
        using var fixture = new ModelFixture(model, seed: 9, Tokens);
        using var weights = ModelWeights.Open(fixture.WeightsPath);
        var names = model.BaseTensors.Select(t => t.Name).ToList();
        long weightBytes = StoredBytes(weights, names);
        long limit = weightBytes / 2;

        var partial = Measure(model, fixture, weights, new VulkanBackendOptions { MaxResidentBytes = limit });
        var streamed = Measure(model, fixture, weights, new VulkanBackendOptions { MaxResidentBytes = 0 });
        output.WriteLine($"limit {limit} of {weightBytes} bytes: {partial.ResidentWeights} of {names.Count} weights resident ({partial.ResidentWeightBytes} bytes); " +
                         $"second step uploads {partial.SecondStepWeightUploads} bytes of weights, {streamed.SecondStepWeightUploads} streamed");

        Assert.InRange(partial.ResidentWeights, 1, names.Count - 1);
        Assert.InRange(partial.ResidentWeightBytes, 1, limit);
        // The weights that did not fit are uploaded again; fewer bytes than with none resident, more than none.
        Assert.InRange(partial.SecondStepWeightUploads, 1, streamed.SecondStepWeightUploads - 1);
        Assert.Equal(streamed.SecondStepTransfer - partial.SecondStepTransfer, streamed.SecondStepWeightUploads - partial.SecondStepWeightUploads);
        AssertSameGradients(streamed.Gradients, partial.Gradients);
        AssertNear(CpuGradients(model, fixture, weights), partial.Gradients);
    }

    [VulkanTheory]
    [InlineData(null)] // weights resident
    [InlineData(0L)]   // weights streamed
    public void The_trainer_allocates_its_memory_plan_and_the_count_returns_to_its_start(long? maxResident)
    {
        var model = TrainerCatalog.Find("tiny-qwen3")!;
        using var fixture = new ModelFixture(model, seed: 3, Tokens);
        using var weights = ModelWeights.Open(fixture.WeightsPath);
        long weightBytes = StoredBytes(weights, model.BaseTensors.Select(t => t.Name));
        // The weights a trainer maps once for its whole life (the embedding, the final norm, the LM head):
        // streamed, they stay mapped while it lives, and TrainerBase.Dispose gives them back.
        long wholeRunBytes = maxResident == 0
            ? StoredBytes(weights, model.BaseTensors.Select(t => t.Name).Where(n => !n.StartsWith("model.layers.", StringComparison.Ordinal)))
            : 0;
        var vulkan = VulkanTestDevice.Create(new VulkanBackendOptions { MaxResidentBytes = maxResident });
        var start = vulkan.DeviceMemory;
        Assert.Equal((0L, 0L), (start.TensorBytes, start.WeightBytes));
        Assert.True(start.HostVisible.Bytes > 0, "the upload staging memory is host-visible");

        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        var trainer = model.Create(vulkan, weights, adapter, Tokens);
        trainer.ForwardBackward(fixture.Tokens);
        vulkan.Synchronize(); // streamed weights are freed once the kernels that read them have run
        var during = vulkan.DeviceMemory;
        output.WriteLine($"{vulkan.Name}: {during}");

        // The trainer's device buffers are its memory plan (AllocatedBytes), the weights the resident ones.
        var plan = model.Plan(Tokens, trainer.KeptLayers);
        Assert.Equal(plan.TotalBytes - plan.BytesOf(BufferRole.Weights), trainer.AllocatedBytes);
        Assert.Equal(trainer.AllocatedBytes, during.TensorBytes - start.TensorBytes);
        Assert.Equal(maxResident == 0 ? 0 : weightBytes, vulkan.ResidentWeightBytes);
        Assert.Equal(vulkan.ResidentWeightBytes + wholeRunBytes, during.WeightBytes - start.WeightBytes);
        Assert.True(during.DeviceLocal.Bytes >= during.TensorBytes + during.WeightBytes + during.BackendBytes,
            "allocations are at least the bytes the buffers asked for");
        Assert.True(during.DeviceLocal.PeakBytes >= during.DeviceLocal.Bytes && during.DeviceLocal.PeakAllocations >= during.DeviceLocal.Allocations);
        Assert.Equal(vulkan.Device.HasMemoryBudget, during.Budget is not null);
        Assert.Equal(vulkan.Device.HasMemoryBudget, during.Usage is not null);

        trainer.Dispose();
        vulkan.Synchronize();
        var after = vulkan.DeviceMemory;
        Assert.Equal(start.TensorBytes, after.TensorBytes);
        Assert.Equal(vulkan.ResidentWeightBytes, after.WeightBytes);

        VulkanTestDevice.AssertNoValidationErrors(vulkan);
        vulkan.Dispose();
        var end = vulkan.DeviceMemory;
        Assert.Equal((0L, 0), (end.AllocatedBytes, end.Allocations));
        Assert.Equal((0L, 0L, 0L), (end.TensorBytes, end.WeightBytes, end.BackendBytes));
    }

    [VulkanTheory]
    [InlineData("tiny-qwen2")]
    [InlineData("tiny-gemma3")]
    public void Streamed_weights_keep_the_peak_below_the_resident_one(string modelName)
    {
        // Each layer's streamed weights are freed once the batch that read them has run, the next
        // layer's going into a new batch: the peak holds a couple of layers' weights, not all of them.
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 3, Tokens);
        using var weights = ModelWeights.Open(fixture.WeightsPath);
        long layerBytes = StoredBytes(weights, model.BaseTensors.Select(t => t.Name).Where(n => n.StartsWith("model.layers.0.", StringComparison.Ordinal)));
        long Peak(long? maxResident)
        {
            using var vulkan = VulkanTestDevice.Create(new VulkanBackendOptions { MaxResidentBytes = maxResident });
            var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
            using var trainer = model.Create(vulkan, weights, adapter, Tokens);
            trainer.ForwardBackward(fixture.Tokens);
            vulkan.Synchronize();
            vulkan.ResetPeakDeviceMemory();
            trainer.ForwardBackward(fixture.Tokens);
            vulkan.Synchronize();
            VulkanTestDevice.AssertNoValidationErrors(vulkan);
            return vulkan.DeviceMemory.DeviceLocal.PeakBytes;
        }
        long resident = Peak(null), streamed = Peak(0);
        output.WriteLine($"{modelName}: peak {resident} bytes resident, {streamed} streamed; a layer's weights {layerBytes}");
        Assert.True(resident - streamed >= layerBytes, $"streamed peak {streamed} is not a layer ({layerBytes}) below the resident {resident}");
    }

    [VulkanFact]
    public void The_peak_counts_freed_buffers_until_it_is_reset()
    {
        using var vulkan = VulkanTestDevice.Create();
        vulkan.ResetPeakDeviceMemory();
        var start = vulkan.DeviceMemory;
        Assert.Equal((start.DeviceLocal.Bytes, start.DeviceLocal.Allocations), (start.DeviceLocal.PeakBytes, start.DeviceLocal.PeakAllocations));

        const long length = 1 << 18; // 1 MiB
        var tensor = vulkan.Allocate("t", length);
        Assert.Equal(length * sizeof(float), vulkan.DeviceMemory.TensorBytes - start.TensorBytes);
        tensor.Dispose();
        vulkan.Synchronize();
        var freed = vulkan.DeviceMemory;
        Assert.Equal(start.DeviceLocal.Bytes, freed.DeviceLocal.Bytes);
        Assert.Equal(start.DeviceLocal.Allocations, freed.DeviceLocal.Allocations);
        Assert.True(freed.DeviceLocal.PeakBytes >= start.DeviceLocal.Bytes + length * sizeof(float), $"peak {freed.DeviceLocal.PeakBytes}");
        Assert.Equal(start.DeviceLocal.Allocations + 1, freed.DeviceLocal.PeakAllocations);

        vulkan.ResetPeakDeviceMemory();
        Assert.Equal(freed.DeviceLocal.Bytes, vulkan.DeviceMemory.DeviceLocal.PeakBytes);
    }

    [VulkanFact]
    public void A_resident_weight_is_mapped_once_and_survives_release_and_dispose()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 1, Tokens);
        using var weights = ModelWeights.Open(fixture.WeightsPath);
        using var vulkan = VulkanTestDevice.Create();
        const string name = "model.layers.0.mlp.up_proj.weight";
        var first = vulkan.MapWeight(weights, name);
        long uploads = vulkan.WeightUploadBytes;
        Assert.True(first.IsResident);
        vulkan.ReleaseWeight(first);
        first.Dispose(); // a caller's using block: the backend keeps it
        Assert.Same(first, vulkan.MapWeight(weights, name));
        Assert.Equal(uploads, vulkan.WeightUploadBytes);

        // Still usable: y = x·Wᵀ as the CPU computes it.
        var w = weights.Read(name);
        int rows = weights.Shape(name)[0], columns = weights.Shape(name)[1];
        var x = Enumerable.Range(0, 3 * columns).Select(i => MathF.Sin(i)).ToArray();
        using var xt = vulkan.Upload("x", x);
        using var y = vulkan.Allocate("y", 3 * rows);
        vulkan.LinearForward(y, xt, first, null, 3, columns, rows);
        var actual = new float[3 * rows];
        vulkan.Download(y, actual);
        var cpu = new CpuBackend(1);
        var cy = cpu.Allocate("y", 3 * rows);
        cpu.LinearForward(cy, cpu.Upload("x", x), cpu.Upload("w", w), null, 3, columns, rows);
        var expected = new float[3 * rows];
        cpu.Download(cy, expected);
        Assert.True(ModelFixture.RelativeError(actual, expected) < 1e-5);

        // With MaxResidentBytes = 0 a weight is uploaded at each map and freed at release.
        using var streaming = VulkanTestDevice.Create(new VulkanBackendOptions { MaxResidentBytes = 0 });
        var start = streaming.DeviceMemory.WeightBytes;
        var streamed = streaming.MapWeight(weights, name);
        Assert.False(streamed.IsResident);
        Assert.Equal((long)rows * columns * sizeof(float), streaming.DeviceMemory.WeightBytes - start);
        var again = streaming.MapWeight(weights, name);
        Assert.NotSame(streamed, again);
        streaming.ReleaseWeight(streamed);
        streaming.ReleaseWeight(again);
        streaming.Synchronize();
        Assert.Equal(start, streaming.DeviceMemory.WeightBytes);
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
        VulkanTestDevice.AssertNoValidationErrors(streaming);
    }

    [Fact]
    public void A_negative_limit_is_refused()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => new VulkanBackendOptions { MaxResidentBytes = -1 });
        Assert.Contains("MaxResidentBytes", e.Message);
    }

    // ---------------------------------------------------------------- helpers

    /// <summary>Two steps on a fresh backend; the second one's gradients, host-device traffic and weight uploads.</summary>
    private Run Measure(ModelInfo model, ModelFixture fixture, ModelWeights weights, VulkanBackendOptions options)
    {
        using var vulkan = VulkanTestDevice.Create(options);
        var start = vulkan.DeviceMemory;
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        using var trainer = model.Create(vulkan, weights, adapter, Tokens);
        trainer.ForwardBackward(fixture.Tokens);
        trainer.ZeroGradients();
        vulkan.Synchronize();
        long transfer = vulkan.TransferredBytes, uploads = vulkan.WeightUploadBytes;
        trainer.ForwardBackward(fixture.Tokens);
        var gradients = Gradients(trainer);
        vulkan.Synchronize();
        var memory = vulkan.DeviceMemory;
        VulkanTestDevice.AssertNoValidationErrors(vulkan);
        return new Run(gradients, vulkan.TransferredBytes - transfer, vulkan.WeightUploadBytes - uploads, vulkan.ResidentWeights, vulkan.ResidentWeightBytes,
            trainer.AllocatedBytes, memory.TensorBytes - start.TensorBytes, memory.WeightBytes - start.WeightBytes);
    }

    private static Dictionary<string, float[]> CpuGradients(ModelInfo model, ModelFixture fixture, ModelWeights weights)
    {
        var adapter = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        using var trainer = model.Create(new CpuBackend(), weights, adapter, Tokens);
        trainer.ForwardBackward(fixture.Tokens);
        return Gradients(trainer);
    }

    private static Dictionary<string, float[]> Gradients(TrainerBase trainer)
    {
        var gradients = new Dictionary<string, float[]>();
        foreach (var (spec, da, db) in trainer.DownloadGradients())
        {
            gradients[spec.AName] = da;
            gradients[spec.BName] = db;
        }
        return gradients;
    }

    /// <summary>The same computation on the same device: the same numbers to the bit.</summary>
    private static void AssertSameGradients(Dictionary<string, float[]> expected, Dictionary<string, float[]> actual)
    {
        Assert.Equal(expected.Keys.Order(), actual.Keys.Order());
        foreach (var (name, values) in expected)
            Assert.True(values.AsSpan().SequenceEqual(actual[name]), $"{name}: the resident run's gradient differs from the streamed run's");
    }

    private static void AssertNear(Dictionary<string, float[]> cpu, Dictionary<string, float[]> vulkan)
    {
        foreach (var (name, expected) in cpu)
        {
            Assert.True(expected.Any(v => v != 0), $"{name}: the CPU gradient is zero");
            double error = ModelFixture.RelativeError(vulkan[name], expected);
            Assert.True(error < GradientTolerance, $"{name}: relative error against the CPU backend {error:E2}");
        }
    }

    /// <summary>The fixture's weights, or for "Q4" the same model written in 4 bits (groups of 16, which divide tiny-qwen2's 64 and 176).</summary>
    private static ModelWeights OpenWeights(ModelFixture fixture, string dtype)
    {
        if (dtype != "Q4")
            return ModelWeights.Open(fixture.WeightsPath);
        string path = Path.Combine(fixture.Dir, "model-q4");
        RandomWeights.Write(fixture.Model, path, seed: 5, std: 0.1f, quantizeGroupSize: 16);
        var weights = ModelWeights.Open(path);
        Assert.True(weights.IsQuantized("model.layers.0.mlp.down_proj.weight"));
        return weights;
    }

    /// <summary>
    /// The device bytes the weights take as stored, from the file alone: a 4-bit tensor's packed words (half
    /// a byte a value) and one uint per group for its scale and bias, 2 bytes a 16-bit value, 4 an F32 one.
    /// </summary>
    private static long StoredBytes(ModelWeights weights, IEnumerable<string> names) => names.Sum(name =>
    {
        var info = weights.Info(name);
        if (weights.IsQuantized(name))
            return info.ByteLength + weights.Info(Q4.ScalesName(name)).Elements * sizeof(uint);
        return info.Dtype is "BF16" or "F16" ? info.Elements * 2 : info.Elements * sizeof(float);
    });
}

/// <summary>
/// <c>bench memory --backend vulkan</c>: the device's buffers after the steps are the trainer's plan plus
/// the resident weights, and the peak is at least that. In the process-memory collection: it samples RssAnon.
/// </summary>
[Collection(Cli.ProcessMemoryCollection.Name)]
public sealed class VulkanBenchMemoryTests : IDisposable
{
    private const int Seq = 20;
    private readonly string _dir = Directory.CreateTempSubdirectory("bench-memory-vulkan-").FullName;
    private readonly ModelInfo _model = TrainerCatalog.Find("tiny-qwen2")!;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [VulkanTheory]
    [InlineData(null)]
    [InlineData("0")]
    public void Bench_memory_reports_the_device_buffers_as_the_plan_plus_the_resident_weights(string? maxResident)
    {
        if (!VulkanTestDevice.Available)
            Assert.Fail($"No Vulkan device: {VulkanTestDevice.Reason}");
        RandomWeights.Write(_model, _dir, seed: 4, quantizeGroupSize: 16);
        string[] more = maxResident is null ? [] : ["--max-resident", maxResident];
        var options = Benchmarks.MemoryBenchOptions.Parse(new CommandLine.Args(
            ["--model", _model.Name, "--weights", _dir, "--seq", $"{Seq}", "--steps", "2", "--backend", "vulkan", "--no-reference", .. more]));

        var r = Benchmarks.MemoryBench.Measure(options, Seq);

        using var weights = ModelWeights.Open(_dir);
        long stored = _model.BaseTensors.Sum(t => weights.IsQuantized(t.Name)
            ? weights.Info(t.Name).ByteLength + weights.Info(Q4.ScalesName(t.Name)).Elements * sizeof(uint)
            : weights.Info(t.Name).Elements * sizeof(float));
        Assert.Equal(r.PlannedBufferBytes, r.TrainerBufferBytes);
        Assert.Equal(r.TrainerBufferBytes, r.DeviceTensorBytes);
        Assert.Equal(maxResident is null ? stored : 0, r.ResidentWeightBytes);
        Assert.True(r.DeviceWeightBytes >= r.ResidentWeightBytes, $"{r.DeviceWeightBytes} bytes of weights on the device");
        long buffers = r.DeviceTensorBytes!.Value + r.DeviceWeightBytes!.Value + r.DeviceBackendBytes!.Value;
        Assert.True(r.DevicePeakBytes >= buffers, $"peak {r.DevicePeakBytes} < the {buffers} bytes of buffers after the steps");
        Assert.True(r.DeviceStagingPeakBytes > 0);
        Assert.Equal(r.DeviceBudgetBytes is not null, r.DeviceUsagePeakBytes is not null);

        var printed = new StringWriter();
        Benchmarks.MemoryBench.Print(r, printed);
        var lines = printed.ToString().Split('\n', StringSplitOptions.TrimEntries);
        Assert.Contains(lines, l => l.StartsWith("peak device memory", StringComparison.Ordinal) && l.Contains(Benchmarks.MemoryBench.Mib(r.DevicePeakBytes!.Value).Trim()));
        Assert.Contains(lines, l => l.StartsWith("device buffers after the last step", StringComparison.Ordinal) && l.Contains("(= the trainer buffers)"));
    }

    [Fact]
    public void Max_resident_is_refused_without_vulkan_or_with_a_bad_size()
    {
        string[] common = ["--model", _model.Name, "--weights", _dir, "--no-reference"];
        var e = Assert.Throws<CommandLine.UsageException>(() => Benchmarks.MemoryBenchOptions.Parse(new CommandLine.Args([.. common, "--max-resident", "1GB"])));
        Assert.Contains("--max-resident applies to --backend vulkan", e.Message);
        e = Assert.Throws<CommandLine.UsageException>(() => Benchmarks.MemoryBenchOptions.Parse(new CommandLine.Args(
            [.. common, "--backend", "vulkan", "--max-resident", "lots"])));
        Assert.StartsWith("--max-resident: ", e.Message);
        var options = Benchmarks.MemoryBenchOptions.Parse(new CommandLine.Args([.. common, "--backend", "vulkan", "--max-resident", "1.5MiB"]));
        Assert.Equal(3L << 19, options.MaxResident);
        Assert.Contains("--max-resident", options.ChildArguments(8));
    }
}
