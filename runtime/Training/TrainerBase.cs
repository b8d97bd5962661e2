using System.Buffers;
using LoraCompiler.Runtime.Backends;
using LoraCompiler.Runtime.IO;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Runtime.Training;

/// <summary>A layer whose LoRA gradients are final (<see cref="TrainerBase.LayerGradientsReady"/>); a layer LCSB skipped has zero gradients.</summary>
public readonly record struct LayerGradients(int Layer, bool Skipped);

/// <summary>
/// What every generated trainer shares: buffers allocated from its memory plan, weight loading,
/// LoRA tensors on the backend, and input checks. The generated subclass holds the unrolled
/// per-layer forward and backward.
/// </summary>
public abstract class TrainerBase : IDisposable
{
    private readonly Dictionary<string, BufferPlan> _plan;
    private readonly List<Tensor> _owned = [];
    private readonly List<LoraTensors> _lora = [];
    private readonly Dictionary<string, (Tensor DA, Tensor DB)> _sharedGradients = new(StringComparer.Ordinal);
    private readonly Dictionary<string, (float[] DA, float[] DB)> _captured = new(StringComparer.Ordinal);
    private readonly Dictionary<string, LoraModule> _adapterModules;

    protected TrainerBase(ModelInfo info, IBackend backend, ModelWeights weights, LoraAdapter adapter, int maxSequence,
        TrainerOptions? options = null)
    {
        if (maxSequence < 2)
            throw new ArgumentOutOfRangeException(nameof(maxSequence), maxSequence, "A training sequence needs at least 2 tokens.");
        if (adapter.Settings.R != info.Lora.R)
            throw new ArgumentException($"The adapter has LoRA rank {adapter.Settings.R} but {info.Name} was built for r = {info.Lora.R}.");
        weights.Validate(info.BaseTensors);

        Model = info;
        Backend = backend;
        Weights = weights;
        Adapter = adapter;
        MaxSequence = maxSequence;
        LoraScale = adapter.Settings.Scale;
        _plan = info.Buffers.ToDictionary(b => b.Name);
        _adapterModules = adapter.Modules.ToDictionary(m => m.Spec.Module);
        var settings = (options ?? new TrainerOptions()).Or(info.Defaults);
        if (settings.KeptLayers is null && settings.MemoryBudget is long budget)
        {
            // A budget without a plan (the model JSON's trainer.memory_budget): planned here for AdamW,
            // the training default. The command line plans with the run's own optimizer instead.
            BudgetPlan = MemoryBudgetPlanner.Plan(MemoryCosts.For(info, maxSequence), budget,
                settings.ActivationsInFile, settings.OptimizerStateInFile);
            settings = BudgetPlan.ToOptions(settings);
        }
        ActivationsInFile = settings.ActivationsInFile ?? false;
        OptimizerStateInFile = settings.OptimizerStateInFile ?? false;
        LcsbGroups = settings.LcsbGroups ?? 1;
        int kept = settings.KeptLayers ?? 0;
        KeptLayers = kept >= 0 && kept <= info.Layers ? kept
            : throw new ArgumentOutOfRangeException(nameof(options), kept, $"Kept layers must be between 0 and the {info.Layers} layers of {info.Name}.");
        _keptFrom = info.Layers - KeptLayers;
    }

    /// <summary>
    /// How many layers keep their activations from forward to backward, the last ones (layers
    /// L−K..L−1): their backward copies them back instead of recomputing the layer from its checkpoint.
    /// </summary>
    public int KeptLayers { get; }

    private readonly int _keptFrom;

    /// <summary>The plan a memory budget in the options chose (null when the options gave the placement themselves).</summary>
    public MemoryBudgetPlan? BudgetPlan { get; }

    /// <summary>Whether a layer keeps its activations for its backward (<see cref="KeptLayers"/>); allocates nothing.</summary>
    public bool KeepsActivations(int layer) => layer >= _keptFrom;

    private Tensor?[]? _kept;

    /// <summary>The buffer holding a kept layer's activations (the plan's <see cref="BufferRole.KeptActivations"/> buffer, one per kept layer).</summary>
    protected Tensor Kept(int layer) => _kept?[layer] ?? throw new InvalidOperationException($"layer {layer} does not keep its activations");

    /// <summary>Allocates the kept buffers of the layers that keep their activations, from the plan's buffer <paramref name="name"/>.</summary>
    protected void AllocateKept(string name)
    {
        _kept = new Tensor?[Model.Layers];
        for (int layer = _keptFrom; layer < Model.Layers; layer++)
            _kept[layer] = Allocate(name, $"{name}{layer:D2}");
    }

    /// <summary>
    /// One value of a kept layer: copies <paramref name="count"/> floats of <paramref name="value"/> into
    /// <paramref name="kept"/> at <paramref name="at"/> (or back, with <paramref name="restore"/>), and moves
    /// <paramref name="at"/> past them.
    /// </summary>
    protected void CopyKept(Tensor kept, ref long at, Tensor value, long count, bool restore)
    {
        if (restore)
            Backend.CopyRange(value, 0, kept, at, count);
        else
            Backend.CopyRange(kept, at, value, 0, count);
        at += count;
    }

    /// <summary>Whether the checkpoints live in a memory-mapped file (the JSON's trainer.activations, or the options').</summary>
    public bool ActivationsInFile { get; }

    /// <summary>Whether a training run keeps the optimizer state in memory-mapped files.</summary>
    public bool OptimizerStateInFile { get; }

    private int _lcsbGroups;

    /// <summary>
    /// LCSB (layer-cyclic selective backprop): at step t only the layers with layer % K == t % K
    /// backpropagate; the others are the identity on the residual stream. K = 1 is full backprop.
    /// Starts at the options' or the model JSON's <c>trainer.lcsb.groups</c>.
    /// </summary>
    public int LcsbGroups
    {
        get => _lcsbGroups;
        set => _lcsbGroups = value >= 1 && value <= Model.Layers ? value
            : throw new ArgumentOutOfRangeException(nameof(value), value, $"LCSB groups must be between 1 and the {Model.Layers} layers of {Model.Name}.");
    }

    /// <summary>
    /// Raised during backward as soon as a layer's LoRA gradients are final (also for a layer LCSB
    /// skipped, whose gradients are zero), last layer first: an optimizer can step that layer's
    /// modules then (<see cref="LayerModules"/>; <see cref="VisitGradients(LayerGradients, GradientVisitor)"/>
    /// reads them on the host), instead of holding every gradient until the end.
    /// </summary>
    public event Action<LayerGradients>? LayerGradientsReady;

    /// <summary>The modules of one layer, in <see cref="LoraModules"/> order.</summary>
    public IReadOnlyList<LoraTensors> LayerModules(int layer) => ModulesOf(layer);

    private LoraTensors[][]? _layerModules;

    /// <summary>The modules of each layer, grouped once (a step looks them up for every layer without allocating).</summary>
    private LoraTensors[] ModulesOf(int layer)
    {
        _layerModules ??= Enumerable.Range(0, Model.Layers)
            .Select(l => _lora.Where(m => m.Spec.Module.StartsWith($"model.layers.{l}.", StringComparison.Ordinal)).ToArray())
            .ToArray();
        return _layerModules[layer];
    }

    private float[] _zeros = [];
    private float[] _hostDa = [], _hostDb = [];

    /// <summary>n zeros: the gradients of a layer LCSB skipped.</summary>
    private ReadOnlySpan<float> Zeros(long n)
    {
        if (_zeros.Length < n)
            _zeros = new float[n];
        return _zeros.AsSpan(0, (int)n);
    }

    /// <summary>Host buffers for one module's gradients, reused by every module (a backend whose tensors the host cannot read in place).</summary>
    private (float[] DA, float[] DB) HostGradients(LoraTensors m)
    {
        if (_hostDa.Length < m.DA.Length)
            _hostDa = new float[m.DA.Length];
        if (_hostDb.Length < m.DB.Length)
            _hostDb = new float[m.DB.Length];
        return (_hostDa, _hostDb);
    }

    public ModelInfo Model { get; }
    public int MaxSequence { get; }
    public LoraAdapter Adapter { get; }
    public ModelWeights Weights { get; }

    /// <summary>The backend every kernel runs on.</summary>
    public IBackend Backend { get; }

    /// <summary>alpha / r of the adapter this trainer was created with.</summary>
    protected float LoraScale { get; }

    /// <summary>Bytes of <see cref="AllocatedBytes"/> that live in memory-mapped files (trainer.activations = "mmap").</summary>
    public long FileBackedBytes { get; private set; }

    /// <summary>How many base-weight tensors were mapped from the model files so far.</summary>
    public long WeightReads { get; private set; }

    /// <summary>
    /// Bytes of every buffer this trainer allocated: the plan's total at <see cref="MaxSequence"/> less
    /// the weights, which are mapped from the model files, not allocated.
    /// </summary>
    public long AllocatedBytes { get; private set; }

    /// <summary>The adapter's modules on the backend, in the order of <see cref="ModelInfo.LoraModules"/>.</summary>
    public IReadOnlyList<LoraTensors> LoraModules => _lora;

    /// <summary>
    /// One forward and backward pass over a sequence. The loss is the mean next-token cross-entropy
    /// (position t predicts token t+1, as Hugging Face's labels = input_ids). Each layer's LoRA
    /// gradients go to <see cref="LayerGradientsReady"/> and, with <see cref="CaptureGradients"/>, are
    /// added to the captured ones; call <see cref="ZeroGradients"/> between steps.
    /// </summary>
    public float ForwardBackward(ReadOnlySpan<int> tokens) => ForwardBackward(tokens, NextTokenTargets(tokens), step: 0);

    /// <summary>
    /// As <see cref="ForwardBackward(ReadOnlySpan{int})"/> with explicit targets: targets[t] is the token
    /// row t must predict, or −1 for none. The loss is the mean over rows with a target. With LCSB,
    /// <paramref name="step"/> picks the group of layers that backpropagates.
    /// </summary>
    public abstract float ForwardBackward(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, int step);

    /// <summary>The loss alone: forward through every layer, no backward (MeZO's two evaluations).</summary>
    public abstract float Loss(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets);

    /// <summary>
    /// Decoding: runs <paramref name="tokens"/>, at positions position..position+T−1, through every layer
    /// with the keys and values of the earlier positions from <paramref name="cache"/> (and adds theirs),
    /// and writes the last token's logits [vocab] to <paramref name="logits"/>. The first call (position 0)
    /// takes the whole prompt; after it, one token at a time. The adapter is applied unmerged, through
    /// the same LoRA forward as training.
    /// </summary>
    public abstract void Infer(ReadOnlySpan<int> tokens, int position, KvCache cache, Tensor logits);

    /// <summary>A KV cache for decoding up to <paramref name="maxTokens"/> tokens (at most <see cref="MaxSequence"/>, the RoPE tables' length).</summary>
    public KvCache CreateCache(int maxTokens)
    {
        if (maxTokens > MaxSequence)
            throw new ArgumentOutOfRangeException(nameof(maxTokens), maxTokens, $"this trainer's RoPE tables cover {MaxSequence} positions.");
        return new KvCache(Backend, Model, maxTokens);
    }

    /// <summary>Checks a decoding call and returns its token count T.</summary>
    protected int CheckInference(ReadOnlySpan<int> tokens, int position, KvCache cache)
    {
        if (tokens.Length < 1 || (position > 0 && tokens.Length != 1))
            throw new ArgumentException($"Decoding takes the prompt at position 0, then one token at a time; got {tokens.Length} tokens at position {position}.");
        if (position < 0 || position + tokens.Length > cache.MaxTokens)
            throw new ArgumentOutOfRangeException(nameof(position), position, $"{tokens.Length} tokens at position {position} do not fit a cache of {cache.MaxTokens}.");
        _decoding = true;
        return CheckTokens(tokens);
    }

    /// <summary>
    /// A decoding step's attention for one layer: the prompt (position 0) attends causally as in
    /// training and fills the cache; a later token joins the cache and attends to what it holds.
    /// </summary>
    protected void Attend(int layer, KvCache cache, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v, int T, int position, int window)
    {
        if (position == 0)
        {
            Backend.AttentionForward(output, lse, q, k, v, T, Model.Heads, Model.KvHeads, Model.HeadDim, Model.AttentionScale, window);
            cache.Store(layer, k, v, T, position);
            return;
        }
        cache.Store(layer, k, v, 1, position);
        Backend.AttentionDecode(output, q, cache.Keys(layer), cache.Values(layer), cache.Count(layer, position + 1),
            Model.Heads, Model.KvHeads, Model.HeadDim, Model.AttentionScale);
    }

    /// <summary>Hugging Face's labels = input_ids: row t predicts token t+1; the last row predicts nothing.</summary>
    public static int[] NextTokenTargets(ReadOnlySpan<int> tokens)
    {
        var targets = new int[tokens.Length];
        for (int t = 0; t < tokens.Length; t++)
            targets[t] = t + 1 < tokens.Length ? tokens[t + 1] : -1;
        return targets;
    }

    /// <summary>Whether a layer backpropagates at a step under the LCSB schedule.</summary>
    protected bool Selected(int layer, int step) => layer % _lcsbGroups == step % _lcsbGroups;

    /// <summary>Called by a layer's generated backward before it accumulates into the shared gradient buffers.</summary>
    protected void ClearGradients(int layer)
    {
        foreach (var m in ModulesOf(layer))
        {
            Backend.Zero(m.DA, m.DA.Length);
            Backend.Zero(m.DB, m.DB.Length);
        }
    }

    /// <summary>
    /// Called by the generated backward once a layer's gradients are final, also for a layer LCSB
    /// skipped: hands them on (the event, then the capture). A skipped layer's gradients are zero and
    /// are handed on as zeros without touching the backend.
    /// </summary>
    protected void GradientsReady(int layer, bool skipped)
    {
        var ready = new LayerGradients(layer, skipped);
        LayerGradientsReady?.Invoke(ready);
        if (CaptureGradients)
            VisitGradients(ready, (spec, da, db) =>
            {
                if (!_captured.TryGetValue(spec.Module, out var sum))
                    _captured[spec.Module] = sum = (new float[da.Length], new float[db.Length]);
                System.Numerics.Tensors.TensorPrimitives.Add(sum.DA, da, sum.DA);
                System.Numerics.Tensors.TensorPrimitives.Add(sum.DB, db, sum.DB);
            });
    }

    /// <summary>
    /// When true (the default), every layer's gradients are copied to the host as they become final,
    /// summed over <see cref="ForwardBackward(ReadOnlySpan{int})"/> calls until <see cref="ZeroGradients"/>,
    /// for <see cref="DownloadGradients"/>. A training run turns it off and consumes each layer's
    /// gradients in <see cref="LayerGradientsReady"/> instead, so no full set of gradients is held.
    /// </summary>
    public bool CaptureGradients { get; set; } = true;

    /// <summary>Forgets the captured gradients and zeroes the gradient buffers.</summary>
    public void ZeroGradients()
    {
        _captured.Clear();
        foreach (var (da, db) in _sharedGradients.Values)
        {
            Backend.Zero(da, da.Length);
            Backend.Zero(db, db.Length);
        }
    }

    /// <summary>The gradients captured since the last <see cref="ZeroGradients"/>, in module order (zero for a module not reached).</summary>
    public IEnumerable<(LoraModuleSpec Spec, float[] DA, float[] DB)> DownloadGradients()
    {
        if (!CaptureGradients)
            throw new InvalidOperationException("Gradients are only kept with CaptureGradients = true.");
        foreach (var m in _lora)
            yield return _captured.TryGetValue(m.Spec.Module, out var g)
                ? (m.Spec, g.DA, g.DB)
                : (m.Spec, new float[m.DA.Length], new float[m.DB.Length]);
    }

    /// <summary>A module's gradients, as <see cref="VisitGradients(LayerGradients, GradientVisitor)"/> hands them on.</summary>
    public delegate void GradientVisitor(LoraModuleSpec module, ReadOnlySpan<float> da, ReadOnlySpan<float> db);

    /// <summary>Calls <paramref name="visit"/> with the gradients of each module of a layer, read from the backend (zeros for a skipped layer).</summary>
    public void VisitGradients(LayerGradients layer, GradientVisitor visit)
    {
        foreach (var m in ModulesOf(layer.Layer))
        {
            if (layer.Skipped)
            {
                visit(m.Spec, Zeros(m.DA.Length), Zeros(m.DB.Length));
                continue;
            }
            if (Backend.TryGetHostSpan(m.DA, out var da) && Backend.TryGetHostSpan(m.DB, out var db))
            {
                visit(m.Spec, da, db);
                continue;
            }
            var (hostDa, hostDb) = HostGradients(m);
            Backend.Download(m.DA, hostDa.AsSpan(0, (int)m.DA.Length));
            Backend.Download(m.DB, hostDb.AsSpan(0, (int)m.DB.Length));
            visit(m.Spec, hostDa.AsSpan(0, (int)m.DA.Length), hostDb.AsSpan(0, (int)m.DB.Length));
        }
    }

    /// <summary>Copies the backend's LoRA parameters back into <see cref="Adapter"/>.</summary>
    public void DownloadAdapter()
    {
        foreach (var m in _lora)
        {
            var module = _adapterModules[m.Spec.Module];
            Backend.Download(m.A, module.A);
            Backend.Download(m.B, module.B);
        }
    }

    /// <summary>Copies <see cref="Adapter"/>'s A and B to the backend, after the host changed them (an optimizer step).</summary>
    public void UploadAdapter()
    {
        foreach (var m in _lora)
        {
            var module = _adapterModules[m.Spec.Module];
            Backend.Write(m.A, module.A);
            Backend.Write(m.B, module.B);
        }
    }

    /// <summary>A buffer of the memory plan, sized for <see cref="MaxSequence"/>.</summary>
    protected Tensor Allocate(string name) => Allocate(name, name);

    private Tensor Allocate(string name, string tensorName)
    {
        var plan = _plan[name];
        if (plan.Role == BufferRole.Weights)
            throw new ArgumentException($"'{name}' is a weight: map it with MapWeight, it is not allocated.");
        long length = plan.Elements(MaxSequence);
        if (plan.Role == BufferRole.Checkpoint && ActivationsInFile)
        {
            // trainer.activations = "mmap": file pages the kernel can write back and drop, not private memory.
            bool inFile = false;
            var tensor = Track(Backend.AllocateInFile(tensorName, length, () =>
            {
                inFile = true;
                return new MappedBuffer(TemporaryFolder, tensorName, length);
            }));
            if (inFile)
                FileBackedBytes += length * sizeof(float);
            return tensor;
        }
        return Track(Backend.Allocate(tensorName, length));
    }

    /// <summary>A base weight from the model files, as the backend reads it (see <see cref="IBackend.MapWeight"/>).</summary>
    protected Tensor MapWeight(string name)
    {
        WeightReads++;
        var weight = Backend.MapWeight(Weights, name);
        if (!weight.IsResident)
            _streamed.Add(weight);
        return weight;
    }

    /// <summary>
    /// Mapped weights that are not resident and not given back yet: the embedding, the final norm and
    /// the LM head a trainer keeps for its lifetime, given back when it is disposed.
    /// </summary>
    private readonly HashSet<Tensor> _streamed = new(ReferenceEqualityComparer.Instance);

    /// <summary>
    /// A base weight of one layer, <c>model.layers.{layer}.{name}</c>. A weight the backend uses in
    /// place in its file mapping is mapped once and kept (<see cref="ReleaseWeight"/> drops its
    /// pages, not the view), so a step maps its layers without allocating.
    /// </summary>
    protected Tensor MapWeight(int layer, string name)
    {
        if (_layerWeights.TryGetValue((layer, name), out var view))
        {
            WeightReads++;
            return view;
        }
        var weight = MapWeight($"model.layers.{layer}.{name}");
        if (weight.IsResident)
            _layerWeights[(layer, name)] = weight;
        return weight;
    }

    private readonly Dictionary<(int Layer, string Name), Tensor> _layerWeights = [];

    /// <summary>Gives a weight of <see cref="MapWeight(string)"/> back.</summary>
    /// <remarks>
    /// While decoding (<see cref="Infer"/>) a weight used in place in its file mapping keeps its pages:
    /// every token reads every layer again, and dropping the pages after each layer would make each
    /// token fault the whole model back in. They are file pages the kernel can still reclaim.
    /// </remarks>
    protected void ReleaseWeight(Tensor weight)
    {
        if (_decoding && weight.IsResident)
            return;
        _streamed.Remove(weight);
        Backend.ReleaseWeight(weight);
    }

    private bool _decoding;

    /// <summary>Uploads the adapter's A and B of one module and allocates zeroed gradients for them.</summary>
    protected LoraTensors Lora(string module)
    {
        if (!_adapterModules.TryGetValue(module, out var m))
            throw new ArgumentException($"The adapter has no LoRA module '{module}', which {Model.Name} targets.");
        // Gradients are one layer's worth, shared by the same projection of every layer (the plan's
        // loraGradients): a layer's gradients are handed on and zeroed as soon as its backward ends.
        string projection = module[(module.IndexOf('.', "model.layers.".Length) + 1)..];
        if (!_sharedGradients.TryGetValue(projection, out var gradients))
            _sharedGradients[projection] = gradients = (
                Track(Backend.Allocate("d:" + projection + ".lora_A", m.A.Length)),
                Track(Backend.Allocate("d:" + projection + ".lora_B", m.B.Length)));
        // On the CPU the adapter's own arrays are the parameters (no second copy); elsewhere they are uploaded.
        var tensors = new LoraTensors(m.Spec, Track(Backend.Adopt(m.Spec.AName, m.A)), Track(Backend.Adopt(m.Spec.BName, m.B)),
            gradients.DA, gradients.DB);
        _lora.Add(tensors);
        _layerModules = null;
        return tensors;
    }

    /// <summary>Fills a pair of RoPE tables for positions 0..MaxSequence−1.</summary>
    protected void InitRope(Tensor cos, Tensor sin, double theta, RopeScaling? scaling)
    {
        var (c, s) = Rope.Tables(MaxSequence, Model.HeadDim, theta, scaling);
        Backend.Write(cos, c);
        Backend.Write(sin, s);
    }

    /// <summary>Checks a sequence against the trainer's limits and returns its length T.</summary>
    protected int CheckSequence(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets)
    {
        _decoding = false;
        int T = CheckTokens(tokens);
        if (targets.Length != T)
            throw new ArgumentException($"{targets.Length} targets were given for {T} tokens.");
        SequenceChecks.Labels(targets, T, Model.Vocab);
        return T;
    }

    private int CheckTokens(ReadOnlySpan<int> tokens)
    {
        if (tokens.Length < 1 || tokens.Length > MaxSequence)
            throw new ArgumentException($"A sequence of {tokens.Length} tokens does not fit this trainer (1 to {MaxSequence}).");
        SequenceChecks.Tokens(tokens, tokens.Length, Model.Vocab);
        return tokens.Length;
    }

    private Tensor Track(Tensor t)
    {
        _owned.Add(t);
        AllocatedBytes += t.Length * sizeof(float);
        return t;
    }

    private string? _temporaryFolder;

    /// <summary>
    /// A folder of this trainer's own for memory-mapped files, removed when it is disposed. It holds
    /// <c>owner.pid</c>: the folders of processes that were killed (no longer running) are removed
    /// when the next one is created.
    /// </summary>
    public string TemporaryFolder => _temporaryFolder ??= CreateTemporaryFolder();

    private const string OwnerFile = "owner.pid";

    private string CreateTemporaryFolder()
    {
        RemoveStaleTemporaryFolders();
        string folder = Directory.CreateTempSubdirectory($"lora-{Model.Name}-").FullName;
        File.WriteAllText(Path.Combine(folder, OwnerFile), Environment.ProcessId.ToString(System.Globalization.CultureInfo.InvariantCulture));
        return folder;
    }

    /// <summary>Removes the temporary folders of trainers whose process is gone (killed before it could dispose them); Linux only (/proc).</summary>
    private static void RemoveStaleTemporaryFolders()
    {
        if (!OperatingSystem.IsLinux() || !Directory.Exists("/proc/self"))
            return;
        try
        {
            foreach (var folder in Directory.EnumerateDirectories(Path.GetTempPath(), "lora-*-*"))
            {
                string owner = Path.Combine(folder, OwnerFile);
                if (File.Exists(owner) && int.TryParse(File.ReadAllText(owner), out int pid) && pid != Environment.ProcessId
                    && !Directory.Exists($"/proc/{pid}"))
                    Directory.Delete(folder, recursive: true);
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Another process's folder, or one being removed right now: not this trainer's business.
        }
    }

    public void Dispose()
    {
        foreach (var weight in _streamed)
            Backend.ReleaseWeight(weight);
        _streamed.Clear();
        foreach (var t in _owned)
            t.Dispose();
        _owned.Clear();
        if (_temporaryFolder is not null && Directory.Exists(_temporaryFolder))
            Directory.Delete(_temporaryFolder, recursive: true);
        GC.SuppressFinalize(this);
    }
}
