using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Tests.Training;

namespace LoraCompiler.Tests.Distributed;

/// <summary>
/// <see cref="TrainingRun.Reducer"/> without MPI: a reducer standing for other ranks whose
/// contributions are known, so that what the run must end with follows from one process's run.
/// </summary>
public sealed class ReducerTests
{
    /// <summary>
    /// Rank 0 of <see cref="Ranks"/>, the others as given: each other rank sends the same gradients,
    /// loss and tokens as this one (<see cref="Mirror"/>), or, for federated averaging, trained
    /// <see cref="OtherTokens"/> times this rank's tokens into an adapter of zeros.
    /// </summary>
    private sealed class StandInReducer(int ranks) : IGradientReducer
    {
        private readonly Dictionary<int, float[]> _buffers = [];
        public int Rank => 0;
        public int Ranks => ranks;
        public bool Mirror { get; init; } = true;
        public double OtherTokens { get; init; }
        public int LayersStarted { get; private set; }
        public int Waits { get; private set; }

        public Span<float> LayerBuffer(int layer, int length)
        {
            if (!_buffers.TryGetValue(layer, out var buffer) || buffer.Length != length)
                _buffers[layer] = buffer = new float[length];
            return buffer;
        }

        public void StartLayer(int layer)
        {
            LayersStarted++;
            System.Numerics.Tensors.TensorPrimitives.Multiply(_buffers[layer], ranks, _buffers[layer]);
        }

        public void WaitLayers() => Waits++;

        public void Sum(Span<double> values)
        {
            for (int i = 0; i < values.Length; i++)
                values[i] *= Mirror ? ranks : 1 + OtherTokens;
        }

        public void Sum(Span<float> values)
        {
            if (Mirror)
                System.Numerics.Tensors.TensorPrimitives.Multiply(values, ranks, values);
            // else: the other ranks' adapters are zeros, their weighted sum adds nothing
        }
    }

    private readonly ModelInfo _model = TrainerCatalog.Find("tiny-qwen2")!;

    [Theory]
    [InlineData(1, 1)]
    [InlineData(2, 2)]
    public void Ranks_that_send_the_same_gradients_step_as_one_process_and_a_steady_step_allocates_nothing(int accumulation, int lcsbGroups)
    {
        using var fixture = new ModelFixture(_model, seed: 7, sequence: 16);
        var tokens = Enumerable.Range(0, 2000).Select(i => (i * 7919) % _model.Vocab).ToArray();
        var options = new TrainingOptions { Steps = 10, LearningRate = 1e-2f, GradientAccumulation = accumulation, LcsbGroups = lcsbGroups, Seed = 1 };

        using var alone = fixture.CreateTrainer(new CpuBackend(), maxSequence: 16);
        var single = new TrainingRun(alone, new TokenWindows(tokens, 16, "t"), options, Path.Combine(fixture.Dir, "alone"));
        var aloneAllocated = new long[options.Steps + 1];
        single.StepCompleted += m => aloneAllocated[m.Step] = GC.GetAllocatedBytesForCurrentThread();
        Assert.True(single.Run());

        // Three ranks, each of the others with this rank's gradients: the sum is 3×, the mean the same.
        using var trainer = fixture.CreateTrainer(new CpuBackend(), maxSequence: 16);
        var reducer = new StandInReducer(3);
        var run = new TrainingRun(trainer, new TokenWindows(tokens, 16, "t"), options with { Processes = 3 }, Path.Combine(fixture.Dir, "ranks"))
            { Reducer = reducer };
        var allocated = new long[options.Steps + 1];
        run.StepCompleted += m => allocated[m.Step] = GC.GetAllocatedBytesForCurrentThread();
        Assert.True(run.Run());

        foreach (var (a, b) in trainer.Adapter.Modules.Zip(alone.Adapter.Modules))
        {
            Assert.True(ModelFixture.RelativeError(a.A, b.A) < 1e-6, a.Spec.AName);
            Assert.True(ModelFixture.RelativeError(a.B, b.B) < 1e-6, a.Spec.BName);
        }
        Assert.Equal(options.Steps, reducer.Waits);
        // LCSB: only the layers that backpropagated were sent.
        Assert.Equal(Enumerable.Range(0, options.Steps).Sum(s => Enumerable.Range(0, _model.Layers).Count(l => l % lcsbGroups == s % lcsbGroups)),
            reducer.LayersStarted);
        // The losses and learning rates of metrics.csv, row by row.
        Assert.Equal(File.ReadAllLines(Path.Combine(fixture.Dir, "alone", "metrics.csv")).Select(l => string.Join(',', l.Split(',').Take(3))),
            File.ReadAllLines(Path.Combine(fixture.Dir, "ranks", "metrics.csv")).Select(l => string.Join(',', l.Split(',').Take(3))));
        // The steady state of the distributed path allocates nothing the single-process step does not
        // (what that one allocates, AllocationTests holds to zero).
        var perStep = Enumerable.Range(3, options.Steps - 3).Select(s => allocated[s] - allocated[s - 1]).ToList();
        long aloneMost = Enumerable.Range(3, options.Steps - 3).Max(s => aloneAllocated[s] - aloneAllocated[s - 1]);
        Assert.True(perStep.All(b => b <= aloneMost),
            $"bytes allocated by a distributed step: {string.Join(", ", perStep)}; by a single-process step: at most {aloneMost}");
    }

    [Fact]
    public void A_federated_round_averages_the_adapters_weighted_by_tokens()
    {
        using var fixture = new ModelFixture(_model, seed: 8, sequence: 16);
        var tokens = Enumerable.Range(0, 2000).Select(i => (i * 104729) % _model.Vocab).ToArray();
        var options = new TrainingOptions { Steps = 4, LearningRate = 1e-2f, Seed = 1 };
        using var alone = fixture.CreateTrainer(new CpuBackend(), maxSequence: 16);
        Assert.True(new TrainingRun(alone, new TokenWindows(tokens, 16, "t"), options, Path.Combine(fixture.Dir, "alone")).Run());

        // One round of 4 steps; the other rank trained 3× the tokens into zeros: this rank's share is 1/4.
        using var trainer = fixture.CreateTrainer(new CpuBackend(), maxSequence: 16);
        var run = new TrainingRun(trainer, new TokenWindows(tokens, 16, "t"), options with { Processes = 2, FederatedLocalSteps = 4 },
            Path.Combine(fixture.Dir, "fed")) { Reducer = new StandInReducer(2) { Mirror = false, OtherTokens = 3 } };
        Assert.True(run.Run());
        foreach (var (a, b) in trainer.Adapter.Modules.Zip(alone.Adapter.Modules))
        {
            Assert.True(ModelFixture.RelativeError(a.A, b.A.Select(v => v / 4).ToArray()) < 1e-6, a.Spec.AName);
            Assert.True(ModelFixture.RelativeError(a.B, b.B.Select(v => v / 4).ToArray()) < 1e-6, a.Spec.BName);
        }
        var saved = LoraAdapter.Load(Path.Combine(fixture.Dir, "fed"), _model.Lora, _model.LoraModules);
        Assert.Equal(trainer.Adapter.Modules[0].B, saved.Modules[0].B);
    }

    [Fact]
    public void A_reducer_of_another_size_than_the_options_is_refused()
    {
        using var fixture = new ModelFixture(_model, seed: 9, sequence: 16);
        using var trainer = fixture.CreateTrainer(new CpuBackend(), maxSequence: 16);
        var tokens = Enumerable.Range(0, 200).ToArray();
        var run = new TrainingRun(trainer, new TokenWindows(tokens, 16, "t"), new TrainingOptions { Steps = 2 }, Path.Combine(fixture.Dir, "r"))
            { Reducer = new StandInReducer(2) };
        var e = Assert.Throws<ArgumentException>(() => run.Run());
        Assert.Contains("for 1 process but it runs on 2", e.Message);
        Assert.Throws<ArgumentException>(() => new TrainingOptions { Steps = 5, FederatedLocalSteps = 2 }.Validate());
        Assert.Throws<ArgumentException>(() => new TrainingOptions { Processes = 2, Method = "mezo", Optimizer = "sgd" }.Validate());
    }
}
