#version 450
// xb[n][r][q][c] = x[n][c][r - 1][q - 1] inside the image, else 0: the channels-last copy with a zero
// border (one pixel, two rows at the bottom) that deform_conv2d_cpu_im2col reads. Work-group x:
// bordered columns q, y: n * (H + 3) + r. As kernels/deform_conv2d_cpu_im2col.h.
#extension GL_GOOGLE_include_directive : require
#include "deform_conv2d_sampling.glsl"

layout(set = 0, binding = 0) uniform samplerBuffer x;
layout(std430, set = 0, binding = 3) writeonly buffer Bordered { float xb[]; };

void main() {
    const int q = int(gl_GlobalInvocationID.x), row = int(gl_WorkGroupID.y), hb = geo.H + 3, wb = geo.W + 2;
    if (q >= wb)
        return;
    const int n = row / hb, r = row - n * hb, iy = r - 1, ix = q - 1, plane = geo.H * geo.W;
    const bool inside = iy >= 0 && iy < geo.H && ix >= 0 && ix < geo.W;
    const int src = n * geo.C * plane + (inside ? iy * geo.W + ix : 0), dst = (row * wb + q) * geo.C;
    for (int c = 0; c < geo.C; ++c)
        xb[dst + c] = inside ? texelFetch(x, src + c * plane).x : 0.0;
}
