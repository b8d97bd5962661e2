using LoraCompiler.Models;
using LoraCompiler.Runtime.Data;
using LoraCompiler.Runtime.Training;

namespace LoraCompiler.Cli;

/// <summary>How a text file (neither <c>.jsonl</c> nor <c>.json</c>) becomes tokens: <c>--data-format</c>.</summary>
internal enum TextFormat
{
    /// <summary>Tokenized where there is a tokenizer.json; otherwise UTF-8 bytes for a model whose vocabulary holds the 256 bytes.</summary>
    Auto,

    /// <summary>Always tokenized with the tokenizer.json (an error without one).</summary>
    Text,

    /// <summary>Its UTF-8 bytes as token ids, even where there is a tokenizer.json.</summary>
    Bytes,
}

/// <summary>
/// Where <c>train</c> and <c>eval</c> find the tokenizer and how they read text files: the
/// <c>--tokenizer</c> option or the tokenizer.json beside the weights, and <c>--data-format</c>.
/// </summary>
internal sealed record DataReading(string TokenizerPath, bool TokenizerGiven, TextFormat Format)
{
    public const string FormatHelp =
        "how a text file (not .jsonl or .json) is read: auto tokenizes it with the tokenizer.json " +
        "(--tokenizer, or the one beside the weights) and, where there is none, takes its UTF-8 bytes as " +
        "token ids for a model whose vocabulary holds the 256 bytes; text always tokenizes; bytes always " +
        "takes the bytes [auto]";

    /// <summary>The options as given: <c>--tokenizer</c> (or null), the weights PATH, <c>--data-format</c> (or null).</summary>
    public static DataReading From(string? tokenizerOption, string weightsPath, string? formatOption)
    {
        var format = formatOption switch
        {
            null or "auto" => TextFormat.Auto,
            "text" => TextFormat.Text,
            "bytes" => TextFormat.Bytes,
            _ => throw new UsageException($"--data-format is '{formatOption}'; expected auto, text or bytes."),
        };
        if (tokenizerOption is not null && !File.Exists(tokenizerOption))
            throw new UsageException($"--tokenizer {tokenizerOption}: the file does not exist.");
        return new DataReading(tokenizerOption ?? Commands.TokenizerBeside(weightsPath), tokenizerOption is not null, format);
    }

    /// <summary>
    /// Refuses a <c>--data-format</c> other than auto when none of the data files is a text file it
    /// would apply to, rather than ignoring it.
    /// </summary>
    public void CheckFormatApplies(params string?[] dataPaths)
    {
        if (Format != TextFormat.Auto && !dataPaths.Any(p => p is not null && DataFiles.IsTextFile(p)))
            throw new UsageException($"--data-format {Format.ToString().ToLowerInvariant()} is for text files; " +
                                     $"{string.Join(" and ", dataPaths.Where(p => p is not null))} {(dataPaths.Count(p => p is not null) > 1 ? "are" : "is")} .jsonl or .json.");
    }

    public bool HasTokenizer => File.Exists(TokenizerPath);
}

/// <summary>
/// The data files <c>train</c> (<c>--data</c>, <c>--val-data</c>) and <c>eval</c> read: a <c>.jsonl</c>
/// file of examples through the model's tokenizer, packed into sequences; a <c>.json</c> array of token
/// ids; any other file as text (see <see cref="TextFormat"/>), cut into windows. What is lost on the
/// way (examples cut or dropped at the sequence length, tokens after the last window) is said on
/// standard error at the start; data with nothing to learn is a <see cref="TrainingDataException"/>.
/// </summary>
internal static class DataFiles
{
    public static bool IsJsonl(string path) => path.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase);

    public static bool IsTokenIds(string path) => path.EndsWith(".json", StringComparison.OrdinalIgnoreCase);

    public static bool IsTextFile(string path) => !IsJsonl(path) && !IsTokenIds(path);

    /// <summary>The stream a training run reads.</summary>
    public static ITrainingData Training(string dataPath, DataReading reading, ModelInfo model, int seq, int seed)
    {
        if (!IsJsonl(dataPath))
        {
            var (tokens, how) = Tokens(dataPath, reading, model);
            if (tokens.Length < seq + 1)
                throw new TrainingDataException(dataPath, null,
                    $"nothing to learn at --seq {seq}: the file has {tokens.Length:N0} token{(tokens.Length == 1 ? "" : "s")} ({how}), fewer than one window of {seq} and the token after it.");
            // Windows start every seq tokens while one more token follows; the rest of the file is in none.
            long windows = tokens.Length > seq ? (tokens.Length - 1L) / seq : 0;
            long unused = tokens.Length - 1 - windows * seq;
            string rest = windows > 0 && unused > 0 ? $"; the last {unused:N0} {(unused == 1 ? "is" : "are")} in no window of {seq}" : "";
            return new TokenWindows(tokens, seq, $"{dataPath} {how} ({tokens.Length:N0} tokens{rest})");
        }
        var data = Jsonl(dataPath, reading, model);
        var packed = new PackedTrainingData(data, new SequencePacker(data.Examples, seq, PackingMode.Pack, seed));
        Warn(dataPath, packed.Coverage, seq);
        return packed;
    }

    /// <summary>Held-out data for <c>eval</c> and <c>train --val-data</c>, cut or packed as training does it, in the file's order.</summary>
    public static EvaluationData Evaluation(string dataPath, DataReading reading, ModelInfo model, int seq)
    {
        if (!IsJsonl(dataPath))
        {
            var (tokens, how) = Tokens(dataPath, reading, model);
            return EvaluationData.Windows(tokens, seq, $"{dataPath} {how}");
        }
        var evaluation = EvaluationData.Packed(Jsonl(dataPath, reading, model), seq);
        Warn(dataPath, evaluation.Coverage!, seq);
        return evaluation;
    }

    /// <summary>
    /// The tokens of a token-id or text file and how they were read ("tokenized by …/tokenizer.json",
    /// "as UTF-8 bytes", "as token ids").
    /// </summary>
    public static (int[] Tokens, string Description) Tokens(string path, DataReading reading, ModelInfo model)
    {
        if (IsTokenIds(path))
        {
            int[] ids = Commands.ReadTokens(path);
            return (ids, "as token ids");
        }
        bool bytes = reading.Format switch
        {
            TextFormat.Bytes => true,
            TextFormat.Text => false,
            _ => !reading.HasTokenizer,
        };
        if (!bytes)
        {
            var tokenizer = Tokenizer(path, reading, model);
            int[] ids = TrainingData.LoadText(path, tokenizer);
            return (ids, $"tokenized by {reading.TokenizerPath}");
        }
        if (model.Vocab < 256)
            throw new UsageException($"{path}: {model.Name} has a vocabulary of {model.Vocab}, too small for UTF-8 bytes as tokens; " +
                                     $"give the model's tokenizer.json (--tokenizer FILE) or a .json array of token ids.");
        if (reading.Format == TextFormat.Auto && model.Vocab > ByteVocabularyLimit)
            throw new UsageException($"{path} is text and there is no tokenizer.json at {reading.TokenizerPath} to tokenize it; " +
                                     $"{model.Name}'s vocabulary of {model.Vocab:N0} is not one of bytes. Pass --tokenizer FILE, or --data-format bytes to train on the UTF-8 bytes as token ids anyway.");
        byte[] content = File.ReadAllBytes(path);
        return (content.Select(b => (int)b).ToArray(), "as UTF-8 bytes");
    }

    /// <summary>
    /// The largest vocabulary taken for one of bytes when there is no tokenizer: the tiny models have
    /// 256 byte tokens and a few more (288 to 320); a real model's vocabulary (32,000 and up) read as
    /// bytes would train on the wrong tokens.
    /// </summary>
    public const int ByteVocabularyLimit = 1024;

    private static TrainingData Jsonl(string dataPath, DataReading reading, ModelInfo model)
    {
        var tokenizer = Tokenizer(dataPath, reading, model);
        return TrainingData.Load(dataPath, tokenizer);
    }

    private static BpeTokenizer Tokenizer(string dataPath, DataReading reading, ModelInfo model)
    {
        if (!reading.HasTokenizer)
            throw new UsageException($"{dataPath} is {(IsJsonl(dataPath) ? "JSONL" : "text")} and needs the model's tokenizer.json, which is not at {reading.TokenizerPath}; pass --tokenizer FILE" +
                                     (IsJsonl(dataPath) ? "." : ", or --data-format bytes for its UTF-8 bytes as token ids."));
        return LoadTokenizer(reading.TokenizerPath, model);
    }

    /// <summary>A tokenizer.json for <paramref name="model"/>: one whose ids all fit the model's vocabulary.</summary>
    internal static BpeTokenizer LoadTokenizer(string path, ModelInfo model)
    {
        var tokenizer = BpeTokenizer.Load(path);
        if (tokenizer.VocabSize > model.Vocab)
            throw new UsageException($"{path} has {tokenizer.VocabSize} tokens, more than the {model.Vocab} of {model.Name}.");
        return tokenizer;
    }

    /// <summary>Says on standard error what sequences of <paramref name="seq"/> tokens lose of the examples.</summary>
    private static void Warn(string path, DataCoverage coverage, int seq)
    {
        if (coverage.Describe() is { } lost)
            Console.Error.WriteLine($"warning: {path}: at --seq {seq}, {lost}.");
    }
}
