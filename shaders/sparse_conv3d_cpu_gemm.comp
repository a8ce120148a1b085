#version 450
// sparse_conv3d's compute on CPU devices, as kernels/sparse_conv3d_cpu_gemm.h: output-stationary over the
// rulebook's neighbour map nbr (n_out, K) (GPUs run sparse_conv3d_gather_gemm.comp, a pass per tap).
// An invocation owns one output row and CB x 4 output channels; it walks the row's taps in order and
// skips the ones the map marks -1, so it computes exactly the rulebook's pairs and sums each output in
// tap order (no atomics: the same bits on every run), each tap's products apart before they join the
// total (errors grow with C + K, not C * K), with no shared memory (emulated, and slow, on CPU devices).
// The work group is one subgroup of consecutive rows. Weights packed [K][OGPAD / 4][C] (vec4s).
#extension GL_EXT_control_flow_attributes : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

layout(constant_id = 1) const int CB = 1;
layout(constant_id = 2) const int ACT = 0;

layout(push_constant) uniform Shape {
    int N_OUT, C, O, TAPS, OGPAD;
    float ALPHA, BETA;  // the activation's parameters (activation.glsl)
} shape;

// Tensors are read through texel buffers: on llvmpipe far cheaper than storage-buffer loads.
layout(set = 0, binding = 0) uniform samplerBuffer x;
layout(std430, set = 0, binding = 1) readonly buffer Neighbours { int nbr[]; };
layout(set = 0, binding = 2) uniform samplerBuffer w4;
layout(set = 0, binding = 3) uniform samplerBuffer bias;
layout(std430, set = 0, binding = 4) writeonly buffer Output { float y[]; };

#include "activation.glsl"

void main() {
    const int r = int(gl_GlobalInvocationID.x), b0 = int(gl_WorkGroupID.y) * CB, blocks = shape.OGPAD / 4;
    if (r >= shape.N_OUT)
        return;
    vec4 acc[CB];
    [[unroll]] for (int q = 0; q < CB; ++q)
        acc[q] = vec4(0.0);
    for (int t = 0; t < shape.TAPS; ++t) {
        const int s = nbr[r * shape.TAPS + t];
        if (s < 0)
            continue;
        vec4 part[CB];
        [[unroll]] for (int q = 0; q < CB; ++q)
            part[q] = vec4(0.0);
        const int w_base = (t * blocks + b0) * shape.C;
        for (int ch = 0; ch < shape.C; ++ch) {
            const float v = texelFetch(x, s * shape.C + ch).x;
            [[unroll]] for (int q = 0; q < CB; ++q)
                part[q] += v * texelFetch(w4, w_base + q * shape.C + ch);
        }
        [[unroll]] for (int q = 0; q < CB; ++q)
            acc[q] += part[q];
    }
    [[unroll]] for (int q = 0; q < CB; ++q)
        [[unroll]] for (int e = 0; e < 4; ++e) {
            const int m = (b0 + q) * 4 + e;
            if (m < shape.O)
                y[r * shape.O + m] = activate(acc[q][e] + texelFetch(bias, m).x);
        }
}
