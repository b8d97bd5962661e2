#version 450
#extension GL_GOOGLE_include_directive : require
// dx[t] (+= or =) r·dy⊙w' − x·r³·⟨dy⊙w', x⟩/C with r = rstd[t] and w' = weightOffset + w: += for the
// residual stream's gradient (accumulate 1), = otherwise (accumulate 0: dx's old contents, which may
// be anything, are never read). One workgroup per row t.
#include "rows.glsl"
#include "float16.glsl"

layout(std430, binding = 0) buffer InputGradient { float dx[]; };
layout(std430, binding = 1) readonly buffer OutputGradient { float dy[]; };
layout(std430, binding = 2) readonly buffer Input { float x[]; };
layout(std430, binding = 3) readonly buffer Weight { uint w[]; };     // read through WEIGHT_AT
layout(std430, binding = 4) readonly buffer InverseRms { float rstd[]; };

layout(push_constant) uniform RmsNormBackParameters
{
    uint tokenCount;
    uint width;
    float weightOffset; // 0: w, 1: 1 + w
    uint accumulate;    // 1: dx += gradient, 0: dx = gradient
    uint weightFormat;  // how w is stored (common/float16.glsl): FORMAT_F32, _F16 or _BF16
} p;

void main()
{
    uint t = row_index();
    if (t >= p.tokenCount)
        return;
    uint base = t * p.width;
    float partial = 0.0;
    for (uint i = gl_LocalInvocationID.x; i < p.width; i += gl_WorkGroupSize.x)
        partial += dy[base + i] * (p.weightOffset + WEIGHT_AT(w, i, p.weightFormat)) * x[base + i];
    float dot = workgroup_sum(partial);
    float r = rstd[t];
    float coefficient = r * r * r * dot / float(p.width);
    for (uint i = gl_LocalInvocationID.x; i < p.width; i += gl_WorkGroupSize.x)
    {
        float gradient = r * dy[base + i] * (p.weightOffset + WEIGHT_AT(w, i, p.weightFormat)) - coefficient * x[base + i];
        dx[base + i] = p.accumulate != 0 ? dx[base + i] + gradient : gradient;
    }
}
