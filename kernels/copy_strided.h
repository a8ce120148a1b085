// copy_strided: a 4-D view with any element strides and offset into a C-contiguous buffer, so
// device arrays that are views (slices, transposes) run without a trip through the host.

KERNEL void copy_strided(const GLOBAL float* RESTRICT x, GLOBAL float* RESTRICT y, int offset,
                         int d1, int d2, int d3, int s0, int s1, int s2, int s3, int64 total)
{
    const int64 i = GLOBAL_ID_X;
    if (i >= total)
        return;
    const int64 i3 = i % d3, r3 = i / d3, i2 = r3 % d2, r2 = r3 / d2, i1 = r2 % d1, i0 = r2 / d1;
    y[i] = x[offset + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3];
}
