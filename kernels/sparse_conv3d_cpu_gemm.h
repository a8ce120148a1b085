// sparse_conv3d_cpu_gemm: the CPU-device (PoCL) compute of sparse_conv3d, OpenCL only: output-stationary
// over the rulebook's neighbour map nbr (n_out, K) (GPUs run sparse_conv3d_gather_gemm, a pass per tap).
// A work-item owns one output row and OB blocks of 8 output channels in float8 accumulators; it walks
// the row's taps in order and skips the ones the map marks -1, so it computes exactly the rulebook's
// pairs and sums each output in tap order (no atomics: the same bits on every run), with no local
// memory (a CPU runs a work-group as a loop over its work-items) and one store per output. The input
// row and the tap's weights are read straight from global memory (the caches keep them). Each tap's
// products are summed apart and then added to the row's total (as the numpy backend's per-tap GEMMs
// do): rounding errors grow with C + K, not C * K.
// Weights packed [K][ogpad / 8][C][8], zero padded. Work-item x = output row, y = group of OB blocks.

KERNEL void sparse_conv3d_cpu_gemm(const GLOBAL float* RESTRICT x, const GLOBAL int* RESTRICT nbr,
                                   const GLOBAL float* RESTRICT w, const GLOBAL float* RESTRICT bias,
                                   GLOBAL float* RESTRICT y, int n_out, int c, int o, int taps, int oblocks,
                                   float alpha, float beta)
{
    const int r = (int)get_global_id(0), b0 = (int)get_global_id(1) * OB;
    if (r >= n_out)
        return;
    float8 acc[OB];
#pragma unroll
    for (int q = 0; q < OB; ++q)
        acc[q] = (float8)(0.0f);
    const GLOBAL int* row = nbr + (int64)r * taps;
    for (int t = 0; t < taps; ++t) {
        const int s = row[t];
        if (s < 0)
            continue;
        const GLOBAL float* xs = x + (int64)s * c;
        const GLOBAL float* wt = w + ((int64)t * oblocks + b0) * c * 8;
        float8 part[OB];
#pragma unroll
        for (int q = 0; q < OB; ++q)
            part[q] = (float8)(0.0f);
        for (int ch = 0; ch < c; ++ch) {
            const float8 v = (float8)(xs[ch]);
#pragma unroll
            for (int q = 0; q < OB; ++q)
                part[q] = fma(v, vload8(0, wt + ((int64)q * c + ch) * 8), part[q]);
        }
#pragma unroll
        for (int q = 0; q < OB; ++q)
            acc[q] += part[q];
    }
    GLOBAL float* out = y + (int64)r * o;
#pragma unroll
    for (int q = 0; q < OB; ++q) {
        float lanes[8];
        vstore8(acc[q], 0, lanes);
        const int m0 = (b0 + q) * 8;
        for (int i = 0; i < 8 && m0 + i < o; ++i)
            out[m0 + i] = epilogue(lanes[i], bias[m0 + i], alpha, beta);
    }
}
