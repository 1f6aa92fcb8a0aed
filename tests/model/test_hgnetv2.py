"""HGNetv2 and its presets: the backbone's variants (B0-B6, L / X / H), the official checkpoint
layout and parameter counts of RT-DETRv2-L / X / H, the v1 presets (the paper's RT-DETR-L / X),
the config fields, and loading the official layout strictly."""
import pathlib

import pytest
import torch

from rtdetr_fast import RTDETR, get_config
from rtdetr_fast.config import HGNETV2_VARIANTS, BackboneConfig
from rtdetr_fast.model.backbones import BACKBONES, build_backbone
from rtdetr_fast.model.backbones import hgnetv2
from rtdetr_fast.model.checkpoint import DERIVED_KEYS, load_state_dict_strict

KEYS = pathlib.Path(__file__).resolve().parents[1] / "data" / "checkpoint_keys"
KEY_FILES = {"rtdetrv2_hgnetv2_l": "v2_hgnetv2_l.txt", "rtdetrv2_hgnetv2_x": "v2_hgnetv2_x.txt",
             "rtdetrv2_hgnetv2_h": "v2_hgnetv2_h.txt"}
# parameters (millions) with 80 classes: the official models build to 32.9 / 67.4 / 125.6 M;
# the v1 presets share the backbone and encoder, and the v1 decoder has the v2 one's parameters
PARAMS_M = {"rtdetrv2_hgnetv2_l": 32.9, "rtdetrv2_hgnetv2_x": 67.4, "rtdetrv2_hgnetv2_h": 125.6,
            "rtdetr_hgnetv2_l": 32.9, "rtdetr_hgnetv2_x": 67.4}


def layout(sd):
    return [f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in sd.items()]


def reference_keys(preset):
    return [line.strip() for line in (KEYS / KEY_FILES[preset]).read_text().splitlines()
            if line.strip()]


@pytest.mark.parametrize("name", list(KEY_FILES))
def test_v2_presets_match_the_official_checkpoint_layout(name):
    """Key for key, in order, shape and dtype. The released HGNetv2 checkpoints lack the
    decoder's derived buffers (anchors, valid_mask: made from the eval size), which the
    loader treats as optional."""
    model = RTDETR.from_name(name)
    sd = model.state_dict()
    assert layout({k: v for k, v in sd.items() if k not in DERIVED_KEYS}) == reference_keys(name)
    assert [k for k in sd if k in DERIVED_KEYS] == list(DERIVED_KEYS)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == PARAMS_M[name]


@pytest.mark.parametrize("v1, v2", [("rtdetr_hgnetv2_l", "rtdetrv2_hgnetv2_l"),
                                    ("rtdetr_hgnetv2_x", "rtdetrv2_hgnetv2_x")])
def test_v1_presets_are_the_v2_backbone_and_encoder_with_the_v1_decoder(v1, v2):
    a, b = RTDETR.from_name(v1), RTDETR.from_name(v2)
    assert round(sum(p.numel() for p in a.parameters()) / 1e6, 1) == PARAMS_M[v1]
    for part in ("backbone", "encoder"):
        mine = layout(getattr(a, part).state_dict())
        theirs = layout(getattr(b, part).state_dict())
        if part == "encoder":
            # the v1 input projections are the unnamed Sequential(conv, norm)
            theirs = [t.replace(".conv.", ".0.").replace(".norm.", ".1.")
                      if t.startswith("input_proj.") else t for t in theirs]
        assert mine == theirs, part
    # the v1 decoder's layout: the one of rtdetr_r50vd, the same widths
    assert layout(a.decoder.state_dict()) == layout(RTDETR.from_name(
        "rtdetr_r50vd", **{"encoder.hidden_dim": a.config.encoder.hidden_dim}).decoder.state_dict())


def test_preset_fields_follow_the_official_configs():
    for name, (variant, hidden, ffn, layers, version) in {
            "rtdetr_hgnetv2_l": ("L", 256, 1024, 1, "v1"),
            "rtdetr_hgnetv2_x": ("X", 384, 2048, 1, "v1"),
            "rtdetrv2_hgnetv2_l": ("L", 256, 1024, 1, "v2"),
            "rtdetrv2_hgnetv2_x": ("X", 384, 2048, 1, "v2"),
            "rtdetrv2_hgnetv2_h": ("H", 512, 2048, 2, "v2")}.items():
        cfg = get_config(name)
        base = get_config("rtdetr_r50vd" if version == "v1" else "rtdetrv2_r50vd")
        assert cfg.backbone == BackboneConfig(name="hgnetv2", variant=variant, freeze_at=0,
                                              freeze_norm=True)
        assert (cfg.encoder.hidden_dim, cfg.encoder.dim_feedforward,
                cfg.encoder.num_encoder_layers) == (hidden, ffn, layers)
        # everything else is the r50vd config's: encoder expansion 1.0, the decoder's 256
        # channels, 6 layers, 300 queries, 100 denoising queries...
        enc = cfg.encoder.__class__(**{**vars(base.encoder), "hidden_dim": hidden,
                                       "dim_feedforward": ffn, "num_encoder_layers": layers})
        assert cfg.encoder == enc
        assert cfg.decoder == base.decoder
        assert cfg.eval_spatial_size == base.eval_spatial_size
        assert cfg.num_top_queries == base.num_top_queries


def test_presnet_presets_name_their_backbone():
    for name in ("rtdetr_r18vd", "rtdetrv2_r101vd"):
        assert get_config(name).backbone.name == "presnet"
        assert type(RTDETR.from_name(name).backbone).__name__ == "PResNet"


def test_backbone_is_frozen_as_official():
    """freeze_at 0: the stem frozen, the stages trained; frozen norms (buffers only)."""
    model = RTDETR.from_name("rtdetrv2_hgnetv2_l")
    bb = model.backbone
    assert isinstance(bb, hgnetv2.HGNetv2)
    assert not any(p.requires_grad for p in bb.stem.parameters())
    assert all(p.requires_grad for p in bb.stages.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    unfrozen = build_backbone(BackboneConfig(name="hgnetv2", variant="B0", freeze_at=-1,
                                             freeze_norm=False))
    assert all(p.requires_grad for p in unfrozen.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfrozen.modules())


EXPECTED_CHANNELS = {"B0": [256, 512, 1024], "B1": [256, 512, 1024], "B2": [384, 768, 1536],
                     "B3": [512, 1024, 2048], "B4": [512, 1024, 2048], "B5": [512, 1024, 2048],
                     "B6": [512, 1024, 2048]}


@pytest.mark.parametrize("variant", list(EXPECTED_CHANNELS))
def test_every_variant_builds_and_runs(variant):
    """B0-B6 (lab on for B0-B3, as the D-FINE configs have it): feature maps at strides 8, 16,
    32 with the table's channels, on an input that is not a multiple of 32."""
    lab = variant in ("B0", "B1", "B2", "B3")
    bb = build_backbone(BackboneConfig(name="hgnetv2", variant=variant, use_lab=lab,
                                       freeze_at=-1, freeze_norm=False)).eval()
    assert bb.out_channels == EXPECTED_CHANNELS[variant]
    assert bb.out_strides == [8, 16, 32]
    with torch.no_grad():
        outs = bb(torch.rand(1, 3, 72, 100))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, h, w) for c, (h, w) in zip(EXPECTED_CHANNELS[variant], [(9, 13), (5, 7), (3, 4)])]
    labs = [k for k in bb.state_dict() if ".lab." in k]
    assert bool(labs) == lab


def test_aliases_are_the_large_variants():
    for alias, name in (("L", "B4"), ("X", "B5"), ("H", "B6")):
        a = build_backbone(BackboneConfig(name="hgnetv2", variant=alias))
        b = build_backbone(BackboneConfig(name="hgnetv2", variant=name))
        assert layout(a.state_dict()) == layout(b.state_dict())
    assert set(HGNETV2_VARIANTS) == set(hgnetv2.VARIANTS)


def test_learnable_affine_sits_after_each_activation_only():
    """use_lab: a (scale, bias) pair after every ReLU: the stem's convs, the plain layers, the
    depthwise half of the light layers, the aggregation convs; none after the light layers'
    1x1 conv or the linear downsampling."""
    bb = build_backbone(BackboneConfig(name="hgnetv2", variant="B0", use_lab=True))
    keys = list(bb.state_dict())
    assert "stem.stem1.lab.scale" in keys and "stem.stem2a.lab.bias" in keys
    assert "stages.0.blocks.0.layers.0.lab.scale" in keys
    assert "stages.2.blocks.0.layers.0.conv2.lab.scale" in keys
    assert not any(k.startswith("stages.2.blocks.0.layers.0.conv1.lab") for k in keys)
    assert not any(".downsample.lab" in k for k in keys)
    assert "stages.3.blocks.0.aggregation_excitation_conv.lab.bias" in keys
    lab = dict(bb.named_parameters())["stages.0.blocks.0.layers.0.lab.scale"]
    assert lab.shape == (1,) and lab.requires_grad
    # the affine is applied: a scale of 0 and a bias of 1 make the stem's first conv output 1
    conv = bb.stem.stem1
    with torch.no_grad():
        conv.lab.scale.fill_(0.0)
        conv.lab.bias.fill_(1.0)
        assert torch.equal(conv(torch.rand(1, 3, 8, 8)), torch.ones(1, 16, 4, 4))


def test_backbone_config_fields_are_checked():
    assert set(BACKBONES) == {"presnet", "hgnetv2"}
    with pytest.raises(ValueError, match="hgnetv2 variant"):
        get_config("rtdetrv2_hgnetv2_l", **{"backbone.variant": "B9"})
    with pytest.raises(ValueError, match="backbone name"):
        get_config("rtdetrv2_hgnetv2_l", **{"backbone.name": "vgg"})
    cfg = get_config("rtdetrv2_hgnetv2_l", **{"backbone.variant": "B5", "use_lab": True})
    assert cfg.backbone.variant == "B5" and cfg.backbone.use_lab
    # an HGNetv2 backbone on a ResNet preset, and the encoder told its channels
    cfg = get_config("rtdetrv2_r18vd", **{"backbone.name": "hgnetv2", "backbone.variant": "B0",
                                          "encoder.in_channels": (256, 512, 1024)})
    assert isinstance(RTDETR(cfg).backbone, hgnetv2.HGNetv2)


def test_config_round_trips_through_a_dict():
    from rtdetr_fast.config import RTDETRConfig

    cfg = get_config("rtdetrv2_hgnetv2_x")
    assert RTDETRConfig.from_dict(cfg.to_dict()) == cfg
    # a dict saved before the backbone had a name is a ResNet one
    d = get_config("rtdetr_r50vd").to_dict()
    del d["backbone"]["name"], d["backbone"]["use_lab"]
    assert RTDETRConfig.from_dict(d) == get_config("rtdetr_r50vd")


def test_official_layout_loads_strictly():
    """A state dict in the released layout (no anchors / valid_mask) loads strictly; one
    missing a backbone key, or of the wrong variant, is refused with the keys named."""
    from rtdetr_fast.model.checkpoint import CheckpointError

    model = RTDETR.from_name("rtdetrv2_hgnetv2_l")
    sd = {k: v.clone() for k, v in model.state_dict().items() if k not in DERIVED_KEYS}
    sd["backbone.stem.stem2a.conv.1.weight"].fill_(0.5)
    load_state_dict_strict(model, sd, "test")
    assert torch.all(model.backbone.stem.stem2a.conv[1].weight == 0.5)
    bad = dict(sd)
    del bad["backbone.stages.2.blocks.1.aggregation_squeeze_conv.bn.running_var"]
    with pytest.raises(CheckpointError, match="aggregation_squeeze_conv.bn.running_var"):
        load_state_dict_strict(model, bad, "test")
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*shape mismatches.*"
                                              r"stem\.stem4\.conv\.weight"):
        load_state_dict_strict(RTDETR.from_name("rtdetrv2_hgnetv2_l",
                                                **{"backbone.variant": "X"}), sd, "test")


# ------------------------------------------------------------------ the official outputs
OFFICIAL = pathlib.Path(__file__).resolve().parents[1] / "data" / "official_hgnetv2"
OFFICIAL_SIZES = {"rtdetrv2_hgnetv2_l": ((640, 640), (480, 800)),
                  "rtdetrv2_hgnetv2_x": ((640, 640), (480, 800)),
                  "rtdetrv2_hgnetv2_h": ((640, 640), (480, 800))}


def _official_params():
    out = []
    for preset, sizes in OFFICIAL_SIZES.items():
        for size in sizes:
            slow = preset != "rtdetrv2_hgnetv2_l" or size != (480, 800)
            out.append(pytest.param(preset, size, marks=[pytest.mark.slow] if slow else [],
                                    id=f"{preset}-{size[0]}x{size[1]}"))
    return out


@pytest.mark.parametrize("preset, size", _official_params())
def test_equals_the_official_hgnetv2_model(preset, size):
    """float64, the seeded weights and input of test_official_v2, outputs compared with the
    official rtdetrv2_pytorch model's recorded in tests/data/official_hgnetv2 (its README says
    how) to 1e-12."""
    import json

    from test_official_v2 import assert_matches, fill_weights, make_input, summarize

    recorded = json.loads((OFFICIAL / f"{preset}.json").read_text())
    model = RTDETR.from_name(preset, eval_spatial_size=size)
    fill_weights(model)
    model = model.double().eval()
    with torch.no_grad():
        out = model(make_input(size))
    name = f"{size[0]}x{size[1]}_default_444_default"
    assert_matches(summarize(out), recorded["cases"][name], f"{preset} {name}")


# ------------------------------------------------------------------ deploy
def _norms(module):
    from rtdetr_fast.model.norms import is_batch_norm

    return [m for m in module.modules() if is_batch_norm(m)]


def test_deploy_folds_every_norm_float64_l(tmp_path):
    """RT-DETRv2-L at a small size: every norm (the backbone's frozen ones included) folded,
    outputs unchanged to float64 rounding, idempotent; the deployed model saves and loads."""
    from test_official_v2 import fill_weights

    model = RTDETR.from_name("rtdetrv2_hgnetv2_l", eval_spatial_size=(128, 160))
    fill_weights(model)
    model = model.double().eval()
    x = torch.rand(1, 3, 128, 160, dtype=torch.float64)
    n_backbone = len(_norms(model.backbone))
    with torch.no_grad():
        before = model(x)
        model.deploy()
        assert _norms(model) == []
        sd = model.state_dict()
        after = model(x)
        model.deploy()
        again = model(x)
    assert n_backbone == 80
    assert sd.keys() == model.state_dict().keys()
    assert "backbone.stem.stem2a.conv.1.bias" in sd
    assert not any(".bn." in k for k in sd)
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(after[k], before[k], rtol=1e-10, atol=1e-10)
        assert torch.equal(again[k], after[k])
    model.save_pretrained(tmp_path / "deployed")
    loaded = RTDETR.from_pretrained(tmp_path / "deployed")  # float32: the values rounded
    assert _norms(loaded) == []
    got = loaded.state_dict()
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def test_deploy_float32_keeps_the_features_l():
    """In float32 (the CPU's fast routes for the encoder's folded convs) the backbone's and
    the encoder's features stay within float32 rounding of the float64 model's. (The logits
    of random weights are compared in float64 above: float32 rounding reorders near-tied
    queries.)"""
    import copy

    from test_official_v2 import fill_weights

    model = RTDETR.from_name("rtdetrv2_hgnetv2_l", eval_spatial_size=(128, 160))
    fill_weights(model)
    model.eval()
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()
        want_bb = ref.backbone(x.double())
        want = ref.encoder(want_bb)
        model.deploy()
        got_bb = model.backbone(x)
        got = model.encoder(got_bb)
    for a, b in zip(got_bb + got, want_bb + want):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-5


def test_deploy_folds_trainable_norms_and_keeps_the_affine():
    """B0 with the learnable affine and plain (trained-looking) batch norms, backbone alone."""
    from test_official_v2 import fill_weights

    holder = torch.nn.Module()
    holder.backbone = build_backbone(BackboneConfig(name="hgnetv2", variant="B0", use_lab=True,
                                                    freeze_at=-1, freeze_norm=False))
    fill_weights(holder)
    bb = holder.backbone.double().eval()
    x = torch.rand(2, 3, 64, 96, dtype=torch.float64)
    n = len(_norms(bb))
    with torch.no_grad():
        before = bb(x)
        assert bb.fold_norms() == n
        after = bb(x)
    assert _norms(bb) == []
    assert any(k.endswith(".lab.scale") for k in bb.state_dict())
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["rtdetr_hgnetv2_l", "rtdetr_hgnetv2_x", "rtdetrv2_hgnetv2_l",
                                  "rtdetrv2_hgnetv2_x", "rtdetrv2_hgnetv2_h"])
def test_infer_preset_from_the_layout(name):
    from rtdetr_fast.model.checkpoint import infer_preset

    sd = RTDETR.from_name(name).state_dict()
    assert infer_preset({k: v for k, v in sd.items() if k not in DERIVED_KEYS}) == (name, 80, {})


def test_infer_preset_reports_another_variant_and_the_affine():
    from rtdetr_fast.model.checkpoint import infer_preset

    model = RTDETR.from_name("rtdetrv2_hgnetv2_l", num_classes=3, **{
        "backbone.variant": "B2", "backbone.use_lab": True,
        "encoder.in_channels": (384, 768, 1536), "encoder.num_encoder_layers": 2})
    assert infer_preset(model.state_dict()) == ("rtdetrv2_hgnetv2_l", 3, {
        "backbone.variant": "B2", "backbone.use_lab": True,
        "encoder.in_channels": (384, 768, 1536), "encoder.num_encoder_layers": 2})


def test_official_pth_loads_strictly_with_its_values(tmp_path):
    """A released-layout .pth (ema.module, no anchors / valid_mask) loads into the inferred
    preset with every value; asserting another preset is refused."""
    from rtdetr_fast.model.checkpoint import CheckpointError

    src = RTDETR.from_name("rtdetrv2_hgnetv2_l")
    # every value new, but the point-count buffers, which the preset is read from
    sd = {k: torch.rand_like(v) if v.is_floating_point() and "num_points_scale" not in k else v
          for k, v in src.state_dict().items() if k not in DERIVED_KEYS}
    torch.save({"ema": {"module": sd}}, tmp_path / "l.pth")
    model = RTDETR.from_pretrained(tmp_path / "l.pth")
    assert model.config.name == "rtdetrv2_hgnetv2_l"
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="not rtdetrv2_hgnetv2_x"):
        RTDETR.from_pretrained(tmp_path / "l.pth", name="rtdetrv2_hgnetv2_x")
