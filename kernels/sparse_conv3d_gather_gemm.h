// sparse_conv3d_gather_gemm: the GPU compute of sparse_conv3d, a gather -> GEMM -> scatter pass per
// kernel tap over the rulebook's pair lists: Y[out_rows[p]] += X[in_rows[p]] W_t for tap t's pairs.
// Within a tap each output row appears once, so no two work-items of a pass write one row; the passes
// run in tap order, one launch each, so each output is summed in tap order on every run (no atomics),
// each tap's products apart before they join it (errors grow with C + K, not C * K). Only the
// rulebook's pairs are multiplied. Y starts at zero; sparse_conv3d_epilogue then adds the bias and
// applies the activation. The tiles are gemm_tile.h's: a work-group computes TM out-channels x TN
// pairs; weights packed [K][cpad][ogpad], cpad = C rounded up to TK, zero padded.

KERNEL void sparse_conv3d_gather_gemm(const GLOBAL float* RESTRICT x, const GLOBAL int* RESTRICT in_rows,
                                      const GLOBAL int* RESTRICT out_rows, const GLOBAL float* RESTRICT w,
                                      GLOBAL float* RESTRICT y, int first, int count, int tap, int c, int o,
                                      int cpad, int ogpad)
{
    LOCAL_MEM float as[TK * TM];
    LOCAL_MEM float bs[TK * TN];
    LOCAL_MEM int rows[TN];
    const INDEX_T tx = LOCAL_ID(0), ty = LOCAL_ID(1), tid = ty * (TN / WN) + tx;
    const int p0 = GROUP_ID(0) * TN, m0 = GROUP_ID(1) * TM;
    for (INDEX_T i = tid; i < TN; i += NT)
        rows[i] = p0 + i < count ? in_rows[first + p0 + i] : -1;
    BARRIER();
    float acc[WM][WN];
    gemm_clear(acc);
    for (int c0 = 0; c0 < cpad; c0 += TK) {
        gemm_load_a(as, w + ((int64)tap * cpad + c0) * ogpad + m0, ogpad, tid);
        // B[kk][n] = X[rows[n]][c0 + kk]: consecutive work-items read consecutive channels of a row.
        for (INDEX_T e = tid; e < TK * TN; e += NT) {
            const INDEX_T kk = e % TK, n = e / TK;
            const int s = rows[n], ch = c0 + (int)kk;
            bs[kk * TN + n] = s >= 0 && ch < c ? x[(int64)s * c + ch] : 0.0f;
        }
        BARRIER();
        gemm_accumulate(as, bs, acc, tx, ty);
        BARRIER();
    }
#pragma unroll
    for (int j = 0; j < WN; ++j) {
        const int p = p0 + (int)tx * WN + j;
        if (p >= count)
            break;
        GLOBAL float* row = y + (int64)out_rows[first + p] * o;
#pragma unroll
        for (int i = 0; i < WM; ++i) {
            const int m = m0 + (int)ty * WM + i;
            if (m < o)
                row[m] += acc[i][j];
        }
    }
}

KERNEL void sparse_conv3d_epilogue(GLOBAL float* RESTRICT y, const GLOBAL float* RESTRICT bias, int o, int64 total,
                                   float alpha, float beta)
{
    const int64 i = GLOBAL_ID_X;
    if (i < total)
        y[i] = epilogue(y[i], bias[i % o], alpha, beta);
}
