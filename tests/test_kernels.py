"""The shared kernels/ sources: CUDA compiles (nvcc -ptx, no GPU needed) and the host-side plan.

PoCL runs the OpenCL build of the same sources (tests/test_opencl.py); compiling the CUDA side
here for sm_80 and sm_90 catches dialect slips that only NVCC would see.
"""
import math
import shutil
import subprocess

import numpy as np
import pytest

from convbackends.backends.kernel import conv2d as _kernels
from convbackends.backends.kernel import deform_conv2d as _deform_kernels
from convbackends.runtime import kernels as kernel_runtime
from convbackends.spec import ACTIVATION_CODES, Conv2dSpec

GPU = kernel_runtime.DeviceLimits("gpu", 1024, 48 * 1024)
CPU = kernel_runtime.DeviceLimits("cpu", 4096, 512 * 1024)
ACTIVATIONS = [
    None, "relu", "relu6", "sigmoid", "tanh", "silu", "mish", "hardswish", ("leaky_relu", 0.1), ("clip", -1.0, 2.0)
]


def _plan(o, cg, k, *, groups=1, activation=None, limits=GPU, **kwargs):
    w = np.zeros((o, cg, *k), np.float32)
    spec = Conv2dSpec.create(w, groups=groups, activation=activation, **kwargs)
    return _kernels.Plan(spec, w, None, limits)


def _representative_plans():
    """Every GPU tile, every algorithm and every activation at least once."""
    plans = []
    for i, og in enumerate((128, 64, 32, 8)):
        plans.append(_plan(og, 16, (3, 3), activation=ACTIVATIONS[i], padding=1))
        plans.append(_plan(og, 16, (1, 1), activation=ACTIVATIONS[i + 4]))
    plans.append(_plan(24, 1, (3, 3), groups=12, activation=ACTIVATIONS[8], padding=1))
    plans.append(_plan(12, 1, (5, 7), groups=12, activation=ACTIVATIONS[9], dilation=2))
    return plans


PLANS = _representative_plans()


def _winograd_plan(limits=GPU, o=64, c=32, activation="silu"):
    w = np.random.default_rng(0).standard_normal((o, c, 3, 3)).astype(np.float32)
    spec = Conv2dSpec.create(w, padding=1, activation=activation)
    return _kernels.WinogradPlan(spec, w, None, limits, lambda plan: None, lambda kernel: limits.max_threads)


WINOGRAD_PLAN = _winograd_plan()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile_with_nvcc(tmp_path, arch):
    sources = [(plan.kernel_name, plan.source, plan.options) for plan in PLANS]
    sources.append(("copy_strided", kernel_runtime.source("copy_strided.h"), ()))
    sources.append(("conv_transpose2d_phases", kernel_runtime.source("conv_transpose2d_phases.h"), ()))
    sources.append(("pad_input", PLANS[0].pad_source, PLANS[0].pad_options))
    winograd = WINOGRAD_PLAN
    sources += [(name, winograd.source, winograd.options) for name in ("conv2d_winograd_input", "conv2d_winograd_output")]
    deform = kernel_runtime.source(*_deform_kernels.IM2COL_SOURCE)
    sources += [(name, deform, ("-DINDEX_T=int",)) for name in _deform_kernels.KERNEL_NAMES]
    implicit = kernel_runtime.source(*_deform_kernels.IMPLICIT_GEMM_SOURCE)
    sources += [("deform_conv2d_implicit_gemm", implicit, _deform_kernels.implicit_gemm_options(tiles, code, "int"))
                for tiles, code in zip(_kernels.GPU_TILES, (0, 1, 6, 9, 3))]
    jobs = []
    for i, (name, source, options) in enumerate(sources):
        cu, ptx = tmp_path / f"{name}_{i}.cu", tmp_path / f"{name}_{i}.ptx"
        cu.write_text(source)
        command = ["nvcc", "-ptx", f"-arch={arch}", "-std=c++17", *options, str(cu), "-o", str(ptx)]
        jobs.append((name, options, ptx, subprocess.Popen(command, stderr=subprocess.PIPE, text=True)))
    for name, options, ptx, job in jobs:
        _, stderr = job.communicate()
        assert job.returncode == 0, f"{name} {options}: {stderr}"
        assert f".entry {name}(" in ptx.read_text()


def test_plans_cover_every_activation():
    codes = {int(opt.split("=")[1]) for plan in PLANS for opt in plan.options if opt.startswith("-DACTIVATION=")}
    assert codes == set(ACTIVATION_CODES.values())


@pytest.mark.parametrize("tiles", _kernels.GPU_TILES, ids=str)
def test_tile_tables_suit_the_loaders(tiles):
    assert tiles.is_valid()


@pytest.mark.parametrize("limits", [GPU, kernel_runtime.DeviceLimits("gpu", 64, 4096)], ids=str)
@pytest.mark.parametrize("og", [1, 13, 32, 64, 200])
def test_tile_choice_respects_device_limits(limits, og):
    tiles = _kernels.choose_tiles(og, limits)
    assert tiles.is_valid()
    assert tiles.threads <= limits.max_threads and tiles.local_bytes <= limits.local_mem


def test_plan_shrinks_when_the_built_kernel_allows_fewer_work_items():
    w = np.zeros((128, 16, 3, 3), np.float32)
    spec = Conv2dSpec.create(w, padding=1)
    built = []
    plan, kernel = _kernels.fit_plan(spec, w, None, GPU, lambda p: built.append(p) or p, lambda k: 128)
    assert len(built) == 2 and kernel is plan and plan.threads <= 128


def test_weights_are_packed_per_group_k_major_and_zero_padded():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    spec = Conv2dSpec.create(w, groups=3, padding=1)
    plan = _kernels.Plan(spec, w, None, GPU)
    g, kpad, ogpad = plan.weights.shape
    assert g == 3 and kpad % plan.tiles.tk == 0 and ogpad % plan.tiles.tm == 0
    np.testing.assert_array_equal(plan.weights[1, :18, :2], w[2:4].reshape(2, 18).T)
    assert not plan.weights[:, 18:].any() and not plan.weights[:, :, 2:].any()
    np.testing.assert_array_equal(plan.bias, np.zeros(6, np.float32))


def test_gather_table_points_at_the_tap_in_the_padded_input():
    w = np.zeros((4, 3, 2, 3), np.float32)
    spec = Conv2dSpec.create(w, dilation=(2, 3), padding=(1, 2, 0, 1))
    plan = _kernels.Plan(spec, w, None, GPU)
    geom = spec.geometry((1, 3, 9, 10))
    assert (geom.oh, geom.ow) == (8, 7)
    hp, wp = plan.padded(geom)
    assert (hp, wp) == (7 + 2 + 1, 6 + 6 + 1)  # the taps' reach: (out - 1) * stride + (k - 1) * dilation + 1
    table = plan.ktab(geom)
    k = 1 * 6 + 1 * 3 + 2  # c=1, kh=1, kw=2
    assert table[k] == 1 * hp * wp + 1 * 2 * wp + 2 * 3
    assert table.shape == (plan.kpad,) and not table[18:].any()


def test_only_padded_layers_get_a_padded_copy():
    unpadded = _plan(8, 4, (3, 3), stride=2)
    assert unpadded.padded(unpadded.spec.geometry((1, 4, 9, 9))) is None
    pointwise = _plan(8, 4, (1, 1))
    assert pointwise.padded(pointwise.spec.geometry((1, 4, 9, 9))) is None
    depthwise = _plan(8, 1, (3, 3), groups=4, stride=2)
    geom = depthwise.spec.geometry((2, 4, 9, 11))
    hp, wp = depthwise.padded(geom)
    # the real outputs' reads (work-items past them re-read the last row and pixel), whatever the stride
    assert (hp, wp) == ((geom.oh - 1) * 2 + 3, (geom.ow - 1) * 2 + 3)
    far = _plan(8, 1, (3, 3), groups=4, stride=2**31 - 1, padding=1)
    assert far.padded(far.spec.geometry((1, 4, 8, 8))) == (3, 3)
    launch = depthwise.pad_launch(geom)
    gx, gy, _ = launch.global_size
    assert gx * gy >= 2 * 4 * hp * wp and all(g % l == 0 for g, l in zip(launch.global_size, launch.local_size))


def test_launch_covers_the_output_in_whole_work_groups():
    plan = _plan(40, 13, (3, 3), stride=2, padding=1)
    geom = plan.spec.geometry((3, 13, 17, 15))
    launch = plan.launch(geom)
    assert all(g % l == 0 for g, l in zip(launch.global_size, launch.local_size))
    gx, gy, _ = launch.grid
    assert gx * plan.tiles.tn >= geom.n * geom.oh * geom.ow and gy * plan.tiles.tm >= 40
    assert all(isinstance(s, (np.int32, np.float32)) for s in launch.scalars)


def test_cpu_devices_run_both_gemm_forms_as_cpu_gemm_with_channel_blocked_weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 3, 3, 3)).astype(np.float32)
    plan = _kernels.Plan(Conv2dSpec.create(w, padding=1), w, None, CPU)
    assert plan.kernel_name == "conv2d_cpu_gemm" and plan.uses_ktab and plan.threads == 8 * 3
    g, blocks, k, lanes = plan.weights.shape
    assert (g, blocks, k, lanes) == (1, 3, 27, 8)
    np.testing.assert_array_equal(plan.weights[0, 1, :, 2], w[10].reshape(27))
    assert not plan.weights[0, 2, :, 4:].any()
    assert "-DKCHUNK=0" in plan.options
    deep = _plan(8, 512, (3, 3), padding=1, limits=CPU)
    assert f"-DKCHUNK={_kernels.CPU_K_CHUNK}" in deep.options
    assert _plan(8, 4, (1, 1), limits=CPU).kernel_name == "conv2d_cpu_gemm"
    assert _plan(8, 1, (3, 3), groups=8, limits=CPU).kernel_name == "conv2d_depthwise"


def test_cpu_gemm_reads_unpadded_inputs_in_place_and_pads_rows_to_whole_vector_reads():
    pointwise = _plan(8, 4, (1, 1), limits=CPU)
    assert pointwise.padded(pointwise.spec.geometry((1, 4, 16, 16))) is None
    ragged = pointwise.spec.geometry((1, 4, 14, 14))
    assert pointwise.padded(ragged) is None and pointwise.vector_blocks(ragged) == 1  # the second block gathers
    short = pointwise.spec.geometry((1, 4, 7, 7))  # no vector read fits a row: a copy of whole blocks
    assert pointwise.padded(short) == (7, 8) and pointwise.vector_blocks(short) == 1
    strided = _plan(8, 4, (3, 3), stride=2, limits=CPU)
    geom = strided.spec.geometry((1, 4, 33, 33))  # 16 outputs a row: a block reads 16 inputs per tap
    assert strided.padded(geom) is None and strided.vector_blocks(geom) == 1  # 16 + 15 + 2 > 32
    assert strided.vector_blocks(strided.spec.geometry((1, 4, 35, 35))) == 2
    padded = _plan(8, 4, (3, 3), stride=2, padding=1, limits=CPU)
    geom = padded.spec.geometry((1, 4, 33, 33))
    assert (geom.ow, padded.padded(geom)) == (17, (35, 24 * 2 + 2))  # a copy anyway: rows of whole blocks
    assert padded.vector_blocks(geom) == 3
    gathered = _plan(8, 4, (3, 3), stride=3, limits=CPU)
    geom = gathered.spec.geometry((1, 4, 33, 33))
    assert gathered.padded(geom) is None and gathered.vector_blocks(geom) == 0


def test_cpu_depthwise_and_pad_copy_work_in_rows():
    depthwise = _plan(8, 1, (3, 3), groups=8, stride=2, padding=1, limits=CPU)
    geom = depthwise.spec.geometry((1, 8, 15, 15))
    hp, wp = depthwise.padded(geom)
    # the last real block's 16-input read stays inside the row (blocks past it re-read the last one)
    assert depthwise.dw_vec == 8 and wp == math.ceil(geom.ow / 8) * 8 * 2 + 2
    launch = depthwise.pad_launch(geom)
    assert launch.local_size == (1, _kernels.PAD_CPU_LOCAL[1], 1) and launch.global_size[0] * launch.local_size[1] >= 8 * hp


def test_winograd_plan_runs_the_36_gemms_as_one_grouped_1x1_layer_over_the_batch():
    for limits, kernel in ((GPU, "conv2d_gemm_1x1"), (CPU, "conv2d_cpu_gemm")):
        plan = _winograd_plan(limits, o=40, c=24)
        assert plan.gemm.kernel_name == kernel and plan.gemm.spec.groups == 36
        geom = plan.spec.geometry((3, 24, 13, 18))  # 4 x 5 tiles of 4x4 per image
        assert plan.pixels(geom) == 3 * 20 and plan.tile_plane(geom) == 64
        assert plan.padded(geom) == (4 * 4 + 2, 4 * 5 + 2)
        gemm = plan.gemm_geometry(geom)
        assert (gemm.n, gemm.c, gemm.o, gemm.oh, gemm.ow) == (1, 36 * 24, 36 * 40, 1, 64)
        assert plan.gemm.padded(gemm) is None  # V is read in place: whole 8-pixel blocks
        launch = plan.input_launch(geom)
        assert launch.global_size[1] == 24 and launch.global_size[0] >= 64
    assert not _kernels.WinogradPlan.eligible(Conv2dSpec.create(np.zeros((64, 64, 3, 3), np.float32), stride=2), GPU)
    assert _kernels.WinogradPlan.eligible(Conv2dSpec.create(np.zeros((64, 64, 3, 3), np.float32)), GPU)
    assert not _kernels.WinogradPlan.eligible(Conv2dSpec.create(np.zeros((64, 64, 3, 3), np.float32)), CPU)


def test_winograd_runs_a_batch_in_parts_whose_transformed_copies_fit_the_buffer_limit():
    plan = _winograd_plan(GPU, o=64, c=64)
    geom = plan.spec.geometry((2, 64, 32, 32))  # 64 tiles per image: V and M hold 36 * 64 * TPS floats
    one_image = 4 * 36 * 64 * (64 + 7)  # TPS: the tiles rounded up to whole 8-pixel blocks
    assert plan.pays(geom, kernel_runtime.DeviceLimits("gpu", 1024, 48 * 1024, one_image))
    assert not plan.pays(geom, kernel_runtime.DeviceLimits("gpu", 1024, 48 * 1024, one_image - 1))
    buffers = plan.call_buffers(geom)
    assert {b.name for b in buffers} == {"padded input copy", "Winograd V", "Winograd M"}
    assert kernel_runtime.images_per_chunk(2, buffers, one_image, "LIMIT", "opencl") == 1
    assert kernel_runtime.images_per_chunk(2, buffers, 4 * 36 * 64 * (128 + 7), "LIMIT", "opencl") == 2
    assert kernel_runtime.images_per_chunk(2, buffers, 1 << 40, "LIMIT", "opencl") == 2
    # V and M keep their own cap (WINOGRAD_MAX_BUFFER_BYTES) however large the device's buffers
    big = plan.spec.geometry((256, 64, 128, 128))  # 1024 tiles per image
    parts = kernel_runtime.images_per_chunk(256, plan.call_buffers(big), 1 << 40, "LIMIT", "opencl")
    assert parts < 256
    assert 4 * 36 * 64 * (parts * 1024 + 7) <= _kernels.WINOGRAD_MAX_BUFFER_BYTES < 4 * 36 * 64 * (parts + 1) * 1024


def test_a_buffer_one_image_overfills_is_refused_with_its_name_and_the_limit():
    plan = _plan(16, 8, (3, 3), padding=2, limits=CPU)
    geom = plan.spec.geometry((4, 8, 30, 30))
    padded = 4 * 8 * 34 * 34
    assert [b.name for b in plan.call_buffers(geom)] == ["padded input copy"]
    assert plan.call_buffers(geom)[0].nbytes(1) >= padded
    need = plan.call_buffers(geom)[0].nbytes(1)
    assert kernel_runtime.images_per_chunk(4, plan.call_buffers(geom), 2 * need, "LIMIT_NAME", "opencl") == 2
    message = rf"opencl: one image needs a padded input copy of {need} bytes, .*LIMIT_NAME: {need - 1} bytes"
    with pytest.raises(ValueError, match=message):
        kernel_runtime.images_per_chunk(4, plan.call_buffers(geom), need - 1, "LIMIT_NAME", "opencl")
