"""The arrays users have, in and out of every op and backend (convbackends/arrays.py), and the one-shot cache."""
import numpy as np
import pytest

import convbackends as cb
from conftest import require_module
from convbackends.ops import base
from convbackends.ops.base import OneShotCache, _same_bytes
from convbackends.parity import compare, compare_sparse
from convbackends.reference import (conv2d_float64, conv_transpose2d_float64, deform_conv2d_float64,
                                    sparse_conv3d_float64, sparse_inverse_conv3d_float64)

torch = require_module("torch")

RNG = np.random.default_rng(7)
X = RNG.uniform(-1, 1, (2, 6, 9, 8)).astype(np.float32)
W = RNG.uniform(-1, 1, (10, 3, 3, 3)).astype(np.float32)
B = RNG.uniform(-1, 1, 10).astype(np.float32)
WT = RNG.uniform(-1, 1, (6, 4, 4, 4)).astype(np.float32)


class Producer:
    """Any object with __dlpack__ on the CPU."""

    def __init__(self, array):
        self.array, self.dtype, self.shape = array, array.dtype, array.shape

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def test_torch_tensors_in_and_out_of_every_op(target):
    backend, device = target
    x, w, b, wt = (torch.from_numpy(a.copy()) for a in (X, W, B, WT))
    y = cb.conv2d(x, w, b, padding=1, groups=2, activation="relu", backend=backend, device=device)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert compare(y.numpy(), conv2d_float64(X, W, B, padding=1, groups=2, activation="relu"))[3]
    reference = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1, groups=2).relu()
    assert compare(y.numpy(), reference.numpy())[3]
    with cb.ConvTranspose2d(wt, stride=2, padding=1, backend=backend, device=device) as layer:
        yt = layer(x[:, :, 1:, ::2])  # a strided view
        assert isinstance(yt, torch.Tensor)
        assert compare(yt.numpy(), conv_transpose2d_float64(X[:, :, 1:, ::2], WT, stride=2, padding=1))[3]


def _deform_problem():
    x = RNG.uniform(-1, 1, (2, 4, 7, 6)).astype(np.float32)
    w = RNG.uniform(-1, 1, (6, 2, 3, 3)).astype(np.float32)
    b = RNG.uniform(-1, 1, 6).astype(np.float32)
    offset = RNG.uniform(-2, 2, (2, 36, 7, 6)).astype(np.float32)  # two offset groups
    mask = RNG.uniform(0, 1, (2, 18, 7, 6)).astype(np.float32)
    return x, w, b, offset, mask


def test_torch_tensors_in_and_out_of_deform_conv2d(target):
    """Torch tensors as every argument: torch comes back from the forward and from each of the five gradients,
    with the values of numpy in (itself checked against the float64 oracle)."""
    backend, device = target
    arrays = _deform_problem()
    x, w, b, offset, mask = (torch.from_numpy(a.copy()) for a in arrays)
    kwargs = dict(padding=1, groups=2)
    y = cb.deform_conv2d(x, offset, w, b, mask=mask, activation="relu", backend=backend, device=device, **kwargs)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    xa, wa, ba, offseta, maska = arrays
    assert compare(y.numpy(), deform_conv2d_float64(xa, offseta, wa, ba, maska, activation="relu", **kwargs))[3]
    grad_y = torch.from_numpy(RNG.uniform(-1, 1, tuple(y.shape)).astype(np.float32))
    with cb.DeformConv2d(w, b, backend=backend, device=device, **kwargs) as layer:
        strided = x.transpose(2, 3).contiguous().transpose(2, 3)  # a non-contiguous view of the same values
        assert torch.equal(layer(strided, offset, mask), layer(x, offset, mask))
        grads = layer.backward(grad_y, x, offset, mask)
        expected = layer.backward(grad_y.numpy(), *(t.numpy() for t in (x, offset, mask)))
    assert all(isinstance(g, torch.Tensor) for g in grads)
    for got, want in zip(grads, expected):
        assert isinstance(want, np.ndarray) and np.array_equal(got.numpy(), want)
    functional = cb.deform_conv2d_backward(grad_y, x, offset, w, backend=backend, device=device, **kwargs)
    assert functional[2] is None and all(isinstance(g, torch.Tensor) for g in functional[:2] + functional[3:])


def test_dlpack_producers_into_deform_conv2d():
    x, w, b, offset, mask = _deform_problem()
    y = cb.deform_conv2d(Producer(x), Producer(offset), Producer(w), Producer(b), mask=Producer(mask), padding=1,
                         groups=2)
    assert isinstance(y, np.ndarray)
    assert compare(y, deform_conv2d_float64(x, offset, w, b, mask, padding=1, groups=2))[3]
    with cb.DeformConv2d(Producer(w), padding=1, groups=2) as layer:
        grads = layer.backward(Producer(np.ones(y.shape, np.float32)), Producer(x), Producer(offset))
    assert all(isinstance(g, np.ndarray) for g in grads[:2] + grads[3:])
    assert np.allclose(grads[4], y.shape[0] * y.shape[2] * y.shape[3])


def test_torch_cpu_input_is_read_without_a_copy():
    x = torch.from_numpy(X.copy())
    with cb.Conv2d(W, B, padding=1, groups=2) as layer:
        array, restore = layer._input("x", x)
        assert np.shares_memory(array, x.numpy())
        y = layer(x)
        assert isinstance(restore(np.zeros(1, np.float32)), torch.Tensor)
    assert isinstance(y, torch.Tensor)


def test_tensors_that_require_grad_and_other_dlpack_producers():
    x = torch.from_numpy(X.copy()).requires_grad_()
    assert isinstance(cb.conv2d(x, W, B, groups=2), torch.Tensor)

    y = cb.conv2d(Producer(X), Producer(W), B, padding=1, groups=2)
    assert isinstance(y, np.ndarray) and compare(y, conv2d_float64(X, W, B, padding=1, groups=2))[3]


def test_wrong_dtypes_say_how_to_convert():
    with pytest.raises(TypeError, match=r"x must be float32, got torch.float64; convert it with .float\(\)"):
        cb.conv2d(torch.zeros(1, 6, 5, 5, dtype=torch.float64), W)
    with pytest.raises(TypeError, match="w must be an array, got list"):
        cb.conv2d(X, [[1.0]])


def test_pyopencl_arrays_of_another_context_come_back_in_their_context():
    from conftest import require

    availability = cb.available_backends()["opencl"]
    if not availability.available:
        require("opencl", availability.reason)
    import pyopencl as cl
    import pyopencl.array as cla

    own = cla.to_device(cb.opencl_queue(), X)
    assert cb.conv2d(own, W, B, padding=1, groups=2, backend="opencl").context == own.context
    context = cl.Context([cb.opencl_queue().device])  # the user's own context on the same device
    queue = cl.CommandQueue(context)
    y = cb.conv2d(cla.to_device(queue, X), cla.to_device(queue, W), B, padding=1, groups=2, backend="opencl")
    assert isinstance(y, cla.Array) and y.context == context
    assert compare(y.get(), conv2d_float64(X, W, B, padding=1, groups=2))[3]


def test_one_shot_cache_reuses_layers_sees_in_place_changes_and_stays_bounded():
    cache = OneShotCache(max_layers=3, max_bytes=1 << 20)
    made = []

    def make(w, b):
        made.append(w)
        return cb.Conv2d(w, b, groups=2)

    def layer(key, arrays):
        return cache.run(key, arrays, make, lambda found: found)

    w = W.copy()
    first = layer(("conv2d", 0), (w, B))
    assert layer(("conv2d", 0), (w, B)) is first and len(made) == 1
    w[0, 0, 0, 0] += 1  # changed in place: prepared afresh
    second = layer(("conv2d", 0), (w, B))
    assert second is not first and len(made) == 2
    assert compare(second(X), conv2d_float64(X, w, B, groups=2))[3]
    for i in range(5):
        layer(("conv2d", i + 1), (W, B))
    assert len(cache._entries) == 3
    big = np.zeros((1024, 512, 1, 1), np.float32)  # 2 MB of weights: over the byte bound, never kept
    layer(("conv2d", "big"), (big, None))
    assert all(key[1] != "big" for key in cache._entries)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_one_shot_weight_compare_sees_any_changed_bit(layout):
    """The compare behind the one-shot cache (memcmp on contiguous arrays, numpy on the rest): one bit flipped
    in the first or the last element is a change, NaN weights equal themselves, and -0.0 is not 0.0."""
    base = np.random.default_rng(5).uniform(-1, 1, (9, 5, 3, 3)).astype(np.float32)
    base[1, 2, 0, 0] = np.nan
    w = base if layout == "contiguous" else np.asfortranarray(base)
    assert w.flags.c_contiguous == (layout == "contiguous")
    copy = w.copy()
    assert copy.flags.c_contiguous and _same_bytes(w, copy)
    for index in ((0, 0, 0, 0), (8, 4, 2, 2)):
        bits = w.view(np.uint32)
        bits[index] ^= 1
        assert not _same_bytes(w, copy)
        bits[index] ^= 1
        assert _same_bytes(w, copy)
    w[3, 3, 1, 1] = 0.0
    copy[3, 3, 1, 1] = -0.0
    assert not _same_bytes(w, copy)
    assert not _same_bytes(w[:8], copy[:8].reshape(5, 8, 3, 3))


@pytest.mark.parametrize("overlapped", [False, True], ids=["compare-first", "compare-alongside"])
def test_functional_calls_follow_weights_changed_in_place(target, overlapped, monkeypatch):
    """Both ways the one-shot cache compares: before the call, and (device backends, large weights; made
    to happen here by a bound of 0) on another thread while the call runs, its result dropped on a change."""
    if overlapped:
        monkeypatch.setattr(base, "OVERLAP_MIN_BYTES", 0)
    backend, device = target
    w = W.copy()
    first = cb.conv2d(X, w, B, padding=1, groups=2, backend=backend, device=device)
    w *= 2
    second = cb.conv2d(X, w, B, padding=1, groups=2, backend=backend, device=device)
    assert compare(second, conv2d_float64(X, w, B, padding=1, groups=2))[3]
    assert not np.allclose(first, second)


def test_torch_tensors_in_and_out_of_sparse_layers(target):
    """Torch features (in unsorted site order, so the backend gathers them first) through SubM, regular and
    inverse layers, torch weights and bias: every output's features are torch tensors, checked against the
    float64 oracle."""
    backend, device = target
    rng = np.random.default_rng(4)
    grid = (6, 7, 8)
    keys = rng.choice(2 * 6 * 7 * 8, size=90, replace=False)  # unsorted
    indices = np.stack(np.unravel_index(keys, (2, *grid)), axis=1).astype(np.int32)
    features = rng.uniform(-1, 1, (90, 5)).astype(np.float32)
    ws = [rng.uniform(-1, 1, shape).astype(np.float32) for shape in ((6, 5, 3, 3, 3), (7, 6, 2, 2, 2),
                                                                     (4, 7, 2, 2, 2))]
    bias = rng.uniform(-1, 1, 6).astype(np.float32)
    t = cb.SparseTensor(torch.from_numpy(features), indices, grid, 2)
    options = dict(backend=backend, device=device)
    with cb.SparseConv3d(torch.from_numpy(ws[0]), torch.from_numpy(bias), subm=True, activation="relu",
                         **options) as subm, \
            cb.SparseConv3d(torch.from_numpy(ws[1]), stride=2, indice_key="down", **options) as down, \
            cb.SparseInverseConv3d(torch.from_numpy(ws[2]), indice_key="down", **options) as up:
        s = subm(t)
        d = down(s)
        u = up(d)
    ref = sparse_conv3d_float64(indices, features, ws[0], bias, batch_size=2, spatial_shape=grid, subm=True,
                                activation="relu")
    assert isinstance(s.features, torch.Tensor) and compare_sparse(s, ref)[3]
    ref_down = sparse_conv3d_float64(ref[0], s.features.numpy(), ws[1], batch_size=2, spatial_shape=grid, stride=2)
    assert isinstance(d.features, torch.Tensor) and compare_sparse(d, ref_down)[3]
    ref_up = sparse_inverse_conv3d_float64(d.features.numpy(), ws[2], sites=ref[0], spatial_shape=grid,
                                           in_sites=d.indices, in_spatial_shape=d.spatial_shape, batch_size=2,
                                           stride=2)
    assert isinstance(u.features, torch.Tensor) and compare_sparse(u, (ref[0], ref_up))[3]
    assert np.array_equal(t.dense(), cb.SparseTensor(features, indices, grid, 2).dense())
