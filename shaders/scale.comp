#version 450
#extension GL_GOOGLE_include_directive : require
// x[0..count) *= factor (Gemma's embedding scale, √hidden), one part of a split tensor per dispatch.
#include "elementwise.glsl"

layout(std430, binding = 0) buffer Values { float x[]; };

layout(push_constant) uniform ScaleParameters
{
    uint count;
    float factor;
} p;

void main()
{
    uint i = linear_index();
    if (i < p.count)
        x[i] *= p.factor;
}
