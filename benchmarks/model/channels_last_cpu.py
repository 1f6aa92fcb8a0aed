"""Interleaved CPU latency of eval, RepConv-only deploy, and deploy() with contiguous and
channels_last weights (rtdetr_r18vd, 640x640, batch 1, float32). Run: python benchmarks/model/channels_last_cpu.py"""
import time, copy, torch, statistics as st
from rtdetr_fast import RTDETR
from rtdetr_fast.model.encoder import RepVggBlock
torch.manual_seed(0)
base = RTDETR.from_name("rtdetr_r18vd").eval()
old = copy.deepcopy(base)
for m in old.modules():
    if isinstance(m, RepVggBlock): m.fold()
variants = {"eval": base, "deploy_repconv_only(old)": old,
            "deploy_contiguous": copy.deepcopy(base).deploy(torch.contiguous_format),
            "deploy_channels_last": copy.deepcopy(base).deploy(torch.channels_last)}
x = torch.rand(1, 3, 640, 640)
xcl = x.contiguous(memory_format=torch.channels_last)
times = {k: [] for k in variants}; times["deploy_channels_last+cl_input"] = []
with torch.inference_mode():
    for k, m in variants.items(): m(x)
    for r in range(5):
        for k, m in variants.items():
            t = time.perf_counter(); m(x); times[k].append(time.perf_counter() - t)
        t = time.perf_counter(); variants["deploy_channels_last"](xcl); times["deploy_channels_last+cl_input"].append(time.perf_counter() - t)
print("torch", torch.__version__, "threads", torch.get_num_threads(), "r18 640x640 B=1 fp32, 5 interleaved rounds after 1 warm-up")
for k, v in times.items():
    print(f"{k:34s} median {st.median(v)*1e3:8.1f} ms  min {min(v)*1e3:8.1f} ms  all {[round(t*1e3) for t in v]}")
