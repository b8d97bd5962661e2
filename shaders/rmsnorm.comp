#version 450
#extension GL_GOOGLE_include_directive : require
// y[t] = (x[t]·rstd[t])·(weightOffset + w) with rstd[t] = 1/sqrt(mean(x[t]²) + eps); saves rstd [T].
// weightOffset is 0 for Llama's form (w) and 1 for Gemma's (1 + w). One workgroup per row t; a per-head
// norm (q_norm, k_norm) is T·heads rows of headDim.
#include "rows.glsl"
#include "float16.glsl"

layout(std430, binding = 0) writeonly buffer Output { float y[]; };
layout(std430, binding = 1) writeonly buffer InverseRms { float rstd[]; };
layout(std430, binding = 2) readonly buffer Input { float x[]; };
layout(std430, binding = 3) readonly buffer Weight { uint w[]; };     // read through WEIGHT_AT

layout(push_constant) uniform RmsNormParameters
{
    uint tokenCount;   // T, the rows
    uint width;        // C
    float epsilon;
    float weightOffset; // 0: w, 1: 1 + w
    uint weightFormat;  // how w is stored (common/float16.glsl): FORMAT_F32, _F16 or _BF16
} p;

void main()
{
    uint t = row_index();
    if (t >= p.tokenCount)
        return;   // uniform across the workgroup
    uint base = t * p.width;
    float squares = 0.0;
    for (uint i = gl_LocalInvocationID.x; i < p.width; i += gl_WorkGroupSize.x)
        squares = fma(x[base + i], x[base + i], squares);
    float meanSquare = workgroup_sum(squares) / float(p.width);
    float r = 1.0 / sqrt(meanSquare + p.epsilon);
    if (gl_LocalInvocationID.x == 0)
        rstd[t] = r;
    for (uint i = gl_LocalInvocationID.x; i < p.width; i += gl_WorkGroupSize.x)
        y[base + i] = (x[base + i] * r) * (p.weightOffset + WEIGHT_AT(w, i, p.weightFormat));
}
