using System.Text;
using LoraCompiler.Runtime.Data;
using HfTokenizer = Tokenizers.DotNet.Tokenizer;

namespace LoraCompiler.Tests.Data;

/// <summary>
/// The managed tokenizer against Hugging Face's own: Tokenizers.DotNet wraps the Rust `tokenizers`
/// library (0.22) that transformers uses, loaded from the same tokenizer.json. Over a corpus of the
/// reference texts, random strings from a fixed seed and this repository's own source and prose,
/// every text must give the same ids (after the BOS that Hugging Face's post-processor puts first,
/// which our Encode leaves to the caller) and decode, special tokens skipped, to the same text.
/// </summary>
public class HuggingFaceTokenizerTests
{
    [Theory]
    [InlineData("qwen3")]
    [InlineData("llama3")]
    [InlineData("gemma3")]
    public void Ids_equal_hugging_face_tokenizers_over_a_varied_corpus(string name)
    {
        var tokenizer = TestTokenizers.Get(name);
        using var reference = new HfTokenizer(TestTokenizers.UnpackedJson(name));

        // Encode adds what the post-processor adds: Gemma's <bos>, nothing for Qwen3 and these Llama 3 files.
        int[] prefix = [.. reference.Encode("").Select(id => (int)id)];
        Assert.Equal(tokenizer.AddBosToken ? [tokenizer.BosId!.Value] : [], prefix);

        var corpus = Corpus(name);
        Assert.True(corpus.Count > 700, $"{corpus.Count} texts");
        var mismatches = new List<string>();
        int tokens = 0;
        foreach (string text in corpus)
        {
            int[] ours = tokenizer.Encode(text);
            int[] theirs = [.. reference.Encode(text).Skip(prefix.Length).Select(id => (int)id)];
            tokens += ours.Length;
            if (!ours.AsSpan().SequenceEqual(theirs))
            {
                mismatches.Add($"{Escape(text)}\n  hf   [{string.Join(", ", theirs)}]\n  ours [{string.Join(", ", ours)}]");
                continue;
            }
            string decoded = reference.Decode([.. ours.Select(id => (uint)id)]);
            if (tokenizer.Decode(ours, skipSpecialTokens: true) != decoded)
                mismatches.Add($"{Escape(text)} decodes to {Escape(tokenizer.Decode(ours, skipSpecialTokens: true))}, hf {Escape(decoded)}");
        }
        Assert.True(mismatches.Count == 0, $"{mismatches.Count} of {corpus.Count} texts differ:\n" + string.Join("\n", mismatches.Take(10)));
        Assert.True(tokens > 50_000, $"{tokens} tokens");
    }

    /// <summary>
    /// The reference.json texts, 600 random strings from pieces of many scripts and of every shipped
    /// tokenizer's special and added tokens, and the repository's own files: C# source, GLSL, JSON and
    /// Markdown, whole and line by line.
    /// </summary>
    private static List<string> Corpus(string name)
    {
        var texts = TestTokenizers.Reference(name).Select(c => c.Text).ToList();

        string[] pool =
        [
            "a", "Z", "hello", " world", "The", "ing", "'s", "'T", "'ll", "'RE", "'", "\"", "0", "7", "42", "1234", "99999", "3.14", "1e-5",
            " ", "  ", "   ", "    ", "        ", "\t", "\t\t", "\n", "\r\n", "\n\n", "\n\n\n", " \n", "\u00a0", "\u2003", "\u3000", "\u200b", "\ufeff",
            ".", ",", "!?", "()", "{}", "[", "]", "->", "==", "=>", "#", "@", "$", "%", "&&", "||", "_", "__init__", "/*", "*/", "//", "<", ">", "</", "/>",
            "é", "ß", "Ω", "ж", "ш", "ع", "ע", "क", "ि", "\u0301", "\u0303", "中", "文字", "の", "カ", "한국", "ไทย", "ᄀ", "Ꙩ",
            "😀", "👍🏽", "🚀", "\u200d", "❤️", "🇺🇸", "🫨", "𝐀", "𝟙", "𠀀", "𓀀", "\U0010FFFD", "\uE000", "\u0000", "\u001b", "\u0007", "½", "²", "Ⅻ", "٣",
            "▁", "▁▁", "Ġ", "Ċ", "<0x41>", "<0x", "<table>", "</td>", "<h1>", "<unused7>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<think>", "<|", "|>",
            "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<start_of_image>", "user\n", "model\n", "assistant",
        ];
        var random = new Random(20251202);
        for (int i = 0; i < 600; i++)
        {
            var text = new StringBuilder();
            int n = 1 + random.Next(40);
            for (int j = 0; j < n; j++)
                text.Append(pool[random.Next(pool.Length)]);
            texts.Add(text.ToString());
        }

        string root = Path.GetFullPath(Path.Combine(TestTokenizers.TestDataDir, "..", "..", "..", ".."));
        string[] files =
        [
            "README.md", "runtime/Data/BpeTokenizer.cs", "runtime/Data/PreTokenizer.cs", "runtime/Data/ExampleEncoder.cs",
            "shaders/add.comp", "models/qwen2.5-0.5b.json", "models/llama-3.2-1b.json", "tests/LoraCompiler.Tests/Data/TestData/README.md",
        ];
        foreach (string file in files)
        {
            string content = File.ReadAllText(Path.Combine(root, file));
            texts.Add(content);
            texts.AddRange(content.Split('\n').Where(line => line.Length > 0).Take(100));
        }
        return texts;
    }

    private static string Escape(string text) => System.Text.Json.JsonSerializer.Serialize(text);
}
