"""The package as `pip install convbackends` leaves it: numpy, threadpoolctl and nothing else (then with rich, the
`cli` extra).

The wheel is built from this checkout and installed with --no-deps into a fresh venv that has no pip and
sees no site-packages; its dependencies (and rich with its own) come from this environment through a .pth
file, so nothing is downloaded. Each command either works or ends in one line naming what to install.
"""
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", ".gpu-carry", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".hypothesis")
RICH = ("rich", "markdown-it-py", "mdurl", "pygments")  # rich and what it imports


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def _link_distributions(names, folder: Path) -> None:
    """Symlink the top-level files and folders of installed distributions into `folder`."""
    folder.mkdir()
    for name in names:
        dist = metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """(python of a venv holding the wheel and its dependencies only, a folder that adds rich, a working directory)."""
    work = tmp_path_factory.mktemp("bare")
    source, wheels = work / "source", work / "wheels"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(wheels), str(source)])
    assert built.returncode == 0, built.stdout + built.stderr
    venv = work / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    python = venv / "bin" / "python"
    installed = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                      "-q", *map(str, wheels.glob("convbackends-*.whl"))])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _link_distributions(["numpy", "threadpoolctl"], work / "dependencies")
    (site / "dependencies-from-the-test-environment.pth").write_text(f"{work / 'dependencies'}\n")
    _link_distributions(RICH, work / "rich-only")
    cwd = work / "cwd"  # holds nothing importable
    cwd.mkdir()
    return python, work / "rich-only", cwd


def _convbackends(bare, *args, rich: bool = False) -> subprocess.CompletedProcess:
    python, rich_folder, cwd = bare
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONNOUSERSITE"] = "1"
    if rich:
        env["PYTHONPATH"] = str(rich_folder)
    return _run([str(python), "-m", "convbackends", *args], env=env, cwd=cwd)  # not ROOT: -m would import the checkout


def _one_line(result, hint: str) -> None:
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and hint in result.stderr, result.stderr


def test_the_installed_package_is_the_wheel_with_numpy_only(bare):
    python, _, cwd = bare
    probe = "import convbackends, importlib.util as u; print(convbackends.__file__, [m for m in ('cv2', 'onnx', " \
            "'rich', 'pyopencl', 'vulkan', 'cupy') if u.find_spec(m)])"
    out = _run([str(python), "-c", probe], cwd=cwd, env={"PYTHONNOUSERSITE": "1"}).stdout.split()
    assert Path(out[0]).is_relative_to(python.parent.parent) and out[1] == "[]"


def test_devices_and_bench_without_rich_say_what_to_install(bare):
    for args in (["devices"], ["bench", "--suite", "smoke", "--backends", "numpy"]):
        _one_line(_convbackends(bare, *args), "tables need rich: pip install 'convbackends[cli]'")


def test_devices_json_names_the_extra_of_each_missing_backend(bare):
    result = _convbackends(bare, "devices", "--json")
    assert result.returncode == 0, result.stderr
    backends = {b["name"]: b for b in json.loads(result.stdout)["backends"]}
    assert backends["numpy"]["available"]
    for name, hint in (("opencl", "pip install 'convbackends[opencl]'"), ("vulkan", "pip install 'convbackends[vulkan]'"),
                       ("cuda", "'convbackends[cuda12]' or 'convbackends[cuda13]'")):
        assert not backends[name]["available"] and hint in backends[name]["reason"], backends[name]


def test_devices_with_rich(bare):
    result = _convbackends(bare, "devices", rich=True)
    assert result.returncode == 0, result.stderr
    assert "numpy:0" in result.stdout
    assert "opencl: unavailable (ModuleNotFoundError: No module named 'pyopencl'; pip install " \
           "'convbackends[opencl]')" in result.stdout


def test_bench_without_cv2_times_and_says_the_checks_were_skipped(bare):
    out = bare[2] / "smoke.json"
    result = _convbackends(bare, "bench", "--suite", "smoke", "--backends", "numpy", "--repeats", "2", "--warmup", "1",
                           "--json", str(out), rich=True)
    assert result.returncode == 0, result.stderr
    hint = "cv2 is not installed: pip install 'convbackends[reference]'"
    assert f"checks skipped, outputs not compared with cv2.dnn: {hint}" in result.stdout
    assert f"not run: cv2dnn: {hint}" in result.stdout
    doc = json.loads(out.read_text())
    assert doc["settings"]["checked"] is False and doc["settings"]["backends"] == "numpy"
    assert [r["target"] for r in doc["results"]] == ["numpy:0"] * 4
    assert all(r["status"] == "ok" and r["median_s"] > 0 and r["passed"] is None for r in doc["results"])


def test_parity_and_onnx_without_the_reference_say_what_to_install(bare):
    _one_line(_convbackends(bare, "parity", "--suite", "smoke", rich=True),
              "parity compares with cv2.dnn, but cv2 is not installed: pip install 'convbackends[reference]'")
    model = bare[2] / "model.onnx"
    model.write_bytes(b"")
    _one_line(_convbackends(bare, "bench", "--onnx", str(model), rich=True),
              "--onnx needs onnx: pip install 'convbackends[reference]'")


def test_bad_input_is_one_line_there_too(bare):
    _one_line(_convbackends(bare, "bench", "--repeats", "0"), "argument --repeats: must be an integer >= 1")


def test_dask_without_dask_says_what_to_install(bare):
    _one_line(_convbackends(bare, "bench", "--suite", "smoke", "--local-cluster", "2", rich=True),
              "--scheduler and --local-cluster need dask.distributed: pip install 'convbackends[dask]'")
    python, _, cwd = bare
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = _run([str(python), "-c", "import convbackends.dask"], env={**env, "PYTHONNOUSERSITE": "1"}, cwd=cwd)
    assert result.returncode == 1 and "pip install 'convbackends[dask]'" in result.stderr, result.stderr
