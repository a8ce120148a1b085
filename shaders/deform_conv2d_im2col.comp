#version 450
// The sampled columns of a tile, each tap sampled once per (image, offset group, pixel) and written for
// the group's C/G channels at n*E0 + p*E1 + c*E2 + (c / cg)*E3 + k*E4 (n, p in the tile): the forward
// GEMM's input [n][c*taps + k][p] in planes of its plane stride, or grad_w's [weight group][n*P + p]
// [c*taps + k within it]. Work-group x: tile pixels, y: tile image * G + offset group. As
// kernels/deform_conv2d_im2col.h.
#extension GL_GOOGLE_include_directive : require
#include "deform_conv2d_sampling.glsl"

layout(set = 0, binding = 0) uniform samplerBuffer x;
layout(std430, set = 0, binding = 3) writeonly buffer Columns { float cols[]; };

void main() {
    const int pl = int(gl_GlobalInvocationID.x), ng = int(gl_WorkGroupID.y);
    if (pl >= geo.P)
        return;
    const int nl = ng / geo.G, g = ng - nl * geo.G, n = geo.N0 + nl;
    const int cpg = channels_per_offset_group(), cg = channels_per_group(), plane = geo.H * geo.W;
    const int x_base = (n * geo.C + g * cpg) * plane, dst = nl * geo.E0 + pl * geo.E1;
    for (int k = 0; k < taps(); ++k) {
        float py, px, m;
        deform_point(n, g, k, geo.P0 + pl, py, px, m);
        const Corners s = deform_corners(py, px);
        const bool nan = isnan(py) || isnan(px);
        for (int cl = 0; cl < cpg; ++cl) {
            float v = 0.0;
            [[unroll]] for (int corner = 0; corner < 4; ++corner)
                v += s.read[corner] ? s.weight[corner] * texelFetch(x, x_base + cl * plane + s.at[corner]).x : 0.0;
            const int c = g * cpg + cl;
            cols[dst + c * geo.E2 + c / cg * geo.E3 + k * geo.E4] = m * (nan ? deform_nan() : v);
        }
    }
}
