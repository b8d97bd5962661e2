global using LoraCompiler.Tests.Weights;
// The test folders follow the source (Generator/, Backends/Cpu, Backends/Vulkan, Training/, Weights/,
// Data/, Cli/, Reference/), each its own namespace; the shared fixtures are visible everywhere.
global using LoraCompiler.Tests.Backends.Vulkan;
global using LoraCompiler.Tests.Reference;
global using LoraCompiler.Tests.Training;
