#version 450
#extension GL_GOOGLE_include_directive : require
// C[M,K] (=|+=) alpha·A[M,N]·W with W [N, K] a 16-bit weight (F16 or BF16, bFormat; rows
// offsetB/strideB.. of one part): the frozen base term of the input gradient, dX = dY·W, and the LM
// head's dx += dlogits·W_chunk. (In gemm.glsl's names: rows M, depth N, cols K.) Each value of W is
// converted as its slice is staged in shared memory; no float copy of it exists.

#define A_AT(i, k) a[p.offsetA + (i) * p.strideA + (k)]
#define B_AT(k, j) WEIGHT_AT(b, p.offsetB + (k) * p.strideB + (j), p.bFormat)
#define A_CONTIGUOUS_IN_K 1
#define B_CONTIGUOUS_IN_K 0
#define B_16BIT
#include "gemm.glsl"
