#version 450
// groups == C with any channel multiplier O/C: one output plane per gl_WorkGroupID.z; each invocation
// computes TN neighbouring outputs of a row (TN a multiple of 4): where UNROLL from row segments fetched
// as vec4s, else one tap at a time in loops (outputs past the row's end fetch its last output's inputs).
#extension GL_GOOGLE_include_directive : require
#include "conv2d_layout.glsl"

const int ROW4 = ((TN - 1) * SW + (KW - 1) * DW + 4) / 4;

void main() {
    const int plane = int(gl_WorkGroupID.z);
    const int channel = plane % shape.O;
    const int image = plane / shape.O;
    const int row_tiles = (shape.OW + TN - 1) / TN;
    const int item = int(gl_GlobalInvocationID.x);
    const int oh = item / row_tiles;
    const int ow0 = (item - oh * row_tiles) * TN;
    if (oh >= shape.OH)
        return;
    const int c = channel / (shape.O / shape.C);

    float acc[TN];
    [[unroll]] for (int j = 0; j < TN; ++j)
        acc[j] = 0.0;
    if (UNROLL) {
        const int x_base4 = ((image * shape.C + c) * shape.PS + oh * SH * shape.WP + ow0 * SW) / 4;
        [[unroll]] for (int r = 0; r < KH; ++r) {
            vec4 row[ROW4];
            [[unroll]] for (int t = 0; t < ROW4; ++t)
                row[t] = texelFetch(x4, x_base4 + r * DH * shape.WP / 4 + t);
            [[unroll]] for (int s = 0; s < KW; ++s) {
                const float wk = texelFetch(w, channel * KH * KW + r * KW + s).x;
                [[unroll]] for (int j = 0; j < TN; ++j) {
                    const int col = j * SW + s * DW;
                    acc[j] = fma(wk, row[col / 4][col % 4], acc[j]);
                }
            }
        }
    } else {
        int column[TN];
        [[unroll]] for (int j = 0; j < TN; ++j)
            column[j] = min(ow0 + j, shape.OW - 1) * shape.SW;
        const int x_base = (image * shape.C + c) * shape.PS + oh * shape.SH * shape.WP;
        int w_next = channel * shape.KH * shape.KW;
        for (int r = 0; r < shape.KH; ++r) {
            const int row = x_base + r * shape.DH * shape.WP;
            for (int s = 0; s < shape.KW; ++s) {
                const float wk = texelFetch(w, w_next++).x;
                [[unroll]] for (int j = 0; j < TN; ++j)
                    acc[j] = fma(wk, texelFetch(x, row + column[j] + s * shape.DW).x, acc[j]);
            }
        }
    }

    const int y_base = (image * shape.O + channel) * shape.OH * shape.OW + oh * shape.OW;
    [[unroll]] for (int j = 0; j < TN; ++j)
        if (ow0 + j < shape.OW)
            y[y_base + ow0 + j] = epilogue(acc[j], channel);
}
