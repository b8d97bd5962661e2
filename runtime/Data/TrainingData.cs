using System.Text.Json;

namespace LoraCompiler.Runtime.Data;

/// <summary>
/// One training example: its tokens and, for each position, the token it must predict or −1 where
/// that position is not in the loss (see <see cref="ExampleEncoder"/>). <see cref="Line"/> is the line
/// of the file it came from.
/// </summary>
public sealed record TrainingExample(int[] Tokens, int[] Targets, int Line)
{
    public int Length => Tokens.Length;

    /// <summary>How many positions are in the loss.</summary>
    public int LossTokens => Targets.Count(t => t >= 0);
}

/// <summary>How a JSONL file is turned into examples.</summary>
public sealed record TrainingDataOptions
{
    /// <summary>
    /// Whether special tokens written in the data (<c>&lt;|im_end|&gt;</c> inside a text, say) become those
    /// tokens, as Hugging Face's tokenizers do by default, or are tokenized as plain text.
    /// </summary>
    public bool ParseSpecialTokens { get; init; } = true;

    /// <summary>The format for <c>messages</c> lines; null takes it from the tokenizer's special tokens.</summary>
    public ChatFormat? ChatFormat { get; init; }
}

/// <summary>
/// A JSONL training file read and tokenized. Each non-blank line is one JSON object of one of three shapes:
/// <list type="bullet">
/// <item><c>{"text": "..."}</c>: the whole text is learned, and EOS after it;</item>
/// <item><c>{"prompt": "...", "completion": "..."}</c>: only the completion (and EOS) is learned;</item>
/// <item><c>{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}</c>: a
/// conversation in the tokenizer's chat format (Qwen's ChatML, Llama 3's headers, Gemma's turns),
/// only the assistant turns learned.</item>
/// </list>
/// Other members of a line (an "id", say) are ignored. A line that is not JSON, has none or more than
/// one of these shapes, a member of the wrong type, an unknown role or a conversation the chat format
/// refuses (Gemma's: roles that do not alternate) throws a
/// <see cref="TrainingDataException"/> that names the file and the line.
/// </summary>
public sealed class TrainingData
{
    private TrainingData(string source, IReadOnlyList<TrainingExample> examples)
    {
        Source = source;
        Examples = examples;
    }

    /// <summary>The file the examples came from.</summary>
    public string Source { get; }

    /// <summary>The examples in the file's order.</summary>
    public IReadOnlyList<TrainingExample> Examples { get; }

    /// <summary>The number of tokens of all examples.</summary>
    public long TokenCount => Examples.Sum(e => (long)e.Length);

    /// <summary>The number of positions in the loss over all examples.</summary>
    public long LossTokenCount => Examples.Sum(e => (long)e.LossTokens);

    /// <summary>
    /// Reads and tokenizes a JSONL file. The file must be UTF-8: a byte sequence that is not throws a
    /// <see cref="TrainingDataException"/> with its line (it is never read as U+FFFD).
    /// </summary>
    public static TrainingData Load(string path, BpeTokenizer tokenizer, TrainingDataOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (!File.Exists(path))
            throw new TrainingDataException(path, null, "the file does not exist.");
        return Read(StrictUtf8.ReadLines(path), path, tokenizer, options);
    }

    /// <summary>
    /// A plain text file (.txt, .md, source code) as one token stream, tokenized as a <c>{"text"}</c>
    /// line is: [BOS] text EOS, BOS where the tokenizer adds one, EOS where it has one. The file must be
    /// UTF-8: a byte sequence that is not throws a <see cref="TrainingDataException"/> with its line.
    /// </summary>
    public static int[] LoadText(string path, BpeTokenizer tokenizer, TrainingDataOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        ArgumentNullException.ThrowIfNull(tokenizer);
        if (!File.Exists(path))
            throw new TrainingDataException(path, null, "the file does not exist.");
        options ??= new TrainingDataOptions();
        string text = StrictUtf8.ReadAllText(path);
        var ids = new List<int>(text.Length / 3 + 2);
        if (tokenizer.AddBosToken && tokenizer.BosId is int bos)
            ids.Add(bos);
        tokenizer.Encode(text, options.ParseSpecialTokens, ids);
        if (tokenizer.EosId is int eos)
            ids.Add(eos);
        return ids.ToArray();
    }

    /// <summary>Reads and tokenizes JSONL from a reader; <paramref name="source"/> names it in messages.</summary>
    public static TrainingData Read(TextReader reader, string source, BpeTokenizer tokenizer, TrainingDataOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(reader);
        return Read(Lines(reader), source, tokenizer, options);

        static IEnumerable<(int, string)> Lines(TextReader reader)
        {
            int number = 0;
            while (reader.ReadLine() is { } line)
                yield return (++number, line);
        }
    }

    private static TrainingData Read(IEnumerable<(int Number, string Text)> allLines, string source, BpeTokenizer tokenizer, TrainingDataOptions? options)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        options ??= new TrainingDataOptions();
        var encoder = new ExampleEncoder(tokenizer, options.ParseSpecialTokens, options.ChatFormat);

        var lines = new List<(int Number, string Text)>();
        foreach (var (number, line) in allLines)
            if (!string.IsNullOrWhiteSpace(line))
                lines.Add((number, line));
        if (lines.Count == 0)
            throw new TrainingDataException(source, null, "the file has no examples (no non-blank line).");

        // Lines are independent and the tokenizer is thread-safe: tokenize them in parallel, then
        // report the first failing line in file order (a tokenizer that fails, a regex past its time
        // limit, say, fails on the first line it fails on).
        var examples = new TrainingExample?[lines.Count];
        var errors = new Exception?[lines.Count];
        Parallel.For(0, lines.Count, i =>
        {
            var (line, text) = lines[i];
            try
            {
                var (tokens, targets) = EncodeLine(text, encoder, source, line);
                examples[i] = new TrainingExample(tokens, targets, line);
            }
            catch (Exception e) when (e is TrainingDataException or TokenizerException)
            {
                errors[i] = e;
            }
        });
        if (errors.FirstOrDefault(e => e is not null) is { } first)
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(first);
        return new TrainingData(source, examples.Select(e => e!).ToArray());
    }

    /// <summary>
    /// How much of the examples sequences of <paramref name="maxLength"/> tokens hold, packed or cut as
    /// <paramref name="mode"/> does it: which examples are cut, which are dropped, how many tokens in
    /// the loss are never learned.
    /// </summary>
    public DataCoverage Coverage(int maxLength, PackingMode mode = PackingMode.Pack) => DataCoverage.Of(Examples, maxLength, mode);

    private static (int[] Tokens, int[] Targets) EncodeLine(string text, ExampleEncoder encoder, string source, int line)
    {
        TrainingDataException Error(string problem, Exception? inner = null) => new(source, line, problem, inner);

        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(text);
        }
        catch (JsonException e)
        {
            throw Error($"not valid JSON at column {e.BytePositionInLine + 1}: {e.Message}", e);
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw Error($"the line is a JSON {root.ValueKind.ToString().ToLowerInvariant()}, not an object with \"text\", \"prompt\" and \"completion\", or \"messages\".");

            bool hasText = root.TryGetProperty("text", out var textElement);
            bool hasPrompt = root.TryGetProperty("prompt", out var promptElement);
            bool hasCompletion = root.TryGetProperty("completion", out var completionElement);
            bool hasMessages = root.TryGetProperty("messages", out var messagesElement);
            int shapes = (hasText ? 1 : 0) + (hasPrompt || hasCompletion ? 1 : 0) + (hasMessages ? 1 : 0);
            if (shapes == 0)
                throw Error("the object has none of \"text\", \"prompt\" and \"completion\", or \"messages\".");
            if (shapes > 1)
                throw Error("the object mixes shapes: a line has \"text\", or \"prompt\" and \"completion\", or \"messages\", only one of them.");

            try
            {
                if (hasText)
                    return encoder.Text(String(textElement, "text"));
                if (hasPrompt || hasCompletion)
                {
                    if (!hasPrompt || !hasCompletion)
                        throw Error(hasPrompt ? "the object has \"prompt\" but no \"completion\"." : "the object has \"completion\" but no \"prompt\".");
                    return encoder.PromptCompletion(String(promptElement, "prompt"), String(completionElement, "completion"));
                }
                return encoder.Messages(Messages(messagesElement));
            }
            catch (Exception e) when (e is InvalidOperationException or ArgumentException)
            {
                // The encoder's refusals: a tokenizer without the tokens a shape needs, a conversation its chat format refuses.
                throw Error(e.Message, e);
            }
        }

        string String(JsonElement element, string where)
        {
            if (element.ValueKind != JsonValueKind.String)
                throw Error($"\"{where}\" is a JSON {element.ValueKind.ToString().ToLowerInvariant()}, not a string.");
            try
            {
                return element.GetString()!;
            }
            catch (InvalidOperationException e)
            {
                // A \uD800-style escape of half a surrogate pair: no character, so no UTF-8 to train on.
                throw Error($"\"{where}\" holds a \\u escape of an unpaired surrogate ({e.Message}).", e);
            }
        }

        List<ChatMessage> Messages(JsonElement element)
        {
            if (element.ValueKind != JsonValueKind.Array)
                throw Error($"\"messages\" is a JSON {element.ValueKind.ToString().ToLowerInvariant()}, not an array.");
            if (element.GetArrayLength() == 0)
                throw Error("\"messages\" is empty.");
            var messages = new List<ChatMessage>();
            int i = 0;
            foreach (var message in element.EnumerateArray())
            {
                string where = $"messages[{i++}]";
                if (message.ValueKind != JsonValueKind.Object)
                    throw Error($"{where} is not an object with \"role\" and \"content\".");
                if (!message.TryGetProperty("role", out var role))
                    throw Error($"{where} has no \"role\".");
                if (!message.TryGetProperty("content", out var content))
                    throw Error($"{where} has no \"content\".");
                string roleName = String(role, $"{where}.role");
                if (!ChatMessage.Roles.Contains(roleName))
                    throw Error($"unknown role '{roleName}' in {where}; expected system, user or assistant.");
                messages.Add(new ChatMessage(roleName, String(content, $"{where}.content")));
            }
            return messages;
        }
    }
}
