#version 450
// Any kernel size, stride, dilation, padding and groups: GEMM over K = (c, kh, kw) with the input
// gathered on the fly from the padded input (no im2col buffer).
#extension GL_GOOGLE_include_directive : require
#include "conv2d_layout.glsl"

int slot_offset[TN];
bool slot_live[TN];

void setup_pixels(int first_pixel, int npix) {
    [[unroll]] for (int j = 0; j < TN; ++j) {
        const int p = first_pixel + j * int(gl_WorkGroupSize.x);
        const int oh = p / shape.OW;
        slot_live[j] = p < npix;
        slot_offset[j] = oh * stride_h() * shape.WP + (p - oh * shape.OW) * stride_w();
    }
}

float load_input(int x_base, int k, int slot) {
    const int kw = kernel_w(), taps = kernel_h() * kw;
    const int c = k / taps;
    const int r = (k - c * taps) / kw;
    const int s = k - c * taps - r * kw;
    const int index = x_base + c * shape.PS + slot_offset[slot] + r * dilation_h() * shape.WP + s * dilation_w();
    return slot_live[slot] ? texelFetch(x, index).x : 0.0;
}

const int TAP_ROWS = KH;
#include "gemm_tiles.glsl"

// Direct path: an invocation owns TN neighbouring outputs of one row (TN a multiple of 4), so the row
// segments fetched as vec4s serve all KH x KW taps of all TN outputs.
void direct_gemm(int image, int group) {
    const int cg = shape.C / shape.GROUPS;
    const int m_tile = int(gl_WorkGroupID.y);
    const int row_tiles = (shape.OW + TN - 1) / TN;
    const int item = int(gl_GlobalInvocationID.x);
    const int oh = item / row_tiles;
    const int ow0 = (item - oh * row_tiles) * TN;
    // Lanes past the last row read the last row instead and store nothing.
    const int x_base4 = ((image * shape.C + group * cg) * shape.PS
                         + min(oh, shape.OH - 1) * SH * shape.WP + ow0 * SW) / 4;
    const int w_block4 = (group * (shape.OGP / TM) + m_tile) * cg * BLOCK4;
    clear_tile();
    for (int c = 0; c < cg; ++c) {
        fetch_weights(w_block4 + c * BLOCK4);
        vec4 rows[TAP_ROWS][ROW4];
        [[unroll]] for (int r = 0; r < KH; ++r)
            [[unroll]] for (int t = 0; t < ROW4; ++t)
                rows[r][t] = texelFetch(x4, x_base4 + (c * shape.PS + r * DH * shape.WP) / 4 + t);
        accumulate(rows);
    }

    store_run(image, group, m_tile * TM, oh * shape.OW + ow0, oh < shape.OH ? min(TN, shape.OW - ow0) : 0);
}

// Direct path without UNROLL: the same outputs per invocation, one tap at a time in loops, each tap
// TN single fetches (outputs past the row's end fetch its last output's inputs and store nothing) and
// TM / 4 weight vec4s. The host pads x only to what the live outputs read.
void direct_gemm_looped(int image, int group) {
    const int cg = shape.C / shape.GROUPS;
    const int m_tile = int(gl_WorkGroupID.y);
    const int row_tiles = (shape.OW + TN - 1) / TN;
    const int item = int(gl_GlobalInvocationID.x);
    const int oh = item / row_tiles;
    const int ow0 = (item - oh * row_tiles) * TN;
    int column[TN];
    [[unroll]] for (int j = 0; j < TN; ++j)
        column[j] = min(ow0 + j, shape.OW - 1) * shape.SW;
    const int x_base = (image * shape.C + group * cg) * shape.PS + min(oh, shape.OH - 1) * shape.SH * shape.WP;
    int w_next4 = (group * (shape.OGP / TM) + m_tile) * cg * shape.KH * shape.KW * (TM / 4);
    clear_tile();
    for (int c = 0; c < cg; ++c)
        for (int r = 0; r < shape.KH; ++r) {
            const int row = x_base + c * shape.PS + r * shape.DH * shape.WP;
            for (int s = 0; s < shape.KW; ++s) {
                float v[TN];
                [[unroll]] for (int j = 0; j < TN; ++j)
                    v[j] = texelFetch(x, row + column[j] + s * shape.DW).x;
                [[unroll]] for (int q = 0; q < TM / 4; ++q) {
                    const vec4 wq = texelFetch(w4, w_next4++);
                    [[unroll]] for (int e = 0; e < 4; ++e)
                        [[unroll]] for (int j = 0; j < TN; ++j)
                            acc[4 * q + e][j] = fma(wq[e], v[j], acc[4 * q + e][j]);
                }
            }
        }

    store_run(image, group, m_tile * TM, oh * shape.OW + ow0, oh < shape.OH ? min(TN, shape.OW - ow0) : 0);
}

void main() {
    const int group = int(gl_WorkGroupID.z) % shape.GROUPS;
    const int image = int(gl_WorkGroupID.z) / shape.GROUPS;
    if (STAGE)
        staged_gemm(image, group, shape.C / shape.GROUPS * kernel_h() * kernel_w());
    else if (UNROLL)
        direct_gemm(image, group);
    else
        direct_gemm_looped(image, group);
}
