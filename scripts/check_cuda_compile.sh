#!/usr/bin/env bash
# Compiles every csrc/**/*.cu with nvcc for sm_80 and sm_90 with -Xptxas -v and fails on any
# compile error, register spill or local-memory stack frame. Needs nvcc only (no GPU, no
# CUDA build of torch): the .cu files include no torch header.
#   usage: scripts/check_cuda_compile.sh [arch ...]     (default: 80 90)
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCHS=("$@")
[ ${#ARCHS[@]} -eq 0 ] && ARCHS=(80 90)
if [ ! -x "$NVCC" ]; then echo "check_cuda_compile: nvcc not found" >&2; exit 2; fi
mapfile -t FILES < <(find csrc -name '*.cu' | sort)
if [ ${#FILES[@]} -eq 0 ]; then echo "check_cuda_compile: no .cu files"; exit 0; fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
status=0
echo "nvcc: $("$NVCC" --version | tail -1)"
for f in "${FILES[@]}"; do
  for a in "${ARCHS[@]}"; do
    log="$TMP/$(echo "$f" | tr '/' '_').sm_$a.log"
    # the flags a torch CUDAExtension build gives nvcc (torch's own and setup.py's), plus the
    # resource report
    if ! "$NVCC" -std=c++20 -O3 --use_fast_math -lineinfo -DRTDETR_FAST_WITH_CUDA -I csrc \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
        -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
        -gencode "arch=compute_$a,code=sm_$a" -Xptxas -v -c "$f" -o "$TMP/out.o" >"$log" 2>&1; then
      echo "FAIL  $f sm_$a: compile error"; grep -E "error" "$log" | head -20; status=1; continue
    fi
    if grep -qE "warning" "$log"; then
      echo "WARN  $f sm_$a:"; grep -E "warning" "$log" | head -10
    fi
    # one line per kernel: name, registers, stack frame, spill stores/loads
    python3 - "$log" "$f" "$a" <<'PY' || status=1
import re, subprocess, sys
log, src, arch = sys.argv[1:]
text = open(log).read()
entries = re.split(r"ptxas info\s+: Compiling entry function ", text)[1:]
bad = 0
names = []
rows = []
for e in entries:
    name = re.match(r"'([^']+)'", e).group(1)
    regs = re.search(r"Used (\d+) registers", e)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", e)
    r = int(regs.group(1)) if regs else -1
    st, ss, sl = (int(x) for x in frame.groups()) if frame else (0, 0, 0)
    names.append(name)
    rows.append((name, r, st, ss, sl))
try:
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                               text=True).stdout.splitlines()
except OSError:
    demangled = names
for (name, r, st, ss, sl), pretty in zip(rows, demangled or names):
    pretty = re.sub(r"\(anonymous namespace\)::", "", pretty).replace("rtdetr_fast::", "")
    pretty = re.sub(r"\(.*", "", pretty)
    flag = "ok  " if (ss == 0 and sl == 0 and st == 0) else "BAD "
    bad += flag == "BAD "
    print(f"{flag} sm_{arch} {src.split('/')[-1]:28s} {pretty:44s} regs={r:3d} stack={st} "
          f"spill_st={ss} spill_ld={sl}")
sys.exit(1 if bad else 0)
PY
  done
done
if [ $status -eq 0 ]; then
  echo "check_cuda_compile: OK (${#FILES[@]} file(s), archs ${ARCHS[*]}, no spills)"
else
  echo "check_cuda_compile: FAILED"
fi
exit $status
