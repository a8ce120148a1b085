#version 450
// grad_x by gathering: each input pixel (r, q) sums, for the four cells it is a corner of, the points of
// the tile whose samples fall in that cell (the host's inverse map, backends/_deform.py: `points` holds
// tap * P + pixel sorted by (tile image, offset group, cell), `starts` where each cell's run begins;
// cell (cy, cx), cy in [-1, H), cx in [-1, W), is number (cy + 1) * (W + 1) + cx + 1) times its bilinear
// weight and mask. Fixed summation order: deterministic. E0 != 0: add to grad_x (a later pixel tile of
// the same images). Work-group x: input pixels, y: tile image * C + channel. As
// kernels/deform_conv2d_im2col.h.
#extension GL_GOOGLE_include_directive : require
#include "deform_conv2d_sampling.glsl"

layout(set = 0, binding = 0) uniform samplerBuffer dcol;
layout(std430, set = 0, binding = 3) readonly buffer Starts { int starts[]; };
layout(std430, set = 0, binding = 4) readonly buffer Points { int points[]; };
layout(std430, set = 0, binding = 5) buffer GradX { float grad_x[]; };

void main() {
    const int pix = int(gl_GlobalInvocationID.x), row = int(gl_WorkGroupID.y);
    if (pix >= geo.H * geo.W)
        return;
    const int nl = row / geo.C, c = row - nl * geo.C, g = c / channels_per_offset_group(), n = geo.N0 + nl;
    const int r = pix / geo.W, q = pix - r * geo.W;
    const int dc = (nl * geo.C + c) * taps() * geo.P, segment = (nl * geo.G + g) * (geo.H + 1) * (geo.W + 1);
    float acc = 0.0;
    [[unroll]] for (int corner = 0; corner < 4; ++corner) {
        const int dy = corner >> 1, dx = corner & 1, cy = r - dy, cx = q - dx;
        const int cell = segment + (cy + 1) * (geo.W + 1) + cx + 1;
        for (int t = starts[cell]; t < starts[cell + 1]; ++t) {
            const int id = points[t], k = id / geo.P, pl = id - k * geo.P;
            float py, px, m;
            deform_point(n, g, k, geo.P0 + pl, py, px, m);
            const float fy = py - float(cy), fx = px - float(cx);
            acc += m * (dy != 0 ? fy : 1.0 - fy) * (dx != 0 ? fx : 1.0 - fx) * texelFetch(dcol, dc + k * geo.P + pl).x;
        }
    }
    const int at = (n * geo.C + c) * geo.H * geo.W + pix;
    grad_x[at] = geo.E0 != 0 ? grad_x[at] + acc : acc;
}
