using System.Diagnostics;
using System.Globalization;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Cli;

/// <summary>
/// <c>lora eval</c>: the loss and perplexity of a model, with or without an adapter, over held-out
/// data in the formats <c>train</c> reads, forward only (no backward, no optimizer state).
/// </summary>
public static class Eval
{
    public const string Usage = $$"""
        lora eval --model NAME --weights PATH [--adapter DIR] --data FILE [--seq N] [--json] [--tokenizer FILE]
                  [--data-format auto|text|bytes] [--backend cpu|vulkan] [--device D]

        The token-weighted mean loss over the data (the cross-entropy of every row in the loss, summed over
        all sequences and divided by the number of those rows) and its perplexity, exp(loss); forward only.

          --adapter DIR     the PEFT adapter to score; without it the base model (a new adapter has B = 0)
          --data FILE       .jsonl ({"text"}, {"prompt","completion"} or {"messages"} lines: the rows train
                            learns), a .json array of token ids, or a text file (any other name): tokenized
                            with the tokenizer.json, or without one its UTF-8 bytes as tokens for a byte
                            vocabulary (the tiny models); examples cut or dropped at --seq are reported
          --seq N           tokens per sequence [256]: a token file's windows, a JSONL file's packing
          --json            end with one line {"loss": …, "perplexity": …, "tokens": …}
          --tokenizer FILE  the tokenizer.json for JSONL and text data [the one beside the weights]
          --data-format F   auto|text|bytes: a text file tokenized where there is a tokenizer.json (auto),
                            always tokenized (text), or its UTF-8 bytes as token ids (bytes) [auto]
          {{BackendOptions.Help}}
        """;

    public static int Run(Args args)
    {
        if (args.Flag("help"))
        {
            Console.WriteLine(Usage);
            return 0;
        }
        var model = Commands.Model(args);
        string weightsPath = args.Required("weights");
        string dataPath = args.Required("data");
        string? adapterDir = args.Optional("adapter");
        string? tokenizerPath = args.Optional("tokenizer");
        string? dataFormat = args.Optional("data-format");
        int seq = Commands.Seq(args, model, 256);
        bool json = args.Flag("json");
        using var backend = BackendOptions.Create(args);
        args.RejectUnknown();

        var reading = DataReading.From(tokenizerPath, weightsPath, dataFormat);
        reading.CheckFormatApplies(dataPath);
        var data = Commands.EvaluationSet(dataPath, reading, model, seq);
        using var weights = ModelWeights.Open(weightsPath);
        var adapter = adapterDir is null
            ? LoraAdapter.CreateNew(model.Lora, model.LoraModules, seed: 0) // B = 0: exactly the base model
            : Export.LoadWhole(adapterDir, model);
        using var trainer = model.Create(backend, weights, adapter, seq);
        trainer.CaptureGradients = false; // only Loss is called: nothing is kept for a backward

        Console.WriteLine($"Scoring {model.Name} {(adapterDir is null ? "(the base model, no adapter)" : $"with the adapter {adapterDir}")} " +
                          $"on {backend.Name}: {data.Description}.");
        var watch = Stopwatch.StartNew();
        var progress = new ProgressLine();
        EvaluationResult result;
        try
        {
            result = data.Evaluate(trainer, progress: r => progress.Report(() =>
                $"  {r.Sequences:N0}/{data.Count:N0} sequences, {r.Tokens:N0} tokens, loss so far {r.Loss:F4}, " +
                $"{r.Tokens / watch.Elapsed.TotalSeconds:F0} tok/s"));
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException($"{dataPath}: {e.Message}", e); // a token outside the vocabulary
        }
        finally
        {
            progress.Clear();
        }
        if (result.Tokens == 0)
            throw new UsageException($"{dataPath} has no row in the loss.");

        double seconds = watch.Elapsed.TotalSeconds;
        Console.WriteLine($"loss {result.Loss:F6}  perplexity {result.Perplexity:F4}  over {result.Tokens:N0} tokens in " +
                          $"{result.Sequences:N0} sequences ({seconds:F2} s, {result.Tokens / seconds:F0} tok/s)");
        if (json)
            Console.WriteLine($"{{\"loss\": {Number(result.Loss)}, \"perplexity\": {Number(result.Perplexity)}, \"tokens\": {result.Tokens}}}");
        return 0;
    }

    /// <summary>A JSON number that reads back to the same double; null for NaN or infinity (a diverged model).</summary>
    private static string Number(double value) =>
        double.IsFinite(value) ? value.ToString("R", CultureInfo.InvariantCulture) : "null";
}

/// <summary>
/// A progress line for long work: on a terminal rewritten in place (a carriage return) a few times a
/// second; when the output is redirected, a whole line every ten seconds. Nothing for work that
/// takes under a second.
/// </summary>
internal sealed class ProgressLine
{
    private readonly bool _inPlace = !Console.IsOutputRedirected;
    private readonly Stopwatch _watch = Stopwatch.StartNew();
    private double _last;
    private int _width;

    public void Report(Func<string> text)
    {
        double now = _watch.Elapsed.TotalSeconds;
        if (now < 1 || now - _last < (_inPlace ? 0.25 : 10))
            return;
        _last = now;
        string line = text();
        if (_inPlace)
        {
            Console.Write("\r" + line.PadRight(_width));
            _width = line.Length;
        }
        else
        {
            Console.WriteLine(line);
        }
    }

    /// <summary>Removes an in-place line, so that what follows starts on a clean line.</summary>
    public void Clear()
    {
        if (_inPlace && _width > 0)
            Console.Write("\r" + new string(' ', _width) + "\r");
        _width = 0;
    }
}
