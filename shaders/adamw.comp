#version 450
#extension GL_GOOGLE_include_directive : require
// The optimizer update, elementwise over one parameter tensor (same arithmetic as
// CpuBackend.AdamWUpdate and SgdUpdate), with g = gradient·gradScale, and g = 0 for gradScale 0 (a
// layer LCSB skipped: its gradient buffer holds another layer's values, which are not read):
//   AdamW: m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;  p −= lr·(m/c1 / (sqrt(v/c2) + ε) + λ·p)
//          with the bias corrections c1 = 1 − β1^step, c2 = 1 − β2^step.
//   SGD:   p −= lr·(g + λ·p)   (m and v are not touched).
#include "elementwise.glsl"

layout(std430, binding = 0) buffer Parameter { float param[]; };
layout(std430, binding = 1) buffer FirstMoment { float m[]; };
layout(std430, binding = 2) buffer SecondMoment { float v[]; };
layout(std430, binding = 3) readonly buffer Gradient { float grad[]; };

layout(push_constant) uniform OptimizerParameters
{
    uint count;
    uint sgd;                 // 1: plain SGD with weight decay
    float learningRate;
    float beta1;
    float beta2;
    float epsilon;
    float weightDecay;
    float biasCorrection1;    // 1 − β1^step
    float biasCorrection2;    // 1 − β2^step
    float gradScale;          // e.g. 1/accumulated steps
} p;

void main()
{
    uint i = linear_index();
    if (i >= p.count)
        return;
    float g = p.gradScale == 0.0 ? 0.0 : grad[i] * p.gradScale;
    if (p.sgd != 0)
    {
        param[i] -= p.learningRate * (g + p.weightDecay * param[i]);
        return;
    }
    float mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    float vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float update = mi / p.biasCorrection1 / (sqrt(vi / p.biasCorrection2) + p.epsilon);
    param[i] -= p.learningRate * (update + p.weightDecay * param[i]);
}
