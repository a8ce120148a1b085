// sparse_conv3d_implicit_gemm: the GPU compute of sparse_conv3d, output-stationary over the rulebook's
// neighbour map nbr (n_out, K): Y[r][m] = bias[m] + sum over taps t and channels c of
// X[nbr[r][t]][c] * W[t][c][m], an implicit GEMM whose K dimension is (tap, channel) and whose B tile
// gathers input rows through nbr (a missing neighbour reads zeros). Each output element is summed by
// one work-item in tap and channel order, so results do not depend on scheduling (no atomics); each
// tap's products are summed apart and then added to the total (as the numpy backend's per-tap GEMMs
// do), so rounding errors grow with C + K, not C * K.
// The tiles are gemm_tile.h's: a work-group computes TM out-channels x TN output rows. Weights are
// packed [K][cpad][ogpad], cpad = C rounded up to TK, zero padded. A tap no row of the group's TN
// reads is skipped as a whole: on LiDAR data, neighbouring rows share most of their taps.

KERNEL void sparse_conv3d_implicit_gemm(const GLOBAL float* RESTRICT x, const GLOBAL int* RESTRICT nbr,
                                        const GLOBAL float* RESTRICT w, const GLOBAL float* RESTRICT bias,
                                        GLOBAL float* RESTRICT y, int n_out, int c, int o, int taps, int cpad,
                                        int ogpad, float alpha, float beta)
{
    LOCAL_MEM float as[TK * TM];
    LOCAL_MEM float bs[TK * TN];
    LOCAL_MEM int rows[TN];
    // Whether some row of the group reads tap t, in used[t % 3]: the entry for tap t + 1 is cleared
    // before tap t's barrier, when every work-item has read it for tap t - 2 and none sets it yet.
    LOCAL_MEM int used[3];
    const INDEX_T tx = LOCAL_ID(0), ty = LOCAL_ID(1), tid = ty * (TN / WN) + tx;
    const int r0 = GROUP_ID(0) * TN, m0 = GROUP_ID(1) * TM;
    float acc[WM][WN];
    gemm_clear(acc);
    if (tid == 0)
        used[0] = used[1] = 0;
    BARRIER();
    for (int t = 0; t < taps; ++t) {
        for (INDEX_T i = tid; i < TN; i += NT) {
            const int s = r0 + i < n_out ? nbr[(int64)(r0 + i) * taps + t] : -1;
            rows[i] = s;
            if (s >= 0)
                used[t % 3] = 1;  // every writer writes the same value
        }
        if (tid == 0)
            used[(t + 1) % 3] = 0;
        BARRIER();
        if (!used[t % 3])
            continue;  // the same for the whole group
        float part[WM][WN];
        gemm_clear(part);
        for (int c0 = 0; c0 < cpad; c0 += TK) {
            gemm_load_a(as, w + ((int64)t * cpad + c0) * ogpad + m0, ogpad, tid);
            // B[kk][n] = X[rows[n]][c0 + kk]: consecutive work-items read consecutive channels of a row.
            for (INDEX_T e = tid; e < TK * TN; e += NT) {
                const INDEX_T kk = e % TK, n = e / TK;
                const int s = rows[n], ch = c0 + (int)kk;
                bs[kk * TN + n] = s >= 0 && ch < c ? x[(int64)s * c + ch] : 0.0f;
            }
            BARRIER();
            gemm_accumulate(as, bs, part, tx, ty);
            BARRIER();
        }
#pragma unroll
        for (int i = 0; i < WM; ++i)
#pragma unroll
            for (int j = 0; j < WN; ++j)
                acc[i][j] += part[i][j];
    }
#pragma unroll
    for (int i = 0; i < WM; ++i) {
        const int m = m0 + (int)ty * WM + i;
        if (m >= o)
            break;
        const float bv = bias[m];
#pragma unroll
        for (int j = 0; j < WN; ++j) {
            const int r = r0 + (int)tx * WN + j;
            if (r < n_out)
                y[(int64)r * o + m] = epilogue(acc[i][j], bv, alpha, beta);
        }
    }
}
