#version 450
#extension GL_GOOGLE_include_directive : require
// FlashAttention-2 forward, causal GQA, optionally within a sliding window. For row t of head h
// (kv head g) with scores S[s] = scale·q[t, h]·k[s, g] for the keys it sees (s ≤ t, and t − s < W
// with a window W: common/attention.glsl):
//   output[t, h] = Σ_s exp(S[s] − lse)·v[s, g],   lse[h, t] = log Σ_s exp(S[s]).
// One workgroup per (h, block of query rows), one invocation per query row. The workgroup stages
// tiles of k and v rows in shared memory, only those some row of the block sees (so a sliding layer
// costs O(T·W)); each invocation runs an online softmax over its keys, four at a time: a running max
// m and sum l, and an accumulator rescaled by exp(m_old − m_new) whenever the max grows.
#include "attention.glsl"
#include "attention_tiles.glsl"

layout(std430, binding = 0) writeonly buffer Output { float outputs[]; };
layout(std430, binding = 1) writeonly buffer LogSumExp { float lse[]; };
layout(std430, binding = 2) readonly buffer Queries { float q[]; };
layout(std430, binding = 3) readonly buffer Keys { float k[]; };
layout(std430, binding = 4) readonly buffer Values { float v[]; };

vec4 load_q(uint base, uint c)
{
    vec4 x = vec4(0.0);
    for (uint i = 0; i < 4; i++)
        if (4 * c + i < p.headDim)
            x[i] = q[base + 4 * c + i];
    return x;
}

void main()
{
    uint T = p.tokenCount, hd = p.headDim, chunks = chunk_count();
    uint blocks = block_count();
    uint item = block_index();
    if (item >= p.heads * blocks)
        return;   // uniform across the workgroup
    uint h = item / blocks, g = kv_head(h);
    uint t0 = (item % blocks) * gl_WorkGroupSize.x, t = t0 + gl_LocalInvocationID.x;
    uint keyEnd = min(T, t0 + gl_WorkGroupSize.x);   // keys past the block's last query are masked for all its rows
    uint keyStart = first_key(t0);                   // and keys before its first query's window are skipped
    bool inRange = t < T;
    uint qBase = (t * p.heads + h) * hd, kvStride = p.kvHeads * hd;
    uint rows = p.tileRows, valueTile = rows * chunks;

    vec4 qv[MAX_CHUNKS], acc[MAX_CHUNKS];
    for (uint c = 0; c < chunks; c++)
    {
        qv[c] = inRange ? load_q(qBase, c) : vec4(0.0);
        acc[c] = vec4(0.0);
    }
    float m = LOWEST, l = 0.0;

    for (uint s0 = keyStart; s0 < keyEnd; s0 += rows)
    {
        uint n = min(rows, keyEnd - s0);
        // Stage k and v rows s0..s0+n, zero-padded to whole chunks and to a multiple of four rows.
        for (uint e = gl_LocalInvocationID.x; e < ((n + 3) & ~3u) * chunks; e += gl_WorkGroupSize.x)
        {
            uint r = e / chunks, d = 4 * (e % chunks);
            vec4 key = vec4(0.0), value = vec4(0.0);
            if (r < n)
            {
                uint at = (s0 + r) * kvStride + g * hd + d;
                for (uint i = 0; i < 4; i++)
                    if (d + i < hd)
                    {
                        key[i] = k[at + i];
                        value[i] = v[at + i];
                    }
            }
            tile[e] = key;
            tile[valueTile + e] = value;
        }
        barrier();
        // This row's keys in the tile: first_key(t) ≤ s ≤ t, rows [first, end).
        uint first = 0, end = 0;
        if (inRange && t >= s0)
        {
            end = min(n, t + 1 - s0);
            uint from = first_key(t);
            first = from > s0 ? min(from - s0, end) : 0;
        }
        for (uint r = first & ~3u; r < end; r += 4)
        {
            vec4 dots = vec4(0.0);
            for (uint c = 0; c < chunks; c++)
            {
                uint at = r * chunks + c;
                dots += vec4(dot(qv[c], tile[at]), dot(qv[c], tile[at + chunks]),
                             dot(qv[c], tile[at + 2 * chunks]), dot(qv[c], tile[at + 3 * chunks]));
            }
            bvec4 valid = rows_within(r, first, end);
            vec4 score = mix(vec4(LOWEST), p.scale * dots, valid);
            float blockMax = max(max(score.x, score.y), max(score.z, score.w));
            if (blockMax > m)
            {
                float rescale = exp(m - blockMax);
                l *= rescale;
                for (uint c = 0; c < chunks; c++)
                    acc[c] *= rescale;
                m = blockMax;
            }
            vec4 weight = mix(vec4(0.0), exp(score - m), valid);
            l += weight.x + weight.y + weight.z + weight.w;
            for (uint c = 0; c < chunks; c++)
            {
                uint at = valueTile + r * chunks + c;
                acc[c] += weight.x * tile[at] + weight.y * tile[at + chunks] + weight.z * tile[at + 2 * chunks] + weight.w * tile[at + 3 * chunks];
            }
        }
        barrier();   // the tile is free again
    }

    if (!inRange)
        return;
    float inverse = 1.0 / l;
    for (uint d = 0; d < hd; d++)
        outputs[qBase + d] = acc[d / 4][d % 4] * inverse;
    lse[h * T + t] = m + log(l);
}
