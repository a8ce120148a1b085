#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine (root, or a user with sudo):
#   ./setup.sh          install system drivers, a venv in .venv and the package with all extras
#   ./setup.sh demo     ... then run the demo (conv2d on every backend and device vs cv2.dnn)
#   ./setup.sh test     ... then run the test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

# PoCL (OpenCL) and lavapipe (Vulkan) stand in for GPUs on CPU-only machines; glslc/spirv-val
# are needed only to regenerate the embedded SPIR-V (tools/build_spirv.py), never at run time.
APT_PACKAGES=(python3 python3-venv python3-pip
              pocl-opencl-icd ocl-icd-libopencl1 clinfo
              mesa-vulkan-drivers libvulkan1 vulkan-tools
              glslc glslang-tools spirv-tools)
VENV=.venv

install_system_packages() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python_packages() {
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    # Reinstall only when the dependency list changed.
    local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        echo "setup: installing convbackends[all] into $VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".[all]"
        # The torch adapter's tests (convbackends[torch]): this CPU build; a plain "torch" pulls a CUDA build of GBs.
        "$VENV/bin/python" -m pip install -q "torch==2.13.0"
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

install_system_packages
install_python_packages

case "${1:-}" in
    "") echo "setup: done; activate with: source $VENV/bin/activate" ;;
    demo) shift; exec "$VENV/bin/python" -m convbackends.demo "$@" ;;
    test)
        shift
        status=0
        "$VENV/bin/python" -m pytest "$@" || status=$?
        # pytest's 5 means no test was collected: for this project that is a broken suite, not a pass.
        [ $status -eq 5 ] && echo "setup: pytest collected no tests" >&2
        exit $status ;;
    *) echo "usage: ./setup.sh [demo|test [pytest args]]" >&2; exit 2 ;;
esac
