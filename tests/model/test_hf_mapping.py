"""Official v1 <-> Hugging Face transformers RT-DETR key mapping (rtdetr_fast.model.hf_mapping)."""
import pathlib

import pytest
import torch

from rtdetr_fast.model.hf_mapping import (
    hf_config_for,
    hf_to_official,
    official_to_hf,
    preset_from_hf_config,
)

KEYS = pathlib.Path(__file__).resolve().parents[1] / "data" / "checkpoint_keys"
PRESETS = {
    "rtdetr_r18vd": "v1_r18.txt",
    "rtdetr_r34vd": "v1_r34.txt",
    "rtdetr_r50vd_m": "v1_r50m.txt",
    "rtdetr_r50vd": "v1_r50.txt",
    "rtdetr_r101vd": "v1_r101.txt",
}
# (backbone depths, bottleneck?, decoder layers, CSP conv3?, encoder hidden dim) per preset
ARCH = {
    "rtdetr_r18vd": ([2, 2, 2, 2], False, 3, True, 256),
    "rtdetr_r34vd": ([3, 4, 6, 3], False, 4, True, 256),
    "rtdetr_r50vd_m": ([3, 4, 6, 3], True, 6, True, 256),
    "rtdetr_r50vd": ([3, 4, 6, 3], True, 6, False, 256),
    "rtdetr_r101vd": ([3, 4, 23, 3], True, 6, False, 384),
}


def fake_official(preset: str, seed: int = 0) -> dict:
    """A state dict with the official keys/shapes/dtypes and distinct random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for line in (KEYS / PRESETS[preset]).read_text().splitlines():
        if not line.strip():
            continue
        key, rest = line.split(" ", 1)
        shape_txt, dtype_txt = rest.rsplit(" ", 1)
        shape = tuple(int(x) for x in shape_txt.strip("()").split(",") if x.strip())
        dtype = getattr(torch, dtype_txt)
        if dtype.is_floating_point:
            sd[key] = torch.randn(shape, generator=g).to(dtype)
        else:
            sd[key] = torch.randint(0, 10_000, shape, generator=g).to(dtype)
    return sd


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("preset", list(PRESETS))
def test_round_trip_is_exact(preset):
    sd = fake_official(preset)
    hf = official_to_hf(sd, backbone_num_batches_tracked=True)
    assert_same(hf_to_official(hf), sd)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_default_round_trip_drops_only_backbone_num_batches_tracked(preset):
    sd = fake_official(preset)
    back = hf_to_official(official_to_hf(sd))
    dropped = {k for k in sd if k.startswith("backbone.") and k.endswith(".num_batches_tracked")}
    assert bool(dropped) == (preset in ("rtdetr_r18vd", "rtdetr_r34vd"))
    assert_same(back, {k: v for k, v in sd.items() if k not in dropped})


# the layouts transformers itself wrote (tests/data/transformers); the recorded r50 folder is
# transformers' single-level default, not the preset, so it is checked in
# test_hf_recorded_layouts.py instead
RECORDED = {"rtdetr_r18vd": "hf_v1_r18.txt", "rtdetr_r34vd": "hf_v1_r34.txt",
            "rtdetr_r101vd": "hf_v1_r101.txt"}


@pytest.mark.parametrize("preset", list(RECORDED))
def test_hf_keys_are_the_recorded_transformers_layout(preset):
    hf = official_to_hf(fake_official(preset))
    recorded = {}
    path = KEYS.parent / "transformers" / RECORDED[preset]
    for line in path.read_text().splitlines():
        if line.strip():
            name, rest = line.split(" ", 1)
            shape_txt = rest.rsplit(" ", 1)[0]
            recorded[name] = tuple(int(x) for x in shape_txt.strip("()").split(",") if x.strip())
    assert set(hf) == set(recorded), (sorted(set(hf) - set(recorded))[:10],
                                      sorted(set(recorded) - set(hf))[:10])
    bad = [k for k in hf if tuple(hf[k].shape) != recorded[k]]
    assert not bad, bad[:10]


@pytest.mark.parametrize("preset", ["rtdetr_r18vd", "rtdetr_r101vd"])
def test_qkv_split_order_and_values(preset):
    sd = fake_official(preset)
    hf = official_to_hf(sd)
    d = ARCH[preset][4]
    for off, new in (("encoder.encoder.0.layers.0", "model.encoder.encoder.0.layers.0"),
                     ("decoder.decoder.layers.1", "model.decoder.layers.1")):
        w, b = sd[f"{off}.self_attn.in_proj_weight"], sd[f"{off}.self_attn.in_proj_bias"]
        dim = w.shape[1]
        if off.startswith("encoder"):
            assert dim == d
        for i, name in enumerate("qkv"):
            assert torch.equal(hf[f"{new}.self_attn.{name}_proj.weight"], w[i * dim:(i + 1) * dim])
            assert torch.equal(hf[f"{new}.self_attn.{name}_proj.bias"], b[i * dim:(i + 1) * dim])
    # the split tensors own their memory (safetensors refuses shared storage)
    q = hf["model.decoder.layers.0.self_attn.q_proj.weight"]
    k = hf["model.decoder.layers.0.self_attn.k_proj.weight"]
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    # swapping q and k must change the result
    hf["model.decoder.layers.0.self_attn.q_proj.weight"] = k
    hf["model.decoder.layers.0.self_attn.k_proj.weight"] = q
    assert not torch.equal(hf_to_official(hf)["decoder.decoder.layers.0.self_attn.in_proj_weight"],
                           sd["decoder.decoder.layers.0.self_attn.in_proj_weight"])


def test_tied_top_level_heads():
    sd = fake_official("rtdetr_r18vd")
    plain = hf_to_official(official_to_hf(sd))
    tied = official_to_hf(sd, tied_heads=True)
    assert torch.equal(tied["class_embed.2.weight"], tied["model.decoder.class_embed.2.weight"])
    assert "bbox_embed.0.layers.2.bias" in tied
    assert_same(hf_to_official(tied), plain)
    # only the top-level copies (no model.decoder.* heads) also load
    only_top = {k: v for k, v in tied.items()
                if not k.startswith(("model.decoder.class_embed.", "model.decoder.bbox_embed."))}
    assert_same(hf_to_official(only_top), plain)
    # tied copies that disagree are an error
    tied["class_embed.0.bias"] = tied["class_embed.0.bias"] + 1
    with pytest.raises(ValueError, match="class_embed.0.bias"):
        hf_to_official(tied)


def test_unknown_keys_raise():
    hf = official_to_hf(fake_official("rtdetr_r18vd"))
    hf["model.some_new_head.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="model.some_new_head.weight"):
        hf_to_official(hf)
    sd = fake_official("rtdetr_r18vd")
    sd["decoder.mystery.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="decoder.mystery.weight"):
        official_to_hf(sd)


def test_incomplete_qkv_raises():
    hf = official_to_hf(fake_official("rtdetr_r18vd"))
    del hf["model.decoder.layers.2.self_attn.v_proj.bias"]
    with pytest.raises(ValueError, match="model.decoder.layers.2.self_attn"):
        hf_to_official(hf)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_round_trip(preset):
    assert preset_from_hf_config(hf_config_for(preset, 91)) == (preset, 91, {})


def test_config_overrides_and_errors():
    cfg = hf_config_for("rtdetr_r50vd", 80)
    cfg.update(num_queries=500, decoder_layers=3)
    assert preset_from_hf_config(cfg) == ("rtdetr_r50vd", 80, {"num_queries": 500, "num_decoder_layers": 3})
    # eval_idx -1 and n-1 are the same layer; r50vd_m's official eval_idx is 2
    cfg = hf_config_for("rtdetr_r50vd", 80)
    cfg["eval_idx"] = 5
    assert preset_from_hf_config(cfg) == ("rtdetr_r50vd", 80, {})
    cfg = hf_config_for("rtdetr_r50vd_m", 80)
    del cfg["eval_idx"]  # omitted = transformers' default -1
    assert preset_from_hf_config(cfg) == ("rtdetr_r50vd_m", 80, {"eval_idx": -1})
    # num_classes from num_labels when id2label is absent
    cfg = hf_config_for("rtdetr_r34vd", 80)
    del cfg["id2label"], cfg["label2id"]
    cfg["num_labels"] = 7
    assert preset_from_hf_config(cfg)[:2] == ("rtdetr_r34vd", 7)
    with pytest.raises(ValueError):
        preset_from_hf_config({**hf_config_for("rtdetr_r18vd", 80), "model_type": "detr"})
    with pytest.raises(ValueError):
        preset_from_hf_config({"model_type": "rt_detr", "id2label": {"0": "a"}})
    bad = hf_config_for("rtdetr_r18vd", 80)
    bad["backbone_config"]["depths"] = [1, 1, 1, 1]
    with pytest.raises(ValueError):
        preset_from_hf_config(bad)


def test_config_overrides_are_accepted_by_get_config():
    from rtdetr_fast.config import get_config

    cfg = hf_config_for("rtdetr_r101vd", 3)
    cfg.update(num_queries=200, decoder_layers=4, eval_idx=2)
    preset, num_classes, overrides = preset_from_hf_config(cfg)
    model_cfg = get_config(preset, num_classes, **overrides)
    dec = model_cfg.decoder
    assert (dec.num_queries, dec.num_decoder_layers, dec.eval_idx) == (200, 4, 2)
    assert model_cfg.encoder.hidden_dim == 384 and model_cfg.num_classes == 3
