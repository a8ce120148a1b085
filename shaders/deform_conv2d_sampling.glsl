// deform_conv2d's bilinear sampling for its shaders (the semantics: ops/deform_conv2d.py; the C twin:
// kernels/deform_conv2d_sampling.h). Layouts: x (N, C, H, W); offset (N, G*2*taps, OH, OW), channel
// g*2*taps + 2k the y offset of tap k = i*KW + j of offset group g, + 1 its x offset; mask
// (N, G*taps, OH, OW), channel g*taps + k. Every deform shader binds offset at 1 and mask at 2 (any
// buffer without a mask) and takes the geometry as push constants: DeformConv2dGeometry.as_ints(), the
// tile (images [N0, N0 + NB), output pixels [P0, P0 + P)), then six values of its own (E0..E5).
#ifndef DEFORM_CONV2D_SAMPLING_GLSL
#define DEFORM_CONV2D_SAMPLING_GLSL

#extension GL_EXT_control_flow_attributes : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

layout(push_constant) uniform Geometry {
    int N, C, H, W, O, OH, OW, KH, KW, SH, SW, DH, DW, PT, PL, PB, PR, GROUPS, G, HAS_MASK, N0, NB, P0, P;
    int E0, E1, E2, E3, E4, E5;
} geo;

layout(set = 0, binding = 1) uniform samplerBuffer offsets;
layout(set = 0, binding = 2) uniform samplerBuffer masks;

float deform_nan() { return uintBitsToFloat(0x7fc00000u); }

int taps() { return geo.KH * geo.KW; }
int npix() { return geo.OH * geo.OW; }
int channels_per_offset_group() { return geo.C / geo.G; }
int channels_per_group() { return geo.C / geo.GROUPS; }

// The sample point (py, px) and mask value m of tap k for output pixel p of image n in offset group g
// (n and p absolute); the coordinate is one float32 rounding, as on every backend.
void deform_point(int n, int g, int k, int p, out float py, out float px, out float m) {
    const int oy = p / geo.OW, ox = p - oy * geo.OW, i = k / geo.KW, j = k - i * geo.KW;
    const int at = ((n * geo.G + g) * 2 * taps() + 2 * k) * npix() + p;
    py = float(oy * geo.SH - geo.PT + i * geo.DH) + texelFetch(offsets, at).x;
    px = float(ox * geo.SW - geo.PL + j * geo.DW) + texelFetch(offsets, at + npix()).x;
    m = geo.HAS_MASK != 0 ? texelFetch(masks, ((n * geo.G + g) * taps() + k) * npix() + p).x : 1.0;
}

// A point's corners 00, 01, 10, 11 of its cell: offsets in a plane (clamped into it), bilinear weights,
// and whether each is read. A point outside (-1, H) x (-1, W) reads no corner.
struct Corners {
    int at[4];
    float weight[4];
    bool read[4];
};

Corners deform_corners(float py, float px) {
    Corners s;
    const bool inside = py > -1.0 && py < float(geo.H) && px > -1.0 && px < float(geo.W);
    const float cy = floor(inside ? py : 0.0), cx = floor(inside ? px : 0.0);
    const int y0 = int(cy), x0 = int(cx);
    const float fy = py - cy, fx = px - cx;
    [[unroll]] for (int corner = 0; corner < 4; ++corner) {
        const int dy = corner >> 1, dx = corner & 1, r = y0 + dy, q = x0 + dx;
        s.read[corner] = inside && r >= 0 && r < geo.H && q >= 0 && q < geo.W;
        s.at[corner] = clamp(r, 0, geo.H - 1) * geo.W + clamp(q, 0, geo.W - 1);
        s.weight[corner] = (dy != 0 ? fy : 1.0 - fy) * (dx != 0 ? fx : 1.0 - fx);
    }
    return s;
}

#endif
