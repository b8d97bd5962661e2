using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using System.Text;

namespace LoraCompiler.Runtime.Data;

/// <summary>
/// A BPE tokenizer read from a Hugging Face <c>tokenizer.json</c>, in either of two modes
/// (<see cref="BpeMode"/>): byte-level, as Qwen2, Qwen2.5, Qwen3 and Llama 3 ship it, or
/// SentencePiece-style with byte fallback, as Gemma ships it. Encoding runs the same pipeline as
/// Hugging Face's tokenizers:
/// <list type="number">
/// <item>added tokens (<c>&lt;|im_start|&gt;</c>, <c>&lt;|eot_id|&gt;</c>, <c>&lt;start_of_turn&gt;</c>, …) are cut out of the text whole;</item>
/// <item>the runs between them are normalized (Qwen: NFC; Gemma: each space becomes '▁') and
/// pre-tokenized: Qwen's and Llama 3's Split pattern cuts words, numbers, punctuation and whitespace
/// apart (Gemma's splits nothing, spaces being gone); byte-level BPE then writes each piece's UTF-8
/// bytes with GPT-2's byte-to-character map;</item>
/// <item>BPE merges each piece's adjacent symbols lowest rank first, starting from one symbol per byte
/// (byte-level) or per character, a character the vocabulary lacks becoming its <c>&lt;0xNN&gt;</c>
/// byte pieces (SentencePiece). <c>ignore_merges</c>, as Llama 3 sets it, first takes a piece that is
/// itself in the vocabulary whole.</item>
/// </list>
/// Decoding maps the tokens back to bytes (byte-level characters, '▁' as a space, byte pieces) and
/// reads them as UTF-8. Instances are immutable apart from a per-piece cache and are safe to use from
/// several threads.
/// </summary>
public sealed partial class BpeTokenizer
{
    private const int CacheCapacity = 200_000;

    /// <summary>model.vocab: token (as the file writes it) → id.</summary>
    private readonly Dictionary<string, int> _vocab;
    /// <summary>The added tokens by content.</summary>
    private readonly Dictionary<string, int> _addedByContent;
    private readonly string?[] _idToToken;
    private readonly bool[] _isSpecial;
    /// <summary>Merges by the pair's ids (left &lt;&lt; 32 | right): rank &lt;&lt; 32 | the merged token's id.</summary>
    private readonly Dictionary<long, long> _merges;
    /// <summary>Words to first symbols and tokens to bytes, by <see cref="Mode"/>.</summary>
    private readonly BpeSymbols _symbols;
    private readonly bool _ignoreMerges;
    private readonly Func<string, string>? _normalize;
    private readonly IReadOnlyList<PreTokenizerStep> _preTokenizer;
    private readonly AddedTokenMatcher _rawAddedTokens;
    private readonly AddedTokenMatcher _normalizedAddedTokens;
    private readonly ConcurrentDictionary<string, int[]> _cache = new(StringComparer.Ordinal);
    private int _cacheCount;

    /// <summary>Byte-level or SentencePiece-style BPE, from tokenizer.json's model.byte_fallback and pre-tokenizer.</summary>
    public BpeMode Mode => _symbols.Mode;

    /// <summary>The number of token ids: one more than the highest id of the vocabulary and the added tokens.</summary>
    public int VocabSize => _idToToken.Length;

    /// <summary>The number of entries of <c>model.vocab</c>, added tokens not counted.</summary>
    public int ModelVocabSize => _vocab.Count;

    /// <summary>The number of merges of <c>model.merges</c>.</summary>
    public int MergeCount => _merges.Count;

    /// <summary>The added tokens, in the file's order.</summary>
    public IReadOnlyList<AddedToken> AddedTokens { get; }

    /// <summary>The file the tokenizer was read from.</summary>
    public string Source { get; }

    /// <summary><c>eos_token</c> of tokenizer_config.json, or null without one.</summary>
    public string? EosToken { get; }

    /// <summary><c>bos_token</c> of tokenizer_config.json, or null without one (Qwen has none).</summary>
    public string? BosToken { get; }

    /// <summary>The id of <see cref="EosToken"/>, or null.</summary>
    public int? EosId => EosToken is null ? null : TokenId(EosToken);

    /// <summary>The id of <see cref="BosToken"/>, or null.</summary>
    public int? BosId => BosToken is null ? null : TokenId(BosToken);

    /// <summary>
    /// Whether a sequence starts with <see cref="BosToken"/>: <c>add_bos_token</c> of tokenizer_config.json
    /// where it is given, otherwise whether tokenizer.json's TemplateProcessing post-processor puts
    /// the BOS token first.
    /// </summary>
    public bool AddBosToken { get; }

    /// <summary><c>chat_template</c> of tokenizer_config.json (the default one where there are several), or null.</summary>
    public string? ChatTemplate { get; }

    /// <summary>
    /// The id of a token of the vocabulary or an added token, written as in tokenizer.json ('Ġ' for a
    /// space in byte-level vocabularies, '▁' in SentencePiece ones, <c>&lt;0x0A&gt;</c> for a byte piece), or null.
    /// </summary>
    public int? TokenId(string token) =>
        _addedByContent.TryGetValue(token, out int id) || _vocab.TryGetValue(token, out id) ? id : null;

    /// <summary>The token with an id, written as in tokenizer.json, or null for an id no token has.</summary>
    public string? Token(int id) => (uint)id < (uint)_idToToken.Length ? _idToToken[id] : null;

    /// <summary>Whether an id is an added token marked special.</summary>
    public bool IsSpecial(int id) => (uint)id < (uint)_isSpecial.Length && _isSpecial[id];

    /// <summary>
    /// The token ids of <paramref name="text"/>. Nothing is added around it (no BOS or EOS). With
    /// <paramref name="allowSpecialTokens"/> false, special added tokens in the text are encoded as
    /// ordinary text, so that data cannot inject control tokens.
    /// </summary>
    public int[] Encode(string text, bool allowSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>(text.Length / 3 + 4);
        Encode(text, allowSpecialTokens, ids);
        return ids.ToArray();
    }

    /// <summary>As <see cref="Encode(string, bool)"/>, appending the ids to <paramref name="output"/>.</summary>
    public void Encode(string text, bool allowSpecialTokens, List<int> output)
    {
        ArgumentNullException.ThrowIfNull(text);
        var segments = new List<TextSegment>();
        _rawAddedTokens.Split(text, 0, text.Length, allowSpecialTokens, segments);
        var pieces = new List<string>();
        var inner = new List<TextSegment>();
        foreach (var segment in segments)
        {
            if (!segment.IsText)
            {
                output.Add(segment.Id);
                continue;
            }
            string run = text.Substring(segment.Start, segment.Length);
            if (_normalize is not null)
                run = _normalize(run);
            if (_normalizedAddedTokens.IsEmpty)
            {
                EncodeRun(run, pieces, output);
                continue;
            }
            inner.Clear();
            _normalizedAddedTokens.Split(run, 0, run.Length, allowSpecialTokens, inner);
            foreach (var part in inner)
            {
                if (part.IsText)
                    EncodeRun(run.Substring(part.Start, part.Length), pieces, output);
                else
                    output.Add(part.Id);
            }
        }
    }

    /// <summary>
    /// The longest word BPE runs on, in first symbols (bytes, or characters): a longer pre-tokenized
    /// word is cut into chunks of at most this many (not inside a character, and in SentencePiece-style
    /// words before a '▁' where there is one among the last 1,024) and each chunk is merged on its own.
    /// BPE's time and memory grow with the word (about 3 µs and 70 bytes a symbol), so one word of
    /// 100 MB, which Hugging Face's tokenizers merge whole, would take minutes and gigabytes; with
    /// chunks, memory stays under a few MB whatever the text, and the tokens differ from an unbounded
    /// BPE only at the cuts of such words (a Qwen or Llama word of 16,384 bytes is a blob, not text; a
    /// Gemma "word" is a line, which is rarely that long).
    /// </summary>
    public const int MaxWordLength = 16_384;

    /// <summary>Pre-tokenizes a run of normalized text with no added tokens in it and appends the BPE ids of each piece.</summary>
    private void EncodeRun(string run, List<string> pieces, List<int> output)
    {
        if (run.Length == 0)
            return;
        PreTokenizerStep.Run(_preTokenizer, run, pieces);
        foreach (string piece in pieces)
        {
            if (piece.Length == 0)
                continue;
            string word = _symbols.Word(piece);
            if (word.Length > MaxWordLength)
            {
                if (_ignoreMerges && _vocab.TryGetValue(word, out int whole))
                {
                    output.Add(whole);
                    continue;
                }
                for (int start = 0; start < word.Length;)
                {
                    int end = _symbols.ChunkEnd(word, start, MaxWordLength);
                    output.AddRange(Bpe(word[start..end]));
                    start = end;
                }
                continue;
            }
            if (_cache.TryGetValue(word, out var cached))
            {
                output.AddRange(cached);
                continue;
            }
            int[] ids = Bpe(word);
            if (word.Length <= _symbols.MaxCachedWordLength && Volatile.Read(ref _cacheCount) < CacheCapacity && _cache.TryAdd(word, ids))
                Interlocked.Increment(ref _cacheCount);
            output.AddRange(ids);
        }
    }

    /// <summary>
    /// BPE over one word: start from its first symbols (bytes, or characters and byte pieces) and apply
    /// the lowest-ranked merge of any adjacent pair, leftmost first among equal ranks, until no pair
    /// has a merge.
    /// </summary>
    private int[] Bpe(string word)
    {
        if (_ignoreMerges && _vocab.TryGetValue(word, out int whole))
            return [whole];
        int[] ids = _symbols.Symbols(word);
        int n = ids.Length;
        if (n <= 1)
            return ids;

        // Symbols as a linked list over positions; a merged-away symbol gets id −1.
        var prev = new int[n];
        var next = new int[n];
        for (int i = 0; i < n; i++)
        {
            prev[i] = i - 1;
            next[i] = i + 1 < n ? i + 1 : -1;
        }

        var queue = new PriorityQueue<(int Pos, int NewId), long>();
        void Offer(int pos)
        {
            int right = next[pos];
            if (right >= 0 && _merges.TryGetValue(PairKey(ids[pos], ids[right]), out long merge))
                queue.Enqueue((pos, (int)merge), (merge & ~0xFFFFFFFFL) | (uint)pos);
        }
        for (int i = 0; i + 1 < n; i++)
            Offer(i);

        while (queue.TryDequeue(out var top, out _))
        {
            int pos = top.Pos;
            int right = next[pos];
            // Stale entries: the left symbol was merged away or changed, or its right neighbour did.
            if (ids[pos] < 0 || right < 0)
                continue;
            if (!_merges.TryGetValue(PairKey(ids[pos], ids[right]), out long merge) || (int)merge != top.NewId)
                continue;

            ids[pos] = top.NewId;
            ids[right] = -1;
            next[pos] = next[right];
            if (next[pos] >= 0)
                prev[next[pos]] = pos;
            if (prev[pos] >= 0)
                Offer(prev[pos]);
            Offer(pos);
        }

        var result = new List<int>();
        for (int i = 0; i >= 0; i = next[i])
            result.Add(ids[i]);
        return result.ToArray();
    }

    private static long PairKey(int left, int right) => ((long)left << 32) | (uint)right;

    /// <summary>
    /// Hashes a pair key by mixing all its bits. long's own hash is left ^ right, which puts the pairs
    /// of frequent (low-id) tokens, the ones BPE asks about most, into a few crowded buckets: hundreds
    /// of merges share one in Gemma's and Qwen's vocabularies, making every lookup a long scan.
    /// </summary>
    private sealed class PairComparer : IEqualityComparer<long>
    {
        public static readonly PairComparer Instance = new();

        public bool Equals(long x, long y) => x == y;

        public int GetHashCode(long key) => (int)(((ulong)key * 0x9E3779B97F4A7C15UL) >> 32);
    }

    /// <summary>
    /// The text of token ids: each token's bytes (byte-level: its characters mapped back, an added
    /// token's own text; SentencePiece: '▁' as a space, a byte piece as its byte) read as UTF-8, with
    /// U+FFFD for bytes that do not form valid UTF-8 (a sequence cut inside a character; Hugging Face
    /// writes one per byte there, .NET one per invalid sequence). Nothing is cleaned up (no
    /// clean_up_tokenization_spaces), so Decode(Encode(text)) is the text, normalized as the tokenizer
    /// normalizes (Qwen: NFC; Gemma: a '▁' of the text comes back as a space).
    /// </summary>
    public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens = false)
    {
        var bytes = new List<byte>(ids.Length * 4);
        foreach (int id in ids)
        {
            string token = Token(id) ?? throw new ArgumentOutOfRangeException(nameof(ids), id, $"Token id {id} is not in the vocabulary of {Source} (0 to {VocabSize - 1}).");
            if (skipSpecialTokens && _isSpecial[id])
                continue;
            _symbols.AppendBytes(token, bytes);
        }
        return _symbols.Finish(Encoding.UTF8.GetString(CollectionsMarshal.AsSpan(bytes)));
    }
}
