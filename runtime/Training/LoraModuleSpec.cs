namespace LoraCompiler.Runtime.Training;

/// <summary>
/// One LoRA-adapted projection: <paramref name="Module"/> is its Hugging Face module path
/// (<c>model.layers.3.self_attn.q_proj</c>), A is [r, In] and B is [Out, r].
/// </summary>
public sealed record LoraModuleSpec(string Module, int In, int Out)
{
    /// <summary>The module path; A's and B's names are made from it once (a step looks them up by name and builds no strings).</summary>
    public string Module
    {
        get;
        init => (field, AName, BName) = (value, PeftName(value, 'A'), PeftName(value, 'B'));
    } = Module;

    /// <summary>PEFT's name of the A matrix: <c>base_model.model.{Module}.lora_A.weight</c>.</summary>
    public string AName { get; private init; } = PeftName(Module, 'A');

    /// <summary>PEFT's name of the B matrix: <c>base_model.model.{Module}.lora_B.weight</c>.</summary>
    public string BName { get; private init; } = PeftName(Module, 'B');

    private static string PeftName(string module, char matrix) => $"base_model.model.{module}.lora_{matrix}.weight";
}

/// <summary>PEFT's LoRA hyperparameters: rank, alpha (scale = alpha / r) and the targeted module names.</summary>
public sealed record LoraSettings(int R, float Alpha, string[] TargetModules)
{
    public float Scale => Alpha / R;
}
