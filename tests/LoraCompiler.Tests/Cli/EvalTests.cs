using System.Diagnostics;
using System.Text.Json;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Data;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Tests.Data;
using LoraCompiler.Tests.Reference;
using LoraCompiler.Tests.Training;

namespace LoraCompiler.Tests.Cli;

/// <summary>
/// <c>lora eval</c> against the independent TorchSharp reference on the same weights, adapter and
/// tokens: the token-weighted mean of its losses over the windows (or, for JSONL, over the rows in the loss).
/// </summary>
[Collection(ConsoleOutputCollection.Name)]
public class EvalTests
{
    private const double LossTolerance = 1e-5;
    private const int Seq = 16;

    [Theory]
    [InlineData("tiny-qwen2", 1)]   // one window: exactly the reference's mean
    [InlineData("tiny-qwen2", 3)]   // two full windows and a last one of 9 predictions
    [InlineData("tiny-gemma3", 1)]  // sliding layers with a window of 7 < 16
    [InlineData("tiny-gemma3", 3)]
    public void Eval_equals_the_torch_reference(string modelName, int windows)
    {
        var model = TrainerCatalog.Find(modelName)!;
        int length = windows == 1 ? Seq + 1 : (windows - 1) * Seq + 9 + 1;
        using var fixture = new ModelFixture(model, seed: 41, length);
        string tokens = WriteTokens(fixture);

        var result = Score(["--model", modelName, "--weights", fixture.WeightsPath, "--adapter", fixture.AdapterPath,
            "--data", tokens, "--seq", $"{Seq}", "--json"]);

        double expected;
        if (windows == 1)
        {
            expected = fixture.Reference().Loss;
        }
        else
        {
            // Each window scored on its own (attention does not cross windows), weighted by its predictions.
            double sum = 0;
            int count = 0, scored = 0;
            for (int offset = 0; offset < length - 1; offset += Seq)
            {
                int[] window = fixture.Tokens[offset..Math.Min(offset + Seq + 1, length)];
                sum += ReferenceLoss(fixture, window) * (window.Length - 1);
                count += window.Length - 1;
                scored++;
            }
            Assert.Equal(windows, scored);
            expected = sum / count;
            // The weighting matters here: the plain mean of the windows' means is another number.
            double unweighted = Enumerable.Range(0, windows)
                .Select(w => ReferenceLoss(fixture, fixture.Tokens[(w * Seq)..Math.Min(w * Seq + Seq + 1, length)])).Average();
            Assert.True(Math.Abs(unweighted - expected) > 10 * LossTolerance, $"the test cannot tell the weightings apart: {unweighted} vs {expected}");
        }
        Assert.Equal(length - 1, result.Tokens);
        Assert.InRange(Math.Abs(result.Loss - expected), 0, LossTolerance * Math.Max(1, expected));
    }

    [Theory]
    [InlineData("tiny-qwen2")]
    [InlineData("tiny-gemma3")]
    public void Without_an_adapter_eval_scores_the_base_model(string modelName)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 43, 2 * Seq + 1);
        string tokens = WriteTokens(fixture);
        string fresh = Path.Combine(fixture.Dir, "fresh");
        Assert.Equal(0, Commands.InitAdapter(new Args(["--model", modelName, "--out", fresh, "--seed", "9"])));
        string[] Common() => ["--model", modelName, "--weights", fixture.WeightsPath, "--data", tokens, "--seq", $"{Seq}", "--json"];

        var baseModel = Score(Common());
        var freshAdapter = Score([.. Common(), "--adapter", fresh]);
        var trained = Score([.. Common(), "--adapter", fixture.AdapterPath]);

        Assert.Equal(freshAdapter, baseModel); // B = 0 adds exactly nothing
        Assert.True(Math.Abs(trained.Loss - baseModel.Loss) > 1e-3, "the fixture's adapter must change the loss, or this test proves nothing");
        // The reference's base model: the fixture's adapter with every B zero.
        var zeroB = fixture.Adapter.ToDictionary(p => p.Key, p => p.Key.Contains("lora_B") ? new float[p.Value.Length] : p.Value);
        double expected = 0;
        for (int w = 0; w < 2; w++)
            expected += TorchReference.LossAndGradients(fixture.ReferenceConfig, fixture.Weights, zeroB,
                fixture.Tokens[(w * Seq)..(w * Seq + Seq + 1)]).Loss / 2;
        Assert.InRange(Math.Abs(baseModel.Loss - expected), 0, LossTolerance * Math.Max(1, expected));
    }

    [Theory]
    [InlineData("tiny-qwen2")]
    [InlineData("tiny-gemma3")]
    public void Jsonl_data_is_scored_on_the_rows_train_learns(string modelName)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 47, 4);
        string tokenizerPath = TestTokenizers.WriteTiny([("t", "h"), ("th", "e")],
            addedTokensJson: """[{"id": 280, "content": "</s>", "special": true}]""", configJson: """{"eos_token": "</s>"}""");
        string data = Path.Combine(fixture.Dir, "held-out.jsonl");
        File.WriteAllLines(data, [
            """{"prompt": "the question: what is there?", "completion": " the answer, at last"}""",
            """{"text": "another line of text, with the theme"}""",
        ]);
        var examples = TrainingData.Load(data, BpeTokenizer.Load(tokenizerPath)).Examples;
        int seq = examples.Max(e => e.Length); // each example alone in its sequence
        Assert.True(examples.Sum(e => e.Length) > seq);

        var result = Score(["--model", modelName, "--weights", fixture.WeightsPath, "--adapter", fixture.AdapterPath,
            "--data", data, "--seq", $"{seq}", "--tokenizer", tokenizerPath, "--json"]);

        // The rows in the loss are rows k..T−2 (the completion, or all of a text, then EOS). Attention is
        // causal, so the reference over the first k + 1 tokens gives the rows before k, and the
        // difference of the sums is the loss of the rows after.
        double sum = 0;
        long count = 0;
        foreach (var e in examples)
        {
            int k = Array.FindIndex(e.Targets, t => t >= 0), T = e.Length;
            Assert.All(e.Targets[k..^1], t => Assert.True(t >= 0));
            Assert.Equal(-1, e.Targets[^1]);
            double all = ReferenceLoss(fixture, e.Tokens) * (T - 1);
            double before = k == 0 ? 0 : ReferenceLoss(fixture, e.Tokens[..(k + 1)]) * k;
            sum += all - before;
            count += T - 1 - k;
        }
        Assert.True(examples[0].Targets[0] == -1, "the prompt must be outside the loss, or this test proves nothing");
        Assert.Equal(count, result.Tokens);
        Assert.InRange(Math.Abs(result.Loss - sum / count), 0, LossTolerance * Math.Max(1, sum / count));
    }

    [Fact]
    public void The_json_line_is_the_last_and_parses()
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 53, 3 * Seq);
        string tokens = WriteTokens(fixture);
        string[] args = ["--model", model.Name, "--weights", fixture.WeightsPath, "--data", tokens, "--seq", $"{Seq}"];

        var (code, lines) = ConsoleOutput.Capture(() => Eval.Run(new Args([.. args, "--json"])));
        Assert.Equal(0, code);
        using var json = JsonDocument.Parse(lines[^1]);
        var root = json.RootElement;
        Assert.Equal(["loss", "perplexity", "tokens"], root.EnumerateObject().Select(p => p.Name));
        double loss = root.GetProperty("loss").GetDouble();
        Assert.Equal(3 * Seq - 1, root.GetProperty("tokens").GetInt64());
        Assert.Equal(Math.Exp(loss), root.GetProperty("perplexity").GetDouble(), 1e-9 * Math.Exp(loss));
        Assert.Contains(lines, l => l.StartsWith($"loss {loss:F6}  perplexity {Math.Exp(loss):F4}", StringComparison.Ordinal));

        var (plainCode, plain) = ConsoleOutput.Capture(() => Eval.Run(new Args(args)));
        Assert.Equal(0, plainCode);
        Assert.DoesNotContain(plain, l => l.StartsWith('{'));
        Assert.StartsWith($"loss {loss:F6}", plain[^1]);
    }

    [Fact]
    public void The_command_line_prints_its_usage_and_one_line_errors()
    {
        var (help, helpOut, _) = Lora("eval", "--help");
        Assert.Equal(0, help);
        Assert.StartsWith("lora eval --model NAME --weights PATH", helpOut.TrimStart());
        Assert.Contains("--json", helpOut);

        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 59, 4);
        string missing = Path.Combine(fixture.Dir, "missing.json");
        var (code, _, error) = Lora("eval", "--model", model.Name, "--weights", fixture.WeightsPath, "--data", missing);
        Assert.Equal(1, code);
        Assert.Equal($"error: {missing}: no such file.", error.Trim());

        var (usage, _, usageError) = Lora("eval", "--model", model.Name, "--weights", fixture.WeightsPath);
        Assert.Equal(2, usage);
        Assert.Equal("error: --data: required, not given.", usageError.Trim());
    }

    private static string WriteTokens(ModelFixture fixture)
    {
        string path = Path.Combine(fixture.Dir, "tokens.json");
        File.WriteAllText(path, JsonSerializer.Serialize(fixture.Tokens));
        return path;
    }

    private static double ReferenceLoss(ModelFixture fixture, int[] tokens) =>
        TorchReference.LossAndGradients(fixture.ReferenceConfig, fixture.Weights, fixture.Adapter, tokens).Loss;

    /// <summary>The JSON line of <c>lora eval ... --json</c>.</summary>
    internal static EvalResult Score(string[] args)
    {
        var (code, lines) = ConsoleOutput.Capture(() => Eval.Run(new Args(args)));
        Assert.Equal(0, code);
        return JsonSerializer.Deserialize<EvalResult>(lines[^1])!;
    }

    internal sealed record EvalResult(
        [property: System.Text.Json.Serialization.JsonPropertyName("loss")] double Loss,
        [property: System.Text.Json.Serialization.JsonPropertyName("perplexity")] double Perplexity,
        [property: System.Text.Json.Serialization.JsonPropertyName("tokens")] long Tokens);

    /// <summary>The command line in a process of its own (lora.dll is copied beside the tests): exit code, stdout, stderr.</summary>
    private static (int Code, string Output, string Error) Lora(params string[] args)
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
