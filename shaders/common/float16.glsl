// 16-bit weights as the Vulkan backend holds them (runtime/Backends/Vulkan/VulkanFloat16Tensor.cs):
// a buffer of uints, two values to a uint, element e in the low half of uint e/2 when e is even and
// in the high half when it is odd (the file's bytes unchanged). A storage-format push constant says
// how to read a weight's buffer:
//
//   FORMAT_F32   float32, one value per uint (a weight the file stores in F32)
//   FORMAT_F16   IEEE half precision
//   FORMAT_BF16  bfloat16, the upper half of a float32
//
// Both 16-bit conversions are exact and use integer operations only, so a device that flushes
// subnormal floats still reads an F16 subnormal right.

const uint FORMAT_F32 = 0;
const uint FORMAT_F16 = 1;
const uint FORMAT_BF16 = 2;

// The 16 bits of element e from the uint that holds it.
uint float16_bits(uint word, uint e)
{
    return (e & 1u) != 0u ? word >> 16 : word & 0xFFFFu;
}

// A 16-bit value of the given format as a float.
float float16_to_float(uint bits, uint format)
{
    if (format == FORMAT_BF16)
        return uintBitsToFloat(bits << 16);
    uint sign = (bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1Fu, mantissa = bits & 0x3FFu;
    if (exponent == 0u)
    {
        // zero or subnormal: mantissa·2^−24, exact in float32 (and a normal float there)
        float magnitude = float(mantissa) * (1.0 / 16777216.0);
        return sign != 0u ? -magnitude : magnitude;
    }
    if (exponent == 31u)
        return uintBitsToFloat(sign | 0x7F800000u | (mantissa << 13)); // infinity or NaN
    return uintBitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Element i of a weight held in the uint array `words` in `format` (one of the three above).
#define WEIGHT_AT(words, i, format) ((format) == FORMAT_F32 ? uintBitsToFloat(words[i]) : float16_to_float(float16_bits(words[(i) >> 1], (i)), (format)))
