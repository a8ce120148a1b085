#version 450
// Winograd F(4,3), step 3 of 3: Y = A^T m A for each tile of each output channel, then bias and
// activation. The products m come from conv2d_gemm_1x1 (GROUPS = 36, one pixel per tile) as
// [36][O][N * tiles]; one invocation per tile (numbered as in conv2d_winograd_input) of channel z. Outputs
// past OH x OW (the last tile row and column may overhang) are not stored; with OW a multiple of 4
// each tile row is one vec4 store.
#extension GL_GOOGLE_include_directive : require
#include "conv2d_layout.glsl"
#include "winograd_f43.glsl"

void main() {
    const int tile_cols = (shape.OW + 3) / 4;
    const int tiles = (shape.OH + 3) / 4 * tile_cols;
    const int index = int(gl_GlobalInvocationID.x);
    if (index >= shape.N * tiles)
        return;
    const int o = int(gl_WorkGroupID.z);
    const int image = index / tiles;
    const int tile = index - image * tiles;
    const int in_base = o * shape.N * tiles + index;

    float t[4][6];  // A^T m, built one row of m at a time
    [[unroll]] for (int p = 0; p < 4; ++p)
        [[unroll]] for (int b = 0; b < 6; ++b)
            t[p][b] = 0.0;
    [[unroll]] for (int a = 0; a < 6; ++a) {
        float m[6];
        [[unroll]] for (int b = 0; b < 6; ++b)
            m[b] = texelFetch(x, in_base + (a * 6 + b) * shape.O * shape.N * tiles).x;
        [[unroll]] for (int p = 0; p < 4; ++p)
            if (AT[p][a] != 0.0)
                [[unroll]] for (int b = 0; b < 6; ++b)
                    t[p][b] = fma(AT[p][a], m[b], t[p][b]);
    }
    const int tile_row = tile / tile_cols;
    const int oy0 = 4 * tile_row, ox0 = 4 * (tile - tile_row * tile_cols);
    const int y_base = (image * shape.O + o) * shape.OH * shape.OW;
    [[unroll]] for (int p = 0; p < 4; ++p) {
        float r[4];
        [[unroll]] for (int q = 0; q < 4; ++q) {
            float s = 0.0;
            [[unroll]] for (int b = 0; b < 6; ++b)
                if (AT[q][b] != 0.0)
                    s = fma(AT[q][b], t[p][b], s);
            r[q] = epilogue(s, o);
        }
        if (oy0 + p >= shape.OH)
            break;
        const int row = y_base + (oy0 + p) * shape.OW + ox0;
        if ((shape.OW & 3) == 0) {  // whole, aligned rows of 4: one vec4 store
            y4[row / 4] = vec4(r[0], r[1], r[2], r[3]);
        } else {
            [[unroll]] for (int q = 0; q < 4; ++q)
                if (ox0 + q < shape.OW)
                    y[row + q] = r[q];
        }
    }
}
