#version 450
// sparse_conv3d's compute, output-stationary over the rulebook's neighbour map nbr (n_out, K), as
// kernels/sparse_conv3d_implicit_gemm.h (GPUs) and sparse_conv3d_cpu_gemm.h (CPU devices):
// Y[r][m] = bias[m] + sum over taps t of (sum over channels c of X[nbr[r][t]][c] * W[t][c][m]), each
// output summed by one invocation in tap and channel order (no atomics: the same bits on every run),
// each tap's products apart before they join the total (errors grow with C + K, not C * K).
//
// STAGE (GPUs): a work group computes TM output channels x TN output rows, WM x WN per invocation;
// per tap that some row of the group reads, BK-deep slices of W and of the gathered rows of X are
// staged in shared memory. Weights packed [K][CPAD][OGPAD] (floats), zero padded.
// Direct (CPU devices, where shared memory and barriers are emulated): an invocation owns one output
// row and CB x 4 output channels, walks the row's taps and skips the missing ones, so it computes
// exactly the rulebook's pairs. Weights packed [K][OGPAD / 4][C] (vec4s).
#extension GL_EXT_control_flow_attributes : require

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z = 1) in;

layout(constant_id = 2) const bool STAGE = true;
layout(constant_id = 3) const int TM = 1;
layout(constant_id = 4) const int TN = 1;
layout(constant_id = 5) const int BK = 1;
layout(constant_id = 6) const int WM = 1;
layout(constant_id = 7) const int WN = 1;
layout(constant_id = 8) const int ACT = 0;
layout(constant_id = 9) const float ALPHA = 0.0;
layout(constant_id = 10) const float BETA = 0.0;
layout(constant_id = 11) const int CB = 1;

layout(push_constant) uniform Shape {
    int N_OUT, C, O, TAPS, CPAD, OGPAD;
} shape;

layout(set = 0, binding = 0) uniform samplerBuffer x;
layout(std430, set = 0, binding = 1) readonly buffer Neighbours { int nbr[]; };
layout(set = 0, binding = 2) uniform samplerBuffer w;
layout(set = 0, binding = 3) uniform samplerBuffer w4;
layout(set = 0, binding = 4) uniform samplerBuffer bias;
layout(std430, set = 0, binding = 5) writeonly buffer Output { float y[]; };

#include "activation.glsl"

const int LX = int(gl_WorkGroupSize.x);
const int LY = int(gl_WorkGroupSize.y);
const int NT = LX * LY;

shared float w_tile[STAGE ? BK * TM : 1];
shared float x_tile[STAGE ? BK * TN : 1];
shared int rows[STAGE ? TN : 1];
// Whether some row of the group reads tap t, in used[t % 3]: the entry for tap t + 1 is cleared before
// tap t's barrier, when every invocation has read it for tap t - 2 and none sets it yet.
shared int used[3];

void staged() {
    const int tx = int(gl_LocalInvocationID.x), ty = int(gl_LocalInvocationID.y), tid = ty * LX + tx;
    const int r0 = int(gl_WorkGroupID.x) * TN, m0 = int(gl_WorkGroupID.y) * TM;
    float acc[WM][WN];
    [[unroll]] for (int i = 0; i < WM; ++i)
        [[unroll]] for (int j = 0; j < WN; ++j)
            acc[i][j] = 0.0;
    if (tid == 0) {
        used[0] = 0;
        used[1] = 0;
    }
    barrier();
    for (int t = 0; t < shape.TAPS; ++t) {
        for (int i = tid; i < TN; i += NT) {
            const int s = r0 + i < shape.N_OUT ? nbr[(r0 + i) * shape.TAPS + t] : -1;
            rows[i] = s;
            if (s >= 0)
                used[t % 3] = 1;  // every writer writes the same value
        }
        if (tid == 0)
            used[(t + 1) % 3] = 0;
        barrier();
        if (used[t % 3] == 0)
            continue;  // the same for the whole group
        float part[WM][WN];
        [[unroll]] for (int i = 0; i < WM; ++i)
            [[unroll]] for (int j = 0; j < WN; ++j)
                part[i][j] = 0.0;
        for (int c0 = 0; c0 < shape.CPAD; c0 += BK) {
            for (int e = tid; e < BK * TM; e += NT) {
                const int kk = e / TM, m = e - kk * TM;
                w_tile[e] = texelFetch(w, (t * shape.CPAD + c0 + kk) * shape.OGPAD + m0 + m).x;
            }
            for (int e = tid; e < BK * TN; e += NT) {
                const int kk = e % BK, n = e / BK, s = rows[n], ch = c0 + kk;
                x_tile[kk * TN + n] = s >= 0 && ch < shape.C ? texelFetch(x, s * shape.C + ch).x : 0.0;
            }
            barrier();
            for (int kk = 0; kk < BK; ++kk)
                [[unroll]] for (int i = 0; i < WM; ++i) {
                    const float a = w_tile[kk * TM + ty * WM + i];
                    [[unroll]] for (int j = 0; j < WN; ++j)
                        part[i][j] += a * x_tile[kk * TN + tx * WN + j];
                }
            barrier();
        }
        [[unroll]] for (int i = 0; i < WM; ++i)
            [[unroll]] for (int j = 0; j < WN; ++j)
                acc[i][j] += part[i][j];
    }
    [[unroll]] for (int i = 0; i < WM; ++i) {
        const int m = m0 + ty * WM + i;
        if (m >= shape.O)
            break;
        const float b = texelFetch(bias, m).x;
        [[unroll]] for (int j = 0; j < WN; ++j) {
            const int r = r0 + tx * WN + j;
            if (r < shape.N_OUT)
                y[r * shape.O + m] = activate(acc[i][j] + b);
        }
    }
}

void direct() {
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

void main() {
    if (STAGE)
        staged();
    else
        direct();
}
