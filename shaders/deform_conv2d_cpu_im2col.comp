#version 450
// deform_conv2d_im2col's forward columns on CPU devices (llvmpipe), where every texel fetch and storage
// store of an invocation costs a loop over the lanes: from the channels-last copy
// (deform_conv2d_channels_last) each of a point's four corners is one vec4 fetch per 4 channels, and an
// invocation samples 4 consecutive tile points so a 4 x 4 block goes out as 4 vec4 stores (one per
// channel's row). Needs C/G a multiple of 4; layout and blocks as deform_conv2d_im2col's forward
// (E0 block stride, E2 channel stride, E4 tap stride, E5 points per block, a multiple of 4).
// Work-group x: groups of 4 tile points, y: offset group.
#extension GL_GOOGLE_include_directive : require
#include "deform_conv2d_sampling.glsl"

layout(set = 0, binding = 0) uniform samplerBuffer xb4;
layout(std430, set = 0, binding = 3) writeonly buffer Columns { vec4 cols4[]; };

void main() {
    const int q0 = 4 * int(gl_GlobalInvocationID.x), g = int(gl_WorkGroupID.y), points = geo.NB * geo.P;
    if (q0 >= points)
        return;
    const int cpg = channels_per_offset_group(), wb = geo.W + 2, hb = geo.H + 3, c4 = geo.C / 4;
    const int dst = (q0 / geo.E5 * geo.E0 + (q0 - q0 / geo.E5 * geo.E5) + g * cpg * geo.E2) / 4;
    for (int k = 0; k < taps(); ++k) {
        int top[4];
        float weight[4][4], scale[4];
        [[unroll]] for (int e = 0; e < 4; ++e) {
            const int q = min(q0 + e, points - 1), nl = q / geo.P, n = geo.N0 + nl;  // past the end: repeats
            float py, px, m;
            deform_point(n, g, k, geo.P0 + q - nl * geo.P, py, px, m);
            const bool inside = py > -1.0 && py < float(geo.H) && px > -1.0 && px < float(geo.W);
            const float cy = floor(inside ? py : 0.0), cx = floor(inside ? px : 0.0);
            const float fy = inside ? py - cy : 0.0, fx = inside ? px - cx : 0.0;
            // A point that reads nothing reads the zeros of bordered rows H + 1 and H + 2.
            const int cell = inside ? (int(cy) + 1) * wb + int(cx) + 1 : (geo.H + 1) * wb;
            top[e] = ((n * hb * wb + cell) * geo.C + g * cpg) / 4;
            weight[e][0] = (1.0 - fy) * (1.0 - fx);
            weight[e][1] = (1.0 - fy) * fx;
            weight[e][2] = fy * (1.0 - fx);
            weight[e][3] = fy * fx;
            scale[e] = isnan(py) || isnan(px) ? deform_nan() : m;
        }
        for (int cl = 0; cl < cpg / 4; ++cl) {
            vec4 v[4];  // v[e]: 4 channels of point e
            [[unroll]] for (int e = 0; e < 4; ++e) {
                const int at = top[e] + cl;
                v[e] = scale[e] * (weight[e][0] * texelFetch(xb4, at) + weight[e][1] * texelFetch(xb4, at + c4)
                                   + weight[e][2] * texelFetch(xb4, at + wb * c4)
                                   + weight[e][3] * texelFetch(xb4, at + wb * c4 + c4));
            }
            const int row = dst + (4 * cl * geo.E2 + k * geo.E4) / 4;
            [[unroll]] for (int ch = 0; ch < 4; ++ch)
                cols4[row + ch * geo.E2 / 4] = vec4(v[0][ch], v[1][ch], v[2][ch], v[3][ch]);
        }
    }
}
