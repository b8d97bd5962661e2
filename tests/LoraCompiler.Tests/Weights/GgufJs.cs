using System.Diagnostics;
using System.Text.Json;

namespace LoraCompiler.Tests.Weights;

/// <summary>
/// Hugging Face's GGUF parser (the npm package <c>@huggingface/gguf</c>, JavaScript, not this project's
/// code) reading a file: <see cref="Parse"/> runs it under node and returns what it parsed as JSON:
/// <c>typedMetadata</c> (key → {value, type}), <c>tensorInfos</c> ([{name, n_dims, shape, dtype, offset}], shape in
/// GGUF order) and <c>tensorDataOffset</c>. The package is installed with npm, once, into a folder under the
/// temporary directory that later runs reuse (installed beside it and renamed into place, so two runs
/// never see half an install).
/// </summary>
internal static class GgufJs
{
    public const string Package = "@huggingface/gguf@0.4.6";

    private const string Script = """
        // Prints what @huggingface/gguf parses from a GGUF file, as JSON (64-bit integers as numbers).
        import { gguf } from "@huggingface/gguf";
        const parsed = await gguf(process.argv[2], { allowLocalFile: true, typedMetadata: true });
        const result = { typedMetadata: parsed.typedMetadata, tensorInfos: parsed.tensorInfos, tensorDataOffset: parsed.tensorDataOffset, littleEndian: parsed.littleEndian };
        console.log(JSON.stringify(result, (key, value) => typeof value === "bigint" ? Number(value) : value));
        """;

    private static readonly Lazy<string> Folder = new(Install, LazyThreadSafetyMode.ExecutionAndPublication);

    public static JsonDocument Parse(string ggufPath)
    {
        var (code, output, error) = Run("node", [Path.Combine(Folder.Value, "parse.mjs"), ggufPath], Folder.Value, TimeSpan.FromMinutes(1));
        if (code != 0)
            throw new InvalidOperationException($"@huggingface/gguf could not parse {ggufPath} (node exited with {code}): {error}");
        return JsonDocument.Parse(output);
    }

    private static string Install()
    {
        string folder = Path.Combine(Path.GetTempPath(), "loracompiler-test-npm", "huggingface-gguf-0.4.6");
        if (File.Exists(Path.Combine(folder, "node_modules", "@huggingface", "gguf", "package.json")) && File.Exists(Path.Combine(folder, "parse.mjs")))
            return folder;
        string temporary = $"{folder}.tmp-{Guid.NewGuid():N}";
        Directory.CreateDirectory(temporary);
        try
        {
            File.WriteAllText(Path.Combine(temporary, "package.json"), """{"name": "loracompiler-test-gguf", "private": true, "type": "module"}""");
            File.WriteAllText(Path.Combine(temporary, "parse.mjs"), Script);
            var (code, output, error) = Run("npm", ["install", "--no-audit", "--no-fund", "--loglevel=error", Package], temporary, TimeSpan.FromMinutes(5));
            if (code != 0)
                throw new InvalidOperationException($"npm install {Package} failed with exit code {code}: {error}{output}");
            if (Directory.Exists(folder))
                Directory.Delete(folder, recursive: true); // a broken earlier install
            Directory.Move(temporary, folder);
        }
        catch (IOException) when (File.Exists(Path.Combine(folder, "parse.mjs")))
        {
            // Another run installed it first.
        }
        finally
        {
            if (Directory.Exists(temporary))
                Directory.Delete(temporary, recursive: true);
        }
        return folder;
    }

    private static (int Code, string Output, string Error) Run(string program, string[] arguments, string workingDirectory, TimeSpan timeout)
    {
        var start = new ProcessStartInfo(program)
        {
            WorkingDirectory = workingDirectory,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        foreach (var argument in arguments)
            start.ArgumentList.Add(argument);
        using var process = Process.Start(start) ?? throw new InvalidOperationException($"could not start {program}");
        var output = process.StandardOutput.ReadToEndAsync();
        var error = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(timeout))
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException($"{program} {string.Join(' ', arguments)} did not finish in {timeout.TotalSeconds} s");
        }
        return (process.ExitCode, output.Result, error.Result);
    }
}
