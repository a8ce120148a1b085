// pad_input: each (batch, channel) plane into a zero-bordered HP x WP plane, input pixel (iy, ix)
// landing at (iy + PT, ix + PL); what lies past HP or WP is dropped. The convolution kernels read
// this copy without bounds checks, which lets CPU compilers vectorise their taps. Padded rows of
// all planes are numbered in one sequence; a PAD_LX x PAD_LY work-group covers a block of them:
// group x = row tile * wtiles + column tile.

KERNEL void pad_input(const GLOBAL float* RESTRICT x, GLOBAL float* RESTRICT xp, int H, int W, int HP, int WP,
                      int PT, int PL, int rows, int wtiles)
{
    const int rtile = GROUP_ID(0) / wtiles;
    const int row = rtile * PAD_LY + (int)LOCAL_ID(1), plane = row / HP, iy = row - plane * HP - PT;
    const INDEX_T xx = (INDEX_T)((GROUP_ID(0) - rtile * wtiles) * PAD_LX) + LOCAL_ID(0), ix = xx - PL;
    const bool inside = (unsigned)iy < (unsigned)H && ix >= 0 && ix < W;
    const GLOBAL float* src = x + ((int64)plane * H + iy) * W;
    if (xx < WP && row < rows)
        xp[(int64)row * WP + xx] = inside ? src[ix] : 0.0f;
}
