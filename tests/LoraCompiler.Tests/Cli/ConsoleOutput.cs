namespace LoraCompiler.Tests.Cli;

/// <summary>
/// Tests that read what a command prints: the console is the process's, so nothing else may write to
/// it meanwhile.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class ConsoleOutputCollection
{
    public const string Name = "console output";
}

public static class ConsoleOutput
{
    /// <summary>Runs a command with the console's output captured; returns its exit code and the lines it printed.</summary>
    public static (int Code, string[] Lines) Capture(Func<int> command)
    {
        var output = new StringWriter();
        var console = Console.Out;
        Console.SetOut(output);
        int code;
        try
        {
            code = command();
        }
        finally
        {
            Console.SetOut(console);
        }
        return (code, output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
    }
}
