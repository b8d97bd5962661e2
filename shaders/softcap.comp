#version 450
#extension GL_GOOGLE_include_directive : require
// x[0..count) = cap·tanh(x / cap) in place (final_logit_softcapping on the decoding logits), with the
// tanh that cannot overflow (common/tanh.glsl); one part of a split tensor per dispatch.
#include "elementwise.glsl"
#include "tanh.glsl"

layout(std430, binding = 0) buffer Values { float x[]; };

layout(push_constant) uniform SoftcapParameters
{
    uint count;
    float cap;   // c > 0
} p;

void main()
{
    uint i = linear_index();
    if (i < p.count)
        x[i] = p.cap * stable_tanh(x[i] / p.cap);
}
