"""conv_transpose2d_phases on any backend: the stride phases of the layer (ops/conv_transpose2d.py `phases`) run as
conv2d layers prepared by the same backend (so they take that backend's implicit GEMM, 1x1 GEMM, depthwise or
Winograd with the fused bias and activation), and their outputs are interleaved into y.

Phases with the same number of taps and dilation are stacked along the output channels into one conv2d (`Stack`):
one GEMM over x read once instead of one per phase. Their pads differ (4x4 stride 2 pad 1: each phase is a 2x2
kernel with the padding on another side), so a stack reads the union of their input windows and each phase takes
its window of the stack's output; the stack is formed only while that union costs little (`STACK_MAX_WORK`).
A phase no tap reaches sees only the bias: it runs on zeros, never on x, so a NaN in x cannot reach it.

Host arrays are interleaved on the host (a strided copy per phase); a family with device arrays supplies
`interleave_on_device` and `zeros_on_device` (kernels/conv_transpose2d_phases.h for OpenCL and CUDA).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..ops.conv_transpose2d import AxisPhase, Phase
from ..spec import Conv2dSpec
from . import Prepared, implementation

# Phase sets kept per layer: one per distinct output_padding (at most max(stride, dilation)^2), or per
# input size in the rare layers whose bias-only phases depend on it.
PHASE_SETS_KEPT = 8
# Geometries whose stacks are remembered, so a call plans nothing (a few input sizes per layer at most).
PLANS_KEPT = 16
# Phases are stacked while the stack's outputs (phases x the union window) are at most this many times the
# outputs the phases need: 4x4 stride 2 pad 1 at 8x8 computes 9x9 per phase (1.27x), at 16x16 1.13x. numpy's
# GEMM gains more from the stack than that costs (docs/performance-notes.md). On CPU devices (PoCL, llvmpipe)
# the kernels ran a stack of grown windows 1.2-3x slower than its phases, exact stacks faster: only those.
# GPUs: conventional, not yet measured.
STACK_MAX_WORK = 1.3
STACK_MAX_WORK_CPU_DEVICE = 1.0


@dataclass(frozen=True)
class Stack:
    """Phases run as one conv2d: their weights stacked along O within each group (group-major, then phase),
    over the input window `rows` x `cols` (an AxisPhase's crop and pads; its count is the stack's output size).
    Phase i's output is the stack's output channels of phase i, rows offsets[i][0] on, columns offsets[i][1] on."""

    phases: tuple[Phase, ...]
    rows: AxisPhase
    cols: AxisPhase
    offsets: tuple[tuple[int, int], ...]
    spec: Conv2dSpec

    @property
    def constant(self) -> bool:
        return self.phases[0].constant

    def crop(self, h: int, w: int) -> tuple[slice, slice]:
        """The rows and columns of x the stack reads."""
        return (slice(self.rows.crop_begin, h - self.rows.crop_end), slice(self.cols.crop_begin, w - self.cols.crop_end))

    def weights(self, w: np.ndarray, groups: int) -> np.ndarray:
        per_phase = [p.weights(w, groups) for p in self.phases]
        o, cg = per_phase[0].shape[:2]
        stacked = np.stack([pw.reshape(groups, o // groups, cg, *pw.shape[2:]) for pw in per_phase], axis=1)
        return np.ascontiguousarray(stacked.reshape(len(per_phase) * o, cg, *stacked.shape[-2:]))

    def bias(self, b: np.ndarray | None, groups: int) -> np.ndarray | None:
        if b is None:
            return None
        per_group = b.reshape(groups, 1, -1)
        return np.ascontiguousarray(np.broadcast_to(per_group, (groups, len(self.phases), per_group.shape[2])).reshape(-1))


def _union(axes: list[AxisPhase], size: int) -> tuple[AxisPhase, list[int]]:
    """The input window covering every phase's (the same taps count, at least one, and dilation), and where each
    phase's outputs start in the window's outputs. A phase's output j reads input rows first + j + t * dilation."""
    reach = (len(axes[0].taps) - 1) * axes[0].dilation
    firsts = [a.crop_begin - a.pad_begin for a in axes]
    first = min(firsts)
    last = max(f + a.count - 1 + reach for f, a in zip(firsts, axes))
    window = AxisPhase(0, last - reach - first + 1, axes[0].taps, axes[0].dilation, max(0, -first),
                       max(0, last - (size - 1)), max(0, first), max(0, size - 1 - last))
    return window, [f - first for f in firsts]


def _stack(phases: list[Phase], spec, geom) -> Stack:
    if len(phases) == 1:  # the phase as it is (a bias-only one reads a 1x1 input: zeros)
        return Stack(tuple(phases), phases[0].rows, phases[0].cols, ((0, 0),), phases[0].spec)
    rows, row_offsets = _union([p.rows for p in phases], geom.h)
    cols, col_offsets = _union([p.cols for p in phases], geom.w)
    one = phases[0].spec
    stacked = Conv2dSpec.create(
        np.empty((len(phases) * one.out_channels, one.in_channels // one.groups, one.kh, one.kw), np.float32),
        np.empty(len(phases) * one.out_channels, np.float32) if spec.has_bias else None, dilation=one.dilation,
        groups=one.groups, padding=(rows.pad_begin, cols.pad_begin, rows.pad_end, cols.pad_end),
        activation=one.activation)
    return Stack(tuple(phases), rows, cols, tuple(zip(row_offsets, col_offsets)), stacked)


def stacks(spec, geom, max_work: float = STACK_MAX_WORK) -> list[Stack]:
    """The layer's phases for this geometry as stacks: the phases of each (taps, dilation) shape in one stack
    where the union window costs at most `max_work` times their outputs, else one stack each; bias-only phases
    one each."""
    shapes: dict[tuple, list[Phase]] = {}
    result = []
    for phase in spec.phases(geom):
        if phase.constant:
            result.append(_stack([phase], spec, geom))
        else:
            key = (len(phase.rows.taps), phase.rows.dilation, len(phase.cols.taps), phase.cols.dilation)
            shapes.setdefault(key, []).append(phase)
    for group in shapes.values():
        stack = _stack(group, spec, geom)
        needed = sum(p.rows.count * p.cols.count for p in group)
        if len(group) * stack.rows.count * stack.cols.count <= max_work * needed:
            result.append(stack)
        else:
            result += [_stack([p], spec, geom) for p in group]
    return result


class PhasesPrepared(Prepared):
    """A transposed layer as its stacks' conv2d layers, prepared on first use of each phase set.
    `stack_max_work` is `stacks`' bound, a family's to set for its device."""

    stack_max_work = STACK_MAX_WORK

    def __init__(self, backend, spec, w: np.ndarray, b: np.ndarray | None, device):
        self.device, self.spec = device, spec
        self._backend, self._conv2d = backend, implementation("conv2d", backend)
        self._w, self._b = w.copy(), None if b is None else b.copy()
        self._sets: OrderedDict[tuple, list] = OrderedDict()
        self._plans: OrderedDict[object, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def plan(self, geom) -> tuple[tuple, list[Stack]]:
        """(the phase set's key, its stacks) for this geometry, remembered for the geometries seen last."""
        with self._lock:
            found = self._plans.pop(geom, None)
        if found is None:
            found_stacks = stacks(self.spec, geom, self.stack_max_work)
            key = tuple((tuple((p.rows.taps, p.cols.taps) for p in s.phases), s.offsets, s.spec) for s in found_stacks)
            found = (key, found_stacks)
        with self._lock:
            self._plans[geom] = found
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        return found

    def _stack_layers(self, geom) -> list[tuple[Stack, object]]:
        """[(stack, its prepared conv2d)] for this geometry. A phase set serves every geometry of its key, but
        its stacks' output counts are this geometry's own."""
        key, found_stacks = self.plan(geom)
        with self._lock:
            if self._closed:
                raise ValueError("this layer is closed")
            found = self._sets.pop(key, None)
            if found is None:
                groups = self.spec.groups
                found = [self._conv2d.prepare(self._backend, s.spec, s.weights(self._w, groups),
                                              s.bias(self._b, groups), self.device) for s in found_stacks]
            self._sets[key] = found
            while len(self._sets) > PHASE_SETS_KEPT:
                for prepared in self._sets.popitem(last=False)[1]:
                    prepared.close()
            return list(zip(found_stacks, found))

    def run(self, x, geom):
        return self._run(x, geom, timed=False)[0]

    def profile(self, x, geom):
        return self._run(x, geom, timed=True)

    def _run(self, x, geom, timed: bool):
        layers = self._stack_layers(geom)
        host = isinstance(x, np.ndarray)
        y = np.empty(geom.output_shape, np.float32) if host else self.empty_on_device(x, geom.output_shape)
        total = 0.0 if timed else None
        for stack, prepared in layers:
            part = self._stack_input(x, stack, geom, host)
            sub = stack.spec.geometry(part.shape)
            if timed:
                out, seconds = prepared.profile(part, sub)
                total = None if seconds is None or total is None else total + seconds
            else:
                out = prepared.run(part, sub)
            for index, phase in enumerate(stack.phases):
                if host:
                    self._interleave_on_host(out, y, stack, index, geom)
                else:
                    self.interleave_on_device(out, y, stack, index, geom)
        return y, total

    def _stack_input(self, x, stack: Stack, geom, host: bool):
        """What the stack's conv2d reads: x's window (x itself when the window is all of it), or zeros."""
        if stack.constant:
            shape = (geom.n, geom.c, 1, 1)
            return np.zeros(shape, np.float32) if host else self.zeros_on_device(shape)
        rows, cols = stack.crop(geom.h, geom.w)
        if (rows, cols) == (slice(0, geom.h), slice(0, geom.w)):
            return x
        part = x[:, :, rows, cols]
        return np.ascontiguousarray(part) if host else part

    def _interleave_on_host(self, out: np.ndarray, y: np.ndarray, stack: Stack, index: int, geom) -> None:
        phase, (dr, dc) = stack.phases[index], stack.offsets[index]
        g, og = self.spec.groups, geom.o // self.spec.groups
        rows, cols = phase.rows, phase.cols
        src = out.reshape(geom.n, g, len(stack.phases), og, *out.shape[2:])[
            :, :, index, :, dr:dr + rows.count, dc:dc + cols.count]
        y.reshape(geom.n, g, og, geom.oh, geom.ow)[:, :, :, rows.start::geom.sh, cols.start::geom.sw] = src

    def empty_on_device(self, x, shape):
        raise TypeError(f"{type(self).__name__} takes host arrays only")

    def zeros_on_device(self, shape):
        raise TypeError(f"{type(self).__name__} takes host arrays only")

    def interleave_on_device(self, out, y, stack: Stack, index: int, geom) -> None:
        raise TypeError(f"{type(self).__name__} takes host arrays only")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for layers in self._sets.values():
                for prepared in layers:
                    prepared.close()
            self._sets.clear()


def prepare(backend, spec, w: np.ndarray, b: np.ndarray | None, device) -> PhasesPrepared:
    return PhasesPrepared(backend, spec, w, b, device)
