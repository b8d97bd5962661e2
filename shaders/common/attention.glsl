// The sizes every attention kernel shares. q, the output and dOut are [T, heads, headDim], k and v
// [T, kvHeads, headDim], lse [heads, T]; head h reads kv head h / (heads / kvHeads). Query t sees
// key s iff s ≤ t and, with a sliding window W > 0, t − s < W (Gemma 3's sliding layers).

layout(push_constant) uniform AttentionParameters
{
    uint tokenCount;   // T
    uint heads;
    uint kvHeads;
    uint headDim;
    float scale;       // of the scores: 1/sqrt(headDim) for most models, query_pre_attn_scalar^-1/2 for Gemma 3
    uint tileRows;     // rows of k/v (or q/dOut) staged in shared memory at a time, see attention_tiles.glsl
    uint window;       // 0: causal; W > 0: a sliding window of W keys, the query's own included
} p;

uint kv_head(uint h) { return h / (p.heads / p.kvHeads); }

// The first key query t sees: 0, or t + 1 − W within a sliding window of W.
uint first_key(uint t) { return p.window == 0 || t < p.window ? 0 : t + 1 - p.window; }

// One past the last query that sees key s: T, or s + W (at most T) within a sliding window of W.
uint query_end(uint s) { return p.window == 0 ? p.tokenCount : min(p.tokenCount, s + p.window); }
