#version 450
#extension GL_GOOGLE_include_directive : require
// Notes whether x[0..count) are all finite. A value that is not (exponent bits all set) folds
// code = 2·check + (0 for a NaN, 1 for an infinity) into status[0] as atomicMax(status, ~code):
// status 0 means every value was finite, else ~status is the lowest code found, a NaN before an
// infinity of the same check. The bits are tested, not isnan/isinf, which a driver may assume false.
// Atomics commute, so checks need no barrier between them; the host reads status once per step.
#include "elementwise.glsl"

layout(std430, binding = 0) readonly buffer Values { float x[]; };
layout(std430, binding = 1) buffer Status { uint status[]; };

layout(push_constant) uniform CheckParameters
{
    uint count;
    uint check;
} p;

void main()
{
    uint i = linear_index();
    if (i >= p.count)
        return;
    uint bits = floatBitsToUint(x[i]);
    if ((bits & 0x7f800000u) != 0x7f800000u)
        return;
    uint code = 2u * p.check + ((bits & 0x007fffffu) != 0u ? 0u : 1u);
    atomicMax(status[0], ~code);
}
