// One C dialect for OpenCL C and CUDA C++. Kernels use only the spellings below, so the same
// source builds with pyopencl and with NVRTC (CuPy RawModule), and PoCL runs test the CUDA
// kernels' indexing and arithmetic. LOCAL_MEM declares a work-group array, LOCAL qualifies a
// pointer into one. Math uses the CUDA float names; OpenCL gets aliases.

// INDEX_T types what work-item ids feed: CPU OpenCL compilers (PoCL) vectorise across work-items
// only when that index math stays 64-bit (a truncated local id hides consecutive addresses), so
// the runtime passes -DINDEX_T=long for CPU devices; GPUs keep 32-bit integer math.
#ifndef INDEX_T
#define INDEX_T int
#endif

#ifdef __OPENCL_VERSION__

#define KERNEL __kernel
#define GLOBAL __global
#define LOCAL __local
#define LOCAL_MEM __local
#define RESTRICT restrict
#define DEVICE_FN inline __attribute__((always_inline))
#define BARRIER() barrier(CLK_LOCAL_MEM_FENCE)
#define GROUP_ID(d) ((int)get_group_id(d))
#define LOCAL_ID(d) ((INDEX_T)get_local_id(d))
#define GLOBAL_ID_X ((long)get_global_id(0))
typedef long int64;

#define expf exp
#define tanhf tanh
#define log1pf log1p
#define fabsf fabs

// The even elements of p[0..15], i.e. 8 inputs at stride 2, for the CPU-only float8 paths (two
// vload8s: a float16 value warns of an ABI change on AVX2 targets).
inline float8 vload8_stride2(const __global float* p)
{
    const float8 lo = vload8(0, p), hi = vload8(1, p);
    return (float8)(lo.even, hi.even);
}

#else

#define KERNEL extern "C" __global__
#define GLOBAL
#define LOCAL
#define LOCAL_MEM __shared__
#define RESTRICT __restrict__
#define DEVICE_FN __device__ __forceinline__
#define BARRIER() __syncthreads()
#define GROUP_ID(d) ((int)((d) == 0 ? blockIdx.x : (d) == 1 ? blockIdx.y : blockIdx.z))
#define LOCAL_ID(d) ((INDEX_T)((d) == 0 ? threadIdx.x : (d) == 1 ? threadIdx.y : threadIdx.z))
#define GLOBAL_ID_X ((long long)blockIdx.x * blockDim.x + threadIdx.x)
typedef long long int64;

#endif

// Fused activations; the codes equal spec.ACTIVATION_CODES (a test compares them).
#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_RELU6 2
#define ACT_SIGMOID 3
#define ACT_TANH 4
#define ACT_SILU 5
#define ACT_MISH 6
#define ACT_HARDSWISH 7
#define ACT_LEAKY_RELU 8
#define ACT_CLIP 9

#ifndef ACTIVATION
#define ACTIVATION ACT_NONE
#endif

// Comparisons that select, so a NaN stays NaN: fmax/fmin (and OpenCL's clamp) return the other
// operand for a NaN, which would turn relu(NaN) into 0.
DEVICE_FN float clamp_keep_nan(float v, float lo, float hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

DEVICE_FN float relu_keep_nan(float v)
{
    return v < 0.0f ? 0.0f : v;
}

// The epilogue every kernel applies to an accumulated output: bias, then the layer's activation
// (chosen at compile time). alpha is leaky_relu's slope or clip's low bound, beta clip's high bound.
// NaN and +-inf come out as the numpy backend and the float64 reference give them.
DEVICE_FN float epilogue(float acc, float bias, float alpha, float beta)
{
    float v = acc + bias;
#if ACTIVATION == ACT_RELU
    v = relu_keep_nan(v);
#elif ACTIVATION == ACT_RELU6
    v = clamp_keep_nan(v, 0.0f, 6.0f);
#elif ACTIVATION == ACT_SIGMOID
    v = 1.0f / (1.0f + expf(-v));
#elif ACTIVATION == ACT_TANH
    v = tanhf(v);
#elif ACTIVATION == ACT_SILU
    v = v * (1.0f / (1.0f + expf(-v)));
#elif ACTIVATION == ACT_MISH
    v = v * tanhf(relu_keep_nan(v) + log1pf(expf(-fabsf(v))));
#elif ACTIVATION == ACT_HARDSWISH
    v = v * clamp_keep_nan(v / 6.0f + 0.5f, 0.0f, 1.0f);
#elif ACTIVATION == ACT_LEAKY_RELU
    v = v >= 0.0f ? v : alpha * v;
#elif ACTIVATION == ACT_CLIP
    v = clamp_keep_nan(v, alpha, beta);
#endif
    return v;
}
