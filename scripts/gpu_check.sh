#!/usr/bin/env bash
# One pass over everything that needs a CUDA GPU, for a machine without a Rust toolchain, in order of
# importance (items past $DEADLINE are skipped): the CUDA tests (the project's kernels and the whole UNet
# against the CPU and diffusers); training and inference images/s, GPU memory and the training step's
# phases (forward, backward, optimizer, the host's issue time) of `ddpm bench` against the PyTorch peer
# on the same GPU (f32, TF32, bf16, and PyTorch at its fastest: bf16 autocast + torch.compile +
# channels_last), with the fraction of the GPU's peak the training step reaches; a short training run
# with sampling; then the diagnostic rows of each of our switches, and candle's own ops.
#
# Build where cargo is, with an nvcc no newer than the GPU driver's CUDA (the kernels ship as PTX for
# the driver to compile) and CUDA_COMPUTE_CAP=90 for an H100/H200, then copy the binaries into $BIN
# (plain, or compressed as NAME.xz; the presets' config.json may sit beside them):
#   cargo build --release -p ddpm-cli --features cuda                    -> ddpm
#   cargo test --release -p ddpm-core --features cuda --test ops_gpu --no-run    -> ops_gpu
#   cargo test --release -p ddpm-unet --features cuda --test gpu --no-run        -> unet_gpu
# scripts/build_gpu_bins.sh does all of this (toolkit and link libraries from PyPI, a stub libcuda) into
# target/gpubin, compressed.
# Linking needs libcuda.so, cuBLAS, cuRAND and the CUDA runtime (on a machine without a driver, a
# toolkit's lib64/stubs/libcuda.so). Run on the GPU machine (python3 with torch and diffusers):
#   BIN=target/gpubin OUT=/tmp/gpu scripts/gpu_check.sh
# Results: $OUT/log (everything), $OUT/bench.jsonl (one line per run), $OUT/summary.json (ratios).
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-target/gpubin}
OUT=${OUT:-/tmp/gpu-check}
CASES=${CASES:-"mnist-small:128:20 ddpm-cifar10:128:10"}   # preset:batch:timed steps
RUNS=${RUNS:-2}
THREADS=${THREADS:-8}
DEADLINE=${DEADLINE:-400}       # seconds; later items are skipped once this much time has passed
RUN_TIMEOUT=${RUN_TIMEOUT:-90}  # seconds for one benchmark process
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-240}  # seconds for one torch.compile run of the peer (the compilation included)
COMPILE_PRESETS=${COMPILE_PRESETS:-ddpm-cifar10}  # presets that get the torch.compile row
PY=${PY:-python3}
FLOPS=${FLOPS:-1}               # 0: skip counting FLOPs (no fraction of peak)
TRAIN=${TRAIN:-1}               # 0: skip the training run with sampling
UNET_PATHS=${UNET_PATHS:-"1"}   # DDPM_CUDA_KERNELS values to run the UNet tests with first (0 runs last, in 6)
mkdir -p "$OUT"
LOG=$OUT/log
tmp=$(mktemp -d)
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "[$(elapsed)s] $*" | tee -a "$LOG"; }
in_time() { [ "$(elapsed)" -lt "$DEADLINE" ] || { say "SKIPPED (past ${DEADLINE}s): $*"; return 1; }; }

# Binaries may come compressed (name.xz), to fit a transfer: unpacked once.
for f in "$BIN"/*.xz; do [ -e "$f" ] && "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], "wb"))' "$f" && chmod +x "${f%.xz}"; done
# The CUDA libraries the binaries link (cuBLAS, cuRAND, the runtime) from the Python packages beside
# torch (cuDNN too, for binaries built with the cudnn feature), and the driver's libcuda where it is not
# on the loader's path.
libdirs=$(find $("$PY" -c 'import site; print(" ".join(site.getsitepackages()))') /usr/local/cuda/lib64 /usr/local/nvidia \
    \( -name 'libcublasLt.so.*' -o -name 'libcurand.so.*' -o -name 'libnvrtc.so.*' -o -name 'libcudart.so.*' -o -name 'libcudnn.so.*' -o -name 'libcuda.so.1' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The test binaries find the fixtures under the path they were built in.
fixtures_root=$(grep -a -o -m1 '/[[:alnum:]/._-]*/crates/ddpm-unet' "$BIN/unet_gpu" 2>/dev/null | head -n1)
if [ -n "$fixtures_root" ] && [ ! -e "$fixtures_root" ]; then
    mkdir -p "$(dirname "${fixtures_root%/crates/ddpm-unet}")" && ln -s "$PWD" "${fixtures_root%/crates/ddpm-unet}"
fi
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$LOG"
ldd "$BIN/ddpm" | grep -E 'not found|cublas|curand|nvrtc|libcuda' | tee -a "$LOG"

# 1. Correctness on the GPU.
in_time "ops_gpu" && { say "ops_gpu (the project's kernels against their CPU kernels)";
    timeout 120 "$BIN/ops_gpu" --test-threads 1 2>&1 | tee -a "$LOG" | tail -n 3; }
for k in $UNET_PATHS; do
    in_time "unet_gpu DDPM_CUDA_KERNELS=$k" && { say "unet_gpu with DDPM_CUDA_KERNELS=$k";
        DDPM_CUDA_KERNELS=$k timeout 120 "$BIN/unet_gpu" --test-threads 1 --nocapture 2>&1 | tee -a "$LOG" | grep -E 'difference|test result|panicked'; }
done
# the training gradients again with the residual blocks and attention node by node (DDPM_BLOCK_NODE=0)
in_time "unet_gpu DDPM_BLOCK_NODE=0" && { say "unet_gpu training gradients with DDPM_BLOCK_NODE=0";
    DDPM_BLOCK_NODE=0 timeout 120 "$BIN/unet_gpu" gradients_match_the_cpu --test-threads 1 --nocapture 2>&1 | tee -a "$LOG" | grep -E 'difference|test result|panicked'; }
# clipped AdamW through the per-tensor kernels (DDPM_MULTI_TENSOR=0), against the CPU as above
in_time "ops_gpu DDPM_MULTI_TENSOR=0" && { say "ops_gpu clipped AdamW with DDPM_MULTI_TENSOR=0";
    DDPM_MULTI_TENSOR=0 timeout 60 "$BIN/ops_gpu" clipped_adamw --test-threads 1 2>&1 | tee -a "$LOG" | tail -n 3; }

# 2. FLOPs per image of each config (for the fraction of peak).
for case in $CASES; do
    preset=${case%%:*}
    # the preset's config.json: from $BIN where it was written beside the binaries, else from ddpm
    cp "$BIN/$preset.json" "$tmp/$preset.json" 2>/dev/null || "$BIN/ddpm" bench --preset "$preset" --write-config "$tmp/$preset.json"
    [ "$FLOPS" = 1 ] && in_time "flops $preset" && "$PY" scripts/unet_flops.py --config "$tmp/$preset.json" >> "$OUT/flops.jsonl" 2>>"$LOG"
done

# One benchmark process; its JSON line gets the label, the exit code and the peak of the GPU's used
# memory while it ran (nvidia-smi, every 20 ms, less the memory used before it started).
bench() {
    local label=$1 preset=$2; shift 2
    in_time "$label $preset" || return 0
    local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "$tmp/mem" 2>/dev/null &
    local poll=$!
    local t0; t0=$(date +%s.%N)
    timeout "$RUN_TIMEOUT" "$@" > "$tmp/one" 2>>"$LOG"
    local rc=$?
    kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null
    "$PY" - "$label" "$preset" "$rc" "$base" "$tmp/mem" "$tmp/one" "$t0" >> "$OUT/bench.jsonl" <<'PYEOF'
import json, sys, time
label, preset, rc, base, mem, one, t0 = sys.argv[1:]
used = [int(l) for l in open(mem) if l.strip().isdigit()]
lines = [l for l in open(one) if l.strip().startswith("{")]
row = json.loads(lines[-1]) if lines else {}
row.update(label=label, preset=preset, rc=int(rc), wall_s=round(time.time() - float(t0), 1),
           gpu_mem_peak_mib=(max(used) - int(base)) if used else None,
           # the allocator's own peak: candle's memory pool (ours) or PyTorch's caching allocator
           alloc_peak_mib=row.get("cuda_pool_peak_mib", row.get("cuda_max_allocated_mib")))
print(json.dumps(row))
PYEOF
    say "$label $preset: $(tail -n1 "$OUT/bench.jsonl")"
}

# The throughput of one config (preset:batch:steps): sets cfg, common (our bench's arguments) and peer
# (the PyTorch peer's command).
config() {
    IFS=: read -r preset batch steps <<< "$1"
    cfg=$tmp/$preset.json
    # the step's phases too (forward, backward, optimizer; the host's issue time against the step's)
    common=(--batch-size "$batch" --threads "$THREADS" --steps "$steps" --device cuda --phases)
    peer=("$PY" scripts/peer_pytorch.py --config "$cfg" --batch "$batch" --threads "$THREADS" --steps "$steps" --device cuda --phases)
}

# 3. Throughput, the rows the issue's targets name first (every config, $RUNS times, ours and
#    PyTorch's alternating), so that the deadline cuts the diagnostic rows below rather than these.
for i in $(seq "$RUNS"); do
    for case in $CASES; do
        config "$case"
        bench "ours f32" "$preset" env DDPM_CUDA_KERNELS=1 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}"
        bench "pytorch f32" "$preset" "${peer[@]}"
        bench "ours tf32" "$preset" env DDPM_CUDA_KERNELS=1 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}" --tf32
        bench "ours bf16" "$preset" env DDPM_CUDA_KERNELS=1 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}" --dtype bf16
        bench "pytorch bf16" "$preset" "${peer[@]}" --dtype bfloat16
    done
done
# PyTorch at its fastest for $COMPILE_PRESETS (bf16 autocast, channels_last, torch.compile, whose
# compilation takes a minute or more of its warm-up)
for case in $CASES; do
    config "$case"
    case " $COMPILE_PRESETS " in *" $preset "*)
        RUN_TIMEOUT=$COMPILE_TIMEOUT bench "pytorch bf16 compile" "$preset" "${peer[@]}" --dtype bfloat16 --compile --channels-last ;;
    esac
done

# 4. A user's run: train the mnist preset on the GPU, then sample from its checkpoint.
if [ "$TRAIN" = 1 ] && in_time "train + sample"; then
    say "ddpm train --device cuda (200 steps, batch 128)"
    DDPM_CUDA_KERNELS=1 timeout 90 "$BIN/ddpm" train --device cuda --steps 200 --batch-size 128 --sample-every 200 --save-every 200 --out "$tmp/run" 2>&1 | tail -n 5 | tee -a "$LOG"
    ckpt=$(ls -d "$tmp"/run/checkpoints/* 2>/dev/null | tail -n1)
    for sched in "ddpm 1000" "ddim 50"; do
        set -- $sched
        in_time "sample $1" || break
        t0=$(date +%s.%N)
        DDPM_CUDA_KERNELS=1 timeout 60 "$BIN/ddpm" sample --model "$ckpt" --device cuda --num 64 --scheduler "$1" --steps "$2" --out "$OUT/sample_$1.png" 2>&1 | tail -n 2 | tee -a "$LOG"
        say "sample 64 images, $1 $2 steps: $(awk "BEGIN { print $(date +%s.%N) - $t0 }") s (process wall clock)"
    done
    cp "$tmp"/run/samples/*.png "$OUT/" 2>/dev/null
fi

# 5. Diagnostic rows, once per config: where our step's time goes, then what each of our switches
#    changes.
for case in $CASES; do
    config "$case"
    # the time of each kind of op per step (--profile: events around each op on the stream)
    bench "ours tf32 profile" "$preset" env DDPM_CUDA_KERNELS=1 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}" --tf32 --profile
    # PyTorch's, in the same kinds (torch.profiler: its kernels' time by the op that launched them)
    bench "pytorch f32 profile" "$preset" "${peer[@]}" --profile
    # our convolutions without cuDNN (the column kernels, DDPM_CUDNN=0)
    bench "ours f32 no cudnn" "$preset" env DDPM_CUDNN=0 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}"
    # cudarc's per-buffer CUDA events kept on (DDPM_CUDA_EVENTS=1): the host work they cost
    bench "ours tf32 cuda events" "$preset" env DDPM_CUDA_EVENTS=1 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}" --tf32
    # the residual blocks and attention node by node in candle's graph (DDPM_BLOCK_NODE=0): what their
    # nodes save in time and memory
    bench "ours tf32 no block node" "$preset" env DDPM_BLOCK_NODE=0 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}" --tf32
    # AdamW, the EMA and the gradient norm tensor by tensor (DDPM_MULTI_TENSOR=0): what one launch for
    # all the parameters saves (the optimizer phase)
    bench "ours tf32 per-tensor optimizer" "$preset" env DDPM_MULTI_TENSOR=0 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}" --tf32
    # cuDNN's non-deterministic algorithms allowed too, as PyTorch allows them by default
    bench "ours tf32 nondeterministic" "$preset" env DDPM_CUDNN_DETERMINISTIC=0 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}" --tf32
    # cuDNN's algorithms chosen by timing them (DDPM_CUDNN_BENCHMARK=1) instead of its heuristics
    bench "ours tf32 cudnn benchmark" "$preset" env DDPM_CUDNN_BENCHMARK=1 "$BIN/ddpm" bench --unet-config "$cfg" "${common[@]}" --tf32
done
# 6. candle's own CUDA ops (the project's kernels off): the UNet tests, then a benchmark row per config
#    (3 steps: candle's convolution gradient is a direct transposed convolution, slow enough to need a
#    short run).
in_time "unet_gpu DDPM_CUDA_KERNELS=0" && { say "unet_gpu with DDPM_CUDA_KERNELS=0";
    DDPM_CUDA_KERNELS=0 timeout 120 "$BIN/unet_gpu" --test-threads 1 --nocapture 2>&1 | tee -a "$LOG" | grep -E 'difference|test result|panicked'; }
for case in $CASES; do
    IFS=: read -r preset batch steps <<< "$case"
    RUN_TIMEOUT=45 bench "ours f32 candle ops" "$preset" env DDPM_CUDA_KERNELS=0 "$BIN/ddpm" bench --unet-config "$tmp/$preset.json" \
        --batch-size "$batch" --threads "$THREADS" --steps 3 --device cuda
done

# 7. Ratios and fraction of peak. Peaks: the H200's datasheet dense rates (f32 67, TF32 495,
#    bf16 989 TFLOP/s); PyTorch's f32 convolutions use TF32 by default, so its f32 row is held
#    against the TF32 peak too.
touch "$OUT/flops.jsonl"
"$PY" - "$OUT/bench.jsonl" "$OUT/flops.jsonl" > "$OUT/summary.json" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
flops = {}
for l in open(sys.argv[2]):
    if l.strip():
        f = json.loads(l); flops[f["config"].rsplit("/", 1)[-1][:-5]] = f
peak = {"ours f32": 67e12, "ours f32 candle ops": 67e12, "ours f32 no cudnn": 67e12, "ours tf32": 495e12, "ours tf32 cudnn benchmark": 495e12, "ours tf32 no block node": 495e12, "ours tf32 cuda events": 495e12, "ours tf32 nondeterministic": 495e12, "ours tf32 per-tensor optimizer": 495e12, "ours tf32 profile": 495e12, "pytorch f32 profile": 495e12, "pytorch f32": 495e12,
        "ours bf16": 989e12, "pytorch bf16": 989e12, "pytorch bf16 compile": 989e12}
out = []
for preset in dict.fromkeys(r["preset"] for r in rows):
    med = {}
    for label in dict.fromkeys(r["label"] for r in rows if r["preset"] == preset):
        ok = [r for r in rows if r["preset"] == preset and r["label"] == label and r["rc"] == 0 and "train_img_per_s" in r]
        if not ok:
            med[label] = None; continue
        keys = ["train_img_per_s", "infer_img_per_s", "gpu_mem_peak_mib", "alloc_peak_mib"] + [f"phase_{p}_ms" for p in ["forward", "backward", "optimizer", "issue", "step"]]
        m = {k: statistics.median(r[k] for r in ok if r.get(k) is not None) for k in keys if any(r.get(k) is not None for r in ok)}
        m["runs"] = len(ok)
        if preset in flops:
            m["train_tflop_per_s"] = round(m["train_img_per_s"] * flops[preset]["train_flops_per_image"] / 1e12, 2)
            m["fraction_of_peak"] = round(m["train_img_per_s"] * flops[preset]["train_flops_per_image"] / peak[label], 5)
        med[label] = m
    ratio = lambda a, b, k: round(med[a][k] / med[b][k], 3) if med.get(a) and med.get(b) and med[b].get(k) else None
    # where each step's time goes (the profile rows' ms per kind of op)
    profile = {r["label"]: r.get("profile_ms") for r in rows if r["preset"] == preset and r["label"].endswith(" profile")}
    out.append({"preset": preset, "medians": med, "profile_ms": profile, "ratios": {
        f"{a} / {b}": {k: ratio(a, b, k) for k in ["train_img_per_s", "infer_img_per_s", "gpu_mem_peak_mib", "alloc_peak_mib", "phase_forward_ms", "phase_backward_ms", "phase_optimizer_ms"]}
        for a, b in [("ours f32", "pytorch f32"), ("ours tf32", "pytorch f32"), ("ours bf16", "pytorch bf16"), ("ours bf16", "pytorch bf16 compile"), ("ours f32 no cudnn", "pytorch f32"), ("ours tf32 cudnn benchmark", "pytorch f32"), ("ours tf32 no block node", "pytorch f32"), ("ours tf32 cuda events", "pytorch f32"), ("ours tf32 nondeterministic", "pytorch f32"), ("ours tf32 per-tensor optimizer", "pytorch f32"), ("ours f32 candle ops", "pytorch f32")]}})
print(json.dumps(out, indent=1))
PYEOF
cat "$OUT/summary.json" | tee -a "$LOG"

say "done"
