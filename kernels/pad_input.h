// pad_input: each (batch, channel) plane into a zero-bordered HP x WP plane, input pixel (iy, ix)
// landing at (iy + PT, ix + PL); what lies past HP or WP is dropped. The convolution kernels read
// this copy without bounds checks, which lets CPU compilers vectorise their taps. Padded rows of
// all planes are numbered in one sequence; a PAD_LX x PAD_LY work-group covers a block of them:
// group x = row tile * wtiles + column tile. PAD_LX == 1 (CPU devices): one work-item per row.

KERNEL void pad_input(const GLOBAL float* RESTRICT x, GLOBAL float* RESTRICT xp, int H, int W, int HP, int WP,
                      int PT, int PL, int rows, int wtiles)
{
#if PAD_LX == 1
    // CPU devices: a work-item writes a whole padded row as three plain loops (zeros, the input
    // row, zeros), which compile to vector moves; wtiles is 1.
    const int row = GROUP_ID(0) * PAD_LY + (int)LOCAL_ID(1), plane = row / HP, iy = row - plane * HP - PT;
    if (row >= rows)
        return;
    const GLOBAL float* src = x + ((int64)plane * H + iy) * W - PL;
    GLOBAL float* dst = xp + (int64)row * WP;
    const int lo = min(PL, WP), hi = (unsigned)iy < (unsigned)H ? min(PL + W, WP) : lo;
    for (int xx = 0; xx < lo; ++xx)
        dst[xx] = 0.0f;
    for (int xx = lo; xx < hi; ++xx)
        dst[xx] = src[xx];
    for (int xx = hi; xx < WP; ++xx)
        dst[xx] = 0.0f;
#else
    const int rtile = GROUP_ID(0) / wtiles;
    const int row = rtile * PAD_LY + (int)LOCAL_ID(1), plane = row / HP, iy = row - plane * HP - PT;
    const INDEX_T xx = (INDEX_T)((GROUP_ID(0) - rtile * wtiles) * PAD_LX) + LOCAL_ID(0), ix = xx - PL;
    const bool inside = (unsigned)iy < (unsigned)H && ix >= 0 && ix < W;
    const GLOBAL float* src = x + ((int64)plane * H + iy) * W;
    if (xx < WP && row < rows)
        xp[(int64)row * WP + xx] = inside ? src[ix] : 0.0f;
#endif
}
