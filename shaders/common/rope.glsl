// Hugging Face's rotate_half on x [T, heads, headDim] in place: for j < headDim/2 the pair
// (x1, x2) = (x[j], x[j + headDim/2]) becomes (x1·cos − x2·sin, x2·cos + x1·sin) with
// cos/sin[position + t, j]: row t is the token at position + t (0 in training, the first new
// token's position when decoding with a KV cache).
// ROPE_DIRECTION is +1 for the forward rotation and −1 for its transpose (the backward).
#include "elementwise.glsl"

layout(std430, binding = 0) buffer Values { float x[]; };
layout(std430, binding = 1) readonly buffer Cosines { float cosines[]; };
layout(std430, binding = 2) readonly buffer Sines { float sines[]; };

layout(push_constant) uniform RopeParameters
{
    uint tokenCount;   // T
    uint heads;
    uint headDim;
    uint position;     // the tables' row of x's row 0
} p;

void main()
{
    uint half_ = p.headDim / 2;
    uint i = linear_index();   // over [T, heads, headDim/2]
    if (i >= p.tokenCount * p.heads * half_)
        return;
    uint j = i % half_, th = i / half_;   // th = t·heads + h
    uint t = th / p.heads, row = p.position + t;
    float c = cosines[row * half_ + j], s = ROPE_DIRECTION * sines[row * half_ + j];
    uint at = th * p.headDim + j;
    float x1 = x[at], x2 = x[at + half_];
    x[at] = x1 * c - x2 * s;
    x[at + half_] = x2 * c + x1 * s;
}
