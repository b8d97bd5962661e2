namespace LoraCompiler.Runtime.Weights;

/// <summary>
/// A weight or adapter file that cannot be used as it is. The message starts with the file's path and
/// says which tensor (where there is one), what is wrong and what was expected, for example
/// <c>model.safetensors: tensor 'model.norm.weight' has shape [64], the config expects [896]</c>.
/// </summary>
public sealed class WeightsException : Exception
{
    public WeightsException(string path, string problem, Exception? inner = null)
        : base($"{path}: {problem}", inner)
    {
        Path = path;
    }

    /// <summary>The file or folder the problem is in.</summary>
    public string Path { get; }

    internal static string Format(IReadOnlyList<int> shape) => $"[{string.Join(", ", shape)}]";

    /// <summary>
    /// The bytes of a small JSON file that comes with the weights (an index, an adapter config): at most
    /// <paramref name="maxBytes"/>, not empty (a FIFO or a device reads as empty, and reading would
    /// block), readable, valid UTF-8. <paramref name="what"/> names the file in the messages
    /// ("index", "adapter config"); <paramref name="malformed"/> begins the UTF-8 one.
    /// </summary>
    internal static byte[] ReadSmallJson(string path, string what, long maxBytes, string malformed)
    {
        long length = new FileInfo(path).Length;
        if (length > maxBytes)
            throw new WeightsException(path, $"{what} has {length} bytes, more than the {maxBytes} it may have");
        if (length == 0)
            throw new WeightsException(path, $"{what} is empty or not a regular file");
        byte[] bytes;
        try
        {
            bytes = File.ReadAllBytes(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new WeightsException(path, $"cannot read the {what}: {e.Message}", e);
        }
        if (!System.Text.Unicode.Utf8.IsValid(bytes))
            throw new WeightsException(path, $"{malformed}: the file is not valid UTF-8");
        return bytes;
    }
}
