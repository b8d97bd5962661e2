using System.Buffers;
using System.Text;
using System.Text.Json;

namespace LoraCompiler.Runtime.Data;

public sealed partial class BpeTokenizer
{
    /// <summary>The file beside tokenizer.json that names the BOS and EOS tokens and holds the chat template.</summary>
    public const string ConfigFileName = "tokenizer_config.json";

    /// <summary>
    /// Reads a Hugging Face tokenizer.json, and tokenizer_config.json from the same folder where there
    /// is one. A file that is not valid JSON, or describes anything but a byte-level BPE tokenizer or a
    /// SentencePiece-style BPE one with byte fallback (a WordPiece or Unigram model, a Metaspace
    /// pre-tokenizer, a normalizer or decoder this class does not implement), throws a
    /// <see cref="TokenizerException"/> that names the file and what is wrong.
    /// </summary>
    /// <remarks>
    /// The files are read as untrusted input: anything they hold (invalid UTF-8, a member of the wrong
    /// type, a token id of 2^31, ids that leave more than <see cref="MaxTokenIdGap"/> ids without a token,
    /// a regular expression .NET cannot compile or that backtracks catastrophically) is a
    /// <see cref="TokenizerException"/>, never another exception. The regular expressions run with
    /// <paramref name="regexTimeout"/> (<see cref="TokenizerRegex.DefaultTimeout"/>, 5 s, by default) as
    /// the limit on each match, while reading and while encoding; see also <see cref="MaxWordLength"/>.
    /// </remarks>
    public static BpeTokenizer Load(string tokenizerJsonPath, TimeSpan? regexTimeout = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizerJsonPath);
        if (!File.Exists(tokenizerJsonPath))
            throw new TokenizerException(tokenizerJsonPath, "the file does not exist.");
        string configPath = System.IO.Path.Combine(
            System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(tokenizerJsonPath))!, ConfigFileName);
        using var json = File.OpenRead(tokenizerJsonPath);
        using var config = File.Exists(configPath) ? File.OpenRead(configPath) : null;
        return Load(json, config, tokenizerJsonPath, configPath, regexTimeout);
    }

    /// <summary>
    /// As <see cref="Load(string)"/> from streams (a compressed file, say). <paramref name="source"/>
    /// and <paramref name="configSource"/> name the two files in messages.
    /// </summary>
    public static BpeTokenizer Load(Stream tokenizerJson, Stream? tokenizerConfig, string source, string? configSource = null,
        TimeSpan? regexTimeout = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizerJson);
        ArgumentNullException.ThrowIfNull(source);
        var timeout = regexTimeout ?? TokenizerRegex.DefaultTimeout;
        if (timeout <= TimeSpan.Zero && timeout != System.Text.RegularExpressions.Regex.InfiniteMatchTimeout)
            throw new ArgumentOutOfRangeException(nameof(regexTimeout), regexTimeout, "The time limit of a regular expression must be positive.");
        BpeTokenizer tokenizer;
        int jsonLength;
        using (var document = ParseJson(tokenizerJson, source, out jsonLength))
        {
            TokenizerConfig config = tokenizerConfig is null
                ? TokenizerConfig.None
                : TokenizerConfig.Read(tokenizerConfig, configSource ?? ConfigFileName);
            tokenizer = new BpeTokenizer(document.RootElement, config, source, timeout);
        }
        TakeBackPooledMetadata(jsonLength);
        return tokenizer;
    }

    /// <summary>
    /// A <see cref="JsonDocument"/> rents its metadata from <see cref="ArrayPool{T}.Shared"/> and gives
    /// it back when disposed, and the pool keeps it for the life of the process: 16 MiB for Qwen's
    /// tokenizer.json, which a training run would carry through every step. Renting it once more, and
    /// dropping it, leaves it to the garbage collector.
    /// </summary>
    private static void TakeBackPooledMetadata(int jsonLength)
    {
        if (jsonLength >= 1 << 20)
            _ = ArrayPool<byte>.Shared.Rent(jsonLength);
    }

    /// <summary>
    /// The highest token id may exceed the number of tokens by at most this: ids are an index into the
    /// table of tokens, so a file with one token of id 2,000,000,000 would otherwise make a table of
    /// 16 GB. Real tokenizers number their tokens from 0 with few gaps.
    /// </summary>
    public const int MaxTokenIdGap = 1 << 20;

    /// <summary>
    /// Parses a JSON file that must be UTF-8 (a byte order mark allowed) with strings that are text: bytes
    /// that are not UTF-8 and \u escapes of half a surrogate pair are refused here, with their line,
    /// so that reading a member never fails later.
    /// </summary>
    private static JsonDocument ParseJson(Stream stream, string source) => ParseJson(stream, source, out _);

    /// <inheritdoc cref="ParseJson(Stream, string)"/>
    private static JsonDocument ParseJson(Stream stream, string source, out int length)
    {
        byte[] bytes;
        using (var copy = new MemoryStream())
        {
            stream.CopyTo(copy);
            bytes = copy.ToArray();
        }
        var memory = bytes.AsMemory(bytes.AsSpan().StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF]) ? 3 : 0);
        var span = memory.Span;
        length = span.Length;
        if (!System.Text.Unicode.Utf8.IsValid(span))
        {
            System.Text.Unicode.Utf8.ToUtf16(span, new char[span.Length], out int read, out _, replaceInvalidSequences: false);
            throw new TokenizerException(source, $"not valid UTF-8 at {LineAndByte(span, read)} (0x{span[read]:X2}); a tokenizer file is UTF-8 JSON.");
        }
        var options = new JsonReaderOptions { MaxDepth = 256 };
        try
        {
            var json = new Utf8JsonReader(span, options);
            while (json.Read())
            {
                if (json.TokenType is not (JsonTokenType.String or JsonTokenType.PropertyName) || !json.ValueIsEscaped)
                    continue;
                try
                {
                    json.GetString();
                }
                catch (InvalidOperationException e)
                {
                    throw new TokenizerException(source,
                        $"the string at {LineAndByte(span, (int)json.TokenStartIndex)} holds a \\u escape of an unpaired surrogate, which is no character: {e.Message}", e);
                }
            }
            return JsonDocument.Parse(memory, new JsonDocumentOptions { MaxDepth = 256 });
        }
        catch (JsonException e)
        {
            throw new TokenizerException(source, $"not valid JSON at line {e.LineNumber + 1}, byte {e.BytePositionInLine + 1}: {e.Message}", e);
        }

        static string LineAndByte(ReadOnlySpan<byte> text, int at)
        {
            int lineStart = text[..at].LastIndexOf((byte)'\n') + 1;
            return $"line {text[..at].Count((byte)'\n') + 1}, byte {at - lineStart + 1}";
        }
    }

    private BpeTokenizer(JsonElement root, TokenizerConfig config, string source, TimeSpan regexTimeout)
    {
        Source = source;
        var reader = new Reader(source, regexTimeout);
        if (root.ValueKind != JsonValueKind.Object)
            throw reader.Error("the top level is not a JSON object.");

        // model: BPE, byte-level or SentencePiece-style with byte fallback.
        var model = reader.Object(root, "model", "model");
        string type = reader.OptionalString(model, "type", "model.type") ?? "BPE";
        if (type != "BPE")
            throw reader.Error($"model.type is '{type}'; only BPE tokenizers (model.type \"BPE\": byte-level as Qwen and Llama 3 use, or SentencePiece-style with byte fallback as Gemma uses) are supported.");
        if (model.TryGetProperty("dropout", out var dropout) && dropout.ValueKind != JsonValueKind.Null
            && !(dropout.ValueKind == JsonValueKind.Number && dropout.TryGetDouble(out double p) && p == 0))
            throw reader.Error($"model.dropout is {dropout.GetRawText()}; BPE dropout is not supported (null or 0 is).");
        foreach (string affix in new[] { "continuing_subword_prefix", "end_of_word_suffix" })
            if (!string.IsNullOrEmpty(reader.OptionalString(model, affix, $"model.{affix}")))
                throw reader.Error($"model.{affix} is set; BPE with subword affixes is not supported.");
        bool byteFallback = reader.Flag(model, "byte_fallback", false, "model");
        _ignoreMerges = reader.Flag(model, "ignore_merges", false, "model");

        // pre_tokenizer: byte-level BPE ends with a ByteLevel step; SentencePiece-style BPE has none
        // (Gemma's only splits at spaces, which its normalizer has already replaced with '▁').
        var steps = new List<PreTokenizerStep>();
        bool byteLevel = false;
        bool hasPreTokenizer = root.TryGetProperty("pre_tokenizer", out var preTokenizer) && preTokenizer.ValueKind != JsonValueKind.Null;
        if (hasPreTokenizer)
            ReadPreTokenizer(preTokenizer, "pre_tokenizer", steps, ref byteLevel, reader);
        _preTokenizer = steps;
        const string supported = "the BPE tokenizers supported are byte-level (a ByteLevel pre-tokenizer, as Qwen and Llama 3) and SentencePiece-style with byte fallback (model.byte_fallback, as Gemma).";
        if (byteFallback && byteLevel)
            throw reader.Error("model.byte_fallback is true, which is for SentencePiece-style BPE, but the pre-tokenizer has a ByteLevel step, which is for byte-level BPE; " + supported);
        if (!byteFallback && !byteLevel)
            throw reader.Error((hasPreTokenizer ? "pre_tokenizer has no ByteLevel step" : "pre_tokenizer is missing") + " and model.byte_fallback is not true; " + supported);

        var vocab = reader.Object(model, "vocab", "model.vocab");
        _vocab = new Dictionary<string, int>(capacity: vocab.GetPropertyCount(), StringComparer.Ordinal);
        int maxId = -1;
        foreach (var entry in vocab.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.Number || !entry.Value.TryGetInt32(out int id) || id < 0)
                throw reader.Error($"model.vocab entry '{entry.Name}' has the id {entry.Value.GetRawText()}, not a non-negative integer below 2^31.");
            _vocab[entry.Name] = id;
            maxId = Math.Max(maxId, id);
        }

        // Every byte needs a token: its GPT-2 character (byte-level) or its <0xNN> piece (byte fallback).
        var byteTokenIds = new int[256];
        for (int b = 0; b < 256; b++)
        {
            string symbol = byteFallback ? ByteFallbackSymbols.BytePiece(b) : ByteLevel.ByteToChar[b].ToString();
            if (!_vocab.TryGetValue(symbol, out byteTokenIds[b]))
                throw reader.Error(byteFallback
                    ? $"model.vocab has no byte piece {symbol}, which model.byte_fallback needs for the byte 0x{b:X2}."
                    : $"model.vocab has no token for the byte 0x{b:X2} ('{symbol}'), so it is not a byte-level vocabulary.");
        }
        _symbols = byteFallback
            ? new ByteFallbackSymbols(_vocab, byteTokenIds, ReadByteFallbackDecoder(root, reader))
            : new ByteLevelSymbols(byteTokenIds);

        var merges = reader.Array(model, "merges", "model.merges");
        _merges = new Dictionary<long, long>(merges.GetArrayLength(), PairComparer.Instance);
        int rank = 0;
        foreach (var merge in merges.EnumerateArray())
        {
            string left, right;
            if (merge.ValueKind == JsonValueKind.String)
            {
                string text = merge.GetString()!;
                int space = text.IndexOf(' ');
                if (space <= 0 || space == text.Length - 1 || text.IndexOf(' ', space + 1) >= 0)
                    throw reader.Error($"model.merges[{rank}] is \"{text}\", not two tokens separated by one space.");
                left = text[..space];
                right = text[(space + 1)..];
            }
            else if (merge.ValueKind == JsonValueKind.Array && merge.GetArrayLength() == 2
                     && merge[0].ValueKind == JsonValueKind.String && merge[1].ValueKind == JsonValueKind.String)
            {
                left = merge[0].GetString()!;
                right = merge[1].GetString()!;
            }
            else
            {
                throw reader.Error($"model.merges[{rank}] is {merge.GetRawText()}, neither \"a b\" nor [\"a\", \"b\"].");
            }
            if (!_vocab.TryGetValue(left, out int leftId) || !_vocab.TryGetValue(right, out int rightId))
                throw reader.Error($"model.merges[{rank}] ({left} {right}) uses a token that model.vocab does not have.");
            if (!_vocab.TryGetValue(left + right, out int mergedId))
                throw reader.Error($"model.merges[{rank}] ({left} {right}) makes '{left + right}', which model.vocab does not have.");
            // A pair listed twice keeps its first (lowest) rank, as in Hugging Face's tokenizers.
            _merges.TryAdd(PairKey(leftId, rightId), ((long)rank << 32) | (uint)mergedId);
            rank++;
        }

        // added_tokens: matched before everything else.
        var added = new List<AddedToken>();
        if (root.TryGetProperty("added_tokens", out var addedTokens) && addedTokens.ValueKind != JsonValueKind.Null)
        {
            if (addedTokens.ValueKind != JsonValueKind.Array)
                throw reader.Error("added_tokens is not an array.");
            int index = 0;
            foreach (var token in addedTokens.EnumerateArray())
            {
                string where = $"added_tokens[{index++}]";
                if (token.ValueKind != JsonValueKind.Object)
                    throw reader.Error($"{where} is not an object.");
                if (!token.TryGetProperty("id", out var idElement) || idElement.ValueKind != JsonValueKind.Number
                    || !idElement.TryGetInt32(out int id) || id < 0)
                    throw reader.Error($"{where}.id is {(token.TryGetProperty("id", out idElement) ? idElement.GetRawText() : "missing")}, not a non-negative integer below 2^31.");
                string content = reader.OptionalString(token, "content", $"{where}.content")
                                 ?? throw reader.Error($"{where} has no content.");
                if (content.Length == 0)
                    throw reader.Error($"{where} has an empty content.");
                bool special = reader.Flag(token, "special", false, where);
                added.Add(new AddedToken(id, content, special,
                    LStrip: reader.Flag(token, "lstrip", false, where),
                    RStrip: reader.Flag(token, "rstrip", false, where),
                    SingleWord: reader.Flag(token, "single_word", false, where),
                    Normalized: reader.Flag(token, "normalized", !special, where)));
                maxId = Math.Max(maxId, id);
            }
        }
        AddedTokens = added;
        int tokenCount = _vocab.Count + added.Count;
        if (maxId >= (long)tokenCount + MaxTokenIdGap)
            throw reader.Error($"the highest token id is {maxId:N0} for {tokenCount:N0} tokens; ids more than {MaxTokenIdGap:N0} past the number of tokens are not supported (ids index a table of tokens).");
        _addedByContent = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var token in added)
            _addedByContent[token.Content] = token.Id;

        _idToToken = new string?[maxId + 1];
        _isSpecial = new bool[maxId + 1];
        foreach (var (token, id) in _vocab)
            _idToToken[id] = token;
        foreach (var token in added)
        {
            _idToToken[token.Id] = token.Content;
            _isSpecial[token.Id] = token.Special;
        }

        _normalize = root.TryGetProperty("normalizer", out var normalizer) ? ReadNormalizer(normalizer, "normalizer", reader) : null;
        // Added tokens marked normalized are matched in the normalized text, the others in the raw text.
        _rawAddedTokens = new AddedTokenMatcher(added.Where(t => !t.Normalized || _normalize is null));
        _normalizedAddedTokens = new AddedTokenMatcher(added.Where(t => t.Normalized && _normalize is not null));

        if (!byteFallback && root.TryGetProperty("decoder", out var decoder) && decoder.ValueKind != JsonValueKind.Null)
        {
            string decoderType = reader.OptionalString(decoder, "type", "decoder.type") ?? "";
            if (decoderType != "ByteLevel")
                throw reader.Error($"decoder.type is '{decoderType}'; byte-level BPE is decoded by the ByteLevel decoder only.");
        }

        EosToken = config.EosToken;
        BosToken = config.BosToken;
        ChatTemplate = config.ChatTemplate;
        string? firstTemplateToken = root.TryGetProperty("post_processor", out var post)
            ? FirstTemplateToken(post, "post_processor", reader)
            : null;
        AddBosToken = config.AddBosToken ?? (BosToken is not null && firstTemplateToken == BosToken);
    }

    private static Func<string, string>? ReadNormalizer(JsonElement element, string where, Reader reader)
    {
        if (element.ValueKind == JsonValueKind.Null)
            return null;
        string type = reader.OptionalString(element, "type", $"{where}.type") ?? "";
        switch (type)
        {
            case "NFC": return static s => s.Normalize(NormalizationForm.FormC);
            case "NFD": return static s => s.Normalize(NormalizationForm.FormD);
            case "NFKC": return static s => s.Normalize(NormalizationForm.FormKC);
            case "NFKD": return static s => s.Normalize(NormalizationForm.FormKD);
            case "Lowercase": return static s => s.ToLowerInvariant();
            case "Replace":
            {
                // Gemma's: every " " becomes "▁". A Regex pattern runs with .NET's Regex; the content is literal.
                string content = reader.OptionalString(element, "content", $"{where}.content")
                                 ?? throw reader.Error($"{where} (Replace) has no content.");
                var pattern = reader.Object(element, "pattern", $"{where}.pattern");
                if (pattern.TryGetProperty("String", out var literal) && literal.ValueKind == JsonValueKind.String)
                {
                    string text = literal.GetString()!;
                    if (text.Length == 0)
                        throw reader.Error($"{where}.pattern is an empty String.");
                    return s => s.Replace(text, content, StringComparison.Ordinal);
                }
                if (pattern.TryGetProperty("Regex", out var r) && r.ValueKind == JsonValueKind.String)
                {
                    var regex = TokenizerRegex.Create(r.GetString()!, $"{where}.pattern", reader.Source, reader.RegexTimeout);
                    return s => regex.Replace(s, content);
                }
                throw reader.Error($"{where}.pattern has neither a Regex nor a String.");
            }
            case "Prepend":
            {
                // Llama 2's and Mistral's: a "▁" before every non-empty run, as SentencePiece's dummy prefix.
                string prepend = reader.OptionalString(element, "prepend", $"{where}.prepend")
                                 ?? throw reader.Error($"{where} (Prepend) has no prepend.");
                return s => s.Length == 0 ? s : prepend + s;
            }
            case "Sequence":
            {
                var parts = new List<Func<string, string>>();
                int i = 0;
                foreach (var part in reader.Array(element, "normalizers", $"{where}.normalizers").EnumerateArray())
                    if (ReadNormalizer(part, $"{where}.normalizers[{i++}]", reader) is { } f)
                        parts.Add(f);
                return parts.Count == 0 ? null : s =>
                {
                    foreach (var f in parts)
                        s = f(s);
                    return s;
                };
            }
            default:
                throw reader.Error($"{where}.type is '{type}'; the normalizers supported are NFC, NFD, NFKC, NFKD, Lowercase, Replace, Prepend and Sequence.");
        }
    }

    private static void ReadPreTokenizer(JsonElement element, string where, List<PreTokenizerStep> steps, ref bool byteLevel, Reader reader)
    {
        if (element.ValueKind != JsonValueKind.Object)
            throw reader.Error($"{where} is not an object.");
        string type = reader.OptionalString(element, "type", $"{where}.type") ?? "";
        if (byteLevel)
            throw reader.Error($"{where} ({type}) comes after the ByteLevel step; ByteLevel must be the last pre-tokenizer.");
        switch (type)
        {
            case "Sequence":
            {
                int i = 0;
                foreach (var step in reader.Array(element, "pretokenizers", $"{where}.pretokenizers").EnumerateArray())
                    ReadPreTokenizer(step, $"{where}.pretokenizers[{i++}]", steps, ref byteLevel, reader);
                break;
            }
            case "Split":
            {
                var pattern = reader.Object(element, "pattern", $"{where}.pattern");
                string regex;
                if (pattern.TryGetProperty("Regex", out var r) && r.ValueKind == JsonValueKind.String)
                    regex = r.GetString()!;
                else if (pattern.TryGetProperty("String", out var s) && s.ValueKind == JsonValueKind.String)
                    regex = System.Text.RegularExpressions.Regex.Escape(s.GetString()!);
                else
                    throw reader.Error($"{where}.pattern has neither a Regex nor a String.");
                string behaviorName = reader.OptionalString(element, "behavior", $"{where}.behavior") ?? "Isolated";
                if (!Enum.TryParse<SplitBehavior>(behaviorName, out var behavior))
                    throw reader.Error($"{where}.behavior is '{behaviorName}'; expected Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous.");
                var compiled = TokenizerRegex.Create(regex, $"{where}.pattern", reader.Source, reader.RegexTimeout);
                steps.Add(new RegexSplit(compiled, behavior, reader.Flag(element, "invert", false, where)));
                break;
            }
            case "ByteLevel":
                steps.Add(new ByteLevelSplit(
                    addPrefixSpace: reader.Flag(element, "add_prefix_space", true, where),
                    useRegex: reader.Flag(element, "use_regex", true, where),
                    where, reader.Source, reader.RegexTimeout));
                byteLevel = true;
                break;
            default:
                throw reader.Error($"{where}.type is '{type}'; the pre-tokenizers supported are Sequence, Split and ByteLevel.");
        }
    }

    /// <summary>
    /// The decoder of a SentencePiece-style tokenizer: Replace steps with a String pattern, ByteFallback
    /// and Fuse in any order, and a Strip after Fuse (Llama 2's, which removes the space its Prepend
    /// normalizer added), alone or in a Sequence.
    /// </summary>
    private static ByteFallbackDecoder ReadByteFallbackDecoder(JsonElement root, Reader reader)
    {
        if (!root.TryGetProperty("decoder", out var decoder) || decoder.ValueKind == JsonValueKind.Null)
            throw reader.Error("decoder is missing; SentencePiece-style BPE needs one (Replace '▁' with ' ', ByteFallback, Fuse) to turn tokens back into text.");
        var steps = new List<(JsonElement Step, string Where)>();
        if (decoder.ValueKind == JsonValueKind.Object && reader.OptionalString(decoder, "type", "decoder.type") == "Sequence")
        {
            int i = 0;
            foreach (var step in reader.Array(decoder, "decoders", "decoder.decoders").EnumerateArray())
                steps.Add((step, $"decoder.decoders[{i++}]"));
        }
        else
        {
            steps.Add((decoder, "decoder"));
        }

        var replacements = new List<(string Pattern, string Content)>();
        bool byteFallback = false, fused = false;
        (char Content, int Start, int Stop)? strip = null;
        foreach (var (step, where) in steps)
        {
            if (step.ValueKind != JsonValueKind.Object)
                throw reader.Error($"{where} is not an object.");
            string type = reader.OptionalString(step, "type", $"{where}.type") ?? "";
            if (strip is not null)
                throw reader.Error($"{where} ({type}) comes after Strip; Strip must be the last decoder.");
            switch (type)
            {
                case "Replace":
                {
                    var pattern = reader.Object(step, "pattern", $"{where}.pattern");
                    if (!pattern.TryGetProperty("String", out var literal) || literal.ValueKind != JsonValueKind.String || literal.GetString()!.Length == 0)
                        throw reader.Error($"{where}.pattern is not a non-empty String; the Replace decoder supports String patterns only.");
                    string content = reader.OptionalString(step, "content", $"{where}.content")
                                     ?? throw reader.Error($"{where} (Replace) has no content.");
                    replacements.Add((literal.GetString()!, content));
                    break;
                }
                case "ByteFallback":
                    byteFallback = true;
                    break;
                case "Fuse":
                    fused = true;
                    break;
                case "Strip":
                {
                    if (!fused)
                        throw reader.Error($"{where} (Strip) comes before Fuse; only a Strip of the fused text is supported.");
                    string content = reader.OptionalString(step, "content", $"{where}.content") ?? "";
                    if (content.Length != 1)
                        throw reader.Error($"{where}.content is not one character.");
                    strip = (content[0], Count(step, "start", where, reader), Count(step, "stop", where, reader));
                    break;
                }
                default:
                    throw reader.Error($"{where}.type is '{type}'; the decoders supported for SentencePiece-style BPE are Sequence, Replace, ByteFallback, Fuse and Strip.");
            }
        }
        return new ByteFallbackDecoder(replacements, byteFallback, strip);

        static int Count(JsonElement step, string name, string where, Reader reader) =>
            !step.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null ? 0
            : value.ValueKind == JsonValueKind.Number && value.TryGetInt32(out int n) && n >= 0 ? n
            : throw reader.Error($"{where}.{name} is not a non-negative integer.");
    }

    /// <summary>
    /// The special token a TemplateProcessing post-processor puts before a single sequence, or null. The
    /// parts read are checked: a post-processor is null or an object with a string type, a Sequence's
    /// processors an array, a TemplateProcessing's single an array of {"SpecialToken": {"id": …}} and
    /// {"Sequence": …} objects; other post-processors (ByteLevel, RobertaProcessing, …) change nothing
    /// this class does and are not read further.
    /// </summary>
    private static string? FirstTemplateToken(JsonElement post, string where, Reader reader)
    {
        if (post.ValueKind == JsonValueKind.Null)
            return null;
        if (post.ValueKind != JsonValueKind.Object)
            throw reader.Error($"{where} is a JSON {Kind(post)}, not an object.");
        string? type = reader.OptionalString(post, "type", $"{where}.type");
        if (type == "Sequence")
        {
            string? first = null;
            int i = 0;
            foreach (var processor in reader.Array(post, "processors", $"{where}.processors").EnumerateArray())
                first ??= FirstTemplateToken(processor, $"{where}.processors[{i++}]", reader);
            return first;
        }
        if (type != "TemplateProcessing" || !post.TryGetProperty("single", out var single) || single.ValueKind == JsonValueKind.Null)
            return null;
        if (single.ValueKind != JsonValueKind.Array)
            throw reader.Error($"{where}.single is a JSON {Kind(single)}, not an array.");
        string? token = null;
        int index = 0;
        foreach (var piece in single.EnumerateArray())
        {
            string at = $"{where}.single[{index}]";
            if (piece.ValueKind != JsonValueKind.Object)
                throw reader.Error($"{at} is a JSON {Kind(piece)}, not an object with SpecialToken or Sequence.");
            if (piece.TryGetProperty("SpecialToken", out var special))
            {
                if (special.ValueKind != JsonValueKind.Object)
                    throw reader.Error($"{at}.SpecialToken is a JSON {Kind(special)}, not an object.");
                string id = reader.OptionalString(special, "id", $"{at}.SpecialToken.id")
                            ?? throw reader.Error($"{at}.SpecialToken has no id.");
                if (index == 0)
                    token = id;
            }
            else if (!piece.TryGetProperty("Sequence", out _))
            {
                throw reader.Error($"{at} has neither SpecialToken nor Sequence.");
            }
            index++;
        }
        return token;
    }

    private static string Kind(JsonElement element) => element.ValueKind.ToString().ToLowerInvariant();

    /// <summary>Typed access to JSON members with errors that name the file and the member.</summary>
    private readonly struct Reader(string source, TimeSpan regexTimeout)
    {
        public string Source => source;

        /// <summary>The time limit of one match of the file's regular expressions.</summary>
        public TimeSpan RegexTimeout => regexTimeout;

        public TokenizerException Error(string problem) => new(source, problem);

        public JsonElement Object(JsonElement parent, string name, string where) =>
            Member(parent, name, where, out var value) && value.ValueKind == JsonValueKind.Object
                ? value
                : throw Error($"{where} is missing or not an object.");

        public JsonElement Array(JsonElement parent, string name, string where) =>
            Member(parent, name, where, out var value) && value.ValueKind == JsonValueKind.Array
                ? value
                : throw Error($"{where} is missing or not an array.");

        public string? OptionalString(JsonElement parent, string name, string where)
        {
            if (!Member(parent, name, where, out var value) || value.ValueKind == JsonValueKind.Null)
                return null;
            return value.ValueKind == JsonValueKind.String ? value.GetString() : throw Error($"{where} is not a string.");
        }

        /// <summary>A member of an object; a parent that is not an object (where the file has a string, say) is an error, not JsonElement's exception.</summary>
        private bool Member(JsonElement parent, string name, string where, out JsonElement value)
        {
            if (parent.ValueKind != JsonValueKind.Object)
            {
                int dot = where.LastIndexOf('.');
                throw Error($"{(dot > 0 ? where[..dot] : "the top level")} is a JSON {Kind(parent)}, not an object.");
            }
            return parent.TryGetProperty(name, out value);
        }

        public bool Flag(JsonElement parent, string name, bool fallback, string where)
        {
            if (!Member(parent, name, $"{where}.{name}", out var value) || value.ValueKind == JsonValueKind.Null)
                return fallback;
            return value.ValueKind switch
            {
                JsonValueKind.True => true,
                JsonValueKind.False => false,
                _ => throw Error($"{where}.{name} is not true or false."),
            };
        }
    }

    /// <summary>What tokenizer_config.json says about special tokens and chat.</summary>
    private sealed record TokenizerConfig(string? EosToken, string? BosToken, bool? AddBosToken, string? ChatTemplate)
    {
        public static readonly TokenizerConfig None = new(null, null, null, null);

        public static TokenizerConfig Read(Stream stream, string source)
        {
            using var document = ParseJson(stream, source);
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new TokenizerException(source, "the top level is not a JSON object.");
            bool? addBos = !root.TryGetProperty("add_bos_token", out var add) ? null : add.ValueKind switch
            {
                JsonValueKind.True => true,
                JsonValueKind.False => false,
                JsonValueKind.Null => null,
                _ => throw new TokenizerException(source, $"add_bos_token is a JSON {Kind(add)}, not true or false."),
            };
            return new TokenizerConfig(
                TokenText(root, "eos_token", source),
                TokenText(root, "bos_token", source),
                addBos,
                Template(root, source));
        }

        /// <summary>A special token written as a string or, in older files, as {"content": ...}.</summary>
        private static string? TokenText(JsonElement root, string name, string source)
        {
            if (!root.TryGetProperty(name, out var value))
                return null;
            return value.ValueKind switch
            {
                JsonValueKind.Null => null,
                JsonValueKind.String => value.GetString(),
                JsonValueKind.Object when value.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String => c.GetString(),
                _ => throw new TokenizerException(source, $"{name} is a JSON {Kind(value)}, neither a string nor an object with a string content."),
            };
        }

        /// <summary>chat_template as a string, or the one named "default" of a list of {name, template}.</summary>
        private static string? Template(JsonElement root, string source)
        {
            if (!root.TryGetProperty("chat_template", out var value) || value.ValueKind == JsonValueKind.Null)
                return null;
            if (value.ValueKind == JsonValueKind.String)
                return value.GetString();
            if (value.ValueKind == JsonValueKind.Array)
            {
                string? first = null, chosen = null;
                int i = 0;
                foreach (var entry in value.EnumerateArray())
                {
                    string where = $"chat_template[{i++}]";
                    if (entry.ValueKind != JsonValueKind.Object)
                        throw new TokenizerException(source, $"{where} is a JSON {Kind(entry)}, not an object with a name and a template.");
                    if (!entry.TryGetProperty("template", out var template) || template.ValueKind != JsonValueKind.String)
                        throw new TokenizerException(source, $"{where}.template is missing or not a string.");
                    if (entry.TryGetProperty("name", out var name) && name.ValueKind is not (JsonValueKind.String or JsonValueKind.Null))
                        throw new TokenizerException(source, $"{where}.name is a JSON {Kind(name)}, not a string.");
                    first ??= template.GetString();
                    if (name.ValueKind == JsonValueKind.String && name.GetString() == "default")
                        chosen ??= template.GetString();
                }
                return chosen ?? first;
            }
            throw new TokenizerException(source, $"chat_template is a JSON {Kind(value)}, neither a string nor a list of {{name, template}}.");
        }
    }
}
