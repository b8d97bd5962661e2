#version 450
#extension GL_GOOGLE_include_directive : require
// The attention backward's query gradient, FlashAttention-2 style: for row t of head h (kv head g)
// and the keys s it sees (s ≤ t, and t − s < W with a sliding window W), P = exp(scale·q[t]·k[s] − lse[t]),
// dS = P·(dOut[t]·v[s] − D[t]), and
//   dq[t, h] (=) scale·Σ_s dS·k[s, g].
// One workgroup per (h, block of query rows), one invocation per query row; tiles of the k and v rows
// the block sees are staged in shared memory and consumed four keys at a time. lse and D come from
// attention_back_delta.
#include "attention.glsl"
#include "attention_tiles.glsl"

layout(std430, binding = 0) writeonly buffer QueryGradient { float dq[]; };
layout(std430, binding = 1) readonly buffer OutputGradient { float dOut[]; };
layout(std430, binding = 2) readonly buffer RowStatistics { vec2 stats[]; };
layout(std430, binding = 3) readonly buffer Queries { float q[]; };
layout(std430, binding = 4) readonly buffer Keys { float k[]; };
layout(std430, binding = 5) readonly buffer Values { float v[]; };

void main()
{
    uint T = p.tokenCount, hd = p.headDim, chunks = chunk_count();
    uint blocks = block_count();
    uint item = block_index();
    if (item >= p.heads * blocks)
        return;   // uniform across the workgroup
    uint h = item / blocks, g = kv_head(h);
    uint t0 = (item % blocks) * gl_WorkGroupSize.x, t = t0 + gl_LocalInvocationID.x;
    uint keyEnd = min(T, t0 + gl_WorkGroupSize.x), keyStart = first_key(t0);   // the keys any row of the block sees
    bool inRange = t < T;
    uint qBase = (t * p.heads + h) * hd, kvStride = p.kvHeads * hd;
    uint rows = p.tileRows, valueTile = rows * chunks;

    vec4 qv[MAX_CHUNKS], dov[MAX_CHUNKS], acc[MAX_CHUNKS];
    for (uint c = 0; c < chunks; c++)
    {
        qv[c] = vec4(0.0);
        dov[c] = vec4(0.0);
        acc[c] = vec4(0.0);
    }
    if (inRange)
        for (uint d = 0; d < hd; d++)
        {
            qv[d / 4][d % 4] = q[qBase + d];
            dov[d / 4][d % 4] = dOut[qBase + d];
        }
    vec2 row = inRange ? stats[h * T + t] : vec2(0.0);   // (lse, D)

    for (uint s0 = keyStart; s0 < keyEnd; s0 += rows)
    {
        uint n = min(rows, keyEnd - s0);
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
            vec4 qk = vec4(0.0), dp = vec4(0.0);
            for (uint c = 0; c < chunks; c++)
            {
                uint at = r * chunks + c, vt = valueTile + at;
                qk += vec4(dot(qv[c], tile[at]), dot(qv[c], tile[at + chunks]),
                           dot(qv[c], tile[at + 2 * chunks]), dot(qv[c], tile[at + 3 * chunks]));
                dp += vec4(dot(dov[c], tile[vt]), dot(dov[c], tile[vt + chunks]),
                           dot(dov[c], tile[vt + 2 * chunks]), dot(dov[c], tile[vt + 3 * chunks]));
            }
            vec4 prob = mix(vec4(0.0), exp(p.scale * qk - row.x), rows_within(r, first, end));
            vec4 dScore = prob * (dp - row.y);
            for (uint c = 0; c < chunks; c++)
            {
                uint at = r * chunks + c;
                acc[c] += dScore.x * tile[at] + dScore.y * tile[at + chunks] + dScore.z * tile[at + 2 * chunks] + dScore.w * tile[at + 3 * chunks];
            }
        }
        barrier();
    }

    if (!inRange)
        return;
    for (uint d = 0; d < hd; d++)
        dq[qBase + d] = p.scale * acc[d / 4][d % 4];
}
