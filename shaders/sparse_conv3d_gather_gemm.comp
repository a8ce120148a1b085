#version 450
// sparse_conv3d's compute on GPUs, as kernels/sparse_conv3d_gather_gemm.h: a gather -> GEMM -> scatter
// pass per kernel tap over the rulebook's pair lists, Y[out_rows[p]] += X[in_rows[p]] W_t for tap t's
// pairs (the dispatches of one tap each, in tap order, a barrier between them). Within a tap each
// output row appears once, so no two invocations of a pass write one row, and each output is summed in
// tap order on every run (no atomics), each tap's products apart before they join it (errors grow with
// C + K, not C * K). Y starts at zero; the EPILOGUE dispatch then adds the bias and the activation.
// A work group computes TM output channels x TN pairs, WM x WN per invocation, staging BK-deep slices
// of W and of the gathered rows of X in shared memory. Weights packed [K][CPAD][OGPAD], zero padded.
#extension GL_EXT_control_flow_attributes : require

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z = 1) in;

layout(constant_id = 2) const bool EPILOGUE = false;
layout(constant_id = 3) const int TM = 1;
layout(constant_id = 4) const int TN = 1;
layout(constant_id = 5) const int BK = 1;
layout(constant_id = 6) const int WM = 1;
layout(constant_id = 7) const int WN = 1;
layout(constant_id = 8) const int ACT = 0;

// FIRST, COUNT: the tap's pairs in the lists; TOTAL: the epilogue's elements (n_out x O).
layout(push_constant) uniform Shape {
    int FIRST, COUNT, TAP, C, O, CPAD, OGPAD, TOTAL;
    float ALPHA, BETA;  // the activation's parameters (activation.glsl)
} shape;

layout(set = 0, binding = 0) uniform samplerBuffer x;
layout(std430, set = 0, binding = 1) readonly buffer InRows { int in_rows[]; };
layout(std430, set = 0, binding = 2) readonly buffer OutRows { int out_rows[]; };
layout(set = 0, binding = 3) uniform samplerBuffer w;
layout(set = 0, binding = 4) uniform samplerBuffer bias;
layout(std430, set = 0, binding = 5) buffer Output { float y[]; };

#include "activation.glsl"

const int LX = int(gl_WorkGroupSize.x);
const int LY = int(gl_WorkGroupSize.y);
const int NT = LX * LY;

shared float w_tile[EPILOGUE ? 1 : BK * TM];
shared float x_tile[EPILOGUE ? 1 : BK * TN];
shared int rows[EPILOGUE ? 1 : TN];

void tap_pass() {
    const int tx = int(gl_LocalInvocationID.x), ty = int(gl_LocalInvocationID.y), tid = ty * LX + tx;
    const int p0 = int(gl_WorkGroupID.x) * TN, m0 = int(gl_WorkGroupID.y) * TM;
    for (int i = tid; i < TN; i += NT)
        rows[i] = p0 + i < shape.COUNT ? in_rows[shape.FIRST + p0 + i] : -1;
    barrier();
    float acc[WM][WN];
    [[unroll]] for (int i = 0; i < WM; ++i)
        [[unroll]] for (int j = 0; j < WN; ++j)
            acc[i][j] = 0.0;
    for (int c0 = 0; c0 < shape.CPAD; c0 += BK) {
        for (int e = tid; e < BK * TM; e += NT) {
            const int kk = e / TM, m = e - kk * TM;
            w_tile[e] = texelFetch(w, (shape.TAP * shape.CPAD + c0 + kk) * shape.OGPAD + m0 + m).x;
        }
        // x_tile[kk][n] = X[rows[n]][c0 + kk]: consecutive invocations read consecutive channels of a row.
        for (int e = tid; e < BK * TN; e += NT) {
            const int kk = e % BK, n = e / BK, s = rows[n], ch = c0 + kk;
            x_tile[kk * TN + n] = s >= 0 && ch < shape.C ? texelFetch(x, s * shape.C + ch).x : 0.0;
        }
        barrier();
        for (int kk = 0; kk < BK; ++kk)
            [[unroll]] for (int i = 0; i < WM; ++i) {
                const float a = w_tile[kk * TM + ty * WM + i];
                [[unroll]] for (int j = 0; j < WN; ++j)
                    acc[i][j] += a * x_tile[kk * TN + tx * WN + j];
            }
        barrier();
    }
    [[unroll]] for (int j = 0; j < WN; ++j) {
        const int p = p0 + tx * WN + j;
        if (p >= shape.COUNT)
            break;
        const int row = out_rows[shape.FIRST + p] * shape.O;
        [[unroll]] for (int i = 0; i < WM; ++i) {
            const int m = m0 + ty * WM + i;
            if (m < shape.O)
                y[row + m] += acc[i][j];
        }
    }
}

void epilogue_pass() {
    const int i = int(gl_GlobalInvocationID.x);
    if (i < shape.TOTAL)
        y[i] = activate(y[i] + texelFetch(bias, i % shape.O).x);
}

void main() {
    if (EPILOGUE)
        epilogue_pass();
    else
        tap_pass();
}
