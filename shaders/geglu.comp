#version 450
#extension GL_GOOGLE_include_directive : require
// h = gelu(gate)·up with the tanh-approximated GELU (common/gelu.glsl), elementwise: Gemma's MLP.
#include "elementwise.glsl"
#include "gelu.glsl"

layout(std430, binding = 0) writeonly buffer Hidden { float h[]; };
layout(std430, binding = 1) readonly buffer Gate { float gate[]; };
layout(std430, binding = 2) readonly buffer Up { float up[]; };

layout(push_constant) uniform GeGluParameters { uint count; } p;

void main()
{
    uint i = linear_index();
    if (i >= p.count)
        return;
    h[i] = gelu(gate[i]) * up[i];
}
