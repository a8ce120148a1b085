// sparse_conv3d's rulebook, built on the device from sorted unique sites (batch, z, y, x), int32 (n, 4).
// It is kept as a neighbour map nbr (n_out, K) int32: the input row output row r reads through tap t,
// or -1; and, for GPUs, as the pair lists (the canonical form) made from it. Every kernel here writes
// each element from one work-item, so both are the same on every run.
//
// Sites are compared by their linear key ((b * D + z) * H + y) * W + x, whose order is the site order.
// KEY_T is int where every key of the grid fits 31 bits, else int64. The grid and the kernel's
// placement come in a table geo of 18 ints (G_* below); a tap t = (i * kh + j) * kw + l.
//
// Submanifold: the output sites are the input sites, so their keys are sorted already: each site looks
// up key + the tap's offset by binary search (a gallop from its predecessor's), a row of kw taps along
// x from one search. Taps before the centre reach sites before this one; tap K-1-t is tap t mirrored,
// so a match through t also fills the mirror's entry of the site it found, and only taps up to the
// centre search.
// Regular: each input writes the output key of every tap that reaches an output (candidates), with
// the input row and tap as its value; a radix sort and a flag-and-scan pass give the sorted distinct
// keys, which are the output sites, and each sorted candidate its output row.
// Inverse: the neighbour map transposed (sparse_swap_neighbours), or the pair lists swapped (host side).

#ifndef KEY_T
#define KEY_T int
#endif

#define G_IN 0
#define G_OUT 3
#define G_KERNEL 6
#define G_STRIDE 9
#define G_PAD 12
#define G_DIL 15

DEVICE_FN KEY_T site_key(int b, int z, int y, int x, const GLOBAL int* shape)
{
    return (((KEY_T)b * shape[0] + z) * shape[1] + y) * shape[2] + x;
}

// The first position in keys[lo, hi) holding a key >= want.
DEVICE_FN int lower_bound(const GLOBAL KEY_T* keys, int lo, int hi, KEY_T want)
{
    while (lo < hi) {
        const int mid = (int)(((unsigned)lo + (unsigned)hi) >> 1);
        if (keys[mid] < want)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

// A regular layer's strides compiled in (-DSTRIDE_D=.. -DSTRIDE_H=.. -DSTRIDE_W=..), so that its divisions
// are by constants; else read from geo.
#ifdef STRIDE_D
#define STRIDE_OF(axis, geo) ((axis) == 0 ? STRIDE_D : (axis) == 1 ? STRIDE_H : STRIDE_W)
#else
#define STRIDE_OF(axis, geo) ((geo)[G_STRIDE + (axis)])
#endif

// The output coordinate that input coordinate `coord` reaches along `axis` through kernel index i, or -1.
DEVICE_FN int output_coord(int coord, int i, int axis, const GLOBAL int* geo)
{
    const int q = coord + geo[G_PAD + axis] - i * geo[G_DIL + axis], s = STRIDE_OF(axis, geo);
    if (q < 0 || q % s != 0 || q / s >= geo[G_OUT + axis])
        return -1;
    return q / s;
}

KERNEL void sparse_keys(const GLOBAL int* RESTRICT indices, const GLOBAL int* RESTRICT geo,
                        GLOBAL KEY_T* RESTRICT keys, int n)
{
    const int64 r = GLOBAL_ID_X;
    if (r >= n)
        return;
    const GLOBAL int* site = indices + 4 * r;
    keys[r] = site_key(site[0], site[1], site[2], site[3], geo + G_IN);
}

KERNEL void sparse_fill(GLOBAL int* RESTRICT a, int value, int64 count)
{
    const int64 i = GLOBAL_ID_X;
    if (i < count)
        a[i] = value;
}

// lower_bound where the answer is expected near lo: steps of 1, 2, 4, ... then a binary search.
DEVICE_FN int gallop(const GLOBAL KEY_T* keys, int lo, int hi, KEY_T want)
{
    int step = 1;
    while (step < hi - lo && keys[lo + step - 1] < want) {
        lo += step;
        step <<= 1;
    }
    return lower_bound(keys, lo, min(hi, lo + step), want);
}

// Work-item (run, row): the SEARCH_RUN sites from run * SEARCH_RUN and their taps (i, j, 0..kw-1) with
// row = i * kh + j, up to the centre. The keys of the grid row (b, z + dz, y + dy) that a tap row reads
// start at P = key(b, z + dz, y + dy, 0), which only grows along the run, so its position is a gallop
// from the previous site's; each tap's key P + x' then lies at most x' - x'' positions after the
// previous tap's P + x''. nbr starts filled with -1 (mirrored entries are written only where a site is
// found).
KERNEL void sparse_subm_neighbours(const GLOBAL int* RESTRICT indices, const GLOBAL KEY_T* RESTRICT keys,
                                   const GLOBAL int* RESTRICT geo, GLOBAL int* RESTRICT nbr, int n, int rows)
{
    const int64 item = GLOBAL_ID_X;
    const int runs = (n + SEARCH_RUN - 1) / SEARCH_RUN;
    if (item >= (int64)runs * rows)
        return;
    const int run = (int)(item / rows), row = (int)(item - (int64)run * rows);
    const int w = geo[G_IN + 2], kh = geo[G_KERNEL + 1], kw = geo[G_KERNEL + 2];
    const int taps = geo[G_KERNEL] * kh * kw, centre = taps / 2;
    const int i = row / kh, j = row - i * kh;
    const int dz = i * geo[G_DIL] - geo[G_PAD], dy = j * geo[G_DIL + 1] - geo[G_PAD + 1];
    const int dw = geo[G_DIL + 2], pw = geo[G_PAD + 2];
    const int first = run * SEARCH_RUN, last = min(n, first + SEARCH_RUN);
    int start = -1;  // the position of the previous site's P
    for (int r = first; r < last; ++r) {
        const GLOBAL int* site = indices + 4 * (int64)r;
        const int z = site[1] + dz, y = site[2] + dy;
        const bool inside = z >= 0 && z < geo[G_IN] && y >= 0 && y < geo[G_IN + 1];
        // Taps up to the centre read sites before this one: every search ends at r.
        KEY_T row_key = 0;
        int pos = 0, prev = 0;  // pos: the position of row_key + prev
        if (inside) {
            row_key = site_key(site[0], z, y, 0, geo + G_IN);
            pos = start < 0 ? lower_bound(keys, 0, r, row_key) : gallop(keys, start, r, row_key);
            start = pos;
        }
        for (int l = 0; l < kw; ++l) {
            const int t = row * kw + l;
            GLOBAL int* slot = nbr + (int64)r * taps + t;
            if (t == centre) {
                *slot = r;
                break;
            }
            const int x = site[3] + l * dw - pw;
            int found = -1;
            if (inside && x >= 0 && x < w) {
                pos = lower_bound(keys, pos, min(r, pos + x - prev + 1), row_key + x);
                prev = x;
                if (pos < r && keys[pos] == row_key + x)
                    found = pos;
            }
            *slot = found;
            if (found >= 0)
                nbr[(int64)found * taps + (taps - 1 - t)] = r;
        }
    }
}

// How many taps of input site s reach an output (the product of the per-axis counts).
KERNEL void sparse_candidate_counts(const GLOBAL int* RESTRICT indices, const GLOBAL int* RESTRICT geo,
                                    GLOBAL int* RESTRICT counts, int n)
{
    const int64 s = GLOBAL_ID_X;
    if (s >= n)
        return;
    const GLOBAL int* site = indices + 4 * s;
    int count = 1;
#pragma unroll
    for (int axis = 0; axis < 3; ++axis) {
        int reach = 0;
        for (int i = 0; i < geo[G_KERNEL + axis]; ++i)
            reach += output_coord(site[1 + axis], i, axis, geo) >= 0;
        count *= reach;
    }
    counts[s] = count;
}

// Input site s's output keys at offsets[s], in tap order, each with the value s * K + t.
KERNEL void sparse_candidates(const GLOBAL int* RESTRICT indices, const GLOBAL int* RESTRICT geo,
                              const GLOBAL int* RESTRICT offsets, GLOBAL KEY_T* RESTRICT candidates,
                              GLOBAL int* RESTRICT values, int n)
{
    const int64 s = GLOBAL_ID_X;
    if (s >= n)
        return;
    const GLOBAL int* site = indices + 4 * s;
    const int kd = geo[G_KERNEL], kh = geo[G_KERNEL + 1], kw = geo[G_KERNEL + 2];
    int next = offsets[s];
    for (int i = 0; i < kd; ++i) {
        const int oz = output_coord(site[1], i, 0, geo);
        if (oz < 0)
            continue;
        for (int j = 0; j < kh; ++j) {
            const int oy = output_coord(site[2], j, 1, geo);
            if (oy < 0)
                continue;
            for (int l = 0; l < kw; ++l) {
                const int ox = output_coord(site[3], l, 2, geo);
                if (ox < 0)
                    continue;
                candidates[next] = site_key(site[0], oz, oy, ox, geo + G_OUT);
                values[next++] = (int)s * kd * kh * kw + (i * kh + j) * kw + l;
            }
        }
    }
}

// One pass of a stable least-significant-digit radix sort of keys with values, RADIX_BITS per pass.
// Work-item i owns the keys [i * chunk, (i + 1) * chunk); counts[d * items + i] is how many of them have
// digit d, so the exclusive scan of counts is where item i's first key of digit d goes.
#define RADIX (1 << RADIX_BITS)

KERNEL void radix_count(const GLOBAL KEY_T* RESTRICT keys, GLOBAL int* RESTRICT counts, int n, int chunk, int items,
                        int shift)
{
    const int64 i = GLOBAL_ID_X;
    if (i >= items)
        return;
    int count[RADIX];
    for (int d = 0; d < RADIX; ++d)
        count[d] = 0;
    const int64 start = i * chunk, end = min((int64)n, start + chunk);
    for (int64 k = start; k < end; ++k)
        count[(int)(keys[k] >> shift) & (RADIX - 1)] += 1;
    for (int d = 0; d < RADIX; ++d)
        counts[(int64)d * items + i] = count[d];
}

KERNEL void radix_scatter(const GLOBAL KEY_T* RESTRICT keys, const GLOBAL int* RESTRICT values,
                          const GLOBAL int* RESTRICT offsets, GLOBAL KEY_T* RESTRICT out_keys,
                          GLOBAL int* RESTRICT out_values, int n, int chunk, int items, int shift)
{
    const int64 i = GLOBAL_ID_X;
    if (i >= items)
        return;
    int next[RADIX];
    for (int d = 0; d < RADIX; ++d)
        next[d] = offsets[(int64)d * items + i];
    const int64 start = i * chunk, end = min((int64)n, start + chunk);
    for (int64 k = start; k < end; ++k) {
        const KEY_T key = keys[k];
        const int to = next[(int)(key >> shift) & (RADIX - 1)]++;
        out_keys[to] = key;
        out_values[to] = values[k];
    }
}

// Exclusive prefix sums of n ints into out[0..n], out[n] the total, in blocks of SCAN_LOCAL work-items
// x SCAN_PER_ITEM consecutive elements. scan_blocks scans each block and writes its total to sums; with
// more than one block the host scans sums the same way and scan_add adds each block's base.
#define SCAN_BLOCK (SCAN_LOCAL * SCAN_PER_ITEM)

KERNEL void scan_blocks(const GLOBAL int* RESTRICT in, GLOBAL int* RESTRICT out, GLOBAL int* RESTRICT sums, int n,
                        int blocks)
{
    LOCAL_MEM int part[2 * SCAN_LOCAL];
    const int lid = (int)LOCAL_ID(0), group = GROUP_ID(0);
    const int64 first = (int64)group * SCAN_BLOCK + (int64)lid * SCAN_PER_ITEM;
    int total = 0;
    for (int q = 0; q < SCAN_PER_ITEM; ++q)
        if (first + q < n)
            total += in[first + q];
    // Inclusive scan of the work-items' totals (Hillis-Steele, two buffers).
    part[lid] = total;
    BARRIER();
    int src = 0;
    for (int step = 1; step < SCAN_LOCAL; step <<= 1) {
        const int v = part[src * SCAN_LOCAL + lid] + (lid >= step ? part[src * SCAN_LOCAL + lid - step] : 0);
        src = 1 - src;
        part[src * SCAN_LOCAL + lid] = v;
        BARRIER();
    }
    const int inclusive = part[src * SCAN_LOCAL + lid];
    int run = inclusive - total;
    for (int q = 0; q < SCAN_PER_ITEM; ++q)
        if (first + q < n) {
            const int v = in[first + q];
            out[first + q] = run;
            run += v;
        }
    if (lid == SCAN_LOCAL - 1) {
        sums[group] = inclusive;
        if (blocks == 1)
            out[n] = inclusive;
    }
}

KERNEL void scan_add(GLOBAL int* RESTRICT out, const GLOBAL int* RESTRICT bases, int n, int blocks)
{
    const int64 i = GLOBAL_ID_X;
    if (i < n)
        out[i] += bases[i / SCAN_BLOCK];
    else if (i == n)
        out[n] = bases[blocks];
}

KERNEL void sparse_unique_flags(const GLOBAL KEY_T* RESTRICT sorted, GLOBAL int* RESTRICT flags, int n)
{
    const int64 i = GLOBAL_ID_X;
    if (i < n)
        flags[i] = i == 0 || sorted[i] != sorted[i - 1];
}

// The sites of the distinct keys, at their ranks (the exclusive scan of the flags).
KERNEL void sparse_unique_sites(const GLOBAL KEY_T* RESTRICT sorted, const GLOBAL int* RESTRICT flags,
                                const GLOBAL int* RESTRICT ranks, const GLOBAL int* RESTRICT geo,
                                GLOBAL int* RESTRICT out_indices, int n)
{
    const int64 i = GLOBAL_ID_X;
    if (i >= n || !flags[i])
        return;
    KEY_T key = sorted[i];
    GLOBAL int* site = out_indices + 4 * (int64)ranks[i];
    for (int axis = 2; axis >= 0; --axis) {
        const int size = geo[G_OUT + axis];
        site[1 + axis] = (int)(key % size);
        key /= size;
    }
    site[0] = (int)key;
}

// Sorted candidate i is output row ranks[i] + flags[i] - 1 (its key's rank) reading input s through t,
// its value s * K + t. nbr starts at -1.
KERNEL void sparse_regular_neighbours(const GLOBAL int* RESTRICT values, const GLOBAL int* RESTRICT flags,
                                      const GLOBAL int* RESTRICT ranks, GLOBAL int* RESTRICT nbr, int n, int taps)
{
    const int64 i = GLOBAL_ID_X;
    if (i >= n)
        return;
    const int v = values[i], s = v / taps;
    nbr[(int64)(ranks[i] + flags[i] - 1) * taps + (v - s * taps)] = s;
}

// The inverse layer's map: output row r of the regular layer reads input s through t, so the inverse's
// output row s reads its input row r through t. inv starts at -1.
KERNEL void sparse_swap_neighbours(const GLOBAL int* RESTRICT nbr, GLOBAL int* RESTRICT inv, int n_out, int taps)
{
    const int64 item = GLOBAL_ID_X;
    if (item >= (int64)n_out * taps)
        return;
    const int s = nbr[item];
    if (s >= 0)
        inv[(int64)s * taps + item % taps] = (int)(item / taps);
}

// The pair lists (the canonical form) from the neighbour map: tap-major flags, their exclusive scan
// (positions), then each pair at its position; per tap ascending in the output row, as the map's rows.
KERNEL void sparse_pair_flags(const GLOBAL int* RESTRICT nbr, GLOBAL int* RESTRICT flags, int n_out, int taps)
{
    const int64 item = GLOBAL_ID_X;
    if (item >= (int64)n_out * taps)
        return;
    const int t = (int)(item / n_out), r = (int)(item - (int64)t * n_out);
    flags[item] = nbr[(int64)r * taps + t] >= 0;
}

KERNEL void sparse_pair_lists(const GLOBAL int* RESTRICT nbr, const GLOBAL int* RESTRICT flags,
                              const GLOBAL int* RESTRICT positions, GLOBAL int* RESTRICT in_rows,
                              GLOBAL int* RESTRICT out_rows, int n_out, int taps)
{
    const int64 item = GLOBAL_ID_X;
    if (item >= (int64)n_out * taps || !flags[item])
        return;
    const int t = (int)(item / n_out), r = (int)(item - (int64)t * n_out), p = positions[item];
    in_rows[p] = nbr[(int64)r * taps + t];
    out_rows[p] = r;
}

// offsets[t] = positions[t * n_out] for t = 0..K: where each tap's pairs start, the total last.
KERNEL void sparse_tap_offsets(const GLOBAL int* RESTRICT positions, GLOBAL int* RESTRICT offsets, int n_out, int taps)
{
    const int64 t = GLOBAL_ID_X;
    if (t <= taps)
        offsets[t] = positions[t * n_out];
}

KERNEL void sparse_gather_rows(const GLOBAL float* RESTRICT x, const GLOBAL int* RESTRICT order,
                               GLOBAL float* RESTRICT y, int n, int c)
{
    const int64 i = GLOBAL_ID_X;
    if (i < (int64)n * c)
        y[i] = x[(int64)order[i / c] * c + i % c];
}
