using System.Diagnostics;
using System.Text;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Data;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using LoraCompiler.Tests.Cli;
using LoraCompiler.Tests.Training;

namespace LoraCompiler.Tests.Data;

/// <summary>
/// Data that would be silently wrong or lost: examples past --seq (counted and said at the start),
/// text files read as bytes where a tokenizer exists, invalid UTF-8, an adapter of other modules, and
/// data with nothing to learn (one clear error).
/// </summary>
[Collection(ConsoleOutputCollection.Name)]
public class DataLossTests
{
    private const int ImStart = 281, ImEnd = 282;

    /// <summary>A byte-level tokenizer for the tiny models (vocabularies of 288 to 320) with ChatML's two tokens, EOS &lt;|im_end|&gt;.</summary>
    private static string ChatTokenizer() => TestTokenizers.WriteTiny([("t", "h"), ("th", "e")],
        addedTokensJson: $$"""[{"id": {{ImStart}}, "content": "<|im_start|>", "special": true}, {"id": {{ImEnd}}, "content": "<|im_end|>", "special": true}]""",
        configJson: """{"eos_token": "<|im_end|>"}""");

    private static string Chat(string user, string? assistant) =>
        assistant is null
            ? $$"""{"messages": [{"role": "user", "content": "{{user}}"}]}"""
            : $$"""{"messages": [{"role": "user", "content": "{{user}}"}, {"role": "assistant", "content": "{{assistant}}"}]}""";

    [Fact]
    public void Coverage_counts_the_examples_cut_and_dropped_and_the_loss_tokens_lost()
    {
        // Lengths 4 (fits), 10 with its loss at 2..8 (cut at 6: rows 2..5 kept), 10 with its loss at 7..8 (dropped), 3 with none.
        TrainingExample Example(int length, int from, int to) => new(
            Enumerable.Range(0, length).ToArray(),
            Enumerable.Range(0, length).Select(t => t >= from && t <= to ? t + 1 : -1).ToArray(), Line: length);
        var examples = new[] { Example(4, 0, 2), Example(10, 2, 8), Example(10, 7, 8), Example(3, 9, 9) };

        var coverage = DataCoverage.Of(examples, maxLength: 6);
        Assert.Equal(new DataCoverage(Examples: 4, Cut: 1, Dropped: 1, WithoutLoss: 1, LossTokens: 3 + 7 + 2, LostLossTokens: 3 + 2,
            MaxLength: 6, LongestExample: 10), coverage);
        Assert.Equal(7, coverage.LearnedLossTokens);
        Assert.Equal("1 of 4 examples is dropped (all they learn lies past the first 6 tokens), 1 of 4 examples is cut at 6 tokens, " +
                     "1 of 4 examples has no token in the loss (a conversation needs an assistant turn), so 5 of the 12 tokens in the loss " +
                     "(41.7%) are never learned; the longest example has 10 tokens", coverage.Describe());

        // What the packer really yields agrees: the loss tokens of one epoch are the learned ones.
        var packer = new SequencePacker(examples, 6, PackingMode.Pack, shuffle: false);
        Assert.Equal(coverage.LearnedLossTokens, packer.Next(packer.CountSequences(0)).Sum(s => s.Targets.Count(t => t >= 0)));

        Assert.StartsWith("1 of 4 examples has no token in the loss", DataCoverage.Of(examples, 10).Describe()!, StringComparison.Ordinal);
        Assert.True(DataCoverage.Of(examples[..2], 10).Complete);
        Assert.Null(DataCoverage.Of(examples[..2], 10).Describe());
        Assert.Equal(0, DataCoverage.Of(examples, 6, PackingMode.Concatenate).LostLossTokens); // nothing is cut
    }

    [Fact]
    public void Train_and_eval_say_at_the_start_how_many_examples_and_loss_tokens_seq_loses()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 81, sequence: 4);
        string tokenizer = ChatTokenizer();
        string data = Path.Combine(fixture.Dir, "chat.jsonl");
        // 20 conversations: 12 short ones that fit in 32 tokens, 5 whose answer is cut, 3 whose answer starts past 32.
        File.WriteAllLines(data, [
            .. Enumerable.Range(0, 12).Select(i => Chat($"q{i}", "ok")),
            .. Enumerable.Range(0, 5).Select(i => Chat("a question", "a long answer that goes on past the end")),
            .. Enumerable.Range(0, 3).Select(i => Chat("a question that is far too long to leave room for its answer", "yes")),
        ]);
        var examples = TrainingData.Load(data, BpeTokenizer.Load(tokenizer));
        var coverage = examples.Coverage(32);
        Assert.Equal((20, 5, 3, 0), (coverage.Examples, coverage.Cut, coverage.Dropped, coverage.WithoutLoss));

        var (code, output, error) = Run(() => Commands.Train(new Args(["--model", model.Name, "--weights", fixture.WeightsPath,
            "--data", data, "--tokenizer", tokenizer, "--out", Path.Combine(fixture.Dir, "run"), "--steps", "1", "--seq", "32"])));
        Assert.Equal(0, code);
        string warning = $"warning: {data}: at --seq 32, 3 of 20 examples are dropped (all they learn lies past the first 32 tokens), " +
                         $"5 of 20 examples are cut at 32 tokens, so {coverage.LostLossTokens:N0} of the {coverage.LossTokens:N0} tokens in the loss";
        Assert.Contains(error, l => l.StartsWith(warning, StringComparison.Ordinal));
        // The header says so too, not only "20 examples".
        Assert.Contains(output, l => l.StartsWith("Training ", StringComparison.Ordinal)
                                     && l.Contains($"{coverage.LearnedLossTokens:N0} of their {coverage.LossTokens:N0} in the loss within reach (3 examples dropped, 5 cut)"));

        (code, output, error) = Run(() => Eval.Run(new Args(["--model", model.Name, "--weights", fixture.WeightsPath,
            "--data", data, "--tokenizer", tokenizer, "--seq", "32", "--json"])));
        Assert.Equal(0, code);
        Assert.Contains(error, l => l.StartsWith(warning, StringComparison.Ordinal));
        Assert.EndsWith($"\"tokens\": {coverage.LearnedLossTokens}}}", output[^1]);

        // Nothing lost, nothing said.
        (code, _, error) = Run(() => Eval.Run(new Args(["--model", model.Name, "--weights", fixture.WeightsPath,
            "--data", data, "--tokenizer", tokenizer, "--seq", $"{coverage.LongestExample}"])));
        Assert.Equal(0, code);
        Assert.DoesNotContain(error, l => l.StartsWith("warning:", StringComparison.Ordinal));
    }

    [Fact]
    public void Data_with_nothing_to_learn_is_one_error()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 83, sequence: 4);
        string tokenizer = ChatTokenizer();
        string noAssistant = Path.Combine(fixture.Dir, "questions.jsonl");
        File.WriteAllLines(noAssistant, [Chat("one?", null), Chat("two?", null), Chat("three?", null)]);
        string allPast = Path.Combine(fixture.Dir, "long.jsonl");
        File.WriteAllLines(allPast, [Chat("a question that is far too long to leave room", "yes"), Chat("another question that is long too", "no")]);
        string[] Train(string data) => ["--model", model.Name, "--weights", fixture.WeightsPath, "--data", data, "--tokenizer", tokenizer,
            "--out", Path.Combine(fixture.Dir, "run-" + Path.GetFileNameWithoutExtension(data)), "--steps", "1", "--seq", "16"];

        var e = Assert.Throws<TrainingDataException>(() => Run(() => Commands.Train(new Args(Train(noAssistant)))));
        Assert.Equal($"{noAssistant}: nothing to learn: none of the 3 examples has a token in the loss (a conversation needs an assistant turn).", e.Message);
        e = Assert.Throws<TrainingDataException>(() => Run(() => Commands.Train(new Args(Train(allPast)))));
        Assert.StartsWith($"{allPast}: nothing to learn within sequences of 16 tokens: all 2 examples are dropped (all they learn lies past the first 16 tokens)", e.Message);
        // As validation data and for eval: nothing to score.
        e = Assert.Throws<TrainingDataException>(() => Run(() => Eval.Run(new Args(["--model", model.Name, "--weights", fixture.WeightsPath,
            "--data", noAssistant, "--tokenizer", tokenizer, "--seq", "16"]))));
        Assert.StartsWith($"{noAssistant}: nothing to score: none of the 3 examples", e.Message);
        Assert.Throws<TrainingDataException>(() => EvaluationData.Packed(TrainingData.Load(allPast, BpeTokenizer.Load(tokenizer)), 16));

        // A text file shorter than one window.
        string shortText = Path.Combine(fixture.Dir, "short.txt");
        File.WriteAllText(shortText, "too short");
        e = Assert.Throws<TrainingDataException>(() => Run(() => Commands.Train(new Args(Train(shortText)))));
        Assert.Equal($"{shortText}: nothing to learn at --seq 16: the file has {TrainingData.LoadText(shortText, BpeTokenizer.Load(tokenizer)).Length} tokens " +
                     $"(tokenized by {tokenizer}), fewer than one window of 16 and the token after it.", e.Message);

        // The command line: one line, exit code 1, no stack trace.
        var (code, stdout, stderr) = Lora(["train", .. Train(noAssistant)]);
        Assert.Equal(1, code);
        Assert.Equal($"error: {noAssistant}: nothing to learn: none of the 3 examples has a token in the loss (a conversation needs an assistant turn).", stderr.Trim());
        Assert.DoesNotContain("   at ", stdout + stderr);
    }

    [Fact]
    public void Invalid_utf8_in_jsonl_is_an_error_with_the_file_and_line()
    {
        var tokenizer = BpeTokenizer.Load(ChatTokenizer());
        string dir = Directory.CreateTempSubdirectory("data-test-").FullName;
        string path = Path.Combine(dir, "latin1.jsonl");
        // Line 3 (after a CRLF and a blank line) holds "café" in Latin-1: 0xE9 then a quote, not UTF-8.
        File.WriteAllBytes(path, [.. "{\"text\": \"one\"}\r\n\n"u8, .. "{\"text\": \"caf"u8, 0xE9, .. "\"}\n"u8]);
        var e = Assert.Throws<TrainingDataException>(() => TrainingData.Load(path, tokenizer));
        Assert.Equal(3, e.Line);
        Assert.Equal($"{path}:3: not valid UTF-8 at byte 14 of the line (0xE9 0x22 0x7D); the file must be UTF-8 text (convert it, e.g. with iconv -t UTF-8).", e.Message);

        // A sequence cut at the end of the file, and a UTF-16 file.
        File.WriteAllBytes(path, [.. "{\"text\": \"ok\"}\n{\"text\": \"x\"}"u8, 0xE2, 0x82]);
        Assert.Equal(2, Assert.Throws<TrainingDataException>(() => TrainingData.Load(path, tokenizer)).Line);
        File.WriteAllBytes(path, Encoding.Unicode.GetPreamble().Concat(Encoding.Unicode.GetBytes("{\"text\": \"ok\"}\n")).ToArray());
        Assert.Contains("UTF-16 or UTF-32 byte order mark", Assert.Throws<TrainingDataException>(() => TrainingData.Load(path, tokenizer)).Message);

        // A JSON escape of half a surrogate pair is no character either.
        File.WriteAllText(path, "{\"text\": \"ok\"}\n{\"prompt\": \"a\\ud800\", \"completion\": \"b\"}\n");
        e = Assert.Throws<TrainingDataException>(() => TrainingData.Load(path, tokenizer));
        Assert.Equal(2, e.Line);
        Assert.Contains("\"prompt\" holds a \\u escape of an unpaired surrogate", e.Message);

        // Valid UTF-8 with a byte order mark, every kind of line end and a line longer than the read buffer: as File.ReadLines reads it.
        var random = new Random(5);
        var text = new StringBuilder("\uFEFF");
        for (int i = 0; i < 300; i++)
        {
            text.Append($"{{\"text\": \"{new string('é', random.Next(i == 100 ? 70_000 : 200))}{i} ✓ 𝐀\"}}");
            text.Append(random.Next(3) switch { 0 => "\n", 1 => "\r\n", _ => "\r" });
        }
        File.WriteAllText(path, text.ToString(), new UTF8Encoding(false));
        Assert.Equal(File.ReadLines(path).Select((l, i) => (i + 1, l)), StrictUtf8.ReadLines(path));
        Assert.Equal(300, TrainingData.Load(path, tokenizer).Examples.Count);
    }

    [Fact]
    public void A_text_file_is_tokenized_where_there_is_a_tokenizer_and_read_as_bytes_only_for_a_byte_vocabulary()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 85, sequence: 4);
        string text = string.Concat(Enumerable.Repeat("the then there the other thesis, the theme. ", 12));
        string data = Path.Combine(fixture.Dir, "notes.md"), held = Path.Combine(fixture.Dir, "held.txt");
        File.WriteAllText(data, text);
        File.WriteAllText(held, "then the other theory, there and then.");
        string[] Eval(string file, params string[] more) => ["--model", model.Name, "--weights", fixture.WeightsPath, "--data", file, "--seq", "16", "--json", .. more];

        // No tokenizer.json beside the weights, and a vocabulary of bytes: UTF-8 bytes, as the main job trains.
        Assert.Equal(Encoding.UTF8.GetByteCount(text) - 1, EvalTests.Score(Eval(data)).Tokens);

        // With one (beside the weights or given), the file is tokenized as a {"text"} line is: its ids and EOS.
        string tokenizerPath = ChatTokenizer();
        var tokenizer = BpeTokenizer.Load(tokenizerPath);
        int[] expected = [.. tokenizer.Encode(text), ImEnd];
        Assert.True(expected.Length < Encoding.UTF8.GetByteCount(text) * 3 / 4, "the merges must make tokens from bytes, or this test proves nothing");
        Assert.Equal(expected, TrainingData.LoadText(data, tokenizer));
        Assert.Equal(expected.Length - 1, EvalTests.Score(Eval(data, "--tokenizer", tokenizerPath)).Tokens);
        File.Copy(tokenizerPath, Path.Combine(fixture.WeightsPath, "tokenizer.json"));
        File.Copy(Path.Combine(Path.GetDirectoryName(tokenizerPath)!, BpeTokenizer.ConfigFileName), Path.Combine(fixture.WeightsPath, BpeTokenizer.ConfigFileName));
        Assert.Equal(expected.Length - 1, EvalTests.Score(Eval(data)).Tokens);
        // ... unless bytes are asked for.
        Assert.Equal(Encoding.UTF8.GetByteCount(text) - 1, EvalTests.Score(Eval(data, "--data-format", "bytes")).Tokens);

        // Training and its validation data follow the same rule, and the header says how the file was read.
        var (code, output, _) = Run(() => Commands.Train(new Args(["--model", model.Name, "--weights", fixture.WeightsPath,
            "--data", data, "--val-data", held, "--out", Path.Combine(fixture.Dir, "run"), "--steps", "2", "--seq", "16"])));
        Assert.Equal(0, code);
        string tokenizerBeside = Path.Combine(fixture.WeightsPath, "tokenizer.json");
        Assert.Contains(output, l => l.StartsWith("Training ", StringComparison.Ordinal) && l.Contains($"{data} tokenized by {tokenizerBeside} ({expected.Length:N0} tokens"));
        Assert.Contains(output, l => l.StartsWith("Validating ", StringComparison.Ordinal) && l.Contains($"{held} tokenized by {tokenizerBeside} ({TrainingData.LoadText(held, tokenizer).Length:N0} tokens in "));
        (code, output, _) = Run(() => Commands.Train(new Args(["--model", model.Name, "--weights", fixture.WeightsPath, "--data-format", "bytes",
            "--data", data, "--out", Path.Combine(fixture.Dir, "bytes"), "--steps", "1", "--seq", "16"])));
        Assert.Equal(0, code);
        Assert.Contains(output, l => l.Contains($"{data} as UTF-8 bytes ({Encoding.UTF8.GetByteCount(text):N0} tokens"));

        // A text file read as text must be UTF-8, with the line of the first byte that is not.
        string latin1 = Path.Combine(fixture.Dir, "latin1.txt");
        File.WriteAllBytes(latin1, [.. "first line\nsecond caf"u8, 0xE9, .. "\n"u8]);
        var e = Assert.Throws<TrainingDataException>(() => Run(() => LoraCompiler.Cli.Eval.Run(new Args(Eval(latin1)))));
        Assert.StartsWith($"{latin1}:2: not valid UTF-8 at byte 11 of the line (0xE9 0x0A)", e.Message);
        Assert.Equal(0, Run(() => LoraCompiler.Cli.Eval.Run(new Args(Eval(latin1, "--data-format", "bytes")))).Code); // bytes are bytes

        // A model whose vocabulary is not one of bytes, without a tokenizer: refused rather than trained on the wrong tokens.
        var qwen = TrainerCatalog.Find("qwen2.5-0.5b")!;
        var refusal = Assert.Throws<UsageException>(() => DataReadingTokens(data, qwen));
        Assert.Contains("is not one of bytes. Pass --tokenizer FILE, or --data-format bytes", refusal.Message);

        // --data-format is checked, and refused where no file is text.
        Assert.Contains("--data-format is 'utf8'", Assert.Throws<UsageException>(() => Run(() => LoraCompiler.Cli.Eval.Run(new Args(Eval(data, "--data-format", "utf8"))))).Message);
        string tokens = Path.Combine(fixture.Dir, "tokens.json");
        File.WriteAllText(tokens, "[1, 2, 3, 4]");
        Assert.Contains("is for text files", Assert.Throws<UsageException>(() => Run(() => LoraCompiler.Cli.Eval.Run(new Args(Eval(tokens, "--data-format", "bytes"))))).Message);
    }

    /// <summary>Eval of a text file with a model that has no weights here: the data is read (and refused) before the weights are opened.</summary>
    private static void DataReadingTokens(string data, ModelInfo model)
    {
        string dir = Directory.CreateTempSubdirectory("no-weights-").FullName;
        Eval.Run(new Args(["--model", model.Name, "--weights", dir, "--data", data, "--seq", "16"]));
    }

    [Fact]
    public void An_adapter_of_other_modules_is_refused_naming_them()
    {
        // tiny-llama trains q, v, o, up and down; an adapter of all seven projections also has k and gate.
        var llama = TrainerCatalog.Find("tiny-llama")!;
        using var fixture = new ModelFixture(llama, seed: 87, sequence: 4);
        string weights = Path.Combine(fixture.AdapterPath, LoraAdapter.WeightsFileName);
        var tensors = llama.LoraModules.SelectMany(m => new[]
        {
            (m.AName, new[] { llama.Lora.R, m.In }, fixture.Adapter[m.AName]),
            (m.BName, new[] { m.Out, llama.Lora.R }, fixture.Adapter[m.BName]),
        }).ToList();
        var extra = Enumerable.Range(0, llama.Layers).SelectMany(l => new (string, int[], float[])[]
        {
            ($"base_model.model.model.layers.{l}.self_attn.k_proj.lora_A.weight", [llama.Lora.R, llama.Hidden], new float[llama.Lora.R * llama.Hidden]),
            ($"base_model.model.model.layers.{l}.mlp.gate_proj.lora_A.weight", [llama.Lora.R, llama.Hidden], new float[llama.Lora.R * llama.Hidden]),
        });
        SafeTensorsWriter.Write(weights, tensors.Concat(extra));
        string[] Train() => ["--model", llama.Name, "--weights", fixture.WeightsPath, "--adapter", fixture.AdapterPath,
            "--data", WriteBytes(fixture), "--out", Path.Combine(fixture.Dir, "run"), "--steps", "1", "--seq", "8"];

        var e = Assert.Throws<WeightsException>(() => Run(() => Commands.Train(new Args(Train()))));
        Assert.StartsWith($"{weights}: 6 tensors belong to no LoRA module of tiny-llama: those of gate_proj (in 3 layers), k_proj (in 3 layers), " +
                          "for example 'base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight' (tiny-llama trains q_proj, v_proj, o_proj, up_proj, down_proj)", e.Message);
        Assert.False(Directory.Exists(Path.Combine(fixture.Dir, "run", LoraAdapter.WeightsFileName)));
        // Eval, generate and grad load adapters the same way.
        Assert.Throws<WeightsException>(() => LoraAdapter.Load(fixture.AdapterPath, llama.Lora, llama.LoraModules));

        // Fewer modules than the trainer's: the missing ones are named too.
        SafeTensorsWriter.Write(weights, tensors.Where(t => !t.Item1.Contains("o_proj")));
        e = Assert.Throws<WeightsException>(() => LoraAdapter.Load(fixture.AdapterPath, llama.Lora, llama.LoraModules, llama.Name));
        Assert.StartsWith($"{weights}: tensor 'base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight' is missing, and 5 more: " +
                          "the adapter has no LoRA tensors of o_proj (in 3 layers) for tiny-llama (tiny-llama trains q_proj, v_proj, o_proj, up_proj, down_proj)", e.Message);

        // The tensors right but adapter_config.json listing other targets: it would be written on, wrong, with the trained adapter.
        SafeTensorsWriter.Write(weights, tensors);
        string config = Path.Combine(fixture.AdapterPath, LoraAdapter.ConfigFileName);
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"q_proj\"", "\"q_proj\", \"k_proj\"", StringComparison.Ordinal));
        e = Assert.Throws<WeightsException>(() => Run(() => Commands.Train(new Args(Train()))));
        Assert.Equal($"{config}: target_modules is [q_proj, k_proj, v_proj, o_proj, up_proj, down_proj] but tiny-llama trains " +
                     "q_proj, v_proj, o_proj, up_proj, down_proj; k_proj is not trained there", e.Message);
    }

    private static string WriteBytes(ModelFixture fixture)
    {
        string path = Path.Combine(fixture.Dir, "bytes.txt");
        File.WriteAllText(path, "some text to train on, long enough for a window or two");
        return path;
    }

    /// <summary>A command with stdout and stderr captured: its exit code and the lines of each.</summary>
    internal static (int Code, string[] Output, string[] Error) Run(Func<int> command)
    {
        var error = new StringWriter();
        var console = Console.Error;
        Console.SetError(error);
        try
        {
            var (code, lines) = ConsoleOutput.Capture(command);
            return (code, lines, error.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
        }
        finally
        {
            Console.SetError(console);
        }
    }

    /// <summary>The command line in a process of its own (lora.dll is copied beside the tests): exit code, stdout, stderr.</summary>
    private static (int Code, string Output, string Error) Lora(string[] args)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "lora.dll"));
        foreach (var a in args)
            start.ArgumentList.Add(a);
        using var process = Process.Start(start)!;
        var error = process.StandardError.ReadToEndAsync();
        string output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, output, error.Result);
    }
}
