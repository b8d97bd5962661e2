using LoraCompiler.Models;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Training;

/// <summary>
/// LCSB: at step t only the layers with layer % K == t % K backpropagate; a skipped layer is
/// out = h + stopgrad(f(h)), so its backward is the identity and runs nothing.
/// </summary>
public class LcsbTests
{
    [Theory]
    [InlineData("tiny-llama", 2, 0)] // layers 0 and 2 backpropagate, layer 1 is skipped
    [InlineData("tiny-llama", 2, 1)] // layer 1 backpropagates, layers 0 and 2 are skipped
    [InlineData("tiny-llama", 3, 5)] // step 5 with 3 groups: layer 2 alone
    [InlineData("tiny-qwen2", 2, 1)]
    [InlineData("tiny-qwen3", 3, 1)]
    [InlineData("tiny-gemma3", 2, 0)] // the full layer 2 and the sliding layers 0 and 4 backpropagate
    [InlineData("tiny-gemma3", 2, 1)]
    public void SelectiveGradientsMatchAutogradWithStopGradient(string modelName, int groups, int step)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 13, sequence: 21);
        var skipped = Enumerable.Range(0, model.Layers).Where(l => l % groups != step % groups).ToHashSet();
        var (referenceLoss, referenceGradients) = fixture.Reference(stopGradientLayers: skipped);

        using var trainer = fixture.CreateTrainer(new CpuBackend());
        trainer.LcsbGroups = groups;
        float loss = trainer.ForwardBackward(fixture.Tokens, TrainerBase.NextTokenTargets(fixture.Tokens), step);

        Assert.InRange(Math.Abs(loss - referenceLoss), 0, 1e-5 * referenceLoss);
        foreach (var (spec, da, db) in trainer.DownloadGradients())
        {
            int layer = LayerOf(spec);
            foreach (var (name, gradient) in new[] { (spec.AName, da), (spec.BName, db) })
            {
                if (skipped.Contains(layer))
                    Assert.All(gradient, g => Assert.Equal(0f, g));
                else
                    Assert.True(ModelFixture.RelativeError(gradient, referenceGradients[name]) < 1e-4, name);
            }
        }
    }

    [Fact]
    public void OneGroupIsExactlyFullBackprop()
    {
        var model = TrainerCatalog.Find("tiny-llama")!;
        using var fixture = new ModelFixture(model, seed: 17, sequence: 15);
        var targets = TrainerBase.NextTokenTargets(fixture.Tokens);

        using var full = fixture.CreateTrainer(new CpuBackend());
        full.ForwardBackward(fixture.Tokens, targets, step: 0);
        using var lcsb = fixture.CreateTrainer(new CpuBackend());
        lcsb.LcsbGroups = 1;
        lcsb.ForwardBackward(fixture.Tokens, targets, step: 7);

        foreach (var (a, b) in full.DownloadGradients().Zip(lcsb.DownloadGradients()))
        {
            Assert.Equal(a.DA, b.DA);
            Assert.Equal(a.DB, b.DB);
        }
    }

    [Fact]
    public void SkippedLayerRunsNoKernelAndLoadsNoWeight()
    {
        var model = TrainerCatalog.Find("tiny-llama")!;
        using var fixture = new ModelFixture(model, seed: 19, sequence: 12);
        var backend = new CountingBackend(new CpuBackend());
        using var trainer = fixture.CreateTrainer(backend);
        trainer.LcsbGroups = 3;

        var targets = TrainerBase.NextTokenTargets(fixture.Tokens);

        // What a forward pass alone costs.
        long kernelsBefore = backend.Kernels, readsBefore = trainer.WeightReads;
        trainer.Loss(fixture.Tokens, targets);
        long forwardKernels = backend.Kernels - kernelsBefore, forwardReads = trainer.WeightReads - readsBefore;

        // Kernels and weight reads between one layer's "gradients ready" and the previous one: that
        // layer's backward (for the last layer: the forward, the loss's backward and its own).
        var kernels = new Dictionary<int, long>();
        var reads = new Dictionary<int, long>();
        long lastKernels = backend.Kernels, lastReads = trainer.WeightReads;
        trainer.LayerGradientsReady += ready =>
        {
            kernels[ready.Layer] = backend.Kernels - lastKernels;
            reads[ready.Layer] = trainer.WeightReads - lastReads;
            (lastKernels, lastReads) = (backend.Kernels, trainer.WeightReads);
        };
        // Step 1 with 3 groups: only layer 1 backpropagates; layers 2 and 0 are skipped.
        trainer.ForwardBackward(fixture.Tokens, targets, step: 1);

        const int lossBackwardKernels = 1; // the final norm's backward
        Assert.Equal(forwardKernels + lossBackwardKernels, kernels[2]);
        Assert.Equal(forwardReads, reads[2]);
        Assert.True(kernels[1] > 0 && reads[1] > 0, "the selected layer recomputes and backpropagates");
        Assert.Equal(0, kernels[0]);
        Assert.Equal(0, reads[0]);
    }


    private static int LayerOf(LoraModuleSpec spec) => int.Parse(spec.Module.Split('.')[2]);
}
