using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace LoraCompiler.Runtime.Data;

/// <summary>How a <see cref="RegexSplit"/> treats the pieces its pattern matches (Hugging Face's SplitDelimiterBehavior).</summary>
internal enum SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous }

/// <summary>
/// One step of a tokenizer's pre-tokenizer: it cuts each piece of text into smaller pieces. Steps
/// run in order over every piece the previous step produced; BPE then runs on each final piece.
/// </summary>
internal abstract class PreTokenizerStep
{
    public abstract void Split(string piece, List<string> output);

    /// <summary>Runs the steps one after the other over <paramref name="text"/>.</summary>
    public static void Run(IReadOnlyList<PreTokenizerStep> steps, string text, List<string> output)
    {
        output.Clear();
        output.Add(text);
        var next = new List<string>();
        foreach (var step in steps)
        {
            next.Clear();
            foreach (string piece in output)
                step.Split(piece, next);
            output.Clear();
            output.AddRange(next);
        }
    }
}

/// <summary>
/// Hugging Face's Split pre-tokenizer: a regular expression written for Oniguruma (as Qwen's and
/// Llama 3's are) run with .NET's Regex.
/// </summary>
/// <remarks>
/// Two differences between the engines are bridged. .NET matches UTF-16 code units, so a character
/// outside the Basic Multilingual Plane (an emoji, 𝐀, 𠀀) is two surrogates that <c>\p{L}</c> or
/// <c>\p{N}</c> never match; the pattern therefore runs on a shadow string in which each such
/// character is one BMP character of the same Unicode category, and the match boundaries are mapped
/// back. And .NET has no possessive quantifiers, so <c>X?+</c> becomes the atomic group <c>(?&gt;X?)</c>
/// (see <see cref="TranslatePattern"/>). Each match runs under the time limit of a
/// <see cref="TokenizerRegex"/>.
/// </remarks>
internal sealed class RegexSplit : PreTokenizerStep
{
    private readonly TokenizerRegex _regex;
    private readonly SplitBehavior _behavior;
    private readonly bool _invert;

    public RegexSplit(TokenizerRegex regex, SplitBehavior behavior, bool invert)
    {
        _regex = regex;
        _behavior = behavior;
        _invert = invert;
    }

    public override void Split(string piece, List<string> output)
    {
        if (piece.Length == 0)
            return;
        var (shadow, map) = Shadow(piece);

        // The text cut into alternating matched and unmatched spans, in original indices.
        var spans = new List<(int Start, int End, bool Match)>();
        int last = 0;
        try
        {
            foreach (var m in _regex.Regex.EnumerateMatches(shadow))
            {
                if (m.Length == 0)
                    continue;
                int start = map is null ? m.Index : map[m.Index];
                int end = map is null ? m.Index + m.Length : map[m.Index + m.Length];
                if (start > last)
                    spans.Add((last, start, _invert));
                spans.Add((start, end, !_invert));
                last = end;
            }
        }
        catch (RegexMatchTimeoutException e)
        {
            throw _regex.TimedOut(e, piece.Length);
        }
        if (last < piece.Length)
            spans.Add((last, piece.Length, _invert));

        foreach (var (start, end) in Combine(spans, _behavior))
            if (end > start)
                output.Add(piece.Substring(start, end - start));
    }

    /// <summary>Applies a split behaviour to the matched and unmatched spans, as Hugging Face's tokenizers do.</summary>
    private static List<(int Start, int End)> Combine(List<(int Start, int End, bool Match)> spans, SplitBehavior behavior)
    {
        var result = new List<(int Start, int End)>(spans.Count);
        bool previousMatch = false;
        switch (behavior)
        {
            case SplitBehavior.Isolated:
                foreach (var s in spans)
                    result.Add((s.Start, s.End));
                break;
            case SplitBehavior.Removed:
                foreach (var s in spans)
                    if (!s.Match)
                        result.Add((s.Start, s.End));
                break;
            case SplitBehavior.MergedWithPrevious:
                foreach (var s in spans)
                {
                    if (s.Match && !previousMatch && result.Count > 0)
                        result[^1] = (result[^1].Start, s.End);
                    else
                        result.Add((s.Start, s.End));
                    previousMatch = s.Match;
                }
                break;
            case SplitBehavior.MergedWithNext:
                for (int i = spans.Count - 1; i >= 0; i--)
                {
                    var s = spans[i];
                    if (s.Match && !previousMatch && result.Count > 0)
                        result[^1] = (s.Start, result[^1].End);
                    else
                        result.Add((s.Start, s.End));
                    previousMatch = s.Match;
                }
                result.Reverse();
                break;
            case SplitBehavior.Contiguous:
                foreach (var s in spans)
                {
                    if (s.Match && previousMatch && result.Count > 0)
                        result[^1] = (result[^1].Start, s.End);
                    else
                        result.Add((s.Start, s.End));
                    previousMatch = s.Match;
                }
                break;
        }
        return result;
    }

    /// <summary>
    /// The text with every surrogate pair replaced by one BMP character of the pair's Unicode
    /// category, and the map from shadow indices to original ones (one longer than the shadow);
    /// the text itself and no map when it has no surrogates.
    /// </summary>
    internal static (string Shadow, int[]? Map) Shadow(string text)
    {
        int first = text.AsSpan().IndexOfAnyInRange('\uD800', '\uDFFF');
        if (first < 0)
            return (text, null);
        var shadow = new StringBuilder(text.Length);
        var map = new List<int>(text.Length + 1);
        for (int i = 0; i < text.Length; i++)
        {
            map.Add(i);
            if (char.IsHighSurrogate(text[i]) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1]))
            {
                int codePoint = char.ConvertToUtf32(text[i], text[i + 1]);
                shadow.Append(CategoryRepresentative[(int)CharUnicodeInfo.GetUnicodeCategory(codePoint)]);
                i++;
            }
            else
            {
                shadow.Append(text[i]);
            }
        }
        map.Add(text.Length);
        return (shadow.ToString(), map.ToArray());
    }

    /// <summary>
    /// For each Unicode category, a BMP character of that category from above Latin-1, so that it
    /// matches the same <c>\p{..}</c>, <c>\s</c>, <c>\d</c> and <c>\w</c> classes as the character it
    /// stands for and none of the ASCII literals a pattern spells out.
    /// </summary>
    private static readonly char[] CategoryRepresentative = BuildRepresentatives();

    private static char[] BuildRepresentatives()
    {
        var result = new char[32];
        var found = new bool[32];
        for (int c = 0x100; c <= 0xFFFF; c++)
        {
            if (c is >= 0xD800 and <= 0xDFFF)
                continue;
            int category = (int)CharUnicodeInfo.GetUnicodeCategory((char)c);
            if (!found[category])
            {
                found[category] = true;
                result[category] = (char)c;
            }
        }
        // Categories no BMP character above U+00FF has (none in current Unicode) keep a private-use stand-in.
        for (int i = 0; i < result.Length; i++)
            if (!found[i])
                result[i] = '\uE000';
        return result;
    }

    /// <summary>
    /// Rewrites an Oniguruma pattern for .NET: a possessive quantifier (<c>?+</c>, <c>*+</c>, <c>++</c>,
    /// <c>{n,m}+</c>) becomes an atomic group around the quantified atom, and <c>\x{HHHH}</c> becomes
    /// <c>\uHHHH</c>. Everything else Qwen's and Llama 3's patterns use (<c>\p{L}</c>, <c>\p{N}</c>,
    /// <c>(?i:...)</c>, <c>(?!\S)</c>, <c>{1,3}</c>) means the same to both engines.
    /// </summary>
    internal static string TranslatePattern(string pattern)
    {
        var output = new StringBuilder(pattern.Length + 16);
        var groupStarts = new Stack<int>();
        int atomStart = -1; // where in the output the last complete atom starts
        int i = 0;
        while (i < pattern.Length)
        {
            char c = pattern[i];
            switch (c)
            {
                case '\\':
                {
                    atomStart = output.Length;
                    if (i + 1 < pattern.Length && pattern[i + 1] == 'x' && i + 2 < pattern.Length && pattern[i + 2] == '{')
                    {
                        int close = pattern.IndexOf('}', i + 3);
                        if (close < 0)
                            throw new ArgumentException($"Unterminated \\x{{...}} in the pattern {pattern}.");
                        int codePoint = int.Parse(pattern.AsSpan(i + 3, close - i - 3), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
                        foreach (char unit in char.ConvertFromUtf32(codePoint))
                            output.Append($"\\u{(int)unit:X4}");
                        i = close + 1;
                        break;
                    }
                    int length = 2;
                    if (i + 1 < pattern.Length && pattern[i + 1] is 'p' or 'P' && i + 2 < pattern.Length && pattern[i + 2] == '{')
                        length = pattern.IndexOf('}', i) - i + 1;
                    output.Append(pattern, i, Math.Min(length, pattern.Length - i));
                    i += length;
                    break;
                }
                case '[':
                {
                    atomStart = output.Length;
                    int end = ClassEnd(pattern, i);
                    output.Append(pattern, i, end - i);
                    i = end;
                    break;
                }
                case '(':
                    groupStarts.Push(output.Length);
                    output.Append(c);
                    atomStart = -1;
                    i++;
                    break;
                case ')':
                    output.Append(c);
                    atomStart = groupStarts.Count > 0 ? groupStarts.Pop() : -1;
                    i++;
                    break;
                case '?' or '*' or '+' or '{' when atomStart >= 0 && !(c == '{' && !IsCountedRepetition(pattern, i)):
                {
                    int end = c == '{' ? pattern.IndexOf('}', i) + 1 : i + 1;
                    output.Append(pattern, i, end - i);
                    i = end;
                    if (i < pattern.Length && pattern[i] == '+')
                    {
                        output.Insert(atomStart, "(?>");
                        output.Append(')');
                        i++;
                    }
                    else if (i < pattern.Length && pattern[i] == '?')
                    {
                        output.Append('?');
                        i++;
                    }
                    atomStart = -1;
                    break;
                }
                default:
                    atomStart = c == '|' ? -1 : output.Length;
                    output.Append(c);
                    i++;
                    break;
            }
        }
        return output.ToString();
    }

    /// <summary>The index just past the character class that opens at <paramref name="start"/>, nested classes included.</summary>
    private static int ClassEnd(string pattern, int start)
    {
        int depth = 0;
        int i = start;
        while (i < pattern.Length)
        {
            char c = pattern[i];
            if (c == '\\')
            {
                i += 2;
                continue;
            }
            if (c == '[')
            {
                depth++;
                // A ']' right after '[' or '[^' is a literal.
                if (i + 1 < pattern.Length && pattern[i + 1] == '^')
                    i++;
                if (i + 1 < pattern.Length && pattern[i + 1] == ']')
                    i++;
            }
            else if (c == ']' && --depth == 0)
            {
                return i + 1;
            }
            i++;
        }
        throw new ArgumentException($"Unterminated character class in the pattern {pattern}.");
    }

    private static bool IsCountedRepetition(string pattern, int open)
    {
        int close = pattern.IndexOf('}', open);
        if (close < 0)
            return false;
        var body = pattern.AsSpan(open + 1, close - open - 1);
        return body.Length > 0 && !body.ContainsAnyExcept("0123456789,");
    }
}

/// <summary>
/// Hugging Face's ByteLevel pre-tokenizer before its byte mapping: an optional space in front of
/// each piece that has none, and optionally GPT-2's own split pattern. The byte mapping itself is
/// done by the tokenizer on every final piece.
/// </summary>
internal sealed class ByteLevelSplit : PreTokenizerStep
{
    /// <summary>GPT-2's pattern, which ByteLevel applies when its use_regex is true.</summary>
    public const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    private readonly bool _addPrefixSpace;
    private readonly RegexSplit? _split;

    public ByteLevelSplit(bool addPrefixSpace, bool useRegex, string where, string source, TimeSpan timeout)
    {
        _addPrefixSpace = addPrefixSpace;
        _split = useRegex ? new RegexSplit(TokenizerRegex.Create(Gpt2Pattern, $"{where} (GPT-2's pattern, use_regex)", source, timeout), SplitBehavior.Isolated, invert: false) : null;
    }

    public override void Split(string piece, List<string> output)
    {
        if (_addPrefixSpace && !piece.StartsWith(' '))
            piece = " " + piece;
        if (_split is null)
            output.Add(piece);
        else
            _split.Split(piece, output);
    }
}
