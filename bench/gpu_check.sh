#!/usr/bin/env bash
# The one-call GPU check: everything a borrowed GPU's few minutes should return, in order
# of value: build, every CUDA test case, compute-sanitizer (memcheck, racecheck) on small
# cases of every CUDA op, a short GPU training run of the demo, the Python benchmarks,
# then (only with time left) the CMake build and the C++ benchmarks. What CI already runs
# on the CPU (the CPU test suite, the kernel emulations) is not run again here.
#
#   bash bench/gpu_check.sh OUTDIR            run it (on the GPU machine)
#   bash bench/gpu_check.sh --plan            print the steps, their caps and outputs
#   bash bench/gpu_check.sh --dry-run OUTDIR  every step stubbed: checks the bookkeeping
#
# OUTDIR receives three files, rewritten as each step ends (so a run cut short still
# returns everything up to that point): summary.txt (the table and key numbers),
# summary.json (the same, for tools) and gpu_check.tar.gz (every log, JUnit XML and JSON
# result). The working files live in a temporary folder outside OUTDIR.
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS
# (default nproc), GPU_CHECK_BUDGET_S (default 480: each step's cap is cut to what is left
# of it), GPU_CHECK_TEST_TIMEOUT_S (default 60: one test case's limit).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=run
case "${1:-}" in
  --plan) MODE=plan ;;
  --dry-run) MODE=dry; shift ;;
esac
if [ "$MODE" != plan ] && [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR | --plan | --dry-run OUTDIR" >&2
  exit 2
fi

# name|cap in seconds|what it runs|what it leaves in the archive. Order is value order: a
# run cut short loses the least useful steps. The fixed caps add up to 480 s at most; the
# last step gets only what the others left of the budget.
STEPS=(
  "env|10|nvidia-smi, versions, commit|env.log env.json"
  "build|170|setup.py build_ext --inplace (CUDA sources, TORCH_CUDA_ARCH_LIST)|build.log"
  "built_with_cuda|10|import check: CUDA kernels of every op registered, GPU visible; registers and spills of every kernel (cuobjdump)|built_with_cuda.log resources.log"
  "tests_cuda|110|pytest tests -k 'cuda and not emulation' (every CUDA case of every test module, no -x)|tests_cuda.log junit_cuda.xml"
  "memcheck|35|compute-sanitizer memcheck on bench/sanitize_cases.py (small cases, every CUDA op)|memcheck.log memcheck_cases.json"
  "racecheck|35|compute-sanitizer racecheck on bench/sanitize_cases.py|racecheck.log racecheck_cases.json"
  "demo_cuda|20|python -m memory_ext.demo (and demo continual) on the GPU, a few steps of every model|demo_cuda.log demo/results.json"
  "py_bench_embedding_bag|20|bench/bench_embedding_bag.py --device cuda|py_bench_embedding_bag.log py_bench_embedding_bag.json"
  "py_bench_pk_topk|15|bench/bench_pk_topk.py --device cuda|py_bench_pk_topk.log py_bench_pk_topk.json"
  "py_bench_scaling|20|bench/bench_scaling.py --device cuda, 32 rows per token, N = 2^20 to 2^24: sparse, fused, plain torch|py_bench_scaling.log py_bench_scaling.json"
  "py_bench_value_update|10|bench/bench_value_update.py --device cuda|py_bench_value_update.log py_bench_value_update.json"
  "py_bench_decode|15|bench/bench_decode.py --device cuda --quick: tokens/s of a dense and a Memory+ Decoder|py_bench_decode.log py_bench_decode.json"
  "py_bench_quantized|10|bench/bench_quantized.py --device cuda: uint8 / e4m3 tables against fp32 / bf16|py_bench_quantized.log py_bench_quantized.json"
  "cpp_benchmarks|rest|with the time left: CMake build with CUDA, then each bench/cpp benchmark|cpp_benchmarks.log cpp_*.json"
)

plan() {
  local total=0 row name cap what files
  printf '%-24s %5s  %-78s %s\n' step cap_s runs outputs
  for row in "${STEPS[@]}"; do
    IFS='|' read -r name cap what files <<< "$row"
    [ "$cap" != rest ] && total=$((total + cap))
    printf '%-24s %5s  %-78s %s\n' "$name" "$cap" "$what" "$files"
  done
  echo "total of the fixed caps: ${total} s (budget ${GPU_CHECK_BUDGET_S:-480} s); OUTDIR gets summary.txt, summary.json, gpu_check.tar.gz"
}

if [ "$MODE" = plan ]; then
  plan
  exit 0
fi

mkdir -p "$1"
OUT=$(cd "$1" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
cd "$ROOT"
PY=${PYTHON:-python3}
# Everything imports the in-place build of this checkout; output is never held in a
# buffer, so a step killed at its cap still leaves its log.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export GPU_CHECK_TEST_TIMEOUT_S=${GPU_CHECK_TEST_TIMEOUT_S:-60}
export ROOT WORK PY
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
RESULTS=()   # name|status|seconds
FAILED=0
BUILD_OK=1

elapsed() { echo $(( $(date +%s) - START )); }

# --- the steps: each writes into $WORK, its output goes to $WORK/NAME.log -----------------
step_env() {
  nvidia-smi || true
  git -C "$ROOT" rev-parse HEAD
  "$PY" -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'
  nvcc --version || "$CUDA_HOME/bin/nvcc" --version
  "$PY" - "$WORK/env.json" "$ROOT" <<'EOF'
import json, platform, subprocess, sys
import torch
commit = subprocess.run(["git", "-C", sys.argv[2], "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "commit": commit, "host": platform.node()}, open(sys.argv[1], "w"), indent=1)
EOF
}

step_build() { "$PY" setup.py build_ext --inplace; }

step_built_with_cuda() {
  "$PY" - <<'EOF'
import torch, memory_ext
ops = ["embedding_bag", "embedding_bag_backward", "rows_to_dense", "pk_topk", "quantized_embedding_bag", "row_adam_",
       "row_adagrad_"]
assert memory_ext.cuda_kernels_built(), "memory_ext was built without its CUDA kernels"
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"memory::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
assert torch.cuda.is_available(), "no GPU visible"
print("CUDA kernels of", ", ".join(ops), "on", torch.cuda.get_device_name(0))
EOF
  # Registers, spills and shared memory of every kernel of the built library.
  local cuobjdump
  cuobjdump=$(command -v cuobjdump || echo "$CUDA_HOME/bin/cuobjdump")
  "$cuobjdump" --dump-resource-usage memory_ext/_C*.so > "$WORK/resources.log" 2>&1 ||
    echo "cuobjdump failed: see resources.log"
}

# Every CUDA case of every module: the device-parametrized cases carry "cuda" in their ids
# and the CUDA-only modules in their file names. No -x: one failure must not hide the rest.
step_tests_cuda() {
  PYTHONPATH="$ROOT/bench:$PYTHONPATH" "$PY" -m pytest tests -p pytest_case_timeout -p no:cacheprovider \
    -k "cuda and not emulation" -v -rfEs --tb=short --junitxml="$WORK/junit_cuda.xml"
}

# No caching allocator: each tensor is its own allocation, so memcheck sees overruns that
# would otherwise land inside a cached block.
step_memcheck() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$(sanitizer)" --tool memcheck --error-exitcode 3 \
    "$PY" bench/sanitize_cases.py --device cuda --report "$WORK/memcheck_cases.json"
}
step_racecheck() {
  "$(sanitizer)" --tool racecheck --error-exitcode 3 \
    "$PY" bench/sanitize_cases.py --device cuda --report "$WORK/racecheck_cases.json"
}
sanitizer() { command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer"; }

step_demo_cuda() {
  "$PY" -m memory_ext.demo --device cuda --steps 40 --entities 50 --eval-every 20 --timing-rounds 2 \
    --out "$WORK/demo" &&
    "$PY" -m memory_ext.demo continual --device cuda --entities 20 --new-entities 4 --pretrain-steps 40 \
      --background-batches 5 --steps 10 --eval-every 5 --out "$WORK/demo_continual"
}

py_bench() { "$PY" "bench/bench_$1.py" --device cuda --out "$WORK/py_bench_$1.json"; }
step_py_bench_embedding_bag() { py_bench embedding_bag; }
step_py_bench_pk_topk() { py_bench pk_topk; }
step_py_bench_value_update() { py_bench value_update; }
step_py_bench_decode() { "$PY" bench/bench_decode.py --device cuda --quick --out "$WORK/py_bench_decode.json"; }
step_py_bench_quantized() { py_bench quantized; }
step_py_bench_scaling() {
  "$PY" bench/bench_scaling.py --device cuda --shapes heads1_k32 --peers sparse fused torch \
    --min-log2 20 --max-log2 24 --repeats 3 --warmup 1 --out "$WORK/py_bench_scaling.json"
}

step_cpp_benchmarks() {
  local build="$ROOT/build/gpu_check_cmake" exe found=0 gbench=()
  # The GPU machine has no package registry: Google Benchmark comes as Debian packages
  # carried in .deps/google-benchmark (bash bench/cpp/carry_google_benchmark.sh, here).
  if ls "$ROOT"/.deps/google-benchmark/*.deb > /dev/null 2>&1; then
    for deb in "$ROOT"/.deps/google-benchmark/*.deb; do dpkg -x "$deb" "$WORK/gbench"; done
    gbench=(-Dbenchmark_DIR="$WORK/gbench/usr/lib/x86_64-linux-gnu/cmake/benchmark")
    export LD_LIBRARY_PATH="$WORK/gbench/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
  fi
  cmake -S "$ROOT" -B "$build" -G Ninja -DMEMORY_EXT_CUDA=ON -DPython3_EXECUTABLE="$(command -v "$PY")" \
    "${gbench[@]}" && cmake --build "$build" -j "$MAX_JOBS" || return 1
  for exe in "$build"/bench/bench_cuda_*; do
    [ -x "$exe" ] || continue
    found=1
    echo ">>> $(basename "$exe")"
    "$exe" --json "$WORK/cpp_$(basename "$exe").json" || return 1
  done
  [ "$found" -eq 1 ] || { echo "no C++ CUDA benchmark was built (is Google Benchmark carried?)"; return 1; }
}
export -f step_env step_build step_built_with_cuda step_tests_cuda step_memcheck step_racecheck \
  sanitizer step_demo_cuda py_bench step_py_bench_embedding_bag step_py_bench_pk_topk \
  step_py_bench_value_update step_py_bench_scaling step_py_bench_decode step_py_bench_quantized step_cpp_benchmarks

# --- bookkeeping ----------------------------------------------------------------------------
# Key numbers for the table: test counts, sanitizer verdicts, benchmark headlines.
key_numbers() {
  local f
  [ -f "$WORK/tests_cuda.log" ] && grep -E "^(=+ )?[0-9]+ (passed|failed)|no tests ran" "$WORK/tests_cuda.log" | tail -n 1 | sed 's/^/tests_cuda: /'
  for f in memcheck racecheck; do
    [ -f "$WORK/$f.log" ] && grep -hE "ERROR SUMMARY|FINDING|FAILED" "$WORK/$f.log" | sed "s/^/$f: /"
  done
  for f in "$WORK"/py_bench_*.json "$WORK"/cpp_*.json; do
    [ -f "$f" ] || continue
    "$PY" - "$f" <<'EOF' 2>/dev/null || echo "$(basename "$f"): unreadable JSON"
import json, sys
d = json.load(open(sys.argv[1]))
rows = d.get("results") or d.get("rows") or d.get("benchmarks") or []
device = d.get("machine", {}).get("device") or d.get("context", {}).get("device") or d.get("device", "?")
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: {len(rows)} results, device {device}")
EOF
  done
}

# summary.txt, summary.json and the archive, rewritten after every step (atomically, so a
# kill in between leaves the previous complete set).
publish() {
  local row name status secs
  {
    echo "== gpu_check ($(elapsed) s of ${BUDGET} s, mode ${MODE}, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null))"
    printf '%-24s %-30s %6s\n' step status secs
    for row in "${RESULTS[@]}"; do
      IFS='|' read -r name status secs <<< "$row"
      printf '%-24s %-30s %6s\n' "$name" "$status" "$secs"
    done
    key_numbers
  } > "$OUT/summary.txt.tmp"
  "$PY" - "$OUT/summary.json.tmp" "$(elapsed)" "$BUDGET" "$MODE" "${RESULTS[@]}" <<'EOF' || true
import json, sys
path, elapsed, budget, mode, *rows = sys.argv[1:]
steps = [dict(zip(("step", "status", "seconds"), r.split("|"))) for r in rows]
json.dump({"elapsed_s": int(elapsed), "budget_s": int(budget), "mode": mode, "steps": steps}, open(path, "w"), indent=1)
EOF
  cp "$OUT/summary.txt.tmp" "$WORK/summary.txt"
  tar -czf "$OUT/gpu_check.tar.gz.tmp" -C "$WORK" . 2>/dev/null
  mv -f "$OUT/summary.txt.tmp" "$OUT/summary.txt"
  [ -f "$OUT/summary.json.tmp" ] && mv -f "$OUT/summary.json.tmp" "$OUT/summary.json"
  mv -f "$OUT/gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}

# run_step NAME CAP: the step under the smaller of its cap and what is left of the budget
# (cap "rest": all that is left); timeout signals the step's whole process group.
run_step() {
  local name=$1 cap=$2 left limit t0 rc status
  left=$(( BUDGET - $(elapsed) ))
  limit=$cap
  { [ "$limit" = rest ] || [ "$limit" -gt "$left" ]; } && limit=$left
  if [ "$BUILD_OK" -eq 0 ] && [ "$name" != env ] && [ "$name" != build ]; then
    RESULTS+=("$name|SKIPPED (build failed)|0"); FAILED=1; publish; return
  fi
  if [ "$limit" -lt 10 ]; then
    RESULTS+=("$name|SKIPPED (no time left)|0"); FAILED=1; publish; return
  fi
  echo ">>> $name (limit ${limit} s)"
  t0=$(date +%s)
  if [ "$MODE" = dry ]; then
    echo "dry run: step_$name would run here under ${limit} s" > "$WORK/$name.log"
    rc=0
  else
    timeout --kill-after=5 "$limit" bash -c "step_$name" > "$WORK/$name.log" 2>&1
    rc=$?
  fi
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (${limit} s)" ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  [ "$rc" -ne 0 ] && FAILED=1
  [ "$name" = build ] && [ "$rc" -ne 0 ] && BUILD_OK=0
  RESULTS+=("$name|$status|$(( $(date +%s) - t0 ))")
  tail -n 3 "$WORK/$name.log" | sed 's/^/    /'
  publish
}

for row in "${STEPS[@]}"; do
  IFS='|' read -r name cap _ _ <<< "$row"
  run_step "$name" "$cap"
done
cat "$OUT/summary.txt"
rm -rf "$WORK"
exit "$FAILED"
