// conv2d_gemm_1x1: a 1x1, stride-1, unpadded convolution is a plain GEMM per (batch, group):
// B is the input's channel-by-pixel matrix, read directly. Same grid as conv2d_implicit_gemm.

KERNEL void conv2d_gemm_1x1(
    const GLOBAL float* RESTRICT x, const GLOBAL float* RESTRICT wp, const GLOBAL float* RESTRICT bias,
    GLOBAL float* RESTRICT y, int C, int O, int npix, int groups, int kpad, int ogpad, int ptiles,
    float alpha, float beta)
{
    LOCAL_MEM float as[TK * TM];
    LOCAL_MEM float bs[TK * TN];
    const INDEX_T tx = LOCAL_ID(0), ty = LOCAL_ID(1), tid = ty * (TN / WN) + tx;
    const int ng = GROUP_ID(0) / ptiles, n = ng / groups, g = ng - n * groups;
    const int p0 = (GROUP_ID(0) - ng * ptiles) * TN, m0 = GROUP_ID(1) * TM;
    const int og = O / groups, cg = C / groups;

    const INDEX_T c = tid % (TN / BC) * BC, row = tid / (TN / BC);
    const GLOBAL float* xg = x + (int64)(n * C + g * cg) * npix + p0 + c;
    const GLOBAL float* wg = wp + (int64)g * kpad * ogpad + m0;

    float acc[WM][WN];
    gemm_clear(acc);

    for (int k0 = 0; k0 < kpad; k0 += TK) {
        gemm_load_a(as, wg + (int64)k0 * ogpad, ogpad, tid);
        LOCAL float* dst = bs + row * TN + c;
        const GLOBAL float* src = xg + (int64)(k0 + row) * npix;
#pragma unroll
        for (int j = 0; j < TK / BROWS; ++j) {
            const bool krow = k0 + row + j * BROWS < cg;
#pragma unroll
            for (int q = 0; q < BC; ++q)
                dst[j * BROWS * TN + q] = (krow && p0 + c + q < npix) ? src[(int64)j * BROWS * npix + q] : 0.0f;
        }
        BARRIER();
        gemm_accumulate(as, bs, acc, tx, ty);
        BARRIER();
    }
    gemm_store(acc, y + (int64)(n * O + g * og) * npix, bias + g * og, m0 + ty * WM, p0 + tx * WN, og, npix, alpha, beta);
}
