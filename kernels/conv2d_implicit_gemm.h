// conv2d_implicit_gemm: any kernel size, stride, dilation, pads and groups as one tiled GEMM per
// (batch, group), K = (c, kh, kw). The input tile is gathered on the fly (no im2col buffer) from
// the zero-padded input (pad_input, or x itself when unpadded), so taps need no bounds checks.
// ktab[k] is tap k's element offset c*HP*WP + kh*dh*WP + kw*dw; rows past K read as zero.
// Group x = (batch*groups + group) * ptiles + pixel tile, group y = out-channel tile.

KERNEL void conv2d_implicit_gemm(
    const GLOBAL float* RESTRICT x, const GLOBAL float* RESTRICT wp, const GLOBAL float* RESTRICT bias,
    const GLOBAL int* RESTRICT ktab, GLOBAL float* RESTRICT y,
    int C, int HP, int WP, int O, int OW, int npix, int SH, int SW,
    int groups, int kdim, int kpad, int ogpad, int ptiles, float alpha, float beta)
{
    LOCAL_MEM float as[TK * TM];
    LOCAL_MEM float bs[TK * TN];
    const INDEX_T tx = LOCAL_ID(0), ty = LOCAL_ID(1), tid = ty * (TN / WN) + tx;
    const int ng = GROUP_ID(0) / ptiles, n = ng / groups, g = ng - n * groups;
    const int p0 = (GROUP_ID(0) - ng * ptiles) * TN, m0 = GROUP_ID(1) * TM;
    const int og = O / groups, cg = C / groups;

    // This work-item gathers BC adjacent output pixels' columns of every B tile, rows row + j * BROWS.
    const INDEX_T c = tid % (TN / BC) * BC, row = tid / (TN / BC);
    INDEX_T pix[BC];
#pragma unroll
    for (int q = 0; q < BC; ++q) {
        const INDEX_T p = p0 + c + q, oy = p / OW;
        pix[q] = p < npix ? oy * SH * WP + (p - oy * OW) * SW : 0;
    }
    const GLOBAL float* xg = x + (int64)(n * C + g * cg) * HP * WP;
    const GLOBAL float* wg = wp + (int64)g * kpad * ogpad + m0;

    float acc[WM][WN];
    gemm_clear(acc);

    for (int k0 = 0; k0 < kpad; k0 += TK) {
        gemm_load_a(as, wg + (int64)k0 * ogpad, ogpad, tid);
#pragma unroll
        for (int j = 0; j < TK / BROWS; ++j) {
            const int k = k0 + row + j * BROWS;
            const int off = ktab[k];
            LOCAL float* dst = bs + (row + j * BROWS) * TN + c;
#pragma unroll
            for (int q = 0; q < BC; ++q)
                dst[q] = k < kdim ? xg[pix[q] + off] : 0.0f;
        }
        BARRIER();
        gemm_accumulate(as, bs, acc, tx, ty);
        BARRIER();
    }
    gemm_store(acc, y + (int64)(n * O + g * og) * npix, bias + g * og, m0 + ty * WM, p0 + tx * WN, og, npix, alpha, beta);
}
