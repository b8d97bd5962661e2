using System.Globalization;

namespace LoraCompiler.CommandLine;

/// <summary>
/// A command-line mistake: printed as one line <c>error: --option: what is wrong</c> without a stack
/// trace, exit code 2.
/// </summary>
public sealed class UsageException(string message) : Exception(message);

/// <summary>
/// <c>--name value</c> options after the command word, and <c>--name</c> flags (options without a
/// value) for the names given as <c>flags</c>. Numbers are parsed in the invariant culture and
/// checked: an integer that does not fit, a NaN or an infinity, or a value outside the range a
/// command gives is a <see cref="UsageException"/> naming the option.
/// </summary>
/// <remarks>
/// Hand-written rather than System.CommandLine: see the README's "The command line" (every command
/// and its tests drive <see cref="Args"/> directly, and the usage text is one documented block).
/// </remarks>
public sealed class Args
{
    /// <summary>The options that take no value, for every command.</summary>
    public static readonly IReadOnlySet<string> Flags = new HashSet<string>(StringComparer.Ordinal) { "no-reference", "json", "help", "overwrite" };

    private readonly Dictionary<string, string> _values = new(StringComparer.Ordinal);
    private readonly HashSet<string> _used = new(StringComparer.Ordinal);
    private IReadOnlyDictionary<string, string> _fallback = new Dictionary<string, string>();

    public Args(IEnumerable<string> args) : this(args, Flags) { }

    public Args(IEnumerable<string> args, IReadOnlySet<string> flags)
    {
        Raw = args.ToList();
        using var e = Raw.GetEnumerator();
        while (e.MoveNext())
        {
            string key = e.Current;
            if (!key.StartsWith("--", StringComparison.Ordinal) || key.Length == 2)
                throw new UsageException($"{key}: expected an option like --model here.");
            if (flags.Contains(key[2..]))
            {
                _values[key[2..]] = "";
                continue;
            }
            if (!e.MoveNext())
                throw new UsageException($"{key}: needs a value.");
            _values[key[2..]] = e.Current;
        }
    }

    /// <summary>The arguments as given, for passing them on to another process.</summary>
    public IReadOnlyList<string> Raw { get; }

    /// <summary>
    /// Values for the options not given on the command line (a resumed run's, from its checkpoint):
    /// <see cref="Optional"/> returns them as if they had been typed; <see cref="Given"/> tells them apart.
    /// </summary>
    public Args WithFallback(IReadOnlyDictionary<string, string> fallback)
    {
        _fallback = fallback;
        return this;
    }

    /// <summary>Whether <c>--name</c> was typed (not taken from <see cref="WithFallback"/>).</summary>
    public bool Given(string name) => _values.ContainsKey(name);

    /// <summary>Whether the flag <c>--name</c> (an option without a value) was given.</summary>
    public bool Flag(string name)
    {
        _used.Add(name);
        return _values.ContainsKey(name);
    }

    public string Required(string name) =>
        Optional(name) ?? throw new UsageException($"--{name}: required, not given.");

    public string? Optional(string name)
    {
        _used.Add(name);
        return _values.TryGetValue(name, out var value) ? value : _fallback.TryGetValue(name, out var stored) ? stored : null;
    }

    public string Get(string name, string defaultValue) => Optional(name) ?? defaultValue;

    /// <summary>An integer option in [<paramref name="min"/>, <paramref name="max"/>].</summary>
    public int Int(string name, int defaultValue, int min = int.MinValue, int max = int.MaxValue)
    {
        var text = Optional(name);
        if (text is null)
            return defaultValue;
        if (!long.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long value))
        {
            bool digits = text.TrimStart('-', '+').Length > 0 && text.TrimStart('-', '+').All(char.IsAsciiDigit);
            throw new UsageException(digits
                ? $"--{name}: {text} is out of range ({Range(min, max)})."
                : $"--{name}: expects an integer, found '{text}'.");
        }
        if (value < min || value > max)
            throw new UsageException($"--{name}: {text} is out of range ({Range(min, max)}).");
        return (int)value;
    }

    /// <summary>An optional integer option: null when it is not given.</summary>
    public int? IntOrNull(string name, int min = int.MinValue, int max = int.MaxValue) =>
        Optional(name) is null ? null : Int(name, 0, min, max);

    /// <summary>
    /// A finite number (NaN and infinities are refused, so is a value that overflows a float) of at
    /// least <paramref name="min"/>, or above it when <paramref name="exclusiveMin"/>, and at most <paramref name="max"/>.
    /// </summary>
    public float Float(string name, float defaultValue, float min = float.MinValue, float max = float.MaxValue, bool exclusiveMin = false)
    {
        var text = Optional(name);
        if (text is null)
            return defaultValue;
        if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out double parsed))
            throw new UsageException($"--{name}: expects a number, found '{text}'.");
        float value = (float)parsed;
        if (!float.IsFinite(value))
            throw new UsageException($"--{name}: expects a finite number, found '{text}'.");
        if (value < min || (exclusiveMin && value == min))
            throw new UsageException($"--{name}: {text} is out of range (must be {(exclusiveMin ? "above" : "at least")} {min.ToString(CultureInfo.InvariantCulture)}).");
        if (value > max)
            throw new UsageException($"--{name}: {text} is out of range (at most {max.ToString(CultureInfo.InvariantCulture)}).");
        return value;
    }

    /// <summary>Fails on an option no command read: a typo should not be silently ignored.</summary>
    public void RejectUnknown()
    {
        var unknown = _values.Keys.Where(k => !_used.Contains(k)).ToList();
        if (unknown.Count == 0)
            return;
        string Suggest(string key) =>
            _used.Select(u => (Name: u, Distance: EditDistance(key, u))).Where(c => c.Distance <= 2).OrderBy(c => c.Distance)
                .Select(c => $" (did you mean --{c.Name}?)").FirstOrDefault() ?? "";
        throw new UsageException(unknown.Count == 1
            ? $"--{unknown[0]}: unknown option{Suggest(unknown[0])}."
            : $"{string.Join(", ", unknown.Select(k => "--" + k))}: unknown options.");
    }

    private static string Range(int min, int max) =>
        (min, max) switch
        {
            (int.MinValue, int.MaxValue) => $"{int.MinValue} to {int.MaxValue}",
            (_, int.MaxValue) => $"at least {min}, at most {int.MaxValue}",
            _ => $"{min} to {max}",
        };

    private static int EditDistance(string a, string b)
    {
        var previous = Enumerable.Range(0, b.Length + 1).ToArray();
        for (int i = 1; i <= a.Length; i++)
        {
            var current = new int[b.Length + 1];
            current[0] = i;
            for (int j = 1; j <= b.Length; j++)
                current[j] = Math.Min(Math.Min(current[j - 1], previous[j]) + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
            previous = current;
        }
        return previous[b.Length];
    }
}
