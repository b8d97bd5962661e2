using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using System.Text.Json;

namespace LoraCompiler.Runtime.Weights;

/// <summary>
/// A 4-bit weight matrix [Rows, Columns] in MLX's affine layout, used where it lies (usually the
/// memory-mapped model file). Element j of row r is <c>q = (Packed[r·Columns/8 + j/8] &gt;&gt; 4·(j%8)) &amp; 0xF</c>
/// and its value <c>w = scale·q + bias</c> (one float32 fused multiply-add) with the F16 scale and bias of
/// its group: <c>Scales[r·G + j/GroupSize]</c>, G = Columns / GroupSize groups per row.
/// </summary>
public sealed record Q4Weight(string Name, int Rows, int Columns, int GroupSize, Memory<uint> Packed, Memory<Half> Scales, Memory<Half> Biases)
{
    // Checked as the record is made: the kernels index these spans with the dimensions alone.
    private readonly bool _valid = Check(Name, Rows, Columns, GroupSize, Packed.Length, Scales.Length, Biases.Length);

    /// <summary>Groups per row: scales and biases are [Rows, GroupsPerRow].</summary>
    public int GroupsPerRow => Columns / GroupSize;

    /// <summary>32-bit words per row: Packed is [Rows, WordsPerRow].</summary>
    public int WordsPerRow => Columns / Q4.PerWord;

    /// <summary>Row <paramref name="row"/> as float32 into <paramref name="dst"/> (Columns values).</summary>
    public void DequantizeRow(int row, Span<float> dst)
    {
        if ((uint)row >= (uint)Rows)
            throw new ArgumentOutOfRangeException(nameof(row), row, $"'{Name}' has {Rows} rows.");
        if (dst.Length < Columns)
            throw new ArgumentException($"dst holds {dst.Length} floats, a row of '{Name}' has {Columns}.", nameof(dst));
        Q4.DequantizeRange(Packed.Span.Slice(row * WordsPerRow, WordsPerRow), Scales.Span.Slice(row * GroupsPerRow, GroupsPerRow),
            Biases.Span.Slice(row * GroupsPerRow, GroupsPerRow), GroupSize, 0, dst[..Columns]);
    }

    /// <summary>The whole matrix as float32 into <paramref name="dst"/> (Rows·Columns values, row-major).</summary>
    public void Dequantize(Span<float> dst)
    {
        if (dst.Length != (long)Rows * Columns)
            throw new ArgumentException($"dst holds {dst.Length} floats, '{Name}' has {(long)Rows * Columns}.", nameof(dst));
        for (int r = 0; r < Rows; r++)
            DequantizeRow(r, dst.Slice(r * Columns, Columns));
    }

    private static bool Check(string name, int rows, int columns, int groupSize, int packed, int scales, int biases)
    {
        if (rows < 0 || columns < 0)
            throw new ArgumentException($"'{name}': negative dimensions [{rows}, {columns}].");
        if (Q4.GroupSizeProblem(groupSize) is { } problem)
            throw new ArgumentException($"'{name}': {problem}");
        if (columns % groupSize != 0)
            throw new ArgumentException($"'{name}': {columns} columns are not a whole number of groups of {groupSize}.");
        long words = (long)rows * (columns / Q4.PerWord), groups = (long)rows * (columns / groupSize);
        if (packed != words || scales != groups || biases != groups)
            throw new ArgumentException(
                $"'{name}' [{rows}, {columns}] in groups of {groupSize} needs {words} packed words and {groups} scales and biases; got {packed}, {scales} and {biases}.");
        return true;
    }
}

/// <summary>
/// 4-bit affine quantization as MLX stores it (see <see cref="Q4Weight"/>): a 2-D weight <c>P.weight</c>
/// [out, in] becomes <c>P.weight</c> U32 [out, in/8] (eight 4-bit values per word, the first in the
/// lowest bits), <c>P.scales</c> and <c>P.biases</c> F16 [out, in/groupSize]. Per group of groupSize
/// consecutive elements of a row: bias = min, scale = (max − min)/15, both rounded to F16, then
/// q = clamp(round((w − bias)/scale), 0, 15) with the rounded values (all q = 0 when scale is 0).
/// </summary>
public static class Q4
{
    public const int Bits = 4;

    /// <summary>4-bit values per 32-bit word.</summary>
    public const int PerWord = 8;

    /// <summary>The largest 4-bit value.</summary>
    public const int MaxLevel = 15;

    public const int DefaultGroupSize = 64;

    /// <summary>The safetensors metadata key (and config.json key) that describes the quantization.</summary>
    public const string MetadataKey = "quantization";

    /// <summary>The metadata value for a group size: <c>{"bits":4,"group_size":64,"mode":"affine"}</c>.</summary>
    public static string Metadata(int groupSize) => $"{{\"bits\":{Bits},\"group_size\":{groupSize},\"mode\":\"affine\"}}";

    /// <summary><c>P.weight</c> → <c>P.scales</c>.</summary>
    public static string ScalesName(string weightName) => Companion(weightName, "scales");

    /// <summary><c>P.weight</c> → <c>P.biases</c>.</summary>
    public static string BiasesName(string weightName) => Companion(weightName, "biases");

    /// <summary>
    /// The tensors a quantized model stores in 4 bits: every <c>*_proj.weight</c> of the layers, the
    /// token embedding and the LM head, when 2-D. Norms and biases stay float.
    /// </summary>
    public static bool IsQuantizable(string name, IReadOnlyList<int> shape) =>
        shape.Count == 2 &&
        (name == "model.embed_tokens.weight" || name == "lm_head.weight" ||
         name.StartsWith("model.layers.", StringComparison.Ordinal) && name.EndsWith("_proj.weight", StringComparison.Ordinal));

    /// <summary>Why a group size cannot be used (null when it can): it must be a positive multiple of 8, so a group is whole words.</summary>
    public static string? GroupSizeProblem(int groupSize) =>
        groupSize > 0 && groupSize % PerWord == 0 ? null : $"group size {groupSize} is not a positive multiple of {PerWord}";

    /// <summary>Why a row of <paramref name="columns"/> cannot be quantized in groups of <paramref name="groupSize"/> (null when it can).</summary>
    public static string? RowProblem(int columns, int groupSize) =>
        GroupSizeProblem(groupSize) ?? (columns > 0 && columns % groupSize == 0 ? null
            : $"its rows of {columns} elements are not a whole number of groups of {groupSize} (use a --group-size that divides {columns})");

    /// <summary>
    /// Reads a <see cref="MetadataKey"/> value: (bits, group size or null, mode or null). Throws
    /// <see cref="FormatException"/> when it is not a JSON object with an integer <c>bits</c>.
    /// </summary>
    public static (int Bits, int? GroupSize, string? Mode) ParseMetadata(string json)
    {
        try
        {
            using var document = JsonDocument.Parse(json);
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("bits", out var bits) || !bits.TryGetInt32(out int b))
                throw new FormatException($"'{MetadataKey}' metadata {json} has no integer \"bits\"");
            int? groupSize = root.TryGetProperty("group_size", out var g) && g.TryGetInt32(out int gs) ? gs : null;
            string? mode = root.TryGetProperty("mode", out var m) && m.ValueKind == JsonValueKind.String ? m.GetString() : null;
            return (b, groupSize, mode);
        }
        catch (JsonException e)
        {
            throw new FormatException($"'{MetadataKey}' metadata is not JSON: {e.Message}", e);
        }
        catch (InvalidOperationException e)
        {
            throw new FormatException($"'{MetadataKey}' metadata is not valid JSON text: {e.Message}", e);
        }
    }

    // ---------------------------------------------------------------- quantize

    /// <summary>
    /// Quantizes <paramref name="rows"/> rows of <paramref name="columns"/> values of <paramref name="w"/>
    /// into packed words [rows, columns/8], scales and biases [rows, columns/groupSize]. Throws
    /// <see cref="ArgumentException"/> for a value that is not finite or a group whose scale or bias
    /// does not fit F16.
    /// </summary>
    public static void Quantize(ReadOnlySpan<float> w, int rows, int columns, int groupSize, Span<uint> packed, Span<Half> scales, Span<Half> biases)
    {
        if (RowProblem(columns, groupSize) is { } problem)
            throw new ArgumentException($"cannot quantize: {problem}", nameof(columns));
        int groups = columns / groupSize, words = columns / PerWord;
        long count = (long)rows * columns;
        if (w.Length < count || packed.Length < (long)rows * words || scales.Length < (long)rows * groups || biases.Length < (long)rows * groups)
            throw new ArgumentException($"buffers too small for [{rows}, {columns}] in groups of {groupSize}");
        for (int r = 0; r < rows; r++)
            for (int g = 0; g < groups; g++)
            {
                int index = r * groups + g;
                (scales[index], biases[index]) = QuantizeGroup(w.Slice(r * columns + g * groupSize, groupSize),
                    packed.Slice(r * words + g * (groupSize / PerWord), groupSize / PerWord));
            }
    }

    /// <summary>A new quantized copy of a float matrix (arrays, not a mapping): for tests and small tensors.</summary>
    public static Q4Weight Quantize(string name, ReadOnlySpan<float> w, int rows, int columns, int groupSize = DefaultGroupSize)
    {
        if (RowProblem(columns, groupSize) is { } problem)
            throw new ArgumentException($"'{name}' cannot be quantized: {problem}", nameof(columns));
        var packed = new uint[(long)rows * (columns / PerWord)];
        var scales = new Half[(long)rows * (columns / groupSize)];
        var biases = new Half[scales.Length];
        Quantize(w, rows, columns, groupSize, packed, scales, biases);
        return new Q4Weight(name, rows, columns, groupSize, packed, scales, biases);
    }

    /// <summary>One group: returns its F16 scale and bias and writes its groupSize/8 words.</summary>
    public static (Half Scale, Half Bias) QuantizeGroup(ReadOnlySpan<float> group, Span<uint> words)
    {
        float min = TensorPrimitives.Min(group), max = TensorPrimitives.Max(group);
        if (!float.IsFinite(min) || !float.IsFinite(max))
            throw new ArgumentException($"a group holds a value that is not finite ({(float.IsFinite(min) ? max : min)})");
        Half scaleH = (Half)((max - min) / MaxLevel), biasH = (Half)min;
        if (Half.IsInfinity(scaleH) || Half.IsInfinity(biasH))
            throw new ArgumentException($"a group's range [{min}, {max}] does not fit F16 scales and biases");
        float scale = (float)scaleH, bias = (float)biasH;
        int n = group.Length / PerWord;
        for (int i = 0; i < n; i++)
        {
            uint word = 0;
            if (scale > 0)
                for (int k = 0; k < PerWord; k++)
                {
                    float q = MathF.Round((group[i * PerWord + k] - bias) / scale, MidpointRounding.ToEven);
                    word |= (uint)Math.Clamp((int)q, 0, MaxLevel) << (Bits * k);
                }
            words[i] = word;
        }
        return (scaleH, biasH);
    }

    // ---------------------------------------------------------------- dequantize

    /// <summary>
    /// Dequantizes <paramref name="rows"/> rows of packed words, scales and biases (as
    /// <see cref="Quantize(ReadOnlySpan{float}, int, int, int, Span{uint}, Span{Half}, Span{Half})"/> writes them) into <paramref name="dst"/> [rows, columns].
    /// </summary>
    public static void Dequantize(ReadOnlySpan<uint> packed, ReadOnlySpan<Half> scales, ReadOnlySpan<Half> biases,
        int rows, int columns, int groupSize, Span<float> dst)
    {
        if (RowProblem(columns, groupSize) is { } problem)
            throw new ArgumentException($"cannot dequantize: {problem}", nameof(columns));
        int groups = columns / groupSize, words = columns / PerWord;
        for (int r = 0; r < rows; r++)
            DequantizeRange(packed.Slice(r * words, words), scales.Slice(r * groups, groups), biases.Slice(r * groups, groups),
                groupSize, 0, dst.Slice(r * columns, columns));
    }

    /// <summary>
    /// Elements [start, start + dst.Length) of one row into dst: <paramref name="rowWords"/>,
    /// <paramref name="rowScales"/> and <paramref name="rowBiases"/> are the whole row's. start and
    /// dst.Length are multiples of 8. The one dequantization routine every kernel uses, so a fused
    /// product sees exactly the values <see cref="Q4Weight.Dequantize"/> gives.
    /// </summary>
    public static unsafe void DequantizeRange(ReadOnlySpan<uint> rowWords, ReadOnlySpan<Half> rowScales, ReadOnlySpan<Half> rowBiases,
        int groupSize, int start, Span<float> dst)
    {
        if (start % PerWord != 0 || dst.Length % PerWord != 0 || start < 0
            || (start + dst.Length) / PerWord > rowWords.Length || (start + dst.Length + groupSize - 1) / groupSize > rowScales.Length
            || rowBiases.Length < rowScales.Length)
            throw new ArgumentOutOfRangeException(nameof(start), $"elements {start}..{start + dst.Length} are not whole words of the row");
        fixed (uint* w = rowWords) fixed (Half* s = rowScales) fixed (Half* b = rowBiases) fixed (float* d = dst)
            DequantizeRange(w, s, b, groupSize, start, dst.Length, d);
    }

    /// <summary>
    /// Lane i of a word's vector keeps bits 4i..4i+3 in place (mask 0xF·16^i); converted to float
    /// that is q·16^i exactly, and multiplying by scale·16^−i (also exact) gives scale·q with the
    /// rounding of a scalar product, so the vector path matches <see cref="MathF.FusedMultiplyAdd"/>.
    /// </summary>
    static readonly Vector256<uint> NibbleMask = Vector256.Create(0xFu, 0xF0u, 0xF00u, 0xF000u, 0xF0000u, 0xF00000u, 0xF000000u, 0xF0000000u);
    static readonly Vector256<float> NibbleScale = Vector256.Create(1f, 1f / 16, 1f / 256, 1f / 4096, 1f / 65536, 1f / 1048576, 1f / 16777216, 1f / 268435456);

    /// <summary>Pointer form of <see cref="DequantizeRange(ReadOnlySpan{uint}, ReadOnlySpan{Half}, ReadOnlySpan{Half}, int, int, Span{float})"/>, unchecked.</summary>
    internal static unsafe void DequantizeRange(uint* rowWords, Half* rowScales, Half* rowBiases, int groupSize, int start, int count, float* dst)
    {
        int end = start + count, g = start / groupSize;
        for (int j = start, groupEnd = (g + 1) * groupSize; j < end; j = groupEnd, groupEnd += groupSize, g++)
        {
            int stop = Math.Min(end, groupEnd);
            DequantizeWords(rowWords + j / PerWord, (stop - j) / PerWord, ToSingle(rowScales[g]), ToSingle(rowBiases[g]), dst + (j - start));
        }
    }

    /// <summary>
    /// F16 to float32, exactly as <c>(float)half</c> but without its branches for the common case:
    /// the magnitude's bits shifted into a float32 are the value times 2^−112 (a subnormal F16 lands
    /// on a subnormal float32), so one exact multiplication by 2^112 finishes it.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static float ToSingle(Half value)
    {
        uint bits = BitConverter.HalfToUInt16Bits(value);
        uint magnitude = bits & 0x7FFF;
        if (magnitude >= 0x7C00)
            return (float)value; // infinity or NaN
        float f = BitConverter.UInt32BitsToSingle(magnitude << 13) * 5.192296858534828e33f; // 2^112
        return BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits(f) | (bits & 0x8000) << 16);
    }

    // Two words per 512-bit vector: lanes 0-7 hold the first word, 8-15 the second (a permutation of
    // the 64 bits loaded at once), each lane keeping its nibble as in NibbleMask.
    static readonly Vector512<uint> PairIndex = Vector512.Create(0u, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    static readonly Vector512<uint> PairMask = Vector512.Create(NibbleMask, NibbleMask);
    static readonly Vector512<float> PairScale = Vector512.Create(NibbleScale, NibbleScale);

    /// <summary>n words of one group, scale·q + bias, into d (8·n floats).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    static unsafe void DequantizeWords(uint* word, int n, float scale, float bias, float* d)
    {
        int i = 0;
        if (Avx512F.IsSupported)
        {
            var index = PairIndex;
            var mask = PairMask;
            var vs = Vector512.Create(scale) * PairScale;
            var vb = Vector512.Create(bias);
            for (; i + 2 <= n; i += 2)
            {
                var pair = Avx512F.PermuteVar16x32(Vector512.CreateScalarUnsafe(*(ulong*)(word + i)).AsUInt32(), index);
                Vector512.FusedMultiplyAdd(Vector512.ConvertToSingle(pair & mask), vs, vb).Store(d + i * PerWord);
            }
        }
        if (Vector256.IsHardwareAccelerated)
        {
            var mask = NibbleMask;
            var vs = Vector256.Create(scale) * NibbleScale;
            var vb = Vector256.Create(bias);
            for (; i < n; i++)
                Vector256.FusedMultiplyAdd(Vector256.ConvertToSingle(Vector256.Create(word[i]) & mask), vs, vb).Store(d + i * PerWord);
        }
        for (; i < n; i++)
        {
            uint bits = word[i];
            for (int k = 0; k < PerWord; k++)
                d[i * PerWord + k] = MathF.FusedMultiplyAdd(scale, (bits >> (Bits * k)) & 0xF, bias);
        }
    }

    static string Companion(string weightName, string suffix)
    {
        const string Weight = ".weight";
        return weightName.EndsWith(Weight, StringComparison.Ordinal)
            ? string.Concat(weightName.AsSpan(0, weightName.Length - Weight.Length), ".", suffix)
            : weightName + "." + suffix;
    }
}
