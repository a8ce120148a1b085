// conv2d_cpu_gemm: the CPU-device (PoCL) form of conv2d_implicit_gemm and conv2d_gemm_1x1, OpenCL
// only. CPU drivers run a work-group as a loop over its work-items, so local tiles are a pure copy
// and each barrier splits that loop; here every work-item owns an 8 out-channel x 8 output-pixel
// block in eight float8 accumulators and reads A and B straight from global memory (the caches
// keep them), with no local memory. The 8 pixels are adjacent in one output row: at stride 1 each
// tap's input row is one unaligned vload8, at stride 2 the even elements of two vload8s, else eight
// loads. Only the first vec_owb blocks of a row take the vector reads: the rest (a ragged row's last
// block, whose vector would run past the row, and past the buffer on its last row) load their
// pixels one by one, so an unpadded input is read in place. Work-item x = ((batch * groups + group)
// * OH + row) * owb + 8-pixel block, y = channel block. Weights packed [group][ogpad / 8][kdim][8];
// ktab as in conv2d_implicit_gemm.

// KCHUNK: taps per pass. When it is shorter than K, a barrier after each pass makes the work-group
// loop finish a pass over all its work-items before the next, so that pass's slices of A and B stay
// in cache; with K in one pass the barrier would only split the loop, so there is none.
#if KCHUNK > 0
#define K_CHUNK_BARRIER() barrier(CLK_LOCAL_MEM_FENCE)
#else
#define K_CHUNK_BARRIER()
#undef KCHUNK
#define KCHUNK 0x7fffffff
#endif

// Taps [k0, k1) into acc. mode, a constant at each call: 1 and 2 read the 8 pixels' inputs as one
// vload8 or the even elements of two vload8s, 0 gathers them at offsets pix.
DEVICE_FN void accumulate_taps(float8 acc[8], const GLOBAL float* RESTRICT xg, const GLOBAL float* RESTRICT wg,
                               const GLOBAL int* RESTRICT ktab, int k0, int k1, const int mode, const int pix[8])
{
    for (int k = k0; k < k1; ++k) {
        const GLOBAL float* xk = xg + ktab[k];
        const float8 b = mode == 1 ? vload8(0, xk) : mode == 2 ? vload8_stride2(xk)
            : (float8)(xk[pix[0]], xk[pix[1]], xk[pix[2]], xk[pix[3]], xk[pix[4]], xk[pix[5]], xk[pix[6]], xk[pix[7]]);
        const GLOBAL float* a = wg + k * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i)
            acc[i] = fma((float8)(a[i]), b, acc[i]);
    }
}

KERNEL void conv2d_cpu_gemm(
    const GLOBAL float* RESTRICT x, const GLOBAL float* RESTRICT wp, const GLOBAL float* RESTRICT bias,
    const GLOBAL int* RESTRICT ktab, GLOBAL float* RESTRICT y,
    int C, int HP, int WP, int O, int OH, int OW, int SH, int SW, int groups, int kdim, int ogpad, int owb,
    int vec_owb, int nblocks, float alpha, float beta)
{
    // Work-items past the end compute a clamped block and store nothing: all must reach the barriers.
    const int og = O / groups, cg = C / groups;
    const int blk = min((int)get_global_id(0), nblocks - 1), m0 = (int)get_global_id(1) * 8;
    const int r = blk / owb, bx = blk - r * owb, ox0 = bx * 8, ng = r / OH, oy = r - ng * OH;
    const bool vector = bx < vec_owb;
    const int n = ng / groups, g = ng - n * groups;
    const GLOBAL float* xg = x + (int64)(n * C + g * cg) * HP * WP + oy * SH * WP + ox0 * SW;
    const GLOBAL float* wg = wp + ((int64)g * ogpad + m0) * kdim;

    float8 acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
        acc[i] = (float8)(0.0f);
    // Columns past the row end repeat its last pixel: valid reads, results not stored.
    int pix[8];
#pragma unroll
    for (int q = 0; q < 8; ++q)
        pix[q] = min(q, OW - 1 - ox0) * SW;
    for (int k0 = 0; k0 < kdim; k0 += KCHUNK) {
        const int k1 = min(k0 + KCHUNK, kdim);
        if (vector && SW == 1)
            accumulate_taps(acc, xg, wg, ktab, k0, k1, 1, pix);
        else if (vector && SW == 2)
            accumulate_taps(acc, xg, wg, ktab, k0, k1, 2, pix);
        else
            accumulate_taps(acc, xg, wg, ktab, k0, k1, 0, pix);
        K_CHUNK_BARRIER();
    }
    if ((int)get_global_id(0) >= nblocks || m0 >= og)
        return;
    const int valid = min(8, OW - ox0);
    for (int i = 0; i < 8; ++i) {
        if (m0 + i >= og)
            break;
        const float bv = bias[g * og + m0 + i];
        GLOBAL float* row = y + ((int64)(n * O + g * og + m0 + i) * OH + oy) * OW + ox0;
        float out[8];
        vstore8(acc[i], 0, out);
#pragma unroll
        for (int q = 0; q < 8; ++q)
            if (q < valid)
                row[q] = epilogue(out[q], bv, alpha, beta);
    }
}
