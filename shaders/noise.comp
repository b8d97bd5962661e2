#version 450
#extension GL_GOOGLE_include_directive : require
// x[i] += scale·z(first + i) for i < count: MeZO's perturbation, regenerated from its key instead of
// stored. z is LoraCompiler.Runtime.Backends.CounterNoise.Normal, step for step: two rounds of the
// PCG hash over the counter and the key give two uniforms in (0, 1] with 24 bits each, and value
// pair j is the Box–Muller pair of uniforms 2j and 2j + 1, the angle in (−π, π].
#include "elementwise.glsl"

layout(std430, binding = 0) buffer Values { float x[]; };

layout(push_constant) uniform NoiseParameters
{
    uint count;
    uint first;     // the index of x[0] in the whole tensor (a split tensor runs per part)
    uint keyLow;
    uint keyHigh;
    float scale;
} p;

uint pcg(uint v)
{
    uint state = v * 747796405u + 2891336453u;
    uint word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

float uniform01(uint counter)
{
    return float((pcg(pcg(counter ^ p.keyLow) + p.keyHigh) >> 8u) + 1u) * (1.0 / 16777216.0);
}

void main()
{
    uint i = linear_index();
    if (i >= p.count)
        return;
    uint index = p.first + i;
    uint pair = index >> 1u;
    float r = sqrt(-2.0 * log(uniform01(2u * pair)));
    float angle = 3.14159265358979 * (2.0 * uniform01(2u * pair + 1u) - 1.0);
    x[i] += p.scale * ((index & 1u) == 0u ? r * cos(angle) : r * sin(angle));
}
