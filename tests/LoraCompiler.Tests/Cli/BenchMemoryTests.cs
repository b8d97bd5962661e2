using System.Text.Json;
using LoraCompiler.Benchmarks;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Cli;

/// <summary>The process's memory is what these tests read, so nothing else runs beside them.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class ProcessMemoryCollection
{
    public const string Name = "process memory";
}

/// <summary>
/// <c>lora bench memory --no-reference</c> on tiny-qwen2: the numbers it reports agree with each other
/// and with the memory plan. No timing is asserted.
/// </summary>
[Collection(ProcessMemoryCollection.Name)]
public sealed class BenchMemoryTests : IDisposable
{
    private const int Seq = 24;
    private const int Steps = 3;
    private readonly string _dir = Directory.CreateTempSubdirectory("bench-memory-test-").FullName;
    private readonly ModelInfo _model = TrainerCatalog.Find("tiny-qwen2")!;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private MemoryBenchOptions Options(string weights, params string[] more) => MemoryBenchOptions.Parse(new Args(
        ["--model", _model.Name, "--weights", weights, "--seq", $"{Seq}", "--steps", $"{Steps}", "--no-reference", .. more]));

    [Fact]
    public void Measured_buffers_equal_the_plan_and_the_peak_is_above_the_baseline()
    {
        RandomWeights.Write(_model, _dir, seed: 1);
        var options = Options(_dir);
        Assert.True(options.NoReference);

        var r = MemoryBench.Measure(options, Seq);

        var plan = _model.Plan(Seq);
        Assert.Equal(plan.TotalBytes - plan.BytesOf(BufferRole.Weights), r.PlannedBufferBytes);
        Assert.Equal(plan.BytesOf(BufferRole.Weights), r.PlannedWeightBytes);
        Assert.Equal(r.PlannedBufferBytes, r.TrainerBufferBytes);
        Assert.Equal(0, r.AdapterHostBytes); // on the CPU the adapter's arrays are the trainer's parameters
        Assert.True(r.BaselinePrivateBytes > 0);
        Assert.True(r.PeakPrivateBytes >= r.BaselinePrivateBytes, $"peak {r.PeakPrivateBytes} < baseline {r.BaselinePrivateBytes}");
        Assert.False(string.IsNullOrEmpty(r.PeakAt));
        Assert.Equal((_model.Name, _model.Lora.R, Seq, Steps, "F32"), (r.Model, r.Rank, r.Sequence, r.Steps, r.WeightsDtype));
        Assert.Equal(Steps, r.StepSeconds.Length);
        Assert.All(r.StepSeconds, s => Assert.True(s > 0));
        Assert.Equal(Steps, r.Losses.Length);
        Assert.All(r.Losses, l => Assert.True(float.IsFinite(l) && l > 0));
        // At least: the first and last readings, one per layer's gradients and one per optimizer step.
        Assert.True(r.Samples >= 2 + Steps * (_model.Layers + 1), $"{r.Samples} samples");
    }

    [Fact]
    public void The_printed_result_is_the_json_line()
    {
        RandomWeights.Write(_model, _dir, seed: 2);
        var output = new StringWriter();
        var console = Console.Out;
        Console.SetOut(output);
        int code;
        try
        {
            code = Bench.Run("memory", new Args(["--model", _model.Name, "--weights", _dir, "--seq", $"{Seq}", "--steps", "2", "--no-reference"]));
        }
        finally
        {
            Console.SetOut(console);
        }

        Assert.Equal(0, code);
        var lines = output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        var json = Assert.Single(lines, l => l.StartsWith(MemoryBench.JsonPrefix, StringComparison.Ordinal));
        var r = JsonSerializer.Deserialize<MemoryBenchResult>(json[MemoryBench.JsonPrefix.Length..])!;
        Assert.Equal(r.PlannedBufferBytes, r.TrainerBufferBytes);
        Assert.True(r.PeakPrivateBytes >= r.BaselinePrivateBytes);
        Assert.Contains(lines, l => l.StartsWith("peak private memory (RssAnon)", StringComparison.Ordinal) && l.Contains(MemoryBench.Mib(r.PeakPrivateBytes).Trim()));
        Assert.Contains(lines, l => l.StartsWith("trainer buffers", StringComparison.Ordinal) && l.Contains(MemoryBench.Mib(r.TrainerBufferBytes!.Value).Trim()));
        Assert.Contains(lines, l => l.StartsWith("planned peak", StringComparison.Ordinal) && l.Contains("planned / allocated = 1.000"));
    }

    [Fact]
    public void BF16_weights_are_converted_not_mapped()
    {
        RandomWeights.Write(_model, _dir, seed: 1, dtype: "BF16");
        using (var weights = ModelWeights.Open(_dir))
            Assert.Null(weights.MapF32("model.embed_tokens.weight")); // an empty Memory here once read as a table of 0 rows

        var r = MemoryBench.Measure(Options(_dir), Seq);

        Assert.Equal("BF16", r.WeightsDtype);
        Assert.All(r.Losses, l => Assert.True(float.IsFinite(l) && l > 0));
    }

    [Fact]
    public void A_rank_picks_the_trainer_generated_at_that_rank_or_is_refused()
    {
        RandomWeights.Write(_model, _dir, seed: 1);
        var e = Assert.Throws<UsageException>(() => Options(_dir, "--rank", $"{_model.Lora.R * 2}"));
        Assert.Contains($"r={_model.Lora.R} ({_model.Name})", e.Message);
        Assert.Same(_model, Options(_dir, "--rank", $"{_model.Lora.R}").Model);

        var qwen = TrainerCatalog.Find("qwen2.5-0.5b")!;
        foreach (var rank in TrainerCatalog.All.Where(m => m.Name.StartsWith("qwen2.5-0.5b-r", StringComparison.Ordinal)).Select(m => m.Lora.R))
        {
            var picked = MemoryBenchOptions.WithRank(qwen, rank);
            Assert.Equal((rank, qwen.ParameterCount), (picked.Lora.R, picked.ParameterCount));
            Assert.Same(qwen, MemoryBenchOptions.WithRank(picked, qwen.Lora.R));
        }
    }

    [Fact]
    public void Statm_and_status_agree_on_private_memory()
    {
        if (!OperatingSystem.IsLinux())
            return;
        // The garbage collector (finishing up after earlier tests) can return memory between two
        // readings: settle it first, and read statm on both sides of status, so that status lies
        // between them whatever moved in the meantime.
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        var first = ProcessMemory.Resident();
        long status = ProcessMemory.PrivateBytes();
        var second = ProcessMemory.Resident();
        Assert.NotNull(first);
        Assert.NotNull(second);
        long low = Math.Min(first.Value.AnonymousBytes, second.Value.AnonymousBytes);
        long high = Math.Max(first.Value.AnonymousBytes, second.Value.AnonymousBytes);
        Assert.InRange(status, low - (8 << 20), high + (8 << 20));
        Assert.True(first.Value.FileBytes > 0);

        using var sampler = new PeakMemorySampler(TimeSpan.FromMilliseconds(1));
        long before = ProcessMemory.PrivateBytes();
        // Native memory, not a managed array: after earlier tests the GC heap can hold resident free
        // space that a new array would reuse without adding a page. 32 MiB from malloc is a fresh mapping.
        unsafe
        {
            const int size = 32 << 20;
            byte* block = (byte*)System.Runtime.InteropServices.NativeMemory.Alloc(size);
            try
            {
                new Span<byte>(block, size).Fill(1); // touch every page
                sampler.Sample("after the block");
            }
            finally
            {
                System.Runtime.InteropServices.NativeMemory.Free(block);
            }
        }
        sampler.Stop();
        Assert.True(sampler.PeakPrivateBytes >= before + (24 << 20), $"peak {sampler.PeakPrivateBytes}, before {before}");
    }
}
