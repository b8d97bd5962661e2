using System.Diagnostics;
using System.Text.Json;
using LoraCompiler.Benchmarks;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraCompiler.Bench;

/// <summary>
/// <c>lora-bench memory-reference</c>: N SGD steps of <see cref="CausalLM"/> in TorchSharp, measured the
/// way <c>lora bench memory --no-reference</c> measures ours: RssAnon before the model is created, then
/// its peak from creating the model to the end of the last optimizer step.
/// </summary>
public static class ReferenceBench
{
    public static int Run(MemoryBenchOptions options)
    {
        if (options.SeveralSequences)
            throw new UsageException("memory-reference measures one sequence length: give --seq.");
        if (options.Backend != "cpu")
            throw new UsageException("The TorchSharp reference runs on the CPU (TorchSharp-cpu): leave out --backend.");
        if (!MemoryBench.HasTorchReference(options.Model))
            throw new UsageException($"The TorchSharp reference implements Qwen2 and Llama; {options.Model.Name} is {options.Model.Architecture}: " +
                                     "measure it with --no-reference.");
        var result = Measure(options, options.Sequences[0], Console.Out);
        MemoryBench.Print(result, Console.Out);
        Console.WriteLine(MemoryBench.JsonPrefix + JsonSerializer.Serialize(result));
        return 0;
    }

    public static MemoryBenchResult Measure(MemoryBenchOptions options, int seq, TextWriter? progress)
    {
        var info = options.Model;
        torch.set_num_threads(Environment.ProcessorCount); // the same threads as the CPU backend; also loads libtorch
        using var weights = ModelWeights.Open(options.WeightsPath);
        var tokens = MemoryBench.BenchTokens(info.Vocab, seq);
        progress?.WriteLine($"Training {options.Steps} SGD steps of {info.Name} in TorchSharp (libtorch {torch.__version__}) on {seq} tokens " +
                            $"(float32, {torch.get_num_threads()} threads)...");

        long baseline = ProcessMemory.PrivateBytes();
        using var sampler = new PeakMemorySampler(MemoryBench.SampleInterval) { Phase = "model creation" };
        using var model = new CausalLM(info);
        Load(model, weights, LoraAdapter.CreateNew(info.Lora, info.LoraModules, seed: 1));
        var trainable = model.parameters().Where(p => p.requires_grad).ToList();
        long trainableCount = trainable.Sum(p => p.numel());
        if (trainableCount != info.LoraParameterCount)
            throw new InvalidOperationException($"{trainableCount} trainable parameters, expected the {info.LoraParameterCount} of LoRA A and B alone");
        long frozenCount = model.parameters().Where(p => !p.requires_grad).Sum(p => p.numel());
        progress?.WriteLine($"  {trainableCount:N0} trainable parameters (LoRA A and B), {frozenCount:N0} frozen");
        long created = ProcessMemory.PrivateBytes();
        var optimizer = torch.optim.SGD(trainable, MemoryBenchOptions.LearningRate);
        using var ids = torch.tensor(tokens.Select(t => (long)t).ToArray(), dtype: ScalarType.Int64).unsqueeze(0);

        var seconds = new List<double>();
        var cpuSeconds = new List<double>();
        var losses = new List<float>();
        for (int step = 1; step <= options.Steps; step++)
        {
            sampler.Phase = $"step {step}";
            var watch = Stopwatch.StartNew();
            double cpu = Environment.CpuUsage.TotalTime.TotalSeconds;
            optimizer.zero_grad();
            using (torch.NewDisposeScope())
            {
                var loss = model.forward(ids);
                loss.backward();
                losses.Add(loss.item<float>());
            }
            optimizer.step();
            seconds.Add(watch.Elapsed.TotalSeconds);
            cpuSeconds.Add(Environment.CpuUsage.TotalTime.TotalSeconds - cpu);
            sampler.Sample("after the optimizer step");
        }
        sampler.Stop();

        return new MemoryBenchResult
        {
            Implementation = "TorchSharp autograd",
            Model = info.Name,
            Rank = info.Lora.R,
            Sequence = seq,
            Steps = options.Steps,
            Backend = $"libtorch {torch.__version__} cpu ({torch.get_num_threads()} threads)",
            Threads = torch.get_num_threads(),
            Weights = options.WeightsPath,
            WeightsDtype = MemoryBench.Describe(weights) + ", as float32",
            BaselinePrivateBytes = baseline,
            CreatedPrivateBytes = created,
            PeakPrivateBytes = sampler.PeakPrivateBytes,
            PeakAt = sampler.PeakAt,
            PeakFileBytes = sampler.PeakFileBytes,
            HighWaterMarkBytes = ProcessMemory.HighWaterMarkBytes(),
            StepSeconds = [.. seconds],
            StepCpuSeconds = [.. cpuSeconds],
            Losses = [.. losses],
            Samples = sampler.Samples,
            SampleIntervalMs = MemoryBench.SampleInterval.TotalMilliseconds,
            Sampling = "RssAnon (resident anonymous memory: resident minus shared pages of /proc/self/statm) read by a thread every 1 ms, " +
                       "and after every optimizer step",
        };
    }

    /// <summary>
    /// Fills every parameter in place: base weights from the model files (dequantized to float32 by
    /// <see cref="ModelWeights.Read(string, Span{float})"/> whatever their dtype), LoRA A and B from the
    /// same new adapter (seed 1) that ours starts from, so both compute the same first loss.
    /// </summary>
    private static void Load(CausalLM model, ModelWeights weights, LoraAdapter adapter)
    {
        var lora = adapter.Modules.ToDictionary(m => m.Spec.Module);
        using var _ = torch.no_grad();
        foreach (var (name, parameter) in model.named_parameters())
        {
            var span = Floats(parameter);
            if (name.EndsWith(".lora_A", StringComparison.Ordinal))
                lora[name[..^".lora_A".Length]].A.CopyTo(span);
            else if (name.EndsWith(".lora_B", StringComparison.Ordinal))
                lora[name[..^".lora_B".Length]].B.CopyTo(span);
            else
                weights.Read(name, span);
        }
    }

    /// <summary>A contiguous float32 CPU tensor's storage as a span (valid while the tensor lives).</summary>
    private static Span<float> Floats(Tensor t)
    {
        if (t.dtype != ScalarType.Float32 || !t.is_contiguous())
            throw new ArgumentException($"expected a contiguous float32 tensor, found {t.dtype}");
        var span = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(t.bytes);
        return span.Length == t.numel() ? span : throw new ArgumentException($"the storage of a tensor of {t.numel()} floats holds {span.Length}");
    }
}
