namespace LoraCompiler.Runtime.IO;

/// <summary>Paths as the file system resolves them, for checking that a named file stays inside a folder.</summary>
public static class FilePaths
{
    /// <summary>More links than this in one path is a loop (Linux's own limit is 40).</summary>
    const int MaxLinks = 40;

    /// <summary>
    /// The absolute path of <paramref name="path"/> with every symbolic link resolved, component by
    /// component from the root, and <c>.</c> and <c>..</c> applied after resolving, as the kernel does
    /// (realpath(3)); components that do not exist are kept as they are. Throws
    /// <see cref="IOException"/> on a loop of links.
    /// </summary>
    public static string Resolve(string path)
    {
        string full = Path.IsPathRooted(path) ? path : Path.Join(Directory.GetCurrentDirectory(), path);
        string current = Path.GetPathRoot(full)!;
        var pending = new LinkedList<string>(Split(full[current.Length..]));
        int links = 0;
        bool exists = true;
        while (pending.First is { } first)
        {
            string part = first.Value;
            pending.RemoveFirst();
            if (part is "" or ".")
                continue;
            if (part == "..")
            {
                current = Path.GetDirectoryName(current) ?? current;
                continue;
            }
            string next = Path.Join(current, part);
            string? target = exists ? new FileInfo(next).LinkTarget : null;
            if (target is null)
            {
                exists = exists && Path.Exists(next);
                current = next;
                continue;
            }
            if (++links > MaxLinks)
                throw new IOException($"{path}: too many levels of symbolic links");
            if (Path.IsPathRooted(target))
            {
                current = Path.GetPathRoot(target)!;
                target = target[current.Length..];
            }
            foreach (string t in Split(target).Reverse())
                pending.AddFirst(t);
        }
        return current;
    }

    /// <summary>True when <paramref name="path"/> is <paramref name="folder"/> or lies under it (both resolved, absolute).</summary>
    public static bool IsInside(string path, string folder)
    {
        var comparison = OperatingSystem.IsWindows() || OperatingSystem.IsMacOS() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal;
        string root = Path.TrimEndingDirectorySeparator(folder);
        return path.Equals(root, comparison)
            || path.StartsWith(root + Path.DirectorySeparatorChar, comparison)
            || Path.GetPathRoot(root) == root && path.StartsWith(root, comparison);
    }

    static string[] Split(string path) => path.Split(Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar);
}
