using System.Collections.Concurrent;
using System.Text;
using System.Text.RegularExpressions;

namespace LoraCompiler.Runtime.Data;

/// <summary>
/// A regular expression of a tokenizer.json (a Split pre-tokenizer's pattern, a Replace normalizer's),
/// run with a time limit on each match: a pattern that backtracks catastrophically
/// (<c>(\p{L}+)+$</c>) on some text is a <see cref="TokenizerException"/> naming the file, the member
/// and the pattern, never a tokenizer that does not return. Such a pattern is usually refused when
/// the file is read already: each pattern is first run on a few short probe texts (runs of letters,
/// digits, spaces, punctuation with a character after them that ends the run) within the limit.
/// </summary>
internal sealed class TokenizerRegex
{
    /// <summary>The time one match may take, by default; <see cref="BpeTokenizer.Load(string, TimeSpan?)"/> takes another.</summary>
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(5);

    /// <summary>Compiled patterns that passed the probes, shared by the tokenizers that use them (a handful in practice).</summary>
    private static readonly ConcurrentDictionary<(string Pattern, TimeSpan Timeout), Regex> s_compiled = new();
    private const int CacheCapacity = 64;

    private readonly string _source;

    private TokenizerRegex(Regex regex, string pattern, string where, string source)
    {
        Regex = regex;
        Pattern = pattern;
        Where = where;
        _source = source;
    }

    public Regex Regex { get; }

    /// <summary>The pattern as the file writes it (Oniguruma's syntax).</summary>
    public string Pattern { get; }

    /// <summary>The member it came from, as <c>pre_tokenizer.pretokenizers[0].pattern</c>.</summary>
    public string Where { get; }

    /// <summary>
    /// Translates, compiles and probes an Oniguruma pattern of <paramref name="source"/>; a pattern .NET
    /// cannot use, or one that runs past <paramref name="timeout"/> on a probe, throws a
    /// <see cref="TokenizerException"/>.
    /// </summary>
    public static TokenizerRegex Create(string onigurumaPattern, string where, string source, TimeSpan timeout)
    {
        var key = (onigurumaPattern, timeout);
        if (!s_compiled.TryGetValue(key, out var regex))
        {
            try
            {
                regex = new Regex(RegexSplit.TranslatePattern(onigurumaPattern), RegexOptions.Compiled | RegexOptions.CultureInvariant, timeout);
            }
            catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
            {
                throw new TokenizerException(source, $"{where} {onigurumaPattern} cannot be used with .NET's Regex: {e.Message}", e);
            }
            foreach (string probe in Probes)
            {
                try
                {
                    foreach (var _ in regex.EnumerateMatches(probe))
                    {
                    }
                }
                catch (RegexMatchTimeoutException e)
                {
                    throw new TokenizerException(source,
                        $"{where} {Quote(onigurumaPattern)} takes more than {Seconds(timeout)} to match the {probe.Length}-character text " +
                        $"{Quote(probe)}: it backtracks catastrophically (a nested repetition such as (\\p{{L}}+)+), and no text could be tokenized with it.", e);
                }
            }
            if (s_compiled.Count >= CacheCapacity)
                s_compiled.Clear();
            s_compiled.TryAdd(key, regex);
        }
        return new TokenizerRegex(regex, onigurumaPattern, where, source);
    }

    /// <summary>The error for a match that ran past the time limit on a piece of text.</summary>
    public TokenizerException TimedOut(RegexMatchTimeoutException e, int length) => new(_source,
        $"{Where} {Quote(Pattern)} took more than {Seconds(Regex.MatchTimeout)} on one match in a text of {length:N0} characters: " +
        "it backtracks catastrophically on that text (a nested repetition such as (\\p{L}+)+); fix the pattern.", e);

    /// <summary>
    /// <see cref="Regex.Replace(string, string)"/> with the time limit on each match rather than on the
    /// whole text, as the pre-tokenizer's splits have it.
    /// </summary>
    public string Replace(string text, string replacement)
    {
        StringBuilder? result = null;
        int last = 0;
        try
        {
            foreach (var m in Regex.EnumerateMatches(text))
            {
                result ??= new StringBuilder(text.Length);
                result.Append(text, last, m.Index - last).Append(replacement);
                last = m.Index + m.Length;
            }
        }
        catch (RegexMatchTimeoutException e)
        {
            throw TimedOut(e, text.Length);
        }
        return result is null ? text : result.Append(text, last, text.Length - last).ToString();
    }

    /// <summary>
    /// Texts on which the usual catastrophic patterns (a repetition of a repetition, an alternation of
    /// overlapping branches under a repetition) take exponential time, and real patterns microseconds:
    /// a run of one kind of character, then one that ends the run.
    /// </summary>
    private static readonly string[] Probes = BuildProbes();

    private static string[] BuildProbes()
    {
        var probes = new List<string>();
        foreach (string run in (string[])["a", "1", " ", ".", "é", "\n", "a1", "a "])
            foreach (string end in (string[])["!", "a", "1", " ", "\u0000"])
                probes.Add(string.Concat(Enumerable.Repeat(run, 48 / run.Length)) + end);
        return probes.ToArray();
    }

    private static string Seconds(TimeSpan t) => t.TotalSeconds >= 1 ? $"{t.TotalSeconds:0.#} s" : $"{t.TotalMilliseconds:0} ms";

    /// <summary>A pattern or text in messages: quoted, control characters escaped, at most 200 characters.</summary>
    internal static string Quote(string text)
    {
        var builder = new StringBuilder("\"");
        foreach (char c in text.Length > 200 ? text[..200] : text)
            builder.Append(c switch
            {
                '\n' => "\\n",
                '\r' => "\\r",
                '\t' => "\\t",
                '"' => "\\\"",
                < ' ' => $"\\u{(int)c:X4}",
                _ => c.ToString(),
            });
        return builder.Append(text.Length > 200 ? "…\"" : "\"").ToString();
    }
}
