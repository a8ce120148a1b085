// What every conv2d shader binds: per-layer specialization constants, per-input push constants, buffers.
#ifndef CONV2D_LAYOUT_GLSL
#define CONV2D_LAYOUT_GLSL

#extension GL_EXT_control_flow_attributes : require

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z = 1) in;

// The kernel's geometry, specialised where UNROLL: the direct paths then unroll their loops over the
// taps and fetch whole input row segments. Past a size (a large kernel, stride or dilation) that code
// would take the driver seconds to minutes to build, so the host clears UNROLL, specialises these to 1
// and passes the geometry as push constants (shape.KH ... shape.DW): loops stay loops, one pipeline
// serves every such layer, and kernel_h() ... dilation_w() give whichever applies.
layout(constant_id = 2) const int KH = 1;
layout(constant_id = 3) const int KW = 1;
layout(constant_id = 4) const int SH = 1;
layout(constant_id = 5) const int SW = 1;
layout(constant_id = 6) const int DH = 1;
layout(constant_id = 7) const int DW = 1;
layout(constant_id = 8) const int ACT = 0;
layout(constant_id = 9) const bool HAS_BIAS = false;
layout(constant_id = 10) const bool UNROLL = true;
// Register micro-tile: output channels (TM) x output pixels (TN) per invocation; K tile depth (BK).
layout(constant_id = 11) const int TM = 1;
layout(constant_id = 12) const int TN = 1;
layout(constant_id = 13) const int BK = 1;
// true: stage weight and input tiles in shared memory (GPUs). false: each invocation fetches its own
// inputs as vec4s and the subgroup shares weight fetches by shuffles (CPU devices, where shared
// memory and barriers are emulated and slow); the work group is then one subgroup of LX lanes.
layout(constant_id = 14) const bool STAGE = true;

// Shapes change per input and arrive as push constants; image and group come from gl_WorkGroupID.z.
// The host writes x zero-padded: planes of HP x WP (padding included, WP a multiple of 4) PS floats
// apart, so no shader checks bounds and row segments are 16-byte aligned. OGP is the row length of
// the packed weights: output channels per group, padded to whole tiles. For the Winograd transforms
// only: N, the images of the dispatch, whose tiles form one GEMM row of N * tiles, and TPS, the floats
// between the planes of transformed input tiles (a multiple of 4). Then the kernel's geometry (see
// UNROLL) and the activation's parameters: leaky_relu's slope (ALPHA), clip's bounds (ALPHA, BETA).
layout(push_constant) uniform Shape {
    int C, HP, WP, PS, O, OH, OW, GROUPS, OGP, N, TPS;
    int KH, KW, SH, SW, DH, DW;
    float ALPHA, BETA;
} shape;

int kernel_h() { return UNROLL ? KH : shape.KH; }
int kernel_w() { return UNROLL ? KW : shape.KW; }
int stride_h() { return UNROLL ? SH : shape.SH; }
int stride_w() { return UNROLL ? SW : shape.SW; }
int dilation_h() { return UNROLL ? DH : shape.DH; }
int dilation_w() { return UNROLL ? DW : shape.DW; }

// Tensors are read through texel buffers (float and vec4 views of the same memory): a plain fetch on
// GPUs, and far cheaper than storage-buffer loads on llvmpipe, which loops over lanes for those.
layout(set = 0, binding = 0) uniform samplerBuffer x;
layout(set = 0, binding = 1) uniform samplerBuffer x4;
layout(set = 0, binding = 2) uniform samplerBuffer w;
layout(set = 0, binding = 3) uniform samplerBuffer w4;
layout(set = 0, binding = 4) uniform samplerBuffer b;
layout(std430, set = 0, binding = 5) writeonly buffer Output { float y[]; };
// The same output as vec4s, for aligned runs of four: llvmpipe loops over the lanes for every storage
// store, so one vec4 store costs about what one float store does.
layout(std430, set = 0, binding = 5) writeonly buffer Output4 { vec4 y4[]; };

#include "activation.glsl"

float epilogue(float acc, int channel) {
    return activate(HAS_BIAS ? acc + texelFetch(b, channel).x : acc);
}

#endif
