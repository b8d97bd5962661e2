namespace LoraCompiler.Runtime.Weights;

/// <summary>The two 16-bit float formats a model file may store its weights in.</summary>
public enum Float16Format
{
    /// <summary>IEEE 754 half precision (safetensors "F16"): 5 exponent bits, 10 mantissa bits.</summary>
    F16,

    /// <summary>bfloat16 (safetensors "BF16"): the upper half of a float32, 8 exponent bits, 7 mantissa bits.</summary>
    BF16,
}

/// <summary>
/// A 16-bit float weight used as stored (usually in the memory-mapped model file): the raw bits of
/// <see cref="Rows"/> × <see cref="Columns"/> values, row-major, in <see cref="Format"/>. A vector
/// (a norm weight, a bias) is one row; a tensor of more than two dimensions has its leading
/// dimensions folded into rows. The kernels convert it to float32 a panel or a row at a time, so no
/// float32 copy of the whole tensor is made.
/// </summary>
public sealed record Float16Weight(string Name, Float16Format Format, int Rows, int Columns, Memory<ushort> Bits)
{
    // Checked as the record is made: the kernels index the bits with the dimensions alone.
    private readonly bool _valid = Check(Name, Rows, Columns, Bits.Length);

    /// <summary>True when <see cref="Bits"/> lies in a read-only file mapping (<see cref="ModelWeights.MapFloat16"/>), not in an array.</summary>
    public bool IsFileMapped { get; init; }

    /// <summary>The safetensors dtype: "F16" or "BF16".</summary>
    public string Dtype => Format == Float16Format.BF16 ? "BF16" : "F16";

    /// <summary>Elements: Rows·Columns.</summary>
    public long Elements => (long)Rows * Columns;

    /// <summary>One value as float32 (exact: both formats widen without rounding).</summary>
    public static float ToSingle(ushort bits, Float16Format format) => format == Float16Format.BF16
        ? BitConverter.UInt32BitsToSingle((uint)bits << 16)
        : (float)BitConverter.UInt16BitsToHalf(bits);

    /// <summary>Elements [start, start + dst.Length) as float32 into <paramref name="dst"/>.</summary>
    public void Convert(long start, Span<float> dst)
    {
        if (start < 0 || start > Elements - dst.Length)
            throw new ArgumentOutOfRangeException(nameof(start), $"elements {start}..{start + dst.Length} are outside '{Name}' of {Elements}.");
        var bits = Bits.Span.Slice((int)start, dst.Length);
        if (Format == Float16Format.BF16)
            Dtypes.BFloat16ToSingle(bits, dst);
        else
            System.Numerics.Tensors.TensorPrimitives.ConvertToSingle(System.Runtime.InteropServices.MemoryMarshal.Cast<ushort, Half>(bits), dst);
    }

    /// <summary>The 16-bit format of a safetensors dtype, or null for another dtype.</summary>
    public static Float16Format? FormatOf(string dtype) => dtype switch
    {
        "F16" => Float16Format.F16,
        "BF16" => Float16Format.BF16,
        _ => null,
    };

    private static bool Check(string name, int rows, int columns, int bits)
    {
        if (rows < 0 || columns < 0)
            throw new ArgumentException($"'{name}': negative dimensions [{rows}, {columns}].");
        if (bits != (long)rows * columns)
            throw new ArgumentException($"'{name}' [{rows}, {columns}] needs {(long)rows * columns} values; got {bits}.");
        return true;
    }

    public override string ToString() => $"{Name}[{Rows}, {Columns}] {Dtype}";
}
