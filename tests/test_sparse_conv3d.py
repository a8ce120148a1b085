"""sparse_conv3d on every backend and device: the 'sparse' parity suite against cv2.dnn's dense 3-D Conv at the
output sites, random grids against the float64 oracle, the rulebook against its dense definition, inverse layers
restoring their sites (U-Net), rulebook reuse by indice_key, the order and determinism rules, empty tensors, the
errors, and a memory bound on a KITTI-sized grid.

Until the OpenCL/CUDA and Vulkan implementations land (backends/kernel/sparse_conv3d.py,
backends/vulkan/sparse_conv3d.py), the tests taking `target` fail on those targets: that is expected."""
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convbackends as cb
from conftest import parity_tests
from convbackends.ops.sparse_conv3d import SparseConv3dSpec, to_host
from convbackends.parity import (
    ACTIVATIONS, SUITES, Case, check, compare, compare_sparse, float64_output, lidar_sites,
)
from convbackends.reference import (
    cv2_sparse_conv3d, cv2_sparse_inverse_conv3d, sparse_conv3d_float64, sparse_inverse_conv3d_float64,
    sparse_rulebook_dense,
)

CASES = SUITES["sparse"]


test_parity_with_cv2_dnn, cv2_reference = parity_tests(CASES)


def sorted_sites(indices: np.ndarray) -> np.ndarray:
    return indices[np.lexsort(indices.T[::-1])] if len(indices) else indices


def random_tensor(rng, batch, channels, grid, sites) -> cb.SparseTensor:
    """`sites` distinct sites of a (batch, *grid) volume in random order, features U(-1, 1)."""
    keys = rng.choice(batch * int(np.prod(grid)), size=sites, replace=False)
    indices = np.stack(np.unravel_index(keys, (batch, *grid)), axis=1).astype(np.int32).reshape(-1, 4)
    return cb.SparseTensor(rng.uniform(-1, 1, (sites, channels)).astype(np.float32), indices, grid, batch)


def uniform(rng, *shape) -> np.ndarray:
    return rng.uniform(-1, 1, shape).astype(np.float32)


def assert_matches(y: cb.SparseTensor, ref) -> None:
    _, _, _, passed, detail = compare_sparse(y, ref)
    assert passed, detail


def test_float64_oracle_agrees_with_cv2_dnn():
    """Two independent truths: the same site sets exactly, the features within the tolerance."""
    for case in CASES:
        (sites, features), (sites64, features64) = cv2_reference(case), float64_output(case)
        assert np.array_equal(sites, sites64), case
        _, _, _, passed, detail = compare(features, features64)
        assert passed, f"{case}: {detail}"


def test_the_suite_covers_the_issue():
    kinds = {(c.kwargs.get("subm", False), c.w_shape[2:]) for c in CASES}
    assert {(False, (k,) * 3) for k in range(1, 6)} <= kinds and {(True, (k,) * 3) for k in (1, 3, 5)} <= kinds
    assert {c.kwargs.get("stride", 1) for c in CASES} >= {1, 2, 3}
    assert {c.x_shape[0] for c in CASES} == {1, 2, 3}
    assert {c.kwargs.get("activation") for c in CASES} >= set(ACTIVATIONS)
    densities = [c.sites / np.prod(c.x_shape[:1] + c.x_shape[2:]) for c in CASES]
    assert min(c.sites for c in CASES) == 1 and max(densities) >= 0.3


@st.composite
def random_layers(draw):
    subm = draw(st.booleans())
    if subm:
        kernel = tuple(draw(st.sampled_from((1, 3, 5))) for _ in range(3))
        stride, padding = 1, 0
    else:
        kernel = tuple(draw(st.integers(1, 5)) for _ in range(3))
        stride = tuple(draw(st.integers(1, 3)) for _ in range(3))
        padding = tuple(draw(st.integers(0, 2)) for _ in range(3))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(3))
    grid = tuple(draw(st.integers(1, 9)) for _ in range(3))
    batch = draw(st.integers(1, 3))
    volume = batch * int(np.prod(grid))
    sites = draw(st.integers(0, min(volume, 200)))
    c, o = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    geometry = dict(subm=subm, stride=stride, padding=padding, dilation=dilation)
    try:
        SparseConv3dSpec.create(np.zeros((o, c, *kernel), np.float32), **geometry).output_shape(grid)
    except ValueError:  # a kernel reaching past the padded grid: no output grid
        return None
    return Case("random", (batch, c, *grid), (o, c, *kernel), draw(st.booleans()),
                dict(geometry, activation=draw(st.sampled_from(ACTIVATIONS))), draw(st.integers(0, 2**31)),
                "sparse_conv3d", sites)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=random_layers())
def test_random_grids_against_float64(target, case):
    if case is None:
        return
    result = check(case, *target, ref=float64_output(case))
    assert result.passed, f"{case.x_shape} n={case.sites} {case.w_shape} {case.kwargs}: {result.detail}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=random_layers())
def test_rulebook_is_the_canonical_form(target, case):
    """On every backend: pairs() is exactly the rulebook by its definition (each output site, each tap, the input
    row there if active), per tap ascending in both rows, and the output sites are sorted and unique."""
    if case is None:
        return
    backend, device = target
    t, w, b = case.tensors()
    with case.layer(w, b, backend=backend, device=device) as layer:
        rulebook = layer.rulebook(t)
        offsets, in_rows, out_rows = rulebook.pairs()
    rules = rulebook.geometry
    sites = to_host(rulebook.out_indices)
    assert np.array_equal(sites, sorted_sites(sites)) and len(np.unique(sites, axis=0)) == len(sites)
    assert np.array_equal(to_host(rulebook.in_indices), sorted_sites(t.indices))
    expected = sparse_rulebook_dense(to_host(rulebook.in_indices), sites, batch_size=t.batch_size,
                                     in_shape=t.spatial_shape, kernel=rules.kernel, stride=rules.stride,
                                     padding=rules.padding, dilation=rules.dilation)
    for got, want in zip((offsets, in_rows, out_rows), expected):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        assert (np.diff(in_rows[lo:hi]) > 0).all() and (np.diff(out_rows[lo:hi]) > 0).all()


def unet(rng, c=5):
    """A small encoder-decoder: SubM (key 'a'), a strided regular layer (key 'down'), two SubM layers sharing
    key 'b', the inverse of 'down', a SubM layer reusing 'a'. Weights and the layer options of each."""
    return [
        (uniform(rng, 6, c, 3, 3, 3), uniform(rng, 6), dict(subm=True, indice_key="a", activation="relu")),
        (uniform(rng, 8, 6, 3, 3, 3), uniform(rng, 8), dict(stride=2, padding=1, indice_key="down")),
        (uniform(rng, 8, 8, 3, 3, 3), None, dict(subm=True, indice_key="b", activation="silu")),
        (uniform(rng, 8, 8, 3, 3, 3), uniform(rng, 8), dict(subm=True, indice_key="b")),
        (uniform(rng, 6, 8, 3, 3, 3), uniform(rng, 6), dict(inverse=True, indice_key="down", activation="tanh")),
        (uniform(rng, 4, 6, 3, 3, 3), uniform(rng, 4), dict(subm=True, indice_key="a")),
    ]


def run_unet(layers, t, backend, device):
    outputs = []
    for w, b, options in layers:
        options = dict(options)
        kind = cb.SparseInverseConv3d if options.pop("inverse", False) else cb.SparseConv3d
        with kind(w, b, backend=backend, device=device, **options) as layer:
            t = layer(t)
        outputs.append(t)
    return outputs


def unet_float64(layers, t):
    """The same network from the dense definitions, layer by layer from the reference's own outputs."""
    sites, shape = sorted_sites(t.indices), t.spatial_shape
    features = t.features[np.lexsort(t.indices.T[::-1])].astype(np.float64)
    saved, outputs = {}, []
    for w, b, options in layers:
        common = dict(activation=options.get("activation"))
        if options.get("inverse"):
            before_sites, before_shape, geometry = saved[options["indice_key"]]
            features = sparse_inverse_conv3d_float64(features, w, b, sites=before_sites, spatial_shape=before_shape,
                                                     in_sites=sites, in_spatial_shape=shape,
                                                     batch_size=t.batch_size, **geometry, **common)
            sites, shape = before_sites, before_shape
        else:
            geometry = {k: options[k] for k in ("stride", "padding", "dilation") if k in options}
            new_sites, features = sparse_conv3d_float64(sites, features, w, b, batch_size=t.batch_size,
                                                        spatial_shape=shape, subm=options.get("subm", False),
                                                        **geometry, **common)
            if not options.get("subm"):
                saved[options["indice_key"]] = (sites, shape, geometry)
                shape = SparseConv3dSpec.create(w, **geometry).output_shape(shape)
            sites = new_sites
        outputs.append((sites, features))
    return outputs


def test_unet_inverse_restores_sites_and_keys_share_rulebooks(target):
    backend, device = target
    rng = np.random.default_rng(7)
    t = random_tensor(rng, 2, 5, (9, 10, 11), 240)
    layers = unet(rng)
    outputs = run_unet(layers, t, backend, device)
    for i, (y, ref) in enumerate(zip(outputs, unet_float64(layers, t))):
        _, _, _, passed, detail = compare_sparse(y, ref)
        assert passed, f"layer {i}: {detail}"
    assert np.array_equal(outputs[4].indices, sorted_sites(t.indices))  # the inverse is back on the input's sites
    assert outputs[4].spatial_shape == t.spatial_shape
    rulebooks = outputs[-1].indice_dict  # one dict through the whole network
    assert set(rulebooks) == {"a", "b", "down"} and all(o.indice_dict is rulebooks for o in outputs)
    assert rulebooks["b"].geometry.subm and not rulebooks["down"].geometry.subm


def test_inverse_against_cv2_conv_transpose(target):
    backend, device = target
    rng = np.random.default_rng(3)
    for kernel, stride, padding, dilation, sites in (((3, 3, 3), 2, 1, 1, 200), ((2, 3, 1), (2, 3, 1), 0, 1, 150),
                                                     ((3, 1, 3), 3, (1, 0, 2), (1, 1, 2), 300)):
        t = random_tensor(rng, 2, 4, (9, 10, 11), sites)
        geometry = dict(stride=stride, padding=padding, dilation=dilation)
        with cb.SparseConv3d(uniform(rng, 7, 4, *kernel), indice_key="k", backend=backend, device=device,
                             **geometry) as down:
            mid = down(t)
        w, b = uniform(rng, 3, 7, *kernel), uniform(rng, 3)
        with cb.SparseInverseConv3d(w, b, indice_key="k", activation="relu", backend=backend, device=device) as up:
            y = up(mid)
        sites = sorted_sites(t.indices)
        truth = cv2_sparse_inverse_conv3d(to_host(mid.features), w, b, sites=sites, spatial_shape=t.spatial_shape,
                                          in_sites=mid.indices, in_spatial_shape=mid.spatial_shape, batch_size=2,
                                          activation="relu", **geometry)
        assert_matches(y, (sites, truth))


def test_layers_with_one_key_share_one_rulebook(target):
    backend, device = target
    rng = np.random.default_rng(1)
    t = random_tensor(rng, 1, 4, (8, 8, 8), 100)
    w = uniform(rng, 4, 4, 3, 3, 3)
    with cb.SparseConv3d(w, subm=True, indice_key="s", backend=backend, device=device) as first, \
            cb.SparseConv3d(w * 2, subm=True, indice_key="s", backend=backend, device=device) as second:
        y = first(t)
        built = y.indice_dict["s"]
        z = second(y)
        assert z.indice_dict["s"] is built and second.rulebook(y) is built
        assert_matches(z, sparse_conv3d_float64(y.indices, to_host(y.features), w * 2, batch_size=1,
                                                spatial_shape=(8, 8, 8), subm=True))


def test_profile_gives_the_call_and_the_device_time(target):
    """profile(t) on the regular, submanifold and inverse layers: the call's output, and seconds where the
    backend has a device timer (None on numpy)."""
    backend, device = target
    rng = np.random.default_rng(13)
    t = random_tensor(rng, 1, 4, (8, 9, 7), 120)
    w, wd, wu = uniform(rng, 5, 4, 3, 3, 3), uniform(rng, 6, 5, 2, 2, 2), uniform(rng, 3, 6, 2, 2, 2)
    with cb.SparseConv3d(w, subm=True, backend=backend, device=device) as subm, \
            cb.SparseConv3d(wd, stride=2, indice_key="d", backend=backend, device=device) as down, \
            cb.SparseInverseConv3d(wu, indice_key="d", backend=backend, device=device) as up:
        mid = subm(t)
        for layer, x in ((subm, t), (down, mid), (up, down(mid))):
            y, seconds = layer.profile(x)
            assert np.array_equal(y.indices, layer(x).indices)
            assert np.array_equal(to_host(y.features), to_host(layer(x).features))
            assert seconds is None if backend == "numpy" else seconds is None or seconds >= 0


def test_key_reuse_with_another_geometry_or_other_sites_is_refused(target):
    backend, device = target
    rng = np.random.default_rng(2)
    t = random_tensor(rng, 1, 4, (8, 8, 8), 100)
    w3, w5 = uniform(rng, 4, 4, 3, 3, 3), uniform(rng, 4, 4, 5, 5, 5)
    options = dict(backend=backend, device=device)
    y = cb.SparseConv3d(w3, subm=True, indice_key="s", **options)(t)
    with pytest.raises(ValueError, match=r"indice_key 's' holds the rulebook of a layer with submanifold, kernel "
                                         r"\(3, 3, 3\).*this layer has submanifold, kernel \(5, 5, 5\)"):
        cb.SparseConv3d(w5, subm=True, indice_key="s", **options)(y)
    down = cb.SparseConv3d(w3, stride=2, indice_key="s", **options)
    with pytest.raises(ValueError, match="indice_key 's' holds the rulebook of a layer with submanifold"):
        down(y)
    other = random_tensor(rng, 1, 4, (8, 8, 8), 90)
    other.indice_dict.update(y.indice_dict)
    with pytest.raises(ValueError, match="indice_key 's' holds a rulebook built on other sites"):
        cb.SparseConv3d(w3, subm=True, indice_key="s", **options)(other)
    with pytest.raises(ValueError, match="indice_key 'nope' names no rulebook of this tensor"):
        cb.SparseInverseConv3d(w3, indice_key="nope", **options)(y)
    with pytest.raises(ValueError, match="SparseInverseConv3d needs the rulebook of a regular layer"):
        cb.SparseInverseConv3d(w3, indice_key="s", **options)(y)
    z = cb.SparseConv3d(w3, stride=2, indice_key="d", **options)(t)
    with pytest.raises(ValueError, match=r"w has kernel \(5, 5, 5\) but the layer under indice_key 'd' has kernel"):
        cb.SparseInverseConv3d(w5, indice_key="d", **options)(z)
    with pytest.raises(ValueError, match="the input's sites are not the output sites of the layer under"):
        cb.SparseInverseConv3d(w3, indice_key="d", **options)(y)


def test_output_rows_are_sorted_and_runs_are_bitwise_identical(target):
    """Unsorted input rows: the output is in (batch, z, y, x) order, and equal bit for bit on a second run."""
    backend, device = target
    rng = np.random.default_rng(4)
    t = random_tensor(rng, 3, 17, (7, 12, 9), 400)
    assert not np.array_equal(t.indices, sorted_sites(t.indices))
    w, b = uniform(rng, 19, 17, 3, 3, 3), uniform(rng, 19)
    for options in (dict(subm=True), dict(stride=2, padding=1), dict(stride=(1, 2, 3), dilation=2, padding=1)):
        with cb.SparseConv3d(w, b, backend=backend, device=device, **options) as layer:
            first, second = layer(t), layer(cb.SparseTensor(t.features.copy(), t.indices.copy(), (7, 12, 9), 3))
        assert np.array_equal(first.indices, sorted_sites(first.indices))
        assert np.array_equal(first.indices, second.indices)
        assert np.array_equal(to_host(first.features).view(np.uint32), to_host(second.features).view(np.uint32))


@pytest.mark.parametrize("options", [dict(subm=True), dict(stride=2, padding=1), dict(stride=3)], ids=str)
def test_empty_tensor_gives_empty_output(target, options):
    backend, device = target
    t = cb.SparseTensor(np.zeros((0, 3), np.float32), np.zeros((0, 4), np.int32), (5, 6, 7), 2)
    w = np.ones((4, 3, 3, 3, 3), np.float32)
    with cb.SparseConv3d(w, np.ones(4, np.float32), indice_key="e", backend=backend, device=device, **options) as layer:
        y = layer(t)
    assert y.num_sites == 0 and y.features.shape == (0, 4) and y.indices.shape == (0, 4)
    assert y.dense().shape == (2, 4, *layer.spec.output_shape((5, 6, 7)))
    if not options.get("subm"):
        with cb.SparseInverseConv3d(np.ones((3, 4, 3, 3, 3), np.float32), indice_key="e", backend=backend,
                                    device=device) as up:
            z = up(y)
        assert z.num_sites == 0 and z.features.shape == (0, 3) and z.spatial_shape == (5, 6, 7)


def test_sites_no_tap_reaches_get_the_bias_in_the_inverse(target):
    """Stride 3 with a 1-wide kernel skips input rows: their inverse output is the activation of the bias."""
    backend, device = target
    indices = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 3, 0, 0]], np.int32)
    t = cb.SparseTensor(np.ones((3, 2), np.float32), indices, (4, 3, 3), 1)
    w = np.full((2, 2, 1, 1, 1), 0.5, np.float32)
    with cb.SparseConv3d(w, stride=3, indice_key="k", backend=backend, device=device) as down:
        mid = down(t)
    assert np.array_equal(mid.indices, [[0, 0, 0, 0], [0, 1, 0, 0]])
    with cb.SparseInverseConv3d(w, np.array([-1, 2], np.float32), indice_key="k", activation="relu",
                                backend=backend, device=device) as up:
        y = up(mid)
    assert np.array_equal(y.indices, indices)
    assert np.allclose(to_host(y.features), [[0, 3], [0, 2], [0, 3]])


def test_dense_round_trip_and_spconv_weight_layout():
    rng = np.random.default_rng(5)
    x = uniform(rng, 2, 3, 4, 5, 6) * (rng.random((2, 1, 4, 5, 6)) < 0.3)
    t = cb.SparseTensor.from_dense(x)
    assert np.array_equal(t.dense(), x) and np.array_equal(t.indices, sorted_sites(t.indices))
    spconv_w = uniform(rng, 4, 3, 3, 2, 3)  # spconv's (O, kd, kh, kw, C)
    w = spconv_w.transpose(0, 4, 1, 2, 3).copy()
    y = cb.sparse_conv3d(t, w, subm=False, stride=1)
    sites, ref = sparse_conv3d_float64(t.indices, t.features, w, batch_size=2, spatial_shape=(4, 5, 6))
    assert_matches(y, (sites, ref))
    assert_matches(y, cv2_sparse_conv3d(t.indices, t.features, w, batch_size=2, spatial_shape=(4, 5, 6)))


def test_one_shot_call_sees_weights_changed_in_place(target):
    backend, device = target
    rng = np.random.default_rng(6)
    t = random_tensor(rng, 1, 4, (6, 6, 6), 60)
    w = uniform(rng, 5, 4, 3, 3, 3)
    first = cb.sparse_conv3d(t, w, subm=True, backend=backend, device=device)
    w[0, 1, 1, 1, 1] += 1
    second = cb.sparse_conv3d(t, w, subm=True, backend=backend, device=device)
    ref = sparse_conv3d_float64(t.indices, t.features, w, batch_size=1, spatial_shape=(6, 6, 6), subm=True)
    assert_matches(second, ref)
    assert not np.allclose(to_host(first.features), to_host(second.features))


@pytest.mark.parametrize("indices, message", [
    (np.array([[0, 1, 2, 3], [0, 1, 2, 3]], np.int32), r"indices row 1 repeats the site \(0, 1, 2, 3\)"),
    (np.array([[0, 2, 2, 2], [0, 1, 1, 1], [0, 2, 2, 2]], np.int32), r"indices row 2 repeats the site \(0, 2, 2, 2\)"),
    (np.array([[0, 4, 1, 1], [0, 1, 2, 3]], np.int32), r"indices row 0 \(0, 4, 1, 1\) \(batch, z, y, x\) lies outside"),
    (np.array([[0, 0, 0, 0], [0, 2, 5, 3]], np.int32), r"indices row 1 \(0, 2, 5, 3\) \(batch, z, y, x\) lies "
                                                       r"outside spatial_shape \(4, 5, 6\)"),
    (np.array([[0, 0, 0, 0], [0, 0, -1, 0]], np.int32), r"indices row 1 \(0, 0, -1, 0\) .* lies outside"),
    (np.array([[2, 0, 0, 0]], np.int32), r"indices row 0 \(2, 0, 0, 0\) has batch index 2 outside 0..1"),
    (np.array([[-1, 0, 0, 0]], np.int32), r"has batch index -1 outside 0..1"),
    (np.array([[0, 0, 0, 0]], np.int64), r"indices must be int32, got int64; convert them with .astype"),
    (np.array([[0, 0, 0]], np.int32), r"indices must have shape \(N, 4\) as \(batch, z, y, x\), got \(1, 3\)"),
    (np.array([0, 0, 0, 0], np.int32), r"indices must have shape \(N, 4\)"),
])
def test_bad_sites_are_refused(indices, message):
    with pytest.raises(ValueError, match=message):
        cb.SparseTensor(np.zeros((len(indices), 2), np.float32), indices, (4, 5, 6), 2)


def test_bad_tensors_are_refused():
    good = np.zeros((2, 4), np.int32)
    good[1, 3] = 1
    with pytest.raises(ValueError, match=r"features must have shape \(N, C\) with N = 2 rows of indices"):
        cb.SparseTensor(np.zeros((3, 2), np.float32), good, (4, 5, 6), 1)
    with pytest.raises(TypeError, match="features must be float32, got float64"):
        cb.SparseTensor(np.zeros((2, 2)), good, (4, 5, 6), 1)
    with pytest.raises(TypeError, match="indices must be a numpy.ndarray of int32, got list"):
        cb.SparseTensor(np.zeros((2, 2), np.float32), good.tolist(), (4, 5, 6), 1)
    with pytest.raises(ValueError, match="spatial_shape must be >= 1"):
        cb.SparseTensor(np.zeros((2, 2), np.float32), good, (4, 0, 6), 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        cb.SparseTensor(np.zeros((2, 2), np.float32), good, (4, 5, 6), 0)
    with pytest.raises(ValueError, match=r"batch_size \* D \* H \* W must be below 2\*\*62"):
        cb.SparseTensor(np.zeros((2, 2), np.float32), good, (2**21, 2**21, 2**21), 1)


@pytest.mark.parametrize("w_shape, kwargs, message", [
    ((4, 3, 3, 3), dict(), r"w must be 5-D \(out_channels, in_channels, kd, kh, kw\).*spconv's \(O, kd, kh, kw, C\)"),
    ((4, 3, 2, 3, 3), dict(subm=True), r"a submanifold layer needs an odd kernel, got \(2, 3, 3\)"),
    ((4, 3, 3, 3, 3), dict(subm=True, stride=2), r"a submanifold layer has stride 1, got stride=\(2, 2, 2\)"),
    ((4, 3, 3, 3, 3), dict(subm=True, padding=2), r"padding must be 0 or dilation \* \(k - 1\) / 2 = \(1, 1, 1\)"),
    ((4, 3, 5, 3, 3), dict(subm=True, dilation=2, padding=1), r"= \(4, 2, 2\), got padding=\(1, 1, 1\)"),
    ((4, 3, 3, 3, 3), dict(stride=0), "stride must be >= 1"),
    ((4, 3, 3, 3, 3), dict(padding=-1), "padding must be >= 0"),
    ((4, 3, 3, 3, 3), dict(activation="bogus"), "activation must be one of"),
])
def test_bad_layers_are_refused_with_the_same_message_on_every_backend(target, w_shape, kwargs, message):
    backend, device = target
    with pytest.raises(ValueError, match=message):
        cb.SparseConv3d(np.zeros(w_shape, np.float32), backend=backend, device=device, **kwargs)


def test_bad_inputs_are_refused(target):
    backend, device = target
    t = cb.SparseTensor(np.zeros((1, 3), np.float32), np.zeros((1, 4), np.int32), (3, 3, 3), 1)
    with cb.SparseConv3d(np.zeros((2, 4, 3, 3, 3), np.float32), backend=backend, device=device) as layer:
        with pytest.raises(ValueError, match="the input has 3 channels but w expects 4"):
            layer(t)
        with pytest.raises(TypeError, match="the input must be a SparseTensor, got ndarray"):
            layer(np.zeros((1, 4), np.float32))
    with cb.SparseConv3d(np.zeros((2, 3, 5, 5, 5), np.float32), backend=backend, device=device) as layer:
        with pytest.raises(ValueError, match=r"output grid \(-1, -1, -1\) is empty for spatial_shape \(3, 3, 3\)"):
            layer(t)
    with pytest.raises(TypeError, match="SparseInverseConv3d needs the indice_key"):
        cb.SparseInverseConv3d(np.zeros((2, 3, 3, 3, 3), np.float32), indice_key=None, backend=backend, device=device)


def test_cost_follows_the_active_sites_not_the_grid():
    """A KITTI-sized grid (41 x 1600 x 1408 = 92M positions, 88 MiB even as booleans) with 120k LiDAR-like
    sites: a SubM and a strided regular layer, rulebook and compute, stay far below the grid's size."""
    grid = (41, 1600, 1408)
    indices = lidar_sites(120_000, grid, seed=1)
    rng = np.random.default_rng(0)
    t = cb.SparseTensor(uniform(rng, len(indices), 16), indices, grid, 1)
    for options in (dict(subm=True), dict(stride=2, padding=1)):
        layer = cb.SparseConv3d(uniform(rng, 16, 16, 3, 3, 3), **options)
        tracemalloc.start()
        try:
            y = layer(t)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert y.num_sites >= len(indices) if not options.get("subm") else y.num_sites == len(indices)
        assert peak < 64 << 20, f"{options}: peak {peak / 2**20:.0f} MiB"


def test_public_names():
    for name in ("SparseTensor", "SparseConv3d", "SparseInverseConv3d", "sparse_conv3d"):
        assert getattr(cb, name) is getattr(__import__("convbackends.ops.sparse_conv3d", fromlist=[name]), name)


def test_cv2_dnn_runs_dense_3d_conv_with_pads_strides_dilation():
    """The truth's premise: cv2.dnn's 3-D Conv and ConvTranspose agree with the float64 definitions."""
    from convbackends.reference import conv3d_float64, conv_transpose3d_float64, cv2_conv3d

    rng = np.random.default_rng(8)
    x = uniform(rng, 2, 3, 9, 8, 10)
    for kernel, stride, padding, dilation in (((3, 3, 3), 1, 0, 1), ((3, 2, 3), 2, 1, 1),
                                              ((3, 2, 2), (1, 2, 3), (2, 0, 1), (2, 1, 3)), ((5, 1, 4), 3, 2, 2)):
        w, b = uniform(rng, 4, 3, *kernel), uniform(rng, 4)
        geometry = dict(stride=stride, padding=padding, dilation=dilation)
        assert compare(cv2_conv3d(x, w, b, activation="tanh", **geometry),
                       np.tanh(conv3d_float64(x, w, b, **geometry)))[3]
        small, wt = uniform(rng, 2, 3, 4, 5, 4), uniform(rng, 3, 4, *kernel)
        y = cv2_conv3d(small, wt, b, transposed=True, **geometry)
        assert compare(y, conv_transpose3d_float64(small, wt, b, out_shape=y.shape[2:], **geometry))[3]


@pytest.mark.parametrize("as_gpu", [False, True], ids=["device-kernels", "gpu-kernels"])
def test_opencl_device_features_in_and_out(monkeypatch, as_gpu):
    """pyopencl features stay on the device through a network; the sites come to the host only when asked."""
    from conftest import cpu_device

    device = cpu_device(monkeypatch, "opencl", as_gpu)
    import pyopencl.array as cla

    from convbackends.runtime.opencl import BACKEND

    queue = BACKEND.runtime(device).queue
    rng = np.random.default_rng(9)
    host = random_tensor(rng, 2, 5, (9, 10, 11), 240)
    t = cb.SparseTensor(cla.to_device(queue, host.features), host.indices, host.spatial_shape, 2)
    layers = unet(rng)
    outputs = run_unet(layers, t, "opencl", device)
    assert all(isinstance(o.features, cla.Array) for o in outputs)
    for i, (y, ref) in enumerate(zip(outputs, unet_float64(layers, host))):
        _, _, _, passed, detail = compare_sparse(y, ref)
        assert passed, f"layer {i}: {detail}"
