using System.Buffers;

namespace LoraCompiler.Runtime.Data;

/// <summary>
/// A token of tokenizer.json's <c>added_tokens</c>: matched in the text as a whole before any
/// pre-tokenization and never split. Special ones (<c>&lt;|im_start|&gt;</c>, <c>&lt;|eot_id|&gt;</c>)
/// can be turned off for text that must not contain control tokens; non-special ones
/// (Qwen3's <c>&lt;think&gt;</c>) are always matched, as in Hugging Face's tokenizers.
/// </summary>
public sealed record AddedToken(int Id, string Content, bool Special, bool LStrip, bool RStrip, bool SingleWord, bool Normalized);

/// <summary>A run of text to tokenize (<see cref="Id"/> −1) or one added token, as a range of the input.</summary>
internal readonly record struct TextSegment(int Start, int Length, int Id)
{
    public bool IsText => Id < 0;
}

/// <summary>
/// Finds added tokens in text, leftmost first and the longest where several start at the same
/// place, as Hugging Face's AddedVocabulary does with its Aho-Corasick automaton. The tokens are held
/// in a trie, so a place costs one step per character of the longest token that could start there,
/// however many tokens share a first character (Gemma has over 6,000 beginning with '&lt;').
/// </summary>
internal sealed class AddedTokenMatcher
{
    /// <summary>The trie's edges: (node, next character) → node; node 0 is the root.</summary>
    private readonly Dictionary<(int Node, char Next), int> _edges = [];
    /// <summary>Per node, the tokens whose content ends there (lowest id first), or null.</summary>
    private readonly List<AddedToken[]?> _ends = [null];
    private readonly SearchValues<char> _firstChars;

    public AddedTokenMatcher(IEnumerable<AddedToken> tokens)
    {
        var firstChars = new HashSet<char>();
        foreach (var token in tokens.Where(t => t.Content.Length > 0).OrderBy(t => t.Id))
        {
            int node = 0;
            foreach (char c in token.Content)
            {
                if (!_edges.TryGetValue((node, c), out int child))
                {
                    child = _ends.Count;
                    _ends.Add(null);
                    _edges.Add((node, c), child);
                }
                node = child;
            }
            _ends[node] = [.. _ends[node] ?? [], token];
            firstChars.Add(token.Content[0]);
        }
        _firstChars = SearchValues.Create(firstChars.ToArray());
        IsEmpty = firstChars.Count == 0;
    }

    public bool IsEmpty { get; }

    /// <summary>
    /// Cuts <paramref name="text"/>[start..start+length] into text runs and added tokens, appending
    /// them to <paramref name="output"/>. Special tokens are matched only when <paramref name="allowSpecial"/> is set.
    /// </summary>
    public void Split(string text, int start, int length, bool allowSpecial, List<TextSegment> output)
    {
        int end = start + length;
        int textStart = start;
        int i = start;
        while (i < end)
        {
            int found = text.AsSpan(i, end - i).IndexOfAny(_firstChars);
            if (found < 0)
                break;
            i += found;
            var match = MatchAt(text, i, end, allowSpecial);
            if (match is null)
            {
                i++;
                continue;
            }

            int matchStart = i;
            int matchEnd = i + match.Content.Length;
            if (match.LStrip)
                while (matchStart > textStart && char.IsWhiteSpace(text[matchStart - 1]))
                    matchStart--;
            if (match.RStrip)
                while (matchEnd < end && char.IsWhiteSpace(text[matchEnd]))
                    matchEnd++;
            if (matchStart > textStart)
                output.Add(new TextSegment(textStart, matchStart - textStart, -1));
            output.Add(new TextSegment(matchStart, matchEnd - matchStart, match.Id));
            textStart = i = matchEnd;
        }
        if (textStart < end)
            output.Add(new TextSegment(textStart, end - textStart, -1));
    }

    /// <summary>The longest token at <paramref name="i"/> that may be matched there, or null.</summary>
    private AddedToken? MatchAt(string text, int i, int end, bool allowSpecial)
    {
        AddedToken? longest = null;
        int node = 0;
        for (int j = i; j < end && _edges.TryGetValue((node, text[j]), out node); j++)
        {
            if (_ends[node] is not { } tokens)
                continue;
            foreach (var token in tokens)
            {
                if (token.Special && !allowSpecial)
                    continue;
                if (token.SingleWord && !StandsAlone(text, i, j + 1, end))
                    continue;
                longest = token;
                break;
            }
        }
        return longest;
    }

    /// <summary>Whether the span has no word character right before or after it (single_word tokens).</summary>
    private static bool StandsAlone(string text, int start, int stop, int end)
    {
        static bool IsWordChar(char c) => char.IsLetterOrDigit(c) || c == '_';
        return (start == 0 || !IsWordChar(text[start - 1])) && (stop >= end || !IsWordChar(text[stop]));
    }
}
