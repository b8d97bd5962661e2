using System.Text.Json;
using LoraCompiler.Runtime.Backends.Vulkan;
using LoraCompiler.Runtime.Data;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Cli;

/// <summary>
/// How <c>lora</c> reports a failure: one line <c>error: &lt;file or option&gt;: &lt;what is wrong&gt;</c>
/// and a nonzero exit code (2 for a command-line mistake, 1 for anything else), whatever was thrown;
/// the stack trace only with <c>--verbose</c>.
/// </summary>
public static class Failure
{
    /// <summary>Writes the error line (and with <paramref name="verbose"/> the exception in full) and returns the exit code.</summary>
    public static int Report(Exception caught, bool verbose, TextWriter error)
    {
        var e = Unwrap(caught);
        // The project's own errors and the system's I/O errors say what and where; anything else
        // (a bug, most likely) also says its type, so that the line can be searched for.
        bool expected = e is UsageException or WeightsException or VulkanException or TokenizerException or TrainingDataException
            or TrainingRunException or IOException or ArgumentException or JsonException or UnauthorizedAccessException
            or LoraCompiler.Runtime.Distributed.DistributedException;
        string message = e switch
        {
            FileNotFoundException { FileName: { } file } => $"{file}: no such file.",
            _ => e.Message,
        };
        message = string.Join(" ", message.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
        error.WriteLine($"error: {message}" + (expected ? "" : $" ({e.GetType().Name}{(verbose ? "" : "; --verbose prints where")})"));
        if (verbose)
            error.WriteLine(caught);
        return e is UsageException ? 2 : 1;
    }

    /// <summary>The exception that says what went wrong, out of the wrappers around it (a parallel loop's, a type initializer's).</summary>
    private static Exception Unwrap(Exception e) =>
        e switch
        {
            AggregateException { InnerExceptions.Count: 1 } a => Unwrap(a.InnerExceptions[0]),
            TypeInitializationException { InnerException: { } inner } => Unwrap(inner),
            System.Reflection.TargetInvocationException { InnerException: { } inner } => Unwrap(inner),
            _ => e,
        };
}
