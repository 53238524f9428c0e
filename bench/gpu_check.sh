#!/usr/bin/env bash
# The one-call GPU check: build against the installed torch, run the CUDA tests and then
# the rest of the suite, compute-sanitizer (memcheck, racecheck) on every CUDA kernel, the
# Python and C++ benchmarks; logs and JSON go to OUTDIR, a short table is printed last.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS,
# GPU_CHECK_BUDGET_S (default 450: every step's timeout is cut to what is left of it, so
# the whole run ends inside 8 minutes). C++ benchmarks (build/gpu_check_cmake/bench/*)
# are called with one argument, the JSON file to write.
set -u -o pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
# Everything imports the in-place build of this checkout.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
CMAKE_BUILD="$ROOT/build/gpu_check_cmake"
SUMMARY=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME LIMIT_S CMD...: runs CMD with its output in OUT/NAME.log, under the smaller of
# LIMIT_S and what is left of the budget; records status and time for the table.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 15 ]; then
    SUMMARY+=("$name|SKIPPED (no time left)|0")
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 rc status
  t0=$(date +%s)
  echo ">>> $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    5) if [[ "$name" == tests_* ]]; then status="ok (no tests)"; rc=0; else status="FAIL (rc 5)"; FAILED=1; fi ;;
    124|137) status="TIMEOUT (${limit}s)"; FAILED=1 ;;
    *) status="FAIL (rc $rc)"; FAILED=1 ;;
  esac
  SUMMARY+=("$name|$status|$(( $(date +%s) - t0 ))")
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
  return $rc
}

missing() {
  SUMMARY+=("$1|MISSING ($2)|0")
  FAILED=1
}

print_table() {
  {
    echo
    echo "== gpu_check summary ($(elapsed)s, logs in $OUT) =="
    printf '%-28s %-32s %6s\n' "step" "status" "secs"
    for row in "${SUMMARY[@]}"; do
      IFS='|' read -r n s t <<< "$row"
      printf '%-28s %-32s %6s\n' "$n" "$s" "$t"
    done
    # Key numbers, when the runs produced them.
    for t in tests_cuda tests_rest; do
      [ -f "$OUT/$t.log" ] && tail -n 1 "$OUT/$t.log" | sed "s/^/$t: /"
    done
    grep -hE "ERROR SUMMARY" "$OUT"/memcheck.log "$OUT"/racecheck.log 2>/dev/null | sed 's/^/sanitizer: /'
    for f in "$OUT"/cpp_*.json; do
      [ -f "$f" ] || continue
      "$PY" - "$f" <<'EOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
name = sys.argv[1].rsplit("/", 1)[-1]
if "results" in d:  # bench_embedding_bag
    print(f"{name}: {d.get('device', '?')}, copy {d.get('copy_gbps', 0):.0f} GB/s")
    for r in d["results"]:
        print(f"  {r['op']:<22} dim {r['dim']:>5} tokens {r['tokens']:>6}: {r['ms']:8.3f} ms "
              f"{r['gbps']:7.0f} GB/s ({100 * r['fraction_of_copy']:.0f}% of copy)")
else:  # any other: its timed entries
    print(f"{name}: {d.get('device', '?')}")
    for key, val in d.items():
        if isinstance(val, dict) and "median_ms" in val:
            print(f"  {key:<30} {val['median_ms']:8.3f} ms")
EOF
    done
  } | tee "$OUT/summary.txt"
}

# --- environment ------------------------------------------------------------------------
step env 30 bash -c "nvidia-smi; git -C '$ROOT' rev-parse HEAD; '$PY' -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; nvcc --version"
"$PY" - "$OUT/env.json" "$ROOT" <<'EOF' 2>/dev/null
import json, platform, subprocess, sys
import torch
commit = subprocess.run(["git", "-C", sys.argv[2], "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "commit": commit, "host": platform.node()}, open(sys.argv[1], "w"), indent=1)
EOF

# --- build --------------------------------------------------------------------------------
if ! step build 300 "$PY" setup.py build_ext --inplace; then
  print_table
  exit 1
fi
step built_with_cuda 60 "$PY" -c "import torch, memory_ext; assert memory_ext.cuda_kernels_built(), 'no CUDA kernels built'; assert torch.cuda.is_available(), 'no GPU visible'; print('ok', torch.cuda.get_device_name(0))"

# The CMake build (C++ benchmarks) compiles on the CPUs while the tests use the GPU; in its
# own process group, so it can be stopped as a whole if the budget runs out.
setsid bash -c "cmake -S '$ROOT' -B '$CMAKE_BUILD' -G Ninja -DMEMORY_EXT_CUDA=ON \
  -DPython3_EXECUTABLE='$(command -v "$PY")' && cmake --build '$CMAKE_BUILD' -j '$MAX_JOBS'" \
  > "$OUT/cmake_build.log" 2>&1 &
CMAKE_PID=$!

# --- tests: the CUDA files in full, then the rest of the suite ----------------------------
# The CPU emulations of the kernels are left out: the real kernels run here.
CUDA_TESTS=$(ls tests/*cuda*.py 2>/dev/null | tr '\n' ' ')
IGNORE=""
for f in $CUDA_TESTS; do IGNORE="$IGNORE --ignore=$f"; done
if [ -n "$CUDA_TESTS" ]; then
  # shellcheck disable=SC2086
  step tests_cuda 200 "$PY" -m pytest $CUDA_TESTS -q -rs -k "not emulation" --junitxml="$OUT/junit_cuda.xml"
else
  missing tests_cuda "no tests/*cuda*.py"
fi
# shellcheck disable=SC2086
step tests_rest 150 "$PY" -m pytest tests -x -q -rs -k "not emulation" $IGNORE --junitxml="$OUT/junit.xml"

# --- compute-sanitizer on every CUDA kernel ---------------------------------------------
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
  # No caching allocator: each tensor is its own allocation, so memcheck sees overruns
  # that would otherwise land inside a cached block.
  step memcheck 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 3 "$PY" bench/sanitize_cases.py
  step racecheck 100 "$SANITIZER" --tool racecheck --error-exitcode 3 "$PY" bench/sanitize_cases.py
else
  missing memcheck "no compute-sanitizer"
fi

# --- benchmarks ---------------------------------------------------------------------------
for b in embedding_bag pk_topk value_update; do
  if [ -f "bench/bench_$b.py" ]; then
    step "py_bench_$b" 75 "$PY" "bench/bench_$b.py" --device cuda --out "$OUT/py_bench_$b.json"
  else
    missing "py_bench_$b" "bench/bench_$b.py"
  fi
done

left=$(( BUDGET - $(elapsed) ))
[ "$left" -lt 1 ] && left=1
if timeout "$left" tail --pid="$CMAKE_PID" -f /dev/null; then
  wait "$CMAKE_PID"
  rc=$?
else
  kill -- "-$CMAKE_PID" 2> /dev/null
  rc=124
fi
if [ "$rc" -eq 0 ]; then
  SUMMARY+=("cmake_build|ok|-")
  found=0
  for exe in "$CMAKE_BUILD"/bench/bench_*; do
    [ -x "$exe" ] || continue
    found=1
    name=$(basename "$exe")
    step "cpp_$name" 120 "$exe" "$OUT/cpp_$name.json"
  done
  [ "$found" -eq 1 ] || missing cpp_benchmarks "none built"
else
  SUMMARY+=("cmake_build|FAIL (rc $rc)|-")
  FAILED=1
fi

print_table
exit "$FAILED"
