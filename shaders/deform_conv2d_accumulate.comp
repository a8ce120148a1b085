#version 450
// dst[i] += src[i] for i < E0: a later tile's grad_w into the first's. src is bound at 0.
#extension GL_GOOGLE_include_directive : require
#include "deform_conv2d_sampling.glsl"

layout(set = 0, binding = 0) uniform samplerBuffer src;
layout(std430, set = 0, binding = 3) buffer Destination { float dst[]; };

void main() {
    const int i = int(gl_GlobalInvocationID.x);
    if (i < geo.E0)
        dst[i] += texelFetch(src, i).x;
}
