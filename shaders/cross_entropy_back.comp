#version 450
#extension GL_GOOGLE_include_directive : require
// The LM head's gradient pass over one recomputed chunk of logits, in place:
// dz[t, j] = (exp(z − lse[t]) − [j is the label])/count with lse = m + log(Σ) from the first pass;
// rows without a label get 0. With a softcap c, z = c·tanh(l/c) and the gradient flows through it:
// dlogits = dz·(1 − tanh²(l/c)); without one dlogits = dz. dx += dlogits·W_chunk follows as a gemm_nn.
#include "elementwise.glsl"
#include "cross_entropy.glsl"

layout(std430, binding = 0) buffer Logits { float logits[]; };
layout(std430, binding = 1) readonly buffer Statistics { float stats[]; };
layout(std430, binding = 2) readonly buffer Targets { int targets[]; };

void main()
{
    uint i = linear_index();
    if (i >= p.tokenCount * p.chunkWidth)
        return;
    uint t = i / p.chunkWidth, j = i % p.chunkWidth;
    int label = targets[t];
    if (label < 0)
    {
        logits[i] = 0.0;
        return;
    }
    float logit = logits[i], z = logit, slope = 1.0;
    if (p.softcap > 0.0)
    {
        float th = stable_tanh(logit / p.softcap);
        z = p.softcap * th;
        slope = 1.0 - th * th;
    }
    float lse = stats[3 * t] + log(stats[3 * t + 1]);
    float g = exp(z - lse) * p.inverseCount;
    if (uint(label) == p.chunkFirst + j)
        g -= p.inverseCount;
    logits[i] = g * slope;
}
