#version 450
// grad_offset and grad_mask of each point of a tile: sums over the offset group's channels of dcol
// ([tile image][c*taps + k][tile pixel]) times the bilinear derivatives (and the forward sample), by
// the cell floor() picks on [-1, H) x [-1, W) (right-sided at integer coordinates); 0 outside it, NaN
// for a NaN coordinate. Work-group x: tile pixels, y: (tile image * G + offset group) * taps + tap.
// As kernels/deform_conv2d_im2col.h.
#extension GL_GOOGLE_include_directive : require
#include "deform_conv2d_sampling.glsl"

layout(set = 0, binding = 0) uniform samplerBuffer x;
layout(set = 0, binding = 3) uniform samplerBuffer dcol;
layout(std430, set = 0, binding = 4) writeonly buffer GradOffset { float grad_offset[]; };
layout(std430, set = 0, binding = 5) writeonly buffer GradMask { float grad_mask[]; };

void main() {
    const int pl = int(gl_GlobalInvocationID.x), row = int(gl_WorkGroupID.y);
    if (pl >= geo.P)
        return;
    const int ng = row / taps(), k = row - ng * taps(), nl = ng / geo.G, g = ng - nl * geo.G;
    const int n = geo.N0 + nl, p = geo.P0 + pl, cpg = channels_per_offset_group(), plane = geo.H * geo.W;
    float py, px, m;
    deform_point(n, g, k, p, py, px, m);
    float gy = 0.0, gx = 0.0, gm = 0.0;
    if (py >= -1.0 && py < float(geo.H) && px >= -1.0 && px < float(geo.W)) {
        const bool inside = py > -1.0 && px > -1.0;
        const float cy = floor(py), cx = floor(px), fy = py - cy, fx = px - cx;
        const int y0 = int(cy), x0 = int(cx);
        // Out-of-image corners are 0: their clamped address is read, the value discarded.
        const bool top = y0 >= 0, bottom = y0 + 1 < geo.H, left = x0 >= 0, right = x0 + 1 < geo.W;
        const int r0 = max(y0, 0) * geo.W, r1 = min(y0 + 1, geo.H - 1) * geo.W;
        const int q0 = max(x0, 0), q1 = min(x0 + 1, geo.W - 1);
        const int dk = ((nl * geo.C + g * cpg) * taps() + k) * geo.P + pl;
        for (int cl = 0; cl < cpg; ++cl) {
            const int base = (n * geo.C + g * cpg + cl) * plane;
            const float v00 = top && left ? texelFetch(x, base + r0 + q0).x : 0.0;
            const float v01 = top && right ? texelFetch(x, base + r0 + q1).x : 0.0;
            const float v10 = bottom && left ? texelFetch(x, base + r1 + q0).x : 0.0;
            const float v11 = bottom && right ? texelFetch(x, base + r1 + q1).x : 0.0;
            const float dv = texelFetch(dcol, dk + cl * taps() * geo.P).x;
            gy += dv * ((1.0 - fx) * (v10 - v00) + fx * (v11 - v01));
            gx += dv * ((1.0 - fy) * (v01 - v00) + fy * (v11 - v10));
            if (inside)
                gm += dv * ((1.0 - fy) * ((1.0 - fx) * v00 + fx * v01) + fy * ((1.0 - fx) * v10 + fx * v11));
        }
    }
    const bool nan = isnan(py) || isnan(px);
    const int at = ((n * geo.G + g) * 2 * taps() + 2 * k) * npix() + p;
    grad_offset[at] = nan ? deform_nan() : m * gy;
    grad_offset[at + npix()] = nan ? deform_nan() : m * gx;
    if (geo.HAS_MASK != 0)
        grad_mask[((n * geo.G + g) * taps() + k) * npix() + p] = nan ? deform_nan() : gm;
}
