#!/usr/bin/env bash
# Builds the CUDA binaries of the current tree, on a machine without a GPU or a CUDA install, for
# scripts/gpu_check.sh to run on a GPU machine without a Rust toolchain:
#   target/gpubin/ddpm.xz                  `ddpm` (release, --features cuda)
#   target/gpubin/<NAME>.xz                each test binary asked for (see below)
#   target/gpubin/<preset>.json            the presets' UNet configs (`ddpm bench --write-config`)
#   target/gpubin/BUILD_INFO               the commit, whether the tree was dirty, nvcc's version
#
#   scripts/build_gpu_bins.sh                               # ddpm-core:ops_gpu ddpm-unet:gpu
#   scripts/build_gpu_bins.sh ddpm-unet:ops_gpu ddpm-unet:gpu
#   scripts/build_gpu_bins.sh ddpm-unet:gpu=unet_gpu        # PKG:TEST[=NAME]
# A test PKG:TEST is copied as TEST, except a test named just `gpu`, which takes its crate's name
# (ddpm-unet:gpu -> unet_gpu), as gpu_check.sh expects; `=NAME` names it explicitly.
#
# What it needs from outside: cargo, python3 with pip (PyPI), cc, xz. Everything CUDA comes from PyPI:
#   the toolkit (nvcc, headers, CCCL, the runtime)  in $CUDA_TOOLKIT_DIR  (~270 MB)
#   cuBLAS, cuRAND and NVRTC to link against        in $CUDA_LINK_DIR/pkgs (~900 MB)
# and $CUDA_LINK_DIR holds the unversioned names the linker looks for (libcublas.so, ...), symlinks to
# those packages' libraries, plus a stub libcuda.so (soname libcuda.so.1) standing in for the driver,
# whose every function returns CUDA_ERROR_STUB_LIBRARY. On the GPU machine the binaries load the real
# driver and the libraries beside torch (gpu_check.sh sets LD_LIBRARY_PATH for that).
#
# Environment (all optional):
#   CUDA_TOOLKIT_DIR  default ~/.cache/ddpm-rs/cuda-13.0-toolkit ($XDG_CACHE_HOME if set)
#   CUDA_LINK_DIR     default ~/.cache/ddpm-rs/cuda-13.0-link
#   GPU_TARGET_DIR    cargo's target folder, default target/gpu (its own: the CPU build's artefacts stay)
#   GPUBIN            where the binaries go, default target/gpubin
#   CUDA_COMPUTE_CAP  default 90 (H100/H200)
#   PRESETS           presets whose config.json to write, default "mnist-small ddpm-cifar10"
#   XZ_OPTS           default "-T2 -6"
#   PYTHON            default python3
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
say() { echo "[build_gpu_bins $(( $(date +%s) - start ))s] $*" >&2; }
die() { echo "build_gpu_bins: $*" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/ddpm-rs
TOOLKIT=${CUDA_TOOLKIT_DIR:-$cache/cuda-13.0-toolkit}
LINK=${CUDA_LINK_DIR:-$cache/cuda-13.0-link}
TARGET_DIR=${GPU_TARGET_DIR:-target/gpu}
GPUBIN=${GPUBIN:-target/gpubin}
PRESETS=${PRESETS:-"mnist-small ddpm-cifar10"}
read -r -a XZ_OPTS <<< "${XZ_OPTS:--T2 -6}"
if [ $# -gt 0 ]; then TESTS=("$@"); else TESTS=(ddpm-core:ops_gpu ddpm-unet:gpu); fi

# The toolkit is CUDA 13.0: the kernels ship as PTX, which the driver compiles at load time and refuses
# when it is newer than the driver's CUDA; the GPU machine's driver 580 is CUDA 13.0. The libraries are
# for linking only (their sonames, libcublas.so.13 etc., are what the binaries ask for at run time).
TOOLKIT_PACKAGES=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
                  nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85)
LINK_PACKAGES=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)

# pip --target into DIR once; DIR/.installed records the package list, so a changed pin (or an
# interrupted install) reinstalls. Each set gets its own folder: pip --target skips a top-level folder
# (nvidia/) that already exists, so a second install into the same folder would be left out.
pip_install() {
    local dir=$1; shift
    if [ "$(cat "$dir/.installed" 2>/dev/null)" != "$*" ]; then
        # only a folder this script made (or an empty one) is emptied first
        if [ -n "$(ls -A "$dir" 2>/dev/null)" ] && [ ! -e "$dir/.installed" ]; then
            die "$dir is not empty and was not made by this script: remove it or point the variable elsewhere"
        fi
        say "installing $* into $dir"
        rm -rf "$dir"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" "$@"
        echo "$*" > "$dir/.installed"
    fi
}
pip_install "$TOOLKIT" "${TOOLKIT_PACKAGES[@]}"
pip_install "$LINK/pkgs" "${LINK_PACKAGES[@]}"
cuda_root=$TOOLKIT/nvidia/cu13
libs=$LINK/pkgs/nvidia/cu13/lib

# The linker's names for the libraries: symlinks to the packages' versioned files.
link_so() {  # NAME DIR: $LINK/NAME -> the one DIR/NAME.<N>
    local f; f=$(find "$2" -maxdepth 1 -name "$1.[0-9]*" | sort | head -n1)
    [ -n "$f" ] || die "no $1.* in $2"
    ln -sfn "$f" "$LINK/$1"
}
link_so libcublas.so "$libs"
link_so libcublasLt.so "$libs"
link_so libcurand.so "$libs"
link_so libnvrtc.so "$libs"
link_so libcudart.so "$cuda_root/lib"

# The packages (and where they are) as cargo resolves them with the cuda feature. Scratch files go to
# a folder of this run's own (two runs may share $TARGET_DIR; cargo's lock orders their builds).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
metadata=$tmp/metadata.json
cargo metadata --format-version 1 --features ddpm-cli/cuda > "$metadata"

# The driver API (libcuda) comes with the driver, not from PyPI, so link against a stub that defines
# every driver function cudarc declares (the `pub unsafe fn cuXxx` of its driver/sys/mod.rs: a superset
# of the undefined cu* symbols `nm -u` lists in its rlib, known before building, so the first link
# already succeeds). Its soname is the driver's, libcuda.so.1; the libcuda.so.1 beside it lets the
# binaries start here (for --write-config) as long as nothing calls into CUDA.
cudarc_dir=$("$PYTHON" -c '
import json, os, sys
pkgs = [p for p in json.load(open(sys.argv[1]))["packages"] if p["name"] == "cudarc"]
print(os.path.dirname(pkgs[0]["manifest_path"]) if pkgs else "")' "$metadata")
[ -n "$cudarc_dir" ] || die "cargo metadata names no cudarc"
mkdir -p "$LINK/stub"
grep -ohE 'pub unsafe fn cu[A-Z][A-Za-z0-9_]*' "$cudarc_dir/src/driver/sys/mod.rs" | sed 's/.* //' | sort -u \
    | awk 'BEGIN { print "/* stub libcuda: every function returns CUDA_ERROR_STUB_LIBRARY (34) */" }
           { print "int " $1 "(void) { return 34; }" }' > "$LINK/stub/libcuda_stub.c.new"
[ "$(grep -c '^int ' "$LINK/stub/libcuda_stub.c.new")" -gt 100 ] \
    || die "found too few cu* functions in $cudarc_dir/src/driver/sys/mod.rs"
if ! cmp -s "$LINK/stub/libcuda_stub.c.new" "$LINK/stub/libcuda_stub.c" || [ ! -e "$LINK/libcuda.so" ]; then
    mv "$LINK/stub/libcuda_stub.c.new" "$LINK/stub/libcuda_stub.c"
    cc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/stub/libcuda_stub.c"
    say "stub libcuda.so: $(grep -c '^int ' "$LINK/stub/libcuda_stub.c") functions from $(basename "$cudarc_dir")"
fi
rm -f "$LINK/stub/libcuda_stub.c.new"
ln -sfn libcuda.so "$LINK/libcuda.so.1"

# The build's environment. Keep it the same from run to run: cargo reruns a build script (and so
# rebuilds its crate and everything above it) when a variable it watches changes, and these are watched:
#   CUDA_COMPUTE_CAP, NVCC, NVCC_CCBIN        candle-kernels (cudaforge), ddpm-core
#   CUDA_HOME, CUDA_PATH, CUDA_ROOT, CUDA_TOOLKIT_ROOT_DIR, CUDNN_LIB, CUDARC_CUDA_VERSION   cudarc
# None of the cudarc ones is needed (cudarc reads the CUDA version from `nvcc --version`, 13.0 here; the
# linker finds the libraries through LIBRARY_PATH), so they are unset, and nvcc is found on PATH (not
# NVCC): the cache in $TARGET_DIR then stays valid wherever the toolkit is. RUSTFLAGS is deliberately not
# used (it would change every crate's fingerprint and rebuild all of them).
unset CUDA_HOME CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB CUDARC_CUDA_VERSION NVCC
export PATH="$cuda_root/bin:$PATH"
# nvcc.profile already adds CCCL's headers (-isystem include/cccl); named again in case a wrapper drops it.
export NVCC_APPEND_FLAGS="-I$cuda_root/include/cccl"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$LINK${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -n 2 >&2

# One cargo invocation for the binary and all the tests: cargo unifies the dependencies' features over
# the packages it builds, so separate `cargo build -p ddpm-cli` and `cargo test -p ddpm-core` runs
# would each compile candle (and the rest) with a feature set of its own, three times in all. The
# packages are always ddpm-cli, ddpm-core and ddpm-unet (plus any other PKG named), whichever tests are
# asked for, so that the feature set, and with it the cached dependencies, stay the same from run to
# run. `cargo build --test T` builds the same executable as `cargo test --no-run --test T`.
pkgs=(ddpm-cli ddpm-core ddpm-unet)
targets=(--bin ddpm)
declare -A want=()   # NAME -> PKG:TEST
for spec in "${TESTS[@]}"; do
    pkg=${spec%%:*}; rest=${spec#*:}; test=${rest%%=*}
    if [ "$rest" != "$test" ]; then name=${rest#*=}
    elif [ "$test" = gpu ]; then name=${pkg#ddpm-}_gpu
    else name=$test; fi
    [ "$pkg" != "$spec" ] && [ -n "$pkg" ] && [ -n "$test" ] && [ -n "$name" ] && [ "$name" != ddpm ] \
        || die "'$spec' is not PKG:TEST[=NAME]"
    [[ " ${pkgs[*]} " == *" $pkg "* ]] || pkgs+=("$pkg")
    [[ " ${targets[*]} " == *" --test $test "* ]] || targets+=(--test "$test")
    want[$name]="$pkg:$test"
done
features=$(printf '%s/cuda,' "${pkgs[@]}"); features=${features%,}
args=(--release --target-dir "$TARGET_DIR" "${pkgs[@]/#/--package=}" --features "$features" "${targets[@]}")
say "cargo build ${args[*]}"
messages=$tmp/messages.json
cargo build "${args[@]}" --message-format=json-render-diagnostics > "$messages"

# The executables' paths (with cargo's hashes) from its JSON messages, as "PKG:TARGET<TAB>PATH".
declare -A exes=()
while IFS=$'\t' read -r key exe; do exes[$key]=$exe; done < <("$PYTHON" - "$metadata" "$messages" <<'PYEOF'
import json, sys
names = {p["id"]: p["name"] for p in json.load(open(sys.argv[1]))["packages"]}
for line in open(sys.argv[2]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(f'{names.get(m["package_id"], "?")}:{m["target"]["name"]}\t{m["executable"]}')
PYEOF
)
declare -A bins=([ddpm]=${exes[ddpm-cli:ddpm]:-})
[ -n "${bins[ddpm]}" ] || die "cargo named no executable for ddpm"
for name in "${!want[@]}"; do
    bins[$name]=${exes[${want[$name]}]:-}
    [ -n "${bins[$name]}" ] || die "cargo named no executable for ${want[$name]} (no such test in that package?)"
done

# Run-time check here: the loader finds everything (libcuda.so.1 being the stub).
export LD_LIBRARY_PATH="$LINK:$libs:$cuda_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for name in "${!bins[@]}"; do
    ! ldd "${bins[$name]}" | grep 'not found' || die "$name has unresolved libraries (above)"
done

mkdir -p "$GPUBIN"
rm -f "$GPUBIN"/*.xz "$GPUBIN"/*.json "$GPUBIN/BUILD_INFO"
for name in "${!bins[@]}"; do
    say "xz ${bins[$name]} -> $GPUBIN/$name.xz"
    xz "${XZ_OPTS[@]}" -c "${bins[$name]}" > "$GPUBIN/$name.xz"
    rm -f "$GPUBIN/$name"   # an earlier build's copy, unpacked there by gpu_check.sh: stale now
done
# The presets' config.json: `ddpm bench --write-config` runs on the CPU and exits before touching CUDA.
for preset in $PRESETS; do
    "${bins[ddpm]}" bench --preset "$preset" --write-config "$GPUBIN/$preset.json" \
        || echo "build_gpu_bins: could not write $preset.json (gpu_check.sh writes it on the GPU machine)" >&2
done
{
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' plus uncommitted changes')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, $(nvcc --version | tail -n1)"
    for name in "${!bins[@]}"; do echo "$name ${want[$name]:-ddpm-cli:ddpm} ${bins[$name]}"; done
} > "$GPUBIN/BUILD_INFO"
ls -l "$GPUBIN" >&2
say "done"
