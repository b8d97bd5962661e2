// tanh without overflow. GLSL's tanh may be evaluated as (e^2x − 1)/(e^2x + 1), which is
// inf/inf = NaN once e^2x overflows (|x| past about 44). Here e = exp(−2|x|) lies in (0, 1], so
// tanh(|x|) = (1 − e)/(1 + e) never overflows (and is 1 for large |x|); below |x| = 1/4, where
// 1 − e would cancel, the odd Taylor series to x⁹ is exact to float rounding (the next term is
// under 1e-8 of the value there).
float stable_tanh(float x)
{
    float a = abs(x);
    float t;
    if (a < 0.25)
    {
        float a2 = a * a;
        t = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))));
    }
    else
    {
        float e = exp(-2.0 * a);
        t = (1.0 - e) / (1.0 + e);
    }
    return x < 0.0 ? -t : t;
}
