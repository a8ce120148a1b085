// The GEMM both GEMM-shaped conv2d shaders share: Y[o, p] = sum_k W[k, o] * X[k, p] per (image, group),
// each invocation holding a TM x TN register tile of output channels x output pixels.
//
// STAGE (GPUs): a work group computes a BM x BN tile; each K step stages BK x BM weights and BK x BN
// inputs in shared memory, channels spread over gl_LocalInvocationID.y and pixels over .x. The
// including shader defines, before this file:
//   void setup_pixels(int first_pixel, int npix)   state for the invocation's TN pixel slots
//   float load_input(int x_base, int k, int slot)  X[k, pixel of slot]
// Direct (CPU devices): the including shader defines TAP_ROWS (input rows per weight block: KH, or
// several input channels for 1x1) and walks the blocks itself, calling fetch_weights() and
// accumulate() once per block.
#ifndef CONV2D_GEMM_TILES_GLSL
#define CONV2D_GEMM_TILES_GLSL

#extension GL_KHR_shader_subgroup_shuffle : require

const int LX = int(gl_WorkGroupSize.x);
const int LY = int(gl_WorkGroupSize.y);
const int BM = TM * LY;
const int BN = TN * LX;

shared float w_tile[STAGE ? BK * BM : 1];
shared float x_tile[STAGE ? BK * BN : 1];

float acc[TM][TN];

void clear_tile() {
    [[unroll]] for (int i = 0; i < TM; ++i)
        [[unroll]] for (int j = 0; j < TN; ++j)
            acc[i][j] = 0.0;
}

// Direct path weights are packed [group][channel tile][c][KH*KW][TM]: blocks of TAP_ROWS*KW*TM floats.
// Lane l fetches vec4s l, l + LX, ... of a block; shuffles hand them to every lane.
const int BLOCK4 = STAGE ? 1 : TAP_ROWS * KW * TM / 4;
const int LANE_FETCHES = (BLOCK4 + LX - 1) / LX;
vec4 lane_w[LANE_FETCHES];

void fetch_weights(int block4) {
    [[unroll]] for (int f = 0; f < LANE_FETCHES; ++f)
        lane_w[f] = texelFetch(w4, block4 + f * LX + int(gl_SubgroupInvocationID));
}

// Direct path input: one row segment per tap row, SPAN floats used of ROW4 vec4s fetched.
const int SPAN = (TN - 1) * SW + (KW - 1) * DW + 1;
const int ROW4 = (SPAN + 3) / 4;

// rows' type must be spelled with the named constants, as at the call site: an array type built from a
// repeated spec-constant expression is a distinct type, and Mesa 22.3's llvmpipe miscompiles the call.
// acc += W[block] (x) rows over every kernel tap, one accumulator at a time so that it stays in a
// register across its TAP_ROWS * KW taps (on llvmpipe the tile does not fit the register file).
void accumulate(vec4 rows[TAP_ROWS][ROW4]) {
    [[unroll]] for (int q = 0; q < TM / 4; ++q) {
        vec4 wq[TAP_ROWS * KW];
        [[unroll]] for (int tap = 0; tap < TAP_ROWS * KW; ++tap) {
            const int index = tap * (TM / 4) + q;
            wq[tap] = subgroupShuffle(lane_w[index / LX], index % LX);
        }
        [[unroll]] for (int e = 0; e < 4; ++e)
            [[unroll]] for (int j = 0; j < TN; ++j) {
                float a = acc[4 * q + e][j];
                [[unroll]] for (int r = 0; r < TAP_ROWS; ++r)
                    [[unroll]] for (int s = 0; s < KW; ++s) {
                        const int col = j * SW + s * DW;
                        a = fma(wq[r * KW + s][e], rows[r][col / 4][col % 4], a);
                    }
                acc[4 * q + e][j] = a;
            }
    }
}

// Write acc row i to channel m0 + i * LY + ty of the group; column j to pixel[j] where live[j].
void store_tile(int image, int group, int m0, int pixel[TN], bool live[TN]) {
    const int og = shape.O / shape.GROUPS;
    const int npix = shape.OH * shape.OW;
    [[unroll]] for (int i = 0; i < TM; ++i) {
        const int o = m0 + i * LY + int(gl_LocalInvocationID.y);
        if (o >= og)
            continue;
        const int channel = group * og + o;
        const int y_base = (image * shape.O + channel) * npix;
        [[unroll]] for (int j = 0; j < TN; ++j)
            if (live[j])
                y[y_base + pixel[j]] = epilogue(acc[i][j], channel);
    }
}

// Direct paths: the TN outputs of each row are consecutive pixels first, first + 1, ..., `valid` of
// them live. A whole, 16-byte aligned run goes out as TN / 4 vec4 stores.
void store_run(int image, int group, int m0, int first, int valid) {
    const int og = shape.O / shape.GROUPS;
    const int npix = shape.OH * shape.OW;
    [[unroll]] for (int i = 0; i < TM; ++i) {
        const int o = m0 + i;
        if (o >= og)
            continue;
        const int channel = group * og + o;
        const int base = (image * shape.O + channel) * npix + first;
        if (valid == TN && (base & 3) == 0) {
            [[unroll]] for (int q = 0; q < TN / 4; ++q)
                y4[base / 4 + q] = vec4(epilogue(acc[i][4 * q], channel), epilogue(acc[i][4 * q + 1], channel),
                                        epilogue(acc[i][4 * q + 2], channel), epilogue(acc[i][4 * q + 3], channel));
        } else {
            [[unroll]] for (int j = 0; j < TN; ++j)
                if (j < valid)
                    y[base + j] = epilogue(acc[i][j], channel);
        }
    }
}

void staged_gemm(int image, int group, int K) {
    const int tx = int(gl_LocalInvocationID.x);
    const int ty = int(gl_LocalInvocationID.y);
    const int cg = shape.C / shape.GROUPS;
    const int npix = shape.OH * shape.OW;
    const int m0 = int(gl_WorkGroupID.y) * BM;
    const int n0 = int(gl_WorkGroupID.x) * BN;
    const int x_base = (image * shape.C + group * cg) * shape.PS;
    const int w_base = group * ((K + BK - 1) / BK * BK) * shape.OGP;
    setup_pixels(n0 + tx, npix);
    clear_tile();

    for (int k0 = 0; k0 < K; k0 += BK) {
        // Packed weights [group][k][OGP] are zero-padded to whole BK x BM tiles: no bounds checks here.
        for (int e = ty * LX + tx; e < BK * BM; e += LX * LY) {
            const int kk = e / BM;
            w_tile[e] = texelFetch(w, w_base + (k0 + kk) * shape.OGP + m0 + e - kk * BM).x;
        }
        for (int kk = ty; kk < BK; kk += LY) {
            const bool inside = k0 + kk < K;
            [[unroll]] for (int j = 0; j < TN; ++j)
                x_tile[kk * BN + j * LX + tx] = inside ? load_input(x_base, k0 + kk, j) : 0.0;
        }
        barrier();
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM];
            float v[TN];
            [[unroll]] for (int i = 0; i < TM; ++i)
                a[i] = w_tile[kk * BM + i * LY + ty];
            [[unroll]] for (int j = 0; j < TN; ++j)
                v[j] = x_tile[kk * BN + j * LX + tx];
            [[unroll]] for (int i = 0; i < TM; ++i)
                [[unroll]] for (int j = 0; j < TN; ++j)
                    acc[i][j] = fma(a[i], v[j], acc[i][j]);
        }
        barrier();
    }

    int pixel[TN];
    bool live[TN];
    [[unroll]] for (int j = 0; j < TN; ++j) {
        pixel[j] = n0 + j * LX + tx;
        live[j] = pixel[j] < npix;
    }
    store_tile(image, group, m0, pixel, live);
}

#endif
