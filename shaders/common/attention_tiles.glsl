// Shared by the FlashAttention-style kernels (attention, attention_back_dq, attention_back_dkv):
// one workgroup per (head, block of rows), one invocation per row, each keeping its row's vectors in
// registers as vec4 chunks (at most MAX_CHUNKS, so head dimensions up to 256), while the workgroup
// stages tiles of the other operand's rows through shared memory. Nothing is ever [T, T].
//
// Rows of a tile are consumed four at a time: four dot products share one pass over the chunks. That
// also keeps the loop count per invocation low, which matters on lavapipe: llvmpipe stops every loop
// of an invocation after 65,535 iterations in all (LP_MAX_TGSI_LOOP_ITERATIONS), silently, so the
// backend refuses sizes that would reach it there (VulkanBackend.AttentionLoops, which takes the sliding window into account).
//
// Specialization constant 0 is the workgroup width (rows per block), 1 the vec4s of shared memory the
// tile may use; the backend sets both within the device's maxComputeWorkGroupSize,
// maxComputeWorkGroupInvocations and maxComputeSharedMemorySize, and passes tileRows (a multiple of 4:
// how many rows of two operands, plus one vec4 of row statistics each, fit) as a push constant.
// Blocks beyond maxComputeWorkGroupCount[0] fold into y.

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
layout(constant_id = 1) const uint TILE_VEC4S = 1024;

const uint MAX_CHUNKS = 64;   // head dimensions up to 256

// The most negative finite float: the running max before any score, and masked scores.
const float LOWEST = -3.402823466e38;

shared vec4 tile[TILE_VEC4S];

uint block_index()
{
    return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
}

uint block_count()
{
    return (p.tokenCount + gl_WorkGroupSize.x - 1) / gl_WorkGroupSize.x;
}

uint chunk_count()
{
    return (p.headDim + 3) / 4;
}

// Which of the four rows r0..r0+3 lie in [first, end).
bvec4 rows_within(uint r0, uint first, uint end)
{
    uvec4 r = uvec4(r0) + uvec4(0, 1, 2, 3);
    return bvec4(uvec4(greaterThanEqual(r, uvec4(first))) * uvec4(lessThan(r, uvec4(end))));
}
