using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using LoraCompiler.Cli;
using LoraCompiler.Models;
using LoraCompiler.Runtime.Data;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

string Usage = $"""
    lora: LoRA fine-tuning with trainers generated from model JSONs.

    Commands:
      models                                      the trainers in this build (one per models/*.json)
      plan --model NAME [--seq N] [--memory-budget SIZE] [--optimizer adamw|sgd] [--grad-accum N]
           [--activations memory|mmap] [--optimizer-state memory|mmap]
                                                  the static memory plan of one step; with --memory-budget (or
                                                  the JSON's trainer.memory_budget) the layers that keep their
                                                  activations, where checkpoints and moments live, the planned peak
      init-random --model NAME --out DIR [--seed S] [--dtype F32|BF16|F16] [--std X] [--quantize q4] [--group-size N]
                                                  write a model.safetensors of random weights
                                                  (--quantize q4: linear and embedding weights in 4 bits)
      quantize --model NAME --weights PATH --out DIR [--group-size 64] [--overwrite]
                                                  write DIR/model.safetensors with 4-bit weights (MLX's
                                                  affine layout) and copy the config and tokenizer
                                                  (--overwrite: allow DIR to be the source's own folder)
      init-adapter --model NAME --out DIR [--seed S]
                                                  write a new PEFT adapter (A random, B zero)
      grad --model NAME --weights PATH --adapter DIR --tokens FILE --out FILE [--backend cpu|vulkan] [--device D]
           [--method backprop|mezo] [--samples N] [--mezo-eps X] [--seed S]
                                                  one forward and backward (or MeZO's estimate from N
                                                  perturbations); writes every LoRA gradient
      compare-grads A B                           cosine similarity of two gradient files
      train --model NAME --weights PATH --data FILE --out DIR [--adapter DIR] [--resume DIR]
            [--steps N] [--seq N] [--lr X] [--schedule constant|cosine] [--warmup N] [--grad-accum N]
            [--optimizer adamw|sgd] [--weight-decay X] [--method backprop|mezo] [--lcsb-groups K]
            [--mezo-eps X] [--save-every N] [--epochs N] [--tokenizer FILE] [--data-format auto|text|bytes] [--seed S]
            [--backend cpu|vulkan] [--device D]
            [--activations memory|mmap] [--optimizer-state memory|mmap] [--memory-budget SIZE] [--base-model ID]
            [--val-data FILE] [--val-every N] [--val-batches K] [--overwrite]
                                                  fine-tune; writes adapter, metrics.csv, loss.svg to DIR
                                                  (--memory-budget 512MB: the last layers that fit keep their
                                                  activations instead of recomputing them, checkpoints and
                                                  moments go to mapped files where memory is short)
                                                  (--val-data: the held-out loss every N steps, on K sequences;
                                                  a text file is tokenized with the tokenizer.json, or read as
                                                  UTF-8 bytes without one for a byte vocabulary (the tiny
                                                  models) or with --data-format bytes)
                                                  --resume DIR alone continues a run with its stored options;
                                                  --overwrite replaces the run already in --out; Ctrl-C or
                                                  SIGTERM stops after the step with a checkpoint (exit 130, 143)
    {Cluster.Usage}
      eval --model NAME --weights PATH [--adapter DIR] --data FILE [--seq N] [--json] [--tokenizer FILE]
           [--data-format auto|text|bytes] [--backend cpu|vulkan] [--device D]
                                                  loss and perplexity over the data (the base model without --adapter)

      study --model NAME --data FILE --out DIR [--weights PATH] [--steps N] [--seq N] [--lr X]
            [--methods full,lcsb2,lcsb4,mezo] [--mezo-lr X] [--seed S]
                                                  the same budget with each method: a table and curves
    {Generate.Usage}
    {Fuse.Usage}
    {Export.Usage}
    {Bench.Usage}

    PATH is a model.safetensors file or a folder holding it (or shards with model.safetensors.index.json).
    Any failure is one line 'error: ...' (exit code 2 for a usage mistake, 1 otherwise); --verbose adds the stack trace.
    """;

// --verbose, anywhere: a failure prints its stack trace after the error line.
bool verbose = args.Contains("--verbose");
args = args.Where(a => a != "--verbose").ToArray();

if (args.Length == 0 || args[0] is "-h" or "--help" or "help")
{
    Console.WriteLine(Usage);
    return args.Length == 0 ? 2 : 0;
}

// 'lora COMMAND --help': that command's lines of the usage.
if (args.Skip(1).Any(a => a is "--help" or "-h"))
{
    string? help = CommandUsage(Usage, args[0]);
    Console.WriteLine(help ?? $"Unknown command '{args[0]}'. Run 'lora --help' for the list.");
    return help is null ? 2 : 0;
}

// Distributed training (issue 13): under mpirun every rank runs 'train' through Cluster.
if (args[0] == "train" && Cluster.Requested(ref args))
    return Cluster.Train(args.Skip(1).ToArray(), verbose);

try
{
    // 'compare-grads A B' takes no options; 'bench kernels|step' has a word after the command.
    Args options = args[0] == "compare-grads" ? new Args([]) : new Args(args.Skip(args[0] == "bench" ? 2 : 1));
    int code = args[0] switch
    {
        "models" => Commands.Models(options),
        "plan" => Commands.Plan(options),
        "init-random" => Commands.InitRandom(options),
        "quantize" => Commands.Quantize(options),
        "init-adapter" => Commands.InitAdapter(options),
        "grad" => Commands.Grad(options),
        "train" => Commands.Train(options),
        "eval" => Eval.Run(options),
        "compare-grads" => Commands.CompareGrads(args.Skip(1).ToArray()),
        "study" => Commands.Study(options),
        "generate" => Generate.Run(options),
        "fuse" => Fuse.Run(options),
        "export" => Export.Run(options),
        "bench" => Bench.Run(args.Length > 1 ? args[1] : "", options),
        _ => throw new UsageException($"{args[0]}: unknown command. Run 'lora --help' for the list."),
    };
    return code;
}
catch (Exception caught)
{
    return Failure.Report(caught, verbose, Console.Error);
}

/// <summary>A command's block of the usage text: its line and the indented lines under it, or null.</summary>
static string? CommandUsage(string usage, string command)
{
    var lines = usage.Split('\n');
    int start = Array.FindIndex(lines, l => l.TrimStart().StartsWith(command + " ", StringComparison.Ordinal) || l.Trim() == command);
    if (start < 0)
        return null;
    int indent = lines[start].Length - lines[start].TrimStart().Length;
    var block = lines.Skip(start).TakeWhile((l, i) => i == 0 || (l.Length - l.TrimStart().Length > indent && l.Trim().Length > 0));
    return "lora " + string.Join("\n", block).Trim();
}

public static class Commands
{
    public static int Models(Args args)
    {
        args.RejectUnknown();
        foreach (var m in TrainerCatalog.All)
            Console.WriteLine($"{m.Name,-16} {m.ClassName,-24} {m.Architecture,-18} {m.Layers,3} layers  hidden {m.Hidden,5}  " +
                              $"{m.ParameterCount / 1e6,9:F1}M params  LoRA r={m.Lora.R} {m.LoraParameterCount / 1e6:F3}M");
        return 0;
    }

    public static int Plan(Args args)
    {
        var model = Model(args);
        int seq = Seq(args, model, 256);
        string optimizer = args.Get("optimizer", "adamw");
        int gradAccum = args.Int("grad-accum", 1, min: 1);
        var placement = Placement(args);
        if (optimizer is not ("adamw" or "sgd"))
            throw new UsageException($"--optimizer: '{optimizer}' is not an optimizer (available: adamw, sgd).");
        var (_, budget) = MemoryBudget(args, model, seq, optimizer, gradAccum, placement);
        args.RejectUnknown();
        Console.WriteLine($"{model}");
        if (budget is not null)
            Console.WriteLine(budget.Describe());
        Console.WriteLine($"Memory plan for sequences of up to {seq} tokens (float32 buffers):");
        Console.WriteLine(model.Plan(seq, budget?.KeptLayers ?? 0).Format());
        return 0;
    }

    /// <summary>
    /// <c>--memory-budget SIZE</c>, else the model JSON's <c>trainer.memory_budget</c>: the plan for it with the
    /// run's optimizer, over the placement the command line fixed (<c>--activations</c>, <c>--optimizer-state</c>);
    /// without a budget, the placement alone. A budget below the smallest plan is one error with the numbers.
    /// </summary>
    internal static (TrainerOptions Options, MemoryBudgetPlan? Plan) MemoryBudget(Args args, ModelInfo model, int seq, string optimizer,
        int gradientAccumulation, TrainerOptions placement)
    {
        string? text = args.Optional("memory-budget");
        long? budget = text is null ? model.Defaults.MemoryBudget
            : LoraCompiler.Runtime.IO.ByteSize.TryParse(text, out string problem) ?? throw new UsageException($"--memory-budget: {problem}.");
        if (budget is not long bytes)
            return (placement, null);
        try
        {
            var plan = MemoryBudgetPlanner.Plan(MemoryCosts.For(model, seq, optimizer, gradientAccumulation), bytes,
                placement.ActivationsInFile, placement.OptimizerStateInFile);
            return (plan.ToOptions(placement), plan);
        }
        catch (MemoryBudgetException e)
        {
            throw new UsageException((text is null ? $"{model.SourceFile}: trainer.memory_budget: " : "--memory-budget: ") +
                                     $"{e.Message} for {model.Name} at --seq {seq} with {optimizer}.");
        }
    }

    public static int InitRandom(Args args)
    {
        var model = Model(args);
        string dir = args.Required("out");
        int seed = args.Int("seed", 0);
        string dtype = args.Get("dtype", "F32").ToUpperInvariant();
        float std = args.Float("std", RandomWeights.InitStd, min: 0);
        string? quantize = args.Optional("quantize");
        int? groupSize = args.Optional("group-size") is null ? null : args.Int("group-size", Q4.DefaultGroupSize);
        args.RejectUnknown();
        if (quantize is not (null or "q4"))
            throw new UsageException($"Unknown --quantize '{quantize}' (available: q4).");
        if (groupSize is not null && quantize is null)
            throw new UsageException("--group-size goes with --quantize q4.");
        if (quantize is not null)
            groupSize = CheckGroupSize(groupSize ?? Q4.DefaultGroupSize);
        OutputFolder.Prepare(dir, "--out");
        var watch = Stopwatch.StartNew();
        string path = RandomWeights.Write(model, dir, seed, dtype, std,
            progress: model.ParameterCount > 50_000_000 ? Console.WriteLine : null, quantizeGroupSize: groupSize);
        string format = groupSize is int g ? $"4-bit in groups of {g}, the rest {dtype}" : dtype;
        Console.WriteLine($"Wrote {path}: {model.ParameterCount:N0} random parameters ({format}, {new FileInfo(path).Length / 1048576.0:F1} MiB) in {watch.Elapsed.TotalSeconds:F1} s.");
        return 0;
    }

    /// <summary>
    /// Quantizes a Hugging Face safetensors model (file, folder or shards) to 4 bits: DIR/model.safetensors
    /// streamed tensor by tensor, and the folder's config.json (with MLX's "quantization" entry added),
    /// tokenizer.json and tokenizer_config.json copied beside it.
    /// </summary>
    public static int Quantize(Args args)
    {
        var model = Model(args);
        string weightsPath = args.Required("weights");
        string dir = args.Required("out");
        int groupSize = CheckGroupSize(args.Int("group-size", Q4.DefaultGroupSize));
        bool overwrite = args.Flag("overwrite");
        args.RejectUnknown();
        // The float model is not replaced by its 4-bit copy unless asked: --out must be another folder.
        string sourceDir = FolderOf(weightsPath);
        bool inPlace = OutputFolder.SamePath(sourceDir, dir);
        if (inPlace && !overwrite)
            throw new UsageException($"--out: {dir} is the folder of the source weights {weightsPath}; writing there replaces the model " +
                                     "being quantized. Give another --out, or --overwrite to replace it.");
        OutputFolder.Prepare(dir, "--out");

        var watch = Stopwatch.StartNew();
        string path = Path.Combine(dir, ModelWeights.SingleFileName);
        using (var source = ModelWeights.Open(weightsPath))
        {
            source.Validate(model.BaseTensors);
            Directory.CreateDirectory(dir);
            QuantizedModelWriter.Quantize(source, path, groupSize, Console.WriteLine);
        }
        var copied = new List<string>();
        foreach (var file in new[] { "config.json", "tokenizer.json", "tokenizer_config.json" })
        {
            string from = Path.Combine(sourceDir, file), to = Path.Combine(dir, file);
            // In place (--overwrite) the config still gets its quantization entry; the tokenizer stays as it is.
            if (!File.Exists(from) || (OutputFolder.SamePath(from, to) && file != "config.json"))
                continue;
            if (file == "config.json")
                WriteQuantizedConfig(from, to, groupSize);
            else
                File.Copy(from, to, overwrite: true);
            copied.Add(file);
        }
        using (var written = ModelWeights.Open(path))
            written.Validate(model.BaseTensors);
        Console.WriteLine($"Wrote {path} ({new FileInfo(path).Length / 1048576.0:F1} MiB, 4-bit in groups of {groupSize}) in {watch.Elapsed.TotalSeconds:F1} s" +
                          (copied.Count > 0 ? $"; copied {string.Join(", ", copied)}." : "."));
        return 0;
    }

    /// <summary>config.json with <c>"quantization": {"group_size": g, "bits": 4, "mode": "affine"}</c>, as MLX's loader reads it.</summary>
    private static void WriteQuantizedConfig(string from, string to, int groupSize)
    {
        var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(from)) as System.Text.Json.Nodes.JsonObject
            ?? throw new UsageException($"{from} is not a JSON object.");
        config[Q4.MetadataKey] = new System.Text.Json.Nodes.JsonObject { ["group_size"] = groupSize, ["bits"] = Q4.Bits, ["mode"] = "affine" };
        LoraCompiler.Runtime.IO.AtomicFile.WriteAllText(to, config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }

    private static int CheckGroupSize(int groupSize) =>
        Q4.GroupSizeProblem(groupSize) is { } problem ? throw new UsageException($"--group-size: {problem}.") : groupSize;

    public static int InitAdapter(Args args)
    {
        var model = Model(args);
        string dir = args.Required("out");
        int seed = args.Int("seed", 0);
        args.RejectUnknown();
        LoraAdapter.CreateNew(model.Lora, model.LoraModules, seed).Save(dir, model.Name);
        Console.WriteLine($"Wrote a new adapter for {model.Name} to {dir}: {model.LoraModules.Count} modules, r={model.Lora.R}, alpha={model.Lora.Alpha}.");
        return 0;
    }

    public static int Grad(Args args)
    {
        var model = Model(args);
        string weightsPath = args.Required("weights");
        string adapterDir = args.Required("adapter");
        string tokensPath = args.Required("tokens");
        string outPath = args.Required("out");
        string method = args.Get("method", "backprop");
        int samples = args.Int("samples", 1, min: 1);
        ulong seed = (ulong)args.Int("seed", 0);
        float epsilon = args.Float("mezo-eps", 1e-3f, min: 0, exclusiveMin: true);
        using var backend = Backend(args);
        args.RejectUnknown();
        if (method is not ("backprop" or "mezo"))
            throw new UsageException($"Unknown method '{method}' (available: backprop, mezo).");

        int[] tokens = ReadTokens(tokensPath);
        using var weights = ModelWeights.Open(weightsPath);
        var adapter = Export.LoadWhole(adapterDir, model);
        using var trainer = model.Create(backend, weights, adapter, tokens.Length);
        trainer.LcsbGroups = 1; // the exact gradient of every layer, whatever schedule training uses

        var watch = Stopwatch.StartNew();
        var targets = TrainerBase.NextTokenTargets(tokens);
        if (method == "mezo")
        {
            float loss = trainer.Loss(tokens, targets);
            var estimate = MeZO.EstimateGradient(trainer, tokens, targets, seed, epsilon, samples);
            SafeTensorsWriter.Write(outPath, trainer.LoraModules.SelectMany(m => new[]
            {
                (m.Spec.AName, new[] { model.Lora.R, m.Spec.In }, estimate[m.Spec.AName]),
                (m.Spec.BName, new[] { m.Spec.Out, model.Lora.R }, estimate[m.Spec.BName]),
            }));
            Console.WriteLine($"loss {loss:F6}  MeZO estimate from {samples} samples, eps {epsilon} ({tokens.Length} tokens, {watch.Elapsed.TotalSeconds:F2} s on {backend.Name})");
        }
        else
        {
            float loss = trainer.ForwardBackward(tokens, targets, step: 0);
            LoraAdapter.SaveGradients(outPath, trainer.DownloadGradients(), model.Lora.R);
            Console.WriteLine($"loss {loss:F6}  ({tokens.Length} tokens, {watch.Elapsed.TotalSeconds:F2} s on {backend.Name})");
        }
        Console.WriteLine($"Wrote {trainer.LoraModules.Count * 2} LoRA gradients to {outPath}.");
        return 0;
    }

    public static int Train(Args args)
    {
        // --resume DIR alone continues a run: the options its checkpoint stored stand in for those not given.
        string? resumeDir = Cluster.ShareCheckpoint(args.Optional("resume")); // distributed: rank 0's checkpoint on every rank
        CheckpointInfo? checkpoint = null;
        if (resumeDir is not null)
        {
            checkpoint = TrainingRun.ReadCheckpoint(resumeDir) ?? throw new UsageException($"--resume: {resumeDir} holds no checkpoint to resume from.");
            if (checkpoint.Settings is { } stored)
                args.WithFallback(RunSettings.Fallback(stored, resumeDir));
        }
        var model = Model(args);
        string weightsPath = args.Required("weights");
        string dataOption = args.Required("data");
        string dataPath = Cluster.DataFile(dataOption); // distributed: '{rank}' is the rank (a federated rank's own data)
        string outDir = args.Required("out");
        string? adapterDir = args.Optional("adapter");
        string? tokenizerPath = args.Optional("tokenizer");
        bool overwrite = args.Flag("overwrite");
        string? dataFormat = args.Optional("data-format");
        var placement = Placement(args);
        int? epochs = args.IntOrNull("epochs", min: 1);
        int seq = Seq(args, model, 256);
        var options = TrainingOptionsFrom(args, model) with { BaseModel = Export.BaseModelId(args.Optional("base-model"), weightsPath, null, model) };
        var (trainerOptions, budget) = MemoryBudget(args, model, seq, options.Optimizer, options.GradientAccumulation, placement);
        options = Cluster.Configure(args, options, checkpoint, out int? federatedRounds); // distributed: processes, federated rounds
        string? validationPath = args.Optional("val-data");
        int? validationEvery = args.IntOrNull("val-every", min: 1);
        int? validationSequences = args.IntOrNull("val-batches", min: 1);
        using var backend = Backend(args);
        args.RejectUnknown();
        if (validationPath is null && (validationEvery is not null || validationSequences is not null))
            throw new UsageException("--val-every and --val-batches go with --val-data FILE.");
        if (overwrite && resumeDir is not null && OutputFolder.SamePath(resumeDir, outDir))
            throw new UsageException("--overwrite: a resumed run goes on in its folder; give --overwrite without --resume to start it again.");
        if (epochs is not null && args.Given("steps") && args.Given("epochs"))
            throw new UsageException("--epochs: give --steps or --epochs, not both.");

        // Before any work: the output folder, and a run already in it (distributed: rank 0's alone).
        if (Cluster.Writes)
        {
            OutputFolder.Prepare(outDir, "--out");
            if (resumeDir is null || !OutputFolder.SamePath(resumeDir, outDir))
                OutputFolder.ClaimForNewRun(outDir, overwrite);
            foreach (var leftover in TrainingRun.RemoveLeftovers(outDir))
                Console.WriteLine($"Removed {leftover}, left by a write that was killed.");
        }

        var reading = DataReading.From(tokenizerPath, weightsPath, dataFormat);
        reading.CheckFormatApplies(dataPath, validationPath);
        var data = TrainingStream(dataPath, reading, model, seq, options.Seed);
        ValidationOptions? validation = null;
        if (validationPath is not null)
        {
            validation = new ValidationOptions(EvaluationSet(validationPath, reading, model, seq))
                { Every = validationEvery, Sequences = validationSequences };
            try
            {
                validation.Validate();
            }
            catch (ArgumentException e)
            {
                throw new UsageException(e.Message);
            }
        }
        if (epochs is int n)
        {
            if (data is not PackedTrainingData packed)
                throw new UsageException("--epochs needs a .jsonl dataset; give --steps for a token or text file.");
            if (federatedRounds is not null)
                throw new UsageException("--epochs: a federated run's steps are --federated-rounds × --local-steps.");
            options = options with { Steps = (int)Math.Min(int.MaxValue, Math.Ceiling((double)packed.SequencesPerEpoch * n / (options.GradientAccumulation * options.Processes))) };
        }

        // What the checkpoints store, so that --resume DIR alone continues the run.
        var settings = RunSettings.Of(new Dictionary<string, string?>
        {
            ["model"] = model.Name, ["weights"] = weightsPath, ["data"] = dataOption, ["tokenizer"] = tokenizerPath, ["data-format"] = dataFormat,
            ["seq"] = Invariant(seq), ["steps"] = Invariant(options.Steps), ["epochs"] = epochs is int count ? Invariant(count) : null,
            ["lr"] = Invariant(options.LearningRate), ["schedule"] = options.Schedule, ["warmup"] = Invariant(options.WarmupSteps),
            ["grad-accum"] = Invariant(options.GradientAccumulation), ["seed"] = Invariant(options.Seed), ["optimizer"] = options.Optimizer,
            ["weight-decay"] = Invariant(options.WeightDecay), ["method"] = options.Method, ["lcsb-groups"] = Invariant(options.LcsbGroups!.Value),
            ["mezo-eps"] = Invariant(options.MezoEpsilon), ["save-every"] = Invariant(options.SaveEvery), ["base-model"] = options.BaseModel,
            ["adapter"] = adapterDir, ["val-data"] = validationPath,
            ["val-every"] = validationEvery is int every ? Invariant(every) : null,
            ["val-batches"] = validationSequences is int batches ? Invariant(batches) : null,
            ["federated-rounds"] = federatedRounds is int rounds ? Invariant(rounds) : null,
            ["local-steps"] = options.FederatedLocalSteps > 0 ? Invariant(options.FederatedLocalSteps) : null,
        }, dataPath);
        if (checkpoint is not null && Cluster.Writes) // distributed: rank 0 checks; Cluster.Ready compares the others with it
            RunSettings.CheckResume(checkpoint, args, dataPath);

        using var weights = ModelWeights.Open(weightsPath);
        // A resumed run's parameters come from its checkpoint: its starting adapter is not read again.
        var adapter = adapterDir is null || checkpoint is not null
            ? LoraAdapter.CreateNew(model.Lora, model.LoraModules, options.Seed)
            : Export.LoadWhole(adapterDir, model);
        using var trainer = model.Create(backend, weights, adapter, seq, trainerOptions);
        // Distributed: this rank's share of the data, the reducer, validation on rank 0 alone.
        var run = new TrainingRun(trainer, Cluster.Share(data, options, dataOption), options, outDir, Cluster.Writes ? validation : null)
            { Settings = settings, Reducer = Cluster.Reducer(trainer) };
        if (resumeDir is not null && !run.Resume(resumeDir))
            throw new UsageException($"--resume: {resumeDir} holds no checkpoint to resume from.");

        string schedule = options.Method == "mezo" ? "MeZO" : trainer.LcsbGroups == 1 ? "full backprop" : $"LCSB with {trainer.LcsbGroups} groups";
        Console.WriteLine($"Training {model.Name} on {backend.Name}: {schedule}, {options.Optimizer}, lr {options.LearningRate} ({options.Schedule}), " +
                          $"{options.Steps} steps of {options.GradientAccumulation}×{seq} tokens from {data.Description}" +
                          (run.StartStep > 0 ? $", resuming after step {run.StartStep}" : "") + ".");
        if (budget is not null)
            Console.WriteLine(budget.Describe());
        if ((trainer.ActivationsInFile || trainer.OptimizerStateInFile) && trainer.LoraModules.Count > 0
            && !backend.TryGetHostSpan(trainer.LoraModules[0].A, out _))
            Console.WriteLine($"Note: mapped files (--activations / --optimizer-state mmap) hold host memory; on {backend.Name} the " +
                              "checkpoints and the optimizer state are device memory, so they are not mapped.");
        if (validation is not null)
            Console.WriteLine($"Validating every {validation.EveryFor(options)} steps and at the end on " +
                              (validation.Sequences is int k && k < validation.Data.Count ? $"the first {k} of " : "") +
                              $"{validation.Data.Description}.");
        run.StepCompleted += m =>
        {
            if (m.Step == run.StartStep + 1 || m.Step == options.Steps || m.Step % 10 == 0 || m.ValidationLoss is not null)
                Console.WriteLine($"step {m.Step,5}/{options.Steps}  loss {m.Loss,8:F4}  lr {m.LearningRate:E2}  " +
                                  $"{m.TokensPerSecond,8:F0} tok/s  {m.PrivateBytes / 1048576.0,7:F1} MiB private" +
                                  (m.ValidationLoss is float v ? $"  val_loss {v,8:F4}" : ""));
        };
        using var signals = new StopSignals();
        // What loading left behind (the tokenizer's vocabulary and merges, the JSONL text, the JSON of
        // the files read) is garbage now: collected and given back before the run, not carried through it.
        GC.Collect(2, GCCollectionMode.Aggressive, blocking: true, compacting: true);
        try
        {
            Cluster.Ready(run, trainer, data, options); // distributed: every rank ready, and running what rank 0 runs
            if (!run.Run(signals.Token))
            {
                Console.WriteLine(run.LastCheckpointStep is int saved
                    ? $"Stopped by {signals.SignalName} after step {saved}: the checkpoint is in {Path.Combine(outDir, TrainingRun.CheckpointFolder)}; " +
                      $"continue with: lora train --resume {outDir}"
                    : $"Stopped by {signals.SignalName} before the first step; nothing to save.");
                return signals.ExitCode;
            }
        }
        catch (TrainingDivergedException e)
        {
            string kept = run.LastCheckpointStep is int saved
                ? $"the last checkpoint (step {saved}) is kept in {Path.Combine(outDir, TrainingRun.CheckpointFolder)}"
                : "no checkpoint was written before it (--save-every N keeps one)";
            throw new TrainingRunException($"{e.Message}: the run diverged (lr {options.LearningRate}); nothing of step {e.Step} was saved, " +
                                           $"{kept}, and {Path.Combine(outDir, TrainingRun.MetricsFile)} holds steps 1 to {e.Step - 1}. " +
                                           "Start again with a lower --lr (and --overwrite).", e);
        }
        Console.WriteLine($"Wrote the adapter, metrics.csv and loss.svg to {outDir}.");
        return 0;
    }

    private static string Invariant(int value) => value.ToString(CultureInfo.InvariantCulture);

    private static string Invariant(float value) => value.ToString("R", CultureInfo.InvariantCulture);

    /// <summary>
    /// <c>--seq N</c>: at least 2, and at most the model's max_position_embeddings (the positions it
    /// was trained for) when its config gives it.
    /// </summary>
    internal static int Seq(Args args, ModelInfo model, int defaultValue)
    {
        int seq = args.Int("seq", defaultValue, min: 2);
        if (model.MaxPositionEmbeddings > 0 && seq > model.MaxPositionEmbeddings)
            throw new UsageException($"--seq: {seq} is more than the {model.MaxPositionEmbeddings} positions {model.Name} was trained for " +
                                     "(max_position_embeddings in its config).");
        return seq;
    }

    public static int CompareGrads(string[] files)
    {
        if (files.Length != 2)
            throw new UsageException("compare-grads takes two gradient files: compare-grads A B.");
        using var a = SafeTensorsFile.Open(files[0]);
        using var b = SafeTensorsFile.Open(files[1]);
        var common = a.Names.Where(b.Contains).Order(StringComparer.Ordinal).ToList();
        if (common.Count == 0)
            throw new UsageException($"{files[0]} and {files[1]} have no tensor name in common.");
        double dot = 0, aa = 0, bb = 0;
        var perTensor = new List<double>();
        foreach (var name in common)
        {
            var (x, y) = (a.Read(name), b.Read(name));
            if (x.Length != y.Length)
                throw new UsageException($"tensor '{name}' has {x.Length} values in {files[0]} but {y.Length} in {files[1]}.");
            double d = 0, xx = 0, yy = 0;
            for (int i = 0; i < x.Length; i++)
                (d, xx, yy) = (d + (double)x[i] * y[i], xx + (double)x[i] * x[i], yy + (double)y[i] * y[i]);
            (dot, aa, bb) = (dot + d, aa + xx, bb + yy);
            if (xx > 0 && yy > 0)
                perTensor.Add(d / Math.Sqrt(xx * yy));
        }
        perTensor.Sort();
        Console.WriteLine($"{common.Count} tensors in common ({a.Names.Count - common.Count} only in A, {b.Names.Count - common.Count} only in B)");
        Console.WriteLine($"cosine similarity, all tensors as one vector: {dot / Math.Sqrt(aa * bb):F6}");
        if (perTensor.Count > 0)
            Console.WriteLine($"per tensor: min {perTensor[0]:F4}  median {perTensor[perTensor.Count / 2]:F4}  max {perTensor[^1]:F4}");
        Console.WriteLine($"norms: |A| {Math.Sqrt(aa):E4}  |B| {Math.Sqrt(bb):E4}");
        return 0;
    }

    /// <summary>
    /// The convergence study: the same model, data and number of steps trained with full backprop,
    /// LCSB and MeZO, each from the same initial adapter. Prints a table and writes the curves.
    /// </summary>
    public static int Study(Args args)
    {
        var model = Model(args);
        string dataPath = args.Required("data");
        string outDir = args.Required("out");
        string? weightsPath = args.Optional("weights");
        int steps = args.Int("steps", 200, min: 1);
        int seq = Seq(args, model, 128);
        float lr = args.Float("lr", 1e-2f, min: 0);
        float mezoLr = args.Float("mezo-lr", 1e-3f, min: 0);
        int seed = args.Int("seed", 1);
        var methods = args.Get("methods", "full,lcsb2,lcsb4,mezo").Split(',', StringSplitOptions.RemoveEmptyEntries);
        using var backend = Backend(args);
        args.RejectUnknown();

        if (weightsPath is null)
        {
            weightsPath = Path.Combine(outDir, "base");
            RandomWeights.Write(model, weightsPath, seed, std: 0.3f);
        }
        var tokens = ReadTrainingTokens(dataPath, model);
        using var weights = ModelWeights.Open(weightsPath);
        var results = new List<(string Method, StudyRun Run)>();
        foreach (var method in methods)
        {
            var options = method switch
            {
                "full" => new TrainingOptions { Steps = steps, LearningRate = lr, Seed = seed, LcsbGroups = 1 },
                "mezo" => new TrainingOptions { Steps = steps, LearningRate = mezoLr, Seed = seed, Method = "mezo", Optimizer = "sgd" },
                _ when method.StartsWith("lcsb") && int.TryParse(method[4..], out int k) =>
                    new TrainingOptions { Steps = steps, LearningRate = lr, Seed = seed, LcsbGroups = k },
                _ => throw new UsageException($"Unknown study method '{method}' (full, lcsbK, mezo)."),
            };
            var adapter = LoraAdapter.CreateNew(model.Lora, model.LoraModules, seed);
            using var trainer = model.Create(backend, weights, adapter, seq);
            var run = new TrainingRun(trainer, new TokenWindows(tokens, seq, dataPath), options, Path.Combine(outDir, method));
            Console.Write($"{method}: ");
            run.StepCompleted += m => { if (m.Step % Math.Max(1, steps / 10) == 0) Console.Write($"{m.Loss:F3} "); };
            run.Run();
            Console.WriteLine();
            results.Add((method, new StudyRun(run.Metrics)));
        }

        var baseline = results.FirstOrDefault(r => r.Method == "full").Run;
        Console.WriteLine();
        Console.WriteLine($"{model.Name}, {steps} steps of {seq} tokens, {backend.Name}, {Environment.ProcessorCount} cores");
        Console.WriteLine($"{"method",-8} {"final loss",11} {"vs full",8} {"wall s",8} {"steps/s",8} {"speedup",8}");
        foreach (var (method, run) in results)
        {
            string vsFull = baseline is null ? "" : $"{(run.FinalLoss / baseline.FinalLoss - 1) * 100,7:+0.0;-0.0}%";
            string speedup = baseline is null ? "" : $"{run.StepsPerSecond / baseline.StepsPerSecond,7:F2}x";
            Console.WriteLine($"{method,-8} {run.FinalLoss,11:F4} {vsFull,8} {run.Seconds,8:F1} {run.StepsPerSecond,8:F2} {speedup,8}");
        }
        Console.WriteLine("final loss: mean of the last 10% of steps. steps/s: without the first step (warm-up).");
        SvgPlot.Write(Path.Combine(outDir, "study.svg"), $"{model.Name}: training loss by method", "step", "loss",
            results.Select(r => (r.Method, (IReadOnlyList<(double, double)>)r.Run.Metrics.Select(m => ((double)m.Step, (double)m.Loss)).ToList())).ToList());
        Console.WriteLine($"Wrote the curves to {Path.Combine(outDir, "study.svg")}.");
        return 0;
    }

    private sealed record StudyRun(IReadOnlyList<StepMetrics> Metrics)
    {
        public double FinalLoss => Metrics.TakeLast(Math.Max(1, Metrics.Count / 10)).Average(m => m.Loss);
        public double Seconds => Metrics[^1].ElapsedSeconds;
        public double StepsPerSecond => (Metrics.Count - 1) / (Metrics[^1].ElapsedSeconds - Metrics[0].ElapsedSeconds);
    }

    /// <summary><c>--activations memory|mmap</c> and <c>--optimizer-state memory|mmap</c>, over the model JSON's trainer section.</summary>
    internal static TrainerOptions Placement(Args args)
    {
        try
        {
            return new TrainerOptions(
                TrainerOptions.ParsePlacement(args.Optional("activations"), "--activations"),
                TrainerOptions.ParsePlacement(args.Optional("optimizer-state"), "--optimizer-state"));
        }
        catch (ArgumentException e)
        {
            throw new UsageException(e.Message);
        }
    }

    /// <summary>The options every training command shares, each checked against its range.</summary>
    private static TrainingOptions TrainingOptionsFrom(Args args, ModelInfo model)
    {
        var options = new TrainingOptions
        {
            Steps = args.Int("steps", 100, min: 1),
            LearningRate = args.Float("lr", 1e-3f, min: 0),
            Schedule = args.Get("schedule", "constant"),
            WarmupSteps = args.Int("warmup", 0, min: 0),
            GradientAccumulation = args.Int("grad-accum", 1, min: 1),
            Seed = args.Int("seed", 0),
            Optimizer = args.Get("optimizer", "adamw"),
            WeightDecay = args.Float("weight-decay", 0f, min: 0),
            Method = args.Get("method", "backprop"),
            // Always set (the model JSON's when not given), so that a checkpoint states the schedule it ran.
            LcsbGroups = args.IntOrNull("lcsb-groups", min: 1, max: model.Layers) ?? model.Defaults.LcsbGroups ?? 1,
            MezoEpsilon = args.Float("mezo-eps", 1e-3f, min: 0, exclusiveMin: true),
            SaveEvery = args.Int("save-every", 0, min: 0),
        };
        if (options.Schedule is not ("constant" or "cosine"))
            throw new UsageException($"--schedule: '{options.Schedule}' is not a schedule (available: constant, cosine).");
        if (options.Method is not ("backprop" or "mezo"))
            throw new UsageException($"--method: '{options.Method}' is not a method (available: backprop, mezo).");
        if (options.Optimizer is not ("adamw" or "sgd"))
            throw new UsageException($"--optimizer: '{options.Optimizer}' is not an optimizer (available: adamw, sgd).");
        if (options.Schedule == "cosine" && options.WarmupSteps >= options.Steps)
            throw new UsageException($"--warmup: {options.WarmupSteps} steps of warmup leave nothing of a cosine schedule of {options.Steps} steps.");
        try
        {
            options.Validate();
        }
        catch (ArgumentException e)
        {
            throw new UsageException(e.Message);
        }
        return options;
    }

    internal static ModelInfo Model(Args args)
    {
        string name = args.Required("model");
        return TrainerCatalog.Find(name) ?? throw new UsageException(
            $"No trainer for model '{name}'. This build has: {string.Join(", ", TrainerCatalog.All.Select(m => m.Name))}. " +
            "Add models/<name>.json and rebuild to get one.");
    }

    private static IBackend Backend(Args args) => BackendOptions.Create(args);

    /// <summary>
    /// The sequences a run trains on: a <c>.jsonl</c> file of text, prompt/completion or chat examples
    /// through the model's tokenizer, packed into sequences; otherwise consecutive windows of a token
    /// file or of a text file's tokens (<see cref="DataFiles"/>).
    /// </summary>
    private static ITrainingData TrainingStream(string dataPath, DataReading reading, ModelInfo model, int seq, int seed) =>
        DataFiles.Training(dataPath, reading, model, seq, seed);

    /// <summary>
    /// Held-out data for <c>eval</c> and <c>train --val-data</c>, in the formats <see cref="TrainingStream"/>
    /// reads and packed the same way, in the file's order: every window of a token or text file, every
    /// packed sequence of a JSONL file.
    /// </summary>
    internal static EvaluationData EvaluationSet(string dataPath, DataReading reading, ModelInfo model, int seq) =>
        DataFiles.Evaluation(dataPath, reading, model, seq);

    /// <summary>The folder of a weights PATH: the folder itself, or the one holding the file.</summary>
    internal static string FolderOf(string weightsPath) =>
        Directory.Exists(weightsPath) ? weightsPath : Path.GetDirectoryName(Path.GetFullPath(weightsPath))!;

    /// <summary>
    /// The model JSON this build's trainer was generated from (embedded in this program from models/),
    /// for a model folder that has no config.json of its own.
    /// </summary>
    internal static string ModelJson(ModelInfo model)
    {
        using var stream = typeof(Commands).Assembly.GetManifestResourceStream(model.SourceFile)
            ?? throw new UsageException($"{model.SourceFile} is not in this build of lora; give a weights folder with a config.json.");
        using var reader = new StreamReader(stream);
        return reader.ReadToEnd();
    }

    /// <summary>A model folder's tokenizer.json: beside the weights file, or in the weights folder.</summary>
    internal static string TokenizerBeside(string weightsPath) =>
        Path.Combine(Directory.Exists(weightsPath) ? weightsPath : Path.GetDirectoryName(Path.GetFullPath(weightsPath))!, "tokenizer.json");

    /// <summary>A JSON array of token ids.</summary>
    internal static int[] ReadTokens(string path)
    {
        try
        {
            return JsonSerializer.Deserialize<int[]>(File.ReadAllText(path)) is { Length: > 0 } tokens
                ? tokens
                : throw new UsageException($"{path}: expected a non-empty JSON array of token ids.");
        }
        catch (JsonException e)
        {
            throw new UsageException($"{path}: expected a JSON array of token ids ({e.Message}).");
        }
    }

    /// <summary>
    /// The study's tokens: a <c>.json</c> file is an array of token ids; any other file is text whose UTF-8
    /// bytes are the tokens (for models whose vocabulary holds the 256 byte values; the study runs on
    /// random weights, where no tokenizer gives the tokens a meaning).
    /// </summary>
    private static int[] ReadTrainingTokens(string path, ModelInfo model)
    {
        if (path.EndsWith(".json", StringComparison.OrdinalIgnoreCase))
            return ReadTokens(path);
        if (model.Vocab < 256)
            throw new UsageException($"{model.Name} has a vocabulary of {model.Vocab}, too small for byte tokens; pass a .json array of token ids.");
        return File.ReadAllBytes(path).Select(b => (int)b).ToArray();
    }
}
