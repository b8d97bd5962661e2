using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using LoraCompiler.Runtime.Data;

namespace LoraCompiler.Tests.Data;

/// <summary>
/// tokenizer.json and tokenizer_config.json as files from anywhere: a regex that backtracks
/// catastrophically, a word of megabytes, ids of 2^31, members of the wrong type, bytes that are not
/// UTF-8; each is one <see cref="TokenizerException"/> naming the file, or bounded work.
/// </summary>
public class TokenizerFileTests
{
    private static readonly TimeSpan ShortTimeout = TimeSpan.FromMilliseconds(100);

    private static Action<JsonObject> SplitPattern(string pattern) =>
        j => j["pre_tokenizer"]!["pretokenizers"]![0]!["pattern"]!["Regex"] = pattern;

    [Fact]
    public void A_catastrophic_pattern_is_refused_at_load_naming_it()
    {
        string path = TestTokenizers.WriteTiny([("h", "e")], edit: SplitPattern(@"(\p{L}+)+$"));
        var e = Assert.Throws<TokenizerException>(() => BpeTokenizer.Load(path, ShortTimeout));
        Assert.Equal(path, e.Path);
        Assert.StartsWith($"{path}: pre_tokenizer.pretokenizers[0].pattern \"(\\p{{L}}+)+$\" takes more than 100 ms to match", e.Message);
        Assert.Contains("backtracks catastrophically", e.Message);

        // The same in a Replace normalizer.
        path = TestTokenizers.WriteTiny([("h", "e")], edit: j => j["normalizer"] = new JsonObject
        {
            ["type"] = "Replace", ["pattern"] = new JsonObject { ["Regex"] = @"(\s+)+$" }, ["content"] = " ",
        });
        e = Assert.Throws<TokenizerException>(() => BpeTokenizer.Load(path, ShortTimeout));
        Assert.StartsWith($"{path}: normalizer.pattern \"(\\s+)+$\" takes more than 100 ms", e.Message);
    }

    [Fact]
    public void A_pattern_that_backtracks_only_on_some_text_stops_there_naming_it()
    {
        // Exponential only on a run of x's, which no probe holds: loaded, and the text that triggers it is refused.
        string pattern = @"(x+)+y|\s+|[^\s]";
        string path = TestTokenizers.WriteTiny([("h", "e")], configJson: """{"eos_token": "h"}""", edit: SplitPattern(pattern));
        var tokenizer = BpeTokenizer.Load(path, ShortTimeout);
        Assert.Equal("he llo", tokenizer.Decode(tokenizer.Encode("he llo")));
        var e = Assert.Throws<TokenizerException>(() => tokenizer.Encode("a " + new string('x', 40) + " b"));
        Assert.Equal($"{path}: pre_tokenizer.pretokenizers[0].pattern \"{pattern}\" took more than 100 ms on one match in a text of 44 characters: " +
                     "it backtracks catastrophically on that text (a nested repetition such as (\\p{L}+)+); fix the pattern.", e.Message);

        // In a JSONL file: the same error, not an AggregateException of the parallel tokenization.
        string data = Path.Combine(Path.GetDirectoryName(path)!, "data.jsonl");
        File.WriteAllLines(data, ["{\"text\": \"fine\"}", $"{{\"text\": \"{new string('x', 40)}\"}}"]);
        Assert.Contains("took more than 100 ms", Assert.Throws<TokenizerException>(() => TrainingData.Load(data, tokenizer)).Message);
    }

    [Fact]
    public void A_byte_level_word_of_megabytes_is_merged_in_chunks_cut_between_characters()
    {
        var tokenizer = BpeTokenizer.Load(TestTokenizers.WriteTiny([("a", "b"), ("ab", "c"), ("Ã", "©")]));
        // One word (letters only, so one pre-tokenized piece) of over a million bytes, with a two-byte
        // character at every place a cut could fall.
        var random = new Random(3);
        var word = new StringBuilder();
        while (word.Length < 1_000_000)
            word.Append(random.Next(4) switch { 0 => "abc", 1 => "é", 2 => "ab", _ => "c" });
        string text = word.ToString();
        int[] ids = tokenizer.Encode(text);
        Assert.Equal(text, tokenizer.Decode(ids));

        // The documented rule: chunks of 16,384 bytes, each cut moved back to the start of a character,
        // merged each on its own.
        byte[] bytes = Encoding.UTF8.GetBytes(text);
        var expected = new List<int>();
        int chunks = 0;
        for (int start = 0; start < bytes.Length; chunks++)
        {
            int end = Math.Min(start + BpeTokenizer.MaxWordLength, bytes.Length);
            while (end < bytes.Length && (bytes[end] & 0xC0) == 0x80)
                end--;
            expected.AddRange(tokenizer.Encode(Encoding.UTF8.GetString(bytes, start, end - start)));
            start = end;
        }
        Assert.True(chunks > 60);
        Assert.Equal(expected, ids);
        // No 'é' was cut in two: its two bytes are always merged into one token.
        Assert.DoesNotContain(tokenizer.TokenId("Ã")!.Value, ids);
    }

    [Fact]
    public void A_sentencepiece_line_of_megabytes_is_cut_before_a_space_or_between_surrogates()
    {
        var tokenizer = BpeTokenizer.Load(TestTokenizers.WriteTinySentencePiece("abc𝐀", [("a", "b"), ("ab", "c"), ("▁", "abc")]));
        // A SentencePiece "word" is a whole run of text (spaces are '▁', which no pre-tokenizer splits
        // at): a stretch of a hundred thousand characters without a space, then words with spaces.
        var random = new Random(4);
        var line = new StringBuilder();
        while (line.Length < 100_000)
            line.Append(random.Next(3) switch { 0 => "abc", 1 => "𝐀", _ => "c" });
        while (line.Length < 400_000)
            line.Append(random.Next(3) switch { 0 => " abc", 1 => "𝐀", _ => "c" });
        string text = line.ToString();

        int[] ids = tokenizer.Encode(text);
        Assert.Equal(text, tokenizer.Decode(ids)); // no surrogate pair cut in two (it would come back as U+FFFD)

        var expected = new List<int>();
        for (int start = 0; start < text.Length;)
        {
            int end = Math.Min(start + BpeTokenizer.MaxWordLength, text.Length);
            if (end < text.Length)
            {
                int space = text.LastIndexOf(' ', end - 1, 1024);
                end = space > end - 1024 ? space : char.IsLowSurrogate(text[end]) ? end - 1 : end;
            }
            expected.AddRange(tokenizer.Encode(text[start..end]));
            start = end;
        }
        Assert.Equal(expected, ids);
    }

    [Theory]
    [InlineData("vocab-id", "model.vocab entry 'A' has the id 2147483648, not a non-negative integer below 2^31.")]
    [InlineData("vocab-id-string", "model.vocab entry 'A' has the id \"65\", not a non-negative integer below 2^31.")]
    [InlineData("added-id", "added_tokens[0].id is 4294967296, not a non-negative integer below 2^31.")]
    [InlineData("added-id-string", "added_tokens[0].id is \"300\", not a non-negative integer below 2^31.")]
    [InlineData("id-gap", "the highest token id is 2,147,483,647 for 259 tokens; ids more than 1,048,576 past the number of tokens are not supported")]
    [InlineData("post-string", "post_processor is a JSON string, not an object.")]
    [InlineData("post-type", "post_processor.type is not a string.")]
    [InlineData("post-single", "post_processor.single is a JSON object, not an array.")]
    [InlineData("post-piece", "post_processor.single[0] is a JSON number, not an object with SpecialToken or Sequence.")]
    [InlineData("post-special", "post_processor.single[0].SpecialToken.id is not a string.")]
    [InlineData("post-sequence", "post_processor.processors is missing or not an array.")]
    [InlineData("dropout", "model.dropout is \"0.1\"; BPE dropout is not supported")]
    [InlineData("not-utf8", "not valid UTF-8 at line 1, byte")]
    [InlineData("surrogate", "holds a \\u escape of an unpaired surrogate")]
    public void A_tokenizer_json_of_the_wrong_types_is_one_tokenizer_exception(string change, string message)
    {
        Action<JsonObject>? edit = change switch
        {
            "vocab-id" => j => j["model"]!["vocab"]!["A"] = 2147483648L,
            "vocab-id-string" => j => j["model"]!["vocab"]!["A"] = "65",
            "added-id" => j => j["added_tokens"] = JsonNode.Parse("""[{"id": 4294967296, "content": "<s>"}]"""),
            "added-id-string" => j => j["added_tokens"] = JsonNode.Parse("""[{"id": "300", "content": "<s>"}]"""),
            "id-gap" => j => j["added_tokens"] = JsonNode.Parse("""[{"id": 2147483647, "content": "<s>"}]"""),
            "post-string" => j => j["post_processor"] = "TemplateProcessing",
            "post-type" => j => j["post_processor"] = JsonNode.Parse("""{"type": 3}"""),
            "post-single" => j => j["post_processor"] = JsonNode.Parse("""{"type": "TemplateProcessing", "single": {"A": 1}}"""),
            "post-piece" => j => j["post_processor"] = JsonNode.Parse("""{"type": "TemplateProcessing", "single": [7]}"""),
            "post-special" => j => j["post_processor"] = JsonNode.Parse("""{"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": 1, "type_id": 0}}]}"""),
            "post-sequence" => j => j["post_processor"] = JsonNode.Parse("""{"type": "Sequence", "processors": "ByteLevel"}"""),
            "dropout" => j => j["model"]!["dropout"] = "0.1",
            _ => null,
        };
        string path = TestTokenizers.WriteTiny([("h", "e")], extraTokens: ["<s>"], edit: edit);
        if (change == "not-utf8")
            File.WriteAllBytes(path, [.. File.ReadAllBytes(path)[..40], 0xC0, 0xAF, .. File.ReadAllBytes(path)[40..]]);
        if (change == "surrogate")
            File.WriteAllText(path, File.ReadAllText(path).Replace("\"h\":", "\"\\udc00h\":", StringComparison.Ordinal));
        var e = Assert.Throws<TokenizerException>(() => BpeTokenizer.Load(path));
        Assert.Equal(path, e.Path);
        Assert.StartsWith(path + ": ", e.Message);
        Assert.Contains(message, e.Message);
    }

    [Theory]
    [InlineData("""{"chat_template": 7}""", "chat_template is a JSON number, neither a string nor a list of {name, template}.")]
    [InlineData("""{"chat_template": [7]}""", "chat_template[0] is a JSON number, not an object with a name and a template.")]
    [InlineData("""{"chat_template": [{"name": 1, "template": "x"}]}""", "chat_template[0].name is a JSON number, not a string.")]
    [InlineData("""{"chat_template": [{"name": "default", "template": ["x"]}]}""", "chat_template[0].template is missing or not a string.")]
    [InlineData("""{"eos_token": 3}""", "eos_token is a JSON number, neither a string nor an object with a string content.")]
    [InlineData("""{"bos_token": {"content": false}}""", "bos_token is a JSON object, neither a string nor an object with a string content.")]
    [InlineData("""{"add_bos_token": "yes"}""", "add_bos_token is a JSON string, not true or false.")]
    [InlineData("""[1, 2]""", "the top level is not a JSON object.")]
    public void A_tokenizer_config_of_the_wrong_types_is_one_tokenizer_exception(string config, string message)
    {
        string path = TestTokenizers.WriteTiny([("h", "e")], configJson: config);
        string configPath = Path.Combine(Path.GetDirectoryName(path)!, BpeTokenizer.ConfigFileName);
        var e = Assert.Throws<TokenizerException>(() => BpeTokenizer.Load(path));
        Assert.Equal($"{configPath}: {message}", e.Message);
    }

    [Fact]
    public void The_chat_template_named_default_is_taken_and_a_valid_post_processor_still_gives_bos()
    {
        string path = TestTokenizers.WriteTiny([("h", "e")], extraTokens: ["<s>"],
            configJson: """{"bos_token": "<s>", "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}""",
            edit: j => j["post_processor"] = JsonNode.Parse("""
                {"type": "Sequence", "processors": [{"type": "ByteLevel", "trim_offsets": false},
                  {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}]}
                """));
        var tokenizer = BpeTokenizer.Load(path);
        Assert.Equal("D", tokenizer.ChatTemplate);
        Assert.True(tokenizer.AddBosToken);
    }
}
