using System.Text.Json;
using System.Text.Json.Nodes;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using LoraCompiler.Tests.Training;

namespace LoraCompiler.Tests.Cli;

/// <summary>
/// The command line's contract, checked on <c>lora</c> as a process: any failure is one line
/// <c>error: &lt;file or option&gt;: &lt;what is wrong&gt;</c> on stderr and a nonzero exit code (2 for
/// a usage mistake, 1 for a bad file), a stack trace only with <c>--verbose</c>.
/// </summary>
public sealed class CommandLineContractTests : IDisposable
{
    private readonly ModelInfo _model = TrainerCatalog.Find("tiny-qwen2")!;
    private readonly ModelFixture _fixture;
    private readonly string _data;

    public CommandLineContractTests()
    {
        _fixture = new ModelFixture(_model, seed: 43, sequence: 8);
        _data = Path.Combine(_fixture.Dir, "data.txt");
        File.WriteAllText(_data, string.Concat(Enumerable.Repeat("Pack my box with five dozen liquor jugs. ", 20)));
    }

    public void Dispose() => _fixture.Dispose();

    private string[] Train(string outDir, params string[] extra) =>
        ["train", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--data", _data, "--out", outDir, "--steps", "2", "--seq", "32", .. extra];

    /// <summary>Each case: its arguments, the exit code, and what the one error line must start with after "error: ".</summary>
    private static void AssertOneErrorLine(IEnumerable<(string[] Args, int Code, string Names)> cases)
    {
        var failures = new System.Collections.Concurrent.ConcurrentBag<string>();
        Parallel.ForEach(cases, new ParallelOptions { MaxDegreeOfParallelism = 4 }, c =>
        {
            var (code, _, error) = LoraProcess.Run(c.Args);
            var lines = error.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            if (code != c.Code || lines.Length != 1 || !lines[0].StartsWith("error: " + c.Names, StringComparison.Ordinal))
                failures.Add($"lora {string.Join(" ", c.Args)}\n  exit {code} (expected {c.Code}), stderr:\n  {string.Join("\n  ", lines)}");
        });
        Assert.True(failures.IsEmpty, string.Join("\n", failures));
    }

    [Fact]
    public void Bad_numbers_are_refused_naming_the_option()
    {
        string run = Path.Combine(_fixture.Dir, "never");
        AssertOneErrorLine(
        [
            (Train(run, "--steps", "99999999999"), 2, "--steps: "),
            (Train(run, "--seq", "99999999999"), 2, "--seq: "),
            (Train(run, "--grad-accum", "99999999999"), 2, "--grad-accum: "),
            (Train(run, "--lr", "-0.1"), 2, "--lr: "),
            (Train(run, "--save-every", "-1"), 2, "--save-every: "),
            (Train(run, "--lr", "NaN"), 2, "--lr: "),
            (Train(run, "--weight-decay", "Infinity"), 2, "--weight-decay: "),
            (Train(run, "--mezo-eps", "1e39"), 2, "--mezo-eps: "),
            (Train(run, "--mezo-eps", "0"), 2, "--mezo-eps: "),
            (Train(run, "--seq", $"{_model.MaxPositionEmbeddings + 1}"), 2, "--seq: "),
            (Train(run, "--steps", "ten"), 2, "--steps: "),
            (Train(run, "--stepz", "10"), 2, "--stepz: "),
            (["eval", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--data", _data, "--seq", "-3"], 2, "--seq: "),
            (["generate", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--tokens", _data, "--temperature", "NaN"], 2, "--temperature: "),
            (["grad", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--adapter", _fixture.AdapterPath, "--tokens", _data,
                "--out", "g.safetensors", "--mezo-eps", "0"], 2, "--mezo-eps: "),
            (["plan", "--model", "qwen2.5-0.5b", "--seq", "40000"], 2, "--seq: "),
        ]);
        Assert.False(Directory.Exists(run), "nothing is written for a refused command line");
    }

    [Fact]
    public void Damaged_adapter_configs_and_checkpoints_are_one_error_line_naming_the_file()
    {
        // A run with a checkpoint to damage, and copies of a good adapter.
        string run = Path.Combine(_fixture.Dir, "run");
        Assert.Equal(0, LoraProcess.Run(Train(run, "--steps", "4", "--save-every", "2")).Code);
        var cases = new List<(string[], int, string)>();

        foreach (var (name, change) in new (string, Action<JsonObject>)[]
                 {
                     ("r-string", c => c["r"] = "8"),
                     ("targets-numbers", c => c["target_modules"] = new JsonArray(1, 2)),
                     ("alpha-string", c => c["lora_alpha"] = "16"),
                 })
        {
            string adapter = Path.Combine(_fixture.Dir, name);
            CopyFolder(_fixture.AdapterPath, adapter);
            string config = Path.Combine(adapter, LoraAdapter.ConfigFileName);
            var json = JsonNode.Parse(File.ReadAllText(config))!.AsObject();
            change(json);
            File.WriteAllText(config, json.ToJsonString());
            cases.Add((Train(Path.Combine(_fixture.Dir, "from-" + name), "--adapter", adapter), 1, config + ": "));
        }

        foreach (var (name, change) in new (string, Func<JsonObject, string>)[]
                 {
                     ("truncated", s => s.ToJsonString()[..40]),
                     ("step-string", s => { s["Step"] = "x"; return s.ToJsonString(); }),
                     ("step-past-the-end", s => { s["Step"] = 99; return s.ToJsonString(); }),
                     ("no-metrics", s => { s.Remove("Metrics"); return s.ToJsonString(); }),
                     ("position-word", s => { s["DataPosition"] = "abc"; return s.ToJsonString(); }),
                     ("position-huge", s => { s["DataPosition"] = "99999999999"; return s.ToJsonString(); }),
                     ("position-negative", s => { s["DataPosition"] = "-5"; return s.ToJsonString(); }),
                     ("options-nan", s => { s["Options"]!["LearningRate"] = "NaN"; return s.ToJsonString(); }),
                     ("not-an-object", _ => "[1, 2, 3]"),
                 })
        {
            string copy = Path.Combine(_fixture.Dir, "state-" + name);
            CopyFolder(run, copy);
            string state = Path.Combine(copy, TrainingRun.CheckpointFolder, "state.json");
            File.WriteAllText(state, change(JsonNode.Parse(File.ReadAllText(state))!.AsObject()));
            cases.Add((["train", "--resume", copy], 1, state + ": "));
        }

        // Optimizer state of the wrong length (an IndexOutOfRangeException in the update before).
        string shortState = Path.Combine(_fixture.Dir, "optimizer-short");
        CopyFolder(run, shortState);
        string optimizer = Path.Combine(shortState, TrainingRun.CheckpointFolder, "optimizer.safetensors");
        List<(string, int[], float[])> tensors;
        Dictionary<string, string> metadata;
        using (var file = SafeTensorsFile.Open(optimizer))
        {
            tensors = file.Names.Select(n => (n, new[] { 3 }, file.Read(n)[..3])).ToList();
            metadata = file.Metadata.ToDictionary();
        }
        SafeTensorsWriter.Write(optimizer, tensors, metadata: metadata);
        cases.Add((["train", "--resume", shortState], 1, optimizer + ": "));

        AssertOneErrorLine(cases);
    }

    [Fact]
    public void Help_still_prints_each_commands_usage_and_verbose_adds_the_stack_trace()
    {
        var (code, output, _) = LoraProcess.Run("train", "--help");
        Assert.Equal(0, code);
        Assert.StartsWith("lora train --model NAME", output.TrimStart());
        Assert.Contains("--overwrite", output);

        string missing = Path.Combine(_fixture.Dir, "missing.txt");
        string[] args = ["train", "--model", _model.Name, "--weights", _fixture.WeightsPath, "--data", missing,
            "--out", Path.Combine(_fixture.Dir, "m"), "--steps", "2", "--seq", "32"];
        var (plain, _, plainError) = LoraProcess.Run(args);
        Assert.Equal(1, plain);
        Assert.Equal($"error: {missing}: no such file.", plainError.Trim());

        var (verbose, _, verboseError) = LoraProcess.Run([.. args, "--verbose"]);
        Assert.Equal(1, verbose);
        var lines = verboseError.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal($"error: {missing}: no such file.", lines[0].Trim());
        Assert.Contains(lines, l => l.TrimStart().StartsWith("at ", StringComparison.Ordinal));
    }

    [Fact]
    public void Any_other_exception_is_one_line_with_its_type_and_the_stack_trace_only_with_verbose()
    {
        static (int Code, string Text) Report(Exception e, bool verbose)
        {
            var writer = new StringWriter();
            int code = LoraCompiler.Cli.Failure.Report(e, verbose, writer);
            return (code, writer.ToString());
        }
        Exception Thrown(Exception e)
        {
            try { throw e; } catch (Exception caught) { return caught; }
        }

        var (code, text) = Report(Thrown(new InvalidOperationException("the state is wrong\nover two lines")), verbose: false);
        Assert.Equal(1, code);
        Assert.Equal("error: the state is wrong over two lines (InvalidOperationException; --verbose prints where)", text.Trim());

        (code, text) = Report(Thrown(new InvalidOperationException("the state is wrong")), verbose: true);
        Assert.Equal(1, code);
        Assert.StartsWith("error: the state is wrong (InvalidOperationException)\n", text);
        Assert.Contains("   at ", text);

        // A parallel loop's wrapper is looked through: a usage mistake inside it is still exit code 2.
        (code, text) = Report(new AggregateException(new LoraCompiler.CommandLine.UsageException("--seq: too long.")), verbose: false);
        Assert.Equal(2, code);
        Assert.Equal("error: --seq: too long.", text.Trim());
    }

    private static void CopyFolder(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var file in Directory.EnumerateFiles(from, "*", SearchOption.AllDirectories))
        {
            string target = Path.Combine(to, Path.GetRelativePath(from, file));
            Directory.CreateDirectory(Path.GetDirectoryName(target)!);
            File.Copy(file, target);
        }
    }
}
