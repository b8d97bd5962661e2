using System.Text;
using System.Text.Json.Nodes;
using LoraCompiler.Runtime.Data;

namespace LoraCompiler.Tests.Data;

/// <summary>
/// The tokenizer against token ids that @lenml/tokenizers (a JavaScript implementation) produced from
/// the real Qwen3, Llama 3 and Gemma 3 tokenizer files (Data/TestData/README.md says how), and its
/// behaviour on small tokenizer files built to order. HuggingFaceTokenizerTests checks the same files
/// against Hugging Face's own implementation.
/// </summary>
public class BpeTokenizerTests
{
    [Theory]
    [InlineData("qwen3", 228)]
    [InlineData("llama3", 228)]
    [InlineData("gemma3", 457)]
    public void Encodes_every_reference_text_to_the_reference_ids(string name, int count)
    {
        var tokenizer = TestTokenizers.Get(name);
        var cases = TestTokenizers.Reference(name);
        Assert.Equal(count, cases.Count);

        var mismatches = new List<string>();
        foreach (var (text, expected) in cases)
        {
            int[] actual = tokenizer.Encode(text);
            if (!actual.AsSpan().SequenceEqual(expected))
                mismatches.Add($"{Escape(text)}\n  expected [{string.Join(", ", expected)}]\n  actual   [{string.Join(", ", actual)}]");
        }
        Assert.True(mismatches.Count == 0, $"{mismatches.Count} of {cases.Count} texts differ:\n" + string.Join("\n", mismatches.Take(10)));
    }

    [Theory]
    [InlineData("qwen3")]
    [InlineData("llama3")]
    [InlineData("gemma3")]
    public void Decoding_the_ids_gives_back_the_text(string name)
    {
        var tokenizer = TestTokenizers.Get(name);
        foreach (var (text, ids) in TestTokenizers.Reference(name))
        {
            // Qwen normalizes to NFC before tokenizing, so NFC is what comes back; Llama 3 has no
            // normalizer; Gemma's decoder turns every '▁' into a space, a '▁' of the text included.
            string expected = name switch
            {
                "qwen3" => text.Normalize(NormalizationForm.FormC),
                "gemma3" => text.Replace('▁', ' '),
                _ => text,
            };
            Assert.Equal(expected, tokenizer.Decode(ids));
        }
    }

    [Fact]
    public void Qwen3_reads_the_vocabulary_merges_and_config()
    {
        var qwen = TestTokenizers.Qwen3;
        Assert.Equal(151_643, qwen.ModelVocabSize);
        Assert.Equal(151_387, qwen.MergeCount);
        Assert.Equal(151_669, qwen.VocabSize);
        Assert.Equal(26, qwen.AddedTokens.Count);
        Assert.Equal("<|im_end|>", qwen.EosToken);
        Assert.Equal(151_645, qwen.EosId);
        Assert.Null(qwen.BosToken);
        Assert.Null(qwen.BosId);
        Assert.False(qwen.AddBosToken);
        Assert.Contains("<|im_start|>", qwen.ChatTemplate);
        Assert.Equal(151_644, qwen.TokenId("<|im_start|>"));
        Assert.Equal(151_643, qwen.TokenId("<|endoftext|>"));
        Assert.Equal(220, qwen.TokenId("Ġ"));
        Assert.Null(qwen.TokenId("no such token"));
        Assert.Equal("<|im_end|>", qwen.Token(151_645));
        Assert.Null(qwen.Token(151_669));
        Assert.True(qwen.IsSpecial(151_644));
        Assert.False(qwen.IsSpecial(151_667)); // <think> is an added token but not special
    }

    [Fact]
    public void Llama3_reads_the_vocabulary_merges_and_config()
    {
        var llama = TestTokenizers.Llama3;
        Assert.Equal(128_000, llama.ModelVocabSize);
        Assert.Equal(280_147, llama.MergeCount);
        Assert.Equal(128_256, llama.VocabSize);
        Assert.Equal("<|begin_of_text|>", llama.BosToken);
        Assert.Equal(128_000, llama.BosId);
        Assert.Equal("<|end_of_text|>", llama.EosToken);
        Assert.Equal(128_001, llama.EosId);
        Assert.Equal(128_009, llama.TokenId("<|eot_id|>"));
        Assert.Contains("<|start_header_id|>", llama.ChatTemplate);
    }

    [Fact]
    public void Gemma3_reads_the_vocabulary_merges_and_config()
    {
        var gemma = TestTokenizers.Gemma3;
        Assert.Equal(BpeMode.SentencePiece, gemma.Mode);
        Assert.Equal(BpeMode.ByteLevel, TestTokenizers.Qwen3.Mode);
        Assert.Equal(262_144, gemma.ModelVocabSize);
        Assert.Equal(514_906, gemma.MergeCount);
        Assert.Equal(262_145, gemma.VocabSize); // <image_soft_token> (262,144) is added after the vocabulary
        Assert.Equal(6_415, gemma.AddedTokens.Count);
        Assert.Equal("<bos>", gemma.BosToken);
        Assert.Equal(2, gemma.BosId);
        Assert.True(gemma.AddBosToken);
        Assert.Equal("<end_of_turn>", gemma.EosToken);
        Assert.Equal(106, gemma.EosId);
        Assert.Equal(105, gemma.TokenId("<start_of_turn>"));
        Assert.Equal(236_743, gemma.TokenId("▁"));
        Assert.Equal(238, gemma.TokenId("<0x00>"));
        Assert.Equal(303, gemma.TokenId("<0x41>"));
        Assert.Contains("<start_of_turn>", gemma.ChatTemplate);
        Assert.True(gemma.IsSpecial(105));
        Assert.False(gemma.IsSpecial(107)); // "\n" is an added token, not a special one
        // Known values: "Hello world" is [9259, 1902] after <bos> in Hugging Face's Gemma 3 tokenizer.
        Assert.Equal([9259, 1902], gemma.Encode("Hello world"));
    }

    [Fact]
    public void Gemma3_writes_spaces_as_lower_blocks_and_unknown_characters_as_byte_pieces()
    {
        var gemma = TestTokenizers.Gemma3;
        // U+10FFFD (private use) is not in the vocabulary: its four UTF-8 bytes F4 8F BF BD become pieces.
        int[] ids = gemma.Encode("\U0010FFFD");
        Assert.Equal(["<0xF4>", "<0x8F>", "<0xBF>", "<0xBD>"], ids.Select(gemma.Token));
        Assert.Equal("\U0010FFFD", gemma.Decode(ids));
        // A character of the vocabulary is one token, its UTF-8 bytes notwithstanding.
        Assert.Equal(gemma.TokenId("中"), gemma.Encode("中").Single());
        // Two spaces are "▁▁" (an added token that BPE also reaches by merging), and decode as spaces again.
        int[] spaces = gemma.Encode("a  b");
        Assert.Equal(["a", "▁▁", "b"], spaces.Select(gemma.Token));
        Assert.Equal("a  b", gemma.Decode(spaces));
        // Newlines and tab runs are non-special added tokens: matched even when special tokens are off.
        Assert.Equal(gemma.TokenId("\n\n\n"), gemma.Encode("\n\n\n", allowSpecialTokens: false).Single());
        Assert.Equal(gemma.TokenId("\t\t"), gemma.Encode("\t\t").Single());
        // Special tokens can be turned off; <bos> then becomes the characters it is made of.
        Assert.Equal(2, gemma.Encode("<bos>").Single());
        int[] plain = gemma.Encode("<bos>", allowSpecialTokens: false);
        Assert.DoesNotContain(plain, gemma.IsSpecial);
        Assert.Equal("<bos>", gemma.Decode(plain));
        Assert.Equal("x", gemma.Decode(gemma.Encode("<bos>x"), skipSpecialTokens: true));
    }

    [Fact]
    public void Special_tokens_are_matched_whole_and_can_be_turned_off()
    {
        var qwen = TestTokenizers.Qwen3;
        const string text = "<|im_start|>user\nHi<|im_end|>";
        int[] withSpecial = qwen.Encode(text);
        Assert.Equal(151_644, withSpecial[0]);
        Assert.Equal(151_645, withSpecial[^1]);
        Assert.Equal(text, qwen.Decode(withSpecial));
        Assert.Equal("user\nHi", qwen.Decode(withSpecial, skipSpecialTokens: true));

        // As text the markers become ordinary tokens ('<', '|', 'im', '_start', ...) that decode to the same string.
        int[] asText = qwen.Encode(text, allowSpecialTokens: false);
        Assert.DoesNotContain(asText, id => qwen.IsSpecial(id));
        Assert.True(asText.Length > withSpecial.Length);
        Assert.Equal(text, qwen.Decode(asText));

        // A non-special added token (<think>) is matched either way, as in Hugging Face's tokenizers.
        Assert.Equal(151_667, qwen.Encode("<think>", allowSpecialTokens: false).Single());

        var llama = TestTokenizers.Llama3;
        Assert.Equal([128_000, 128_006], llama.Encode("<|begin_of_text|><|start_header_id|>"));
        Assert.DoesNotContain(llama.Encode("<|begin_of_text|>", allowSpecialTokens: false), id => id >= 128_000);
    }

    [Theory]
    [InlineData("qwen3")]
    [InlineData("llama3")]
    [InlineData("gemma3")]
    public void Encoding_from_several_threads_gives_the_same_ids(string name)
    {
        var tokenizer = TestTokenizers.Get(name);
        var cases = TestTokenizers.Reference(name);
        var results = new int[cases.Count][];
        Parallel.For(0, cases.Count * 4, i => results[i % cases.Count] = tokenizer.Encode(cases[i % cases.Count].Text));
        for (int i = 0; i < cases.Count; i++)
            Assert.Equal(cases[i].Ids, results[i]);
    }

    [Fact]
    public void Merges_apply_lowest_rank_first_in_either_file_form()
    {
        // "abc": with (b c) ranked before (a b) it is a|bc, the other way round ab|c.
        foreach (bool arrays in new[] { false, true })
        {
            var bcFirst = BpeTokenizer.Load(TestTokenizers.WriteTiny([("b", "c"), ("a", "b")], mergesAsArrays: arrays));
            Assert.Equal(new int[] { 'a', (int)bcFirst.TokenId("bc")! }, bcFirst.Encode("abc"));
            var abFirst = BpeTokenizer.Load(TestTokenizers.WriteTiny([("a", "b"), ("b", "c")], mergesAsArrays: arrays));
            Assert.Equal(new int[] { (int)abFirst.TokenId("ab")!, 'c' }, abFirst.Encode("abc"));
        }

        // Chains of merges, and a space written as 'Ġ' in the vocabulary.
        var tiny = BpeTokenizer.Load(TestTokenizers.WriteTiny([("l", "l"), ("h", "e"), ("he", "ll"), ("hell", "o"), ("Ġ", "w")]));
        Assert.Equal(new int[] { (int)tiny.TokenId("hello")!, (int)tiny.TokenId("Ġw")!, 'o' }, tiny.Encode("hello wo"));
        // Equal ranks go leftmost first: "lll" is ll|l.
        Assert.Equal(new int[] { (int)tiny.TokenId("ll")!, 'l' }, tiny.Encode("lll"));
    }

    [Fact]
    public void Ignore_merges_takes_a_word_in_the_vocabulary_whole()
    {
        var merging = BpeTokenizer.Load(TestTokenizers.WriteTiny([], extraTokens: ["abc"]));
        Assert.Equal(new int[] { 'a', 'b', 'c' }, merging.Encode("abc"));
        var ignoring = BpeTokenizer.Load(TestTokenizers.WriteTiny([], ignoreMerges: true, extraTokens: ["abc"]));
        Assert.Equal(new int[] { (int)ignoring.TokenId("abc")! }, ignoring.Encode("abc"));
    }

    [Fact]
    public void Added_tokens_take_the_longest_match_and_honour_strip_flags()
    {
        string added = """
            [{"id": 300, "content": "<a>", "special": true},
             {"id": 301, "content": "<a><b>", "special": true},
             {"id": 302, "content": "[X]", "special": true, "lstrip": true, "rstrip": true}]
            """;
        var tokenizer = BpeTokenizer.Load(TestTokenizers.WriteTiny([], addedTokensJson: added));
        Assert.Equal(new int[] { 301, '!' }, tokenizer.Encode("<a><b>!"));
        Assert.Equal(new int[] { 300, '<', 'b' }, tokenizer.Encode("<a><b", allowSpecialTokens: true));
        Assert.Equal(new int[] { 'x', 302, 'y' }, tokenizer.Encode("x  [X]  y"));
        Assert.Equal(303, tokenizer.VocabSize);
    }

    [Fact]
    public void SentencePiece_merges_characters_and_falls_back_to_bytes()
    {
        var tiny = BpeTokenizer.Load(TestTokenizers.WriteTinySentencePiece("ehlow",
            [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "w"), ("▁w", "o")]));
        Assert.Equal(BpeMode.SentencePiece, tiny.Mode);
        int Id(string token) => tiny.TokenId(token)!.Value;
        Assert.Equal([Id("hello"), Id("▁wo")], tiny.Encode("hello wo"));
        // 'i' and 'ж' are not in the vocabulary: their UTF-8 bytes become <0x69> and <0xD0><0xB6>.
        int[] ids = tiny.Encode("hi ж");
        Assert.Equal([Id("h"), 0x69, Id("▁"), 0xD0, 0xB6], ids);
        Assert.Equal("hi ж", tiny.Decode(ids));
        // An astral character is one symbol of four bytes; a byte piece cut from its character decodes as U+FFFD.
        Assert.Equal([0xF0, 0x9F, 0x98, 0x80], tiny.Encode("😀"));
        Assert.Equal("\uFFFD", tiny.Decode([0xD0]));
        Assert.Equal("", tiny.Decode(tiny.Encode("")));
    }

    [Fact]
    public void A_prepend_normalizer_adds_a_space_to_each_run_and_a_strip_decoder_takes_it_off()
    {
        // Llama 2's layout: Prepend "▁" then Replace, no pre-tokenizer, Strip(" ", 1, 0) after Fuse.
        string added = """[{"id": 400, "content": "<x>", "special": true, "normalized": false}]""";
        var tiny = BpeTokenizer.Load(TestTokenizers.WriteTinySentencePiece("ehlow",
            [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "w"), ("▁w", "o")], prependAndStrip: true, addedTokensJson: added));
        int Id(string token) => tiny.TokenId(token)!.Value;
        Assert.Equal([Id("▁"), Id("hello"), Id("▁wo")], tiny.Encode("hello wo"));
        // Each run between added tokens is normalized on its own, so each gets its '▁'.
        Assert.Equal([Id("▁"), Id("hello"), 400, Id("▁wo")], tiny.Encode("hello<x>wo"));
        Assert.Empty(tiny.Encode(""));
        Assert.Equal("hello wo", tiny.Decode(tiny.Encode("hello wo")));
        Assert.Equal(" wo", tiny.Decode([Id("▁"), Id("▁wo")])); // only one leading space is stripped
    }

    [Fact]
    public void Many_added_tokens_with_a_common_start_are_matched_longest_first()
    {
        // Gemma's 6,000 <unusedN> tokens share '<' and "<unused": the longest full match wins, and a
        // prefix of a token that does not complete is text.
        var gemma = TestTokenizers.Gemma3;
        Assert.Equal([gemma.TokenId("<unused12>")!.Value], gemma.Encode("<unused12>"));
        Assert.Equal(gemma.TokenId("<unused1>"), gemma.Encode("<unused1>2")[0]);
        Assert.DoesNotContain(gemma.TokenId("<unused1>")!.Value, gemma.Encode("<unused1"));
        Assert.Equal([gemma.TokenId("<table>")!.Value, gemma.TokenId("<tr>")!.Value], gemma.Encode("<table><tr>"));
    }

    [Fact]
    public void Characters_outside_the_basic_plane_count_as_their_category()
    {
        // 𝐀 (U+1D400) is a letter and 𝟙 (U+1D7D9) a number to \p{L} and \p{N}, although .NET sees surrogates.
        var (shadow, map) = RegexSplit.Shadow("x𝐀𝟙y");
        Assert.Equal(4, shadow.Length);
        Assert.True(char.IsLetter(shadow[1]));
        Assert.True(char.IsDigit(shadow[2]));
        Assert.Equal([0, 1, 3, 5, 6], map!);
        Assert.Null(RegexSplit.Shadow("plain").Map);
    }

    [Theory]
    [InlineData(@"a?+b", @"(?>a?)b")]
    [InlineData(@"[^\s\p{L}]++x", @"(?>[^\s\p{L}]+)x")]
    [InlineData(@"(ab)*+|\p{N}{1,3}+", @"(?>(ab)*)|(?>\p{N}{1,3})")]
    [InlineData(@"\x{1F600}", @"\uD83D\uDE00")]
    [InlineData(TestTokenizers.QwenPattern, TestTokenizers.QwenPattern)]
    [InlineData(@"a+?b*", @"a+?b*")]
    public void Oniguruma_patterns_are_translated_for_dotnet(string pattern, string expected) =>
        Assert.Equal(expected, RegexSplit.TranslatePattern(pattern));

    [Fact]
    public void A_file_that_is_not_json_names_the_file()
    {
        string path = Path.Combine(Directory.CreateTempSubdirectory("tokenizer-test-").FullName, "tokenizer.json");
        File.WriteAllText(path, "{\"model\": {\"type\": \"BPE\", \"vocab\": {");
        var e = Assert.Throws<TokenizerException>(() => BpeTokenizer.Load(path));
        Assert.StartsWith(path + ": not valid JSON at line 1", e.Message);
        Assert.Equal(path, e.Path);
    }

    [Theory]
    [InlineData("unigram", "model.type is 'Unigram'; only BPE tokenizers")]
    [InlineData("wordpiece", "model.type is 'WordPiece'")]
    [InlineData("metaspace", "pre_tokenizer.pretokenizers[1].type is 'Metaspace'")]
    [InlineData("no-byte-level", "pre_tokenizer has no ByteLevel step and model.byte_fallback is not true")]
    [InlineData("decoder", "decoder.type is 'Metaspace'")]
    [InlineData("normalizer", "normalizer.type is 'Precompiled'")]
    [InlineData("merge-unknown", "model.merges[0] (h q9) uses a token that model.vocab does not have")]
    [InlineData("merge-one-token", "model.merges[0] is \"he\", not two tokens")]
    [InlineData("merge-number", "model.merges[0] is 7, neither")]
    [InlineData("byte-fallback", "model.byte_fallback is true, which is for SentencePiece-style BPE, but the pre-tokenizer has a ByteLevel step")]
    [InlineData("no-vocab", "model.vocab is missing or not an object")]
    [InlineData("missing-byte", "model.vocab has no token for the byte 0x41 ('A')")]
    [InlineData("bad-pattern", "pre_tokenizer.pretokenizers[0].pattern [a cannot be used")]
    public void An_unsupported_or_broken_file_is_refused_with_the_reason(string change, string message)
    {
        Action<JsonObject> edit = change switch
        {
            "unigram" => j => j["model"]!["type"] = "Unigram",
            "wordpiece" => j => j["model"]!["type"] = "WordPiece",
            "metaspace" => j => j["pre_tokenizer"]!["pretokenizers"]![1]!["type"] = "Metaspace",
            "no-byte-level" => j => j["pre_tokenizer"]!["pretokenizers"]!.AsArray().RemoveAt(1),
            "decoder" => j => j["decoder"]!["type"] = "Metaspace",
            "normalizer" => j => j["normalizer"] = new JsonObject { ["type"] = "Precompiled" },
            "merge-unknown" => j => j["model"]!["merges"]![0] = "h q9",
            "merge-one-token" => j => j["model"]!["merges"]![0] = "he",
            "merge-number" => j => j["model"]!["merges"]![0] = 7,
            "byte-fallback" => j => j["model"]!["byte_fallback"] = true,
            "no-vocab" => j => j["model"]!.AsObject().Remove("vocab"),
            "missing-byte" => j => j["model"]!["vocab"]!.AsObject().Remove("A"),
            "bad-pattern" => j => j["pre_tokenizer"]!["pretokenizers"]![0]!["pattern"]!["Regex"] = "[a",
            _ => throw new ArgumentException(change),
        };
        string path = TestTokenizers.WriteTiny([("h", "e")], edit: edit);
        var e = Assert.Throws<TokenizerException>(() => BpeTokenizer.Load(path));
        Assert.StartsWith(path + ": ", e.Message);
        Assert.Contains(message, e.Message);
    }

    [Theory]
    [InlineData("no-decoder", "decoder is missing; SentencePiece-style BPE needs one")]
    [InlineData("metaspace-decoder", "decoder.decoders[0].type is 'Metaspace'; the decoders supported for SentencePiece-style BPE")]
    [InlineData("strip-before-fuse", "decoder.decoders[0] (Strip) comes before Fuse")]
    [InlineData("regex-decoder", "decoder.decoders[0].pattern is not a non-empty String")]
    [InlineData("missing-byte-piece", "model.vocab has no byte piece <0x41>, which model.byte_fallback needs for the byte 0x41.")]
    [InlineData("byte-level-step", "but the pre-tokenizer has a ByteLevel step")]
    [InlineData("metaspace", "pre_tokenizer.type is 'Metaspace'")]
    [InlineData("precompiled", "normalizer.type is 'Precompiled'")]
    [InlineData("replace-no-content", "normalizer (Replace) has no content")]
    [InlineData("fallback-not-bool", "model.byte_fallback is not true or false")]
    public void An_unsupported_or_broken_sentencepiece_file_is_refused_with_the_reason(string change, string message)
    {
        Action<JsonObject> edit = change switch
        {
            "no-decoder" => j => j["decoder"] = null,
            "metaspace-decoder" => j => j["decoder"]!["decoders"]![0]!["type"] = "Metaspace",
            "strip-before-fuse" => j => j["decoder"]!["decoders"]![0] = JsonNode.Parse("""{"type": "Strip", "content": " ", "start": 1, "stop": 0}"""),
            "regex-decoder" => j => j["decoder"]!["decoders"]![0]!["pattern"] = JsonNode.Parse("""{"Regex": "▁"}"""),
            "missing-byte-piece" => j => j["model"]!["vocab"]!.AsObject().Remove("<0x41>"),
            "byte-level-step" => j => j["pre_tokenizer"] = JsonNode.Parse("""{"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}"""),
            "metaspace" => j => j["pre_tokenizer"] = JsonNode.Parse("""{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}"""),
            "precompiled" => j => j["normalizer"] = JsonNode.Parse("""{"type": "Precompiled", "precompiled_charsmap": ""}"""),
            "replace-no-content" => j => j["normalizer"]!.AsObject().Remove("content"),
            "fallback-not-bool" => j => j["model"]!["byte_fallback"] = "yes",
            _ => throw new ArgumentException(change),
        };
        string path = TestTokenizers.WriteTinySentencePiece("ab", [("a", "b")], edit: edit);
        var e = Assert.Throws<TokenizerException>(() => BpeTokenizer.Load(path));
        Assert.StartsWith(path + ": ", e.Message);
        Assert.Contains(message, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void A_missing_file_is_named()
    {
        var e = Assert.Throws<TokenizerException>(() => BpeTokenizer.Load("/nonexistent/tokenizer.json"));
        Assert.Equal("/nonexistent/tokenizer.json: the file does not exist.", e.Message);
    }

    [Fact]
    public void Config_beside_the_file_gives_bos_eos_and_add_bos()
    {
        string path = TestTokenizers.WriteTiny([], extraTokens: [],
            addedTokensJson: """[{"id": 256, "content": "<s>", "special": true}, {"id": 257, "content": "</s>", "special": true}]""",
            configJson: """{"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "add_bos_token": true}""");
        var tokenizer = BpeTokenizer.Load(path);
        Assert.Equal("<s>", tokenizer.BosToken);
        Assert.Equal(256, tokenizer.BosId);
        Assert.Equal(257, tokenizer.EosId);
        Assert.True(tokenizer.AddBosToken);
        Assert.Null(tokenizer.ChatTemplate);
    }

    [Fact]
    public void A_template_post_processor_that_starts_with_bos_means_add_bos()
    {
        // Meta's Llama 3.1/3.2 files: no add_bos_token in the config, BOS put first by TemplateProcessing.
        const string added = """[{"id": 300, "content": "<|begin_of_text|>", "special": true}]""";
        static void Template(JsonObject j) => j["post_processor"] = JsonNode.Parse("""
            {"type": "Sequence", "processors": [
              {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
              {"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [], "special_tokens": {}}]}
            """);
        const string config = """{"bos_token": "<|begin_of_text|>", "eos_token": null}""";
        Assert.True(BpeTokenizer.Load(TestTokenizers.WriteTiny([], addedTokensJson: added, configJson: config, edit: Template)).AddBosToken);
        Assert.False(BpeTokenizer.Load(TestTokenizers.WriteTiny([], addedTokensJson: added, configJson: config)).AddBosToken);
        const string refuse = """{"bos_token": "<|begin_of_text|>", "add_bos_token": false}""";
        Assert.False(BpeTokenizer.Load(TestTokenizers.WriteTiny([], addedTokensJson: added, configJson: refuse, edit: Template)).AddBosToken);
    }

    private static string Escape(string text) => System.Text.Json.JsonSerializer.Serialize(text);
}
