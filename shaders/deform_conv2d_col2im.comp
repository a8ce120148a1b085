#version 450
// grad_x by gathering: each input pixel (r, q) sums, for the four cells it is a corner of, the points of
// the tile whose samples fall in that cell times their weight for that corner (the host's inverse map,
// backends/_deform.py: `points` holds tap * P + pixel, the point's dcol column, sorted by (tile image,
// offset group, cell), `starts` where each cell's run begins, cell (cy, cx) for cy in [-1, H), cx in
// [-1, W) being number (cy + 1) * (W + 1) + cx + 1, and `weights` each point's four corner weights, mask
// included). Fixed summation order: deterministic. E0 != 0: add to grad_x (a later pixel tile of the
// same images). Work-group x: input pixels, y: tile image * C + channel. As kernels/deform_conv2d_im2col.h.
#extension GL_GOOGLE_include_directive : require
#include "deform_conv2d_sampling.glsl"

layout(set = 0, binding = 0) uniform samplerBuffer dcol;
layout(std430, set = 0, binding = 3) readonly buffer Starts { int starts[]; };
layout(std430, set = 0, binding = 4) readonly buffer Points { int points[]; };
layout(set = 0, binding = 5) uniform samplerBuffer weights;
layout(std430, set = 0, binding = 6) buffer GradX { float grad_x[]; };

void main() {
    const int pix = int(gl_GlobalInvocationID.x), row = int(gl_WorkGroupID.y);
    if (pix >= geo.H * geo.W)
        return;
    const int nl = row / geo.C, c = row - nl * geo.C, g = c / channels_per_offset_group(), n = geo.N0 + nl;
    const int r = pix / geo.W, q = pix - r * geo.W;
    const int dc = (nl * geo.C + c) * taps() * geo.P, segment = (nl * geo.G + g) * (geo.H + 1) * (geo.W + 1);
    float acc = 0.0;
    [[unroll]] for (int corner = 0; corner < 4; ++corner) {
        const int dy = corner >> 1, dx = corner & 1, cell = segment + (r - dy + 1) * (geo.W + 1) + q - dx + 1;
        for (int t = starts[cell]; t < starts[cell + 1]; ++t)
            acc += texelFetch(weights, 4 * t + corner).x * texelFetch(dcol, dc + points[t]).x;
    }
    const int at = (n * geo.C + c) * geo.H * geo.W + pix;
    grad_x[at] = geo.E0 != 0 ? grad_x[at] + acc : acc;
}
