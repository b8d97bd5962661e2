using System.Diagnostics;
using System.Numerics.Tensors;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Cli;

/// <summary>
/// <c>lora bench decode</c>: decoding speed against the bound the machine's memory bandwidth puts on it.
/// Each new token reads every weight once (the embedding only for its row, unless it is also the LM
/// head), so tokens/s can be no more than bandwidth / bytes of weights; the ratio is how close we are.
/// </summary>
public static class BenchDecode
{
    public const string Usage = """
          bench decode --weights PATH [--model NAME] [--prompt N] [--tokens N] [--backend cpu|vulkan] [--device D]
                                                      decode tokens/s against the memory-bandwidth bound
                                                      (measured bandwidth / weight bytes read per token)
        """;

    public static int Run(Args args)
    {
        var model = args.Optional("model") is null ? Models.TrainerCatalog.Find("qwen2.5-0.5b")! : Commands.Model(args);
        string weightsPath = args.Required("weights");
        int promptLength = args.Int("prompt", 16, min: 1), newTokens = args.Int("tokens", 32, min: 2);
        using var backend = BackendOptions.Create(args);
        args.RejectUnknown();
        if (promptLength < 1 || newTokens < 2)
            throw new UsageException("--prompt must be at least 1 and --tokens at least 2.");

        using var weights = ModelWeights.Open(weightsPath);
        long perToken = weights.Names.Sum(n => weights.Info(n).ByteLength);
        if (!model.TiedEmbeddings)
            perToken -= weights.Names.Where(n => n.StartsWith("model.embed_tokens.", StringComparison.Ordinal)).Sum(n => weights.Info(n).ByteLength);
        Console.Error.WriteLine("Measuring the memory bandwidth (reading 1 GiB, best of 5)...");
        double bandwidth = ReadBandwidth();

        int maxTokens = promptLength + newTokens;
        using var trainer = model.Create(backend, weights, LoraAdapter.CreateNew(model.Lora, model.LoraModules, seed: 1), maxTokens);
        trainer.CaptureGradients = false;
        using var generator = new TokenGenerator(trainer, maxTokens);
        var prompt = Enumerable.Range(0, promptLength).Select(i => (i * 7919 + 11) % model.Vocab).ToArray();
        Console.Error.WriteLine($"Decoding {newTokens} tokens of {model.Name} after a {promptLength}-token prompt on {backend.Name}...");
        generator.Step(prompt, 0);
        var seconds = new List<double>();
        int token = 1;
        for (int n = 0; n < newTokens; n++)
        {
            var watch = Stopwatch.StartNew();
            generator.Step([token], promptLength + n);
            seconds.Add(watch.Elapsed.TotalSeconds);
            token = (token * 31 + 7) % model.Vocab;
        }
        double median = seconds.Skip(1).Order().ElementAt((seconds.Count - 1) / 2); // the first step warms the code up
        double rate = 1 / median, bound = bandwidth / perToken;

        Console.WriteLine($"{model.Name}, weights {weightsPath} ({string.Join("+", weights.Names.Select(n => weights.Info(n).Dtype).Distinct().Order())}), " +
                          $"{backend.Name}, {Environment.ProcessorCount} cores");
        Console.WriteLine($"  memory bandwidth (read, all cores)      {bandwidth / 1e9,9:F2} GB/s");
        Console.WriteLine($"  weight bytes read per token             {perToken / 1e6,9:F1} MB");
        Console.WriteLine($"  bound: bandwidth / bytes per token      {bound,9:F1} tokens/s");
        Console.WriteLine($"  decoding, median of {newTokens - 1} steps             {rate,9:F2} tokens/s ({median * 1000:F0} ms/token)");
        Console.WriteLine($"  decoding / bound                        {rate / bound,9:F3}");
        return 0;
    }

    /// <summary>Bytes per second of summing a 1 GiB array on every core, the best of five passes.</summary>
    private static double ReadBandwidth()
    {
        const int Floats = 1 << 28;
        var data = new float[Floats];
        Array.Fill(data, 1f);
        int parts = Environment.ProcessorCount;
        double best = 0;
        for (int pass = 0; pass < 5; pass++)
        {
            var watch = Stopwatch.StartNew();
            Parallel.For(0, parts, new ParallelOptions { MaxDegreeOfParallelism = parts }, p =>
            {
                int chunk = Floats / parts;
                TensorPrimitives.Sum(data.AsSpan(p * chunk, chunk));
            });
            best = Math.Max(best, (double)Floats * sizeof(float) / watch.Elapsed.TotalSeconds);
        }
        return best;
    }
}
