#version 450
#extension GL_GOOGLE_include_directive : require
// The LM head's first pass over one vocabulary chunk of logits [T, chunkWidth]: an online
// log-sum-exp per labelled row of z (the logits, softcapped when softcap > 0: common/cross_entropy.glsl).
// stats[t] = (running max m, Σ exp(z − m), the target's z); a chunk with a larger max rescales the
// running sum by exp(m_old − m_new).
// One workgroup per row t; rows without a label (targets[t] < 0) are skipped.
#include "rows.glsl"
#include "cross_entropy.glsl"

layout(std430, binding = 0) buffer Statistics { float stats[]; };
layout(std430, binding = 1) readonly buffer Logits { float logits[]; };
layout(std430, binding = 2) readonly buffer Targets { int targets[]; };

void main()
{
    uint t = row_index();
    if (t >= p.tokenCount || targets[t] < 0)
        return;   // uniform across the workgroup
    uint base = t * p.chunkWidth;
    float localMax = LOWEST;
    for (uint j = gl_LocalInvocationID.x; j < p.chunkWidth; j += gl_WorkGroupSize.x)
        localMax = max(localMax, capped_logit(logits[base + j]));
    float chunkMax = workgroup_max(localMax);
    float previousMax = p.firstChunk != 0 ? chunkMax : stats[3 * t];
    float m = max(previousMax, chunkMax);
    float localSum = 0.0;
    for (uint j = gl_LocalInvocationID.x; j < p.chunkWidth; j += gl_WorkGroupSize.x)
        localSum += exp(capped_logit(logits[base + j]) - m);
    float chunkSum = workgroup_sum(localSum);
    if (gl_LocalInvocationID.x == 0)
    {
        float previousSum = p.firstChunk != 0 ? 0.0 : stats[3 * t + 1];
        stats[3 * t] = m;
        stats[3 * t + 1] = previousSum * exp(previousMax - m) + chunkSum;
        uint label = uint(targets[t]);
        if (p.firstChunk != 0)
            stats[3 * t + 2] = 0.0;
        if (label >= p.chunkFirst && label - p.chunkFirst < p.chunkWidth)
            stats[3 * t + 2] = capped_logit(logits[base + label - p.chunkFirst]);
    }
}
