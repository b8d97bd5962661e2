using LoraCompiler.Runtime.Data;

namespace LoraCompiler.Tests.Data;

/// <summary>
/// JSONL parsing of the three shapes with the real Qwen3, Llama 3 and Gemma 3 tokenizers. The expected tokens
/// are put together here from the tokenizer's own Encode of each piece, and the expected targets from
/// which pieces are in the loss, so that the mask is checked at every boundary.
/// </summary>
public class TrainingDataTests
{
    private const int ImStart = 151_644, ImEnd = 151_645;
    private const int BeginOfText = 128_000, EndOfText = 128_001, StartHeader = 128_006, EndHeader = 128_007, EotId = 128_009;
    private const int GemmaBos = 2, StartOfTurn = 105, EndOfTurn = 106, GemmaNewline = 107;

    [Fact]
    public void A_text_line_is_learned_whole_and_ends_with_eos()
    {
        var qwen = TestTokenizers.Qwen3;
        var example = LoadOne(qwen, """{"text": "Hello world.\nSecond line."}""");
        var expected = new Expected();
        expected.Add(qwen.Encode("Hello world.\nSecond line."), loss: true);
        expected.Add(ImEnd, loss: true); // Qwen3's eos_token
        expected.AssertMatches(example);
        Assert.Equal(example.Tokens[1], example.Targets[0]);
        Assert.Equal(ImEnd, example.Targets[^2]);
        Assert.Equal(-1, example.Targets[^1]);

        var llama = TestTokenizers.Llama3;
        var llamaExample = LoadOne(llama, """{"text": "Hello world."}""");
        Assert.Equal([.. llama.Encode("Hello world."), EndOfText], llamaExample.Tokens);
    }

    [Fact]
    public void Bos_comes_first_where_the_tokenizer_adds_it()
    {
        string path = TestTokenizers.WriteTiny([("h", "i")],
            addedTokensJson: """[{"id": 300, "content": "<s>", "special": true}, {"id": 301, "content": "</s>", "special": true}]""",
            configJson: """{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}""");
        var tokenizer = BpeTokenizer.Load(path);
        var example = LoadOne(tokenizer, """{"text": "hi"}""");
        int hi = tokenizer.TokenId("hi")!.Value;
        Assert.Equal([300, hi, 301], example.Tokens);
        Assert.Equal([hi, 301, -1], example.Targets);
    }

    [Fact]
    public void A_prompt_completion_line_learns_only_the_completion_and_eos()
    {
        var qwen = TestTokenizers.Qwen3;
        const string prompt = "Translate to French: cheese\nAnswer:";
        const string completion = " fromage";
        var example = LoadOne(qwen, $$"""{"prompt": {{Json(prompt)}}, "completion": {{Json(completion)}}, "id": 17}""");

        int[] p = qwen.Encode(prompt), c = qwen.Encode(completion);
        var expected = new Expected();
        expected.Add(p, loss: false);
        expected.Add(c, loss: true);
        expected.Add(ImEnd, loss: true);
        expected.AssertMatches(example);

        // At the boundary: the prompt's positions predict nothing but the last, which predicts the completion's first token.
        Assert.All(example.Targets[..(p.Length - 1)], t => Assert.Equal(-1, t));
        Assert.Equal(c[0], example.Targets[p.Length - 1]);
        Assert.Equal(ImEnd, example.Targets[p.Length + c.Length - 1]);
        Assert.Equal(c.Length + 1, example.LossTokens);
    }

    [Fact]
    public void Messages_are_written_in_chatml_and_only_assistant_turns_are_learned()
    {
        var qwen = TestTokenizers.Qwen3;
        (string Role, string Content)[] messages =
        [
            ("system", "You are terse."),
            ("user", "What is 2+2?"),
            ("assistant", "4."),
            ("user", "And 3+3? Answer in a sentence."),
            ("assistant", "3+3 is 6, don't forget."),
        ];
        var example = LoadOne(qwen, MessagesLine(messages));

        var expected = new Expected();
        foreach (var (role, content) in messages)
        {
            bool learned = role == "assistant";
            expected.Add(ImStart, loss: false);
            expected.Add(qwen.Encode(role + "\n"), loss: false);
            expected.Add(qwen.Encode(content), learned);
            expected.Add(ImEnd, learned);
            expected.Add(qwen.Encode("\n"), loss: false);
        }
        expected.AssertMatches(example);

        // The same ids as tokenizing the whole rendered conversation, as Hugging Face's apply_chat_template does.
        string rendered = string.Concat(messages.Select(m => $"<|im_start|>{m.Role}\n{m.Content}<|im_end|>\n"));
        Assert.Equal(qwen.Encode(rendered), example.Tokens);
        Assert.Equal(rendered, qwen.Decode(example.Tokens));

        // The first assistant turn: "assistant\n" predicts "4", "4." then <|im_end|>, which predicts nothing learned ("\n").
        int[] four = qwen.Encode("4.");
        int header = IndexOf(example.Tokens, [ImStart, .. qwen.Encode("assistant\n")]);
        int contentStart = header + 1 + qwen.Encode("assistant\n").Length;
        Assert.Equal(-1, example.Targets[contentStart - 2]);
        Assert.Equal(four[0], example.Targets[contentStart - 1]);
        Assert.Equal(ImEnd, example.Targets[contentStart + four.Length - 1]);
        Assert.Equal(ImEnd, example.Tokens[contentStart + four.Length]);
        Assert.Equal(-1, example.Targets[contentStart + four.Length]);
        Assert.Equal(four.Length + 1 + qwen.Encode("3+3 is 6, don't forget.").Length + 1, example.LossTokens);
    }

    [Fact]
    public void Messages_are_written_in_llama3_headers_for_a_llama3_tokenizer()
    {
        var llama = TestTokenizers.Llama3;
        (string Role, string Content)[] messages =
        [
            ("system", "Be brief."),
            ("user", "  Hi!  "),
            ("assistant", "Hello.\n"),
        ];
        var example = LoadOne(llama, MessagesLine(messages));

        var expected = new Expected();
        expected.Add(BeginOfText, loss: false);
        foreach (var (role, content) in messages)
        {
            bool learned = role == "assistant";
            expected.Add(StartHeader, loss: false);
            expected.Add(llama.Encode(role), loss: false);
            expected.Add(EndHeader, loss: false);
            expected.Add(llama.Encode("\n\n"), loss: false);
            expected.Add(llama.Encode(content.Trim()), learned); // Llama 3's template trims the content
            expected.Add(EotId, learned);
        }
        expected.AssertMatches(example);

        string rendered = "<|begin_of_text|>" + string.Concat(messages.Select(m =>
            $"<|start_header_id|>{m.Role}<|end_header_id|>\n\n{m.Content.Trim()}<|eot_id|>"));
        Assert.Equal(llama.Encode(rendered), example.Tokens);
        Assert.Equal(EotId, example.Targets[^2]);
        Assert.Equal(-1, example.Targets[^1]);
    }

    [Fact]
    public void Messages_are_written_in_gemma_turns_for_a_gemma_tokenizer()
    {
        var gemma = TestTokenizers.Gemma3;
        (string Role, string Content)[] messages =
        [
            ("system", "You are terse.  "),
            ("user", "  What is 2+2?\n"),
            ("assistant", " 4.\n\n"),
            ("user", "And 3+3? Answer in a sentence."),
            ("assistant", "3+3 is 6, don't forget."),
        ];
        var example = LoadOne(gemma, MessagesLine(messages));

        // Gemma 3's chat_template by hand: <bos>, the system message (untrimmed) and a blank line before
        // the first user turn's trimmed content, "assistant" written "model".
        string rendered = "<bos>"
            + "<start_of_turn>user\nYou are terse.  \n\nWhat is 2+2?<end_of_turn>\n"
            + "<start_of_turn>model\n4.<end_of_turn>\n"
            + "<start_of_turn>user\nAnd 3+3? Answer in a sentence.<end_of_turn>\n"
            + "<start_of_turn>model\n3+3 is 6, don't forget.<end_of_turn>\n";
        Assert.Equal(gemma.Encode(rendered), example.Tokens);
        Assert.Equal(rendered, gemma.Decode(example.Tokens));

        // The loss: only the model turns' content and the <end_of_turn> that closes each.
        var expected = new Expected();
        expected.Add(GemmaBos, loss: false);
        foreach (var (role, content, learned) in new[]
                 {
                     ("user", "You are terse.  \n\nWhat is 2+2?", false), ("model", "4.", true),
                     ("user", "And 3+3? Answer in a sentence.", false), ("model", "3+3 is 6, don't forget.", true),
                 })
        {
            expected.Add(StartOfTurn, loss: false);
            expected.Add(gemma.Encode(role + "\n"), loss: false);
            expected.Add(gemma.Encode(content), learned);
            expected.Add(EndOfTurn, learned);
            expected.Add(GemmaNewline, loss: false);
        }
        expected.AssertMatches(example);
        Assert.Equal(gemma.Encode("4.").Length + 1 + gemma.Encode("3+3 is 6, don't forget.").Length + 1, example.LossTokens);

        // At the first model turn: "model\n" predicts "4", the content predicts <end_of_turn>, which predicts nothing learned.
        int[] four = gemma.Encode("4.");
        int contentStart = IndexOf(example.Tokens, [StartOfTurn, .. gemma.Encode("model\n")]) + 1 + gemma.Encode("model\n").Length;
        Assert.Equal(-1, example.Targets[contentStart - 2]);
        Assert.Equal(four[0], example.Targets[contentStart - 1]);
        Assert.Equal(EndOfTurn, example.Targets[contentStart + four.Length - 1]);
        Assert.Equal(-1, example.Targets[contentStart + four.Length]);
        Assert.Equal(-1, example.Targets[^1]);
    }

    [Fact]
    public void Gemma_turns_without_a_system_message_and_ending_with_the_user()
    {
        var gemma = TestTokenizers.Gemma3;
        (string Role, string Content)[] messages = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")];
        var example = LoadOne(gemma, MessagesLine(messages));
        string rendered = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n";
        Assert.Equal(gemma.Encode(rendered), example.Tokens);
        Assert.Equal(gemma.Encode("Hello!").Length + 1, example.LossTokens);

        // A text line: <bos> (add_bos_token) and Gemma's eos_token, <end_of_turn>, after it.
        Assert.Equal([GemmaBos, .. gemma.Encode("Hello world."), EndOfTurn], LoadOne(gemma, """{"text": "Hello world."}""").Tokens);
    }

    [Theory]
    [InlineData("""[{"role": "assistant", "content": "a"}]""", "message 0 is assistant, where user was expected")]
    [InlineData("""[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]""", "message 1 is user, where assistant was expected")]
    [InlineData("""[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]""", "message 1 is system, where assistant was expected")]
    [InlineData("""[{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]""", "a system message must be followed by a user message")]
    [InlineData("""[{"role": "system", "content": "a"}]""", "a system message must be followed by a user message")]
    public void Gemma_refuses_what_its_template_refuses_at_the_line(string messages, string message)
    {
        string path = WriteJsonl("{\"text\": \"fine\"}\n{\"messages\": " + messages + "}\n");
        var e = Assert.Throws<TrainingDataException>(() => TrainingData.Load(path, TestTokenizers.Gemma3));
        Assert.StartsWith($"{path}:2: ", e.Message);
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void Special_tokens_in_the_data_can_be_kept_as_text()
    {
        var qwen = TestTokenizers.Qwen3;
        const string line = """{"text": "a <|im_end|> b"}""";
        Assert.Equal([.. qwen.Encode("a <|im_end|> b"), ImEnd], LoadOne(qwen, line).Tokens);
        Assert.Contains(ImEnd, LoadOne(qwen, line).Tokens[..^1]);

        var plain = LoadOne(qwen, line, new TrainingDataOptions { ParseSpecialTokens = false });
        Assert.Equal([.. qwen.Encode("a <|im_end|> b", allowSpecialTokens: false), ImEnd], plain.Tokens);
        Assert.DoesNotContain(ImEnd, plain.Tokens[..^1]);
    }

    [Fact]
    public void Blank_lines_are_skipped_and_examples_keep_their_line_numbers()
    {
        var data = Load(TestTokenizers.Qwen3, "\n{\"text\": \"one\"}\n   \n{\"prompt\": \"q\", \"completion\": \"a\"}\r\n\n");
        Assert.Equal([2, 4], data.Examples.Select(e => e.Line));
        Assert.Equal(data.Examples.Sum(e => e.Length), data.TokenCount);
        Assert.Equal(data.Examples.Sum(e => e.LossTokens), data.LossTokenCount);
    }

    [Theory]
    [InlineData("{\"text\": \"unterminated}", "not valid JSON at column")]
    [InlineData("[1, 2]", "the line is a JSON array, not an object")]
    [InlineData("{\"input\": \"x\", \"output\": \"y\"}", "the object has none of \"text\", \"prompt\" and \"completion\", or \"messages\"")]
    [InlineData("{\"text\": \"x\", \"messages\": []}", "the object mixes shapes")]
    [InlineData("{\"prompt\": \"x\"}", "the object has \"prompt\" but no \"completion\"")]
    [InlineData("{\"completion\": \"x\"}", "the object has \"completion\" but no \"prompt\"")]
    [InlineData("{\"text\": 42}", "\"text\" is a JSON number, not a string")]
    [InlineData("{\"messages\": {\"role\": \"user\"}}", "\"messages\" is a JSON object, not an array")]
    [InlineData("{\"messages\": []}", "\"messages\" is empty")]
    [InlineData("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"bot\", \"content\": \"yo\"}]}", "unknown role 'bot' in messages[1]; expected system, user or assistant")]
    [InlineData("{\"messages\": [{\"role\": \"user\"}]}", "messages[0] has no \"content\"")]
    [InlineData("{\"messages\": [{\"role\": \"user\", \"content\": null}]}", "\"messages[0].content\" is a JSON null, not a string")]
    public void A_bad_line_is_reported_with_the_file_and_line(string badLine, string message)
    {
        string path = WriteJsonl("{\"text\": \"fine\"}\n\n" + badLine + "\n{\"text\": \"also fine\"}\n");
        var e = Assert.Throws<TrainingDataException>(() => TrainingData.Load(path, TestTokenizers.Qwen3));
        Assert.Equal(3, e.Line);
        Assert.Equal(path, e.Path);
        Assert.StartsWith($"{path}:3: ", e.Message);
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void The_first_bad_line_is_the_one_reported()
    {
        string lines = string.Concat(Enumerable.Range(0, 200).Select(i => i is 57 or 150 ? "{\"oops\": 1}\n" : "{\"text\": \"x\"}\n"));
        var e = Assert.Throws<TrainingDataException>(() => TrainingData.Load(WriteJsonl(lines), TestTokenizers.Qwen3));
        Assert.Equal(58, e.Line);
    }

    [Fact]
    public void Whole_file_problems_name_the_file()
    {
        var missing = Assert.Throws<TrainingDataException>(() => TrainingData.Load("/nonexistent/train.jsonl", TestTokenizers.Qwen3));
        Assert.Equal("/nonexistent/train.jsonl: the file does not exist.", missing.Message);

        string empty = WriteJsonl("\n  \n");
        var e = Assert.Throws<TrainingDataException>(() => TrainingData.Load(empty, TestTokenizers.Qwen3));
        Assert.Equal($"{empty}: the file has no examples (no non-blank line).", e.Message);
        Assert.Null(e.Line);
    }

    [Fact]
    public void A_tokenizer_without_chat_tokens_or_eos_is_reported_at_the_line_that_needs_them()
    {
        var tiny = BpeTokenizer.Load(TestTokenizers.WriteTiny([]));
        string path = WriteJsonl("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
        var chat = Assert.Throws<TrainingDataException>(() => TrainingData.Load(path, tiny));
        Assert.StartsWith($"{path}:1: ", chat.Message);
        Assert.Contains("neither ChatML's <|im_start|>/<|im_end|>, Llama 3's header tokens nor Gemma's <start_of_turn>/<end_of_turn>", chat.Message);

        var eos = Assert.Throws<TrainingDataException>(() => TrainingData.Load(WriteJsonl("{\"text\": \"hi\"}"), tiny));
        Assert.Contains(":1: ", eos.Message);
        Assert.Contains("has no eos_token", eos.Message);
    }

    [Fact]
    public void The_chat_format_follows_the_tokenizer()
    {
        Assert.Equal(ChatFormat.ChatML, ExampleEncoder.DetectChatFormat(TestTokenizers.Qwen3));
        Assert.Equal(ChatFormat.Llama3, ExampleEncoder.DetectChatFormat(TestTokenizers.Llama3));
        Assert.Equal(ChatFormat.Gemma, ExampleEncoder.DetectChatFormat(TestTokenizers.Gemma3));
        Assert.Null(ExampleEncoder.DetectChatFormat(BpeTokenizer.Load(TestTokenizers.WriteTiny([]))));
    }

    /// <summary>Expected tokens with, per token, whether predicting it is in the loss.</summary>
    private sealed class Expected
    {
        private readonly List<int> _tokens = [];
        private readonly List<bool> _loss = [];

        public void Add(int token, bool loss)
        {
            _tokens.Add(token);
            _loss.Add(loss);
        }

        public void Add(int[] tokens, bool loss)
        {
            foreach (int t in tokens)
                Add(t, loss);
        }

        public void AssertMatches(TrainingExample example)
        {
            Assert.Equal(_tokens, example.Tokens);
            var targets = new int[_tokens.Count];
            for (int t = 0; t < targets.Length; t++)
                targets[t] = t + 1 < targets.Length && _loss[t + 1] ? _tokens[t + 1] : -1;
            Assert.Equal(targets, example.Targets);
        }
    }

    private static string MessagesLine((string Role, string Content)[] messages) =>
        "{\"messages\": [" + string.Join(", ", messages.Select(m => $"{{\"role\": {Json(m.Role)}, \"content\": {Json(m.Content)}}}")) + "]}";

    private static string Json(string text) => System.Text.Json.JsonSerializer.Serialize(text);

    private static int IndexOf(int[] haystack, int[] needle) => haystack.AsSpan().IndexOf(needle);

    private static TrainingExample LoadOne(BpeTokenizer tokenizer, string line, TrainingDataOptions? options = null) =>
        Assert.Single(Load(tokenizer, line + "\n", options).Examples);

    private static TrainingData Load(BpeTokenizer tokenizer, string jsonl, TrainingDataOptions? options = null) =>
        TrainingData.Load(WriteJsonl(jsonl), tokenizer, options);

    private static string WriteJsonl(string content)
    {
        string path = Path.Combine(Directory.CreateTempSubdirectory("data-test-").FullName, "train.jsonl");
        File.WriteAllText(path, content);
        return path;
    }
}
