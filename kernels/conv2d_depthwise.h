// conv2d_depthwise: groups == C, out channel o reads input channel o / (O / C). One work-item per
// output pixel; kernel size, stride and dilation are compile-time so the taps unroll. The input
// is the padded copy (pad_input), large enough for whole work-groups, so no tap is bounds-checked.
// A DW_LX x DW_LY work-group covers a block of one output plane; group x = (plane * ohtiles +
// row tile) * owtiles + column tile, plane = batch * O + o.

KERNEL void conv2d_depthwise(
    const GLOBAL float* RESTRICT xp, const GLOBAL float* RESTRICT w, const GLOBAL float* RESTRICT bias,
    GLOBAL float* RESTRICT y, int C, int HP, int WP, int O, int OH, int OW, int owtiles, int ohtiles,
    float alpha, float beta)
{
    const int gx = GROUP_ID(0), rest = gx / owtiles, plane = rest / ohtiles;
    const INDEX_T ox = (INDEX_T)((gx - rest * owtiles) * DW_LX) + LOCAL_ID(0);
    const INDEX_T oy = (INDEX_T)((rest - plane * ohtiles) * DW_LY) + LOCAL_ID(1);
    const int n = plane / O, o = plane - n * O, c = o / (O / C);
    const GLOBAL float* xc = xp + (int64)(n * C + c) * HP * WP + oy * STRIDE_H * WP + ox * STRIDE_W;
    const GLOBAL float* wo = w + o * (KSIZE_H * KSIZE_W);

    float acc = 0.0f;
#pragma unroll
    for (int kh = 0; kh < KSIZE_H; ++kh)
#pragma unroll
        for (int kw = 0; kw < KSIZE_W; ++kw)
            acc += xc[kh * DIL_H * WP + kw * DIL_W] * wo[kh * KSIZE_W + kw];
    if (ox < OW && oy < OH)
        y[((int64)plane * OH + oy) * OW + ox] = epilogue(acc, bias[o], alpha, beta);
}
