using System.Buffers;
using System.Text;
using System.Text.Unicode;

namespace LoraCompiler.Runtime.Data;

/// <summary>
/// Reads text files as UTF-8 that must be valid: a byte sequence that is not UTF-8 (a Latin-1 file,
/// a file cut inside a character) is a <see cref="TrainingDataException"/> naming the file, the line
/// and the byte, never a U+FFFD that then trains as if it were the data. A UTF-8 byte order mark at
/// the start is skipped; a UTF-16 or UTF-32 one is refused, since JSON Lines and the text files the
/// trainer reads are UTF-8.
/// </summary>
internal static class StrictUtf8
{
    /// <summary>The whole file as text.</summary>
    public static string ReadAllText(string path)
    {
        byte[] bytes = File.ReadAllBytes(path);
        var span = bytes.AsSpan(Preamble(bytes, path));
        char[] chars = ArrayPool<char>.Shared.Rent(Math.Max(1, span.Length));
        try
        {
            var status = Utf8.ToUtf16(span, chars, out int read, out int written, replaceInvalidSequences: false);
            if (status != OperationStatus.Done)
            {
                // The line and the byte of the line where the invalid sequence starts.
                int lineStart = span[..read].LastIndexOf((byte)'\n') + 1;
                int line = span[..read].Count((byte)'\n') + 1;
                throw Invalid(path, line, read - lineStart, span[read..]);
            }
            return new string(chars, 0, written);
        }
        finally
        {
            ArrayPool<char>.Shared.Return(chars);
        }
    }

    /// <summary>
    /// The file's lines, numbered from 1, cut at "\n", "\r\n" or "\r" as <see cref="TextReader.ReadLine"/>
    /// cuts them, each checked and decoded as it is read (the file is never held whole).
    /// </summary>
    public static IEnumerable<(int Number, string Text)> ReadLines(string path)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1, FileOptions.SequentialScan);
        byte[] buffer = new byte[1 << 16];
        int start = 0, end = 0, number = 0;
        bool eof = false;
        while (end < 4 && !eof)
        {
            int count = stream.Read(buffer, end, buffer.Length - end);
            eof = count == 0;
            end += count;
        }
        start = Preamble(buffer.AsSpan(0, end), path);
        while (true)
        {
            int newline = buffer.AsSpan(start, end - start).IndexOfAny((byte)'\n', (byte)'\r');
            // A '\r' at the end of what is read may be the first half of "\r\n": read on before deciding.
            if (newline >= 0 && !(buffer[start + newline] == '\r' && start + newline + 1 == end && !eof))
            {
                int at = start + newline;
                yield return (++number, Decode(buffer.AsSpan(start, at - start), path, number));
                start = at + (buffer[at] == '\r' && at + 1 < end && buffer[at + 1] == '\n' ? 2 : 1);
                continue;
            }
            if (eof)
            {
                if (end > start)
                    yield return (++number, Decode(buffer.AsSpan(start, end - start), path, number));
                yield break;
            }
            // Keep the unfinished line at the front, grow the buffer for a long one, and read more.
            if (start > 0)
            {
                buffer.AsSpan(start, end - start).CopyTo(buffer);
                end -= start;
                start = 0;
            }
            if (end == buffer.Length)
                Array.Resize(ref buffer, checked(buffer.Length * 2));
            int count = stream.Read(buffer, end, buffer.Length - end);
            if (count == 0)
                eof = true;
            end += count;
        }
    }

    private static string Decode(ReadOnlySpan<byte> line, string path, int number)
    {
        if (Utf8.IsValid(line))
            return Encoding.UTF8.GetString(line);
        Utf8.ToUtf16(line, new char[line.Length], out int read, out _, replaceInvalidSequences: false);
        throw Invalid(path, number, read, line[read..]);
    }

    private static TrainingDataException Invalid(string path, int line, int byteInLine, ReadOnlySpan<byte> rest)
    {
        // The bytes that do not decode: up to 4, written as hex.
        string bytes = string.Join(" ", rest[..Math.Min(4, rest.Length)].ToArray().Select(b => $"0x{b:X2}"));
        return new TrainingDataException(path, line,
            $"not valid UTF-8 at byte {byteInLine + 1} of the line ({bytes}); the file must be UTF-8 text (convert it, e.g. with iconv -t UTF-8).");
    }

    /// <summary>How many bytes of byte order mark to skip: 3 for UTF-8's, 0 for none; UTF-16's and UTF-32's are refused.</summary>
    private static int Preamble(ReadOnlySpan<byte> bytes, string path)
    {
        if (bytes.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF]))
            return 3;
        if (bytes.StartsWith((ReadOnlySpan<byte>)[0xFF, 0xFE]) || bytes.StartsWith((ReadOnlySpan<byte>)[0xFE, 0xFF])
            || bytes.StartsWith((ReadOnlySpan<byte>)[0x00, 0x00, 0xFE, 0xFF]))
            throw new TrainingDataException(path, null, "the file starts with a UTF-16 or UTF-32 byte order mark; it must be UTF-8 text (convert it, e.g. with iconv -t UTF-8).");
        return 0;
    }
}
