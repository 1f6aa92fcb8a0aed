#!/usr/bin/env bash
# Runs the project's CUDA kernels on the CPU: the UNCHANGED csrc/**/*.cu files are compiled
# with g++ under the emulator of tools/cuda_emu (each CUDA thread a fiber, warp operations
# resolved and checked at sync points) and each kernel's harness compares them with float64
# loops, in three builds (sm_80 paths, sm_90 paths, sm_90 with -fsanitize=address,undefined)
# under five legal schedules (round-robin, reversed, one warp alone until a block barrier, two
# seeded random orders). Then mutation checks: copies of the kernels with a known bug (the
# old top-K race, a removed barrier, a wrong swizzle, a wrong cp.async wait count, a wrong
# ldmatrix lane map, a wrong shuffle source) must each make some run fail. The emulator's
# self-test (tools/cuda_emu/selftest.cu) checks that each misuse it claims to detect is.
# Needs g++ (x86-64), objcopy and the CUDA headers (cuda_fp16.h, cuda_bf16.h,
# cuda_runtime.h); no GPU, no nvcc, no torch. The last line is "N passed, M failed".
#   usage: scripts/check_cuda_emu.sh        (JOBS=<n> to set the parallelism)
set -uo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-g++}
CUDA_INC=""
for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12.8 /usr; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_fp16.h" ] && [ -f "$d/include/cuda_runtime.h" ]; then
    CUDA_INC="$d/include"; break
  fi
done
if [ -z "$CUDA_INC" ]; then echo "check_cuda_emu: CUDA headers not found (set CUDA_HOME)" >&2; echo "0 passed, 1 failed"; exit 2; fi
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
SCHEDULES=(rr rev warp rand:1 rand:2)
KERNELS=(
  "topk csrc/topk_select/cuda/topk_select_cuda.cu tools/cuda_emu/topk_harness.cu"
  "msda csrc/ms_deform_attn/cuda/ms_deform_attn_cuda.cu tools/cuda_emu/msda_harness.cu"
  "rep_conv csrc/rep_conv/cuda/rep_conv_cuda.cu tools/cuda_emu/rep_conv_harness.cu"
  "selftest tools/cuda_emu/selftest.cu -"  # the emulator's own checks (kernels and harness in one)
)
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g1"
declare -A ARCH=([sm80]=800 [sm90]=900 [asan]=900)
declare -A FLAGS=([sm80]="-O1" [sm90]="-O1" [asan]="-O1 $SAN")
declare -A FLAVOR=([sm80]=plain [sm90]=plain [asan]=asan)  # the emulator and harness objects
BUILDS=(sm80 sm90 asan)
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1

base() {  # flags common to every translation unit of a build
  echo "-std=c++17 -w -fno-strict-aliasing -I csrc -I tools/cuda_emu -I $CUDA_INC" \
       "-include tools/cuda_emu/cuda_emu.h -DCUDA_EMU_ARCH=${ARCH[$1]}"
}
compile() {  # compile <log> <command...>
  local log=$1; shift
  "$@" >"$log" 2>&1 || { echo "BUILD FAILED: $*"; head -40 "$log"; return 1; }
}
# the emulator (uninstrumented even in the sanitizer build: the kernels are what it checks)
# and the harnesses, once per flavor
build_common() {  # build_common <flavor>
  local f=$1 b=sm80 emu="-O2"
  [ "$f" = asan ] && { b=asan; emu="-O2 -DCUDA_EMU_ASAN"; }
  compile "$TMP/emu.$f.log" $CXX $(base $b) $emu -c tools/cuda_emu/cuda_emu.cpp -o "$TMP/emu.$f.o" || return 1
  for k in "${KERNELS[@]}"; do
    set -- $k
    [ "$3" = - ] && continue
    compile "$TMP/$1.har.$f.log" $CXX $(base $b) ${FLAGS[$b]} -x c++ -c "$3" -o "$TMP/$1.har.$f.o" || return 1
  done
}
# build <build> <kernel .cu> <kernel name> <binary>: the kernel's function-local statics (its
# __shared__ variables) are moved into the cuda_emu_shared section
build() {
  local b=$1 src=$2 kern=$3 out=$4
  compile "$out.log" $CXX $(base "$b") ${FLAGS[$b]} -fdata-sections -x c++ -c "$src" -o "$out.k.o" || return 1
  objcopy $(objdump -h "$out.k.o" |
            awk '$2 ~ /^\.(bss|data)\._ZZ/ {printf " --rename-section %s=cuda_emu_shared", $2}') \
    "$out.k.o" || return 1
  local har="$TMP/$kern.har.${FLAVOR[$b]}.o"
  [ -f "$har" ] || har=""
  compile "$out.log" $CXX ${FLAGS[$b]} "$TMP/emu.${FLAVOR[$b]}.o" "$out.k.o" $har -o "$out" || return 1
}

throttle() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; }

# ---- mutants: copies of kernels with one known bug each ----
mkdir -p "$TMP/mut"
mutate() {  # mutate <name> <source> <sed script>
  local dst="$TMP/mut/$1.cu"
  sed -e "$3" "$2" > "$dst"
  if cmp -s "$2" "$dst"; then echo "mutant $1: the edit did not apply" > "$TMP/mut/$1.noop"; fi
}
TOPK=csrc/topk_select/cuda/topk_select_cuda.cu
REP=csrc/rep_conv/cuda/rep_conv_cuda.cu
MSDA=csrc/ms_deform_attn/cuda/ms_deform_attn_cuda.cu
# the top-K race fixed in the radix select: the remaining count read after the warp scan
mutate topk_race "$TOPK" '/const uint32_t rem = static_cast<uint32_t>(s.remaining);/d
s/^\( *\)uint32_t before = incl - sum;/&\n\1const uint32_t rem = static_cast<uint32_t>(s.remaining);/'
# the barrier between zeroing the histogram and filling it
mutate topk_no_barrier "$TOPK" '/s.hist\[i\] = 0;/{n;s/__syncthreads();//}'
# the barrier after the cp.async wait of the main loop
mutate rep_conv_no_barrier "$REP" '/cp_async_wait<STAGES - 2>();/{n;s/__syncthreads();//}'
# ldmatrix reads without the swizzle the cp.async writes used
mutate rep_conv_swizzle "$REP" 's/swz(row, ch)/ch/g'
# waiting for one group less than needed
mutate rep_conv_wait "$REP" 's/cp_async_wait<STAGES - 2>()/cp_async_wait<STAGES - 1>()/'
# lanes 8-15 and 16-31 of the A ldmatrix swapped
mutate rep_conv_ldmatrix "$REP" 's/const int lhalf = lane >> 4;/const int lhalf = (lane >> 3) \& 1;/'
# the point broadcast from the wrong lane of the group
mutate msda_shfl "$MSDA" 's/group_bcast<G>(mask, pt.c.row\[c\], k)/group_bcast<G>(mask, pt.c.row[c], k + 1)/'
# the official discrete clamp (x clamped to H_l - 1 as well): a mutated copy of the shared math
# header, included by absolute path from a copy of the kernel
MATH=csrc/ms_deform_attn/ms_deform_attn_math.h
sed -e 's/nearest_cell(x, w))/nearest_cell(x, h))/' "$MATH" > "$TMP/mut/msda_math_h_clamp.h"
cmp -s "$MATH" "$TMP/mut/msda_math_h_clamp.h" && echo "mutant msda_h_clamp: the edit did not apply" > "$TMP/mut/msda_h_clamp.noop"
mutate msda_h_clamp "$MSDA" "s|#include \"ms_deform_attn/ms_deform_attn_math.h\"|#include \"$TMP/mut/msda_math_h_clamp.h\"|"
MUTANTS=(topk_race:topk topk_no_barrier:topk rep_conv_no_barrier:rep_conv rep_conv_swizzle:rep_conv
         rep_conv_wait:rep_conv rep_conv_ldmatrix:rep_conv msda_shfl:msda msda_h_clamp:msda)

# ---- build everything (parallel) ----
build_common plain &
build_common asan &
wait
for b in "${BUILDS[@]}"; do
  for k in "${KERNELS[@]}"; do
    set -- $k
    throttle; build "$b" "$2" "$1" "$TMP/$1.$b" &
  done
done
for m in "${MUTANTS[@]}"; do
  name=${m%%:*}; kern=${m##*:}
  throttle; build sm80 "$TMP/mut/$name.cu" "$kern" "$TMP/mut/$name" &
done
wait

# ---- run (parallel), one log per binary and schedule ----
run_one() {  # run_one <binary> <schedule> <log> [case filter]
  "$1" "$2" ${4:+"$4"} >"$3" 2>&1 </dev/null
  echo $? >"$3.rc"
}
for b in "${BUILDS[@]}"; do
  for k in "${KERNELS[@]}"; do
    set -- $k
    for s in "${SCHEDULES[@]}"; do
      throttle; run_one "$TMP/$1.$b" "$s" "$TMP/log.$1.$b.${s/:/_}" 2>/dev/null &
    done
  done
done
for m in "${MUTANTS[@]}"; do
  name=${m%%:*}; kern=${m##*:}
  filter=""
  [ "$kern" = rep_conv ] && filter=cin40  # the ragged shape, both dtypes: enough to fail
  for s in "${SCHEDULES[@]}"; do
    [ -x "$TMP/mut/$name" ] || continue
    throttle; run_one "$TMP/mut/$name" "$s" "$TMP/mut/log.$name.${s/:/_}" "$filter" 2>/dev/null &
  done
done
wait

passed=0
failed=0
for b in "${BUILDS[@]}"; do
  for k in "${KERNELS[@]}"; do
    set -- $k
    if [ ! -x "$TMP/$1.$b" ]; then echo "FAIL build $1 ($b)"; failed=$((failed + 1)); continue; fi
    for s in "${SCHEDULES[@]}"; do
      log="$TMP/log.$1.$b.${s/:/_}"
      rc=$(cat "$log.rc" 2>/dev/null || echo 99)
      p=$(grep -c '^PASS ' "$log"); f=$(grep -c '^FAIL ' "$log")
      passed=$((passed + p)); failed=$((failed + f))
      grep '^FAIL ' "$log" | sed "s/^/[$b] /"
      if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
        # an emulator check, a sanitizer report or a crash: everything after the last PASS
        failed=$((failed + 1))
        echo "FAIL $1 [$b, $s]: exit status $rc"; grep -v '^PASS ' "$log" | head -30
      fi
    done
  done
done
for m in "${MUTANTS[@]}"; do
  name=${m%%:*}
  if [ -f "$TMP/mut/$name.noop" ]; then cat "$TMP/mut/$name.noop"; failed=$((failed + 1)); continue; fi
  if [ ! -x "$TMP/mut/$name" ]; then echo "FAIL mutant $name: did not build"; failed=$((failed + 1)); continue; fi
  caught=""
  for s in "${SCHEDULES[@]}"; do
    rc=$(cat "$TMP/mut/log.$name.${s/:/_}.rc" 2>/dev/null || echo 99)
    [ "$rc" != 0 ] && caught="$caught $s"
  done
  if [ -n "$caught" ]; then
    echo "PASS mutant $name caught under:$caught"; passed=$((passed + 1))
  else
    echo "FAIL mutant $name survived every schedule"; failed=$((failed + 1))
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
