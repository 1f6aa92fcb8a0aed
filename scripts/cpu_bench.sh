#!/usr/bin/env bash
# CPU benchmarks (ops per backend and the whole model) on this machine; writes
# benchmarks/results/<NAME>-<date>.md (table), .log (raw output) and .json (pytest-benchmark).
#   env: NAME=cpu (file prefix), SELECT=cpu (pytest -k expression choosing the benchmarks),
#        e.g. NAME=onnx-cpu SELECT=onnx for ONNX Runtime against torch eager
set -uo pipefail
cd "$(dirname "$0")/.."
STAMP=$(date +%Y-%m-%d)
OUT=benchmarks/results/${NAME:-cpu}-${STAMP}
mkdir -p benchmarks/results
{
  echo "# environment"; date -u; uname -m; nproc
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'threads', torch.get_num_threads())"
  python -m rtdetr_fast.info | sed -n '1,8p'
} > "${OUT}.log" 2>&1
set -o pipefail
python -m pytest -q benchmarks -k "${SELECT:-cpu}" -p no:randomly \
  --benchmark-json="${OUT}.json" --benchmark-columns=min,median,mean --benchmark-sort=name \
  2>&1 | tee -a "${OUT}.log"
status=${PIPESTATUS[0]}
python - "${OUT}.json" "${OUT}.md" <<'PY' 2>&1 | tee -a "${OUT}.log"
import json, re, sys
src, dst = sys.argv[1:]
data = json.load(open(src))
m = data["machine_info"]
rows = sorted((b["fullname"].split("::")[-1], b["stats"]["median"] * 1e3, b["stats"]["min"] * 1e3)
              for b in data["benchmarks"])
med = {n: v for n, v, _ in rows}
lines = [f"# CPU benchmarks, {data['datetime'][:10]}", "",
         f"{m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, "
         f"{m.get('cpu', {}).get('count', '?')} cores; python {m['python_version']}; "
         "float32; pytest-benchmark median and min (ms). Raw output in the .log beside this file.",
         "", "| benchmark | median ms | min ms | speed-up vs reference (or eager-eval) |", "|---|---|---|---|"]
for name, median, mn in rows:
    ref = name.replace("-native]", "-reference]").replace("[native-", "[reference-") \
        .replace("-native-", "-reference-")
    if ref == name:  # ONNX Runtime and deployed eager against eval-mode eager
        ref = re.sub(r"-(eager-deploy|ort-gather|ort)\]$", "-eager-eval]", name)
    if ref == name:  # the whole model deployed or compiled against eval mode
        ref = re.sub(r"(?<!eager)-(deploy|compiled)\]$", "-eval]", name)
    sp = f"{med[ref] / median:.2f}x" if ref != name and ref in med else ""
    lines.append(f"| `{name}` | {median:.2f} | {mn:.2f} | {sp} |")
open(dst, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
exit "$status"
