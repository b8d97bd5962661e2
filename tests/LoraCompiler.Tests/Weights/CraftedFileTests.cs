using System.Buffers.Binary;
using System.Text;
using LoraCompiler.Runtime.Training;
using LoraCompiler.Runtime.Weights;

namespace LoraCompiler.Tests.Weights;

/// <summary>
/// Files made to break the readers, one class of attack or damage per test: offsets that overflow,
/// byte ranges that overlap, leave holes or trailing bytes, shapes that disagree with their bytes,
/// text that is not UTF-8, index shards out of the model folder, non-finite weights and adapters, and
/// a file truncated under its mapping. Each is one <see cref="WeightsException"/> naming the file.
/// </summary>
public sealed class CraftedFileTests : IDisposable
{
    readonly string _dir = Directory.CreateTempSubdirectory("lora-crafted-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    string PathOf(string name) => Path.Combine(_dir, name);

    /// <summary>8-byte length, the header bytes as given, then the data: nothing fixed up.</summary>
    internal static byte[] Assemble(byte[] header, byte[] data)
    {
        var bytes = new byte[8 + header.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)header.Length);
        header.CopyTo(bytes, 8);
        data.CopyTo(bytes, 8 + header.Length);
        return bytes;
    }

    WeightsException Refused(string header, int dataBytes, string file = "crafted.safetensors") =>
        Refused(Encoding.UTF8.GetBytes(header), dataBytes, file);

    WeightsException Refused(byte[] header, int dataBytes, string file = "crafted.safetensors")
    {
        string path = PathOf(file);
        File.WriteAllBytes(path, Assemble(header, new byte[dataBytes]));
        var e = Assert.Throws<WeightsException>(() => SafeTensorsFile.Open(path));
        Assert.StartsWith(path + ": ", e.Message);
        Assert.Equal(path, e.Path);
        return e;
    }

    // ================================================================ out-of-bounds reads

    [Theory]
    [InlineData("9223372036854775800", "9223372036854775804")] // 2^63 − 8: dataStart + begin overflows a long
    [InlineData("9223372036854775807", "9223372036854775807")] // long.MaxValue, an empty tensor there
    [InlineData("0", "18446744073709551615")]                  // 2^64 − 1
    [InlineData("18446744073709551612", "18446744073709551615")]
    public void Offsets_near_2_to_the_63_are_refused_without_overflow(string begin, string end)
    {
        ulong length = ulong.Parse(end) - ulong.Parse(begin);
        // 2^64 − 1 = 65535 · 42009217 · 6700417: a shape whose bytes match the range, each dimension an int.
        string shape = length == ulong.MaxValue ? "65535,42009217,6700417" : length.ToString();
        var e = Refused($$$"""{"w":{"dtype":"U8","shape":[{{{shape}}}],"data_offsets":[{{{begin}}},{{{end}}}]}}""", 16);
        Assert.Contains("tensor 'w'", e.Message);
        Assert.Contains("truncated", e.Message);
    }

    [Theory]
    [InlineData("-1", "4")]
    [InlineData("0", "-4")]
    [InlineData("0", "4.5")]
    [InlineData("0", "1e2")]
    [InlineData("0", "\"4\"")]
    [InlineData("0", "18446744073709551616")] // 2^64: no integer type holds it
    public void Offsets_that_are_not_non_negative_integers_are_refused(string begin, string end)
    {
        var e = Refused($$$"""{"w":{"dtype":"U8","shape":[4],"data_offsets":[{{{begin}}},{{{end}}}]}}""", 4);
        Assert.Contains("'data_offsets' must be [begin, end]", e.Message);
    }

    [Fact]
    public void A_header_length_beyond_the_file_or_near_2_to_the_64_is_refused()
    {
        string path = PathOf("length.safetensors");
        foreach (ulong n in new ulong[] { 0, 9, 1UL << 63, ulong.MaxValue, ulong.MaxValue - 7, 100_000_001 })
        {
            var bytes = Assemble("{}"u8.ToArray(), []);
            BinaryPrimitives.WriteUInt64LittleEndian(bytes, n);
            File.WriteAllBytes(path, bytes);
            var e = Assert.Throws<WeightsException>(() => SafeTensorsFile.Open(path));
            Assert.StartsWith(path, e.Message);
            Assert.Contains(n == 9 ? "truncated" : "not a header length", e.Message);
        }
    }

    [Theory]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""", 12, "overlaps")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 8, "overlaps")] // aliased
    [InlineData("""{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"b":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}}""", 12, "overlaps")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}""", 12, "belong to no tensor")] // hole
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8, "belong to no tensor")]   // hole at the start
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}""", 8, "trailing bytes")]
    [InlineData("""{}""", 1, "trailing bytes")]
    public void Byte_ranges_must_tile_the_data_section(string header, int dataBytes, string problem)
    {
        Assert.Contains(problem, Refused(header, dataBytes).Message);
    }

    [Fact]
    public void Ranges_in_any_header_order_that_tile_the_data_and_empty_tensors_between_them_are_fine()
    {
        string path = PathOf("ok.safetensors");
        File.WriteAllBytes(path, Assemble(Encoding.UTF8.GetBytes("""
            {"c":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"e":{"dtype":"F32","shape":[0,5],"data_offsets":[4,4]},
             "a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"z":{"dtype":"BOOL","shape":[0],"data_offsets":[8,8]}}
            """), new byte[8]));
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(["a", "e", "c", "z"], file.Names);
    }

    [Theory]
    [InlineData("""{"w":{"dtype":"F32","shape":[1073741824,1073741824,4],"data_offsets":[0,0]}}""", "overflows")]
    [InlineData("""{"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}}""", "dimension")]
    [InlineData("""{"w":{"dtype":"F32","shape":[65536,65536,65536],"data_offsets":[0,0]}}""", "needs 1125899906842624")]
    [InlineData("""{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}""", "needs 12")]
    [InlineData("""{"w":{"dtype":"F32","shape":[],"data_offsets":[0,0]}}""", "needs 4")]           // a scalar is one element
    [InlineData("""{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}""", "non-negative")]
    [InlineData("""{"w":{"dtype":"F32","shape":[2147483648],"data_offsets":[0,8]}}""", "dimension")]
    [InlineData("""{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,8]}}""", "non-negative integers")]
    [InlineData("""{"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}}""", "unknown dtype 'Q4_K'")]
    [InlineData("""{"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}}""", "'dtype' must be a string")]
    public void A_shape_that_does_not_match_its_bytes_or_dtype_is_refused(string header, string problem)
    {
        var e = Refused(header, 8);
        Assert.Contains("'w'", e.Message);
        Assert.Contains(problem, e.Message);
    }

    [Fact]
    public void Invalid_utf8_or_a_lone_surrogate_in_a_name_is_refused()
    {
        byte[] header = Encoding.UTF8.GetBytes("""{"w\u00e9":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}""");
        header[3] = 0xFF; // the first byte of é
        var e = Refused(header, 1);
        Assert.Contains("not valid UTF-8 (at byte 11", e.Message);

        e = Refused("""{"w\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}""", 1);
        Assert.Contains("malformed header JSON", e.Message);
        e = Refused("""{"__metadata__":{"k":"\udfff"},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}""", 1);
        Assert.Contains("malformed header JSON", e.Message);
    }

    [Theory]
    [InlineData("""{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}""", "tensor 'w' appears twice")]
    [InlineData("""{"__metadata__":{"a":"1"},"__metadata__":{"b":"2"}}""", "'__metadata__' appears twice")]
    [InlineData("""{"__metadata__":{"a":"1","a":"2"}}""", "entry 'a' appears twice")]
    [InlineData("""{"__metadata__":["a"]}""", "must be an object of strings")]
    [InlineData("""{"__metadata__":{"a":{"b":"c"}}}""", "entry 'a' must be a string")]
    [InlineData("""{"__metadata__":{"a":null}}""", "entry 'a' must be a string")]
    [InlineData("""{"w":[0,1]}""", "entry must be an object")]
    [InlineData("""{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} trailing""", "malformed header JSON")]
    public void Names_and_metadata_must_be_unique_and_of_the_right_types(string header, string problem)
    {
        Assert.Contains(problem, Refused(header, header.Contains("[1,2]") ? 2 : header.Contains("[0,1]") ? 1 : 0).Message);
    }

    [Fact]
    public void A_fifo_a_folder_or_an_empty_file_is_refused_without_blocking()
    {
        var e = Assert.Throws<WeightsException>(() => SafeTensorsFile.Open(_dir));
        Assert.Contains("is a folder", e.Message);
        File.WriteAllBytes(PathOf("empty.safetensors"), []);
        Assert.Contains("truncated", Assert.Throws<WeightsException>(() => SafeTensorsFile.Open(PathOf("empty.safetensors"))).Message);
        if (!OperatingSystem.IsLinux())
            return;
        // Opening a FIFO for reading waits for a writer; the reader must not open it at all.
        string fifo = PathOf("fifo.safetensors");
        using (var mkfifo = System.Diagnostics.Process.Start("mkfifo", fifo))
            mkfifo.WaitForExit();
        var open = Task.Run(() => SafeTensorsFile.Open(fifo));
        Assert.True(((IAsyncResult)open).AsyncWaitHandle.WaitOne(TimeSpan.FromSeconds(10)), "opening a FIFO blocked");
        Assert.Contains("not a regular file", Assert.IsType<WeightsException>(open.Exception?.InnerException).Message);
    }

    [Fact]
    public void Four_bit_companions_must_have_the_shapes_their_weight_implies()
    {
        string path = PathOf("q4.safetensors");
        void Write(int[] scales, int[] biases) => SafeTensorsWriter.WriteRaw(path,
        [
            SafeTensorsWriter.Raw<uint>("p.weight", "U32", [2, 2], new uint[4]),
            SafeTensorsWriter.Raw<Half>("p.scales", "F16", scales, new Half[scales.Aggregate(1, (a, b) => a * b)]),
            SafeTensorsWriter.Raw<Half>("p.biases", "F16", biases, new Half[biases.Aggregate(1, (a, b) => a * b)]),
        ]);
        foreach (var (scales, biases) in new (int[], int[])[] { ([2, 3], [2, 3]), ([1, 1], [1, 1]), ([2, 1], [2, 2]), ([2], [2]), ([2, 0], [2, 0]), ([2, 1, 1], [2, 1]) })
        {
            Write(scales, biases);
            using var model = ModelWeights.Open(path);
            var e = Assert.Throws<WeightsException>(() => model.MapQ4("p.weight"));
            Assert.Contains("p.", e.Message);
            Assert.Throws<WeightsException>(() => model.Read("p.weight"));
            Assert.Throws<WeightsException>(() => model.Validate([new TensorSpec("p.weight", [2, 16])]));
        }
        Write([2, 1], [2, 1]);
        using (var model = ModelWeights.Open(path))
            Assert.Equal(32, model.Read("p.weight").Length);
    }

    [Fact]
    public void A_four_bit_row_too_long_for_an_int_is_refused_by_Shape()
    {
        string path = PathOf("wide.safetensors");
        File.WriteAllBytes(path, Assemble(Encoding.UTF8.GetBytes("""{"p.weight":{"dtype":"U32","shape":[0,300000000],"data_offsets":[0,0]}}"""), []));
        using var model = ModelWeights.Open(path);
        Assert.Contains("too many", Assert.Throws<WeightsException>(() => model.Shape("p.weight")).Message);
        Assert.Throws<WeightsException>(() => model.MapQ4("p.weight"));
    }

    // ================================================================ paths out of the model folder

    /// <summary>A file outside the model folder whose bytes must never reach a message.</summary>
    string Secret()
    {
        string secret = PathOf("outside/secret.safetensors");
        Directory.CreateDirectory(Path.GetDirectoryName(secret)!);
        File.WriteAllText(secret, "SECRETSECRETSECRET-not-a-model");
        return secret;
    }

    string ModelFolder(string shardName)
    {
        string folder = Directory.CreateDirectory(PathOf("model")).FullName;
        SafeTensorsWriter.Write(Path.Combine(folder, "model-00001-of-00001.safetensors"), [("w", [2], [1f, 2f])]);
        File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"),
            $$$"""{"weight_map": {"w": {{{System.Text.Json.JsonSerializer.Serialize(shardName)}}}}}""");
        return folder;
    }

    [Theory]
    [InlineData("../outside/secret.safetensors", "'..'")]
    [InlineData("../../../../../../etc/passwd", "'..'")]
    [InlineData("sub/../../outside/secret.safetensors", "'..'")]
    [InlineData("..\\outside\\secret.safetensors", "'..'")]
    [InlineData("/etc/passwd", "absolute path")]
    [InlineData("", "empty name")]
    [InlineData("shard\u0000.safetensors", "control character")]
    public void An_index_naming_a_path_out_of_the_folder_is_refused_before_opening_it(string shardName, string problem)
    {
        Secret();
        string folder = ModelFolder(shardName);
        var e = Assert.Throws<WeightsException>(() => ModelWeights.Open(folder));
        Assert.StartsWith(Path.Combine(folder, "model.safetensors.index.json"), e.Message);
        Assert.Contains(problem, e.Message);
        Assert.Contains("tensor 'w'", e.Message);
        Assert.DoesNotContain("SECRET", e.Message);
        Assert.DoesNotContain("root:", e.Message);
    }

    [Fact]
    public void An_absolute_path_to_the_real_file_is_refused_too()
    {
        string secret = Secret();
        var e = Assert.Throws<WeightsException>(() => ModelWeights.Open(ModelFolder(secret)));
        Assert.Contains("absolute path", e.Message);
        Assert.DoesNotContain("SECRET", e.Message);
    }

    [Fact]
    public void A_shard_that_links_out_of_the_folder_is_refused_and_one_that_links_inside_is_fine()
    {
        string secret = Secret();
        string folder = ModelFolder("linked.safetensors");
        File.CreateSymbolicLink(Path.Combine(folder, "linked.safetensors"), secret);
        var e = Assert.Throws<WeightsException>(() => ModelWeights.Open(folder));
        Assert.Contains("outside the folder", e.Message);
        Assert.DoesNotContain("SECRET", e.Message);

        // Through a linked folder, with a relative link: the same.
        Directory.CreateSymbolicLink(Path.Combine(folder, "sub"), "../outside");
        File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"), """{"weight_map": {"w": "sub/secret.safetensors"}}""");
        e = Assert.Throws<WeightsException>(() => ModelWeights.Open(folder));
        Assert.Contains("outside the folder", e.Message);
        Assert.DoesNotContain("SECRET", e.Message);

        // A link to a shard in the folder, and a model folder reached through a link, are fine.
        File.CreateSymbolicLink(Path.Combine(folder, "alias.safetensors"), "model-00001-of-00001.safetensors");
        File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"), """{"weight_map": {"w": "alias.safetensors"}}""");
        Directory.CreateSymbolicLink(PathOf("model-link"), folder);
        using var model = ModelWeights.Open(PathOf("model-link"));
        Assert.Equal([1f, 2f], model.Read("w"));
    }

    [Fact]
    public void A_link_loop_and_a_folder_named_as_a_shard_are_refused()
    {
        string folder = ModelFolder("loop.safetensors");
        File.CreateSymbolicLink(Path.Combine(folder, "loop.safetensors"), "loop2.safetensors");
        File.CreateSymbolicLink(Path.Combine(folder, "loop2.safetensors"), "loop.safetensors");
        Assert.Contains("symbolic links", Assert.Throws<WeightsException>(() => ModelWeights.Open(folder)).Message);

        Directory.CreateDirectory(Path.Combine(folder, "dir.safetensors"));
        File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"), """{"weight_map": {"w": "dir.safetensors"}}""");
        Assert.Contains("is a folder", Assert.Throws<WeightsException>(() => ModelWeights.Open(folder)).Message);
    }

    [Fact]
    public void The_hugging_face_cache_layout_of_links_into_blobs_is_allowed()
    {
        // models--org--name/snapshots/REV/model-00001-of-00001.safetensors -> ../../blobs/HASH
        string repo = PathOf("hub/models--org--name");
        string blobs = Directory.CreateDirectory(Path.Combine(repo, "blobs")).FullName;
        string snapshot = Directory.CreateDirectory(Path.Combine(repo, "snapshots", "abc123")).FullName;
        SafeTensorsWriter.Write(Path.Combine(blobs, "0f1e2d"), [("w", [2], [3f, 4f])]);
        File.WriteAllText(Path.Combine(blobs, "9a8b"), """{"weight_map": {"w": "model-00001-of-00001.safetensors"}}""");
        File.CreateSymbolicLink(Path.Combine(snapshot, "model-00001-of-00001.safetensors"), "../../blobs/0f1e2d");
        File.CreateSymbolicLink(Path.Combine(snapshot, "model.safetensors.index.json"), "../../blobs/9a8b");
        using var model = ModelWeights.Open(snapshot);
        Assert.Equal([3f, 4f], model.Read("w"));
    }

    [Theory]
    [InlineData("""{"weight_map": {"w": 1}}""", "must be a shard file name")]
    [InlineData("""{"weight_map": {"w": null}}""", "must be a shard file name")]
    [InlineData("""{"weight_map": ["w"]}""", "no 'weight_map' object")]
    [InlineData("""{"weight_map": {}}""", "lists no tensors")]
    [InlineData("""[]""", "no 'weight_map' object")]
    [InlineData("""{"weight_map": {"w": "model-00001-of-00001.safetensors", "w": "model-00002-of-00002.safetensors"}}""", "listed twice")]
    [InlineData("""{"weight_map": {"w\udc00": "a.safetensors"}}""", "malformed index JSON")]
    [InlineData("""{"weight_map": {"w": "a.safetensors"}""", "malformed index JSON")]
    public void The_index_json_types_are_checked(string index, string problem)
    {
        string folder = ModelFolder("model-00001-of-00001.safetensors");
        File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"), index);
        var e = Assert.Throws<WeightsException>(() => ModelWeights.Open(folder));
        Assert.Contains("model.safetensors.index.json", e.Message);
        Assert.Contains(problem, e.Message);
    }

    [Fact]
    public void A_tensor_in_two_shards_or_missing_from_its_shard_is_refused()
    {
        string folder = ModelFolder("model-00001-of-00001.safetensors");
        SafeTensorsWriter.Write(Path.Combine(folder, "b.safetensors"), [("w", [2], [5f, 6f]), ("v", [1], [7f])]);
        File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"),
            """{"weight_map": {"w": "model-00001-of-00001.safetensors", "v": "b.safetensors"}}""");
        var e = Assert.Throws<WeightsException>(() => ModelWeights.Open(folder));
        Assert.Contains("b.safetensors", e.Message);
        Assert.Contains("'w' is also in this shard", e.Message);

        File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"),
            """{"weight_map": {"v": "model-00001-of-00001.safetensors"}}""");
        e = Assert.Throws<WeightsException>(() => ModelWeights.Open(folder));
        Assert.Contains("model-00001-of-00001.safetensors: tensor 'v' is missing", e.Message);
    }

    // ================================================================ non-finite numbers

    [Theory]
    [InlineData("F32", float.NaN, "NaN")]
    [InlineData("F32", float.PositiveInfinity, "+Infinity")]
    [InlineData("F16", float.NegativeInfinity, "-Infinity")]
    [InlineData("BF16", float.NaN, "NaN")]
    public void A_non_finite_base_weight_is_an_error_naming_the_tensor_and_the_element(string dtype, float bad, string what)
    {
        string path = PathOf("model.safetensors");
        var w = Enumerable.Range(0, 40).Select(i => i * 0.01f).ToArray();
        w[23] = bad;
        SafeTensorsWriter.Write(path, [("model.norm.weight", [8], new float[8]), ("model.layers.0.mlp.up_proj.weight", [5, 8], w)], dtype);
        using var model = ModelWeights.Open(path);
        model.Read("model.norm.weight");
        foreach (var use in new Action[]
        {
            () => model.Read("model.layers.0.mlp.up_proj.weight"),
            () => model.Read("model.layers.0.mlp.up_proj.weight", new float[40]),
            () => model.MapF32("model.layers.0.mlp.up_proj.weight"),
            () => model.ReadRange("model.layers.0.mlp.up_proj.weight", 16, new float[16]),
        })
        {
            var e = Assert.Throws<WeightsException>(use);
            Assert.Equal($"{path}: tensor 'model.layers.0.mlp.up_proj.weight' holds {what} at element 23 [2, 7]; weights must be finite", e.Message);
        }
        model.ReadRange("model.layers.0.mlp.up_proj.weight", 24, new float[16]); // a block without it is fine
    }

    [Fact]
    public void A_non_finite_four_bit_scale_or_bias_is_an_error_naming_it()
    {
        string path = PathOf("q4.safetensors");
        foreach (string bad in new[] { "p.scales", "p.biases" })
        {
            SafeTensorsWriter.WriteRaw(path,
            [
                SafeTensorsWriter.Raw<uint>("p.weight", "U32", [2, 2], [1, 2, 3, 4]),
                SafeTensorsWriter.Raw<Half>("p.scales", "F16", [2, 1], [(Half)1, bad == "p.scales" ? Half.NaN : (Half)1]),
                SafeTensorsWriter.Raw<Half>("p.biases", "F16", [2, 1], [bad == "p.biases" ? Half.PositiveInfinity : (Half)0, (Half)0]),
            ]);
            using var model = ModelWeights.Open(path);
            var e = Assert.Throws<WeightsException>(() => model.MapQ4("p.weight"));
            Assert.Contains($"tensor '{bad}' holds", e.Message);
            Assert.Throws<WeightsException>(() => model.Read("p.weight"));
        }
    }

    [Fact]
    public void A_non_finite_adapter_value_is_an_error_naming_the_tensor()
    {
        var settings = new LoraSettings(2, 4f, ["q_proj"]);
        LoraModuleSpec[] modules = [new("model.layers.0.self_attn.q_proj", 8, 6)];
        string dir = PathOf("adapter");
        var adapter = LoraAdapter.CreateNew(settings, modules, seed: 1);
        adapter.Modules[0].B[5] = float.NaN;
        adapter.Save(dir, "base");
        var e = Assert.Throws<WeightsException>(() => LoraAdapter.Load(dir, settings, modules));
        Assert.Equal($"{Path.Combine(dir, "adapter_model.safetensors")}: tensor '{modules[0].BName}' holds NaN at element 5 [2, 1]; an adapter's values must be finite", e.Message);
    }

    [Theory]
    [InlineData("""{"r": "2", "lora_alpha": 4}""", "'r' is missing or not an integer (found String \"2\")")]
    [InlineData("""{"r": 2.5, "lora_alpha": 4}""", "'r' is missing or not an integer")]
    [InlineData("""{"r": 99999999999, "lora_alpha": 4}""", "'r' is missing or not an integer")]
    [InlineData("""{"r": 2, "lora_alpha": 1e999}""", "'lora_alpha' is missing or not a finite number")]
    [InlineData("""{"r": 2, "lora_alpha": 1e300}""", "'lora_alpha' is missing or not a finite number")]
    [InlineData("""{"r": 2, "lora_alpha": "4"}""", "'lora_alpha' is missing or not a finite number")]
    [InlineData("""{"r": 2, "lora_alpha": 4, "target_modules": [1, 2]}""", "'target_modules' must be an array of module names")]
    [InlineData("""{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", null]}""", "'target_modules' must be an array of module names")]
    [InlineData("""{"r": 2, "lora_alpha": 4, "target_modules": ["q\udc00"]}""", "malformed JSON")]
    [InlineData("""{"r": 2, "lora_alpha": 4, "peft_type": 3}""", "peft_type")]
    [InlineData("""[2, 4]""", "expected a JSON object")]
    public void An_adapter_config_of_the_wrong_types_is_refused_naming_the_field(string config, string problem)
    {
        var settings = new LoraSettings(2, 4f, ["q_proj"]);
        LoraModuleSpec[] modules = [new("model.layers.0.self_attn.q_proj", 8, 6)];
        string dir = PathOf("adapter");
        LoraAdapter.CreateNew(settings, modules, seed: 1).Save(dir, "base");
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), config);
        var e = Assert.Throws<WeightsException>(() => LoraAdapter.Load(dir, settings, modules));
        Assert.StartsWith(Path.Combine(dir, "adapter_config.json"), e.Message);
        Assert.Contains(problem, e.Message);
    }

    // ================================================================ a file truncated under the process

    [Fact]
    public void A_file_truncated_while_mapped_is_an_error_at_the_next_use_not_a_sigbus()
    {
        string path = PathOf("model.safetensors");
        var big = Enumerable.Range(0, 4096).Select(i => (float)i).ToArray();
        SafeTensorsWriter.Write(path, [("a", [4096], big), ("b", [4096], big)]);
        using var model = ModelWeights.Open(path);
        Assert.Equal(big, model.Read("b"));
        model.ReleasePages("b"); // the pages leave memory: a read now goes back to the file

        // Someone shortens the file in place (a copy over it, a failed download resumed, an editor).
        using (var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite | FileShare.Delete))
            RandomAccess.SetLength(handle, 8000);

        foreach (var use in new Action[] { () => model.Read("b"), () => model.MapF32("b"), () => model.ReadRange("b", 0, new float[8]), () => model.Read("a") })
        {
            var e = Assert.Throws<WeightsException>(use);
            Assert.Contains(path, e.Message);
            Assert.Contains("changed size while in use", e.Message);
        }
    }
}
