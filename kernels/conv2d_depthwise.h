// conv2d_depthwise: groups == C, out channel o reads input channel o / (O / C). One work-item per
// DW_VEC adjacent output pixels of a row: 1 on GPUs; 8 on CPU devices (OpenCL only), as one float8
// read per tap (a vload8, at stride 2 the even elements of two) times the broadcast weight. Kernel
// size, stride and dilation are compile-time so the taps unroll. The input is the padded copy
// (pad_input), so no tap is bounds-checked: work-items past the output read the last output row and
// block (and, in gathers, the last pixel) instead, so the copy spans the real outputs' reads only,
// whatever the stride (a vector read still spans whole 8-pixel blocks at strides 1 and 2). A DW_LX x DW_LY
// work-group covers a (DW_LX * DW_VEC) x DW_LY block of one output plane; group x = (plane *
// ohtiles + row tile) * owtiles + column tile, plane = batch * O + o.

KERNEL void conv2d_depthwise(
    const GLOBAL float* RESTRICT xp, const GLOBAL float* RESTRICT w, const GLOBAL float* RESTRICT bias,
    GLOBAL float* RESTRICT y, int C, int HP, int WP, int O, int OH, int OW, int owtiles, int ohtiles,
    float alpha, float beta)
{
    const int gx = GROUP_ID(0), rest = gx / owtiles, plane = rest / ohtiles;
    const INDEX_T ox = ((INDEX_T)((gx - rest * owtiles) * DW_LX) + LOCAL_ID(0)) * DW_VEC;
    const INDEX_T oy = (INDEX_T)((rest - plane * ohtiles) * DW_LY) + LOCAL_ID(1);
    const int n = plane / O, o = plane - n * O, c = o / (O / C);
    const INDEX_T ry = min(oy, (INDEX_T)(OH - 1)), rx = min(ox, (INDEX_T)((OW - 1) / DW_VEC * DW_VEC));
    const GLOBAL float* xc = xp + (int64)(n * C + c) * HP * WP + (int64)ry * STRIDE_H * WP + (int64)rx * STRIDE_W;
    const GLOBAL float* wo = w + o * (KSIZE_H * KSIZE_W);

#if DW_VEC == 8
    float8 acc = (float8)(0.0f);
#pragma unroll
    for (int kh = 0; kh < KSIZE_H; ++kh)
#pragma unroll
        for (int kw = 0; kw < KSIZE_W; ++kw) {
            const GLOBAL float* p = xc + kh * DIL_H * WP + kw * DIL_W;
#if STRIDE_W == 1
            const float8 v = vload8(0, p);
#elif STRIDE_W == 2
            const float8 v = vload8_stride2(p);
#else
            const int last = (int)(OW - 1 - rx);  // pixels past the row read its last one
            const float8 v = (float8)(p[0], p[min(1, last) * (int64)STRIDE_W], p[min(2, last) * (int64)STRIDE_W],
                                      p[min(3, last) * (int64)STRIDE_W], p[min(4, last) * (int64)STRIDE_W],
                                      p[min(5, last) * (int64)STRIDE_W], p[min(6, last) * (int64)STRIDE_W],
                                      p[min(7, last) * (int64)STRIDE_W]);
#endif
            acc = fma((float8)(wo[kh * KSIZE_W + kw]), v, acc);
        }
    if (oy < OH) {
        float out[8];
        vstore8(acc, 0, out);
        GLOBAL float* row = y + ((int64)plane * OH + oy) * OW + ox;
        for (int q = 0; q < 8 && ox + q < OW; ++q)
            row[q] = epilogue(out[q], bias[o], alpha, beta);
    }
#else
    float acc = 0.0f;
#pragma unroll
    for (int kh = 0; kh < KSIZE_H; ++kh)
#pragma unroll
        for (int kw = 0; kw < KSIZE_W; ++kw)
            acc += xc[kh * DIL_H * WP + kw * DIL_W] * wo[kh * KSIZE_W + kw];
    if (ox < OW && oy < OH)
        y[((int64)plane * OH + oy) * OW + ox] = epilogue(acc, bias[o], alpha, beta);
#endif
}
