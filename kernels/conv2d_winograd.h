// Winograd F(4,3) for 3x3 stride-1 layers, the two transform steps around the 36 GEMMs (which run as
// one grouped 1x1 layer of 36 groups: conv2d_gemm_1x1, or conv2d_cpu_gemm on CPU devices). The
// matrices are convbackends/backends/_winograd.py's B^T and A^T, written out (shaders/winograd_f43.glsl
// holds the same for Vulkan). The N images' 4x4 output tiles are numbered in one sequence,
// index = image * tiles + tile row * tile columns + tile column; V and M are [36][channel][TPS], TPS
// the GEMM's pixel count (N * tiles rounded up, so conv2d_cpu_gemm's 8-pixel blocks need no copy).

// out[a * os] = (B^T d)[a] for the 6 values d[i * ds].
DEVICE_FN void winograd_bt(const float* d, int ds, float* out, int os)
{
    const float d0 = d[0], d1 = d[ds], d2 = d[2 * ds], d3 = d[3 * ds], d4 = d[4 * ds], d5 = d[5 * ds];
    out[0] = 4.0f * d0 - 5.0f * d2 + d4;
    out[os] = -4.0f * d1 - 4.0f * d2 + d3 + d4;
    out[2 * os] = 4.0f * d1 - 4.0f * d2 - d3 + d4;
    out[3 * os] = -2.0f * d1 - d2 + 2.0f * d3 + d4;
    out[4 * os] = 2.0f * d1 - d2 - 2.0f * d3 + d4;
    out[5 * os] = 4.0f * d1 - 5.0f * d3 + d5;
}

// out[p * os] = (A^T m)[p] for the 6 values m[i * ms].
DEVICE_FN void winograd_at(const float* m, int ms, float* out, int os)
{
    const float m0 = m[0], m1 = m[ms], m2 = m[2 * ms], m3 = m[3 * ms], m4 = m[4 * ms], m5 = m[5 * ms];
    out[0] = m0 + m1 + m2 + m3 + m4;
    out[os] = m1 - m2 + 2.0f * (m3 - m4);
    out[2 * os] = m1 + m2 + 4.0f * (m3 + m4);
    out[3 * os] = m1 - m2 + 8.0f * (m3 - m4) + m5;
}

// V = B^T d B for tile index x (< TPS; past N * tiles the last tile again) of channel y. xp is the
// zero-padded input, HP >= 4 * tile rows + 2 and WP >= 4 * tile columns + 2: no tap is checked.
KERNEL void conv2d_winograd_input(const GLOBAL float* RESTRICT xp, GLOBAL float* RESTRICT v, int C, int HP, int WP,
                                  int tile_cols, int tiles, int pixels, int tps)
{
    const int index = (int)GLOBAL_ID_X, c = GROUP_ID(1);
    if (index >= tps)
        return;
    const int live = min(index, pixels - 1), image = live / tiles, tile = live - image * tiles;
    const int row = tile / tile_cols;
    const GLOBAL float* src = xp + ((int64)(image * C + c) * HP + 4 * row) * WP + 4 * (tile - row * tile_cols);
    float d[36], t[36], out[36];
#pragma unroll
    for (int i = 0; i < 6; ++i)
#pragma unroll
        for (int j = 0; j < 6; ++j)
            d[i * 6 + j] = src[i * WP + j];
#pragma unroll
    for (int j = 0; j < 6; ++j)
        winograd_bt(d + j, 6, t + j, 6);  // columns: t = B^T d
#pragma unroll
    for (int a = 0; a < 6; ++a)
        winograd_bt(t + a * 6, 1, out + a * 6, 1);  // rows: out = t B
    GLOBAL float* dst = v + (int64)c * tps + index;
#pragma unroll
    for (int ab = 0; ab < 36; ++ab)
        dst[(int64)ab * C * tps] = out[ab];
}

// y = A^T m A for tile index x of output channel y, then bias and activation; outputs past OH x OW
// (the last tile row and column may overhang) are not stored.
KERNEL void conv2d_winograd_output(const GLOBAL float* RESTRICT m, const GLOBAL float* RESTRICT bias,
                                   GLOBAL float* RESTRICT y, int O, int OH, int OW, int tile_cols, int tiles,
                                   int pixels, int tps, float alpha, float beta)
{
    const int index = (int)GLOBAL_ID_X, o = GROUP_ID(1);
    if (index >= pixels)
        return;
    const GLOBAL float* src = m + (int64)o * tps + index;
    float p[36], t[24], out[16];
#pragma unroll
    for (int ab = 0; ab < 36; ++ab)
        p[ab] = src[(int64)ab * O * tps];
#pragma unroll
    for (int b = 0; b < 6; ++b)
        winograd_at(p + b, 6, t + b, 6);  // columns: t = A^T m (4 x 6)
#pragma unroll
    for (int r = 0; r < 4; ++r)
        winograd_at(t + r * 6, 1, out + r * 4, 1);  // rows: out = t A (4 x 4)
    const int image = index / tiles, tile = index - image * tiles, row = tile / tile_cols;
    const int oy0 = 4 * row, ox0 = 4 * (tile - row * tile_cols);
    const float bv = bias[o];
    GLOBAL float* dst = y + ((int64)(image * O + o) * OH + oy0) * OW + ox0;
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q)
            if (oy0 + r < OH && ox0 + q < OW)
                dst[r * OW + q] = epilogue(out[r * 4 + q], bv, alpha, beta);
}
