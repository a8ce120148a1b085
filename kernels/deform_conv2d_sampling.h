// deform_conv2d's bilinear sampling, shared by its kernels (the semantics: ops/deform_conv2d.py).
// Layouts: x (N, C, H, W); offset (N, G*2*taps, OH, OW), channel g*2*taps + 2k the y offset of tap
// k = i*KW + j of offset group g, + 1 its x offset; mask (N, G*taps, OH, OW), channel g*taps + k.
// Kernels take the layer's sizes as DEFORM_GEOMETRY_ARGS (DeformConv2dGeometry.as_ints() order, then
// a tile: images [n0, n0 + nb) and output pixels [p0, p0 + P)) and gather them with DEFORM_GEOMETRY.

#ifdef __OPENCL_VERSION__
#define floorf floor
#define DEFORM_NAN NAN
#else
#define DEFORM_NAN __int_as_float(0x7fc00000)
#endif

typedef struct {
    int N, C, H, W, O, OH, OW, KH, KW, SH, SW, DH, DW, PT, PL, PB, PR, groups, G, has_mask, n0, nb, p0, P;
    int taps, npix, cpg, cg;  // kernel taps, output pixels, channels per offset group and per weight group
} DeformGeometry;

#define DEFORM_GEOMETRY_ARGS                                                                              \
    int N, int C, int H, int W, int O, int OH, int OW, int KH, int KW, int SH, int SW, int DH, int DW,    \
        int PT, int PL, int PB, int PR, int groups, int G, int has_mask, int n0, int nb, int p0, int P
#define DEFORM_GEOMETRY                                                                                   \
    {N, C, H, W, O, OH, OW, KH, KW, SH, SW, DH, DW, PT, PL, PB, PR, groups, G, has_mask, n0, nb, p0, P,  \
     KH * KW, OH * OW, C / G, C / groups}

// The sample point (py, px) and mask value m of tap k for output pixel p of image n in offset group
// g (n and p absolute). The coordinate is one float32 rounding, as on every backend.
DEVICE_FN void deform_point(const GLOBAL float* RESTRICT offset, const GLOBAL float* RESTRICT mask,
                            const DeformGeometry* d, int n, int g, int k, int p, float* py, float* px, float* m)
{
    const int oy = p / d->OW, ox = p - oy * d->OW, i = k / d->KW, j = k - i * d->KW;
    const GLOBAL float* off = offset + ((int64)(n * d->G + g) * 2 * d->taps + 2 * k) * d->npix + p;
    *py = (float)(oy * d->SH - d->PT + i * d->DH) + off[0];
    *px = (float)(ox * d->SW - d->PL + j * d->DW) + off[d->npix];
    *m = d->has_mask ? mask[((int64)(n * d->G + g) * d->taps + k) * d->npix + p] : 1.0f;
}

// A point's corners 00, 01, 10, 11 (rows y0, y0 + 1 by columns x0, x0 + 1 of its cell): offsets in a
// plane (clamped into it, so always valid addresses), bilinear weights, and whether each is read. A
// point outside (-1, H) x (-1, W) reads no corner; a NaN point samples NaN.
typedef struct {
    int at[4];
    float weight[4];
    bool read[4];
    bool nan;
} DeformCorners;

DEVICE_FN DeformCorners deform_corners(float py, float px, int H, int W)
{
    DeformCorners s;
    s.nan = isnan(py) || isnan(px);
    const bool inside = py > -1.0f && py < (float)H && px > -1.0f && px < (float)W;
    const float cy = floorf(inside ? py : 0.0f), cx = floorf(inside ? px : 0.0f);
    const int y0 = (int)cy, x0 = (int)cx;
    const float fy = py - cy, fx = px - cx;
#pragma unroll
    for (int corner = 0; corner < 4; ++corner) {
        const int dy = corner >> 1, dx = corner & 1, r = y0 + dy, q = x0 + dx;
        s.read[corner] = inside && r >= 0 && r < H && q >= 0 && q < W;
        s.at[corner] = min(max(r, 0), H - 1) * W + min(max(q, 0), W - 1);
        s.weight[corner] = (dy ? fy : 1.0f - fy) * (dx ? fx : 1.0f - fx);
    }
    return s;
}

// One channel plane sampled at the corners' point. Callers scale it by the mask afterwards, so a NaN
// or inf mask gives NaN even where nothing is read, as mask * value does in the reference.
DEVICE_FN float deform_sample(const GLOBAL float* RESTRICT plane, const DeformCorners* s)
{
    float v = 0.0f;
#pragma unroll
    for (int corner = 0; corner < 4; ++corner)
        v += s->read[corner] ? s->weight[corner] * plane[s->at[corner]] : 0.0f;
    return s->nan ? DEFORM_NAN : v;
}
