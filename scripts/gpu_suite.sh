#!/usr/bin/env bash
# One call on a lent GPU machine, as that machine is: Python 3.12 as python3 (no `python`), a
# CUDA build of torch, triton, numpy, pytest, pytest-benchmark, nvcc and compute-sanitizer; no
# registry, nothing installed. Run it first thing, in one call:
#
#   RESULTS_DIR=$OUT bash scripts/gpu_suite.sh
#
# Every result and the log are written into RESULTS_DIR as the run goes (7 files at most:
# gpu_suite.log, check and test output inside it, bench_*.json, summary.md), so a run cut short
# still returns its log. Each step runs under `timeout` with its budget; the budgets add up to
# at most 480 s on an H100-class machine with 16 cores. The order is what matters most first:
#   build      the extension in place for the GPU in hand (FORCE_CUDA=1), and the CUDA
#              emulator's kernel harnesses (tools/cuda_emu) compiled by nvcc alongside
#   registered every op has a CUDA kernel; the build reports CUDA
#   check      python -m rtdetr_fast.info --check --device cuda: every op, backend and dtype
#              against its reference
#   tests      the CUDA tests (marked `cuda`), each once
#   harness    the harnesses run on the GPU
#   sanitize   the harnesses under compute-sanitizer racecheck and synccheck, each run with its
#              own timeout; "Device not supported" is a skip
#   bench_*    quick benchmarks (RTDETR_FAST_BENCH_QUICK=1: B in {8, 32}, few rounds, inputs made
#              on the GPU): deformable attention, top-K, RepConv, the whole r18/r50 model (eager
#              float32, deploy float16, compiled float16 with CUDA graphs)
#   summary    summary.md from the benchmark JSON files (a missing one is reported)
#
#   bash scripts/gpu_suite.sh --dry-run   what a machine without a GPU can do: resolve python3,
#       pip, nvcc, ninja, compute-sanitizer; build the extension (CUDA when torch is a CUDA
#       build and nvcc is found) and compile the harnesses with nvcc; check each test and
#       benchmark selection collects tests; run the CPU benchmark cases once with
#       --benchmark-disable; run the summary on a sample JSON; print the plan.
#   bash scripts/gpu_suite.sh --plan      print the plan (steps and budgets) only.
# env: PYTHON (default python3), RESULTS_DIR (default benchmarks/results/gpu-suite), MAX_JOBS
#      (default: the core count), TORCH_CUDA_ARCH_LIST (default: the GPU's; 9.0 in a dry run)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=$ROOT/scripts/gpu_suite.sh
PYTHON=${PYTHON:-python3}
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --plan) MODE=plan ;;
  --step) MODE=step ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --plan]" >&2; exit 2 ;;
esac

# ------------------------------------------------------------------------------- the plan
# step name, budget in seconds (on the GPU machine), what it does; the order they run in
PLAN=(
  "env:12:versions, GPU, tools"
  "build:115:extension in place (FORCE_CUDA=1, the GPU's arch), harnesses by nvcc in parallel"
  "registered:10:every op has a CUDA kernel"
  "check:30:info --check on the GPU (every op, backend, dtype against the reference)"
  "tests:90:pytest -m cuda (the CUDA tests, each once)"
  "harness:15:the emulator's kernel harnesses on the GPU"
  "sanitize:42:compute-sanitizer racecheck + synccheck, 3 harnesses, 7 s each"
  "bench_msda:35:ms_deform_attn quick benchmark (with the method benchmark)"
  "bench_topk:15:top-K select and detections quick benchmark"
  "bench_rep_conv:30:RepConv quick benchmark"
  "bench_model:25:r18/r50 eager float32 and deploy float16, B 8 and 32"
  "bench_model_compiled:50:r18/r50 compiled float16 with CUDA graphs, B 8"
  "summary:5:summary.md from the JSON files"
)
LIMIT=480
SAN_TIMEOUT=7
declare -A BUDGET
for p in "${PLAN[@]}"; do IFS=: read -r n b _ <<<"$p"; BUDGET[$n]=$b; done

print_plan() {
  local total=0 n b d
  echo "plan: step budget (s) on the GPU machine"
  for p in "${PLAN[@]}"; do
    IFS=: read -r n b d <<<"$p"
    printf 'plan: %-22s %4d s  %s\n' "$n" "$b" "$d"
    total=$((total + b))
  done
  printf 'plan: %-22s %4d s  (limit %d s)\n' total "$total" "$LIMIT"
  [ "$total" -le "$LIMIT" ]
}

if [ "$MODE" = plan ]; then print_plan; exit $?; fi

RESULTS_DIR=${RESULTS_DIR:-$ROOT/benchmarks/results/gpu-suite}
mkdir -p "$RESULTS_DIR" && RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
LOG=$RESULTS_DIR/gpu_suite.log
# the harness binaries: outside RESULTS_DIR (only results go there), shared by the steps
[ "$MODE" = step ] || export GPU_SUITE_HBIN=${GPU_SUITE_HBIN:-$(mktemp -d)}
HBIN=$GPU_SUITE_HBIN
export RTDETR_FAST_BENCH_QUICK=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
HARNESSES=(
  "topk csrc/topk_select/cuda/topk_select_cuda.cu tools/cuda_emu/topk_harness.cu"
  "msda csrc/ms_deform_attn/cuda/ms_deform_attn_cuda.cu tools/cuda_emu/msda_harness.cu"
  "rep_conv csrc/rep_conv/cuda/rep_conv_cuda.cu tools/cuda_emu/rep_conv_harness.cu"
)
TEST_FILES=(tests/ops tests/model/test_no_host_sync.py tests/model/test_fast_path.py)
BENCH_OPTS=(-p no:cacheprovider --benchmark-columns=min,median,max --benchmark-sort=name)

say() { echo "gpu_suite: $*" | tee -a "$LOG"; }

arch() {  # the GPU's compute capability as 90, or the first of TORCH_CUDA_ARCH_LIST
  if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    echo "${TORCH_CUDA_ARCH_LIST%%[; ]*}" | tr -d . | sed 's/+PTX//'
  elif [ "$MODE" = dry ]; then echo 90
  else "$PYTHON" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())"; fi
}

# ------------------------------------------------------------------------------- the steps
# each step_<name> runs in a child (scripts/gpu_suite.sh --step <name>) under timeout
step_env() {
  "$PYTHON" - <<'PY'
import platform, shutil, subprocess, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda available",
      torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for mod in ("triton", "numpy", "pytest", "pytest_benchmark", "onnx", "onnxruntime"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "not importable:", type(exc).__name__)
print("cpus", __import__("os").cpu_count(), platform.machine())
PY
  local rc=$?
  "$PYTHON" -m pip --version || echo "pip: not available (not needed: the build is in place)"
  for t in nvcc ninja nvidia-smi; do
    printf '%-18s %s\n' "$t" "$(command -v "$t" || echo 'not found')"
  done
  printf '%-18s %s\n' compute-sanitizer "$(find_sanitizer || echo 'not found (the sanitize step skips)')"
  command -v ninja >/dev/null || echo "ninja not found: torch builds the extension one file at a time (slower)"
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  return $rc
}

build_harnesses() {  # nvcc only; the binaries run in the harness and sanitize steps
  local a=$1 k status=0
  mkdir -p "$HBIN"
  for k in "${HARNESSES[@]}"; do
    set -- $k
    ( nvcc -std=c++17 -O2 -lineinfo -I csrc -I tools/cuda_emu \
        -gencode "arch=compute_$a,code=sm_$a" "$2" "$3" -o "$HBIN/$1" >"$HBIN/$1.build.log" 2>&1
      echo $? >"$HBIN/$1.build.rc" ) &
  done
  wait
  for k in "${HARNESSES[@]}"; do
    set -- $k
    if [ "$(cat "$HBIN/$1.build.rc")" = 0 ]; then echo "harness $1: built (sm_$a)"
    else echo "harness $1: nvcc FAILED"; head -30 "$HBIN/$1.build.log"; status=1; fi
  done
  return $status
}

step_build() {
  local a; a=$(arch) || return 1
  local hpid=""
  if command -v nvcc >/dev/null; then
    build_harnesses "$a" >"$HBIN/build.log" 2>&1 &
    hpid=$!
  else
    echo "nvcc not found: no harnesses"
  fi
  local cuda; cuda=$("$PYTHON" -c "import torch; print(int(torch.version.cuda is not None))")
  local env=(MAX_JOBS="${MAX_JOBS:-$(nproc)}")
  if [ "$cuda" = 1 ] && command -v nvcc >/dev/null; then
    env+=(FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${a:0:-1}.${a: -1}}")
  else
    echo "torch is a CPU build or nvcc is missing: building the CPU extension"
  fi
  echo "+ env ${env[*]} $PYTHON setup.py build_ext --inplace"
  env "${env[@]}" "$PYTHON" setup.py build_ext --inplace 2>&1 |
    grep -vE "^(copying|creating|running|writing|reading) " | tail -40
  local rc=${PIPESTATUS[0]}
  if [ -n "$hpid" ]; then wait "$hpid"; local hrc=$?; cat "$HBIN/build.log"; [ $hrc = 0 ] || rc=1; fi
  return $rc
}

step_registered() {
  "$PYTHON" - "$MODE" <<'PY'
import sys
import torch
import rtdetr_fast._C as C
from rtdetr_fast.ops import _backend

info = C.build_info()
print("build_info:", info)
want_cuda = torch.version.cuda is not None and info["cuda"]
if sys.argv[1] == "run":
    assert info["cuda"], "the extension was built without CUDA"
ops = sorted(n for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("rtdetr_fast::") and "_triton" not in n)
assert ops, "no rtdetr_fast ops registered"
# CPU-only by design: rep_conv's CPU kernel (Winograd) and the CPU stem's max pool
CPU_ONLY = {"rtdetr_fast::winograd_conv3x3", "rtdetr_fast::max_pool_3x3_s2"}
for n in ops:
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
    print(f"{n:<36} CPU {'yes' if cpu else '-':<4} CUDA {'yes' if cuda else '-'}")
missing = [n for n in ops if want_cuda and n not in CPU_ONLY
           and not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print("backends:", _backend.table())
PY
}

step_check() {
  if [ "$MODE" = dry ]; then "$PYTHON" -m rtdetr_fast.info --check --device cpu
  else "$PYTHON" -m rtdetr_fast.info --check --device cuda; fi
}

collect() {  # collect <pytest args...>: the selection must hold at least one test
  local out n
  out=$("$PYTHON" -m pytest --collect-only -q -p no:cacheprovider "$@" 2>&1)
  local rc=$?
  n=$(echo "$out" | grep -oE '^[0-9]+(/[0-9]+)? tests? collected' | grep -oE '^[0-9]+' | head -1)
  echo "collect: ${n:-0} test(s): $*"
  if [ $rc != 0 ] || [ "${n:-0}" = 0 ]; then echo "$out" | tail -20; return 1; fi
}

step_tests() {
  if [ "$MODE" = dry ]; then collect -m cuda "${TEST_FILES[@]}"; return; fi
  "$PYTHON" -m pytest -q -rs -p no:cacheprovider --durations=10 -m cuda "${TEST_FILES[@]}"
}

step_harness() {
  local k status=0
  for k in "${HARNESSES[@]}"; do
    set -- $k
    [ -x "$HBIN/$1" ] || { echo "harness $1: not built"; status=1; continue; }
    if [ "$MODE" = dry ]; then echo "harness $1: built (runs on the GPU only)"; continue; fi
    echo "+ $1"
    "$HBIN/$1" 2>&1 | tail -15
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "harness $1: FAILED"; status=1; }
  done
  return $status
}

find_sanitizer() {  # on PATH, beside nvcc, or in the toolkit (CUDA_HOME, /usr/local/cuda*)
  local c d
  c=$(command -v compute-sanitizer) && { echo "$c"; return 0; }
  for d in "$(dirname "$(command -v nvcc || echo /nonexistent/nvcc)")" \
           "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")" \
           "${CUDA_HOME:-/nonexistent}/bin" /usr/local/cuda/bin /usr/local/cuda-*/bin \
           /usr/local/cuda/compute-sanitizer /usr/local/cuda-*/compute-sanitizer; do
    [ -x "$d/compute-sanitizer" ] && { echo "$d/compute-sanitizer"; return 0; }
  done
  return 1
}

step_sanitize() {
  local SAN k tool out rc status=0
  SAN=$(find_sanitizer) || { echo "compute-sanitizer not found: skipped"; return 77; }
  [ "$MODE" = dry ] && { echo "compute-sanitizer: $SAN (runs on the GPU only)"; return 0; }
  for k in "${HARNESSES[@]}"; do
    set -- $k
    [ -x "$HBIN/$1" ] || { echo "sanitize $1: not built"; status=1; continue; }
    for tool in racecheck synccheck; do
      out=$(timeout "$SAN_TIMEOUT" "$SAN" --tool "$tool" --error-exitcode 1 "$HBIN/$1" 2>&1)
      rc=$?
      if echo "$out" | grep -q "Device not supported"; then
        echo "SKIP $tool $1: compute-sanitizer says Device not supported"
      elif [ $rc = 124 ] || [ $rc = 137 ]; then
        echo "TIMEOUT $tool $1 (after ${SAN_TIMEOUT} s, not a finding)"
        echo "$out" | grep -E "ERROR|Hazard|hazard|Barrier|barrier" | head -10
        echo "$out" | grep -qE "ERROR SUMMARY: [1-9]|Hazard|RACECHECK SUMMARY: [1-9]" && status=1
      elif [ $rc = 0 ]; then
        echo "PASS $tool $1: $(echo "$out" | grep -E "SUMMARY" | tail -1)"
      else
        echo "FAIL $tool $1 (exit $rc)"; echo "$out" | tail -25; status=1
      fi
    done
  done
  return $status
}

bench() {  # bench <json name> <file> <-k selection> [more pytest args]
  local json=$1 file=$2 sel=$3; shift 3
  if [ "$MODE" = dry ]; then
    collect "$file" -k "$sel" || return 1
    # the CPU cases once, untimed (where the file has them)
    local cpu_sel=${sel//cuda/cpu}
    [ "$cpu_sel" = "$sel" ] && { echo "no CPU cases to run: collected only"; return 0; }
    "$PYTHON" -m pytest -q "${BENCH_OPTS[@]}" --benchmark-disable "$file" -k "$cpu_sel" "$@"
    return
  fi
  "$PYTHON" -m pytest -q "${BENCH_OPTS[@]}" "$file" -k "$sel" \
    --benchmark-json="$RESULTS_DIR/$json" "$@"
}

step_bench_msda() { bench bench_msda.json benchmarks/ops/bench_ms_deform_attn.py cuda; }
step_bench_topk() { bench bench_topk.json benchmarks/ops/bench_topk_select.py cuda; }
step_bench_rep_conv() {
  if [ "$MODE" = dry ]; then
    collect benchmarks/ops/bench_rep_conv.py -k gpu || return 1
    "$PYTHON" -m pytest -q "${BENCH_OPTS[@]}" --benchmark-disable benchmarks/ops/bench_rep_conv.py -k cpu
    return
  fi
  bench bench_rep_conv.json benchmarks/ops/bench_rep_conv.py gpu
}
step_bench_model() { bench bench_model.json benchmarks/model/bench_rtdetr_cuda.py "eager or deploy"; }
step_bench_model_compiled() {
  bench bench_model_compiled.json benchmarks/model/bench_rtdetr_cuda.py compiled
}

step_summary() {
  local dir=$RESULTS_DIR
  if [ "$MODE" = dry ]; then
    dir=$(mktemp -d)
    "$PYTHON" - "$dir" <<'PY' || return 1
# a sample in pytest-benchmark's format: two method rows that a key without the method would
# have merged, and one file left out (reported missing)
import json, sys
def bench(median, **extra):
    return {"stats": {"median": median, "min": median}, "extra_info": extra}
common = dict(dtype="torch.float16", B=8, Q=300, torch="2.11.0", cuda="13.0", device="sample")
msda = [bench(1e-3, mode="fwd", backend="reference", **common),
        bench(1e-4, mode="fwd", backend="native", **common),
        bench(2e-4, mode="fwd", method="default", backend="native", **common),
        bench(5e-5, mode="fwd", method="discrete", backend="native", **common)]
json.dump({"benchmarks": msda}, open(f"{sys.argv[1]}/bench_msda.json", "w"))
topk = [bench(3e-4, op="topk_select", B=8, N=8400, impl="eager"),
        bench(1e-4, op="topk_select", B=8, N=8400, impl="native")]
json.dump({"benchmarks": topk}, open(f"{sys.argv[1]}/bench_topk.json", "w"))
PY
  fi
  "$PYTHON" - "$dir" <<'PY'
import json, os, sys
d = sys.argv[1]
# file, title, the row key (what is measured), the column (who ran it)
TABLES = [("bench_msda.json", "ms_deform_attn (S=8400, H=8, D=32, L=3, P=4)",
           ("mode", "method", "dtype", "B", "Q"), "backend"),
          ("bench_topk.json", "top-K (C=80, K=300)", ("op", "dtype", "B", "N"), "impl"),
          ("bench_rep_conv.json", "RepConv (float16 channels_last, ms per call)", ("shape",),
           "impl"),
          ("bench_model.json", "whole model, 640x640 (ms per batch)", ("preset", "B"), "mode"),
          ("bench_model_compiled.json", "whole model compiled, 640x640 (ms per batch)",
           ("preset", "B"), "mode")]
lines, missing = [], []
for name, title, key, col in TABLES:
    path = os.path.join(d, name)
    if not os.path.exists(path):
        missing.append(name)
        continue
    try:
        data = json.load(open(path))
    except ValueError as exc:
        lines += [f"## {title}", "", f"{name}: unreadable ({exc})", ""]
        continue
    rows, cols = {}, []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if not b.get("stats") or col not in e:
            continue
        ms = e.get("ms_per_call", b["stats"]["median"] * 1e3)
        k = tuple(str(e.get(f, "-")).replace("torch.", "") for f in key)
        rows.setdefault(k, {})[e[col]] = ms
        if e[col] not in cols:
            cols.append(e[col])
    lines += [f"## {title}", "", "median ms; " + name, "",
              "| " + " | ".join(key + tuple(cols)) + " |",
              "|" + "---|" * (len(key) + len(cols))]
    for k in sorted(rows):
        lines.append("| " + " | ".join(k + tuple(
            "%.3f" % rows[k][c] if c in rows[k] else "-" for c in cols)) + " |")
    lines.append("")
if missing:
    lines += ["missing (the step did not finish or was skipped): " + ", ".join(missing), ""]
text = "\n".join(lines)
print(text)
open(os.path.join(d, "summary.md"), "w").write(text + "\n")
PY
  local rc=$?
  if [ "$MODE" = dry ]; then
    grep -q "| fwd | discrete | float16 | 8 | 300 |" "$dir/summary.md" &&
      grep -q "| fwd | default | float16 | 8 | 300 |" "$dir/summary.md" &&
      grep -q "missing .*bench_rep_conv.json" "$dir/summary.md" || rc=1
    rm -rf "$dir"
  fi
  return $rc
}

if [ "$MODE" = step ]; then
  shift; MODE=$1; name=$2
  "step_$name"
  exit $?
fi

# ------------------------------------------------------------------------------- the run
: >"$LOG"
say "mode: $MODE; results in $RESULTS_DIR; $(date -u +%FT%TZ)"
print_plan | tee -a "$LOG"
if ! command -v "$PYTHON" >/dev/null; then
  say "FAIL: $PYTHON not found (set PYTHON)"; exit 2
fi
if [ "$MODE" = run ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    >>"$LOG" 2>&1; then
  say "FAIL: no CUDA device visible to torch ($PYTHON: $(command -v "$PYTHON")); for a machine without one: --dry-run"
  exit 2
fi
T0=$SECONDS
declare -A RESULT
status=0
for p in "${PLAN[@]}"; do
  IFS=: read -r name budget _ <<<"$p"
  # a dry run runs on a CPU (a CUDA build with 2 cores takes minutes): its own, wider limits
  limit=$budget
  [ "$MODE" = dry ] && limit=$((budget < 60 ? 600 : 1800))
  say "== $name (budget ${budget} s) =="
  t=$SECONDS
  timeout --kill-after=5 "$limit" bash "$SELF" --step "$MODE" "$name" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  took=$((SECONDS - t))
  case $rc in
    0) r=ok ;;
    77) r=skipped ;;
    124|137) r="TIMEOUT"; status=1 ;;
    *) r="FAIL (exit $rc)"; status=1 ;;
  esac
  [ "$MODE" = run ] && [ "$took" -gt "$budget" ] && [ "$r" = ok ] && r="ok, over budget"
  RESULT[$name]="$r"
  say "== $name: $r in $took s (budget $budget s) =="
done
say "steps:"
for p in "${PLAN[@]}"; do
  IFS=: read -r name budget _ <<<"$p"
  printf 'gpu_suite:   %-22s %s\n' "$name" "${RESULT[$name]}" | tee -a "$LOG"
done
rm -rf "$HBIN"
say "done in $((SECONDS - T0)) s, status $status; files: $(cd "$RESULTS_DIR" && ls | tr '\n' ' ')"
exit $status
