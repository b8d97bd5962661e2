using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Data;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Tests.Data;

namespace LoraCompiler.Tests.Training;

/// <summary>
/// A training run's steady state allocates nothing on the managed heap: garbage the GC collects late
/// is memory a device must have, and it grows with every step between two collections. Measured
/// between two steps' <see cref="TrainingRun.StepCompleted"/> events on the thread that runs them,
/// so it covers the step's data, forward, backward, optimizer and its metrics row.
/// </summary>
public class AllocationTests
{
    [Theory]
    [InlineData("adamw", 2, 1)] // gradient accumulation: the sums are kept from step to step
    [InlineData("adamw", 1, 2)] // LCSB: a skipped layer's zero gradients are not allocated either
    [InlineData("sgd", 1, 1)]
    [InlineData("sgd", 1, 1, "BF16")] // 16-bit weights: their norm weights and biases are converted in pooled buffers
    public void A_steady_state_step_allocates_nothing(string optimizer, int accumulation, int lcsbGroups, string dtype = "F32")
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 5, sequence: 16, dtype);
        string tokenizer = TestTokenizers.WriteTiny([("t", "h"), ("th", "e")],
            addedTokensJson: """[{"id": 281, "content": "<|im_start|>", "special": true}, {"id": 282, "content": "<|im_end|>", "special": true}]""",
            configJson: """{"eos_token": "<|im_end|>"}""");
        string jsonl = Path.Combine(fixture.Dir, "chat.jsonl");
        File.WriteAllLines(jsonl, Enumerable.Range(0, 40).Select(i =>
            $$"""{"messages": [{"role": "user", "content": "question {{i}} about the theme"}, {"role": "assistant", "content": "the answer is {{i * 7}}, then more"}]}"""));
        var examples = TrainingData.Load(jsonl, BpeTokenizer.Load(tokenizer));
        var data = new PackedTrainingData(examples, new SequencePacker(examples.Examples, maxLength: 64, seed: 3));

        const int steps = 12, saveEvery = 5;
        using var trainer = fixture.CreateTrainer(new CpuBackend(), maxSequence: 64);
        var run = new TrainingRun(trainer, data, new TrainingOptions
        {
            Steps = steps, Optimizer = optimizer, GradientAccumulation = accumulation, LcsbGroups = lcsbGroups, SaveEvery = saveEvery,
        }, Path.Combine(fixture.Dir, "run"));
        var allocated = new long[steps + 1];
        run.StepCompleted += m => allocated[m.Step] = GC.GetAllocatedBytesForCurrentThread();
        Assert.True(run.Run());

        // From the third step on (the first ones make the optimizer's moments, the sums and the JIT's
        // first calls), skipping the steps after a checkpoint, which writes files.
        var perStep = Enumerable.Range(3, steps - 2).Where(s => (s - 1) % saveEvery != 0)
            .Select(s => (Step: s, Bytes: allocated[s] - allocated[s - 1])).ToList();
        Assert.True(perStep.All(p => p.Bytes == 0),
            "bytes allocated by a step: " + string.Join(", ", perStep.Select(p => $"step {p.Step}: {p.Bytes:N0}")));
    }
}
