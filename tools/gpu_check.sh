#!/usr/bin/env bash
# The GPU checks in one call, for a session that is lent a GPU machine (CUDA, Vulkan on the NVIDIA
# driver, OpenCL where its ICD is there): parity tests and the standard benchmark, results under $OUT.
#
# On this machine, once (downloads what the GPU machine lacks and cannot fetch: it has no network):
#   tools/gpu_check.sh prepare          -> .gpu-carry/ (wheels for its Python 3.12, Vulkan/OpenCL loaders)
# Then, through the device tool, with carry [".gpu-carry"]:
#   bash tools/gpu_check.sh run         -> $OUT/devices.txt, pytest-gpu.txt, benchmarks-standard-gpu.md
# Copy what comes back into docs/ with the date and the device.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
# Not in the GPU image (KINDS.md lists what is): the Vulkan bindings and what they need, pyopencl, ncnn.
WHEELS=(vulkan cffi pycparser pyopencl pytools platformdirs siphash24 typing_extensions ncnn)
DEBS=(libvulkan1 ocl-icd-libopencl1)

prepare() {
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/debs"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$CARRY/wheels" "${WHEELS[@]}"
    local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64-lists'
    mkdir -p /tmp/amd64-lists/partial
    # shellcheck disable=SC2086
    apt-get $o update -qq && (cd "$CARRY/debs" && apt-get $o download "${DEBS[@]}")
    du -sh "$CARRY"
}

run() {
    : "${OUT:?run this through the device tool, which sets OUT}"
    for deb in "$CARRY"/debs/*.deb; do dpkg -x "$deb" /; done
    ldconfig
    local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    if [ -f "$icd" ] && ! ls /usr/share/vulkan/icd.d/*nvidia* /etc/vulkan/icd.d/*nvidia* >/dev/null 2>&1; then
        export VK_DRIVER_FILES=$icd  # the device README's fix for a driver the loader does not find
    fi
    python3 -m pip install -q --no-index --find-links "$CARRY/wheels" vulkan pyopencl ncnn || true
    python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1
    {
        date -u +%FT%TZ
        nvidia-smi -L || true
        python3 -m convbackends devices
    } > "$OUT/devices.txt" 2>&1
    # CUDA and Vulkan parity (the GPU kernels and staged shaders on the real device) and the nvcc build.
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests -k "cuda or vulkan or opencl or kernels" \
        > "$OUT/pytest-gpu.txt" 2>&1 || true
    tail -3 "$OUT/pytest-gpu.txt"
    local backends
    backends=$(python3 -c "import convbackends as cb
print(','.join(n for n, a in cb.available_backends().items() if a.available and n != 'numpy') or 'none')")
    timeout 240 python3 benchmarks/bench_conv2d.py --md "$OUT/benchmarks-standard-gpu.md" \
        --backends "$backends" --peers torch-cuda,ncnn-vulkan --repeats 20 --warmup 3 \
        > "$OUT/bench.log" 2>&1 || true
    sed -n '/Geometric mean/,$p' "$OUT/benchmarks-standard-gpu.md" 2>/dev/null || tail -20 "$OUT/bench.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: tools/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
