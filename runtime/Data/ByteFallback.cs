using System.Text;

namespace LoraCompiler.Runtime.Data;

/// <summary>
/// SentencePiece-style BPE's symbols: one per character of the normalized text (a character outside
/// the Basic Multilingual Plane is one symbol, as in Hugging Face's tokenizers, whose strings are
/// Unicode scalars), and for a character the vocabulary does not have, the <c>&lt;0xNN&gt;</c> pieces
/// of its UTF-8 bytes. Decoding runs the decoder Hugging Face's SentencePiece conversion writes:
/// Replace ('▁' back to a space), ByteFallback (byte pieces back to bytes), Fuse, and, where the
/// normalizer prepends a '▁', Strip of that one leading space.
/// </summary>
internal sealed class ByteFallbackSymbols : BpeSymbols
{
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _vocab;
    /// <summary>The id of the <c>&lt;0xNN&gt;</c> piece of each byte.</summary>
    private readonly int[] _bytePieceIds;
    private readonly ByteFallbackDecoder _decoder;

    public ByteFallbackSymbols(Dictionary<string, int> vocab, int[] bytePieceIds, ByteFallbackDecoder decoder)
    {
        _vocab = vocab.GetAlternateLookup<ReadOnlySpan<char>>();
        _bytePieceIds = bytePieceIds;
        _decoder = decoder;
    }

    public override BpeMode Mode => BpeMode.SentencePiece;

    public override int MaxCachedWordLength => 32;

    /// <summary>The vocabulary's name of the piece of a byte: <c>&lt;0x0A&gt;</c> for '\n'.</summary>
    public static string BytePiece(int b) => $"<0x{b:X2}>";

    /// <summary>Whether a token is a byte piece (<c>&lt;0xNN&gt;</c>, either case of hex digits, as Hugging Face's ByteFallback decoder reads it), and its byte.</summary>
    public static bool IsBytePiece(string token, out byte value)
    {
        value = 0;
        return token.Length == 6 && token.StartsWith("<0x", StringComparison.Ordinal) && token[5] == '>'
               && byte.TryParse(token.AsSpan(3, 2), System.Globalization.NumberStyles.AllowHexSpecifier, null, out value);
    }

    public override string Word(string piece) => piece;

    public override int[] Symbols(string word)
    {
        var ids = new List<int>(word.Length);
        Span<byte> bytes = stackalloc byte[4];
        for (int i = 0; i < word.Length;)
        {
            int length = char.IsHighSurrogate(word[i]) && i + 1 < word.Length && char.IsLowSurrogate(word[i + 1]) ? 2 : 1;
            var character = word.AsSpan(i, length);
            if (_vocab.TryGetValue(character, out int id))
            {
                ids.Add(id);
            }
            else
            {
                int count = Encoding.UTF8.GetBytes(character, bytes);
                for (int b = 0; b < count; b++)
                    ids.Add(_bytePieceIds[bytes[b]]);
            }
            i += length;
        }
        return ids.ToArray();
    }

    /// <summary>Before a '▁' (a space) within the last 1,024 characters where there is one, else not inside a surrogate pair.</summary>
    public override int ChunkEnd(string word, int start, int maxLength)
    {
        int end = start + maxLength;
        if (end >= word.Length)
            return word.Length;
        int space = word.AsSpan(end - Math.Min(1024, maxLength / 2), Math.Min(1024, maxLength / 2)).LastIndexOf('▁');
        if (space > 0)
            return end - Math.Min(1024, maxLength / 2) + space;
        return char.IsLowSurrogate(word[end]) ? end - 1 : end;
    }

    public override void AppendBytes(string token, List<byte> output)
    {
        if (_decoder.ByteFallback && IsBytePiece(token, out byte value))
        {
            output.Add(value);
            return;
        }
        foreach (var (pattern, content) in _decoder.Replacements)
            token = token.Replace(pattern, content, StringComparison.Ordinal);
        output.AddRange(Encoding.UTF8.GetBytes(token));
    }

    public override string Finish(string text)
    {
        if (_decoder.Strip is not var (content, start, stop))
            return text;
        int from = 0;
        while (from < start && from < text.Length && text[from] == content)
            from++;
        int to = text.Length;
        while (text.Length - to < stop && to > from && text[to - 1] == content)
            to--;
        return text[from..to];
    }
}

/// <summary>
/// A SentencePiece-style decoder as tokenizer.json describes it: the Replace steps applied to each
/// token, whether ByteFallback turns byte pieces into bytes, and a Strip after Fuse (up to Start
/// leading and Stop trailing Content characters removed from the decoded text).
/// </summary>
internal sealed record ByteFallbackDecoder(
    IReadOnlyList<(string Pattern, string Content)> Replacements,
    bool ByteFallback,
    (char Content, int Start, int Stop)? Strip);
