#!/usr/bin/env bash
# Checks the CUDA path on a machine without a GPU, in two parts.
#
# 1. The kernels: scripts/cuda_emu compiles both crates' kernels.cu as C++20 (a stand-in for CUDA's
#    built-ins, bf16 and f16 types) and runs each kernel on the CPU, with the grid its Rust launcher
#    gives it (a std::thread per CUDA thread and a std::barrier per block where the kernel calls
#    __syncthreads), against f64 references, central differences for the backward kernels,
#    splitmix64's published sequence for dropout, and the f32 kernel rounded once for the bf16/f16
#    ones (scripts/kernel_emu/reference.h, shared with the Metal emulation). Needs only g++.
# 2. The build: `cargo check --workspace --all-targets --features ddpm-cli/cuda`. nvcc, the CUDA
#    headers and CCCL come from PyPI (no driver or GPU needed); candle's kernels and ours are compiled
#    to PTX by their build scripts, and `cargo check` stops before the link, which would need
#    libcuda/cuBLAS/cuRAND/NVRTC from a CUDA machine.
#
# Neither runs anything on a GPU: nvcc's own code generation (fused multiply-adds, warps) is not
# emulated. scripts/gpu_check.sh runs the GPU tests on a GPU machine.
#
#   scripts/check_cuda.sh            # toolkit under ~/.cache/ddpm-rs/cuda-toolkit ($XDG_CACHE_HOME if set)
#   CUDA_TOOLKIT_DIR=/opt/x scripts/check_cuda.sh
#   CUDA_CHECK_OPTIONAL=1 scripts/check_cuda.sh   # skip (exit 0) if PyPI cannot be reached
set -euo pipefail
cd "$(dirname "$0")/.."

# 1 first: it needs only a C++20 compiler.
mkdir -p target/cuda-emu
"${CXX:-g++}" -std=c++20 -O2 -Wall -Wextra -Werror -x c++ -I scripts/cuda_emu -I scripts/kernel_emu -I crates/ddpm-core/src/ops/cuda \
    -o target/cuda-emu/harness scripts/cuda_emu/harness.cpp -pthread
target/cuda-emu/harness

TOOLKIT="${CUDA_TOOLKIT_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/ddpm-rs/cuda-toolkit}"
PYTHON="${PYTHON:-python3}"
# Pinned so that every check compiles against the same toolkit.
PACKAGES=(nvidia-cuda-nvcc==13.5.37 nvidia-cuda-runtime==13.5.37 nvidia-cuda-crt==13.5.37
          nvidia-nvvm==13.5.37 nvidia-cuda-cccl==13.3.5.0.6)

if [ ! -x "$TOOLKIT/nvidia/cu13/bin/nvcc" ]; then
    echo "installing the CUDA toolkit from PyPI into $TOOLKIT"
    if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$TOOLKIT" "${PACKAGES[@]}"; then
        # CI sets CUDA_CHECK_OPTIONAL=1: PyPI being out of reach is not a compile error.
        if [ "${CUDA_CHECK_OPTIONAL:-0}" = 1 ]; then
            echo "cuda compile check SKIPPED: the CUDA toolkit could not be installed from PyPI" >&2
            exit 0
        fi
        exit 1
    fi
fi
CUDA_ROOT="$TOOLKIT/nvidia/cu13"
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
# nvcc's cicc and libdevice sit in nvvm/; CCCL (cub, thrust, cuda/std) in cccl/include.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$CUDA_ROOT/cccl/include"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# cudarc 0.19 knows CUDA versions up to 13.4 and panics on a newer nvcc unless told.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
nvcc --version | tail -n 2

# Its own target folder: the CPU build's artefacts stay as they are.
cargo check --workspace --all-targets --features ddpm-cli/cuda --target-dir target/cuda-check
echo "cuda compile check passed"

# Every kernel in the PTX that the build scripts just wrote has a check in the emulation of part 1.
for ptx in "$(ls -t target/cuda-check/debug/build/ddpm-core-*/out/ddpm_kernels.ptx | head -n1)" \
           "$(ls -t target/cuda-check/debug/build/ddpm-unet-*/out/ddpm_unet_kernels.ptx | head -n1)"; do
    for kernel in $(sed -n 's/^.*\.entry \([A-Za-z0-9_]*\)(.*$/\1/p' "$ptx"); do
        if ! grep -qw "$kernel" scripts/cuda_emu/harness.cpp; then
            echo "the CUDA kernel $kernel ($ptx) has no check in scripts/cuda_emu/harness.cpp" >&2
            exit 1
        fi
    done
done
echo "every CUDA kernel has an emulated check"
