#version 450
#extension GL_GOOGLE_include_directive : require
// x[t, :] = table[tokens[t], :] for t < T with the table a 16-bit weight (F16 or BF16,
// common/float16.glsl), over one part of it (rows partFirstRow..partFirstRow+partRows; a part holds
// whole rows). One invocation per output element: it converts its value when its token's row lies
// in this part.
#include "elementwise.glsl"
#include "float16.glsl"

layout(std430, binding = 0) buffer Output { float x[]; };
layout(std430, binding = 1) readonly buffer Tokens { int tokens[]; };
layout(std430, binding = 2) readonly buffer TablePart { uint table[]; };

layout(push_constant) uniform EmbeddingW16Parameters
{
    uint tokenCount;    // T
    uint width;         // C, the row length
    uint format;        // FORMAT_F16 or FORMAT_BF16
    uint partFirstRow;  // table row of this part's first row
    uint partRows;      // rows in this part
} p;

void main()
{
    uint i = linear_index();
    if (i >= p.tokenCount * p.width)
        return;
    uint t = i / p.width, column = i % p.width;
    uint row = uint(tokens[t]);
    if (row < p.partFirstRow || row - p.partFirstRow >= p.partRows)
        return;
    x[i] = WEIGHT_AT(table, (row - p.partFirstRow) * p.width + column, p.format);
}
