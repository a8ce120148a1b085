"""conv2d and conv_transpose2d over dask arrays: arrays larger than one machine's memory, or one device's.

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
- Either way each block must be at least as long as the halo it lends, and must own at least one output
  row: chunks too small for that are merged with their neighbour (a rechunk).

The zero padding of the whole array is added by the blocks at its edges and the transposed layer's crop
is cut from them, so every task runs the same padding-free layer: a worker prepares it once, found by
the layer's spec and a content hash of the weights computed once on the client (`dask.base.tokenize`).
The weights travel as one key of the graph, to each worker once, not inside every task.

Backends and devices are resolved on each worker: `backend="auto"` (the default) takes the worker's GPU
where it has one, else numpy; `device=None` its best device. Chunks are numpy arrays (dask's default).
deform_conv2d comes when that op lands (with `max_offset=` bounding the halo).
"""
from __future__ import annotations

import contextlib
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
from .runtime import check_name
from .spec import Conv2dSpec, check_float32

__all__ = ["conv2d", "conv_transpose2d", "cache_info", "clear_cache"]


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


def conv2d_axis(chunks, size: int, out: int, k: int, s: int, d: int, pad_begin: int, pad_end: int) -> AxisPlan:
    """conv2d along one axis (see the module docstring): edges moved forward onto the stride grid."""
    halo = max(0, (k - 1) * d + 1 - s)
    outputs = []  # the first output row of each block after the first
    for edge in _interior_edges(chunks):
        o = -(-(edge + pad_begin) // s)
        if 0 < o < out and 0 < o * s - pad_begin < size and (not outputs or o > outputs[-1]):
            outputs.append(o)
    edges = _spaced([o * s - pad_begin for o in outputs], size, max(1, halo))
    out_edges = [(e + pad_begin) // s for e in edges]
    return AxisPlan(_chunks(edges, size), _chunks(out_edges, out), after=halo, pad_first=pad_begin, pad_last=pad_end)


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
_OPS = {"conv2d": Conv2d, "conv_transpose2d": ConvTranspose2d}


def cache_info() -> dict:
    """This process's prepared layers: {"layers": kept now, "prepared": prepared ever}. On a cluster,
    `client.run(convbackends.dask.cache_info)` asks every worker."""
    return {"layers": len(LAYERS), "prepared": LAYERS.prepared}


def clear_cache() -> None:
    """Release this process's prepared layers."""
    LAYERS.clear()


def _run_block(block, w, b, *, op: str, options: tuple, weights: str, backend: str, device, rows: AxisPlan,
               cols: AxisPlan, block_info=None):
    """One output block: the input block with its halo, zero-padded at the array's edges, through the
    worker's prepared layer, trimmed at the array's edges."""
    location, blocks = block_info[0]["chunk-location"][2:], block_info[0]["num-chunks"][2:]
    pads = (rows.pads(location[0], blocks[0]), cols.pads(location[1], blocks[1]))
    if any(pads[0] + pads[1]):
        block = np.pad(block, ((0, 0), (0, 0), *pads))
    layer, guard = LAYERS.get((op, options, backend, device, weights),
                              lambda: _OPS[op](w, b, **dict(options), backend=backend, device=device))
    with guard:
        y = layer(block)
    (top, bottom), (left, right) = rows.trims(location[0], blocks[0]), cols.trims(location[1], blocks[1])
    if top or bottom or left or right:
        y = y[:, :, top:y.shape[2] - bottom, left:y.shape[3] - right]
    return y


# --- the graph --------------------------------------------------------------------------------------

def _check_input(x) -> None:
    if not isinstance(x, da.Array):
        raise TypeError(f"x must be a dask.array.Array, got {type(x).__name__}: use convbackends.conv2d for an "
                        f"array in memory, or dask.array.from_array(x, chunks=...)")
    check_float32("x", x)
    if any(np.isnan(size) for size in x.shape):
        raise ValueError(f"x has unknown chunk sizes (shape {x.shape}): call x.compute_chunk_sizes() first")


def _graph(x, w, b, op: str, options: dict, rows: AxisPlan, cols: AxisPlan, out_channels: int, backend, device):
    """The lazy output: x rechunked to the plan (C whole), its halos exchanged, one task per output block."""
    planned = (x.chunks[0], (x.shape[1],), rows.chunks, cols.chunks)
    if x.chunks != planned:
        x = x.rechunk(planned)
    depth = {axis: (plan.before, plan.after) for axis, plan in ((2, rows), (3, cols))
             if len(plan.chunks) > 1 and (plan.before or plan.after)}
    if depth:
        x = da.overlap.overlap(x, depth=depth, boundary="none", allow_rechunk=False)
    token = tokenize(w, b)  # the weights' content, hashed once here; the workers' layers are found by it
    options = tuple(sorted(options.items()))
    return da.map_blocks(
        _run_block, x, dask.delayed(w, pure=True), None if b is None else dask.delayed(b, pure=True), op=op,
        options=options, weights=token, backend=backend, device=device, rows=rows, cols=cols,
        chunks=(x.chunks[0], (out_channels,), rows.out_chunks, cols.out_chunks), dtype=np.float32, meta=x._meta,
        name=f"convbackends-{op}-{tokenize(x.name, token, options, backend, device, rows, cols)}")


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
