#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU tests and the benchmarks, and
# write benchmarks/results/<date>-<gpu>.md (table) and .log (raw output, environment).
# Needs torch (CUDA build), triton, pytest, pytest-benchmark, nvcc; no internet.
set -uo pipefail
cd "$(dirname "$0")/.."
python - <<'PY' || { echo "gpu_suite: no CUDA device visible to torch" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
GPU=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_').replace('/', '_'))")
STAMP=$(date +%Y-%m-%d)
OUT=benchmarks/results/${STAMP}-${GPU}
mkdir -p benchmarks/results
LOG=${OUT}.log
JSON=${OUT}.json
: > "$LOG"
run() { echo "+ $*" | tee -a "$LOG"; "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }
status=0
{
  echo "# environment"; date -u; hostname; nvidia-smi || true
  python -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  python -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
  nvcc --version | tail -1 || true
} 2>&1 | tee -a "$LOG"
CAP=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# build for the GPU in hand; FORCE_CUDA so the build never falls back to the CPU extension
run env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CAP}" MAX_JOBS="${MAX_JOBS:-16}" \
  pip install --no-build-isolation --no-deps -e . || { echo "gpu_suite: build failed" | tee -a "$LOG"; exit 1; }
run python -c "import rtdetr_fast._C as C; info = C.build_info(); print(info); assert info['cuda'], 'extension built without CUDA'" || exit 1
run python -m rtdetr_fast.info || true
run scripts/check_cuda_compile.sh || status=1
# the CPU emulator's kernel harnesses (tests/cuda_emu), built with nvcc on managed memory and
# run on the GPU as they are, then under compute-sanitizer's racecheck and synccheck
SAN=$(dirname "$(command -v nvcc)")/compute-sanitizer
HBIN=$(mktemp -d)
for k in "topk csrc/topk_select/cuda/topk_select_cuda.cu tests/cuda_emu/topk_harness.cu" \
         "msda csrc/ms_deform_attn/cuda/ms_deform_attn_cuda.cu tests/cuda_emu/msda_harness.cu" \
         "rep_conv csrc/rep_conv/cuda/rep_conv_cuda.cu tests/cuda_emu/rep_conv_harness.cu"; do
  set -- $k
  if ! run nvcc -std=c++17 -O2 -lineinfo -I csrc -I tests/cuda_emu \
      -gencode "arch=compute_${CAP/./},code=sm_${CAP/./}" "$2" "$3" -o "$HBIN/$1"; then
    status=1; continue
  fi
  run "$HBIN/$1" || status=1
  for tool in racecheck synccheck; do
    run "$SAN" --tool "$tool" --error-exitcode 1 "$HBIN/$1" || status=1
  done
done
rm -rf "$HBIN"
# GPU tests (the CPU tests run too: they are quick and exercise the shared math)
run python -m pytest -q -rs tests/ops/test_ms_deform_attn.py || status=1
run python -m pytest -q -rs tests/ops -k "cuda or gpu" || status=1
# the whole model: no host synchronisation, CUDA-graph capture and replay, the fast path
run python -m pytest -q -rs tests/model/test_no_host_sync.py tests/model/test_fast_path.py || status=1
# benchmarks: GPU cases only here (CPU numbers come from CPU machines)
run python -m pytest -q benchmarks/ops/bench_ms_deform_attn.py -k cuda \
  --benchmark-json="$JSON" --benchmark-columns=min,mean,median,stddev --benchmark-sort=name \
  || status=1
# the other ops' GPU benchmarks: raw numbers into the log and their own JSON files
run python -m pytest -q benchmarks/ops/bench_topk_select.py -k cuda \
  --benchmark-json="${OUT}-topk_select.json" --benchmark-columns=min,median || status=1
run python -m pytest -q benchmarks/ops/bench_rep_conv.py -k "not cpu" \
  --benchmark-json="${OUT}-rep_conv.json" --benchmark-columns=min,median || status=1
python - "$JSON" "$OUT.md" "$GPU" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys, collections
src, dst, gpu = sys.argv[1:]
data = json.load(open(src))
rows = {}
for b in data["benchmarks"]:
    e = b["extra_info"]
    key = (e["mode"], e["dtype"].replace("torch.", ""), e["B"], e["Q"])
    rows.setdefault(key, {})[e["backend"]] = (b["stats"]["median"], e["gb_per_s"], e["bytes"])
m = data["machine_info"]
lines = [f"# ms_deform_attn on {gpu}", "",
         f"torch {data['benchmarks'][0]['extra_info']['torch']}, CUDA "
         f"{data['benchmarks'][0]['extra_info']['cuda']}; S=8400 (80x80, 40x40, 20x20), H=8, "
         "D=32, L=3, P=4; median of 50 rounds; GB/s counts the bytes that must move "
         "(value read once, locations, weights, output; backward adds grad_output, "
         "grad_value as float32 and the location/weight gradients).", "",
         "| mode | dtype | B | Q | reference ms | native ms | native GB/s | native speed-up | "
         "triton ms | triton GB/s | triton / native |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
for key in sorted(rows):
    r = rows[key]
    ref = r.get("reference", (None,) * 3)[0]
    nat_ms, nat_gbs, _ = r.get("native", (None,) * 3)
    tri_ms, tri_gbs, _ = r.get("triton", (None,) * 3)
    lines.append("| %s | %s | %d | %d | %s | %s | %s | %s | %s | %s | %s |" % (
        key[0], key[1], key[2], key[3], fmt(ref and ref * 1e3, "%.3f"),
        fmt(nat_ms and nat_ms * 1e3, "%.3f"), fmt(nat_gbs, "%.0f"),
        fmt(ref / nat_ms if ref and nat_ms else None, "%.1fx"),
        fmt(tri_ms and tri_ms * 1e3, "%.3f"), fmt(tri_gbs, "%.0f"),
        fmt(tri_ms / nat_ms if tri_ms and nat_ms else None, "%.2f")))
lines += ["", "Raw log: " + dst[:-3].split("/")[-1] + ".log"]
open(dst, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
# TensorRT: an FP16 engine from the exported ONNX (one profile, batch 1-32 for both inputs),
# compared with PyTorch; skipped where tensorrt does not import
if python -c "import tensorrt" 2>/dev/null; then
  run python scripts/trt_build.py --engine "${OUT}-rtdetr_r18vd.engine" || status=1
else
  echo "gpu_suite: tensorrt not importable: TensorRT engine check skipped" | tee -a "$LOG"
fi
echo "gpu_suite: wrote $OUT.md and $LOG (status $status)" | tee -a "$LOG"
exit $status
