using System.Text.Json;
using LoraCompiler.Cli;
using LoraCompiler.Models;

namespace LoraCompiler.Tests.Cli;

/// <summary><c>lora generate</c> end to end: the ids it writes are the reference's greedy decoding; its mistakes are one clear line.</summary>
public sealed class GenerateTests
{
    [Theory]
    [InlineData("tiny-qwen3")]
    [InlineData("tiny-gemma3")]
    public void GreedyIdsFromTheCommandAreTheReferenceGreedyDecoding(string modelName)
    {
        var model = TrainerCatalog.Find(modelName)!;
        using var fixture = new ModelFixture(model, seed: 41, sequence: 9);
        string tokens = Path.Combine(fixture.Dir, "prompt.json"), output = Path.Combine(fixture.Dir, "out.json");
        File.WriteAllText(tokens, JsonSerializer.Serialize(fixture.Tokens));

        int code = Generate.Run(new Args([
            "--model", modelName, "--weights", fixture.WeightsPath, "--adapter", fixture.AdapterPath,
            "--tokens", tokens, "--max-new-tokens", "6", "--out", output]));

        Assert.Equal(0, code);
        var generated = JsonSerializer.Deserialize<int[]>(File.ReadAllText(output))!;
        var reference = fixture.Tokens.ToList();
        for (int n = 0; n < 6; n++)
        {
            var logits = TorchReference.Logits(fixture.ReferenceConfig, fixture.Weights, fixture.Adapter, reference.ToArray());
            var last = Enumerable.Range(0, model.Vocab).Select(v => logits[reference.Count - 1, v]).ToArray();
            int next = Array.IndexOf(last, last.Max());
            if (model.EosTokenIds.Contains(next))
                break;
            reference.Add(next);
        }
        Assert.Equal(reference.Skip(fixture.Tokens.Length), generated);
    }

    [Theory]
    [InlineData(new[] { "--max-new-tokens", "4" }, "--prompt TEXT, --messages FILE and --tokens FILE")]
    [InlineData(new[] { "--messages", "chat.json" }, "tokenizer.json")] // a chat needs the tokenizer (a prompt alone is bytes for a byte vocabulary)
    [InlineData(new[] { "--prompt", "hi", "--temperature", "-1" }, "--temperature")]
    [InlineData(new[] { "--prompt", "hi", "--top-p", "0" }, "--top-p")]
    [InlineData(new[] { "--prompt", "hi", "--max-new-tokens", "0" }, "--max-new-tokens")]
    public void Mistakes_are_usage_errors(string[] extra, string expected)
    {
        var model = TrainerCatalog.Find("tiny-qwen2")!;
        using var fixture = new ModelFixture(model, seed: 1, sequence: 4);
        var e = Assert.Throws<UsageException>(() => Generate.Run(new Args(["--model", model.Name, "--weights", fixture.WeightsPath, .. extra])));
        Assert.Contains(expected, e.Message);
    }
}
