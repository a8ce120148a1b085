#version 450
// The grad_w GEMM's per-call weights: A[k][m] = grad_y[N0 + k / P][gw * og + m][P0 + k % P] for weight
// group gw, zero for k >= NB * P or m >= og, at gw * E3 + (m / E2) * E4 + k * E5 + m % E2 (the packing
// of backends/vulkan/conv2d.py `pack_weights`); E0 = kpad, E1 = ogpad. Work-group x: k, y: gw * ogpad + m.
// grad_y is bound at 0 (offset and mask are not read).
#extension GL_GOOGLE_include_directive : require
#include "deform_conv2d_sampling.glsl"

layout(set = 0, binding = 0) uniform samplerBuffer grad_y;
layout(std430, set = 0, binding = 3) writeonly buffer Packed { float packed[]; };

void main() {
    const int k = int(gl_GlobalInvocationID.x), row = int(gl_WorkGroupID.y);
    if (k >= geo.E0)
        return;
    const int gw = row / geo.E1, m = row - gw * geo.E1, og = geo.O / geo.GROUPS, nl = k / geo.P, pl = k - nl * geo.P;
    const bool real = k < geo.NB * geo.P && m < og;
    const int at = real ? ((geo.N0 + nl) * geo.O + gw * og + m) * npix() + geo.P0 + pl : 0;
    packed[gw * geo.E3 + m / geo.E2 * geo.E4 + k * geo.E5 + m % geo.E2] = real ? texelFetch(grad_y, at).x : 0.0;
}
