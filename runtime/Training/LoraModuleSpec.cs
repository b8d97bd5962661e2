namespace LoraCompiler.Runtime.Training;

/// <summary>
/// One LoRA-adapted projection: <paramref name="Module"/> is its Hugging Face module path
/// (<c>model.layers.3.self_attn.q_proj</c>), A is [r, In] and B is [Out, r].
/// </summary>
public sealed record LoraModuleSpec(string Module, int In, int Out)
{
    // Made once: a training step looks the names up for every module (the optimizer's state is by
    // name), and a string built per call would be garbage every step.

    /// <summary>PEFT's name of the A matrix: <c>base_model.model.{Module}.lora_A.weight</c>.</summary>
    public string AName { get; } = $"base_model.model.{Module}.lora_A.weight";

    /// <summary>PEFT's name of the B matrix: <c>base_model.model.{Module}.lora_B.weight</c>.</summary>
    public string BName { get; } = $"base_model.model.{Module}.lora_B.weight";
}

/// <summary>PEFT's LoRA hyperparameters: rank, alpha (scale = alpha / r) and the targeted module names.</summary>
public sealed record LoraSettings(int R, float Alpha, string[] TargetModules)
{
    public float Scale => Alpha / R;
}
