// One definition for both sides of the memory plan: the runtime compiles this file, and the generator
// links it (generator/LoraCompiler.Generator.csproj) into its own namespace, so the roles the
// generator plans are the roles the runtime reads.
#if LORA_GENERATOR
namespace LoraCompiler.Generator
#else
namespace LoraCompiler.Runtime.Training
#endif
{
    /// <summary>What a planned buffer holds, which decides its lifetime within a step.</summary>
    /// <remarks>
    /// <c>KeptActivations</c> is one layer's activations kept from its forward to its backward instead of
    /// recomputed: allocated once for each layer a memory budget keeps (none by default).
    /// </remarks>
    public enum BufferRole { Checkpoint, Activation, Gradient, Scratch, Weights, LoraParameters, LoraGradients, KeptActivations }
}
