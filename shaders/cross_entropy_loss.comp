#version 450
#extension GL_GOOGLE_include_directive : require
// The mean cross-entropy from the LM head's row statistics (cross_entropy.comp): one workgroup sums
// lse − z_target = m + log(Σ exp(z − m)) − z_target over the labelled rows and writes
// loss[0] = that sum · inverseCount, so a step reads back one float, not the statistics.
#include "rows.glsl"

layout(std430, binding = 0) writeonly buffer Loss { float loss[]; };
layout(std430, binding = 1) readonly buffer Statistics { float stats[]; };
layout(std430, binding = 2) readonly buffer Targets { int targets[]; };

layout(push_constant) uniform LossParameters
{
    uint tokenCount;
    float inverseCount;   // 1 / labelled rows
} p;

void main()
{
    float local = 0.0;
    for (uint t = gl_LocalInvocationID.x; t < p.tokenCount; t += gl_WorkGroupSize.x)
        if (targets[t] >= 0)
            local += stats[3 * t] + log(stats[3 * t + 1]) - stats[3 * t + 2];
    float total = workgroup_sum(local);
    if (gl_LocalInvocationID.x == 0)
        loss[0] = total * p.inverseCount;
}
