// Shared by the per-row kernels: one workgroup per row, its invocations striding over the row's
// columns, then a tree reduction through shared memory (or, in the .subgroups variant, through
// subgroup arithmetic).
//
// The workgroup width is specialization constant 0 (a power of two up to 256 within the device's
// limits, as for the elementwise kernels). Rows beyond maxComputeWorkGroupCount[0] fold into y.

#ifdef LORA_SUBGROUPS
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_KHR_shader_subgroup_basic : require
#endif

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

shared float reduction[gl_WorkGroupSize.x];

uint row_index()
{
    return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
}

#ifdef LORA_SUBGROUPS
// The .subgroups variant (built with -DLORA_SUBGROUPS, used where the device offers subgroup
// arithmetic): each subgroup reduces in registers, then one value per subgroup goes through shared
// memory. The order of the additions differs from the tree below, so results differ in the last bits.

// Σ over the workgroup of each invocation's value; every invocation gets the total.
float workgroup_sum(float value)
{
    float partial = subgroupAdd(value);
    if (subgroupElect())
        reduction[gl_SubgroupID] = partial;
    barrier();
    float total = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; i++)
        total += reduction[i];
    barrier(); // reduction[] is free again
    return total;
}

// max over the workgroup of each invocation's value; every invocation gets it.
float workgroup_max(float value)
{
    float partial = subgroupMax(value);
    if (subgroupElect())
        reduction[gl_SubgroupID] = partial;
    barrier();
    float total = reduction[0];
    for (uint i = 1; i < gl_NumSubgroups; i++)
        total = max(total, reduction[i]);
    barrier();
    return total;
}
#else
// Σ over the workgroup of each invocation's value; every invocation gets the total.
float workgroup_sum(float value)
{
    uint lane = gl_LocalInvocationID.x;
    reduction[lane] = value;
    barrier();
    for (uint stride = gl_WorkGroupSize.x / 2; stride > 0; stride /= 2)
    {
        if (lane < stride)
            reduction[lane] += reduction[lane + stride];
        barrier();
    }
    float total = reduction[0];
    barrier(); // reduction[] is free again
    return total;
}

// max over the workgroup of each invocation's value; every invocation gets it.
float workgroup_max(float value)
{
    uint lane = gl_LocalInvocationID.x;
    reduction[lane] = value;
    barrier();
    for (uint stride = gl_WorkGroupSize.x / 2; stride > 0; stride /= 2)
    {
        if (lane < stride)
            reduction[lane] = max(reduction[lane], reduction[lane + stride]);
        barrier();
    }
    float total = reduction[0];
    barrier();
    return total;
}
#endif

// The most negative finite float: a max over no elements, and masked scores.
const float LOWEST = -3.402823466e38;
