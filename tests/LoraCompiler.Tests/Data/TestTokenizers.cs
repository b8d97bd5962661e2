using System.IO.Compression;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraCompiler.Runtime.Data;

namespace LoraCompiler.Tests.Data;

/// <summary>
/// The real tokenizer files of Data/TestData (see its README.md), each loaded once for all tests, and
/// small synthetic tokenizer.json files (byte-level and SentencePiece-style) for the tests that need
/// one built to order.
/// </summary>
public static class TestTokenizers
{
    private static readonly Lazy<BpeTokenizer> s_qwen3 = new(() => LoadPacked("qwen3"));
    private static readonly Lazy<BpeTokenizer> s_llama3 = new(() => LoadPacked("llama3"));
    private static readonly Lazy<BpeTokenizer> s_gemma3 = new(() => LoadPacked("gemma3"));

    public static BpeTokenizer Qwen3 => s_qwen3.Value;
    public static BpeTokenizer Llama3 => s_llama3.Value;
    public static BpeTokenizer Gemma3 => s_gemma3.Value;

    public static BpeTokenizer Get(string name) => name switch
    {
        "qwen3" => Qwen3,
        "llama3" => Llama3,
        "gemma3" => Gemma3,
        _ => throw new ArgumentException($"No test tokenizer '{name}'."),
    };

    /// <summary>
    /// The unpacked tokenizer.json of a test tokenizer, for libraries that read only a file path
    /// (Tokenizers.DotNet): written once into the temporary folder, named by the packed file's length
    /// and time so that a changed file is unpacked again, and reused by later runs.
    /// </summary>
    public static string UnpackedJson(string name)
    {
        var packed = new FileInfo(Path.Combine(TestDataDir, name, "tokenizer.json.gz"));
        string dir = Path.Combine(Path.GetTempPath(), "loracompiler-test-tokenizers");
        string path = Path.Combine(dir, $"{name}-{packed.Length}-{packed.LastWriteTimeUtc.Ticks}.json");
        lock (s_unpackLock)
        {
            if (File.Exists(path))
                return path;
            Directory.CreateDirectory(dir);
            string partial = path + $".{Environment.ProcessId}.partial";
            using (var input = new GZipStream(packed.OpenRead(), CompressionMode.Decompress))
            using (var output = File.Create(partial))
                input.CopyTo(output);
            File.Move(partial, path, overwrite: true);
            return path;
        }
    }

    private static readonly Lock s_unpackLock = new();

    /// <summary>tests/LoraCompiler.Tests/Data/TestData, found from the test binaries' folder upwards.</summary>
    public static string TestDataDir { get; } = FindTestData();

    /// <summary>The {text, ids} cases of a tokenizer's reference.json.</summary>
    public static IReadOnlyList<(string Text, int[] Ids)> Reference(string name)
    {
        using var document = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(TestDataDir, name, "reference.json")));
        return document.RootElement.EnumerateArray()
            .Select(c => (c.GetProperty("text").GetString()!, c.GetProperty("ids").EnumerateArray().Select(i => i.GetInt32()).ToArray()))
            .ToList();
    }

    private static BpeTokenizer LoadPacked(string name)
    {
        string dir = Path.Combine(TestDataDir, name);
        string json = Path.Combine(dir, "tokenizer.json.gz");
        string config = Path.Combine(dir, BpeTokenizer.ConfigFileName);
        using var packed = File.OpenRead(json);
        using var unpacked = new GZipStream(packed, CompressionMode.Decompress);
        using var configStream = File.OpenRead(config);
        return BpeTokenizer.Load(unpacked, configStream, json, config);
    }

    private static string FindTestData()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, "tests", "LoraCompiler.Tests", "Data", "TestData");
            if (Directory.Exists(candidate))
                return candidate;
        }
        throw new DirectoryNotFoundException($"tests/LoraCompiler.Tests/Data/TestData is not above {AppContext.BaseDirectory}.");
    }

    /// <summary>
    /// A byte-level BPE tokenizer.json with the 256 byte tokens (ids 0..255 in byte order), the given
    /// merges (their results get ids from 256 on), extra vocabulary entries after them and Qwen's
    /// Split pattern; <paramref name="edit"/> may change it before it is written to a new folder
    /// (with tokenizer_config.json beside it when <paramref name="configJson"/> is given). Returns the file's path.
    /// </summary>
    public static string WriteTiny(IReadOnlyList<(string Left, string Right)> merges, bool mergesAsArrays = false,
        bool ignoreMerges = false, IReadOnlyList<string>? extraTokens = null, string? addedTokensJson = null,
        string? configJson = null, Action<JsonObject>? edit = null)
    {
        var vocab = new JsonObject();
        for (int b = 0; b < 256; b++)
            vocab[ByteChar(b).ToString()] = b;
        foreach (var (left, right) in merges)
            if (!vocab.ContainsKey(left + right))
                vocab[left + right] = vocab.Count;
        foreach (string token in extraTokens ?? [])
            if (!vocab.ContainsKey(token))
                vocab[token] = vocab.Count;

        var mergeList = new JsonArray();
        foreach (var (left, right) in merges)
            mergeList.Add(mergesAsArrays ? new JsonArray(left, right) : JsonValue.Create($"{left} {right}"));

        var root = new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = JsonNode.Parse(addedTokensJson ?? "[]"),
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["pretokenizers"] = new JsonArray(
                    new JsonObject
                    {
                        ["type"] = "Split",
                        ["pattern"] = new JsonObject { ["Regex"] = QwenPattern },
                        ["behavior"] = "Isolated",
                        ["invert"] = false,
                    },
                    new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = false }),
            },
            ["post_processor"] = null,
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel" },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE",
                ["dropout"] = null,
                ["unk_token"] = null,
                ["byte_fallback"] = false,
                ["ignore_merges"] = ignoreMerges,
                ["vocab"] = vocab,
                ["merges"] = mergeList,
            },
        };
        edit?.Invoke(root);

        string dir = Directory.CreateTempSubdirectory("tokenizer-test-").FullName;
        string path = Path.Combine(dir, "tokenizer.json");
        File.WriteAllText(path, root.ToJsonString());
        if (configJson is not null)
            File.WriteAllText(Path.Combine(dir, BpeTokenizer.ConfigFileName), configJson);
        return path;
    }

    /// <summary>
    /// A SentencePiece-style BPE tokenizer.json with byte fallback, laid out as Gemma's: the 256
    /// <c>&lt;0xNN&gt;</c> pieces (ids 0..255 in byte order), "▁" (256), the one-character
    /// <paramref name="characters"/>, the given merges' results, Gemma's Replace normalizer and Split
    /// pre-tokenizer and the Replace/ByteFallback/Fuse decoder; <paramref name="prependAndStrip"/> gives
    /// Llama 2's normalizer (Prepend "▁", then Replace) and decoder (a Strip of one leading space after
    /// Fuse) instead. <paramref name="edit"/> may change it before it is written. Returns the file's path.
    /// </summary>
    public static string WriteTinySentencePiece(string characters, IReadOnlyList<(string Left, string Right)> merges,
        bool prependAndStrip = false, string? addedTokensJson = null, Action<JsonObject>? edit = null)
    {
        var vocab = new JsonObject();
        for (int b = 0; b < 256; b++)
            vocab[$"<0x{b:X2}>"] = b;
        vocab["▁"] = 256;
        foreach (var rune in characters.EnumerateRunes())
            if (!vocab.ContainsKey(rune.ToString()))
                vocab[rune.ToString()] = vocab.Count;
        foreach (var (left, right) in merges)
            if (!vocab.ContainsKey(left + right))
                vocab[left + right] = vocab.Count;

        var replace = new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = " " }, ["content"] = "▁" };
        var decoders = new JsonArray(
            new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = "▁" }, ["content"] = " " },
            new JsonObject { ["type"] = "ByteFallback" },
            new JsonObject { ["type"] = "Fuse" });
        if (prependAndStrip)
            decoders.Add(new JsonObject { ["type"] = "Strip", ["content"] = " ", ["start"] = 1, ["stop"] = 0 });
        var root = new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = JsonNode.Parse(addedTokensJson ?? "[]"),
            ["normalizer"] = prependAndStrip
                ? new JsonObject { ["type"] = "Sequence", ["normalizers"] = new JsonArray(new JsonObject { ["type"] = "Prepend", ["prepend"] = "▁" }, replace) }
                : replace,
            ["pre_tokenizer"] = prependAndStrip ? null : new JsonObject
            {
                ["type"] = "Split",
                ["pattern"] = new JsonObject { ["String"] = " " },
                ["behavior"] = "MergedWithPrevious",
                ["invert"] = false,
            },
            ["post_processor"] = null,
            ["decoder"] = new JsonObject { ["type"] = "Sequence", ["decoders"] = decoders },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE",
                ["dropout"] = null,
                ["unk_token"] = null,
                ["fuse_unk"] = true,
                ["byte_fallback"] = true,
                ["ignore_merges"] = false,
                ["vocab"] = vocab,
                ["merges"] = new JsonArray(merges.Select(m => (JsonNode)new JsonArray(m.Left, m.Right)).ToArray()),
            },
        };
        edit?.Invoke(root);

        string path = Path.Combine(Directory.CreateTempSubdirectory("tokenizer-test-").FullName, "tokenizer.json");
        File.WriteAllText(path, root.ToJsonString());
        return path;
    }

    /// <summary>Qwen2/Qwen2.5/Qwen3's pre-tokenizer pattern, as their tokenizer.json writes it.</summary>
    public const string QwenPattern =
        @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    /// <summary>GPT-2's printable stand-in for a byte ('Ġ' for a space), written out independently of the runtime's table.</summary>
    public static char ByteChar(int b)
    {
        bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        if (printable)
            return (char)b;
        int n = 0;
        for (int i = 0; i < b; i++)
            if (!((i >= 33 && i <= 126) || (i >= 161 && i <= 172) || (i >= 174 && i <= 255)))
                n++;
        return (char)(256 + n);
    }
}
