// The tiled GEMM core shared by conv2d_implicit_gemm and conv2d_gemm_1x1, per (batch, group):
// Y[m][p] = sum_k A[k][m] * B[k][p], A the weights packed [group][KPAD][OGPAD] (zero padded to the
// tile, so A needs no bounds checks), B the input gathered by the kernel into local memory.
// Compile-time tile: TM out-channels x TN output pixels per work-group, TK deep; each work-item
// keeps a WM x WN register micro-tile of contiguous channels and pixels. Local size (TN/WN, TM/WM).
// AC and BC: how many contiguous elements of a row one work-item loads into the A and B tiles.

#define NT ((TM / WM) * (TN / WN))
// B-tile rows one pass of the work-group loads, each work-item taking BC adjacent columns.
#define BROWS (NT / (TN / BC))

DEVICE_FN void gemm_clear(float acc[WM][WN])
{
#pragma unroll
    for (int i = 0; i < WM; ++i)
#pragma unroll
        for (int j = 0; j < WN; ++j)
            acc[i][j] = 0.0f;
}

// One TK x TM slice of the packed weights into local memory; wk points at its first element.
// Each work-item copies runs of AC contiguous elements (AC = 1 coalesces).
DEVICE_FN void gemm_load_a(LOCAL float* as, const GLOBAL float* RESTRICT wk, int ogpad, INDEX_T tid)
{
    const INDEX_T c = tid % (TM / AC) * AC, row = tid / (TM / AC);
    LOCAL float* dst = as + row * TM + c;
    const GLOBAL float* src = wk + row * ogpad + c;
#pragma unroll
    for (int j = 0; j < TK / (NT / (TM / AC)); ++j)
#pragma unroll
        for (int q = 0; q < AC; ++q)
            dst[j * (NT / (TM / AC)) * TM + q] = src[j * (NT / (TM / AC)) * ogpad + q];
}

DEVICE_FN void gemm_accumulate(const LOCAL float* as, const LOCAL float* bs, float acc[WM][WN], INDEX_T tx, INDEX_T ty)
{
#pragma unroll
    for (int kk = 0; kk < TK; ++kk) {
        const LOCAL float* a = as + kk * TM + ty * WM;
        const LOCAL float* b = bs + kk * TN + tx * WN;
#pragma unroll
        for (int i = 0; i < WM; ++i)
#pragma unroll
            for (int j = 0; j < WN; ++j)
                acc[i][j] += a[i] * b[j];
    }
}

// y and bias point at this (batch, group)'s first output channel; m0/p0 at the micro-tile.
DEVICE_FN void gemm_store(float acc[WM][WN], GLOBAL float* RESTRICT y, const GLOBAL float* RESTRICT bias,
                          INDEX_T m0, INDEX_T p0, int og, int npix, float alpha, float beta)
{
#pragma unroll
    for (int i = 0; i < WM; ++i) {
        if (m0 + i >= og)
            break;
        const float bv = bias[m0 + i];
        GLOBAL float* row = y + (int64)(m0 + i) * npix;
#pragma unroll
        for (int j = 0; j < WN; ++j)
            if (p0 + j < npix)
                row[p0 + j] = epilogue(acc[i][j], bv, alpha, beta);
    }
}
