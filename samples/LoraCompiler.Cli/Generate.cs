using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using LoraCompiler.Runtime.Data;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Cli;

/// <summary>
/// <c>lora generate</c>: a continuation of a prompt, or a chat model's reply, decoded with a KV cache
/// and streamed to stdout as it is produced. The adapter is applied unmerged, as in training.
/// </summary>
public static class Generate
{
    public const string Usage = """
          generate --model NAME --weights PATH [--adapter DIR] (--prompt TEXT | --messages FILE | --tokens FILE)
                   [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--out FILE]
                   [--tokenizer FILE] [--backend cpu|vulkan] [--device D]
                                                      decode a continuation (a chat model's reply) with a KV
                                                      cache, streaming the text; --temperature 0 is greedy
        """;

    public static int Run(Args args)
    {
        var model = Commands.Model(args);
        string weightsPath = args.Required("weights");
        string? adapterDir = args.Optional("adapter");
        string? promptText = args.Optional("prompt"), messagesPath = args.Optional("messages"), tokensPath = args.Optional("tokens");
        int maxNew = args.Int("max-new-tokens", 128, min: 1);
        var sampling = new SamplingOptions(args.Float("temperature", 0f, min: 0), args.Int("top-k", 0, min: 0),
            args.Float("top-p", 1f, min: 0, max: 1, exclusiveMin: true), args.Int("seed", 0));
        string? outPath = args.Optional("out");
        string tokenizerPath = args.Optional("tokenizer") ?? Commands.TokenizerBeside(weightsPath);
        using var backend = BackendOptions.Create(args);
        args.RejectUnknown();

        if (new[] { promptText, messagesPath, tokensPath }.Count(p => p is not null) != 1)
            throw new UsageException("Give exactly one of --prompt TEXT, --messages FILE and --tokens FILE.");
        if (maxNew < 1)
            throw new UsageException($"--max-new-tokens must be at least 1, not {maxNew}.");
        try
        {
            sampling.Validate();
        }
        catch (ArgumentException e)
        {
            throw new UsageException(e.Message);
        }

        // The tokenizer renders prompts and prints the text. Without one, a model whose vocabulary holds
        // the 256 byte values (the tiny models, trained on a text's bytes) reads and writes UTF-8 bytes;
        // with --tokens and neither, the ids are printed.
        bool haveTokenizer = File.Exists(tokenizerPath) || args.Optional("tokenizer") is not null;
        bool bytes = !haveTokenizer && model.Vocab is >= 256 and <= DataFiles.ByteVocabularyLimit && messagesPath is null;
        BpeTokenizer? tokenizer = haveTokenizer || (tokensPath is null && !bytes) ? LoadTokenizer(tokenizerPath, model) : null;
        var encoder = tokenizer is null ? null : new ExampleEncoder(tokenizer);
        int[] prompt;
        var stops = new HashSet<int>(model.EosTokenIds);
        if (tokensPath is not null)
            prompt = Commands.ReadTokens(tokensPath);
        else if (bytes)
            prompt = Encoding.UTF8.GetBytes(promptText!).Select(b => (int)b).ToArray();
        else if (messagesPath is not null)
        {
            if (encoder!.ChatFormat is null)
                throw new UsageException($"{tokenizerPath} has no chat format (ChatML, Llama 3 or Gemma), so --messages cannot be rendered; use --prompt.");
            prompt = encoder.ChatPrompt(ReadMessages(messagesPath));
        }
        else
            prompt = encoder!.ChatFormat is null ? encoder.TextPrompt(promptText!) : encoder.ChatPrompt([new ChatMessage("user", promptText!)]);
        if (tokenizer?.EosId is int eos)
            stops.Add(eos);
        if (encoder?.ChatFormat is not null && tokensPath is null)
            stops.UnionWith(encoder.TurnEnd());

        using var weights = ModelWeights.Open(weightsPath);
        var adapter = adapterDir is null
            ? LoraAdapter.CreateNew(model.Lora, model.LoraModules, seed: 0) // B = 0: exactly the base model
            : Export.LoadWhole(adapterDir, model);
        int maxTokens = prompt.Length + maxNew;
        using var trainer = model.Create(backend, weights, adapter, maxTokens);
        trainer.CaptureGradients = false;
        using var generator = new TokenGenerator(trainer, maxTokens);

        Console.Error.WriteLine($"{model.Name} on {backend.Name}: {prompt.Length} prompt tokens, up to {maxNew} new " +
                                $"({(sampling.Temperature == 0 ? "greedy" : $"temperature {sampling.Temperature}, top-k {sampling.TopK}, top-p {sampling.TopP}, seed {sampling.Seed}")}); " +
                                $"KV cache {generator.CacheBytes / 1048576.0:F1} MiB");
        var generated = new List<int>();
        var stream = new TextStream(tokenizer is not null ? ids => tokenizer.Decode(CollectionsMarshal.AsSpan(ids), skipSpecialTokens: true)
            : bytes ? ids => Encoding.UTF8.GetString(ids.Select(i => i < 256 ? (byte)i : (byte)'?').ToArray())
            : null);
        var watch = Stopwatch.StartNew();
        TimeSpan? prefill = null;
        foreach (int token in generator.Generate(prompt, maxNew, sampling, stops))
        {
            prefill ??= watch.Elapsed;
            generated.Add(token);
            Console.Out.Write(stream.Next(generated));
            Console.Out.Flush();
        }
        Console.Out.WriteLine(stream.Rest(generated));
        var total = watch.Elapsed;
        double decodeSeconds = (total - (prefill ?? total)).TotalSeconds;
        Console.Error.WriteLine($"{generated.Count} tokens in {total.TotalSeconds:F2} s: prompt {(prefill ?? total).TotalSeconds:F2} s " +
                                $"({prompt.Length / Math.Max((prefill ?? total).TotalSeconds, 1e-9):F1} tokens/s), " +
                                (generated.Count > 1 ? $"decoding {(generated.Count - 1) / Math.Max(decodeSeconds, 1e-9):F1} tokens/s" : "no decoding step"));
        if (outPath is not null)
        {
            AtomicFile.WriteAllText(outPath, JsonSerializer.Serialize(generated) + "\n");
            Console.Error.WriteLine($"Wrote the {generated.Count} generated ids to {outPath}.");
        }
        return 0;
    }

    private static BpeTokenizer LoadTokenizer(string path, ModelInfo model)
    {
        if (!File.Exists(path))
            throw new UsageException($"The prompt needs the model's tokenizer.json, which is not at {path}; pass --tokenizer FILE.");
        return DataFiles.LoadTokenizer(path, model);
    }

    /// <summary>A JSON array of {"role", "content"} messages, or an object holding one under "messages" (a line of chat JSONL).</summary>
    private static List<ChatMessage> ReadMessages(string path)
    {
        try
        {
            using var document = JsonDocument.Parse(File.ReadAllText(path));
            var root = document.RootElement;
            var array = root.ValueKind == JsonValueKind.Object && root.TryGetProperty("messages", out var inner) ? inner : root;
            if (array.ValueKind != JsonValueKind.Array || array.GetArrayLength() == 0)
                throw new UsageException($"{path}: expected a non-empty JSON array of messages, or an object with one under \"messages\".");
            return array.EnumerateArray().Select((m, i) =>
                m.ValueKind == JsonValueKind.Object
                && m.TryGetProperty("role", out var role) && role.ValueKind == JsonValueKind.String
                && m.TryGetProperty("content", out var content) && content.ValueKind == JsonValueKind.String
                    ? new ChatMessage(role.GetString()!, content.GetString()!)
                    : throw new UsageException($"{path}: message {i} needs a string \"role\" and a string \"content\".")).ToList();
        }
        catch (JsonException e)
        {
            throw new UsageException($"{path}: not JSON ({e.Message}).");
        }
    }

    /// <summary>
    /// The text of the generated ids as it grows: each call returns what is new, holding back a
    /// trailing replacement character (a UTF-8 sequence that the next token completes). Without a
    /// way to decode, the ids themselves.
    /// </summary>
    private sealed class TextStream(Func<List<int>, string>? decode)
    {
        private int _printed;

        public string Next(List<int> ids)
        {
            if (decode is null)
                return (ids.Count > 1 ? " " : "") + ids[^1];
            string text = decode(ids);
            int end = text.Length;
            while (end > _printed && text[end - 1] == '\uFFFD')
                end--;
            if (end <= _printed)
                return "";
            string fresh = text[_printed..end];
            _printed = end;
            return fresh;
        }

        public string Rest(List<int> ids)
        {
            if (decode is null || ids.Count == 0)
                return "";
            string text = decode(ids);
            return text.Length > _printed ? text[_printed..] : "";
        }
    }
}
