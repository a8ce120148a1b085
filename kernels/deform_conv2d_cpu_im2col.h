// deform_conv2d on CPU devices (PoCL), OpenCL only: point-major columns from a channels-last copy, then a
// GEMM with the weights as its vector operand.
//
// deform_conv2d_channels_last copies the chunk channels-last with a zero border (one pixel, two rows at
// the bottom), so every cell that touches the image lies inside the copy and a point that reads nothing
// reads a cell of zeros below the image: no per-corner tests, the same values (a corner outside the image
// weighs a zero). A point's four corners are then four runs of its offset group's channels.
//
// deform_conv2d_cpu_im2col writes each tile point's columns as one row, cols[q][tap * C + c] for tile
// point q = tile image * P + tile pixel: the corner runs blended as float8s and stored as they come.
// (NCHW corner gathers cost four scalar loads a sample, and pixel-major rows need a transpose: both
// measured several times slower.)
//
// deform_conv2d_cpu_gemm: y[q][o] = sum over (tap, c) of cols[q][tap * C + c] w[o][c][tap], per weight
// group. A work-item holds PTS points x OB out-channels in float16 accumulators (OB / 16 per point): the
// weights, packed [group][OB-channel block][tap][c][OB], are the vector loads and each column value a
// broadcast, so a step is 2 vector loads and PTS broadcasts for 2 * PTS FMAs. Bias and the activation on
// the way out, straight into y.

#define OB 32
#define BORDERED_H(H) ((H) + 3)
#define BORDERED_W(W) ((W) + 2)

// xb[n][r][q][c] = x[n][c][r - 1][q - 1] inside the image, else 0. Work-item x: bordered column q,
// y: n * BORDERED_H + r.
KERNEL void deform_conv2d_channels_last(const GLOBAL float* RESTRICT x, GLOBAL float* RESTRICT xb, int C, int H,
                                        int W)
{
    const int q = (int)get_global_id(0), row = (int)get_global_id(1), hb = BORDERED_H(H), wb = BORDERED_W(W);
    const int n = row / hb, r = row - n * hb, iy = r - 1, ix = q - 1;
    if (q >= wb)
        return;
    GLOBAL float* dst = xb + ((int64)row * wb + q) * C;
    const bool inside = iy >= 0 && iy < H && ix >= 0 && ix < W;
    const GLOBAL float* src = x + (int64)n * C * H * W + (inside ? iy * W + ix : 0);
    for (int c = 0; c < C; ++c)
        dst[c] = inside ? src[(int64)c * H * W] : 0.0f;
}

// Work-item x: tile pixel, y: tile image * G + offset group. n indexes xb (the chunk's copy), offset and
// mask absolutely.
KERNEL void deform_conv2d_cpu_im2col(const GLOBAL float* RESTRICT xb, const GLOBAL float* RESTRICT offset,
                                     const GLOBAL float* RESTRICT mask, GLOBAL float* RESTRICT cols,
                                     DEFORM_GEOMETRY_ARGS)
{
    const DeformGeometry d = DEFORM_GEOMETRY;
    const int pl = (int)get_global_id(0), ng = (int)get_global_id(1), nl = ng / G, g = ng - nl * G, n = n0 + nl;
    if (pl >= P)
        return;
    const int hb = BORDERED_H(H), wb = BORDERED_W(W), cpg = d.cpg;
    const GLOBAL float* image = xb + (int64)n * hb * wb * C + g * cpg;
    const int64 nowhere = (int64)(H + 1) * wb * C;  // a cell of zeros: bordered rows H + 1 and H + 2
    GLOBAL float* out = cols + (int64)(nl * P + pl) * d.taps * C + g * cpg;
    for (int k = 0; k < d.taps; ++k) {
        float py, px, m;
        deform_point(offset, mask, &d, n, g, k, p0 + pl, &py, &px, &m);
        const bool inside = py > -1.0f && py < (float)H && px > -1.0f && px < (float)W;
        const float cy = floor(inside ? py : 0.0f), cx = floor(inside ? px : 0.0f);
        const float fy = inside ? py - cy : 0.0f, fx = inside ? px - cx : 0.0f;
        const GLOBAL float* top = image + (inside ? (((int)cy + 1) * wb + (int)cx + 1) * (int64)C : nowhere);
        const GLOBAL float* bottom = top + (int64)wb * C;
        const float w00 = (1.0f - fy) * (1.0f - fx), w01 = (1.0f - fy) * fx, w10 = fy * (1.0f - fx), w11 = fy * fx;
        const float scale = isnan(py) || isnan(px) ? DEFORM_NAN : m;
        GLOBAL float* dst = out + k * C;
        int cl = 0;
        for (; cl + 8 <= cpg; cl += 8) {
            const float8 v = w00 * vload8(0, top + cl) + w01 * vload8(0, top + C + cl)
                + w10 * vload8(0, bottom + cl) + w11 * vload8(0, bottom + C + cl);
            vstore8(scale * v, 0, dst + cl);
        }
        for (; cl < cpg; ++cl)
            dst[cl] = scale * (w00 * top[cl] + w01 * top[C + cl] + w10 * bottom[cl] + w11 * bottom[C + cl]);
    }
}

// Work-item x: block of PTS tile points, y: weight group * oblocks + OB-channel block. cols holds whole
// blocks (rows past the tile's `points` are read, their results dropped).
KERNEL void deform_conv2d_cpu_gemm(const GLOBAL float* RESTRICT cols, const GLOBAL float* RESTRICT wp,
                                   const GLOBAL float* RESTRICT bias, GLOBAL float* RESTRICT y,
                                   DEFORM_GEOMETRY_ARGS, int oblocks, float alpha, float beta)
{
    const DeformGeometry d = DEFORM_GEOMETRY;
    const int block = (int)get_global_id(0), row = (int)get_global_id(1), g = row / oblocks, ob = row - g * oblocks;
    const int points = nb * P, q0 = block * PTS;
    if (q0 >= points || g >= groups)
        return;
    const int kdim = d.taps * C, og = O / groups;
    const GLOBAL float* a = cols + (int64)q0 * kdim + g * d.cg;
    const GLOBAL float* wt = wp + (int64)(g * oblocks + ob) * d.taps * d.cg * OB;
    float16 lo[PTS], hi[PTS];
#pragma unroll
    for (int i = 0; i < PTS; ++i)
        lo[i] = hi[i] = (float16)(0.0f);
    for (int k = 0; k < d.taps; ++k) {
        const GLOBAL float* ak = a + k * C;
        for (int c = 0; c < d.cg; ++c, wt += OB) {
            const float16 w0 = vload16(0, wt), w1 = vload16(1, wt);
#pragma unroll
            for (int i = 0; i < PTS; ++i) {
                const float16 v = (float16)(ak[(int64)i * kdim + c]);
                lo[i] = fma(v, w0, lo[i]);
                hi[i] = fma(v, w1, hi[i]);
            }
        }
    }
    const int live = min(PTS, points - q0);
#pragma unroll
    for (int i = 0; i < PTS; ++i) {
        if (i >= live)
            continue;
        const int q = q0 + i, nl = q / P;
        GLOBAL float* dst = y + ((int64)(n0 + nl) * O + g * og + ob * OB) * d.npix + p0 + q - nl * P;
        float values[OB];
        vstore16(lo[i], 0, values);
        vstore16(hi[i], 1, values);
        const int channels = min(OB, og - ob * OB);
        for (int o = 0; o < channels; ++o)
            dst[(int64)o * d.npix] = epilogue(values[o], bias[g * og + ob * OB + o], alpha, beta);
    }
}
