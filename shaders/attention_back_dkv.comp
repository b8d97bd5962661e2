#version 450
#extension GL_GOOGLE_include_directive : require
// The attention backward's key and value gradients, FlashAttention-2 style: for key s of kv head g,
// summed over the query heads h of g and the queries that see it (t ≥ s, and t − s < W with a sliding
// window W), with P = exp(scale·q[t, h]·k[s] − lse[h, t]) and dS = P·(dOut[t, h]·v[s] − D[h, t]):
//   dk[s, g] (=) scale·Σ dS·q[t, h],   dv[s, g] (=) Σ P·dOut[t, h].
// One workgroup per (g, block of key rows), one invocation per key, so no two invocations write the
// same row; tiles of the q and dOut rows that see the block, with their (lse, D), are staged in shared
// memory and consumed four queries at a time.
#include "attention.glsl"
#include "attention_tiles.glsl"

layout(std430, binding = 0) writeonly buffer KeyGradient { float dk[]; };
layout(std430, binding = 1) writeonly buffer ValueGradient { float dv[]; };
layout(std430, binding = 2) readonly buffer OutputGradient { float dOut[]; };
layout(std430, binding = 3) readonly buffer RowStatistics { vec2 stats[]; };
layout(std430, binding = 4) readonly buffer Queries { float q[]; };
layout(std430, binding = 5) readonly buffer Keys { float k[]; };
layout(std430, binding = 6) readonly buffer Values { float v[]; };

void main()
{
    uint T = p.tokenCount, hd = p.headDim, chunks = chunk_count();
    uint blocks = block_count();
    uint item = block_index();
    if (item >= p.kvHeads * blocks)
        return;   // uniform across the workgroup
    uint g = item / blocks, group = p.heads / p.kvHeads;
    uint s0 = (item % blocks) * gl_WorkGroupSize.x, s = s0 + gl_LocalInvocationID.x;
    bool inRange = s < T;
    uint queryEnd = query_end(s0 + gl_WorkGroupSize.x - 1);   // the queries any key of the block is seen by
    uint qStride = p.heads * hd, kvBase = (s * p.kvHeads + g) * hd;
    uint rows = p.tileRows, gradientTile = rows * chunks, statsTile = 2 * rows * chunks;

    vec4 kv[MAX_CHUNKS], vv[MAX_CHUNKS], dkAcc[MAX_CHUNKS], dvAcc[MAX_CHUNKS];
    for (uint c = 0; c < chunks; c++)
    {
        kv[c] = vec4(0.0);
        vv[c] = vec4(0.0);
        dkAcc[c] = vec4(0.0);
        dvAcc[c] = vec4(0.0);
    }
    if (inRange)
        for (uint d = 0; d < hd; d++)
        {
            kv[d / 4][d % 4] = k[kvBase + d];
            vv[d / 4][d % 4] = v[kvBase + d];
        }

    for (uint j = 0; j < group; j++)
    {
        uint h = g * group + j;
        // Queries before the block's first key see none of its keys, nor (with a sliding window)
        // those past its last key's window.
        for (uint t0 = s0; t0 < queryEnd; t0 += rows)
        {
            uint n = min(rows, queryEnd - t0), padded = (n + 3) & ~3u;
            for (uint e = gl_LocalInvocationID.x; e < padded * chunks; e += gl_WorkGroupSize.x)
            {
                uint r = e / chunks, d = 4 * (e % chunks);
                vec4 query = vec4(0.0), gradient = vec4(0.0);
                if (r < n)
                {
                    uint at = (t0 + r) * qStride + h * hd + d;
                    for (uint i = 0; i < 4; i++)
                        if (d + i < hd)
                        {
                            query[i] = q[at + i];
                            gradient[i] = dOut[at + i];
                        }
                }
                tile[e] = query;
                tile[gradientTile + e] = gradient;
            }
            for (uint r = gl_LocalInvocationID.x; r < padded; r += gl_WorkGroupSize.x)
                tile[statsTile + r] = r < n ? vec4(stats[h * T + t0 + r], 0.0, 0.0) : vec4(0.0);
            barrier();
            // The queries that see key s: s ≤ t < query_end(s), rows [first, end).
            uint first = 0, end = 0;
            if (inRange)
            {
                uint stop = query_end(s);
                first = s > t0 ? s - t0 : 0;
                end = stop > t0 ? min(n, stop - t0) : 0;
            }
            for (uint r = first & ~3u; r < end; r += 4)
            {
                vec4 qk = vec4(0.0), dp = vec4(0.0);
                for (uint c = 0; c < chunks; c++)
                {
                    uint at = r * chunks + c, gt = gradientTile + at;
                    qk += vec4(dot(tile[at], kv[c]), dot(tile[at + chunks], kv[c]),
                               dot(tile[at + 2 * chunks], kv[c]), dot(tile[at + 3 * chunks], kv[c]));
                    dp += vec4(dot(tile[gt], vv[c]), dot(tile[gt + chunks], vv[c]),
                               dot(tile[gt + 2 * chunks], vv[c]), dot(tile[gt + 3 * chunks], vv[c]));
                }
                vec4 lse = vec4(tile[statsTile + r].x, tile[statsTile + r + 1].x, tile[statsTile + r + 2].x, tile[statsTile + r + 3].x);
                vec4 delta = vec4(tile[statsTile + r].y, tile[statsTile + r + 1].y, tile[statsTile + r + 2].y, tile[statsTile + r + 3].y);
                vec4 prob = mix(vec4(0.0), exp(p.scale * qk - lse), rows_within(r, first, end));
                vec4 dScore = prob * (dp - delta);
                for (uint c = 0; c < chunks; c++)
                {
                    uint at = r * chunks + c, gt = gradientTile + at;
                    dvAcc[c] += prob.x * tile[gt] + prob.y * tile[gt + chunks] + prob.z * tile[gt + 2 * chunks] + prob.w * tile[gt + 3 * chunks];
                    dkAcc[c] += dScore.x * tile[at] + dScore.y * tile[at + chunks] + dScore.z * tile[at + 2 * chunks] + dScore.w * tile[at + 3 * chunks];
                }
            }
            barrier();
        }
    }

    if (!inRange)
        return;
    for (uint d = 0; d < hd; d++)
    {
        dk[kvBase + d] = p.scale * dkAcc[d / 4][d % 4];
        dv[kvBase + d] = dvAcc[d / 4][d % 4];
    }
}
