"""conv2d, conv_transpose2d and deform_conv2d over dask arrays: arrays larger than one machine's memory, or one
device's.

`conv2d(x, w, b, ...)` takes a `dask.array.Array` (N, C, H, W) chunked along N, H and W and returns a lazy
dask array equal to `convbackends.conv2d` on the whole array. Every output block is one task: its input
block plus the halo its receptive field reaches into the next blocks (`dask.array.overlap.overlap`, the halo
exchange of `map_overlap`), convolved on the worker by a layer prepared once per worker process.

How the array is cut, per spatial axis (C is never cut: chunks along C are merged first):

- conv2d: output row o reads padded rows [o*s, o*s + (k-1)*d] (s stride, d dilation, k kernel). A block
  starts on an input row r with (r + pad_top) divisible by s, so the output rows of consecutive blocks meet
  exactly; it borrows max(0, (k-1)*d + 1 - s) rows of the next block. Chunk edges that are not aligned so
  (only strided layers have them) move forward by less than a stride: `x` is rechunked.
- conv_transpose2d: input row i reaches output rows [i*s - pad_top, i*s - pad_top + (k-1)*d], so input
  block [c, c') owns output rows [c*s - pad_top, c'*s - pad_top) and borrows floor((k-1)*d / s) rows of
  the block before it; any chunking aligns.
- deform_conv2d: every sample lies within max_offset of a conv2d tap, so a block borrows conv2d's halo plus
  ceil(max_offset) + 1 rows from the next block (the bilinear's second row) and ceil(max_offset) rows or a
  few more from the block before, so many that it starts a whole number `lead` of strides ahead of its own
  outputs. Every block runs the layer with the whole array's padding, so that x's edges stay the layer's
  edges (a sample past them reads 0 exactly as on the whole array, inf and NaN pixels included); the
  block's offsets and mask are placed at its own outputs (from `lead` on) and the other outputs, computed
  with zero offsets, are dropped. Each task checks its offsets against max_offset (a NaN offset reads NaN,
  as on the whole array).
- Each block must be at least as long as the halo it lends, and must own at least one output
  row: chunks too small for that are merged with their neighbour (a rechunk).

conv2d's zero padding is added by the blocks at the array's edges and the transposed layer's crop is cut
from them, so every task runs the same padding-free layer (deform_conv2d's: the whole array's padding): a
worker prepares it once, found by the layer's spec and a content hash of the weights computed once on the
client (`dask.base.tokenize`).
The weights travel as one key of the graph, to each worker once, not inside every task.

Backends and devices are resolved on each worker: `backend="auto"` (the default) takes the worker's GPU
where it has one, else numpy; `device=None` its best device. Chunks are numpy arrays (dask's default).
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.base import tokenize
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(f"convbackends.dask needs dask ({exc}): pip install 'convbackends[dask]'",
                              name=exc.name) from None

from .arrays import host_array
from .ops.conv2d import Conv2d
from .ops.conv_transpose2d import ConvTranspose2d, ConvTranspose2dSpec
from .ops.deform_conv2d import DeformConv2d, DeformConv2dSpec
from .runtime import check_name
from .spec import Conv2dSpec, check_float32

__all__ = ["conv2d", "conv_transpose2d", "deform_conv2d", "cache_info", "clear_cache"]


@dataclass(frozen=True)
class AxisPlan:
    """How one spatial axis is cut. Each block takes `before` rows from the block before it (none for the
    first) and `after` from the one after it (none for the last); the first block gets `pad_first` zero
    rows in front and the last `pad_last` behind; the layer's output then loses `trim_first` rows at the
    front of the first block and `trim_last` at the back of the last."""

    chunks: tuple[int, ...]
    out_chunks: tuple[int, ...]
    before: int = 0
    after: int = 0
    pad_first: int = 0
    pad_last: int = 0
    trim_first: int = 0
    trim_last: int = 0

    def pads(self, block: int, blocks: int) -> tuple[int, int]:
        return (self.pad_first if block == 0 else 0, self.pad_last if block == blocks - 1 else 0)

    def trims(self, block: int, blocks: int) -> tuple[int, int]:
        return (self.trim_first if block == 0 else 0, self.trim_last if block == blocks - 1 else 0)


def _interior_edges(chunks) -> list[int]:
    edges, position = [], 0
    for size in chunks[:-1]:
        position += size
        edges.append(position)
    return edges


def _spaced(edges: list[int], size: int, minimum: int) -> list[int]:
    """The edges kept so that every chunk, the last included, is at least `minimum` long."""
    kept = []
    for edge in edges:
        if edge - (kept[-1] if kept else 0) >= minimum:
            kept.append(edge)
    while kept and size - kept[-1] < minimum:
        kept.pop()
    return kept


def _chunks(edges: list[int], size: int) -> tuple[int, ...]:
    bounds = [0, *edges, size]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _stride_grid(chunks, size: int, out: int, s: int, pad_begin: int, minimum: int) -> tuple[tuple, tuple]:
    """(input chunks, output chunks) of a strided layer: the interior edges moved forward onto the stride grid
    (edge + pad_begin divisible by s), then spaced at least `minimum` apart."""
    outputs = []  # the first output row of each block after the first
    for edge in _interior_edges(chunks):
        o = -(-(edge + pad_begin) // s)
        if 0 < o < out and 0 < o * s - pad_begin < size and (not outputs or o > outputs[-1]):
            outputs.append(o)
    edges = _spaced([o * s - pad_begin for o in outputs], size, minimum)
    return _chunks(edges, size), _chunks([(e + pad_begin) // s for e in edges], out)


def conv2d_axis(chunks, size: int, out: int, k: int, s: int, d: int, pad_begin: int, pad_end: int) -> AxisPlan:
    """conv2d along one axis (see the module docstring): edges moved forward onto the stride grid."""
    halo = max(0, (k - 1) * d + 1 - s)
    in_chunks, out_chunks = _stride_grid(chunks, size, out, s, pad_begin, max(1, halo))
    return AxisPlan(in_chunks, out_chunks, after=halo, pad_first=pad_begin, pad_last=pad_end)


def deform_conv2d_axis(chunks, size: int, out: int, k: int, s: int, d: int, pad_begin: int, reach: int) -> AxisPlan:
    """deform_conv2d along one axis, its samples at most `reach` rows (ceil(max_offset)) off the taps (see the
    module docstring): conv2d's stride grid; `before` rows such that the block starts `lead` = (before +
    pad_begin) / s outputs ahead of its own; one more row after for the bilinear's second row."""
    before = -(-(reach + pad_begin) // s) * s - pad_begin
    after = max(0, (k - 1) * d + 1 - s) + reach + 1
    in_chunks, out_chunks = _stride_grid(chunks, size, out, s, pad_begin, max(1, before, after))
    return AxisPlan(in_chunks, out_chunks, before=before, after=after)


def conv_transpose2d_axis(chunks, size: int, out: int, k: int, s: int, d: int, pad_begin: int) -> AxisPlan:
    """conv_transpose2d along one axis (see the module docstring). Every block is run with `before` rows in
    front, so the first gets them as zeros; the last gets the zero rows that reach the output's end."""
    halo = (k - 1) * d // s
    edges = [e for e in _interior_edges(chunks) if 0 < e * s - pad_begin < out]
    edges = _spaced(edges, size, max(1, halo))
    out_edges = [e * s - pad_begin for e in edges]
    beyond = pad_begin + out - size * s  # output rows past what the last block's own rows own
    pad_last = max(0, -(-beyond // s))
    return AxisPlan(_chunks(edges, size), _chunks(out_edges, out), before=halo, pad_first=halo, pad_last=pad_last,
                    trim_first=pad_begin, trim_last=pad_last * s - beyond)


def _transposed_block_padding(k: int, s: int, d: int, halo: int) -> tuple[int, int, int]:
    """(pad_begin, pad_end, output_padding) of the layer every block runs: it drops the outputs of the
    `halo` rows in front and keeps exactly stride rows per row of its own."""
    reach = (k - 1) * d + 1
    return halo * s, max(0, reach - s), max(0, s - reach)


# --- the layers prepared in each worker process -----------------------------------------------------

class PreparedLayers:
    """The layers this process has prepared, found by (op, options, backend, device, weights token).

    The weights reach a worker once per graph, but a cache by object identity would still miss across
    graphs and processes; the token is a content hash computed on the client. At most `max_layers` are
    kept, least recently used first out (a layer still running finishes; its finalizer releases it).
    Layers of device backends run one task at a time (their queues and buffers are per layer); numpy's
    keeps per-thread scratch buffers and runs concurrently.
    """

    def __init__(self, max_layers: int = 8):
        self.max_layers = max_layers
        self.prepared = 0  # layers prepared by this process, ever
        self._layers: OrderedDict[tuple, tuple[object, contextlib.AbstractContextManager]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make):
        with self._lock:  # held while preparing, so concurrent first tasks prepare once
            entry = self._layers.get(key)
            if entry is None:
                layer = make()
                self.prepared += 1
                guard = contextlib.nullcontext() if layer.backend.family == "numpy" else threading.Lock()
                entry = self._layers[key] = (layer, guard)
                while len(self._layers) > self.max_layers:
                    self._layers.popitem(last=False)
            self._layers.move_to_end(key)
            return entry

    def clear(self) -> None:
        with self._lock:
            self._layers.clear()

    def __len__(self) -> int:
        return len(self._layers)


LAYERS = PreparedLayers()
_OPS = {"conv2d": Conv2d, "conv_transpose2d": ConvTranspose2d, "deform_conv2d": DeformConv2d}


def cache_info() -> dict:
    """This process's prepared layers: {"layers": kept now, "prepared": prepared ever}. On a cluster,
    `client.run(convbackends.dask.cache_info)` asks every worker."""
    return {"layers": len(LAYERS), "prepared": LAYERS.prepared}


def clear_cache() -> None:
    """Release this process's prepared layers."""
    LAYERS.clear()


def _layer(op: str, options: tuple, weights: str, backend: str, device, w, b):
    """(this worker's prepared layer, the guard its calls take)."""
    return LAYERS.get((op, options, backend, device, weights),
                      lambda: _OPS[op](w, b, **dict(options), backend=backend, device=device))


def _run_block(block, w, b, *, op: str, options: tuple, weights: str, backend: str, device, rows: AxisPlan,
               cols: AxisPlan, block_info=None):
    """One output block: the input block with its halo, zero-padded at the array's edges, through the
    worker's prepared layer, trimmed at the array's edges."""
    location, blocks = block_info[0]["chunk-location"][2:], block_info[0]["num-chunks"][2:]
    pads = (rows.pads(location[0], blocks[0]), cols.pads(location[1], blocks[1]))
    if any(pads[0] + pads[1]):
        block = np.pad(block, ((0, 0), (0, 0), *pads))
    layer, guard = _layer(op, options, weights, backend, device, w, b)
    with guard:
        y = layer(block)
    (top, bottom), (left, right) = rows.trims(location[0], blocks[0]), cols.trims(location[1], blocks[1])
    if top or bottom or left or right:
        y = y[:, :, top:y.shape[2] - bottom, left:y.shape[3] - right]
    return y


def _output_rows(plan: AxisPlan, block: int) -> tuple[int, int]:
    start = sum(plan.out_chunks[:block])
    return start, start + plan.out_chunks[block]


def _run_deform_block(block, w, b, offset, mask=None, *, op: str, options: tuple, weights: str, backend: str, device,
                      rows: AxisPlan, cols: AxisPlan, max_offset: float, block_info=None):
    """One output block of deform_conv2d: its offsets checked against max_offset, the input block with its halo
    through the worker's prepared layer (the whole array's padding), its offsets and mask placed at the block's
    own outputs among the ones the layer computes (the others: zero offsets, outputs dropped)."""
    location = block_info[0]["chunk-location"][2:]
    own = _output_rows(rows, location[0]), _output_rows(cols, location[1])
    with np.errstate(invalid="ignore"):  # a NaN offset reads NaN, as in the whole array: not beyond the bound
        beyond = np.abs(offset) > max_offset
    if beyond.any():
        worst = float(np.abs(offset)[beyond].max())
        raise ValueError(f"offset reaches {worst:g} in the output block rows {own[0][0]}..{own[0][1] - 1}, columns "
                         f"{own[1][0]}..{own[1][1] - 1}, beyond max_offset={max_offset:g}: the halo holds only the "
                         f"pixels max_offset reaches; pass a larger max_offset")
    layer, guard = _layer(op, options, weights, backend, device, w, b)
    g = layer.spec.conv.geometry(block.shape)
    leads = [0 if location[i] == 0 else (plan.before + pad) // stride
             for i, (plan, pad, stride) in enumerate(((rows, g.pt, g.sh), (cols, g.pl, g.sw)))]
    window = (slice(None), slice(None), slice(leads[0], leads[0] + offset.shape[2]),
              slice(leads[1], leads[1] + offset.shape[3]))

    def placed(a):
        if a is None or a.shape[2:] == (g.oh, g.ow):
            return a
        full = np.zeros((*a.shape[:2], g.oh, g.ow), np.float32)
        full[window] = a
        return full

    with guard:
        y = layer(block, placed(offset), placed(mask))
    return y[window]


# --- the graph --------------------------------------------------------------------------------------

def _check_input(x) -> None:
    if not isinstance(x, da.Array):
        raise TypeError(f"x must be a dask.array.Array, got {type(x).__name__}: use convbackends.conv2d for an "
                        f"array in memory, or dask.array.from_array(x, chunks=...)")
    check_float32("x", x)
    if any(np.isnan(size) for size in x.shape):
        raise ValueError(f"x has unknown chunk sizes (shape {x.shape}): call x.compute_chunk_sizes() first")


def _graph(x, w, b, op: str, options: dict, rows: AxisPlan, cols: AxisPlan, out_channels: int, backend, device,
           run=_run_block, per_output=(), **run_options):
    """The lazy output: x rechunked to the plan (C whole), its halos exchanged, one task per output block, each
    `run` on its input block and the blocks of the `per_output` arrays (N, *, Ho, Wo) chunked as the output."""
    planned = (x.chunks[0], (x.shape[1],), rows.chunks, cols.chunks)
    if x.chunks != planned:
        x = x.rechunk(planned)
    depth = {axis: (plan.before, plan.after) for axis, plan in ((2, rows), (3, cols))
             if len(plan.chunks) > 1 and (plan.before or plan.after)}
    if depth:
        x = da.overlap.overlap(x, depth=depth, boundary="none", allow_rechunk=False)
    token = tokenize(w, b)  # the weights' content, hashed once here; the workers' layers are found by it
    options = tuple(sorted(options.items()))
    per_output = [a.rechunk((x.chunks[0], (a.shape[1],), rows.out_chunks, cols.out_chunks)) for a in per_output]
    return da.map_blocks(
        run, x, dask.delayed(w, pure=True), None if b is None else dask.delayed(b, pure=True), *per_output, op=op,
        options=options, weights=token, backend=backend, device=device, rows=rows, cols=cols, **run_options,
        chunks=(x.chunks[0], (out_channels,), rows.out_chunks, cols.out_chunks), dtype=np.float32, meta=x._meta,
        name=f"convbackends-{op}-"
        f"{tokenize(x.name, token, options, backend, device, rows, cols, [a.name for a in per_output], run_options)}")


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None, backend="auto",
           device=None):
    """conv2d over a dask array x (N, C, H, W): a lazy dask array equal to `convbackends.conv2d(x, w, b, ...)`
    on the whole array, with the same keywords. Chunks along C are merged; strided layers move H/W chunk
    edges onto the stride grid (a rechunk, see the module docstring). backend and device are resolved on
    each worker ("auto": its GPU, else numpy)."""
    _check_input(x)
    w, b = host_array("w", w), None if b is None else host_array("b", b)
    spec = Conv2dSpec.create(w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                             activation=activation)
    g = spec.geometry(x.shape)  # "same" resolved for the whole array
    rows = conv2d_axis(x.chunks[2], g.h, g.oh, g.kh, g.sh, g.dh, g.pt, g.pb)
    cols = conv2d_axis(x.chunks[3], g.w, g.ow, g.kw, g.sw, g.dw, g.pl, g.pr)
    options = {"stride": spec.stride, "dilation": spec.dilation, "groups": spec.groups,
               "activation": spec.activation, "padding": 0}
    return _graph(x, w, b, "conv2d", options, rows, cols, g.o, check_name(backend), device)


def conv_transpose2d(x, w, b=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1,
                     activation=None, output_size=None, backend="auto", device=None):
    """conv_transpose2d over a dask array x (N, C, H, W): a lazy dask array equal to
    `convbackends.conv_transpose2d(x, w, b, ...)` on the whole array, with the same keywords. Any H/W
    chunking aligns; chunks too small for the halo are merged (see the module docstring)."""
    _check_input(x)
    w, b = host_array("w", w), None if b is None else host_array("b", b)
    spec = ConvTranspose2dSpec.create(w, b, stride=stride, padding=padding, output_padding=output_padding,
                                      dilation=dilation, groups=groups, activation=activation)
    g = spec.geometry(x.shape, output_size)
    rows = conv_transpose2d_axis(x.chunks[2], g.h, g.oh, g.kh, g.sh, g.dh, g.pt)
    cols = conv_transpose2d_axis(x.chunks[3], g.w, g.ow, g.kw, g.sw, g.dw, g.pl)
    (pt, pb, oph), (pl, pr, opw) = (_transposed_block_padding(g.kh, g.sh, g.dh, rows.before),
                                    _transposed_block_padding(g.kw, g.sw, g.dw, cols.before))
    options = {"stride": spec.stride, "dilation": spec.dilation, "groups": spec.groups,
               "activation": spec.activation, "padding": (pt, pl, pb, pr), "output_padding": (oph, opw)}
    return _graph(x, w, b, "conv_transpose2d", options, rows, cols, g.o, check_name(backend), device)


def _per_output_input(name: str, a):
    """offset or mask as a dask array (one given in memory becomes one)."""
    if not isinstance(a, da.Array):
        a = da.from_array(host_array(name, a), chunks=-1)
    check_float32(name, a)
    if any(np.isnan(size) for size in a.shape):
        raise ValueError(f"{name} has unknown chunk sizes (shape {a.shape}): call {name}.compute_chunk_sizes() first")
    return a


def deform_conv2d(x, offset, w, b=None, *, mask=None, max_offset: float, stride=1, padding=0, dilation=1, groups=1,
                  activation=None, backend="auto", device=None):
    """deform_conv2d over a dask array x (N, C, H, W): a lazy dask array equal to
    `convbackends.deform_conv2d(x, offset, w, b, mask=mask, ...)` on the whole array, with the same keywords.
    offset and mask (dask arrays, or arrays in memory) are rechunked as the output. Every offset must lie
    within +-max_offset pixels: it sets the halo (ceil(max_offset) rows and columns more on each side, see the
    module docstring), and each task checks its block's offsets against it (a ValueError naming the block)."""
    _check_input(x)
    if isinstance(max_offset, bool) or not isinstance(max_offset, (int, float, np.integer, np.floating)) \
            or not np.isfinite(max_offset) or max_offset < 0:
        raise ValueError(f"max_offset must be a finite number >= 0 (the largest |offset| in pixels), got {max_offset!r}")
    offset = _per_output_input("offset", offset)
    mask = None if mask is None else _per_output_input("mask", mask)
    w, b = host_array("w", w), None if b is None else host_array("b", b)
    spec = DeformConv2dSpec.create(w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                   activation=activation)
    g = spec.geometry(x.shape, offset.shape, None if mask is None else mask.shape)
    reach = math.ceil(max_offset)
    rows = deform_conv2d_axis(x.chunks[2], g.h, g.oh, g.kh, g.sh, g.dh, g.pt, reach)
    cols = deform_conv2d_axis(x.chunks[3], g.w, g.ow, g.kw, g.sw, g.dw, g.pl, reach)
    options = {"stride": spec.stride, "dilation": spec.dilation, "groups": spec.groups,
               "activation": spec.activation, "padding": (g.pt, g.pl, g.pb, g.pr)}
    return _graph(x, w, b, "deform_conv2d", options, rows, cols, g.o, check_name(backend), device,
                  run=_run_deform_block, per_output=(offset,) if mask is None else (offset, mask),
                  max_offset=float(max_offset))
