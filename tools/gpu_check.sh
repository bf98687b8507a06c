#!/usr/bin/env bash
# The GPU check: one script, one call on a machine with one CUDA GPU (sized for <= 5 minutes on an H200).
#
#   bash tools/gpu_check.sh              # on the GPU machine; JSON + logs under $OUT (default runs/gpu_check)
#   bash tools/gpu_check.sh --dry-run    # every step on the CPU with 2-block models, small sizes (CI runs this)
#
# Steps (each one's output is a JSON or log file; a failed step is recorded and the others still run):
#   1. environment (GPU, driver, torch, cores)                                   -> env.json
#   2. `pytest -m cuda` (tests/test_cuda.py), and beside it, since neither is a timing, the bf16 accuracy half:
#      tools/bench_bf16_parity.py --mode native (the demo's DenseVLM stage, fp32 x2 seeds + bf16)
#                                                                                -> cuda_tests.xml, parity.json
#   3. tools/bench_train.py --setup real: a per-GPU batch sweep of the cached bf16 step, then fp32, bf16,
#      fp32-cache, bf16-cache and e2e (JPEG decoding + cache reads in one worker per core) at the best batch;
#      MFU against matmul peaks measured in the same call                        -> bench.json
#   4. the profile of the bf16 steps (top kernels, their share, matmul TFLOP/s)  -> profile.json
#   5. the reference's own DenseVLM step (HVision-NKU/DenseVLM, its AMP, its non-xformers attention) at the same
#      batch and size, when a checkout is at .ref/DenseVLM (never committed; see tools/bench_reference.py)
#                                                                                -> reference.json
#   6. tools/gpu_report.py: the table (printed last) and every target met or missed -> summary.json
# All step logs go to one file, logs.txt. The GPU machine returns at most 8 files from $OUT: these are the 8.
#
# Carried wheels (.whl/*.whl, for packages the GPU image lacks: open_clip_torch, ftfy, wcwidth, pycocotools, timm)
# are installed into /tmp/site first when present; the repository itself is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
BATCHES=${GPU_CHECK_BATCHES:-"32 64"}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run)" >&2; exit 2 ;;
  esac
done

OUT_DIR=${OUT:-runs/gpu_check}
WORK=${GPU_CHECK_WORK:-runs/gpu_check_work}
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/logs.txt"
: > "$LOG"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import open_clip" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$LOG" 2>&1 || { echo "gpu_check.sh: installing the carried wheels failed (see $LOG)" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

FAILED=()
step() {  # step NAME COMMAND...: runs it with its output appended to the log; records a failure by name
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*" >>"$LOG"
  "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" >>"$LOG"
  echo "[gpu_check] $name: exit $rc after $((SECONDS - t0)) s" >&2
  [ $rc -eq 0 ] || FAILED+=("$name")
  return $rc
}

if [ $DRY -eq 1 ]; then
  export DENSEVLM_CUDA_TESTS_ON=cpu
  BENCH=(--device cpu --depth 2 --image-size 128 --steps 1 --warmup 0 --threads 2 --e2e-images 4 --peak-sizes 256)
  BATCHES="2"
  PARITY=(--config configs/demo/quick.yaml --mode auto
          --set "output_dir=$WORK/demo" densevlm.loop.max_steps=2 eval.max_images=8 --threads 2)
  REFERENCE=(--device cpu --depth 2 --image-size 128 --steps 1 --warmup 1 --threads 2 --precision fp32)
  PROFILE_STEPS=1
else
  export DENSEVLM_CUDA_TESTS_ON=cuda  # a GPU machine whose torch sees no GPU fails the tests instead of skipping them
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check.sh: no CUDA GPU here (run with --dry-run to check the script on the CPU)" >&2; exit 1; }
  CORES=$(nproc)
  BENCH=(--device cuda --steps 5 --warmup 1 --threads "$CORES" --workers "$CORES")
  PARITY=(--mode native --set "output_dir=$WORK/demo" "world.workers=$((CORES / 2))"
          "densevlm.loop.num_workers=$((CORES / 2))" eval.batch_size=64)
  REFERENCE=(--device cuda --steps 5 --warmup 2)
  PROFILE_STEPS=3
fi

# 1. environment
"$PYTHON" - >"$OUT_DIR/env.json" 2>>"$LOG" <<'EOF'
import json, os, platform, subprocess, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
       "cores": os.cpu_count(), "machine": platform.machine(), "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
               capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported())
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"unavailable: {e}"
print(json.dumps(env, indent=2))
EOF

# 2. correctness and accuracy, side by side (neither is timed)
step parity timeout "${PARITY_LIMIT:-300}" "$PYTHON" tools/bench_bf16_parity.py --out "$WORK/parity" --json-out "$OUT_DIR/parity.json" \
  "${PARITY[@]}" &
PARITY_PID=$!
step cuda_tests timeout "${TESTS_LIMIT:-300}" "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT_DIR/cuda_tests.xml" tests
wait $PARITY_PID || FAILED+=("parity")

# 3. throughput: batch sweep of the cached bf16 step, then every variant at the best batch
SWEEP=()
BEST=$(echo $BATCHES | awk '{print $1}')
if [ "$(echo $BATCHES | wc -w)" -gt 1 ]; then  # one batch: nothing to choose
  for b in $BATCHES; do
    step "bench_sweep_b$b" "$PYTHON" tools/bench_train.py --setup real --variants bf16-cache --batch "$b" \
      "${BENCH[@]}" --json-out "$WORK/sweep_b$b.json" && SWEEP+=("$WORK/sweep_b$b.json")
  done
  [ ${#SWEEP[@]} -eq 0 ] || BEST=$("$PYTHON" - "${SWEEP[@]}" <<'EOF'
import json, sys
best = max((r["images_per_second"], r["batch"]) for f in sys.argv[1:] for r in json.load(open(f))["results"]
           if r.get("variant") == "bf16-cache")
print(best[1])
EOF
)
fi
echo "[gpu_check] batch per GPU: $BEST (sweep: $BATCHES)" >&2
step bench "$PYTHON" tools/bench_train.py --setup real --batch "$BEST" \
  --variants fp32 bf16 fp32-cache bf16-cache e2e --e2e-precision bf16 "${BENCH[@]}" --json-out "$WORK/bench.json"
"$PYTHON" - "$WORK/bench.json" "$OUT_DIR/bench.json" "${SWEEP[@]}" <<'EOF' 2>>"$LOG"
import json, sys
from pathlib import Path
bench = json.loads(Path(sys.argv[1]).read_text()) if Path(sys.argv[1]).is_file() else {"results": []}
bench["batch_sweep"] = [r for f in sys.argv[3:] for r in json.loads(Path(f).read_text())["results"] if "variant" in r]
Path(sys.argv[2]).write_text(json.dumps(bench, indent=2))
EOF

# 4. where the time goes
step profile "$PYTHON" tools/bench_train.py --setup real --batch "$BEST" --variants bf16 bf16-cache \
  --profile 12 "${BENCH[@]}" --steps "$PROFILE_STEPS" --json-out "$OUT_DIR/profile.json"

# 5. the reference's own step
if [ -d .ref/DenseVLM ]; then
  step reference "$PYTHON" tools/bench_reference.py --ref-dir .ref/DenseVLM --batch "$BEST" \
    "${REFERENCE[@]}" --json-out "$OUT_DIR/reference.json"
else
  echo "[gpu_check] reference: skipped, no checkout at .ref/DenseVLM (see tools/bench_reference.py)" >&2
  echo "=== reference: skipped (no .ref/DenseVLM)" >>"$LOG"
fi

# 6. the table, printed last
"$PYTHON" tools/gpu_report.py "$OUT_DIR" --failed "${FAILED[@]:-}" || FAILED+=("report")
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check.sh: failed steps: ${FAILED[*]} (see $LOG)" >&2
  exit 1
fi
