#!/bin/bash
# The GPU check: fp32 parity on the accelerator, then the MoBY step's throughput in bf16
# next to the PyTorch reference; one table at the end. At most ~8 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh [WHEELS_DIR]
#
# Made for the borrowed GPU machines (Python 3.12, jax 0.11.2 with CUDA 13, flax, optax,
# orbax, torch with CUDA): the few pure-Python packages they lack (ml_collections and
# pytest, and what those need) are installed from WHEELS_DIR (default bench/wheels) when
# they are missing. Make that folder on any machine with network access:
#
#   pip download --python-version 3.12 --only-binary=:all: --no-deps -d bench/wheels \
#       ml_collections==1.1.0 absl-py==2.5.1 PyYAML==6.0.2 pytest==9.0.3 pluggy==1.6.0 \
#       iniconfig==2.1.0 packaging==25.0
#
# (bench/wheels is ignored by git; with the project's device tool, pass it in `carry`.)
#
# What it runs, most important first, each within what is left of BUDGET_S (default 450 s;
# a row that does not fit is reported as skipped):
#   1. the fp32 parity tests (Swin, DeiT, the golden MoBY steps, PyTorch parity of a step,
#      bf16 vs fp32) on the GPU with full-precision matmuls; deprecation warnings are listed
#      rather than failing the tests as they do in CI (the GPU machine runs a newer JAX);
#   2. bench/train_step.py in bf16: MoBY Swin-T and DeiT-S at global batch 64, 128 and 256
#      (pairs/s, MFU, peak GPU memory), Swin-T with the views batched instead of scanned and
#      with rematerialisation, and the PyTorch reference step with bf16 autocast. The first
#      row also keeps a profiler trace of three steps ($OUT/trace, to copy back and open in
#      TensorBoard or ui.perfetto.dev) and the table ends with its top operations.
# Environment: BUDGET_S, OUT (results folder, default /tmp/gpu_check), and GPU_CHECK_SMOKE=1
# for a few-second rehearsal of the whole script on a CPU (tiny model, batch 16).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=${1:-bench/wheels}
BUDGET_S=${BUDGET_S:-450}
OUT=${OUT:-/tmp/gpu_check}
SMOKE=${GPU_CHECK_SMOKE:-0}
START=$SECONDS
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
SKIPPED=()

left() { echo $((BUDGET_S - (SECONDS - START))); }

for module in ml_collections pytest; do
  if ! python3 -c "import $module" 2>/dev/null; then
    echo "installing $module from $WHEELS"
    python3 -m pip install -q --no-index --find-links "$WHEELS" "$module" ||
      { echo "cannot install $module: build $WHEELS as the header says"; exit 1; }
  fi
done

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
  echo "no nvidia-smi"
python3 -c "import sys, jax, torch; print('python', sys.version.split()[0], '| jax', \
jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"

echo "== 1. fp32 parity on the accelerator (full-precision matmuls)"
PARITY="skipped"
if [ "$(left)" -gt 60 ]; then
  # Compilation dominates these tests (208 s in one process on an H200 machine): spread
  # them over 4 processes when pytest-xdist is there, each allocating GPU memory on demand.
  WORKERS=""
  python3 -c "import xdist" 2>/dev/null && WORKERS="-n 4"
  XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAX_DEFAULT_MATMUL_PRECISION=highest NVIDIA_TF32_OVERRIDE=0 timeout $(( $(left) - 30 )) \
    python3 -m pytest -q -p no:cacheprovider $WORKERS -W default::DeprecationWarning \
      tests/test_swin.py tests/test_vit.py tests/test_train_step.py \
      -k "parity or golden or bfloat16 or close_to" 2>&1 |
    tee "$OUT/parity.log" | tail -4
  PARITY=$(grep -Eo "[0-9]+ (passed|failed)[^=]*" "$OUT/parity.log" | tail -1)
  # The GPU stack runs a newer JAX than CI: its deprecations are reported here, not fatal.
  grep -E "DeprecationWarning" "$OUT/parity.log" | sort | uniq -c | head -20
fi

echo "== 2. MoBY step throughput"
if [ "$SMOKE" = 1 ]; then
  ARG="--arg runlocal"; BATCHES=(16); BIG=16; DTYPE=float32; STEPS="--warmup 1 --repeats 2"
else
  ARG=""; BATCHES=(128 256 64); BIG=256; DTYPE=bfloat16; STEPS="--warmup 2 --repeats 5"
fi
# config batch views remat frameworks; in the order they are worth having.
ROWS=()
for b in "${BATCHES[@]}"; do
  ROWS+=("moby_swin_tiny $b scan none jax,torch" "moby_deit_small $b scan none jax,torch")
done
ROWS+=("moby_swin_tiny $BIG batch none jax" "moby_deit_small $BIG batch none jax"
       "moby_swin_tiny $BIG scan dots jax" "moby_swin_tiny $BIG scan full jax")
TRACE="--trace $OUT/trace"  # the first row that runs keeps a trace
for row in "${ROWS[@]}"; do
  read -r config batch views remat frameworks <<< "$row"
  # A row needs its compilation and its steps: give up on it with less than 60 s left.
  if [ "$(left)" -lt 60 ]; then SKIPPED+=("$row"); continue; fi
  echo "-- $row"
  timeout $(( $(left) - 10 )) python3 bench/train_step.py --config "$config" $ARG \
    --batch "$batch" --dtype "$DTYPE" --views "$views" --remat "$remat" \
    --frameworks "$frameworks" $STEPS $TRACE --json "$RESULTS" 2>&1 | tail -4 ||
    SKIPPED+=("$row (failed or timed out)")
  TRACE=""
done

echo "== results ($((SECONDS - START)) s)"
python3 - "$RESULTS" "$PARITY" "${SKIPPED[@]+"${SKIPPED[@]}"}" <<'EOF'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"parity tests (fp32, on the accelerator): {sys.argv[2]}")
device = next((r["device"] for r in rows if r["framework"] == "jax"), "?")
print(f"device: {device}\n")
print("| model | batch | views | remat | framework | pairs/s | ms/step | MFU | peak GPU GiB |"
      " jax/torch |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
torch_rate = {(r["config"], r["batch"]): r["pairs_per_s"] for r in rows
              if r["framework"] == "torch"}
for r in rows:
  model = {"moby_swin_tiny": "Swin-T", "moby_deit_small": "DeiT-S"}.get(r["config"], r["config"])
  ratio = ""
  if r["framework"] == "jax" and (r["config"], r["batch"]) in torch_rate:
    ratio = f"{r['pairs_per_s'] / torch_rate[(r['config'], r['batch'])]:.2f}x"
  mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
  memory = f"{r['peak_device_gib']:.1f}" if "peak_device_gib" in r else ""
  views = r["views"] if r["framework"] == "jax" else ""
  remat = r["remat"] if r["framework"] == "jax" else ""
  print(f"| {model} | {r['batch']} | {views} | {remat} | {r['framework']} | "
        f"{r['pairs_per_s']:.0f} | {1e3 * r['seconds']:.1f} | {mfu} | {memory} | {ratio} |")
for row in sys.argv[3:]:
  print(f"skipped: {row}")
for r in rows:
  if r.get("top_operations"):
    print(f"\ntop operations of {r['config']} at batch {r['batch']}, ms per step (trace in "
          f"{r['trace']}):")
    for where, name, ms in r["top_operations"]:
      print(f"  {ms:8.2f}  {name[:100]}  [{where}]")
EOF
