using System.Diagnostics;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Training;

public class TrainingTests
{
    [Theory]
    [InlineData("adamw", 1)]
    [InlineData("adamw", 2)]  // LCSB: skipped layers get a zero gradient and still move with momentum
    [InlineData("sgd", 1)]
    public void LayerByLayerUpdatesEqualOneUpdateWithAllGradients(string optimizer, int groups)
    {
        var model = TrainerCatalog.Find("tiny-llama")!;
        using var fixture = new ModelFixture(model, seed: 23, sequence: 16);
        var targets = TrainerBase.NextTokenTargets(fixture.Tokens);
        var options = new TrainingOptions { Steps = 3, LearningRate = 1e-2f, Optimizer = optimizer, LcsbGroups = groups };

        // The run: three steps on the same sequence, each layer stepped as its gradients arrive.
        using var trainer = fixture.CreateTrainer(new CpuBackend());
        var data = new RepeatedSequence(fixture.Tokens, targets);
        string outDir = Path.Combine(fixture.Dir, "run");
        new TrainingRun(trainer, data, options, outDir).Run();

        // The same by hand: all gradients first, then one optimizer update per step.
        using var manual = fixture.CreateTrainer(new CpuBackend());
        manual.LcsbGroups = groups;
        var moments = new Dictionary<string, (float[] M, float[] V)>();
        for (int step = 1; step <= options.Steps; step++)
        {
            manual.ZeroGradients();
            manual.ForwardBackward(fixture.Tokens, targets, step - 1);
            var gradients = manual.DownloadGradients().ToList();
            manual.DownloadAdapter();
            foreach (var ((spec, da, db), module) in gradients.Zip(manual.Adapter.Modules))
            {
                Update(spec.AName, module.A, da, step);
                Update(spec.BName, module.B, db, step);
            }
            manual.UploadAdapter();
        }

        // SGD: p −= lr·g. AdamW (β = 0.9, 0.999, ε = 1e-8, no weight decay), as Loshchilov and Hutter write it.
        void Update(string name, float[] p, float[] g, int t)
        {
            float lr = options.LearningRate;
            if (optimizer == "sgd")
            {
                for (int i = 0; i < p.Length; i++)
                    p[i] -= lr * g[i];
                return;
            }
            if (!moments.TryGetValue(name, out var state))
                moments[name] = state = (new float[p.Length], new float[p.Length]);
            for (int i = 0; i < p.Length; i++)
            {
                state.M[i] = 0.9f * state.M[i] + 0.1f * g[i];
                state.V[i] = 0.999f * state.V[i] + 0.001f * g[i] * g[i];
                double mHat = state.M[i] / (1 - Math.Pow(0.9, t)), vHat = state.V[i] / (1 - Math.Pow(0.999, t));
                p[i] -= (float)(lr * mHat / (Math.Sqrt(vHat) + 1e-8));
            }
        }

        var saved = LoraAdapter.Load(outDir, model.Lora, model.LoraModules);
        foreach (var (a, b) in saved.Modules.Zip(manual.Adapter.Modules))
        {
            Assert.True(ModelFixture.RelativeError(a.A, b.A) < 1e-6, a.Spec.AName);
            Assert.True(ModelFixture.RelativeError(a.B, b.B) < 1e-6, a.Spec.BName);
        }
    }

    [Theory]
    [InlineData("tiny-qwen2")]
    [InlineData("tiny-gemma3")]
    public void MeZOProjectedGradientIsTheDirectionalDerivative(string modelName)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 29, sequence: 24);
        var targets = TrainerBase.NextTokenTargets(fixture.Tokens);
        using var trainer = fixture.CreateTrainer(new CpuBackend());

        // One SPSA sample: ĝ = g·z with g = (L(θ+εz) − L(θ−εz)) / 2ε ≈ z·∇L, so z·ĝ = g·|z|².
        var estimate = MeZO.EstimateGradient(trainer, fixture.Tokens, targets, seed: 5, epsilon: 1e-3f, samples: 1);
        trainer.ForwardBackward(fixture.Tokens, targets, 0);
        double directional = 0, zz = 0, zg = 0;
        int index = 0;
        foreach (var (spec, da, db) in trainer.DownloadGradients())
            foreach (var (name, exact) in new[] { (spec.AName, da), (spec.BName, db) })
            {
                var z = MeZO.Noise(NoiseKey.For(5, index++), exact.Length);
                for (int i = 0; i < z.Length; i++)
                {
                    directional += z[i] * exact[i];
                    zz += z[i] * z[i];
                    zg += z[i] * estimate[name][i];
                }
            }
        double g = zg / zz;
        Assert.InRange(Math.Abs(g - directional) / Math.Abs(directional), 0, 0.05);

        // The perturbations cancel: the parameters are where they started.
        trainer.DownloadAdapter();
        var original = LoraAdapter.Load(fixture.AdapterPath, model.Lora, model.LoraModules);
        foreach (var (a, b) in trainer.Adapter.Modules.Zip(original.Modules))
            Assert.True(ModelFixture.RelativeError(a.A, b.A) < 1e-6, a.Spec.AName);
    }

    [Theory]
    [InlineData("tiny-qwen2", "backprop", false)]
    [InlineData("tiny-qwen2", "mezo", false)]
    [InlineData("tiny-gemma3", "backprop", false)]
    [InlineData("tiny-qwen2", "backprop", true)] // with --val-data: validation leaves the resume state alone
    public void KilledRunResumesToTheSameAdapter(string modelName, string method, bool validate)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 31, sequence: 8);
        string data = Path.Combine(fixture.Dir, "data.txt");
        File.WriteAllText(data, string.Concat(Enumerable.Repeat("The quick brown fox jumps over the lazy dog. ", 40)));
        string held = Path.Combine(fixture.Dir, "held-out.txt");
        File.WriteAllText(held, "Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump!");
        string[] Train(string outDir) => [
            "train", "--model", model.Name, "--weights", fixture.WeightsPath, "--data", data, "--out", outDir,
            "--steps", "400", "--seq", "32", "--lr", "1e-3", "--method", method, "--save-every", "7", "--seed", "3",
            "--schedule", "cosine", "--warmup", "10", .. (validate ? new[] { "--val-data", held } : [])];

        string whole = Path.Combine(fixture.Dir, "whole");
        Assert.Equal(0, Commands.Train(new Args(Train(whole).Skip(1))));

        // The same run in a process of its own, killed once it has written a few checkpoints.
        string killed = Path.Combine(fixture.Dir, "killed");
        using (var process = Lora(Train(killed)))
        {
            var deadline = DateTime.UtcNow.AddMinutes(2);
            string state = Path.Combine(killed, TrainingRun.CheckpointFolder, "state.json");
            while (!(File.Exists(state) && CheckpointStep(state) >= 21) && !process.HasExited && DateTime.UtcNow < deadline)
                Thread.Sleep(20);
            Assert.False(process.HasExited, "the run ended before it could be killed; give it more steps");
            process.Kill(entireProcessTree: true);
            process.WaitForExit();
        }
        Assert.False(File.Exists(Path.Combine(killed, LoraAdapter.WeightsFileName)), "the killed run must not have finished");

        Assert.Equal(0, Commands.Train(new Args([.. Train(killed).Skip(1), "--resume", killed])));

        var expected = LoraAdapter.Load(whole, model.Lora, model.LoraModules);
        var resumed = LoraAdapter.Load(killed, model.Lora, model.LoraModules);
        foreach (var (a, b) in resumed.Modules.Zip(expected.Modules))
        {
            Assert.True(ModelFixture.RelativeError(a.A, b.A) < 1e-6, a.Spec.AName);
            Assert.True(ModelFixture.RelativeError(a.B, b.B) < 1e-6, a.Spec.BName);
        }
        if (validate)
        {
            // Every 7 steps (the save interval) and at the end, the same values before and after the kill.
            var wholeRun = ValidationTests.ReadMetrics(whole).Where(m => m.ValidationLoss is not null).ToList();
            var resumedRun = ValidationTests.ReadMetrics(killed).Where(m => m.ValidationLoss is not null).ToList();
            Assert.Equal([.. Enumerable.Range(1, 57).Select(i => 7 * i), 400], wholeRun.Select(m => m.Step));
            Assert.Equal(wholeRun.Select(m => m.Step), resumedRun.Select(m => m.Step));
            foreach (var (a, b) in resumedRun.Zip(wholeRun))
                Assert.InRange(Math.Abs(a.ValidationLoss!.Value - b.ValidationLoss!.Value), 0, 1e-6 * b.ValidationLoss.Value);
        }
    }

    private static int CheckpointStep(string stateFile)
    {
        try
        {
            using var json = System.Text.Json.JsonDocument.Parse(File.ReadAllText(stateFile));
            return json.RootElement.GetProperty("Step").GetInt32();
        }
        catch (Exception e) when (e is IOException or System.Text.Json.JsonException)
        {
            return 0; // being swapped in right now
        }
    }

    /// <summary>The command line in a process of its own (lora.dll is copied beside the tests).</summary>
    private static Process Lora(string[] args)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "lora.dll"));
        foreach (var a in args)
            start.ArgumentList.Add(a);
        var process = Process.Start(start)!;
        process.OutputDataReceived += (_, _) => { };
        process.ErrorDataReceived += (_, _) => { };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }


    private sealed class RepeatedSequence(int[] tokens, int[] targets) : ITrainingData
    {
        public string Description => "one repeated sequence";
        public (ReadOnlyMemory<int> Tokens, ReadOnlyMemory<int> Targets) Next() => (tokens, targets);
        public string Position { get => "0"; set { } }
    }
}

public class MappedStateTests
{
    [Fact]
    public void CheckpointsLiveInAMappedFileThatIsRemovedAfterwards()
    {
        // tiny-llama.json says "activations": "mmap" and "optimizer_state": "mmap".
        var model = TrainerCatalog.Find("tiny-llama")!;
        Assert.True(model.Defaults is { ActivationsInFile: true, OptimizerStateInFile: true });
        using var fixture = new ModelFixture(model, seed: 37, sequence: 9);
        string folder;
        using (var trainer = fixture.CreateTrainer(new CpuBackend()))
        {
            folder = trainer.TemporaryFolder;
            Assert.True(Directory.Exists(folder));
            // Every checkpoint is file-backed, nothing else is.
            Assert.Equal(model.Plan(9).BytesOf(BufferRole.Checkpoint), trainer.FileBackedBytes);
            trainer.ForwardBackward(fixture.Tokens);
        }
        Assert.False(Directory.Exists(folder), "the trainer's temporary folder is removed when it is disposed");
    }
}
