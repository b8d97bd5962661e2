using System.Text;
using System.Text.RegularExpressions;

namespace LoraCompiler.Runtime.IO;

/// <summary>
/// Writes a file so that readers see either the old content or the complete new content, never a
/// half-written file: the content goes to <c>path.tmp-&lt;random&gt;</c> in the same folder, is flushed
/// to disk, and is then renamed over <c>path</c>. On failure the temporary file is deleted and the
/// previous file, if any, is left as it was.
/// </summary>
public static partial class AtomicFile
{
    /// <summary>Creates or replaces <paramref name="path"/> with what <paramref name="write"/> writes to the stream.</summary>
    public static void Write(string path, Action<Stream> write)
    {
        string target = System.IO.Path.GetFullPath(path);
        string temp = $"{target}.tmp-{Guid.NewGuid():N}";
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 1 << 16))
            {
                write(stream);
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, target, overwrite: true);
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
    }

    /// <summary>Whether a file name is one of <see cref="Write"/>'s temporary files (<c>name.tmp-</c> and 32 hex digits).</summary>
    public static bool IsTemporary(string path) => TemporaryName().IsMatch(System.IO.Path.GetFileName(path));

    /// <summary>
    /// Deletes the temporary files that writes killed before their rename left in <paramref name="dir"/>
    /// (and its subfolders with <see cref="SearchOption.AllDirectories"/>); returns their paths.
    /// </summary>
    public static IReadOnlyList<string> RemoveTemporaries(string dir, SearchOption search = SearchOption.TopDirectoryOnly)
    {
        if (!Directory.Exists(dir))
            return [];
        var removed = new List<string>();
        foreach (var file in Directory.EnumerateFiles(dir, "*.tmp-*", search).Where(IsTemporary))
        {
            File.Delete(file);
            removed.Add(file);
        }
        return removed;
    }

    [GeneratedRegex(@"\.tmp-[0-9a-f]{32}$", RegexOptions.CultureInvariant)]
    private static partial Regex TemporaryName();

    /// <summary>Creates or replaces <paramref name="path"/> with <paramref name="text"/> in UTF-8 without a byte-order mark.</summary>
    public static void WriteAllText(string path, string text) =>
        Write(path, stream => stream.Write(new UTF8Encoding(encoderShouldEmitUTF8Identifier: false).GetBytes(text)));
}
