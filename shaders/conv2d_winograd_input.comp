#version 450
// Winograd F(4,3), step 1 of 3: V = B^T d B for each 6x6 input tile d of each channel. The N images'
// tiles are numbered in one sequence, image * tiles + tile row * tile columns + tile column; one
// invocation takes 4 consecutive ones of channel z, so that V is written as vec4s. The input is the
// zero-padded copy (HP >= 4 * tile rows + 2, WP >= 4 * tile columns + 4), so a tile row is two aligned
// vec4 fetches and nothing is bounds-checked; past the last tile the last one is recomputed into V's
// padding. V is [36][C][TPS]: 36 GEMM inputs of C x (N * tiles), as conv2d_gemm_1x1 reads one image
// of GROUPS = 36 and PS = TPS (a multiple of 4).
#extension GL_GOOGLE_include_directive : require
#include "conv2d_layout.glsl"
#include "winograd_f43.glsl"

// V of one tile: B^T d B.
void transform_tile(int base4, out float v[36]) {
    float d[6][6];
    [[unroll]] for (int i = 0; i < 6; ++i) {
        const vec4 lo = texelFetch(x4, base4 + i * shape.WP / 4);
        const vec4 hi = texelFetch(x4, base4 + i * shape.WP / 4 + 1);
        d[i][0] = lo.x; d[i][1] = lo.y; d[i][2] = lo.z; d[i][3] = lo.w; d[i][4] = hi.x; d[i][5] = hi.y;
    }
    float t[6][6];  // B^T d
    [[unroll]] for (int a = 0; a < 6; ++a)
        [[unroll]] for (int j = 0; j < 6; ++j) {
            float s = 0.0;
            [[unroll]] for (int i = 0; i < 6; ++i)
                if (BT[a][i] != 0.0)
                    s = fma(BT[a][i], d[i][j], s);
            t[a][j] = s;
        }
    [[unroll]] for (int a = 0; a < 6; ++a)
        [[unroll]] for (int b = 0; b < 6; ++b) {
            float s = 0.0;
            [[unroll]] for (int j = 0; j < 6; ++j)
                if (BT[b][j] != 0.0)
                    s = fma(BT[b][j], t[a][j], s);
            v[a * 6 + b] = s;
        }
}

void main() {
    const int tile_cols = (shape.OW + 3) / 4;
    const int tiles = (shape.OH + 3) / 4 * tile_cols;
    const int first = 4 * int(gl_GlobalInvocationID.x);
    if (first >= shape.N * tiles)
        return;
    const int c = int(gl_WorkGroupID.z);

    float v[4][36];
    [[unroll]] for (int k = 0; k < 4; ++k) {
        const int index = min(first + k, shape.N * tiles - 1);
        const int image = index / tiles;
        const int tile = index - image * tiles;
        const int tile_row = tile / tile_cols;
        const int plane = image * shape.C + c;
        transform_tile((plane * shape.PS + 4 * tile_row * shape.WP + 4 * (tile - tile_row * tile_cols)) / 4, v[k]);
    }
    const int out4 = (c * shape.TPS + first) / 4;
    [[unroll]] for (int ab = 0; ab < 36; ++ab)
        y4[out4 + ab * shape.C * shape.TPS / 4] = vec4(v[0][ab], v[1][ab], v[2][ab], v[3][ab]);
}
