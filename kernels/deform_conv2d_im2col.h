// deform_conv2d as the classic trio around GEMMs (backends/kernel/deform_conv2d.py runs the GEMMs as
// grouped 1x1 conv2d layers): deform_conv2d_im2col samples a tile's columns; for backward,
// deform_conv2d_col2im gathers grad_x and deform_conv2d_col2im_coord computes grad_offset and grad_mask
// from the column gradients dcol ([image of the tile][c * taps + k][pixel of the tile]). The rest
// moves tiles: the grad_w GEMM's per-call operand, pixel runs between tiles and whole arrays, sums.
// No atomics: every output element has one work-item, which sums in a fixed order.

// Columns of the tile, each tap sampled once per (image, offset group, pixel) and written for the
// group's C/G channels at n*s_n + p*s_p + c*s_c + (c / cg)*s_w + k*s_k (n, p in the tile): the forward
// GEMM's input [n][c*taps + k][p] or, for grad_w, [weight group][n*P + p][c*taps + k within it].
// Work-item x: tile pixel, y: tile image * G + offset group.
KERNEL void deform_conv2d_im2col(const GLOBAL float* RESTRICT x, const GLOBAL float* RESTRICT offset,
                                 const GLOBAL float* RESTRICT mask, GLOBAL float* RESTRICT cols,
                                 DEFORM_GEOMETRY_ARGS, int s_n, int s_p, int s_c, int s_w, int s_k)
{
    const DeformGeometry d = DEFORM_GEOMETRY;
    const int pl = (int)GLOBAL_ID_X, ng = GROUP_ID(1), nl = ng / G, g = ng - nl * G, n = n0 + nl;
    if (pl >= P)
        return;
    const GLOBAL float* xg = x + (int64)(n * C + g * d.cpg) * H * W;
    GLOBAL float* out = cols + nl * s_n + pl * s_p;
    for (int k = 0; k < d.taps; ++k) {
        float py, px, m;
        deform_point(offset, mask, &d, n, g, k, p0 + pl, &py, &px, &m);
        const DeformCorners s = deform_corners(py, px, H, W);
        for (int cl = 0; cl < d.cpg; ++cl) {
            const int c = g * d.cpg + cl;
            out[c * s_c + c / d.cg * s_w + k * s_k] = m * deform_sample(xg + (int64)cl * H * W, &s);
        }
    }
}

// grad_offset and grad_mask of each point of the tile: sums over the offset group's channels of dcol
// times the bilinear derivatives (and the forward sample), by the cell floor() picks on
// [-1, H) x [-1, W) (right-sided at integer coordinates); 0 outside it, NaN for a NaN coordinate.
// Work-item x: tile pixel, y: (tile image * G + offset group) * taps + tap.
KERNEL void deform_conv2d_col2im_coord(const GLOBAL float* RESTRICT x, const GLOBAL float* RESTRICT offset,
                                       const GLOBAL float* RESTRICT mask, const GLOBAL float* RESTRICT dcol,
                                       GLOBAL float* RESTRICT grad_offset, GLOBAL float* RESTRICT grad_mask,
                                       DEFORM_GEOMETRY_ARGS)
{
    const DeformGeometry d = DEFORM_GEOMETRY;
    const int pl = (int)GLOBAL_ID_X, row = GROUP_ID(1), ng = row / d.taps, k = row - ng * d.taps;
    const int nl = ng / G, g = ng - nl * G, n = n0 + nl, p = p0 + pl;
    if (pl >= P)
        return;
    float py, px, m;
    deform_point(offset, mask, &d, n, g, k, p, &py, &px, &m);
    float gy = 0.0f, gx = 0.0f, gm = 0.0f;
    if (py >= -1.0f && py < (float)H && px >= -1.0f && px < (float)W) {
        const bool inside = py > -1.0f && px > -1.0f;
        const float cy = floorf(py), cx = floorf(px), fy = py - cy, fx = px - cx;
        const int y0 = (int)cy, x0 = (int)cx;
        // Out-of-image corners are 0: their clamped address is read, the value discarded.
        const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
        const int r0 = max(y0, 0) * W, r1 = min(y0 + 1, H - 1) * W, q0 = max(x0, 0), q1 = min(x0 + 1, W - 1);
        const GLOBAL float* dk = dcol + ((int64)(nl * C + g * d.cpg) * d.taps + k) * P + pl;
        for (int cl = 0; cl < d.cpg; ++cl) {
            const GLOBAL float* plane = x + (int64)(n * C + g * d.cpg + cl) * H * W;
            const float v00 = top && left ? plane[r0 + q0] : 0.0f, v01 = top && right ? plane[r0 + q1] : 0.0f;
            const float v10 = bottom && left ? plane[r1 + q0] : 0.0f, v11 = bottom && right ? plane[r1 + q1] : 0.0f;
            const float dv = dk[(int64)cl * d.taps * P];
            gy += dv * ((1.0f - fx) * (v10 - v00) + fx * (v11 - v01));
            gx += dv * ((1.0f - fy) * (v01 - v00) + fy * (v11 - v10));
            if (inside)
                gm += dv * ((1.0f - fy) * ((1.0f - fx) * v00 + fx * v01) + fy * ((1.0f - fx) * v10 + fx * v11));
        }
    }
    const bool nan = isnan(py) || isnan(px);
    GLOBAL float* go = grad_offset + ((int64)(n * G + g) * 2 * d.taps + 2 * k) * d.npix + p;
    go[0] = nan ? DEFORM_NAN : m * gy;
    go[d.npix] = nan ? DEFORM_NAN : m * gx;
    if (has_mask)
        grad_mask[((int64)(n * G + g) * d.taps + k) * d.npix + p] = nan ? DEFORM_NAN : gm;
}

// grad_x by gathering: each input pixel (r, q) sums, for the four cells it is a corner of, the points of
// the tile whose samples fall in that cell times their weight for that corner (the host's inverse map,
// backends/_deform.py: `points` holds tap * P + pixel, the point's dcol column, sorted by (tile image,
// offset group, cell), `starts` where each cell's run begins, cell (cy, cx) for cy in [-1, H), cx in
// [-1, W) being number (cy + 1) * (W + 1) + cx + 1, and `weights` each point's four corner weights, mask
// included). Summation order is fixed, so grad_x is deterministic. `accumulate`: add to grad_x (a later
// pixel tile of the same images). Work-item x: input pixel, y: tile image * C + channel.
KERNEL void deform_conv2d_col2im(const GLOBAL float* RESTRICT dcol, const GLOBAL int* RESTRICT starts,
                                 const GLOBAL int* RESTRICT points, const GLOBAL float* RESTRICT weights,
                                 GLOBAL float* RESTRICT grad_x, DEFORM_GEOMETRY_ARGS, int accumulate)
{
    const DeformGeometry d = DEFORM_GEOMETRY;
    const int pix = (int)GLOBAL_ID_X, row = GROUP_ID(1), nl = row / C, c = row - nl * C;
    if (pix >= H * W)
        return;
    const int g = c / d.cpg, n = n0 + nl, r = pix / W, q = pix - r * W;
    const GLOBAL float* dc = dcol + (int64)(nl * C + c) * d.taps * P;
    const GLOBAL int* segment = starts + (nl * G + g) * (H + 1) * (W + 1);
    float acc = 0.0f;
#pragma unroll
    for (int corner = 0; corner < 4; ++corner) {
        const int dy = corner >> 1, dx = corner & 1, cell = (r - dy + 1) * (W + 1) + q - dx + 1;
        for (int t = segment[cell]; t < segment[cell + 1]; ++t)
            acc += weights[4 * t + corner] * dc[points[t]];
    }
    GLOBAL float* out = grad_x + (int64)(n * C + c) * H * W + pix;
    *out = accumulate ? *out + acc : acc;
}

// The grad_w GEMM's A operand (the 1x1 layer's "weights", made per call): A[k][m] = grad_y[n0 + k / P]
// [gw * og + m][p0 + k % P] for weight group gw, zero for k >= nb * P or m >= og, stored as the GEMM's
// packing wants it: gw * s_g + (m / block) * s_mb + k * s_k + m % block. Work-item x: k < kpad,
// y: gw * ogpad + m.
KERNEL void deform_conv2d_pack(const GLOBAL float* RESTRICT grad_y, GLOBAL float* RESTRICT packed,
                               DEFORM_GEOMETRY_ARGS, int kpad, int ogpad, int block, int s_g, int s_mb, int s_k)
{
    const DeformGeometry d = DEFORM_GEOMETRY;
    const int k = (int)GLOBAL_ID_X, row = GROUP_ID(1), gw = row / ogpad, m = row - gw * ogpad;
    if (k >= kpad)
        return;
    const int og = O / groups, nl = k / P, pl = k - nl * P;
    const bool real = k < nb * P && m < og;
    const int64 at = real ? ((int64)(n0 + nl) * O + gw * og + m) * d.npix + p0 + pl : 0;
    packed[(int64)gw * s_g + m / block * s_mb + (int64)k * s_k + m % block] = real ? grad_y[at] : 0.0f;
}

// dst[r * dst_stride + dst_start + i] = src[r * src_stride + src_start + i] for i < count: a tile's
// pixel runs to or from whole (N, channels, OH * OW) arrays. Work-item x: i, y: r.
KERNEL void deform_conv2d_copy_pixels(const GLOBAL float* RESTRICT src, GLOBAL float* RESTRICT dst, int count,
                                      int src_stride, int64 src_start, int dst_stride, int64 dst_start)
{
    const int i = (int)GLOBAL_ID_X, r = GROUP_ID(1);
    if (i < count)
        dst[(int64)r * dst_stride + dst_start + i] = src[(int64)r * src_stride + src_start + i];
}

// grad_b[o] (+)= the sum of grad_y[n][o][:] over N images, image by image.
KERNEL void deform_conv2d_bias_grad(const GLOBAL float* RESTRICT grad_y, GLOBAL float* RESTRICT grad_b, int N,
                                    int O, int npix, int accumulate)
{
    const int o = (int)GLOBAL_ID_X;
    if (o >= O)
        return;
    float total = 0.0f;
    for (int n = 0; n < N; ++n) {
        const GLOBAL float* row = grad_y + ((int64)n * O + o) * npix;
        float part = 0.0f;
        for (int p = 0; p < npix; ++p)
            part += row[p];
        total += part;
    }
    grad_b[o] = accumulate ? grad_b[o] + total : total;
}

// dst[i] += src[i]: a later tile's grad_w into the first's.
KERNEL void deform_conv2d_accumulate(GLOBAL float* RESTRICT dst, const GLOBAL float* RESTRICT src, int count)
{
    const int i = (int)GLOBAL_ID_X;
    if (i < count)
        dst[i] += src[i];
}
