// Shared by the LM head's two passes over a vocabulary chunk of logits [T, chunkWidth]
// (cross_entropy.comp, cross_entropy_back.comp): their push constants and the logit softcap.
#include "tanh.glsl"

layout(push_constant) uniform CrossEntropyParameters
{
    uint tokenCount;    // T
    uint chunkWidth;    // vocabulary rows in this chunk
    uint chunkFirst;    // vocabulary index of the chunk's first row
    uint firstChunk;    // 1: stats hold nothing yet (the first pass only)
    float inverseCount; // 1 / labelled rows (the gradient pass only)
    float softcap;      // c > 0: the loss sees z = c·tanh(logit / c) (final_logit_softcapping); 0: z = logit
} p;

// z of a logit: capped to (−c, c) when softcap c > 0, else the logit itself.
float capped_logit(float logit)
{
    return p.softcap > 0.0 ? p.softcap * stable_tanh(logit / p.softcap) : logit;
}
