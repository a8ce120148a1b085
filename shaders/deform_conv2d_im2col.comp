#version 450
// The sampled columns of a tile, each tap sampled once per (image, offset group, pixel) and written for
// the group's C/G channels. Tile point q = n * P + p goes to (q / E5) * E0 + (q % E5) * E1, channel c and
// tap k to c * E2 + (c / cg) * E3 + k * E4: the forward GEMM's input in blocks of E5 points
// ([block][c * taps + k][point]: rows a block apart, not a tile, keep the GEMM's reads within few pages),
// or grad_w's [weight group][n * P + p][c * taps + k within it] (one block). Work-group x: tile pixels,
// y: tile image * G + offset group. As kernels/deform_conv2d_im2col.h.
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
    const int q = nl * geo.P + pl, x_base = (n * geo.C + g * cpg) * plane;
    const int dst = q / geo.E5 * geo.E0 + (q - q / geo.E5 * geo.E5) * geo.E1;
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
