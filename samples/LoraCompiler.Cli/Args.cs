using System.Globalization;

namespace LoraCompiler.Cli;

/// <summary>A command-line mistake: printed without a stack trace, exit code 2.</summary>
public sealed class UsageException(string message) : Exception(message);

/// <summary>
/// <c>--name value</c> options after the command word, and <c>--name</c> flags (options without a
/// value) for the names given as <c>flags</c>.
/// </summary>
public sealed class Args
{
    /// <summary>The options that take no value, for every command.</summary>
    public static readonly IReadOnlySet<string> Flags = new HashSet<string>(StringComparer.Ordinal) { "no-reference", "json", "help" };

    private readonly Dictionary<string, string> _values = new(StringComparer.Ordinal);
    private readonly HashSet<string> _used = new(StringComparer.Ordinal);

    public Args(IEnumerable<string> args) : this(args, Flags) { }

    public Args(IEnumerable<string> args, IReadOnlySet<string> flags)
    {
        Raw = args.ToList();
        using var e = Raw.GetEnumerator();
        while (e.MoveNext())
        {
            string key = e.Current;
            if (!key.StartsWith("--", StringComparison.Ordinal) || key.Length == 2)
                throw new UsageException($"Expected an option like --model, found '{key}'.");
            if (flags.Contains(key[2..]))
            {
                _values[key[2..]] = "";
                continue;
            }
            if (!e.MoveNext())
                throw new UsageException($"Option {key} needs a value.");
            _values[key[2..]] = e.Current;
        }
    }

    /// <summary>The arguments as given, for passing them on to another process.</summary>
    public IReadOnlyList<string> Raw { get; }

    /// <summary>Whether the flag <c>--name</c> (an option without a value) was given.</summary>
    public bool Flag(string name)
    {
        _used.Add(name);
        return _values.ContainsKey(name);
    }

    public string Required(string name) =>
        Optional(name) ?? throw new UsageException($"Missing required option --{name}.");

    public string? Optional(string name)
    {
        _used.Add(name);
        return _values.TryGetValue(name, out var value) ? value : null;
    }

    public string Get(string name, string defaultValue) => Optional(name) ?? defaultValue;

    public int Int(string name, int defaultValue) => Parse(name, defaultValue, s => int.Parse(s, CultureInfo.InvariantCulture));

    public float Float(string name, float defaultValue) => Parse(name, defaultValue, s => float.Parse(s, CultureInfo.InvariantCulture));

    /// <summary>Fails on an option no command read: a typo should not be silently ignored.</summary>
    public void RejectUnknown()
    {
        var unknown = _values.Keys.Where(k => !_used.Contains(k)).ToList();
        if (unknown.Count > 0)
            throw new UsageException($"Unknown option{(unknown.Count > 1 ? "s" : "")}: {string.Join(", ", unknown.Select(k => "--" + k))}.");
    }

    private T Parse<T>(string name, T defaultValue, Func<string, T> parse)
    {
        var text = Optional(name);
        if (text is null)
            return defaultValue;
        try
        {
            return parse(text);
        }
        catch (FormatException)
        {
            throw new UsageException($"Option --{name} expects a {typeof(T).Name.ToLowerInvariant()}, found '{text}'.");
        }
    }
}
