#version 450
#extension GL_GOOGLE_include_directive : require
// One decoding step's attention: the newest token's queries q [heads, hd] against the first count rows
// of a KV cache, k and v [capacity, kvHeads, hd]. For head h (kv head g = h / (heads / kvHeads)) with
// the scores S[s] = scale·q[h]·k[s, g], s < count:
//   output[h] = Σ_s exp(S[s] − m)·v[s, g] / Σ_s exp(S[s] − m),   m = max_s S[s].
// One workgroup per head. The workgroup walks the cache in tiles of one key per invocation: each
// invocation scores its key, the workgroup reduces the tile's max and sum (an online softmax: the
// running sum and the accumulators are rescaled by exp(m_old − m_new) when the max grows), and then
// each invocation adds the tile's weighted values to the output dimensions it owns (d = lane,
// lane + width, ...). The loops of one invocation grow as count / width, so a long cache stays far
// below lavapipe's loop limit (VulkanBackend.DecodeLoops).
#include "rows.glsl"

layout(std430, binding = 0) writeonly buffer Output { float outputs[]; };
layout(std430, binding = 1) readonly buffer Queries { float q[]; };
layout(std430, binding = 2) readonly buffer Keys { float k[]; };
layout(std430, binding = 3) readonly buffer Values { float v[]; };

layout(push_constant) uniform AttentionDecodeParameters
{
    uint count;     // cache rows the token attends to
    uint heads;
    uint kvHeads;
    uint headDim;   // at most MAX_HEAD_DIM
    float scale;
} p;

const uint MAX_HEAD_DIM = 256;
// Output dimensions per invocation: d = lane + i·width for i < DIMS_PER_LANE.
const uint DIMS_PER_LANE = (MAX_HEAD_DIM + gl_WorkGroupSize.x - 1) / gl_WorkGroupSize.x;

shared float query[MAX_HEAD_DIM];
shared float weights[gl_WorkGroupSize.x];   // the current tile's exp(S − m)

void main()
{
    uint h = row_index();
    if (h >= p.heads)
        return;   // uniform across the workgroup
    uint lane = gl_LocalInvocationID.x, width = gl_WorkGroupSize.x, hd = p.headDim;
    uint g = h / (p.heads / p.kvHeads), stride = p.kvHeads * hd, kvBase = g * hd;
    for (uint d = lane; d < hd; d += width)
        query[d] = q[h * hd + d];
    barrier();

    float acc[DIMS_PER_LANE];
    for (uint i = 0; i < DIMS_PER_LANE; i++)
        acc[i] = 0.0;
    float m = LOWEST, l = 0.0;

    for (uint s0 = 0; s0 < p.count; s0 += width)
    {
        uint n = min(width, p.count - s0);
        // This invocation's key: s0 + lane.
        float score = LOWEST;
        if (lane < n)
        {
            uint at = (s0 + lane) * stride + kvBase;
            float dot0 = 0.0, dot1 = 0.0, dot2 = 0.0, dot3 = 0.0;
            uint d = 0;
            for (; d + 4 <= hd; d += 4)
            {
                dot0 = fma(query[d], k[at + d], dot0);
                dot1 = fma(query[d + 1], k[at + d + 1], dot1);
                dot2 = fma(query[d + 2], k[at + d + 2], dot2);
                dot3 = fma(query[d + 3], k[at + d + 3], dot3);
            }
            for (; d < hd; d++)
                dot0 = fma(query[d], k[at + d], dot0);
            score = p.scale * ((dot0 + dot1) + (dot2 + dot3));
        }
        float tileMax = workgroup_max(score);
        float newMax = max(m, tileMax);
        float rescale = exp(m - newMax);
        float weight = lane < n ? exp(score - newMax) : 0.0;
        weights[lane] = weight;
        l = l * rescale + workgroup_sum(weight);   // its barriers also publish weights[]
        m = newMax;
        for (uint i = 0; i < DIMS_PER_LANE; i++)
        {
            uint d = lane + i * width;
            if (d >= hd)
                break;
            uint at = s0 * stride + kvBase + d;
            float a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
            uint r = 0;
            for (; r + 4 <= n; r += 4)
            {
                a0 = fma(weights[r], v[at + r * stride], a0);
                a1 = fma(weights[r + 1], v[at + (r + 1) * stride], a1);
                a2 = fma(weights[r + 2], v[at + (r + 2) * stride], a2);
                a3 = fma(weights[r + 3], v[at + (r + 3) * stride], a3);
            }
            for (; r < n; r++)
                a0 = fma(weights[r], v[at + r * stride], a0);
            acc[i] = acc[i] * rescale + ((a0 + a1) + (a2 + a3));
        }
        barrier();   // weights[] is free again
    }

    float inverse = 1.0 / l;
    for (uint i = 0; i < DIMS_PER_LANE; i++)
    {
        uint d = lane + i * width;
        if (d < hd)
            outputs[h * hd + d] = acc[i] * inverse;
    }
}
