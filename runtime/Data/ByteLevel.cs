using System.Buffers;
using System.Text;

namespace LoraCompiler.Runtime.Data;

/// <summary>
/// GPT-2's reversible map between bytes and printable characters, which byte-level BPE vocabularies
/// are written in: the printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves and the
/// other 68 bytes become U+0100 onwards in byte order, so a space is 'Ġ' (U+0120) and '\n' is 'Ċ'.
/// </summary>
internal static class ByteLevel
{
    /// <summary>The character that stands for each byte.</summary>
    public static readonly char[] ByteToChar = BuildByteToChar();

    /// <summary>The byte each character stands for, or −1; indexed by character up to U+0143.</summary>
    public static readonly short[] CharToByte = BuildCharToByte();

    private static char[] BuildByteToChar()
    {
        var map = new char[256];
        int next = 256;
        for (int b = 0; b < 256; b++)
        {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            map[b] = printable ? (char)b : (char)next++;
        }
        return map;
    }

    private static short[] BuildCharToByte()
    {
        var map = new short[256 + 68];
        Array.Fill(map, (short)-1);
        for (int b = 0; b < 256; b++)
            map[ByteToChar[b]] = (short)b;
        return map;
    }

    /// <summary>The byte-level string of a piece of text: its UTF-8 bytes, one character each.</summary>
    public static string Encode(ReadOnlySpan<char> text)
    {
        byte[] bytes = ArrayPool<byte>.Shared.Rent(Encoding.UTF8.GetMaxByteCount(text.Length));
        try
        {
            int count = Encoding.UTF8.GetBytes(text, bytes);
            return string.Create(count, bytes, static (chars, b) =>
            {
                for (int i = 0; i < chars.Length; i++)
                    chars[i] = ByteToChar[b[i]];
            });
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(bytes);
        }
    }

    /// <summary>
    /// Appends the bytes a token stands for. As Hugging Face's ByteLevel decoder does, a token with a
    /// character outside the map (an added token such as one holding a space or CJK text) is taken
    /// as its own UTF-8 text instead.
    /// </summary>
    public static void AppendBytes(string token, List<byte> output)
    {
        foreach (char c in token)
        {
            if (c >= CharToByte.Length || CharToByte[c] < 0)
            {
                output.AddRange(Encoding.UTF8.GetBytes(token));
                return;
            }
        }
        foreach (char c in token)
            output.Add((byte)CharToByte[c]);
    }
}

/// <summary>Byte-level BPE's symbols: one per UTF-8 byte, as the vocabulary's one-character byte tokens.</summary>
internal sealed class ByteLevelSymbols : BpeSymbols
{
    /// <summary>The id of the one-character token of each byte.</summary>
    private readonly int[] _byteTokenIds;

    public ByteLevelSymbols(int[] byteTokenIds)
    {
        _byteTokenIds = byteTokenIds;
    }

    public override BpeMode Mode => BpeMode.ByteLevel;

    public override int MaxCachedWordLength => 256;

    public override string Word(string piece) => ByteLevel.Encode(piece);

    public override int[] Symbols(string word)
    {
        var ids = new int[word.Length];
        for (int i = 0; i < word.Length; i++)
            ids[i] = _byteTokenIds[ByteLevel.CharToByte[word[i]]];
        return ids;
    }

    public override void AppendBytes(string token, List<byte> output) => ByteLevel.AppendBytes(token, output);

    /// <summary>Not inside a UTF-8 sequence: the chunk ends before a byte that starts a character (or after 3 continuation bytes).</summary>
    public override int ChunkEnd(string word, int start, int maxLength)
    {
        int end = start + maxLength;
        if (end >= word.Length)
            return word.Length;
        for (int back = 0; back < 3 && (ByteLevel.CharToByte[word[end]] & 0xC0) == 0x80; back++)
            end--;
        return end;
    }
}
