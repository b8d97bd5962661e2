using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using LoraCompiler.Runtime.Data;

namespace LoraCompiler.Tests.Data;

/// <summary>
/// The tokenizer.json and tokenizer_config.json reader against thousands of seeded random mutations
/// of small valid files (byte-level with ChatML's tokens, and SentencePiece-style with byte fallback):
/// each either loads, and then encodes and decodes a sample text without an exception, or is refused
/// with a <see cref="TokenizerException"/>; never another exception, a hang or a crash.
/// </summary>
public class TokenizerFuzzTests
{
    private const int Mutations = 4000;
    private static readonly TimeSpan RegexTimeout = TimeSpan.FromMilliseconds(50);

    private const string Sample = "Hello wörld, the theme!\n<|im_start|>user\n  123 4.5 𝐀😀 tab\there<|im_end|>\r\n ▁x <0x41> ";

    /// <summary>Member names the reader looks for, so that inserted members reach its branches.</summary>
    private static readonly string[] Keys =
    [
        "type", "pattern", "Regex", "String", "content", "id", "special", "normalized", "lstrip", "rstrip", "single_word",
        "behavior", "invert", "add_prefix_space", "use_regex", "byte_fallback", "ignore_merges", "dropout", "processors",
        "single", "SpecialToken", "Sequence", "decoders", "pretokenizers", "normalizers", "prepend", "start", "stop",
        "vocab", "merges", "added_tokens", "continuing_subword_prefix", "end_of_word_suffix", "eos_token", "bos_token",
        "add_bos_token", "chat_template", "name", "template",
    ];

    /// <summary>Strings that mean something to the reader: types, patterns (some of them catastrophic), tokens.</summary>
    private static readonly string[] Strings =
    [
        "", " ", "▁", "BPE", "Unigram", "ByteLevel", "Split", "Sequence", "Replace", "Prepend", "NFC", "NFKD", "Lowercase",
        "ByteFallback", "Fuse", "Strip", "TemplateProcessing", "Isolated", "Removed", "MergedWithPrevious", "MergedWithNext",
        "Contiguous", "Metaspace", @"\p{L}+", @"(\p{L}+)+$", @"(a|a)*b", @"\x{zz}", @"\x{110000}", @"\p{", "[", "(?<", @"\s+(?!\S)",
        @"[^\s]+", "a++", "x{2,1}", "<|im_start|>", "<|im_end|>", "<s>", "h", "e", "he", "h e", "Ġ", "<0x41>", "<0xZZ>",
        "default", "A", "\u0000", "{{ messages }}",
    ];

    [Fact]
    public void Mutated_tokenizer_files_load_or_are_refused_with_a_tokenizer_exception()
    {
        var bases = new[]
        {
            (Json: Read(TestTokenizers.WriteTiny([("h", "e"), ("t", "h"), ("th", "e"), ("Ġ", "the")], extraTokens: ["<s>"],
                addedTokensJson: """
                    [{"id": 300, "content": "<|im_start|>", "special": true}, {"id": 301, "content": "<|im_end|>", "special": true, "rstrip": true},
                     {"id": 302, "content": "think", "special": false, "single_word": true}]
                    """,
                edit: j => j["post_processor"] = JsonNode.Parse("""
                    {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}
                    """))),
                Config: """{"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}, "chat_template": [{"name": "default", "template": "x"}]}"""),
            (Json: Read(TestTokenizers.WriteTinySentencePiece("abcdehlortw", [("h", "e"), ("▁", "t"), ("▁t", "h")], prependAndStrip: true,
                addedTokensJson: """[{"id": 400, "content": "<start_of_turn>", "special": true}, {"id": 401, "content": "\n", "normalized": true}]""")),
                Config: """{"bos_token": "<bos>", "eos_token": "<start_of_turn>", "add_bos_token": true, "chat_template": "{{ x }}"}"""),
        };

        int loaded = 0, refused = 0, current = -1;
        string? failure = null;
        var run = Task.Run(() =>
        {
            for (int i = 0; i < Mutations && failure is null; i++)
            {
                current = i;
                var random = new Random(20_261_122 + i);
                var (json, config) = bases[i % bases.Length];
                var description = new List<string>();
                byte[] jsonBytes, configBytes;
                var node = JsonNode.Parse(json)!;
                var configNode = JsonNode.Parse(config)!;
                bool mutateConfig = random.Next(4) == 0;
                int count = 1 + random.Next(3);
                for (int m = 0; m < count; m++)
                    description.Add(Mutate(mutateConfig && m == 0 ? configNode : node, random));
                jsonBytes = Encoding.UTF8.GetBytes(node.ToJsonString());
                configBytes = Encoding.UTF8.GetBytes(configNode.ToJsonString());
                if (random.Next(8) == 0)
                {
                    // Raw bytes: flipped, inserted (not UTF-8) or cut off.
                    if (random.Next(3) == 0)
                        configBytes = MutateBytes(configBytes, random, description);
                    else
                        jsonBytes = MutateBytes(jsonBytes, random, description);
                }

                try
                {
                    var tokenizer = BpeTokenizer.Load(new MemoryStream(jsonBytes), new MemoryStream(configBytes),
                        "tokenizer.json", "tokenizer_config.json", RegexTimeout);
                    foreach (bool special in (bool[])[true, false])
                    {
                        int[] ids = tokenizer.Encode(Sample, special);
                        tokenizer.Decode(ids);
                        tokenizer.Decode(ids, skipSpecialTokens: true);
                    }
                    _ = (tokenizer.EosId, tokenizer.BosId, tokenizer.AddBosToken, tokenizer.ChatTemplate, tokenizer.VocabSize);
                    loaded++;
                }
                catch (TokenizerException e)
                {
                    Assert.True(e.Path is "tokenizer.json" or "tokenizer_config.json", e.Path);
                    refused++;
                }
                catch (Exception e)
                {
                    failure = $"mutation {i} ({string.Join("; ", description)}) threw {e.GetType().Name}: {e.Message}\n{e.StackTrace}";
                }
            }
        });
        // A watchdog, not a timing: a reader that hangs fails the test instead of the whole run.
#pragma warning disable xUnit1031
        Assert.True(run.Wait(TimeSpan.FromMinutes(2)), $"the reader did not return on mutation {current}");
#pragma warning restore xUnit1031
        Assert.True(failure is null, failure);
        // Both outcomes are common, or the mutations are too weak (all refused) or too timid (all loaded).
        Assert.True(loaded > Mutations / 10 && refused > Mutations / 10, $"{loaded} loaded, {refused} refused");
    }

    private static string Read(string path) => File.ReadAllText(path);

    /// <summary>One structural mutation of a random node (one outside model.vocab four times in five); says what it did.</summary>
    private static string Mutate(JsonNode root, Random random)
    {
        var nodes = new List<(JsonNode Node, string Path)>();
        Collect(root, "$", nodes);
        var outside = nodes.Where(n => !n.Path.StartsWith("$.model.vocab.", StringComparison.Ordinal)).ToList();
        var (target, path) = random.Next(5) != 0 && outside.Count > 0 ? outside[random.Next(outside.Count)] : nodes[random.Next(nodes.Count)];
        switch (random.Next(6))
        {
            case 0 when target.Parent is not null:
                Replace(target, RandomValue(random, 2));
                return $"{path} = new value";
            case 1 when target.Parent is JsonObject parent:
                parent.Remove(parent.First(p => ReferenceEquals(p.Value, target)).Key);
                return $"removed {path}";
            case 1 when target.Parent is JsonArray array:
                array.Remove(target);
                return $"removed {path}";
            case 2 when target is JsonObject obj:
            {
                string key = Keys[random.Next(Keys.Length)];
                obj[key] = RandomValue(random, 2);
                return $"{path}.{key} set";
            }
            case 3 when target is JsonArray array && array.Count > 0:
                array.Insert(random.Next(array.Count + 1), array[random.Next(array.Count)]?.DeepClone());
                return $"{path}: an element duplicated";
            case 4 when target is JsonValue value && value.TryGetValue<string>(out var text):
                Replace(target, MutateString(text, random));
                return $"{path}: string changed";
            case 5 when target is JsonValue value && value.TryGetValue<double>(out double number):
                double changed = random.Next(5) switch
                {
                    0 => number + 1,
                    1 => -number - 1,
                    2 => number * 65536 * 65536,
                    3 => 2147483648.0,
                    _ => 1e300,
                };
                Replace(target, JsonValue.Create(double.IsFinite(changed) ? changed : 1e300));
                return $"{path}: number changed";
            default:
                if (target is JsonObject o)
                {
                    o[Keys[random.Next(Keys.Length)]] = RandomValue(random, 1);
                    return $"{path}: member added";
                }
                if (target.Parent is not null)
                    Replace(target, RandomValue(random, 1));
                return $"{path} replaced";
        }
    }

    private static void Collect(JsonNode? node, string path, List<(JsonNode, string)> nodes)
    {
        if (node is null)
            return;
        nodes.Add((node, path));
        if (node is JsonObject obj)
            foreach (var (key, value) in obj)
                Collect(value, $"{path}.{key}", nodes);
        else if (node is JsonArray array)
            for (int i = 0; i < array.Count; i++)
                Collect(array[i], $"{path}[{i}]", nodes);
    }

    private static void Replace(JsonNode target, JsonNode? value)
    {
        switch (target.Parent)
        {
            case JsonObject parent:
                parent[parent.First(p => ReferenceEquals(p.Value, target)).Key] = value;
                break;
            case JsonArray array:
                array[array.IndexOf(target)] = value;
                break;
        }
    }

    private static JsonNode? RandomValue(Random random, int depth)
    {
        switch (random.Next(depth > 0 ? 12 : 9))
        {
            case 0: return null;
            case 1: return JsonValue.Create(random.Next(2) == 0);
            case 2: return JsonValue.Create(random.Next(-2, 400));
            case 3: return JsonValue.Create(2147483648L * (random.Next(2) == 0 ? 1 : -1));
            case 4: return JsonValue.Create(random.Next(3) == 0 ? 1e308 : 0.5);
            case 5:
            case 6: return JsonValue.Create(Strings[random.Next(Strings.Length)]);
            case 7: return JsonValue.Create(MutateString("ab", random));
            case 8: return new JsonArray();
            case 9: return new JsonArray(RandomValue(random, depth - 1), RandomValue(random, depth - 1));
            case 10: return new JsonObject { ["type"] = RandomValue(random, depth - 1) };
            default: return new JsonObject { [Keys[random.Next(Keys.Length)]] = RandomValue(random, depth - 1) };
        }
    }

    private static readonly string[] Characters = ["(", ")", "[", "]", "{", "}", "+", "*", "?", "\\", "|", "^", "$", ".", "▁", "Ġ", " ", "é", "𝐀", "\u0000"];

    private static string MutateString(string text, Random random)
    {
        var builder = new StringBuilder(text);
        switch (random.Next(4))
        {
            case 0 when builder.Length > 0:
                builder.Remove(random.Next(builder.Length), 1);
                break;
            case 1:
                builder.Insert(random.Next(builder.Length + 1), Characters[random.Next(Characters.Length)]);
                break;
            case 2:
                builder.Append(Strings[random.Next(Strings.Length)]);
                break;
            default:
                builder.Clear().Append(Strings[random.Next(Strings.Length)]);
                break;
        }
        return builder.ToString();
    }

    private static byte[] MutateBytes(byte[] bytes, Random random, List<string> description)
    {
        var list = bytes.ToList();
        switch (random.Next(3))
        {
            case 0 when list.Count > 0:
                int at = random.Next(list.Count);
                list[at] ^= (byte)(1 << random.Next(8));
                description.Add($"bit flipped at byte {at}");
                break;
            case 1:
                int insert = random.Next(list.Count + 1);
                list.InsertRange(insert, random.Next(2) == 0 ? [0xFF] : [0xED, 0xA0, 0x80]); // not UTF-8; a UTF-8 surrogate
                description.Add($"bytes inserted at {insert}");
                break;
            default:
                int keep = random.Next(list.Count + 1);
                list.RemoveRange(keep, list.Count - keep);
                description.Add($"cut at {keep}");
                break;
        }
        return list.ToArray();
    }
}
