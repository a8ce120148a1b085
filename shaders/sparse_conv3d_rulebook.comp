#version 450
// sparse_conv3d's rulebook on the device: the stages of kernels/sparse_conv3d_rulebook.h (same
// algorithms, same names), one pipeline per stage (STAGE). The result is the neighbour map nbr
// (n_out, K) int32: the input row output row r reads through tap t, or -1, and for GPUs the pair lists
// made from it; every stage writes each element from one invocation, so both are the same on every run.
//
// Keys here pack the fields (b, z, y, x) into bits (x lowest, FIELD_BITS per field of the grid keyed),
// which orders them as sites are ordered and decodes with shifts; as a uvec2 (low, high word), stored
// as one uint per key unless WIDE (two, low word first). Sites, counts and rows are ints.
#extension GL_EXT_control_flow_attributes : require

layout(local_size_x_id = 0) in;

const int KEYS = 0, FILL = 1, SUBM_NEIGHBOURS = 2, CANDIDATE_COUNTS = 3, CANDIDATES = 4, RADIX_COUNT = 5,
          RADIX_SCATTER = 6, SCAN_BLOCKS = 7, SCAN_ADD = 8, UNIQUE_FLAGS = 9, UNIQUE_SITES = 10,
          REGULAR_NEIGHBOURS = 11, SWAP_NEIGHBOURS = 12, COPY_TOTAL = 13, PAIR_FLAGS = 14, PAIR_LISTS = 15,
          TAP_OFFSETS = 16;
layout(constant_id = 1) const int STAGE = 0;
layout(constant_id = 2) const bool WIDE = false;
layout(constant_id = 3) const int RADIX_BITS = 4;
layout(constant_id = 4) const int SCAN_PER_ITEM = 4;
layout(constant_id = 5) const int SEARCH_RUN = 1;
const int RADIX = 1 << RADIX_BITS;
const int LOCAL = int(gl_WorkGroupSize.x);

// geo: input grid, output grid, kernel, stride, padding, dilation (3 each); FIELD_BITS: the bits of the
// z, y and x fields of the keys of this dispatch's grid; n: the items (sites, keys, elements); a..d: the
// stage's own (see each stage).
layout(push_constant) uniform Push {
    int geo[18];
    int field_bits[3];
    int n, a, b, c, d;
} p;

const int G_IN = 0, G_OUT = 3, G_KERNEL = 6, G_STRIDE = 9, G_PAD = 12, G_DIL = 15;

layout(std430, binding = 0) buffer B0 { uint v[]; } b0;
layout(std430, binding = 1) buffer B1 { uint v[]; } b1;
layout(std430, binding = 2) buffer B2 { uint v[]; } b2;
layout(std430, binding = 3) buffer B3 { uint v[]; } b3;
layout(std430, binding = 4) buffer B4 { uint v[]; } b4;
layout(std430, binding = 5) buffer B5 { uint v[]; } b5;

#define LOAD_KEY(buf, i) (WIDE ? uvec2(buf.v[2 * (i)], buf.v[2 * (i) + 1]) : uvec2(buf.v[i], 0u))
#define STORE_KEY(buf, i, key) \
    if (WIDE) { buf.v[2 * (i)] = (key).x; buf.v[2 * (i) + 1] = (key).y; } else { buf.v[i] = (key).x; }

bool key_less(uvec2 a, uvec2 b) {
    return a.y < b.y || (a.y == b.y && a.x < b.x);
}

uvec2 shift_left(uint v, int s) {
    if (s == 0)
        return uvec2(v, 0u);
    return s < 32 ? uvec2(v << s, v >> (32 - s)) : uvec2(0u, v << (s - 32));
}

// The low word of key >> s.
uint shift_right(uvec2 key, int s) {
    if (s == 0)
        return key.x;
    return s < 32 ? (key.x >> s) | (key.y << (32 - s)) : key.y >> (s - 32);
}

uvec2 site_key(int b, int z, int y, int x) {
    const int sy = p.field_bits[2], sz = sy + p.field_bits[1], sb = sz + p.field_bits[0];
    return shift_left(uint(b), sb) | shift_left(uint(z), sz) | shift_left(uint(y), sy) | uvec2(uint(x), 0u);
}

ivec4 key_site(uvec2 key) {
    const int sy = p.field_bits[2], sz = sy + p.field_bits[1], sb = sz + p.field_bits[0];
    return ivec4(shift_right(key, sb), shift_right(key, sz) & ((1u << p.field_bits[0]) - 1u),
                 shift_right(key, sy) & ((1u << p.field_bits[1]) - 1u), key.x & ((1u << p.field_bits[2]) - 1u));
}

ivec4 site_b0(int r) {
    return ivec4(b0.v[4 * r], b0.v[4 * r + 1], b0.v[4 * r + 2], b0.v[4 * r + 3]);
}

// The first position in the keys of b1 [lo, hi) holding a key >= want.
int lower_bound(int lo, int hi, uvec2 want) {
    while (lo < hi) {
        const int mid = int((uint(lo) + uint(hi)) >> 1);
        if (key_less(LOAD_KEY(b1, mid), want))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int gallop(int lo, int hi, uvec2 want) {
    int step = 1;
    while (step < hi - lo && key_less(LOAD_KEY(b1, lo + step - 1), want)) {
        lo += step;
        step <<= 1;
    }
    return lower_bound(lo, min(hi, lo + step), want);
}

int output_coord(int coord, int i, int axis) {
    const int q = coord + p.geo[G_PAD + axis] - i * p.geo[G_DIL + axis], s = p.geo[G_STRIDE + axis];
    if (q < 0 || q % s != 0 || q / s >= p.geo[G_OUT + axis])
        return -1;
    return q / s;
}

// b0 sites -> b1 keys.
void keys() {
    const int r = int(gl_GlobalInvocationID.x);
    if (r >= p.n)
        return;
    const ivec4 s = site_b0(r);
    const uvec2 key = site_key(s.x, s.y, s.z, s.w);
    STORE_KEY(b1, r, key);
}

// b0[0..n) = a.
void fill() {
    const int i = int(gl_GlobalInvocationID.x);
    if (i < p.n)
        b0.v[i] = uint(p.a);
}

// b0 sites, b1 keys -> b2 nbr (filled with -1 before); a = tap rows up to the centre's. As
// sparse_subm_neighbours: invocation (run, row), a gallop along the run, each tap after the last.
void subm_neighbours() {
    const int rows = p.a, runs = (p.n + SEARCH_RUN - 1) / SEARCH_RUN;
    const int item = int(gl_GlobalInvocationID.x);
    if (item >= runs * rows)
        return;
    const int run = item / rows, row = item - run * rows;
    const int w = p.geo[G_IN + 2], kh = p.geo[G_KERNEL + 1], kw = p.geo[G_KERNEL + 2];
    const int taps = p.geo[G_KERNEL] * kh * kw, centre = taps / 2;
    const int i = row / kh, j = row - i * kh;
    const int dz = i * p.geo[G_DIL] - p.geo[G_PAD], dy = j * p.geo[G_DIL + 1] - p.geo[G_PAD + 1];
    const int dw = p.geo[G_DIL + 2], pw = p.geo[G_PAD + 2];
    const int first = run * SEARCH_RUN, last = min(p.n, first + SEARCH_RUN);
    int start = -1;
    for (int r = first; r < last; ++r) {
        const ivec4 site = site_b0(r);
        const int z = site.y + dz, y = site.z + dy;
        const bool inside = z >= 0 && z < p.geo[G_IN] && y >= 0 && y < p.geo[G_IN + 1];
        uvec2 row_key = uvec2(0u);
        int pos = 0, prev = 0;
        if (inside) {
            row_key = site_key(site.x, z, y, 0);
            pos = start < 0 ? lower_bound(0, r, row_key) : gallop(start, r, row_key);
            start = pos;
        }
        for (int l = 0; l < kw; ++l) {
            const int t = row * kw + l;
            if (t == centre) {
                b2.v[r * taps + t] = uint(r);
                break;
            }
            const int x = site.w + l * dw - pw;
            int found = -1;
            if (inside && x >= 0 && x < w) {
                const uvec2 want = uvec2(row_key.x | uint(x), row_key.y);
                pos = lower_bound(pos, min(r, pos + x - prev + 1), want);
                prev = x;
                if (pos < r && LOAD_KEY(b1, pos) == want)
                    found = pos;
            }
            b2.v[r * taps + t] = uint(found);
            if (found >= 0)
                b2.v[found * taps + taps - 1 - t] = uint(r);
        }
    }
}

// b0 sites -> b1 counts: the taps of each input that reach an output.
void candidate_counts() {
    const int s = int(gl_GlobalInvocationID.x);
    if (s >= p.n)
        return;
    const ivec4 site = site_b0(s);
    int count = 1;
    for (int axis = 0; axis < 3; ++axis) {
        int reach = 0;
        for (int i = 0; i < p.geo[G_KERNEL + axis]; ++i)
            reach += output_coord(site[1 + axis], i, axis) >= 0 ? 1 : 0;
        count *= reach;
    }
    b1.v[s] = uint(count);
}

// b0 sites, b1 offsets -> b2 candidate keys (output grid), b3 values s * K + t.
void candidates() {
    const int s = int(gl_GlobalInvocationID.x);
    if (s >= p.n)
        return;
    const ivec4 site = site_b0(s);
    const int kd = p.geo[G_KERNEL], kh = p.geo[G_KERNEL + 1], kw = p.geo[G_KERNEL + 2];
    int next = int(b1.v[s]);
    for (int i = 0; i < kd; ++i) {
        const int oz = output_coord(site.y, i, 0);
        if (oz < 0)
            continue;
        for (int j = 0; j < kh; ++j) {
            const int oy = output_coord(site.z, j, 1);
            if (oy < 0)
                continue;
            for (int l = 0; l < kw; ++l) {
                const int ox = output_coord(site.w, l, 2);
                if (ox < 0)
                    continue;
                const uvec2 key = site_key(site.x, oz, oy, ox);
                STORE_KEY(b2, next, key);
                b3.v[next++] = uint(s * kd * kh * kw + (i * kh + j) * kw + l);
            }
        }
    }
}

// Radix sort pass over b0 keys (b1 values) of n; a = keys per invocation, b = invocations, c = shift.
// RADIX_COUNT -> b2 counts[d * b + i]; RADIX_SCATTER with b2 offsets -> b3 keys, b4 values.
uint count_slots[STAGE == RADIX_COUNT || STAGE == RADIX_SCATTER ? RADIX : 1];

void radix_pass() {
    const int i = int(gl_GlobalInvocationID.x), chunk = p.a, items = p.b, shift = p.c;
    if (i >= items)
        return;
    for (int d = 0; d < RADIX; ++d)
        count_slots[d] = STAGE == RADIX_COUNT ? 0u : b2.v[d * items + i];
    const int start = i * chunk, end = min(p.n, start + chunk);
    for (int k = start; k < end; ++k) {
        const uvec2 key = LOAD_KEY(b0, k);
        const uint d = shift_right(key, shift) & uint(RADIX - 1);
        if (STAGE == RADIX_SCATTER) {
            const int to = int(count_slots[d]);
            STORE_KEY(b3, to, key);
            b4.v[to] = b1.v[k];
        }
        count_slots[d] += 1u;
    }
    if (STAGE == RADIX_COUNT)
        for (int d = 0; d < RADIX; ++d)
            b2.v[d * items + i] = count_slots[d];
}

// Exclusive prefix sums of b0[0..n) into b1[0..n], the total last, in blocks of LOCAL x SCAN_PER_ITEM.
// SCAN_BLOCKS -> b1 per block, b2 block totals (a = blocks); SCAN_ADD adds b2's scanned bases (a =
// blocks, b = the block size of the SCAN_BLOCKS dispatch).
const int SCAN_BLOCK = LOCAL * SCAN_PER_ITEM;
shared uint part[STAGE == SCAN_BLOCKS ? 2 * LOCAL : 1];

void scan_blocks() {
    const int lid = int(gl_LocalInvocationID.x), group = int(gl_WorkGroupID.x);
    const int first = group * SCAN_BLOCK + lid * SCAN_PER_ITEM;
    uint total = 0u;
    for (int q = 0; q < SCAN_PER_ITEM; ++q)
        if (first + q < p.n)
            total += b0.v[first + q];
    part[lid] = total;
    barrier();
    int src = 0;
    for (int step = 1; step < LOCAL; step <<= 1) {
        const uint v = part[src * LOCAL + lid] + (lid >= step ? part[src * LOCAL + lid - step] : 0u);
        src = 1 - src;
        part[src * LOCAL + lid] = v;
        barrier();
    }
    const uint inclusive = part[src * LOCAL + lid];
    uint run = inclusive - total;
    for (int q = 0; q < SCAN_PER_ITEM; ++q)
        if (first + q < p.n) {
            const uint v = b0.v[first + q];
            b1.v[first + q] = run;
            run += v;
        }
    if (lid == LOCAL - 1) {
        b2.v[group] = inclusive;
        if (p.a == 1)
            b1.v[p.n] = inclusive;
    }
}

void scan_add() {
    const int i = int(gl_GlobalInvocationID.x);
    if (i < p.n)
        b1.v[i] += b2.v[i / p.b];
    else if (i == p.n)
        b1.v[p.n] = b2.v[p.a];
}

// b0 sorted keys -> b1 flags: the first of each distinct key.
void unique_flags() {
    const int i = int(gl_GlobalInvocationID.x);
    if (i < p.n)
        b1.v[i] = i == 0 || LOAD_KEY(b0, i) != LOAD_KEY(b0, i - 1) ? 1u : 0u;
}

// b0 sorted keys, b1 flags, b2 ranks -> b3 output sites.
void unique_sites() {
    const int i = int(gl_GlobalInvocationID.x);
    if (i >= p.n || b1.v[i] == 0u)
        return;
    const ivec4 site = key_site(LOAD_KEY(b0, i));
    const int r = int(b2.v[i]);
    [[unroll]] for (int k = 0; k < 4; ++k)
        b3.v[4 * r + k] = uint(site[k]);
}

// b0 sorted values, b1 flags, b2 ranks -> b3 nbr (filled with -1 before); a = K.
void regular_neighbours() {
    const int i = int(gl_GlobalInvocationID.x);
    if (i >= p.n)
        return;
    const int v = int(b0.v[i]), taps = p.a, s = v / taps;
    b3.v[(int(b2.v[i]) + int(b1.v[i]) - 1) * taps + v - s * taps] = uint(s);
}

// b0 nbr (n rows of a taps) -> b1 the inverse map (filled with -1 before).
void swap_neighbours() {
    const int item = int(gl_GlobalInvocationID.x), taps = p.a;
    if (item >= p.n * taps)
        return;
    const int s = int(b0.v[item]);
    if (s >= 0)
        b1.v[s * taps + item % taps] = uint(item / taps);
}

// The pair lists from the neighbour map (n rows of a taps): PAIR_FLAGS b0 nbr -> b1 tap-major flags;
// PAIR_LISTS with b2 their exclusive scan (positions) -> b3 in_rows, b4 out_rows; TAP_OFFSETS b2
// positions -> b3 [t] = positions[t * n] for t = 0..a.
void pair_flags() {
    const int item = int(gl_GlobalInvocationID.x), taps = p.a;
    if (item >= p.n * taps)
        return;
    const int t = item / p.n, r = item - t * p.n;
    b1.v[item] = int(b0.v[r * taps + t]) >= 0 ? 1u : 0u;
}

void pair_lists() {
    const int item = int(gl_GlobalInvocationID.x), taps = p.a;
    if (item >= p.n * taps || b1.v[item] == 0u)
        return;
    const int t = item / p.n, r = item - t * p.n, at = int(b2.v[item]);
    b3.v[at] = b0.v[r * taps + t];
    b4.v[at] = uint(r);
}

void tap_offsets() {
    const int t = int(gl_GlobalInvocationID.x);
    if (t <= p.a)
        b3.v[t] = b2.v[t * p.n];
}

// b1[a] = b0[n]: a scan's total into a small buffer the host reads.
void copy_total() {
    if (gl_GlobalInvocationID.x == 0)
        b1.v[p.a] = b0.v[p.n];
}

void main() {
    if (STAGE == KEYS) keys();
    else if (STAGE == FILL) fill();
    else if (STAGE == SUBM_NEIGHBOURS) subm_neighbours();
    else if (STAGE == CANDIDATE_COUNTS) candidate_counts();
    else if (STAGE == CANDIDATES) candidates();
    else if (STAGE == RADIX_COUNT || STAGE == RADIX_SCATTER) radix_pass();
    else if (STAGE == SCAN_BLOCKS) scan_blocks();
    else if (STAGE == SCAN_ADD) scan_add();
    else if (STAGE == UNIQUE_FLAGS) unique_flags();
    else if (STAGE == UNIQUE_SITES) unique_sites();
    else if (STAGE == REGULAR_NEIGHBOURS) regular_neighbours();
    else if (STAGE == SWAP_NEIGHBOURS) swap_neighbours();
    else if (STAGE == COPY_TOTAL) copy_total();
    else if (STAGE == PAIR_FLAGS) pair_flags();
    else if (STAGE == PAIR_LISTS) pair_lists();
    else if (STAGE == TAP_OFFSETS) tap_offsets();
}
