#!/usr/bin/env bash
# Throughput and peak memory of ddpm-rs against the PyTorch peer (diffusers' UNet2DModel), measured
# alternately in the same run on the same machine, same config, batch and threads; prints the medians
# and the ratios ours / PyTorch.
#
#   PY=/path/to/venv/bin/python scripts/bench.sh                 # defaults below
#   RUNS=5 THREADS=2 CASES="mnist-small:64 ddpm-cifar10:8" scripts/bench.sh
#
# PY must have torch and diffusers (python3 -m venv v && v/bin/pip install torch diffusers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RUNS=${RUNS:-3}
THREADS=${THREADS:-2}
STEPS=${STEPS:-5}
DEVICE=${DEVICE:-cpu}
FEATURES=${FEATURES:-}
CASES=${CASES:-"mnist-small:64 ddpm-cifar10:8"}
cargo build --release -p ddpm-cli ${FEATURES:+--features $FEATURES} >&2
DDPM=target/release/ddpm
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for case in $CASES; do
  preset=${case%%:*}; batch=${case##*:}
  cfg="$tmp/$preset.json"
  "$DDPM" bench --preset "$preset" --write-config "$cfg"
  for i in $(seq "$RUNS"); do
    "$DDPM" bench --unet-config "$cfg" --batch-size "$batch" --threads "$THREADS" --steps "$STEPS" --device "$DEVICE" >> "$tmp/$preset.ours"
    OMP_NUM_THREADS=$THREADS "$PY" scripts/peer_pytorch.py --config "$cfg" --batch "$batch" --threads "$THREADS" --steps "$STEPS" --device "$DEVICE" >> "$tmp/$preset.peer"
  done
  "$PY" - "$preset" "$batch" "$tmp/$preset.ours" "$tmp/$preset.peer" <<'PYEOF'
import json, statistics, sys
preset, batch, ours, peer = sys.argv[1:]
load = lambda p: [json.loads(l) for l in open(p) if l.strip()]
o, p = load(ours), load(peer)
med = lambda rows, k: statistics.median(r[k] for r in rows)
out = {"preset": preset, "batch": int(batch), "threads": o[0]["threads"], "runs": len(o), "peer": p[0]["peer"]}
for k in ["train_img_per_s", "infer_img_per_s", "peak_rss_mib"]:
    out[k] = {"ours": med(o, k), "pytorch": med(p, k), "ratio": round(med(o, k) / med(p, k), 3)}
print(json.dumps(out))
PYEOF
done
