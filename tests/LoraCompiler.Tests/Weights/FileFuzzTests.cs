using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;
using System.Text.RegularExpressions;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;
using Xunit.Abstractions;

namespace LoraCompiler.Tests.Weights;

/// <summary>
/// Seeded random mutations of valid files (a float safetensors file, a 4-bit one, an index with its
/// shards, an adapter folder): bit flips, byte changes, truncations, appended bytes, header-length
/// edits, edits of the header's numbers (offsets and dimensions near 2^31, 2^32, 2^63 and 2^64), of
/// its strings (dtypes, names: invalid UTF-8, lone surrogates, duplicates, paths out of the folder)
/// and of its structure. Each mutant is either refused with <see cref="WeightsException"/> or opened
/// and then read end to end; any other exception fails the test with the seed that made it, and a
/// wrong bounds check would crash the test host (an out-of-range read of the mapping), which fails
/// the run. Case i uses seed i, so a failure is reproduced by its seed alone.
/// </summary>
public sealed class FileFuzzTests(ITestOutputHelper output) : IDisposable
{
    readonly string _dir = Directory.CreateTempSubdirectory("lora-fuzz-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    string PathOf(string name) => Path.Combine(_dir, name);

    // ================================================================ the valid files

    static byte[] FileBytes(string path, Action<string> write)
    {
        write(path);
        return File.ReadAllBytes(path);
    }

    static float[] Ramp(int n) => Enumerable.Range(0, n).Select(i => MathF.Sin(i * 0.7f) * 2f).ToArray();

    /// <summary>F32, F16 and BF16 tensors, a scalar, an empty tensor, integer tensors, metadata.</summary>
    byte[] FloatFile() => FileBytes(PathOf("float.valid"), path =>
    {
        var f16 = Ramp(7).Select(v => (Half)v).ToArray();
        var bf16 = Ramp(12).Select(v => (ushort)(BitConverter.SingleToUInt32Bits(v) >> 16)).ToArray();
        SafeTensorsWriter.WriteRaw(path,
        [
            SafeTensorsWriter.Raw<float>("model.layers.0.mlp.up_proj.weight", "F32", [3, 5], Ramp(15)),
            SafeTensorsWriter.Raw<Half>("model.norm.weight", "F16", [7], f16),
            SafeTensorsWriter.Raw<ushort>("model.embed_tokens.weight", "BF16", [2, 2, 3], bf16),
            SafeTensorsWriter.Raw<float>("scalar", "F32", [], [1.5f]),
            SafeTensorsWriter.Raw<float>("empty", "F32", [0, 4], []),
            SafeTensorsWriter.Raw<byte>("bytes", "U8", [5], [1, 2, 3, 4, 5]),
            SafeTensorsWriter.Raw<long>("ids", "I64", [2], [7, long.MaxValue]),
        ], new Dictionary<string, string> { ["format"] = "pt", ["note"] = "fuzz" });
    });

    const string Q4Name = "model.layers.0.self_attn.q_proj.weight";

    /// <summary>A 4-bit weight [4, 32] in groups of 16 with its scales and biases, and a float norm.</summary>
    byte[] Q4File() => FileBytes(PathOf("q4.valid"), path =>
    {
        var q4 = Q4.Quantize(Q4Name, Ramp(4 * 32), 4, 32, groupSize: 16);
        SafeTensorsWriter.WriteRaw(path,
        [
            SafeTensorsWriter.Raw<uint>(Q4Name, "U32", [4, 4], q4.Packed.Span),
            SafeTensorsWriter.Raw<Half>(Q4.ScalesName(Q4Name), "F16", [4, 2], q4.Scales.Span),
            SafeTensorsWriter.Raw<Half>(Q4.BiasesName(Q4Name), "F16", [4, 2], q4.Biases.Span),
            SafeTensorsWriter.Raw<float>("model.norm.weight", "F32", [32], Ramp(32)),
        ], new Dictionary<string, string> { [Q4.MetadataKey] = Q4.Metadata(16) });
    });

    static readonly TensorSpec[] Q4Specs = [new(Q4Name, [4, 32]), new("model.norm.weight", [32])];

    static readonly LoraSettings Settings = new(2, 4f, ["q_proj", "down_proj"]);

    static readonly LoraModuleSpec[] Modules =
    [
        new("model.layers.0.self_attn.q_proj", 8, 6),
        new("model.layers.0.mlp.down_proj", 6, 8),
    ];

    // ================================================================ mutations

    static readonly string[] Numbers =
    [
        "0", "1", "-1", "2", "7", "8", "2147483647", "2147483648", "4294967295", "4294967296", "1073741824",
        "4611686018427387904", "9223372036854775800", "9223372036854775807", "9223372036854775808",
        "18446744073709551615", "18446744073709551616", "-9223372036854775808", "1e3", "0.5", "1e999", "-0",
    ];

    static readonly string[] Dtypes = ["F32", "F16", "BF16", "U32", "U8", "I64", "F64", "BOOL", "F8_E4M3", "C64", "Q4_K", "f32", "", "F4"];

    static readonly string[] Strings =
    [
        "\"\"", "\"\\ud800\"", "\"\\udfff x\"", "\"../../etc/passwd\"", "\"/etc/passwd\"", "\"a/../../b\"",
        "\"model.norm.weight\"", "\"__metadata__\"", "\"\\u0000\"", "\"x\\\\y\"",
    ];

    static readonly string[] Values = ["null", "true", "[]", "{}", "[1,2]", "\"8\"", "[0,4]", "{\"a\":\"b\"}", "[\"q_proj\", 1]", .. Numbers];

    static readonly Regex Number = new(@"-?\d+(\.\d+)?([eE][-+]?\d+)?", RegexOptions.Compiled);
    static readonly Regex Quoted = new("\"(\\\\.|[^\"\\\\])*\"", RegexOptions.Compiled);
    static readonly Regex Value = new(@":\s*(""(\\.|[^""\\])*""|-?\d[\d.eE+-]*|true|false|null|\[[^\[\]]*\])", RegexOptions.Compiled);
    static readonly Regex Offsets = new(@"""data_offsets"":\s*\[\s*\d+\s*,\s*\d+\s*\]", RegexOptions.Compiled);

    /// <summary>One random change of a safetensors file's bytes (sometimes two or three).</summary>
    static byte[] MutateSafeTensors(byte[] valid, Random random)
    {
        byte[] bytes = valid;
        int changes = random.Next(10) switch { < 7 => 1, < 9 => 2, _ => 3 };
        for (int c = 0; c < changes; c++)
            bytes = random.Next(10) switch
            {
                0 => FlipBits(bytes, random),
                1 => SetBytes(bytes, random),
                2 => bytes[..random.Next(bytes.Length)],
                3 => [.. bytes, .. RandomBytes(random, 1 + random.Next(64))],
                4 => EditLength(bytes, random),
                5 or 6 => EditHeader(bytes, random, text => ReplaceMatch(text, Number, random, Numbers, neighbours: true)),
                7 => EditHeader(bytes, random, text => random.Next(3) == 0
                    ? ReplaceMatch(text, Quoted, random, [.. Dtypes.Select(d => $"\"{d}\""), .. Strings])
                    : SwapOffsets(text, random)),
                8 => EditHeader(bytes, random, text => EditText(text, random)),
                _ => NonFiniteData(bytes, random),
            };
        return bytes;
    }

    /// <summary>One random change of a JSON file (an index or an adapter config).</summary>
    static byte[] MutateJson(byte[] valid, Random random, string[] strings)
    {
        string text = Encoding.UTF8.GetString(valid);
        return random.Next(8) switch
        {
            0 => FlipBits(valid, random),
            1 => SetBytes(valid, random),
            2 => valid[..random.Next(valid.Length)],
            3 => Encoding.UTF8.GetBytes(ReplaceMatch(text, Number, random, Numbers, neighbours: true)),
            4 => Encoding.UTF8.GetBytes(ReplaceMatch(text, Quoted, random, strings)),
            5 => Encoding.UTF8.GetBytes(ReplaceValue(text, random)),
            6 => Encoding.UTF8.GetBytes(EditText(text, random)),
            _ => InvalidUtf8(valid, random),
        };
    }

    static byte[] FlipBits(byte[] bytes, Random random)
    {
        var copy = bytes.ToArray();
        for (int i = 0, n = 1 + random.Next(8); i < n && copy.Length > 0; i++)
            copy[random.Next(copy.Length)] ^= (byte)(1 << random.Next(8));
        return copy;
    }

    static byte[] SetBytes(byte[] bytes, Random random)
    {
        var copy = bytes.ToArray();
        for (int i = 0, n = 1 + random.Next(4); i < n && copy.Length > 0; i++)
            copy[random.Next(copy.Length)] = (byte)random.Next(256);
        return copy;
    }

    static byte[] RandomBytes(Random random, int n)
    {
        var bytes = new byte[n];
        random.NextBytes(bytes);
        return bytes;
    }

    static byte[] InvalidUtf8(byte[] bytes, Random random)
    {
        byte[][] bad = [[0xFF], [0xC0, 0x80], [0xED, 0xA0, 0x80], [0xE2, 0x82], [0xF8, 0x88, 0x80, 0x80, 0x80]];
        int at = random.Next(bytes.Length + 1);
        return [.. bytes[..at], .. bad[random.Next(bad.Length)], .. bytes[at..]];
    }

    /// <summary>The 8-byte header length set to an edge value, or moved a little.</summary>
    static byte[] EditLength(byte[] bytes, Random random)
    {
        if (bytes.Length < 8)
            return bytes;
        var copy = bytes.ToArray();
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(copy);
        ulong[] edges = [0, 1, 2, (ulong)copy.Length - 8, (ulong)copy.Length - 7, (ulong)copy.Length, 100_000_000, 100_000_001,
            int.MaxValue, 1UL << 31, 1UL << 32, long.MaxValue, 1UL << 63, ulong.MaxValue, ulong.MaxValue - 7, (ulong)random.NextInt64()];
        ulong value = random.Next(2) == 0 ? edges[random.Next(edges.Length)] : n + (ulong)(random.Next(17) - 8);
        BinaryPrimitives.WriteUInt64LittleEndian(copy, value);
        return copy;
    }

    /// <summary>
    /// Edits the header's text and, mostly, writes the new header length so the edit reaches the
    /// checks behind the JSON parser (the data after the header is kept as it was).
    /// </summary>
    static byte[] EditHeader(byte[] bytes, Random random, Func<string, string> edit)
    {
        if (bytes.Length < 8)
            return bytes;
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        if (n > (ulong)(bytes.Length - 8))
            return bytes;
        string header = Encoding.UTF8.GetString(bytes, 8, (int)n);
        byte[] edited = Encoding.UTF8.GetBytes(edit(header));
        byte[] data = bytes[(8 + (int)n)..];
        var result = CraftedFileTests.Assemble(edited, data);
        if (random.Next(5) == 0)
            BinaryPrimitives.WriteUInt64LittleEndian(result, n); // the old length: the header's end is now wrong
        return result;
    }

    /// <summary>One match of <paramref name="pattern"/> replaced by a choice, or (numbers) by a neighbour of itself.</summary>
    static string ReplaceMatch(string text, Regex pattern, Random random, string[] choices, bool neighbours = false)
    {
        var matches = pattern.Matches(text);
        if (matches.Count == 0)
            return text;
        var match = matches[random.Next(matches.Count)];
        string replacement = neighbours && random.Next(2) == 0 && long.TryParse(match.Value, out long value)
            ? (random.Next(3) switch { 0 => value + random.Next(1, 9), 1 => value - random.Next(1, 9), _ => value * 2 }).ToString()
            : choices[random.Next(choices.Length)];
        return string.Concat(text.AsSpan(0, match.Index), replacement, text.AsSpan(match.Index + match.Length));
    }

    /// <summary>Any JSON value (a number, a string, true, null) replaced by a value of another kind.</summary>
    static string ReplaceValue(string text, Random random)
    {
        var matches = Value.Matches(text);
        if (matches.Count == 0)
            return text;
        var match = matches[random.Next(matches.Count)];
        return string.Concat(text.AsSpan(0, match.Index), ":", Values[random.Next(Values.Length)], text.AsSpan(match.Index + match.Length));
    }

    /// <summary>The data_offsets of two tensors exchanged, or one moved by a little or by 2^63.</summary>
    static string SwapOffsets(string text, Random random)
    {
        var matches = Offsets.Matches(text);
        if (matches.Count < 2)
            return text;
        int a = random.Next(matches.Count), b = random.Next(matches.Count);
        if (random.Next(2) == 0)
        {
            string moved = random.Next(2) == 0
                ? "\"data_offsets\":[9223372036854775804,9223372036854775808]"
                : Regex.Replace(matches[a].Value, @"\d+", m => (long.Parse(m.Value) + random.Next(-4, 5)).ToString());
            return string.Concat(text.AsSpan(0, matches[a].Index), moved, text.AsSpan(matches[a].Index + matches[a].Length));
        }
        if (a == b)
            return text;
        var (first, second) = a < b ? (matches[a], matches[b]) : (matches[b], matches[a]);
        return text[..first.Index] + second.Value + text[(first.Index + first.Length)..second.Index]
            + first.Value + text[(second.Index + second.Length)..];
    }

    const string Inserted = "{}[],:\"\\ 0-\u00e9\ud800";

    /// <summary>A character deleted, a structural one inserted, or a piece duplicated (a key twice).</summary>
    static string EditText(string text, Random random)
    {
        if (text.Length == 0)
            return "{";
        int at = random.Next(text.Length);
        return random.Next(3) switch
        {
            0 => text.Remove(at, 1),
            1 => text.Insert(at, Inserted[random.Next(Inserted.Length)].ToString()),
            _ => text.Insert(at, text.Substring(random.Next(text.Length - Math.Min(40, text.Length - 1)), Math.Min(40, text.Length - 1))),
        };
    }

    /// <summary>NaN or infinity bit patterns (F32, F16 and BF16 at once) written over the data section.</summary>
    static byte[] NonFiniteData(byte[] bytes, Random random)
    {
        var copy = bytes.ToArray();
        byte[][] patterns = [[0x00, 0x00, 0xC0, 0x7F], [0x00, 0x00, 0x80, 0xFF], [0x00, 0x7C], [0x80, 0x7F], [0xFF, 0xFF, 0xFF, 0xFF]];
        var pattern = patterns[random.Next(patterns.Length)];
        int at = random.Next(Math.Max(1, copy.Length - pattern.Length));
        pattern.AsSpan(0, Math.Min(pattern.Length, copy.Length - at)).CopyTo(copy.AsSpan(at));
        return copy;
    }

    // ================================================================ reading a mutant end to end

    /// <summary>
    /// Everything a reader of an opened file may touch: checks independently of the reader that the
    /// tensors tile the data section inside the file, then reads every tensor whole.
    /// </summary>
    static void ReadAll(SafeTensorsFile file, long fileLength)
    {
        long end = -1;
        foreach (string name in file.Names)
        {
            var info = file.Info(name);
            Assert.True(info.Offset >= 8 && info.ByteLength >= 0 && info.Offset <= fileLength - info.ByteLength, $"tensor '{name}' lies outside the file");
            Assert.True(end < 0 || info.Offset == end, $"tensor '{name}' does not follow the one before it");
            end = info.Offset + info.ByteLength;
            Assert.Equal(info.ByteLength, info.Elements * (info.Dtype switch { "F64" or "I64" or "U64" or "C64" => 8, "F32" or "I32" or "U32" => 4, "F16" or "BF16" or "I16" or "U16" => 2, _ => 1 }));
            if (info.Dtype is "F32" or "F16" or "BF16")
                file.Read(name);
            else
                _ = file.Bytes(name).IndexOf((byte)0xA5);
            file.IndexOfNonFinite(name);
        }
        Assert.True(end < 0 || end == fileLength, "the tensors do not end where the file does");
        _ = file.Metadata.Count;
    }

    /// <summary>A model opened: every tensor read as the trainer would, 4-bit ones dequantized, then validated.</summary>
    static void ReadAll(ModelWeights model, IReadOnlyList<TensorSpec>? specs)
    {
        foreach (string name in model.Names)
        {
            try
            {
                var info = model.Info(name);
                if (model.IsQuantized(name))
                {
                    var q4 = model.MapQ4(name);
                    var values = new float[(long)q4.Rows * q4.Columns];
                    q4.Dequantize(values);
                    Assert.Equal(values, model.Read(name));
                }
                else if (info.Dtype is "F32" or "F16" or "BF16")
                {
                    model.Read(name);
                    if (model.MapF32(name) is { } mapped)
                        _ = System.Numerics.Tensors.TensorPrimitives.Sum(mapped.Span);
                    if (info.Elements > 0)
                        model.ReadRange(name, info.Elements - 1, new float[1]);
                }
                model.Shape(name);
            }
            catch (WeightsException)
            {
                // refused at use (a non-finite value, an inconsistent 4-bit tensor): fine
            }
        }
        if (specs is not null)
            model.Validate(specs);
    }

    // ================================================================ the runs

    sealed record Outcome(int Read, int Refused, List<string> Failures, TimeSpan Time);

    /// <summary>Runs <paramref name="cases"/> seeded cases on a worker with a time limit (a hang fails instead of blocking the run).</summary>
    Outcome Run(int cases, Action<Random> attempt)
    {
        int read = 0, refused = 0;
        var failures = new List<string>();
        var clock = Stopwatch.StartNew();
        var work = Task.Run(() =>
        {
            for (int seed = 0; seed < cases; seed++)
            {
                try
                {
                    attempt(new Random(seed));
                    read++;
                }
                catch (WeightsException)
                {
                    refused++;
                }
                catch (Exception e)
                {
                    failures.Add($"seed {seed}: {e.GetType().Name}: {e.Message} {string.Join(" < ", (e.StackTrace ?? "").Split('\n').Take(3).Select(l => l.Trim()))}");
                }
            }
        });
        Assert.True(work.Wait(TimeSpan.FromSeconds(120)), $"the fuzz cases did not finish in 120 s (stuck after {read + refused + failures.Count})");
        var outcome = new Outcome(read, refused, failures, clock.Elapsed);
        output.WriteLine($"{cases} cases: {read} read end to end, {refused} refused with WeightsException, {failures.Count} other exceptions, {clock.ElapsedMilliseconds} ms");
        Assert.True(failures.Count == 0, $"{failures.Count} of {cases} mutants threw something other than WeightsException:\n{string.Join("\n", failures.Take(10))}");
        Assert.True(read >= cases / 20 && refused >= cases / 4, $"read {read}, refused {refused}: the mutations should give both");
        return outcome;
    }

    [Fact]
    public void Mutated_safetensors_files_are_read_whole_or_refused()
    {
        byte[] valid = FloatFile();
        string path = PathOf("mutant.safetensors");
        Run(2500, random =>
        {
            byte[] mutant = MutateSafeTensors(valid, random);
            File.WriteAllBytes(path, mutant);
            using (var file = SafeTensorsFile.Open(path))
                ReadAll(file, mutant.Length);
            using var model = ModelWeights.Open(path);
            ReadAll(model, specs: null);
        });
    }

    [Fact]
    public void Mutated_four_bit_files_are_read_whole_or_refused()
    {
        byte[] valid = Q4File();
        string path = PathOf("model.safetensors");
        Run(1500, random =>
        {
            byte[] mutant = MutateSafeTensors(valid, random);
            File.WriteAllBytes(path, mutant);
            using var model = ModelWeights.Open(_dir);
            ReadAll(model, Q4Specs);
        });
    }

    [Fact]
    public void Mutated_indexes_and_shards_are_read_whole_or_refused()
    {
        string folder = Directory.CreateDirectory(PathOf("sharded")).FullName;
        string outside = Directory.CreateDirectory(PathOf("outside")).FullName;
        File.WriteAllText(Path.Combine(outside, "secret.safetensors"), "SECRET-BYTES-NEVER-IN-A-MESSAGE");
        string[] shardNames = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
        byte[][] shards =
        [
            FileBytes(Path.Combine(folder, shardNames[0]), p => SafeTensorsWriter.Write(p, [("a", [2, 3], Ramp(6)), ("b", [4], Ramp(4))], "BF16")),
            FileBytes(Path.Combine(folder, shardNames[1]), p => SafeTensorsWriter.Write(p, [("c", [5], Ramp(5))])),
        ];
        byte[] index = Encoding.UTF8.GetBytes($$$"""
            {"metadata": {"total_size": 42}, "weight_map": {"a": "{{{shardNames[0]}}}", "b": "{{{shardNames[0]}}}", "c": "{{{shardNames[1]}}}"}}
            """);
        string indexPath = Path.Combine(folder, ModelWeights.IndexFileName);
        string[] strings = [.. Strings, "\"../outside/secret.safetensors\"", $"\"{outside}/secret.safetensors\"", "\".\"", "\"sub/\"",
            $"\"{shardNames[0]}\"", $"\"{shardNames[1]}\"", "\"weight_map\"", "\"a\"", "\"c\""];
        Run(1000, random =>
        {
            File.WriteAllBytes(indexPath, index);
            for (int s = 0; s < shards.Length; s++)
                File.WriteAllBytes(Path.Combine(folder, shardNames[s]), shards[s]);
            if (random.Next(4) == 0)
            {
                int s = random.Next(shards.Length);
                File.WriteAllBytes(Path.Combine(folder, shardNames[s]), MutateSafeTensors(shards[s], random));
            }
            else
                File.WriteAllBytes(indexPath, MutateJson(index, random, strings));
            try
            {
                using var model = ModelWeights.Open(folder);
                ReadAll(model, specs: null);
            }
            catch (WeightsException e)
            {
                Assert.DoesNotContain("SECRET", e.Message);
                throw;
            }
        });
    }

    [Fact]
    public void Mutated_adapter_folders_are_loaded_whole_or_refused()
    {
        string dir = PathOf("adapter");
        var adapter = LoraAdapter.CreateNew(Settings, Modules, seed: 3);
        foreach (var module in adapter.Modules)
            Ramp(module.B.Length).CopyTo(module.B, 0);
        adapter.Save(dir, "base");
        byte[] config = File.ReadAllBytes(Path.Combine(dir, LoraAdapter.ConfigFileName));
        byte[] weights = File.ReadAllBytes(Path.Combine(dir, LoraAdapter.WeightsFileName));
        string[] strings = [.. Strings, "\"LORA\"", "\"q_proj\"", "\"r\"", "\"lora_alpha\"", "\"use_dora\"", "\"target_modules\""];
        Run(1000, random =>
        {
            bool mutateConfig = random.Next(2) == 0;
            File.WriteAllBytes(Path.Combine(dir, LoraAdapter.ConfigFileName), mutateConfig ? MutateJson(config, random, strings) : config);
            File.WriteAllBytes(Path.Combine(dir, LoraAdapter.WeightsFileName), mutateConfig ? weights : MutateSafeTensors(weights, random));
            var loaded = LoraAdapter.Load(dir, Settings, Modules);
            Assert.All(loaded.Modules, m => Assert.True(m.A.All(float.IsFinite) && m.B.All(float.IsFinite)));
        });
    }
}
