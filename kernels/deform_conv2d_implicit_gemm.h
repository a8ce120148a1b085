// deform_conv2d_implicit_gemm: the forward on GPUs as one tiled GEMM per (image, weight group) over
// K = (c, tap), the bilinear samples computed as the B tile is loaded (no column buffer), so each
// sample serves the work-group's TM out-channels. The GEMM core is gemm_tile.h's and the weights are
// packed as for conv2d_implicit_gemm ([group][KPAD][OGPAD], k = c * taps + tap).
// Group x = (image * groups + group) * ptiles + pixel tile, group y = out-channel tile.

KERNEL void deform_conv2d_implicit_gemm(
    const GLOBAL float* RESTRICT x, const GLOBAL float* RESTRICT offset, const GLOBAL float* RESTRICT mask,
    const GLOBAL float* RESTRICT wp, const GLOBAL float* RESTRICT bias, GLOBAL float* RESTRICT y,
    DEFORM_GEOMETRY_ARGS, int kdim, int kpad, int ogpad, int ptiles, float alpha, float beta)
{
    LOCAL_MEM float as[TK * TM];
    LOCAL_MEM float bs[TK * TN];
    const DeformGeometry d = DEFORM_GEOMETRY;
    const INDEX_T tx = LOCAL_ID(0), ty = LOCAL_ID(1), tid = ty * (TN / WN) + tx;
    const int ng = GROUP_ID(0) / ptiles, n = ng / groups, gw = ng - n * groups;
    const int pt0 = (GROUP_ID(0) - ng * ptiles) * TN, m0 = GROUP_ID(1) * TM;
    const int og = O / groups;
    // This work-item samples BC adjacent output pixels' columns of every B tile, rows row + j * BROWS.
    const INDEX_T c = tid % (TN / BC) * BC, row = tid / (TN / BC);
    const GLOBAL float* wg = wp + (int64)gw * kpad * ogpad + m0;

    float acc[WM][WN];
    gemm_clear(acc);

    for (int k0 = 0; k0 < kpad; k0 += TK) {
        gemm_load_a(as, wg + (int64)k0 * ogpad, ogpad, tid);
#pragma unroll
        for (int j = 0; j < TK / BROWS; ++j) {
            const int k = k0 + (int)row + j * BROWS, cl = k / d.taps, tap = k - cl * d.taps;
            const int ch = gw * d.cg + cl, g = ch / d.cpg;
            const GLOBAL float* plane = x + (int64)(n * C + ch) * H * W;
            LOCAL float* dst = bs + (row + j * BROWS) * TN + c;
#pragma unroll
            for (int q = 0; q < BC; ++q) {
                const int p = pt0 + (int)c + q;
                float v = 0.0f;
                if (k < kdim && p < d.npix) {
                    float py, px, m;
                    deform_point(offset, mask, &d, n, g, tap, p, &py, &px, &m);
                    const DeformCorners s = deform_corners(py, px, H, W);
                    v = m * deform_sample(plane, &s);
                }
                dst[q] = v;
            }
        }
        BARRIER();
        gemm_accumulate(as, bs, acc, tx, ty);
        BARRIER();
    }
    gemm_store(acc, y + (int64)(n * O + gw * og) * d.npix, bias + gw * og, m0 + ty * WM, pt0 + tx * WN, og, d.npix,
               alpha, beta);
}
