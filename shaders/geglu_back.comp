#version 450
#extension GL_GOOGLE_include_directive : require
// dGate = dh·up·gelu'(g), dUp = dh·gelu(g): both (=), elementwise (common/gelu.glsl).
// dUp may be bound to dh's own buffer (the trainer updates dAct in place): each invocation reads
// its element of dh before it writes dUp, and neither binding is declared readonly or writeonly.
#include "elementwise.glsl"
#include "gelu.glsl"

layout(std430, binding = 0) writeonly buffer GateGradient { float dGate[]; };
layout(std430, binding = 1) buffer UpGradient { float dUp[]; };
layout(std430, binding = 2) buffer HiddenGradient { float dh[]; };
layout(std430, binding = 3) readonly buffer Gate { float gate[]; };
layout(std430, binding = 4) readonly buffer Up { float up[]; };

layout(push_constant) uniform GeGluParameters { uint count; } p;

void main()
{
    uint i = linear_index();
    if (i >= p.count)
        return;
    float g = gate[i], d = dh[i];
    float s = gelu_gate(g);
    dUp[i] = d * g * s;
    dGate[i] = d * up[i] * gelu_derivative(g, s);
}
