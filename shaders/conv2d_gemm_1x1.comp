#version 450
// 1x1, stride 1, no padding: the input already is the GEMM's X[c, pixel].
#extension GL_GOOGLE_include_directive : require
#include "conv2d_layout.glsl"

int slot_pixel[TN];
bool slot_live[TN];

void setup_pixels(int first_pixel, int npix) {
    [[unroll]] for (int j = 0; j < TN; ++j) {
        slot_pixel[j] = first_pixel + j * int(gl_WorkGroupSize.x);
        slot_live[j] = slot_pixel[j] < npix;
    }
}

float load_input(int x_base, int k, int slot) {
    return slot_live[slot] ? texelFetch(x, x_base + k * shape.PS + slot_pixel[slot]).x : 0.0;
}

// Direct path: input channels are taken CB at a time, as the "rows" of one weight block, so each
// accumulator takes CB taps per visit.
layout(constant_id = 15) const int CB = 1;
const int TAP_ROWS = CB;
#include "gemm_tiles.glsl"

// Direct path: an invocation owns TN consecutive pixels (TN a multiple of 4), fetched as vec4s. The
// host pads the weights' input channels to a multiple of TAP_ROWS with zeros; those channels' inputs
// are zeros too (fetched from the last real channel and replaced: 0 * inf would be NaN).
void direct_gemm(int image, int group) {
    const int cg = shape.C / shape.GROUPS;
    const int npix = shape.OH * shape.OW;
    const int m_tile = int(gl_WorkGroupID.y);
    const int p0 = int(gl_GlobalInvocationID.x) * TN;
    // Lanes past the last pixel read the last tile instead and store nothing.
    const int x_base4 = ((image * shape.C + group * cg) * shape.PS + min(p0, (npix - 1) / TN * TN)) / 4;
    const int blocks = (cg + TAP_ROWS - 1) / TAP_ROWS;
    const int w_block4 = (group * (shape.OGP / TM) + m_tile) * blocks * BLOCK4;
    clear_tile();
    for (int block = 0; block < blocks; ++block) {
        fetch_weights(w_block4 + block * BLOCK4);
        vec4 rows[TAP_ROWS][ROW4];
        [[unroll]] for (int r = 0; r < TAP_ROWS; ++r) {
            const int c = block * TAP_ROWS + r;
            [[unroll]] for (int t = 0; t < ROW4; ++t) {
                const vec4 v = texelFetch(x4, x_base4 + min(c, cg - 1) * shape.PS / 4 + t);
                rows[r][t] = c < cg ? v : vec4(0.0);  // operands without side effects: a select, no branch
            }
        }
        accumulate(rows);
    }

    store_run(image, group, m_tile * TM, p0, clamp(npix - p0, 0, TN));
}

void main() {
    const int group = int(gl_WorkGroupID.z) % shape.GROUPS;
    const int image = int(gl_WorkGroupID.z) / shape.GROUPS;
    if (STAGE)
        staged_gemm(image, group, shape.C / shape.GROUPS);
    else
        direct_gemm(image, group);
}
