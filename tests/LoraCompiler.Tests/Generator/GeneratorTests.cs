using System.Collections.Immutable;
using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json;
using LoraCompiler.Generator;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Tests.Generator.Snapshots;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using Microsoft.CodeAnalysis.Text;
using BufferRole = LoraCompiler.Runtime.Training.BufferRole;

namespace LoraCompiler.Tests.Generator;

/// <summary>
/// The source generator driven in-process: snapshots of the emitted trainers, one test per diagnostic,
/// class names, incremental caching, defaults and the memory plan.
/// </summary>
public sealed class GeneratorTests
{
    // ---- driving the generator ------------------------------------------------------------------

    /// <summary>An AdditionalFile held in memory, as MSBuild would hand a model JSON to the generator.</summary>
    private sealed class InMemoryAdditionalText(string path, string text) : AdditionalText
    {
        private readonly SourceText _text = SourceText.From(text, Encoding.UTF8);

        public override string Path => path;
        public override SourceText GetText(CancellationToken cancellationToken = default) => _text;
    }

    /// <summary>What one generator run produced.</summary>
    private sealed record GeneratorRun(
        Compilation Output,
        ImmutableArray<Diagnostic> Diagnostics,
        ImmutableDictionary<string, string> Sources)
    {
        /// <summary>Warnings and errors of compiling the generated code against the runtime.</summary>
        public IReadOnlyList<Diagnostic> CompileProblems =>
            Output.GetDiagnostics().Where(d => d.Severity >= DiagnosticSeverity.Warning).ToList();

        public string Source(string hintName) =>
            Sources.TryGetValue(hintName, out var text)
                ? text
                : throw new Xunit.Sdk.XunitException($"No source {hintName}; generated: {string.Join(", ", Sources.Keys)}");
    }

    private static readonly CSharpParseOptions ParseOptions = new(LanguageVersion.Latest);

    /// <summary>
    /// The framework's assemblies (the trusted platform assemblies of the shared framework, not the
    /// test's own dependencies, so the already-built LoraCompiler.Models does not clash with the
    /// generated types) plus the runtime the trainers are written against.
    /// </summary>
    private static readonly Lazy<MetadataReference[]> References = new(() =>
    {
        string frameworkDir = Path.GetDirectoryName(typeof(object).Assembly.Location)!;
        var framework = ((string)AppContext.GetData("TRUSTED_PLATFORM_ASSEMBLIES")!)
            .Split(Path.PathSeparator)
            .Where(p => string.Equals(Path.GetDirectoryName(p), frameworkDir, StringComparison.Ordinal));
        return framework
            .Append(typeof(TrainerBase).Assembly.Location)
            .Select(p => (MetadataReference)MetadataReference.CreateFromFile(p))
            .ToArray();
    });

    private static CSharpCompilation NewCompilation(params string[] sources) =>
        CSharpCompilation.Create("GeneratorTestAssembly",
            sources.Select(s => CSharpSyntaxTree.ParseText(s, ParseOptions)),
            References.Value,
            new CSharpCompilationOptions(OutputKind.DynamicallyLinkedLibrary, nullableContextOptions: NullableContextOptions.Enable));

    private static GeneratorDriver NewDriver(IEnumerable<AdditionalText> files, bool trackSteps = false) =>
        CSharpGeneratorDriver.Create(
            generators: [new LoraGenerator().AsSourceGenerator()],
            additionalTexts: files,
            parseOptions: ParseOptions,
            driverOptions: new GeneratorDriverOptions(IncrementalGeneratorOutputKind.None, trackIncrementalGeneratorSteps: trackSteps));

    private static GeneratorRun Run(params (string Path, string Json)[] files) =>
        Run(NewCompilation(), files);

    private static GeneratorRun Run(CSharpCompilation compilation, params (string Path, string Json)[] files)
    {
        var driver = NewDriver(files.Select(f => new InMemoryAdditionalText(f.Path, f.Json)));
        driver = driver.RunGeneratorsAndUpdateCompilation(compilation, out var output, out var diagnostics);
        var result = driver.GetRunResult().Results.Single();
        Assert.Null(result.Exception);
        var sources = result.GeneratedSources.ToImmutableDictionary(s => s.HintName, s => s.SourceText.ToString());
        return new GeneratorRun(output, diagnostics, sources);
    }

    private static string Describe(IEnumerable<Diagnostic> diagnostics) =>
        string.Join("\n", diagnostics.Select(d => d.ToString()));

    // ---- the repository's model files ----------------------------------------------------------

    private static string RepoRoot() => ModelFixture.RepoRoot();

    private static string ModelPath(string name) => Path.Combine(RepoRoot(), "models", name + ".json");

    private static (string Path, string Json) ModelFile(string name)
    {
        string path = ModelPath(name);
        return (path, File.ReadAllText(path));
    }

    private static string[] ShippedModelNames() =>
        Directory.GetFiles(Path.Combine(RepoRoot(), "models"), "*.json")
            .Select(p => Path.GetFileNameWithoutExtension(p))
            .Order(StringComparer.Ordinal)
            .ToArray()!;

    // ---- snapshots -----------------------------------------------------------------------------

    [Theory]
    [InlineData("tiny-qwen2", "TinyQwen2Trainer")]
    [InlineData("tiny-llama", "TinyLlamaTrainer")]
    [InlineData("tiny-qwen3", "TinyQwen3Trainer")]
    [InlineData("tiny-gemma3", "TinyGemma3Trainer")]
    public void Trainer_matches_its_snapshot_and_compiles(string model, string className)
    {
        var run = Run(ModelFile(model));

        Assert.True(run.Diagnostics.IsEmpty, Describe(run.Diagnostics));
        Assert.True(run.CompileProblems.Count == 0, Describe(run.CompileProblems));
        Snapshot.Match(run.Source(className + ".g.cs"), className);
    }

    // ---- the shipped models --------------------------------------------------------------------

    [Fact]
    public void Shipped_models_generate_code_that_compiles_cleanly()
    {
        var names = ShippedModelNames();
        Assert.NotEmpty(names);

        var run = Run(names.Select(ModelFile).ToArray());

        Assert.True(run.Diagnostics.IsEmpty, Describe(run.Diagnostics));
        Assert.True(run.CompileProblems.Count == 0, Describe(run.CompileProblems));
        var expected = names.Select(n => LoraGenerator.ClassNameFor(n) + ".g.cs").Append("TrainerCatalog.g.cs");
        Assert.Equal(expected.Order(StringComparer.Ordinal), run.Sources.Keys.Order(StringComparer.Ordinal));
    }

    /// <summary>
    /// The models project compiles with ImplicitUsings; the generated code must not depend on it, and
    /// must not clash with it either.
    /// </summary>
    [Fact]
    public void Generated_code_compiles_with_and_without_implicit_usings()
    {
        const string implicitUsings = """
            global using System;
            global using System.Collections.Generic;
            global using System.IO;
            global using System.Linq;
            global using System.Net.Http;
            global using System.Threading;
            global using System.Threading.Tasks;
            """;
        var files = ShippedModelNames().Select(ModelFile).ToArray();

        var bare = Run(NewCompilation(), files);
        var withUsings = Run(NewCompilation(implicitUsings), files);

        Assert.True(bare.CompileProblems.Count == 0, Describe(bare.CompileProblems));
        Assert.True(withUsings.CompileProblems.Count == 0, Describe(withUsings.CompileProblems));
    }

    [Fact]
    public void TrainerCatalog_lists_every_model_file_with_its_class()
    {
        var names = ShippedModelNames();

        Assert.Equal(names, TrainerCatalog.All.Select(m => m.Name).ToArray());
        var modelsAssembly = typeof(TrainerCatalog).Assembly;
        foreach (var info in TrainerCatalog.All)
        {
            Assert.Equal(LoraGenerator.ClassNameFor(info.Name), info.ClassName);
            Assert.Equal($"models/{info.Name}.json", info.SourceFile);
            var type = modelsAssembly.GetType($"LoraCompiler.Models.{info.ClassName}");
            Assert.NotNull(type);
            Assert.True(type.IsSubclassOf(typeof(TrainerBase)), $"{type} does not derive from TrainerBase");
            Assert.Same(info, TrainerCatalog.Find(info.Name));
        }
        Assert.Null(TrainerCatalog.Find("no-such-model"));
    }

    [Fact]
    public void TrainerCatalog_names_the_known_models_by_their_class()
    {
        var byName = TrainerCatalog.All.ToDictionary(m => m.Name, m => m.ClassName);

        Assert.Equal("TinyQwen2Trainer", byName["tiny-qwen2"]);
        Assert.Equal("TinyLlamaTrainer", byName["tiny-llama"]);
        Assert.Equal("Qwen2_5_0_5BTrainer", byName["qwen2.5-0.5b"]);
    }

    // ---- class names ---------------------------------------------------------------------------

    [Theory]
    [InlineData("qwen2.5-0.5b", "Qwen2_5_0_5BTrainer")]
    [InlineData("llama-3.2-1b", "Llama3_2_1BTrainer")]
    [InlineData("tiny-qwen2", "TinyQwen2Trainer")]
    [InlineData("tiny-llama", "TinyLlamaTrainer")]
    [InlineData("Qwen2.5-1.5B-Instruct", "Qwen2_5_1_5BInstructTrainer")]
    [InlineData("7b", "Model7BTrainer")]
    public void Class_name_follows_the_file_name(string modelName, string className)
    {
        Assert.Equal(className, LoraGenerator.ClassNameFor(modelName));
    }

    [Fact]
    public void Generated_file_and_class_are_named_after_the_json_file()
    {
        var run = Run(("/repo/models/llama-3.2-1b.json", TinyLlamaJson()));

        Assert.True(run.Diagnostics.IsEmpty, Describe(run.Diagnostics));
        Assert.Contains("public sealed class Llama3_2_1BTrainer : TrainerBase", run.Source("Llama3_2_1BTrainer.g.cs"));
        Assert.Contains("Llama3_2_1BTrainer.Info,", run.Source("TrainerCatalog.g.cs"));
    }

    // ---- diagnostics ---------------------------------------------------------------------------

    private const string BadPath = "/repo/models/broken-model.json";
    private const string BadClass = "BrokenModelTrainer";
    private const string GoodPath = "/repo/models/good-model.json";
    private const string GoodClass = "GoodModelTrainer";

    /// <summary>A small valid Qwen2 config; each diagnostic test breaks one line of it.</summary>
    private const string ValidJson = """
        {
          "architectures": ["Qwen2ForCausalLM"],
          "hidden_act": "silu",
          "hidden_size": 64,
          "intermediate_size": 176,
          "num_hidden_layers": 2,
          "num_attention_heads": 4,
          "num_key_value_heads": 2,
          "rms_norm_eps": 1e-06,
          "rope_theta": 1000000.0,
          "tie_word_embeddings": true,
          "vocab_size": 320
        }
        """;

    private static string TinyLlamaJson() => File.ReadAllText(ModelPath("tiny-llama"));

    private static string Replace(string json, string oldText, string newText)
    {
        Assert.Contains(oldText, json);
        return json.Replace(oldText, newText);
    }

    /// <summary>0-based line of the first line holding <paramref name="marker"/>.</summary>
    private static int LineOf(string json, string marker)
    {
        var lines = json.Split('\n');
        int index = Array.FindIndex(lines, l => l.Contains(marker, StringComparison.Ordinal));
        Assert.True(index >= 0, $"'{marker}' is not in the JSON");
        return index;
    }

    /// <summary>
    /// Runs the broken file beside a valid one and checks the single diagnostic: its id, that the message
    /// names the file and every fragment given, that it points into the JSON file at the given line, that
    /// the broken file produced no trainer, and that the valid one still did.
    /// </summary>
    private static Diagnostic AssertSingleDiagnostic(string badJson, string id, int? line, params string[] messageParts)
    {
        var run = Run((BadPath, badJson), (GoodPath, ValidJson));

        var diagnostic = Assert.Single(run.Diagnostics);
        Assert.Equal(id, diagnostic.Id);
        Assert.Equal(DiagnosticSeverity.Error, diagnostic.Severity);
        string message = diagnostic.GetMessage(System.Globalization.CultureInfo.InvariantCulture);
        Assert.Contains("broken-model.json", message);
        foreach (string part in messageParts)
            Assert.Contains(part, message);

        Assert.Equal(LocationKind.ExternalFile, diagnostic.Location.Kind);
        var span = diagnostic.Location.GetLineSpan();
        Assert.Equal(BadPath, span.Path);
        if (line is { } expectedLine)
            Assert.Equal(expectedLine, span.StartLinePosition.Line);

        Assert.DoesNotContain(BadClass + ".g.cs", run.Sources.Keys);
        Assert.DoesNotContain(run.Sources.Values, s => s.Contains(BadClass, StringComparison.Ordinal));
        Assert.Contains(GoodClass + ".g.cs", run.Sources.Keys);
        Assert.Contains($"{GoodClass}.Info,", run.Source("TrainerCatalog.g.cs"));
        Assert.True(run.CompileProblems.Count == 0, Describe(run.CompileProblems));
        return diagnostic;
    }

    [Fact]
    public void LORA0001_trailing_comma()
    {
        string json = Replace(ValidJson, "\"vocab_size\": 320\n}", "\"vocab_size\": 320,\n}");

        // The reader finds the problem at the '}' where it expected the next property name.
        var diagnostic = AssertSingleDiagnostic(json, "LORA0001", LineOf(json, "}"), "malformed JSON", "property name");
        Assert.Contains($"line {LineOf(json, "}") + 1}", diagnostic.GetMessage(System.Globalization.CultureInfo.InvariantCulture));
    }

    [Fact]
    public void LORA0001_missing_closing_brace()
    {
        string json = Replace(ValidJson, "\"vocab_size\": 320\n}", "\"vocab_size\": 320\n");

        AssertSingleDiagnostic(json, "LORA0001", LineOf(json, "vocab_size") + 1, "malformed JSON", "end of file");
    }

    [Fact]
    public void LORA0002_missing_field()
    {
        string json = Replace(ValidJson, "  \"hidden_size\": 64,\n", "");

        // A missing field points at the object that lacks it: the top level, line 0.
        AssertSingleDiagnostic(json, "LORA0002", 0, "'hidden_size'", "missing");
    }

    [Fact]
    public void LORA0003_non_positive_dimension()
    {
        string json = Replace(ValidJson, "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 0");

        AssertSingleDiagnostic(json, "LORA0003", LineOf(json, "num_hidden_layers"), "'num_hidden_layers'", "positive", "found 0");
    }

    [Fact]
    public void LORA0004_heads_do_not_divide_hidden_size()
    {
        string json = Replace(ValidJson, "\"hidden_size\": 64", "\"hidden_size\": 100");
        json = Replace(json, "\"num_attention_heads\": 4", "\"num_attention_heads\": 3");
        json = Replace(json, "\"num_key_value_heads\": 2", "\"num_key_value_heads\": 1");

        AssertSingleDiagnostic(json, "LORA0004", LineOf(json, "num_attention_heads"),
            "num_attention_heads (3)", "hidden_size (100)", "head_dim");
    }

    [Fact]
    public void LORA0004_kv_heads_do_not_divide_heads()
    {
        string json = Replace(ValidJson, "\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");

        AssertSingleDiagnostic(json, "LORA0004", LineOf(json, "num_key_value_heads"),
            "num_key_value_heads (3)", "num_attention_heads (4)");
    }

    [Fact]
    public void LORA0005_unknown_architecture()
    {
        string json = Replace(ValidJson, "Qwen2ForCausalLM", "GPT2LMHeadModel");

        AssertSingleDiagnostic(json, "LORA0005", LineOf(json, "architectures"), "'GPT2LMHeadModel'", "not supported");
    }

    [Fact]
    public void LORA0006_unknown_target_module()
    {
        string json = Replace(ValidJson, "\"vocab_size\": 320\n", "\"vocab_size\": 320,\n  \"lora\": {\"target_modules\": [\"q_proj\", \"qkv\"]}\n");

        var diagnostic = AssertSingleDiagnostic(json, "LORA0006", LineOf(json, "\"lora\""), "'qkv'", "target module");
        // The column is that of the offending array element.
        int column = json.Split('\n')[LineOf(json, "\"lora\"")].IndexOf("\"qkv\"", StringComparison.Ordinal);
        Assert.Equal(column, diagnostic.Location.GetLineSpan().StartLinePosition.Character);
    }

    [Fact]
    public void LORA0007_lora_rank_zero()
    {
        string json = Replace(ValidJson, "\"vocab_size\": 320\n", "\"vocab_size\": 320,\n  \"lora\": {\n    \"r\": 0\n  }\n");

        AssertSingleDiagnostic(json, "LORA0007", LineOf(json, "\"r\""), "lora.r", "found 0");
    }

    [Fact]
    public void LORA0008_field_of_the_wrong_type()
    {
        string json = Replace(ValidJson, "\"hidden_size\": 64", "\"hidden_size\": \"896\"");

        AssertSingleDiagnostic(json, "LORA0008", LineOf(json, "hidden_size"), "'hidden_size'", "an integer", "a string");
    }

    [Theory]
    [InlineData("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"", "hidden_act", "hidden_act", "\"silu\"")]
    [InlineData("\"vocab_size\": 320\n", "\"vocab_size\": 320,\n  \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0}\n",
                "rope_scaling", "rope_scaling", "\"yarn\"")]
    [InlineData("\"vocab_size\": 320\n", "\"vocab_size\": 320,\n  \"trainer\": {\"lcsb\": {\"groups\": 2, \"order\": \"random\"}}\n",
                "trainer", "trainer.lcsb.order", "\"random\"")]
    [InlineData("\"vocab_size\": 320\n", "\"vocab_size\": 320,\n  \"trainer\": {\"activations\": \"disk\"}\n",
                "trainer", "trainer.activations", "\"disk\"")]
    public void LORA0009_unsupported_feature(string oldText, string newText, string lineMarker, string field, string reason)
    {
        string json = Replace(ValidJson, oldText, newText);

        AssertSingleDiagnostic(json, "LORA0009", LineOf(json, lineMarker), field, reason);
    }

    /// <summary>A small valid Gemma 3 config for the family's diagnostics.</summary>
    private const string ValidGemmaJson = """
        {
          "architectures": ["Gemma3ForCausalLM"],
          "hidden_activation": "gelu_pytorch_tanh",
          "hidden_size": 64,
          "intermediate_size": 128,
          "num_hidden_layers": 4,
          "num_attention_heads": 4,
          "num_key_value_heads": 1,
          "head_dim": 16,
          "query_pre_attn_scalar": 16,
          "rope_local_base_freq": 10000.0,
          "rope_scaling": null,
          "rope_theta": 1000000.0,
          "sliding_window": 8,
          "sliding_window_pattern": 2,
          "vocab_size": 320
        }
        """;

    [Theory]
    [InlineData("\"rope_scaling\": null", "\"rope_scaling\": {\"rope_type\": \"dynamic\", \"factor\": 2.0}", "rope_scaling", "rope_scaling", "\"dynamic\"")]
    [InlineData("\"hidden_activation\": \"gelu_pytorch_tanh\"", "\"hidden_activation\": \"gelu\"", "hidden_activation", "hidden_activation", "\"gelu\"")]
    [InlineData("\"sliding_window_pattern\": 2", "\"layer_types\": [\"sliding_attention\", \"chunked_attention\", \"full_attention\", \"full_attention\"]",
                "layer_types", "layer_types", "\"chunked_attention\"")]
    [InlineData("\"sliding_window\": 8", "\"sliding_window\": 8,\n  \"use_bidirectional_attention\": true", "use_bidirectional_attention",
                "use_bidirectional_attention", "causal")]
    public void LORA0009_unsupported_gemma3_value(string oldText, string newText, string lineMarker, string field, string reason)
    {
        string json = Replace(ValidGemmaJson, oldText, newText);

        AssertSingleDiagnostic(json, "LORA0009", LineOf(json, lineMarker), field, reason);
    }

    [Fact]
    public void LORA0009_sliding_window_on_llama()
    {
        string json = Replace(TinyLlamaJson(), "\"vocab_size\": 300,", "\"vocab_size\": 300,\n  \"use_sliding_window\": true,");

        AssertSingleDiagnostic(json, "LORA0009", LineOf(json, "use_sliding_window"), "use_sliding_window", "LlamaForCausalLM");
    }

    [Fact]
    public void LORA0011_attn_logit_softcapping_is_a_warning_and_the_trainer_is_built()
    {
        string json = Replace(ValidGemmaJson, "\"rope_scaling\": null", "\"attn_logit_softcapping\": 50.0,\n  \"rope_scaling\": null");
        var run = Run((BadPath, json));

        var diagnostic = Assert.Single(run.Diagnostics);
        Assert.Equal("LORA0011", diagnostic.Id);
        Assert.Equal(DiagnosticSeverity.Warning, diagnostic.Severity);
        Assert.Equal(LineOf(json, "attn_logit_softcapping"), diagnostic.Location.GetLineSpan().StartLinePosition.Line);
        Assert.Contains("attn_logit_softcapping", diagnostic.GetMessage(System.Globalization.CultureInfo.InvariantCulture));
        Assert.Contains(BadClass + ".g.cs", run.Sources.Keys);
        Assert.True(run.CompileProblems.Count == 0, Describe(run.CompileProblems));
    }

    // ---- the families' configs, as Hugging Face's config classes read them ------------------------

    [Fact]
    public void Gemma3_layer_types_follow_sliding_window_pattern_when_absent()
    {
        // transformers' Gemma3TextConfig: layer i slides unless (i + 1) is a multiple of the pattern.
        var spec = LoraGenerator.Parse(GoodPath, Replace(ValidGemmaJson, "\"sliding_window_pattern\": 2", "\"sliding_window_pattern\": 3")).Value!;
        Assert.Equal(new[] { 8, 8, 0, 8 }, spec.LayerWindows);

        // Neither field: the config class's default pattern, 6.
        spec = LoraGenerator.Parse(GoodPath, Replace(ValidGemmaJson, "\"sliding_window_pattern\": 2", "\"num_key_value_heads\": 1")).Value!;
        Assert.Equal(new[] { 8, 8, 8, 8 }, spec.LayerWindows);

        // layer_types wins over the pattern.
        spec = LoraGenerator.Parse(GoodPath, Replace(ValidGemmaJson, "\"sliding_window_pattern\": 2",
            "\"layer_types\": [\"full_attention\", \"sliding_attention\", \"sliding_attention\", \"full_attention\"]")).Value!;
        Assert.Equal(new[] { 0, 8, 8, 0 }, spec.LayerWindows);
    }

    [Fact]
    public void Gemma3_reads_its_own_fields()
    {
        var spec = LoraGenerator.Parse(GoodPath, Replace(ValidGemmaJson, "\"query_pre_attn_scalar\": 16", "\"query_pre_attn_scalar\": 25")).Value!;

        Assert.Equal(0.2, spec.AttentionScale, 12);
        Assert.True(spec.TiedEmbeddings); // Gemma3TextConfig's default
        Assert.Equal(1_000_000, spec.Rope.Theta);
        Assert.Equal(new RopeSpec(10_000, null), spec.LocalRope);
        Assert.Equal(Activation.GeluTanh, spec.Activation);
        Assert.Equal(0, spec.FinalLogitSoftcap);

        var plan = LoraGenerator.Plan(spec);
        Assert.Equal(new[] { "Sliding", "Full" }, plan.Kinds.Select(k => k.Name));
        Assert.Equal(new[] { 0, 1, 0, 1 }, plan.Schedule);
        Assert.Equal(new[] { "ropeLocal", "rope" }, plan.Kinds.Select(k => k.RopeTable));
        Assert.Equal(new[]
            {
                "input_layernorm", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "rope", "rope", "attention", "o_proj",
                "post_attention_layernorm", "residual", "pre_feedforward_layernorm", "gate_proj", "up_proj", "geglu", "down_proj",
                "post_feedforward_layernorm", "residual",
            },
            plan.Kinds[0].Ops.Select(o => o.Module));
        // Backward reads post_feedforward_layernorm's rstd and input, so the recompute runs through it.
        Assert.Equal("post_feedforward_layernorm", plan.Kinds[0].Ops[plan.Kinds[0].RecomputeUntil].Module);
    }

    [Fact]
    public void Gemma3_rope_parameters_per_layer_type()
    {
        // transformers' newer form: one RoPE per layer type instead of rope_theta, rope_local_base_freq and rope_scaling.
        string json = Replace(ValidGemmaJson, "\"rope_scaling\": null,", """
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
              },
            """);
        json = Replace(Replace(json, "  \"rope_local_base_freq\": 10000.0,\n", ""), "  \"rope_theta\": 1000000.0,\n", "");
        var spec = LoraGenerator.Parse(GoodPath, json).Value!;

        Assert.Equal(new RopeSpec(1_000_000, new RopeScalingSpec("linear", 8)), spec.Rope);
        Assert.Equal(new RopeSpec(10_000, null), spec.LocalRope);
    }

    [Fact]
    public void Qwen3_head_dim_bias_and_sliding_layers()
    {
        var (_, json) = ModelFile("qwen3-0.6b");
        var spec = LoraGenerator.Parse("/repo/models/qwen3-0.6b.json", json).Value!;
        Assert.Equal(128, spec.HeadDim); // not 1024 / 16
        Assert.False(spec.QkvBias);
        Assert.All(spec.LayerWindows, w => Assert.Equal(0, w));
        var plan = LoraGenerator.Plan(spec);
        Assert.Equal(16 * 128, plan.Projections.Single(p => p.Name == "o_proj").InSize);
        Assert.Contains(plan.Kinds.Single().Ops, o => o is NormOp { Module: "q_norm", Heads: "Heads" });

        // attention_bias puts biases on q, k, v and o.
        spec = LoraGenerator.Parse("/repo/models/qwen3-0.6b.json", Replace(json, "\"attention_bias\": false", "\"attention_bias\": true")).Value!;
        Assert.True(spec.QkvBias && spec.OutputBias);

        // use_sliding_window: the layers from max_window_layers on slide (transformers' Qwen3Config).
        string sliding = Replace(Replace(Replace(json, "\"use_sliding_window\": false", "\"use_sliding_window\": true"),
            "\"sliding_window\": null", "\"sliding_window\": 64"), "\"max_window_layers\": 28", "\"max_window_layers\": 26");
        spec = LoraGenerator.Parse("/repo/models/qwen3-0.6b.json", sliding).Value!;
        Assert.Equal(Enumerable.Range(0, 28).Select(i => i >= 26 ? 64 : 0), spec.LayerWindows);

        // use_sliding_window with sliding_window null: no window, every layer attends fully.
        spec = LoraGenerator.Parse("/repo/models/qwen3-0.6b.json", Replace(json, "\"use_sliding_window\": false", "\"use_sliding_window\": true")).Value!;
        Assert.All(spec.LayerWindows, w => Assert.Equal(0, w));
    }

    [Fact]
    public void Llama_attention_bias_adds_the_four_biases()
    {
        var spec = LoraGenerator.Parse(GoodPath, Replace(TinyLlamaJson(), "\"attention_bias\": false", "\"attention_bias\": true")).Value!;
        var plan = LoraGenerator.Plan(spec);

        Assert.Equal(new[] { "q_proj", "k_proj", "v_proj", "o_proj" }, plan.Projections.Where(p => p.HasBias).Select(p => p.Name));
    }

    [Fact]
    public void LORA0003_more_lcsb_groups_than_layers()
    {
        string json = Replace(ValidJson, "\"vocab_size\": 320\n", "\"vocab_size\": 320,\n  \"trainer\": {\"lcsb\": {\"groups\": 3}}\n");

        AssertSingleDiagnostic(json, "LORA0003", LineOf(json, "trainer"), "trainer.lcsb.groups", "num_hidden_layers (2)");
    }

    [Theory]
    [InlineData("\"512MB\"", 512_000_000L)]
    [InlineData("\"1.5 GiB\"", 1_610_612_736L)]
    [InlineData("268435456", 268_435_456L)]
    public void Memory_budget_is_read_as_a_size_and_becomes_the_trainers_default(string value, long bytes)
    {
        string json = Replace(ValidJson, "\"vocab_size\": 320\n", $"\"vocab_size\": 320,\n  \"trainer\": {{\"memory_budget\": {value}}}\n");
        var spec = LoraGenerator.Parse(GoodPath, json).Value!;
        Assert.Equal(bytes, spec.MemoryBudget);

        var run = Run((GoodPath, json));
        Assert.True(run.Diagnostics.IsEmpty, Describe(run.Diagnostics));
        Assert.Contains($"MemoryBudget: {bytes}L", run.Source(GoodClass + ".g.cs"));
    }

    [Theory]
    [InlineData("\"12XB\"", "unknown unit 'XB'")]
    [InlineData("\"-5MB\"", "not a size like")]
    [InlineData("\"0MB\"", "not a positive size")]
    [InlineData("0", "not a positive whole number of bytes")]
    [InlineData("1.5", "not a positive whole number of bytes")]
    public void LORA0012_memory_budget_that_is_not_a_size(string value, string reason)
    {
        string json = Replace(ValidJson, "\"vocab_size\": 320\n", $"\"vocab_size\": 320,\n  \"trainer\": {{\"memory_budget\": {value}}}\n");

        AssertSingleDiagnostic(json, "LORA0012", LineOf(json, "trainer"), "trainer.memory_budget", reason);
    }

    [Fact]
    public void LORA0008_memory_budget_of_the_wrong_type()
    {
        string json = Replace(ValidJson, "\"vocab_size\": 320\n", "\"vocab_size\": 320,\n  \"trainer\": {\"memory_budget\": [512]}\n");

        AssertSingleDiagnostic(json, "LORA0008", LineOf(json, "trainer"), "'trainer.memory_budget'", "a size like \"512MB\"", "found an array");
    }

    [Fact]
    public void A_kept_layer_holds_what_its_backward_reads_that_no_cheap_op_remakes()
    {
        // Qwen2: the norms' outputs and the gated activation are remade from x, x2, gate and up; q and k
        // are kept after RoPE (rotated in place), x2 after its residual add.
        var plan = LoraGenerator.Plan(LoraGenerator.Parse(ModelPath("tiny-qwen2"), File.ReadAllText(ModelPath("tiny-qwen2"))).Value!);
        var kind = Assert.Single(plan.Kinds);
        Assert.Equal(new[] { "q", "k", "v", "att", "lse", "x2", "gate", "up" }, kind.Kept.Select(k => k.Value));
        Assert.Equal(new[] { "input_layernorm", "post_attention_layernorm", "swiglu" }, kind.Remade.Select(i => kind.Ops[i].Module));
        var kept = Assert.Single(plan.Buffers, b => b.Role == LoraCompiler.Generator.BufferRole.KeptActivations);
        Assert.Equal(64 + 32 + 32 + 64 + 4 + 64 + 176 + 176, kept.PerToken); // tiny-qwen2: hidden 64, kv 32, 4 heads, intermediate 176

        // Qwen3: q_norm and k_norm feed RoPE, which rotates their output in place, so they are kept with their inputs.
        var qwen3 = LoraGenerator.Plan(LoraGenerator.Parse(ModelPath("tiny-qwen3"), File.ReadAllText(ModelPath("tiny-qwen3"))).Value!);
        var q3 = Assert.Single(qwen3.Kinds);
        Assert.Contains("qRaw", q3.Kept.Select(k => k.Value));
        Assert.Contains("rstdQ", q3.Kept.Select(k => k.Value));
        Assert.DoesNotContain(q3.Remade, i => q3.Ops[i].Module is "q_norm" or "k_norm");
    }

    [Fact]
    public void LORA0010_two_files_with_the_same_class_name()
    {
        const string first = "/repo/models/tiny-qwen2.json", second = "/repo/models/tiny_qwen2.json", third = "/repo/other/tiny-qwen2.json";

        var run = Run((first, ValidJson), (second, ValidJson), (third, ValidJson), (GoodPath, ValidJson));

        // Each clashing file is reported, none of them is emitted, and the generator does not crash.
        Assert.Equal(3, run.Diagnostics.Length);
        Assert.All(run.Diagnostics, d => Assert.Equal("LORA0010", d.Id));
        Assert.Equal(new[] { first, second, third }.Order(StringComparer.Ordinal),
            run.Diagnostics.Select(d => d.Location.GetLineSpan().Path).Order(StringComparer.Ordinal));
        var firstMessage = run.Diagnostics.Single(d => d.Location.GetLineSpan().Path == first).GetMessage(System.Globalization.CultureInfo.InvariantCulture);
        Assert.Contains("tiny-qwen2.json", firstMessage);
        Assert.Contains("'TinyQwen2Trainer'", firstMessage);
        Assert.Contains(second, firstMessage);
        Assert.Contains(third, firstMessage);
        Assert.Equal(new[] { GoodClass + ".g.cs", "TrainerCatalog.g.cs" }, run.Sources.Keys.Order(StringComparer.Ordinal));
        Assert.DoesNotContain("TinyQwen2Trainer", run.Source("TrainerCatalog.g.cs"));
        Assert.True(run.CompileProblems.Count == 0, Describe(run.CompileProblems));
    }

    /// <summary>
    /// A broken file is a diagnostic, never an exception out of the generator: every prefix of a real
    /// model file, and the file with any one character removed, parses to a value or an error.
    /// </summary>
    [Fact]
    public void Parse_never_throws_on_truncated_or_damaged_json()
    {
        string json = TinyLlamaJson();
        var damaged = Enumerable.Range(0, json.Length)
            .SelectMany(i => new[] { json[..i], json.Remove(i, 1) });

        foreach (string text in damaged)
        {
            var result = LoraGenerator.Parse(BadPath, text);
            Assert.True(result.Value is not null ^ !result.Errors.IsEmpty, $"neither a value nor one error for:\n{text}");
            Assert.All(result.Errors, e => Assert.Matches("^LORA00(0[1-9]|1[02])$", e.Id));
        }
    }

    [Fact]
    public void Every_diagnostic_id_has_its_own_descriptor()
    {
        foreach (int i in Enumerable.Range(1, 10).Append(12))
        {
            string id = $"LORA{i:D4}";
            var descriptor = DiagnosticDescriptors.ById(id);
            Assert.Equal(id, descriptor.Id);
            Assert.Equal(DiagnosticSeverity.Error, descriptor.DefaultSeverity);
        }
    }

    // ---- incremental caching and structural equality -------------------------------------------

    [Fact]
    public void Second_run_with_the_same_inputs_is_cached()
    {
        var files = new (string Path, string Json)[] { ModelFile("tiny-qwen2"), ModelFile("tiny-llama"), (BadPath, "{ \"oops\": ") };
        var compilation = NewCompilation("namespace Sample { public static class A { } }");

        var texts = files.Select(f => new InMemoryAdditionalText(f.Path, f.Json)).ToList();
        var driver = NewDriver(texts, trackSteps: true);
        driver = driver.RunGenerators(compilation);
        var first = driver.GetRunResult().Results.Single();
        Assert.Equal(3, first.GeneratedSources.Length);
        Assert.All(first.TrackedOutputSteps.SelectMany(s => s.Value).SelectMany(step => step.Outputs),
            output => Assert.Equal(IncrementalStepRunReason.New, output.Reason));

        // Same texts in new AdditionalText objects, and an edited C# compilation the generator does not read.
        foreach (var old in texts)
            driver = driver.ReplaceAdditionalText(old, new InMemoryAdditionalText(old.Path, old.GetText().ToString()));
        var edited = compilation.AddSyntaxTrees(CSharpSyntaxTree.ParseText("namespace Sample { public static class B { } }", ParseOptions));
        driver = driver.RunGenerators(edited);
        var second = driver.GetRunResult().Results.Single();

        var outputs = second.TrackedOutputSteps.SelectMany(s => s.Value).SelectMany(step => step.Outputs).ToList();
        Assert.NotEmpty(outputs);
        Assert.All(outputs, output => Assert.True(
            output.Reason is IncrementalStepRunReason.Cached or IncrementalStepRunReason.Unchanged,
            $"an output step ran again: {output.Reason}"));
        Assert.Equal(
            first.GeneratedSources.Select(s => (s.HintName, s.SourceText.ToString())),
            second.GeneratedSources.Select(s => (s.HintName, s.SourceText.ToString())));
    }

    [Fact]
    public void Parsed_spec_and_plan_have_structural_equality()
    {
        var (path, json) = ModelFile("tiny-llama");

        var a = LoraGenerator.Parse(path, json);
        var b = LoraGenerator.Parse(path, new string(json.ToCharArray()));

        Assert.NotNull(a.Value);
        Assert.NotSame(a.Value, b.Value);
        Assert.Equal(a, b);
        Assert.Equal(a.Value, b.Value);
        Assert.Equal(a.Value!.GetHashCode(), b.Value!.GetHashCode());
        var planA = LoraGenerator.Plan(a.Value);
        var planB = LoraGenerator.Plan(b.Value);
        Assert.NotSame(planA, planB);
        Assert.Equal(planA, planB);
        Assert.Equal(planA.GetHashCode(), planB.GetHashCode());

        // And a different file is not equal.
        var other = LoraGenerator.Parse(path, json.Replace("\"r\": 4", "\"r\": 2"));
        Assert.NotEqual(a.Value, other.Value);
        Assert.NotEqual(planA, LoraGenerator.Plan(other.Value!));

        // Failures compare structurally too, so an unchanged broken file is cached as well.
        Assert.Equal(LoraGenerator.Parse(BadPath, "{ \"oops\": "), LoraGenerator.Parse(BadPath, "{ \"oops\": "));
    }

    // ---- defaults ------------------------------------------------------------------------------

    /// <summary>Qwen2.5-0.5B's config.json as published, with no lora or trainer section.</summary>
    private const string PublishedQwen25Config = """
        {
          "architectures": ["Qwen2ForCausalLM"],
          "attention_dropout": 0.0,
          "bos_token_id": 151643,
          "eos_token_id": 151643,
          "hidden_act": "silu",
          "hidden_size": 896,
          "initializer_range": 0.02,
          "intermediate_size": 4864,
          "max_position_embeddings": 32768,
          "max_window_layers": 24,
          "model_type": "qwen2",
          "num_attention_heads": 14,
          "num_hidden_layers": 24,
          "num_key_value_heads": 2,
          "rms_norm_eps": 1e-06,
          "rope_theta": 1000000.0,
          "sliding_window": 32768,
          "tie_word_embeddings": true,
          "torch_dtype": "bfloat16",
          "transformers_version": "4.40.1",
          "use_cache": true,
          "use_sliding_window": false,
          "vocab_size": 151936
        }
        """;

    private static readonly string[] AllTargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    [Fact]
    public void Unmodified_hf_config_gets_the_defaults()
    {
        var spec = LoraGenerator.Parse("/repo/models/qwen2.5-0.5b.json", PublishedQwen25Config).Value;

        Assert.NotNull(spec);
        Assert.Equal(8, spec.LoraRank);
        Assert.Equal(16.0, spec.LoraAlpha);
        Assert.Equal(AllTargetModules, spec.TargetModules);
        Assert.Equal(Math.Min(151936, 4096), spec.LmHeadChunk);
        Assert.Equal(896 / 14, spec.HeadDim);
        Assert.True(spec.TiedEmbeddings);
        Assert.True(spec.QkvBias);
        Assert.False(spec.OutputBias);
        Assert.Null(spec.Rope.Scaling);
        Assert.Null(spec.LocalRope);
        Assert.All(spec.LayerWindows, w => Assert.Equal(0, w)); // use_sliding_window is false
    }

    [Fact]
    public void Lm_head_chunk_defaults_to_the_vocabulary_when_it_is_smaller()
    {
        var spec = LoraGenerator.Parse(GoodPath, ValidJson).Value;

        Assert.NotNull(spec);
        Assert.Equal(320, spec.LmHeadChunk);
        Assert.Equal(AllTargetModules, spec.TargetModules);
    }

    [Fact]
    public void Defaults_reach_the_generated_trainer()
    {
        var run = Run(("/repo/models/qwen2.5-0.5b.json", PublishedQwen25Config));
        string source = run.Source("Qwen2_5_0_5BTrainer.g.cs");

        Assert.Contains("public const int LoraRank = 8;", source);
        Assert.Contains("public const float LoraAlpha = 16f;", source);
        Assert.Contains("public const int LmHeadChunk = 4096;", source);
        Assert.Contains("Lora = new LoraSettings(LoraRank, LoraAlpha, [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]),", source);
    }

    [Fact]
    public void Target_modules_keep_the_layer_order_and_all_linear_means_all()
    {
        string listed = Replace(ValidJson, "\"vocab_size\": 320\n",
            "\"vocab_size\": 320,\n  \"lora\": {\"target_modules\": [\"down_proj\", \"q_proj\", \"v_proj\", \"q_proj\"]}\n");
        string allLinear = Replace(ValidJson, "\"vocab_size\": 320\n",
            "\"vocab_size\": 320,\n  \"lora\": {\"target_modules\": \"all-linear\"}\n");

        Assert.Equal(new[] { "q_proj", "v_proj", "down_proj" }, LoraGenerator.Parse(GoodPath, listed).Value!.TargetModules);
        Assert.Equal(AllTargetModules, LoraGenerator.Parse(GoodPath, allLinear).Value!.TargetModules);
    }

    // ---- the memory plan -----------------------------------------------------------------------

    /// <summary>
    /// tiny-qwen2's memory plan at T = 32, against sizes written out here from the buffer list and the
    /// config read with System.Text.Json (not the generator's reader).
    /// </summary>
    [Fact]
    public void Memory_plan_of_tiny_qwen2_matches_an_independent_count()
    {
        const int T = 32;
        using var config = JsonDocument.Parse(File.ReadAllText(ModelPath("tiny-qwen2")));
        var root = config.RootElement;
        long C = root.GetProperty("hidden_size").GetInt64();
        long I = root.GetProperty("intermediate_size").GetInt64();
        long L = root.GetProperty("num_hidden_layers").GetInt64();
        long H = root.GetProperty("num_attention_heads").GetInt64();
        long KV = root.TryGetProperty("num_key_value_heads", out var kv) ? kv.GetInt64() : H;
        long D = root.TryGetProperty("head_dim", out var hd) ? hd.GetInt64() : C / H;
        long V = root.GetProperty("vocab_size").GetInt64();
        bool tied = root.TryGetProperty("tie_word_embeddings", out var tie) && tie.GetBoolean();
        var lora = root.TryGetProperty("lora", out var l) ? l : default;
        long r = lora.ValueKind == JsonValueKind.Object && lora.TryGetProperty("r", out var rv) ? rv.GetInt64() : 8;
        var targets = lora.ValueKind == JsonValueKind.Object && lora.TryGetProperty("target_modules", out var tm)
            ? tm.EnumerateArray().Select(e => e.GetString()!).ToHashSet()
            : AllTargetModules.ToHashSet();
        long chunk = root.TryGetProperty("trainer", out var tr) && tr.TryGetProperty("lm_head_chunk", out var ch)
            ? ch.GetInt64() : Math.Min(V, 4096);
        long Q = H * D, K = KV * D;

        // Per token: the checkpoints x00..xL, one layer's activations, their gradients, the scratch rows.
        long checkpoints = (L + 1) * T * C;
        // o_proj writes into x2 and down_proj into the next checkpoint, so neither output has a buffer.
        // Attention keeps one log-sum-exp per head and token, never a [H, T, T] matrix.
        long activations = T * (C /*xn*/ + 1 /*rstd1*/ + Q /*q*/ + K /*k*/ + K /*v*/ + H /*lse*/ + Q /*att*/ + C /*x2*/
                                + C /*xn2*/ + 1 /*rstd2*/ + 3 * I /*gate, up, act*/);
        // dGate lives in act's memory and dUp in dAct's: only dAct is counted. x2 and xn2 are dead once
        // the MLP's backward is done, so where QDim = Hidden dAtt and dQ live in their memory.
        long gradients = T * (2 * C /*dx, dxn*/ + (Q == C ? 0 : 2 * Q) /*dQ, dAtt*/ + 2 * K /*dK, dV*/ + I /*dAct*/);
        long scratch = T * (2 * r /*loraH, loraDH*/ + chunk /*logits*/ + D /*rope cos and sin, D/2 each*/);
        // Fixed: embeddings (and lm_head unless tied), three norms, one layer's projections with q/k/v bias.
        long weights = V * C * (tied ? 1 : 2) + 3 * C
                       + C * Q + Q + C * K + K + C * K + K + Q * C + 3 * C * I;
        var moduleSizes = new Dictionary<string, long>
        {
            ["q_proj"] = C + Q, ["k_proj"] = C + K, ["v_proj"] = C + K, ["o_proj"] = Q + C,
            ["gate_proj"] = C + I, ["up_proj"] = C + I, ["down_proj"] = I + C,
        };
        long loraParameters = L * r * targets.Sum(t => moduleSizes[t]);
        long loraGradients = loraParameters / L; // one layer's, reused layer after layer
        long totalFloats = checkpoints + activations + gradients + scratch + weights + loraParameters + loraGradients;

        // What ships: the generated ModelInfo of the models assembly, evaluated by the runtime.
        var plan = TinyQwen2Trainer.Info.Plan(T);
        Assert.Equal(4 * checkpoints, plan.BytesOf(BufferRole.Checkpoint));
        Assert.Equal(4 * H * T, plan.Buffers.Single(b => b.Name == "lse").Bytes(T));
        Assert.Equal(4 * activations, plan.BytesOf(BufferRole.Activation));
        Assert.Equal(4 * gradients, plan.BytesOf(BufferRole.Gradient));
        Assert.Equal(4 * scratch, plan.BytesOf(BufferRole.Scratch));
        Assert.Equal(4 * weights, plan.BytesOf(BufferRole.Weights));
        Assert.Equal(4 * loraParameters, plan.BytesOf(BufferRole.LoraParameters));
        Assert.Equal(4 * loraGradients, plan.BytesOf(BufferRole.LoraGradients));
        Assert.Equal(4 * totalFloats, plan.TotalBytes);
        // Every buffer is linear in T: doubling the sequence at most doubles the plan.
        Assert.True(TinyQwen2Trainer.Info.Plan(2 * T).TotalBytes - plan.TotalBytes == plan.TotalBytes - TinyQwen2Trainer.Info.Plan(0).TotalBytes);

        // The in-process planner agrees with the shipped table buffer by buffer.
        var (path, json) = ModelFile("tiny-qwen2");
        var planned = LoraGenerator.Plan(LoraGenerator.Parse(path, json).Value!).Buffers;
        Assert.Equal(
            planned.Select(b => (b.Field, b.Role.ToString(), b.Fixed, b.PerToken, b.SharesWith)),
            TinyQwen2Trainer.Info.Buffers.Select(b => (b.Name, b.Role.ToString(), b.Fixed, b.PerToken, b.SharesWith)));
        Assert.Equal(TinyQwen2Trainer.Info.LoraParameterCount, loraParameters);
    }
}
