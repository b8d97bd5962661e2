namespace LoraCompiler.Runtime.Data;

/// <summary>The two kinds of BPE tokenizer.json that <see cref="BpeTokenizer"/> reads.</summary>
public enum BpeMode
{
    /// <summary>
    /// GPT-2's byte-level BPE (Qwen2/2.5/3, Llama 3): a ByteLevel pre-tokenizer turns each piece into
    /// its UTF-8 bytes, written as printable characters ('Ġ' for a space), and BPE starts from one
    /// symbol per byte, so every text has tokens.
    /// </summary>
    ByteLevel,

    /// <summary>
    /// SentencePiece-style BPE with byte fallback (Gemma; Llama 2 and Mistral as converted to
    /// tokenizer.json): the normalizer writes spaces as '▁', BPE starts from one symbol per character,
    /// and a character the vocabulary lacks becomes the <c>&lt;0xNN&gt;</c> pieces of its UTF-8 bytes
    /// (<c>model.byte_fallback</c>).
    /// </summary>
    SentencePiece,
}

/// <summary>
/// What differs between the two <see cref="BpeMode"/>s: how a pre-tokenized piece becomes the word BPE
/// merges and its first symbols, and how a token becomes bytes again. The merge loop, the vocabulary,
/// the added tokens, the normalizer and the pre-tokenizer are the same for both.
/// </summary>
internal abstract class BpeSymbols
{
    public abstract BpeMode Mode { get; }

    /// <summary>
    /// The longest word whose ids are cached. Byte-level words are pre-tokenized words, short and
    /// repeated; a SentencePiece word is everything between two added tokens (Gemma: a whole line),
    /// so only short ones, which repeat, are worth the memory.
    /// </summary>
    public abstract int MaxCachedWordLength { get; }

    /// <summary>The word BPE runs on for a piece of normalized text, written as the vocabulary writes tokens (also the cache key).</summary>
    public abstract string Word(string piece);

    /// <summary>The ids of the word's first symbols, before any merge.</summary>
    public abstract int[] Symbols(string word);

    /// <summary>Appends the bytes a token (of the vocabulary or an added one) decodes to.</summary>
    public abstract void AppendBytes(string token, List<byte> output);

    /// <summary>
    /// Where a chunk of an over-long word that starts at <paramref name="start"/> ends: at most
    /// <paramref name="maxLength"/> symbols on, moved back to a place the word can be cut with the least
    /// change to its tokens (not inside a character; before a '▁' where one is near).
    /// </summary>
    public abstract int ChunkEnd(string word, int start, int maxLength);

    /// <summary>The decoder's last touch on the whole decoded text (SentencePiece's Strip); the text itself by default.</summary>
    public virtual string Finish(string text) => text;
}
