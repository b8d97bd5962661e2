// The tanh-approximated GELU (PyTorch's gelu(approximate="tanh"), Hugging Face's gelu_pytorch_tanh)
// and its derivative, for geglu.comp and geglu_back.comp:
//
//   gelu(x) = 0.5·x·(1 + tanh(u)),   u = √(2/π)·(x + 0.044715·x³)
//
// written as x·σ(2u), since 0.5·(1 + tanh(u)) = σ(2u) = 1/(1 + exp(−2u)). GLSL's tanh may be
// evaluated as (e^2u − 1)/(e^2u + 1), which is inf/inf = NaN once e^2u overflows (|u| past about 44,
// so |x| past about 9); the logistic form only ever divides by 1 + exp(−2u) ≥ 1 (an infinite exp
// gives σ = 0, as it should), and 1 − tanh²(u) = 4·σ(2u)·(1 − σ(2u)) needs no tanh either:
//
//   gelu'(x) = σ + 2·x·σ·(1 − σ)·√(2/π)·(1 + 3·0.044715·x²),   σ = σ(2u)

const float GELU_SQRT_2_OVER_PI = 0.7978845608028654;
const float GELU_CUBIC = 0.044715;

// σ(2u) of the GELU's argument x.
float gelu_gate(float x)
{
    float u = GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    return 1.0 / (1.0 + exp(-2.0 * u));
}

float gelu(float x)
{
    return x * gelu_gate(x);
}

// gelu'(x), given s = gelu_gate(x).
float gelu_derivative(float x, float s)
{
    return s + 2.0 * x * s * (1.0 - s) * GELU_SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
}
