// Bias and fused activation, shared by every conv2d shader; codes match spec.ACTIVATION_CODES.
#ifndef CONV2D_ACTIVATION_GLSL
#define CONV2D_ACTIVATION_GLSL

#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_RELU6 2
#define ACT_SIGMOID 3
#define ACT_TANH 4
#define ACT_SILU 5
#define ACT_MISH 6
#define ACT_HARDSWISH 7
#define ACT_LEAKY_RELU 8
#define ACT_CLIP 9

// ACT is a specialization constant of the including shader, so the switch folds away when the pipeline
// is built. leaky_relu's slope and clip's bounds are push constants (shape.ALPHA, shape.BETA): one
// pipeline serves every value.
float sigmoid_stable(float v) {
    // exp of a large positive argument overflows to inf; 1/(1+inf) is still the right 0.
    return 1.0 / (1.0 + exp(-v));
}

float tanh_clamped(float v) {
    // Some drivers return NaN for tanh beyond |x| ~ 44; tanh is +-1 in float32 long before 10.
    return tanh(clamp(v, -10.0, 10.0));
}

float softplus_stable(float v) {
    return max(v, 0.0) + log(1.0 + exp(-abs(v)));
}

float activation_of_number(float v) {
    if (ACT == ACT_RELU) return max(v, 0.0);
    if (ACT == ACT_RELU6) return min(max(v, 0.0), 6.0);
    if (ACT == ACT_SIGMOID) return sigmoid_stable(v);
    if (ACT == ACT_TANH) return tanh_clamped(v);
    if (ACT == ACT_SILU) return v * sigmoid_stable(v);
    if (ACT == ACT_MISH) return v * tanh_clamped(softplus_stable(v));
    if (ACT == ACT_HARDSWISH) return v * clamp(v / 6.0 + 0.5, 0.0, 1.0);
    if (ACT == ACT_LEAKY_RELU) return v >= 0.0 ? v : shape.ALPHA * v;
    if (ACT == ACT_CLIP) return min(max(v, shape.ALPHA), shape.BETA);
    return v;
}

// NaN in, NaN out, as IEEE arithmetic and numpy have it: GPU max, min and clamp return the other
// operand for a NaN (SPIR-V leaves it undefined), so the clamps above would turn NaN into a number.
// +-inf need nothing: each formula above gives the textbook limit or, as numpy does, inf * 0 = NaN.
float activate(float v) {
    const float a = activation_of_number(v);
    return isnan(v) ? v : a;  // operands without side effects: a select, no branch around each epilogue
}

#endif
