#version 450
#extension GL_GOOGLE_include_directive : require
// C[M,N] (=|+=) alpha·A[M,K]·Wᵀ (+ bias) with W [N, K] a 16-bit weight (F16 or BF16, bFormat; rows
// offsetB/strideB.. of one part): the linear layer's forward y = x·Wᵀ + b and the LM head's logits
// chunk. Each value of W is converted as its slice is staged in shared memory; no float copy of it exists.

#define A_AT(i, k) a[p.offsetA + (i) * p.strideA + (k)]
#define B_AT(k, j) WEIGHT_AT(b, p.offsetB + (j) * p.strideB + (k), p.bFormat)
#define A_CONTIGUOUS_IN_K 1
#define B_CONTIGUOUS_IN_K 1
#define B_16BIT
#include "gemm.glsl"
