// A tiled matrix product through shared memory, included by gemm_nt.comp, gemm_nn.comp and
// gemm_tn.comp after they define how the two operands are read:
//
//   A_AT(i, k)  the element of op(A) at row i, depth k
//   B_AT(k, j)  the element of op(B) at depth k, column j
//   A_CONTIGUOUS_IN_K / B_CONTIGUOUS_IN_K   1 when consecutive k are adjacent in memory
//
// or, in gemm_nt_q4.comp and gemm_nn_q4.comp, with B a 4-bit weight (common/q4.glsl): they define
// B_Q4 and A_AT, and a function stage_b_q4(k0, col0, lane) that dequantizes one packed word into
// eight elements of the B slice per invocation (a 16 × 64 slice is 128 words, one per invocation).
// B is then bound as its packed words (binding 2) and scale/bias pairs (binding 3), the bias moves
// to binding 4, and the push constants end with the group size. offsetB and strideB count weight
// rows and packed words per row.
//
// or, in gemm_nt_w16.comp and gemm_nn_w16.comp, with B a 16-bit weight (common/float16.glsl): they
// define B_16BIT and B_AT through WEIGHT_AT on the uint array b, and the push constants end with
// bFormat (F16 or BF16). offsetB and strideB count elements, as for a float B.
//
// The bias is a uint array read through WEIGHT_AT with biasFormat (0, float32, unless the bias is a
// 16-bit weight).
//
//   C[rows, cols] (= or +=) alpha · op(A)[rows, depth] · op(B)[depth, cols] (+ bias[cols])
//
// Each workgroup of 16 × 8 = 128 invocations (within every device's guaranteed limits) computes a
// 64 × 64 tile of C: it stages 64 × 16 slices of op(A) and 16 × 64 slices of op(B) in shared
// memory and each invocation accumulates 8 rows × 4 columns of the tile. Offsets, leading
// dimensions and the tile origin are push constants, so one pipeline serves every shape and a
// product over a split weight runs as one dispatch per part.

layout(local_size_x = 16, local_size_y = 8, local_size_z = 1) in;

#include "float16.glsl"

layout(std430, binding = 0) buffer Output { float c[]; };
layout(std430, binding = 1) readonly buffer OperandA { float a[]; };
#if defined(B_Q4)
#include "q4.glsl"
layout(std430, binding = 2) readonly buffer PackedB { uint packedB[]; };
layout(std430, binding = 3) readonly buffer ScaleBiasB { uint scaleBiasB[]; };
layout(std430, binding = 4) readonly buffer Bias { uint bias[]; };
#elif defined(B_16BIT)
layout(std430, binding = 2) readonly buffer OperandB { uint b[]; };
layout(std430, binding = 3) readonly buffer Bias { uint bias[]; };
#else
layout(std430, binding = 2) readonly buffer OperandB { float b[]; };
layout(std430, binding = 3) readonly buffer Bias { uint bias[]; };
#endif

layout(push_constant) uniform GemmParameters
{
    uint rows;            // of C (M)
    uint cols;            // of C (N)
    uint depth;           // the summed dimension (K)
    uint strideA;         // leading dimension of A as stored
    uint strideB;         // leading dimension of B as stored
    uint strideC;         // leading dimension of C
    uint offsetA;         // element offsets into each buffer
    uint offsetB;
    uint offsetC;
    uint offsetBias;
    float alpha;
    uint accumulate;      // 1: C += product, 0: C = product
    uint hasBias;         // 1: add bias[offsetBias + column] (after alpha)
    uint firstRowTile;    // tile origin, for dispatches split to respect maxComputeWorkGroupCount
    uint firstColTile;
    uint biasFormat;      // how the bias is stored (common/float16.glsl: FORMAT_F32, _F16, _BF16)
#ifdef B_Q4
    uint groupSize;       // elements per (scale, bias) group of a weight row
#endif
#ifdef B_16BIT
    uint bFormat;         // how the weight B is stored: FORMAT_F16 or FORMAT_BF16
#endif
} p;

const uint TILE = 64;
const uint TILE_K = 16;
const uint THREADS = 128;
const uint ROWS_PER_THREAD = 8;  // TILE / 8 invocations in y
const uint COLS_PER_THREAD = 4;  // TILE / 16 invocations in x

shared float tileA[TILE_K][TILE + 1];
shared float tileB[TILE_K][TILE + 1];

#ifdef B_Q4
void stage_b_q4(uint k0, uint col0, uint lane);
#endif

void main()
{
    uint tx = gl_LocalInvocationID.x, ty = gl_LocalInvocationID.y;
    uint lane = ty * 16 + tx;
    uint row0 = (gl_WorkGroupID.y + p.firstRowTile) * TILE;
    uint col0 = (gl_WorkGroupID.x + p.firstColTile) * TILE;

    float acc[ROWS_PER_THREAD][COLS_PER_THREAD];
    for (uint m = 0; m < ROWS_PER_THREAD; m++)
        for (uint n = 0; n < COLS_PER_THREAD; n++)
            acc[m][n] = 0.0;

    for (uint k0 = 0; k0 < p.depth; k0 += TILE_K)
    {
        // Stage the slices, reading along whichever index is contiguous in memory.
        for (uint s = 0; s < TILE * TILE_K / THREADS; s++)
        {
            uint e = lane + s * THREADS;
#if A_CONTIGUOUS_IN_K
            uint kk = e % TILE_K, ii = e / TILE_K;
#else
            uint ii = e % TILE, kk = e / TILE;
#endif
            uint i = row0 + ii, k = k0 + kk;
            tileA[kk][ii] = (i < p.rows && k < p.depth) ? A_AT(i, k) : 0.0;
#ifndef B_Q4
#if B_CONTIGUOUS_IN_K
            uint kb = e % TILE_K, jj = e / TILE_K;
#else
            uint jj = e % TILE, kb = e / TILE;
#endif
            uint j = col0 + jj, kj = k0 + kb;
            tileB[kb][jj] = (j < p.cols && kj < p.depth) ? B_AT(kj, j) : 0.0;
#endif
        }
#ifdef B_Q4
        stage_b_q4(k0, col0, lane);
#endif
        barrier();

        for (uint kk = 0; kk < TILE_K; kk++)
        {
            float bv[COLS_PER_THREAD];
            for (uint n = 0; n < COLS_PER_THREAD; n++)
                bv[n] = tileB[kk][tx + 16 * n];
            for (uint m = 0; m < ROWS_PER_THREAD; m++)
            {
                float av = tileA[kk][ty + 8 * m];
                for (uint n = 0; n < COLS_PER_THREAD; n++)
                    acc[m][n] = fma(av, bv[n], acc[m][n]);
            }
        }
        barrier();
    }

    for (uint m = 0; m < ROWS_PER_THREAD; m++)
    {
        uint i = row0 + ty + 8 * m;
        if (i >= p.rows)
            break;
        for (uint n = 0; n < COLS_PER_THREAD; n++)
        {
            uint j = col0 + tx + 16 * n;
            if (j >= p.cols)
                break;
            float value = p.alpha * acc[m][n];
            if (p.hasBias != 0)
                value += WEIGHT_AT(bias, p.offsetBias + j, p.biasFormat);
            uint at = p.offsetC + i * p.strideC + j;
            c[at] = p.accumulate != 0 ? c[at] + value : value;
        }
    }
}
