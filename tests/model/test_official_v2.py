"""RT-DETRv2 equals the official rtdetrv2_pytorch model: the same deterministic weights, the same
input, float64, outputs compared with the official outputs recorded in tests/data/official_v2
(how they were made: tests/data/official_v2/README.md). Every preset, at 640x640 and 480x800,
bilinear and discrete sampling, 4 points per level and the per-level counts (3, 6, 3) and
(2, 2, 2), and class-agnostic query selection."""
import json
import pathlib
import zlib

import pytest
import torch

from rtdetr_fast import RTDETR, get_config
from rtdetr_fast.model.decoder import RTDETRDecoder

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "official_v2"
PRESETS = ("rtdetrv2_r18vd", "rtdetrv2_r34vd", "rtdetrv2_r50vd_m", "rtdetrv2_r50vd",
           "rtdetrv2_r101vd")
SIZES = ((640, 640), (480, 800))
# (cross_attn_method, num_points, query_select_method)
VARIANTS = tuple((m, p, "default") for m in ("default", "discrete")
                 for p in ((4, 4, 4), (3, 6, 3), (2, 2, 2))) + (("default", (4, 4, 4), "agnostic"),)
# derived buffers: the model makes them, the fill leaves them
DERIVED = ("num_points_scale", "anchors", "valid_mask", "num_batches_tracked")
SLICE_Q, SLICE_C = 16, 8


def case_name(size, variant) -> str:
    method, points, select = variant
    return f"{size[0]}x{size[1]}_{method}_{''.join(map(str, points))}_{select}"


def fill_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every state-dict entry values drawn from a generator seeded by (seed, the key's
    CRC-32), so each tensor's values depend on its name and shape only (the backbone's are the
    same whatever the decoder's options). Weights ~ U(-1, 1) * sqrt(6 / fan_in); 1-D weights
    (norm scales) 1 + 0.2 U; biases 0.1 U; running means 0.1 U, running variances 0.5 + U[0, 1);
    embeddings U(-1, 1)."""
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.rsplit(".", 1)[-1] in DERIVED or not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(key.encode()))
            u = torch.rand(t.shape, generator=g, dtype=torch.float64) * 2 - 1
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "running_var":
                v = 0.5 + (u + 1) / 2
            elif leaf in ("running_mean", "bias") or key.endswith("in_proj_bias"):
                v = 0.1 * u
            elif t.dim() == 1:
                v = 1 + 0.2 * u
            elif "embed" in key and t.dim() == 2 and "proj" not in key:
                v = u
            else:
                v = u * (6.0 / (t[0].numel())) ** 0.5
            t.copy_(v.to(t.dtype))


def make_input(size, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *size, generator=g, dtype=torch.float64)


def summarize(out) -> dict:
    """A few KB per case: a corner of the logits and boxes, and sums over the whole tensors
    (plain, squared, and weighted by position, so a reordering of queries shows)."""
    res = {}
    for name in ("pred_logits", "pred_boxes"):
        t = out[name][0].to(torch.float64)
        w = torch.arange(1, t.numel() + 1, dtype=torch.float64).reshape(t.shape) / t.numel()
        res[name] = {"slice": t[:SLICE_Q, :SLICE_C].tolist(), "sum": t.sum().item(),
                     "sum_sq": (t * t).sum().item(), "sum_weighted": (t * w).sum().item(),
                     "shape": list(t.shape)}
    return res


def build(preset, size, variant) -> RTDETR:
    method, points, select = variant
    model = RTDETR.from_name(preset, eval_spatial_size=size, **{
        "decoder.num_points": points, "decoder.cross_attn_method": method,
        "decoder.query_select_method": select})
    fill_weights(model)
    return model.double().eval()


def build_decoder(preset, size, variant) -> RTDETRDecoder:
    """The decoder ``build`` makes, alone: its weights are filled under the same key names."""
    method, points, select = variant
    cfg = get_config(preset, eval_spatial_size=size, **{
        "decoder.num_points": points, "decoder.cross_attn_method": method,
        "decoder.query_select_method": select})
    holder = torch.nn.Module()
    holder.decoder = RTDETRDecoder(cfg.decoder, cfg.num_classes,
                                   [cfg.encoder.hidden_dim] * len(cfg.encoder.in_channels),
                                   list(cfg.encoder.feat_strides), cfg.eval_spatial_size)
    fill_weights(holder)
    return holder.decoder.double().eval()


def assert_matches(mine: dict, ref: dict, what: str) -> None:
    for name in ("pred_logits", "pred_boxes"):
        a, b = mine[name], ref[name]
        assert a["shape"] == b["shape"], what
        torch.testing.assert_close(torch.tensor(a["slice"]), torch.tensor(b["slice"]),
                                   rtol=1e-12, atol=1e-12, msg=lambda m: f"{what} {name}: {m}")
        for k in ("sum", "sum_sq", "sum_weighted"):
            assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12), (what, name, k, a[k], b[k])


def _params():
    out = []
    for preset in PRESETS:
        marks = [] if preset in ("rtdetrv2_r18vd",) else [pytest.mark.slow]
        for size in SIZES:
            out.append(pytest.param(preset, size, marks=marks, id=f"{preset}-{size[0]}x{size[1]}"))
    return out


@pytest.mark.parametrize("preset, size", _params())
def test_equals_the_official_v2_model(preset, size):
    """The backbone and encoder run once; each decoder variant (method, point counts, query
    selection) runs on their features with its own decoder weights."""
    recorded = json.loads((DATA / f"{preset}.json").read_text())
    x = make_input(size)
    base = build(preset, size, VARIANTS[0])
    with torch.no_grad():
        feats = base.encoder(base.backbone(x))
    for variant in VARIANTS:
        name = case_name(size, variant)
        decoder = base.decoder if variant == VARIANTS[0] else build_decoder(preset, size, variant)
        with torch.no_grad():
            out = decoder(feats)
        assert_matches(summarize(out), recorded["cases"][name], f"{preset} {name}")
