using System;
using System.Collections.Generic;
using System.Linq;

namespace LoraCompiler.Generator;

public sealed partial class LoraGenerator
{
    /// <summary>Derives what the trainer does from what the config says.</summary>
    internal static TrainerPlan Plan(ModelSpec spec)
    {
        var projections = PlanProjections(spec);
        var ropeTables = new List<RopeTable> { new("rope", spec.Rope, spec.LocalRope is null ? "RoPE cos/sin table" : "RoPE table of the full-attention layers") };
        if (spec.LocalRope is { } local)
            ropeTables.Add(new RopeTable("ropeLocal", local, "RoPE table of the sliding-window layers"));

        // One kind per distinct attention window (and its RoPE table): Qwen2 has one, Gemma 3 two.
        var windows = spec.LayerWindows.Distinct().OrderByDescending(w => w).ToList();
        var kinds = windows.Select(window =>
        {
            string table = window > 0 && spec.LocalRope is not null ? "ropeLocal" : "rope";
            var ops = PlanGradients(PlanLayerOps(spec, projections, window, table));
            string name = windows.Count == 1 ? "" : window > 0 ? "Sliding" : "Full";
            string description = window > 0 ? $"sliding-window attention over the last {window} keys" : "full causal attention";
            var (kept, remade) = PlanKept(spec, ops);
            return new LayerKind(name, description, window, table, ops.ToEquatableArray(), RecomputeUntil(ops), kept, remade);
        }).ToList();
        var schedule = spec.LayerWindows.Select(w => windows.IndexOf(w)).ToEquatableArray();

        return new TrainerPlan(spec, PlanBuffers(spec, projections, kinds, ropeTables).ToEquatableArray(),
            projections.ToEquatableArray(), kinds.ToEquatableArray(), schedule, ropeTables.ToEquatableArray());
    }

    /// <summary>The residual stream's values: the layer's input, the stream after attention, the layer's output. Their gradient is dx.</summary>
    private static bool IsResidual(string value) => value is "x" or "x2" or "output";

    /// <summary>
    /// The gradient buffer of a value: dx for the residual stream, dxn for every token norm's output
    /// (they are consumed one after the other), d + Name otherwise.
    /// </summary>
    private static string Grad(string value) =>
        IsResidual(value) ? "dx"
        : value is "xn" or "xn2" ? "dxn"
        : "d" + char.ToUpperInvariant(value[0]) + value.Substring(1);

    private static List<Projection> PlanProjections(ModelSpec s)
    {
        int qDim = s.Heads * s.HeadDim, kvDim = s.KvHeads * s.HeadDim;
        bool qkNorm = s.Traits.QkNorm, sandwich = s.Traits.SandwichNorms;
        Projection P(string name, string block, string inName, int inSize, string outName, int outSize,
                     string input, string output, bool hasBias) =>
            new(name, $"{block}.{name}", FieldName(name), inName, inSize, outName, outSize,
                input, output, Grad(input), Grad(output), hasBias, s.TargetModules.Contains(name));

        return new List<Projection>
        {
            P("q_proj", "self_attn", "Hidden", s.Hidden, "QDim", qDim, "xn", qkNorm ? "qRaw" : "q", s.QkvBias),
            P("k_proj", "self_attn", "Hidden", s.Hidden, "KvDim", kvDim, "xn", qkNorm ? "kRaw" : "k", s.QkvBias),
            P("v_proj", "self_attn", "Hidden", s.Hidden, "KvDim", kvDim, "xn", "v", s.QkvBias),
            P("o_proj", "self_attn", "QDim", qDim, "Hidden", s.Hidden, "att", sandwich ? "attnOut" : "x2", s.OutputBias),
            P("gate_proj", "mlp", "Hidden", s.Hidden, "Intermediate", s.Intermediate, "xn2", "gate", false),
            P("up_proj", "mlp", "Hidden", s.Hidden, "Intermediate", s.Intermediate, "xn2", "up", false),
            P("down_proj", "mlp", "Intermediate", s.Intermediate, "Hidden", s.Hidden, "act", sandwich ? "mlpOut" : "output", false),
        };
    }

    /// <summary>"gate_proj" → "GateProj".</summary>
    private static string FieldName(string module) =>
        string.Concat(module.Split('_').Select(part => char.ToUpperInvariant(part[0]) + part.Substring(1)));

    /// <summary>
    /// A layer as an ordered list of ops, from the architecture's traits: the attention block, then the
    /// MLP block, each a residual branch. Gemma 3 norms each branch's output before its residual add
    /// (the sandwich) and norms q and k per head, as Qwen3 does.
    /// </summary>
    private static List<LayerOp> PlanLayerOps(ModelSpec s, List<Projection> projections, int window, string ropeTable)
    {
        var t = s.Traits;
        Projection Proj(string name) => projections.First(p => p.Name == name);
        NormOp Norm(string module, string path, string field, string input, string output, string rstd, string? heads = null) =>
            new(module, path, field, input, output, rstd, heads is null ? "Hidden" : "HeadDim", heads is null ? s.Hidden : s.HeadDim,
                heads, heads switch { null => 1, "Heads" => s.Heads, _ => s.KvHeads }, Grad(input), Grad(output), Accumulate: false);
        LinearOp Linear(string name) => new(Proj(name), Accumulate: false);

        var ops = new List<LayerOp>
        {
            Norm("input_layernorm", "input_layernorm", "wInputNorm", "x", "xn", "rstd1"),
            Linear("q_proj"),
            Linear("k_proj"),
            Linear("v_proj"),
        };
        if (t.QkNorm)
        {
            ops.Add(Norm("q_norm", "self_attn.q_norm", "wQNorm", "qRaw", "q", "rstdQ", "Heads"));
            ops.Add(Norm("k_norm", "self_attn.k_norm", "wKNorm", "kRaw", "k", "rstdK", "KvHeads"));
        }
        ops.Add(new RopeOp("q", "Heads", ropeTable, Grad("q")));
        ops.Add(new RopeOp("k", "KvHeads", ropeTable, Grad("k")));
        ops.Add(new AttentionOp("q", "k", "v", "att", "lse", window, Grad("q"), Grad("k"), Grad("v"), Grad("att")));
        ops.Add(Linear("o_proj"));
        if (t.SandwichNorms)
            ops.Add(Norm("post_attention_layernorm", "post_attention_layernorm", "wPostAttentionNorm", "attnOut", "x2", "rstd2"));
        ops.Add(new ResidualOp("x2", "x"));

        ops.Add(t.SandwichNorms
            ? Norm("pre_feedforward_layernorm", "pre_feedforward_layernorm", "wPreFeedforwardNorm", "x2", "xn2", "rstd3")
            : Norm("post_attention_layernorm", "post_attention_layernorm", "wPostAttentionNorm", "x2", "xn2", "rstd2"));
        ops.Add(Linear("gate_proj"));
        ops.Add(Linear("up_proj"));
        ops.Add(new GluOp("gate", "up", "act", s.Activation, Grad("gate"), Grad("up"), Grad("act")));
        ops.Add(Linear("down_proj"));
        if (t.SandwichNorms)
            ops.Add(Norm("post_feedforward_layernorm", "post_feedforward_layernorm", "wPostFeedforwardNorm", "mlpOut", "output", "rstd4"));
        ops.Add(new ResidualOp("output", "x2"));
        return ops;
    }

    /// <summary>
    /// Decides, walking the ops in reverse as backward does, whether each op's input gradient is the
    /// first write to its buffer (=) or adds to one already holding a gradient (+=). A gradient buffer
    /// holds a gradient from its first write until the op that produced its value in forward has read
    /// it; the residual stream's dx always does.
    /// </summary>
    private static List<LayerOp> PlanGradients(List<LayerOp> ops)
    {
        var live = new HashSet<string> { "dx" };
        bool Write(string grad)
        {
            bool accumulate = live.Contains(grad);
            live.Add(grad);
            return accumulate;
        }
        void Consume(string grad)
        {
            if (grad != "dx")
                live.Remove(grad);
        }
        void Fresh(string grad)
        {
            if (Write(grad))
                throw new InvalidOperationException($"the plan writes {grad} with a kernel that cannot add to it");
        }

        var planned = new LayerOp[ops.Count];
        for (int i = ops.Count - 1; i >= 0; i--)
        {
            switch (ops[i])
            {
                case NormOp n:
                    Consume(n.OutputGrad);
                    planned[i] = n with { Accumulate = Write(n.InputGrad) };
                    break;
                case LinearOp l:
                    Consume(l.Projection.OutputGrad);
                    planned[i] = l with { Accumulate = Write(l.Projection.InputGrad) };
                    break;
                case AttentionOp a:
                    Consume(a.OutputGrad);
                    Fresh(a.QGrad);
                    Fresh(a.KGrad);
                    Fresh(a.VGrad);
                    planned[i] = a;
                    break;
                case GluOp g:
                    Consume(g.OutputGrad);
                    Fresh(g.GateGrad);
                    Fresh(g.UpGrad);
                    planned[i] = g;
                    break;
                default:
                    planned[i] = ops[i]; // RoPE works in place, a residual add passes dx on
                    break;
            }
        }
        return planned.ToList();
    }

    /// <summary>What an op's backward reads of what forward computed (beyond the incoming gradient).</summary>
    private static IEnumerable<string> SavedFor(LayerOp op) => op switch
    {
        NormOp n => new[] { n.Input, n.Rstd },
        LinearOp l => l.Projection.Targeted ? new[] { l.Projection.Input } : Array.Empty<string>(),
        AttentionOp a => new[] { a.Q, a.K, a.V, a.Output, a.Lse },
        GluOp g => new[] { g.Gate, g.Up },
        _ => Array.Empty<string>(),
    };

    /// <summary>What an op writes in forward.</summary>
    private static IEnumerable<string> Written(LayerOp op) => op switch
    {
        NormOp n => new[] { n.Output, n.Rstd },
        LinearOp l => new[] { l.Projection.Output },
        RopeOp r => new[] { r.Target },
        AttentionOp a => new[] { a.Output, a.Lse },
        GluOp g => new[] { g.Output },
        ResidualOp r => new[] { r.Target },
        _ => Array.Empty<string>(),
    };

    /// <summary>The floats per token of each value an op writes in forward.</summary>
    private static IEnumerable<(string Value, long Width)> WrittenWidths(ModelSpec s, LayerOp op) => op switch
    {
        NormOp n => new[] { (n.Output, (long)n.WidthSize * n.HeadCount), (n.Rstd, (long)n.HeadCount) },
        LinearOp l => new[] { (l.Projection.Output, (long)l.Projection.OutSize) },
        AttentionOp a => new[] { (a.Output, (long)s.Heads * s.HeadDim), (a.Lse, (long)s.Heads) },
        GluOp g => new[] { (g.Output, (long)s.Intermediate) },
        _ => Array.Empty<(string, long)>(), // RoPE and the residual add work in place
    };

    /// <summary>What an op reads in forward.</summary>
    private static IEnumerable<string> Read(LayerOp op) => op switch
    {
        NormOp n => new[] { n.Input },
        LinearOp l => new[] { l.Projection.Input },
        RopeOp r => new[] { r.Target },
        AttentionOp a => new[] { a.Q, a.K, a.V },
        GluOp g => new[] { g.Gate, g.Up },
        ResidualOp r => new[] { r.Target, r.Source },
        _ => Array.Empty<string>(),
    };

    /// <summary>The gradients an op's backward reads and writes.</summary>
    private static (string[] Reads, string[] Writes) GradientsOf(LayerOp op) => op switch
    {
        NormOp n => (new[] { n.OutputGrad }, new[] { n.InputGrad }),
        LinearOp l => (new[] { l.Projection.OutputGrad }, new[] { l.Projection.InputGrad }),
        RopeOp r => (new[] { r.TargetGrad }, new[] { r.TargetGrad }),
        AttentionOp a => (new[] { a.OutputGrad }, new[] { a.QGrad, a.KGrad, a.VGrad }),
        GluOp g => (new[] { g.OutputGrad }, new[] { g.GateGrad, g.UpGrad }),
        _ => (Array.Empty<string>(), Array.Empty<string>()),
    };

    /// <summary>
    /// What a layer that keeps its activations holds from its forward to its backward: every value some
    /// op's backward reads (beyond the layer's input x, its checkpoint), less those remade on the way
    /// back by rerunning a cheap op (a norm, the gated activation) from kept values. An op is remade only
    /// where nothing later in forward changes its output in place (RoPE rotates q and k, a residual adds
    /// to x2), so that rerunning it gives what backward would have read. Kept values are in forward order.
    /// </summary>
    private static (EquatableArray<KeptValue> Kept, EquatableArray<int> Remade) PlanKept(ModelSpec s, List<LayerOp> ops)
    {
        var saved = new List<string>();
        foreach (var op in ops)
            foreach (var value in SavedFor(op))
                if (value is not ("x" or "output") && !saved.Contains(value))
                    saved.Add(value);
        var changedInPlace = new HashSet<string>();
        var remade = new List<int>();
        for (int i = 0; i < ops.Count; i++)
            if (ops[i] is NormOp or GluOp && !Written(ops[i]).Any(v => ops.Skip(i + 1).Any(later => InPlaceTarget(later) == v)))
                remade.Add(i);

        // A remade op needs its inputs: x, a kept value, or the output of an earlier remade op. Drop the
        // ones that lack them until none does (their outputs are kept instead).
        while (true)
        {
            var remadeValues = new HashSet<string>(remade.SelectMany(i => Written(ops[i])));
            var available = new HashSet<string>(saved.Where(v => !remadeValues.Contains(v))) { "x" };
            int failing = -1;
            foreach (int i in remade)
            {
                if (!Read(ops[i]).All(available.Contains))
                {
                    failing = i;
                    break;
                }
                foreach (var v in Written(ops[i]))
                    available.Add(v);
            }
            if (failing < 0)
                break;
            remade.Remove(failing);
        }

        var remadeOutputs = new HashSet<string>(remade.SelectMany(i => Written(ops[i])));
        var kept = new List<KeptValue>();
        foreach (var value in saved.Where(v => !remadeOutputs.Contains(v)))
        {
            var writer = ops.Last(op => Written(op).Contains(value) && WrittenWidths(s, op).Any(w => w.Value == value));
            var (_, width) = WrittenWidths(s, writer).First(w => w.Value == value);
            kept.Add(new KeptValue(value, width, WrittenDims(writer, value), Purpose(s, ops.Last(op => Written(op).Contains(value)), value)));
        }
        return (kept.ToEquatableArray(), remade.ToEquatableArray());
    }

    /// <summary>The value an op changes in place (RoPE's target, a residual add's), or null.</summary>
    private static string? InPlaceTarget(LayerOp op) => op switch
    {
        RopeOp r => r.Target,
        ResidualOp r => r.Target,
        _ => null,
    };

    /// <summary>The floats per token of a value an op writes, in the trainer's dimension constants.</summary>
    private static string WrittenDims(LayerOp op, string value) => op switch
    {
        NormOp n when value == n.Rstd => n.Heads ?? "1",
        NormOp n => n.Heads is null ? n.Width : $"{n.Heads} * {n.Width}",
        LinearOp l => l.Projection.Out,
        AttentionOp a when value == a.Lse => "Heads",
        AttentionOp => "QDim",
        GluOp => "Intermediate",
        _ => "Hidden",
    };

    /// <summary>
    /// The index of the last op backward's recompute must run: the latest op whose result some op's
    /// backward reads (a norm's backward reads its own rstd). Nothing after it is recomputed.
    /// </summary>
    private static int RecomputeUntil(List<LayerOp> ops)
    {
        int until = -1;
        for (int c = 0; c < ops.Count; c++)
            foreach (var value in SavedFor(ops[c]))
            {
                // The last writer of the value before the consumer runs (or the consumer itself, for its rstd or lse).
                for (int w = c; w >= 0; w--)
                    if (Written(ops[w]).Contains(value) && (w < c || !Read(ops[c]).Contains(value)))
                    {
                        until = Math.Max(until, w);
                        break;
                    }
            }
        return until;
    }

    /// <summary>
    /// Every buffer one step needs, derived from the layer's ops: the checkpoints, the activations the
    /// ops write, the gradients backward writes, the scratch, the weights the ops read. Sizes are linear
    /// in the sequence length T (attention keeps only a log-sum-exp per row); weights and LoRA tensors do
    /// not depend on T. A gradient buffer lives in the memory of an earlier buffer of its size whose
    /// lifetime in the layer's forward and backward does not overlap its own.
    /// </summary>
    private static IEnumerable<PlannedBuffer> PlanBuffers(ModelSpec s, List<Projection> projections, List<LayerKind> kinds, List<RopeTable> ropeTables)
    {
        long c = s.Hidden;
        var ops = kinds[0].Ops;
        var widths = new Dictionary<string, long>();
        foreach (var op in ops)
            foreach (var (value, width) in WrittenWidths(s, op))
                widths[value] = width;
        long WidthOfGrad(string grad) => widths[ops.SelectMany(Written).First(v => Grad(v) == grad)];

        var result = new List<PlannedBuffer>();
        for (int i = 0; i <= s.Layers; i++)
            result.Add(new(CheckpointField(i), BufferRole.Checkpoint, 0, c,
                i < s.Layers ? $"input of layer {i} (MeBP checkpoint)" : "output of the last layer"));

        // One layer's activations: written by forward (or its recompute), read by that layer's backward.
        foreach (var op in ops)
            foreach (var value in Written(op))
                if (value is not ("x" or "output") && !result.Any(b => b.Field == value))
                    result.Add(new(value, BufferRole.Activation, 0, widths[value], Purpose(s, op, value)));

        // Gradients, in the order backward first writes them.
        foreach (var op in ops.Reverse())
            foreach (var grad in GradientsOf(op).Writes)
                if (!result.Any(b => b.Field == grad))
                    result.Add(new(grad, BufferRole.Gradient, 0, WidthOfGrad(grad), grad switch
                    {
                        "dx" => "gradient of the residual stream",
                        "dxn" => "gradient of a norm's output",
                        _ => $"gradient of {ops.SelectMany(Written).First(v => Grad(v) == grad)}",
                    }));
        result = ShareMemory(result, ops).ToList();

        // A layer that keeps its activations (a memory budget's choice) holds them in a buffer of its own.
        var widest = kinds.OrderByDescending(k => k.KeptPerToken).First();
        result.Add(new("kept", BufferRole.KeptActivations, 0, widest.KeptPerToken,
            $"one kept layer's {string.Join(", ", widest.Kept.Select(k => k.Value))}, from its forward to its backward " +
            "(for each layer the memory budget keeps; none by default)"));

        result.Add(new("loraH", BufferRole.Scratch, 0, s.LoraRank, "H = X·Aᵀ, recomputed for each projection (MeSP)"));
        result.Add(new("loraDH", BufferRole.Scratch, 0, s.LoraRank, "dH = s·G·B"));
        result.Add(new("logits", BufferRole.Scratch, 0, s.LmHeadChunk, $"one LM-head chunk of {s.LmHeadChunk} vocabulary rows"));
        foreach (var table in ropeTables)
        {
            result.Add(new(table.Prefix + "Cos", BufferRole.Scratch, 0, s.HeadDim / 2, table.Purpose.Replace("cos/sin", "cos").Replace("table", "cos table")));
            result.Add(new(table.Prefix + "Sin", BufferRole.Scratch, 0, s.HeadDim / 2, table.Purpose.Replace("cos/sin", "sin").Replace("table", "sin table")));
        }

        // Weights are mapped from the model files (IBackend.MapWeight), not allocated: on the CPU an F32
        // or 4-bit file is used in place, so they are file pages rather than the trainer's own memory.
        // The sizes here are their float32 element counts.
        long vocabTable = (long)s.Vocab * c;
        result.Add(new("embedTokens", BufferRole.Weights, vocabTable, 0,
            s.TiedEmbeddings ? "model.embed_tokens.weight, also the LM head (tied)" : "model.embed_tokens.weight"));
        if (!s.TiedEmbeddings)
            result.Add(new("lmHead", BufferRole.Weights, vocabTable, 0, "lm_head.weight"));
        result.Add(new("finalNorm", BufferRole.Weights, c, 0, "model.norm.weight"));
        foreach (var (field, name, size, _) in LayerWeights(ops))
            result.Add(new(field, BufferRole.Weights, size, 0, $"{name} of the running layer"));

        long loraPerLayer = projections.Where(p => p.Targeted).Sum(p => (long)s.LoraRank * (p.InSize + p.OutSize));
        int modules = projections.Count(p => p.Targeted) * s.Layers;
        result.Add(new("loraParameters", BufferRole.LoraParameters, loraPerLayer * s.Layers, 0, $"A and B of {modules} LoRA modules"));
        result.Add(new("loraGradients", BufferRole.LoraGradients, loraPerLayer, 0,
            "dA and dB of one layer's modules, reused layer after layer: a layer's gradients are final (and handed on) when its backward ends"));
        return result;
    }

    /// <summary>
    /// A layer's base weights, in the order its ops read them: the field, the Hugging Face name after
    /// the layer prefix, the floats, and the shape in the trainer's dimension constants.
    /// </summary>
    internal static IEnumerable<(string Field, string Name, long Size, string Shape)> LayerWeights(IEnumerable<LayerOp> ops)
    {
        foreach (var op in ops)
        {
            if (op is NormOp n)
                yield return (n.WeightField, n.WeightPath + ".weight", n.WidthSize, n.Width);
            else if (op is LinearOp { Projection: var p })
            {
                yield return ("w" + p.Field, p.Path + ".weight", (long)p.InSize * p.OutSize, $"{p.Out}, {p.In}");
                if (p.HasBias)
                    yield return ("b" + p.Field, p.Path + ".bias", p.OutSize, p.Out);
            }
        }
    }

    private static string Purpose(ModelSpec s, LayerOp op, string value) => (op, value) switch
    {
        (NormOp { Module: "input_layernorm" }, "xn") => "input_layernorm output; the final norm's output",
        (NormOp n, _) when value == n.Rstd => $"{n.Module} 1/rms per {(n.Heads is null ? "token" : "token and head")}",
        (NormOp n, _) => $"{n.Module} output",
        (LinearOp { Projection.Name: "o_proj" }, "x2") => "o_proj output, then the residual stream after attention",
        (LinearOp l, _) => $"{l.Projection.Name} output",
        (RopeOp, "q") => s.Traits.QkNorm ? "queries after q_norm and RoPE" : "queries after RoPE",
        (RopeOp, "k") => s.Traits.QkNorm ? "keys after k_norm and RoPE" : "keys after RoPE",
        (AttentionOp, "lse") => "log-sum-exp of each attention row (the softmax is recomputed from it in backward)",
        (AttentionOp, _) => "attention output, input of o_proj",
        (GluOp g, _) => $"{(g.Activation == Activation.Silu ? "silu" : "gelu_tanh")}(gate)·up, input of down_proj",
        (ResidualOp, "x2") => "the residual stream after attention",
        _ => value,
    };

    /// <summary>Buffers the head (final norm, LM head) or every layer uses beside a layer's ops: never shared.</summary>
    private static readonly string[] Unshared = { "dx", "xn", "rstd1", "dxn" };

    /// <summary>
    /// Lets gradient buffers live in the memory of earlier buffers of the same size whose lifetimes do
    /// not overlap theirs. A lifetime is the span of the layer's timeline (forward's ops, then backward's
    /// in reverse) from a buffer's first use to its last. A GLU backward may write its up gradient over
    /// its incoming gradient (the kernel allows it), so those two may touch at that op.
    /// </summary>
    private static IEnumerable<PlannedBuffer> ShareMemory(List<PlannedBuffer> buffers, EquatableArray<LayerOp> ops)
    {
        int n = ops.Count;
        var spans = new Dictionary<string, (int First, int Last)>();
        void Use(string buffer, int time) =>
            spans[buffer] = spans.TryGetValue(buffer, out var span) ? (Math.Min(span.First, time), Math.Max(span.Last, time)) : (time, time);
        var inPlace = new List<(string Guest, string Host, int Time)>();
        for (int i = 0; i < n; i++)
        {
            foreach (var v in Read(ops[i]).Concat(Written(ops[i])))
                Use(v, i);
            int back = 2 * n - 1 - i;
            var (reads, writes) = GradientsOf(ops[i]);
            foreach (var v in SavedFor(ops[i]).Concat(reads).Concat(writes))
                Use(v, back);
            if (ops[i] is GluOp g)
                inPlace.Add((g.UpGrad, g.OutputGrad, back));
        }

        bool Overlap(string a, string b)
        {
            var (x, y) = (spans[a], spans[b]);
            if (x.First > y.Last || y.First > x.Last)
                return false;
            // The allowed in-place write: a starts exactly where b ends, at that op.
            return !inPlace.Any(p => (p.Guest, p.Host) == (a, b) && x.First == p.Time && y.Last == p.Time);
        }

        var homes = new Dictionary<string, List<string>>(); // host → the buffers living in its memory, host first
        var result = new List<PlannedBuffer>();
        foreach (var b in buffers)
        {
            string? host = null;
            if (b.Role == BufferRole.Gradient && !Unshared.Contains(b.Field) && spans.ContainsKey(b.Field))
                host = homes.Keys.FirstOrDefault(h =>
                {
                    var home = buffers.First(x => x.Field == h);
                    return home.PerToken == b.PerToken && home.Fixed == b.Fixed && homes[h].All(o => !Overlap(b.Field, o));
                });
            if (host is null)
            {
                if (!Unshared.Contains(b.Field) && spans.ContainsKey(b.Field))
                    homes[b.Field] = new List<string> { b.Field };
                result.Add(b);
            }
            else
            {
                homes[host].Add(b.Field);
                result.Add(b with { SharesWith = host });
            }
        }
        return result;
    }

    internal static string CheckpointField(int layer) => $"x{layer:D2}";
}
