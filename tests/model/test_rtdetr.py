"""The model: presets, checkpoint layout, API, deploy, eval-layer cut, bad input."""
import copy

import numpy as np
import pytest
import torch

from rtdetr_fast import RTDETR, get_config, list_presets
from rtdetr_fast.model.encoder import RepVggBlock, sincos_position_embedding

from conftest import randomize_batch_norms, reference_keys

PARAMS_M = {"rtdetr_r18vd": 20.18, "rtdetr_r34vd": 31.44, "rtdetr_r50vd_m": 36.59,
            "rtdetr_r50vd": 42.89, "rtdetr_r101vd": 76.56,
            # v2 adds buffers (num_points_scale, anchors), no parameters
            "rtdetrv2_r18vd": 20.18, "rtdetrv2_r34vd": 31.44, "rtdetrv2_r50vd_m": 36.59,
            "rtdetrv2_r50vd": 42.89, "rtdetrv2_r101vd": 76.56}


@pytest.mark.parametrize("name", list(PARAMS_M))
def test_preset_matches_official_checkpoint_layout(name):
    model = RTDETR.from_name(name)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == PARAMS_M[name]
    mine = [f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
            for k, v in model.state_dict().items()]
    assert mine == reference_keys(name)


def test_presets_listed():
    # the HGNetv2 presets are tested in test_hgnetv2.py
    hgnetv2 = {"rtdetr_hgnetv2_l", "rtdetr_hgnetv2_x", "rtdetrv2_hgnetv2_l", "rtdetrv2_hgnetv2_x",
               "rtdetrv2_hgnetv2_h"}
    assert set(list_presets()) == set(PARAMS_M) | hgnetv2


def test_r50_backbone_is_frozen_as_official():
    model = RTDETR.from_name("rtdetr_r50vd")
    assert not any(p.requires_grad for p in model.backbone.conv1.parameters())
    assert all(p.requires_grad for p in model.backbone.res_layers[0].parameters())
    r18 = RTDETR.from_name("rtdetr_r18vd")
    assert all(p.requires_grad for p in r18.backbone.parameters())


def test_forward_shapes_square_nonsquare_and_odd_sizes(r18):
    with torch.no_grad():
        for h, w in [(320, 320), (256, 416), (200, 330)]:
            out = r18(torch.rand(2, 3, h, w))
            assert out["pred_logits"].shape == (2, 300, 80)
            assert out["pred_boxes"].shape == (2, 300, 4)
            assert torch.isfinite(out["pred_logits"]).all()
            assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


def test_batch_elements_are_independent(r18):
    # float64: in float32 the batch size changes rounding, which can reorder near-tied queries
    model = copy.deepcopy(r18).double()
    x = torch.rand(2, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        both = model(x)
        one = model(x[1:])
    torch.testing.assert_close(both["pred_logits"][1:], one["pred_logits"])
    torch.testing.assert_close(both["pred_boxes"][1:], one["pred_boxes"])


def test_overrides_reach_the_model():
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=7, num_queries=50,
                             num_decoder_layers=2, **{"decoder.num_points": 2})
    assert model.decoder.dec_score_head[0].out_features == 7
    assert len(model.decoder.decoder.layers) == 2
    assert model.decoder.decoder.layers[0].cross_attn.num_points == 2
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 128, 128))
    assert out["pred_logits"].shape == (1, 50, 7)


def test_hidden_dim_override_is_consistent():
    model = RTDETR.from_name("rtdetr_r18vd", hidden_dim=128, dim_feedforward=256)
    assert model.encoder.hidden_dim == 128 and model.decoder.hidden_dim == 128
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 128, 128))
        assert out["pred_boxes"].shape == (1, 300, 4)
        with pytest.raises(ValueError, match="fewer than num_queries=300"):
            model(torch.rand(1, 3, 96, 96))


@pytest.mark.parametrize("bad", [dict(nonsense=1), {"decoder.nope": 1}, dict(eval_idx=9)])
def test_bad_overrides_raise(bad):
    with pytest.raises(ValueError):
        RTDETR.from_name("rtdetr_r18vd", **bad)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset"):
        RTDETR.from_name("rtdetr_r9000")


def test_strict_load_round_trip(r18):
    other = RTDETR.from_name("rtdetr_r18vd").eval()
    other.load_state_dict(r18.state_dict(), strict=True)
    x = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        a, b = r18(x), other(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_deploy_folds_every_block_exactly_float32(r18):
    model = copy.deepcopy(r18)
    feats = model.backbone(torch.rand(1, 3, 320, 320))
    with torch.no_grad():
        before = model.encoder(feats)
        model.deploy()
        after = model.encoder(feats)
    assert all(m.deployed for m in model.modules() if isinstance(m, RepVggBlock))
    assert sum(isinstance(m, RepVggBlock) for m in model.modules()) == 12
    for a, b in zip(before, after):
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_deploy_whole_model_float64_and_idempotent():
    model = RTDETR.from_name("rtdetr_r18vd").double().eval()
    randomize_batch_norms(model)
    x = torch.rand(1, 3, 160, 224, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.deploy()
        sd = model.state_dict()
        model.deploy()
        after = model(x)
    assert sd.keys() == model.state_dict().keys()
    assert any(k.endswith("bottlenecks.0.conv.weight") for k in sd)
    assert not any("bottlenecks.0.conv1" in k for k in sd)
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(after[k], before[k], rtol=1e-9, atol=1e-9)


def test_deployed_model_saves_and_loads(tmp_path, r18):
    model = copy.deepcopy(r18).deploy()
    model.save_pretrained(tmp_path / "deployed")
    loaded = RTDETR.from_pretrained(tmp_path / "deployed").eval()
    assert loaded.deployed
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x)["pred_boxes"], loaded(x)["pred_boxes"])


def test_old_format_deployed_checkpoint_loads(tmp_path, r18):
    """A deployed model saved by an earlier version (RepConv folded, every batch norm kept)
    loads strictly and is deployed as today's."""
    from rtdetr_fast.model.encoder import RepVggBlock

    old = copy.deepcopy(r18).eval()
    for m in old.modules():
        if isinstance(m, RepVggBlock):
            m.fold()
    sd = old.state_dict()
    assert any(k.endswith("bottlenecks.0.conv.weight") for k in sd)
    assert any(k.endswith(".norm.running_var") for k in sd)
    torch.save(sd, tmp_path / "old_deployed.pth")
    loaded = RTDETR.from_pretrained(tmp_path / "old_deployed.pth").eval()
    assert loaded.deployed
    assert not any(k.endswith(".running_var") for k in loaded.state_dict())
    want = copy.deepcopy(old).deploy().state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_eval_layer_cut_equals_a_shallower_model(r18):
    """Cutting to k layers equals a k-layer model holding the first k layers' weights."""
    model = copy.deepcopy(r18).set_eval_layers(2)
    assert model.config.decoder.eval_idx == 1
    shallow = RTDETR.from_name("rtdetr_r18vd", num_decoder_layers=2).eval()
    sd = {k: v for k, v in r18.state_dict().items()
          if not any(f"{p}.2." in k for p in ("decoder.decoder.layers", "decoder.dec_score_head",
                                                "decoder.dec_bbox_head"))}
    shallow.load_state_dict(sd, strict=True)
    x = torch.rand(1, 3, 192, 192)
    with torch.no_grad():
        a, b, full = model(x), shallow(x), r18(x)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    assert not torch.allclose(a["pred_logits"], full["pred_logits"])
    with pytest.raises(ValueError):
        model.set_eval_layers(4)


def test_train_mode_returns_aux_outputs():
    model = RTDETR.from_name("rtdetr_r18vd").train()
    out = model(torch.rand(2, 3, 128, 128))
    assert len(out["aux_outputs"]) == 2
    assert out["enc_outputs"]["pred_logits"].shape == (2, 300, 80)
    out["pred_logits"].sum().backward()
    assert model.decoder.dec_score_head[2].weight.grad is not None


def test_sincos_embedding_layout():
    pe = sincos_position_embedding(3, 2, 8, 10000.0)
    assert pe.shape == (1, 6, 8)
    # row t belongs to x = t // h, y = t % h (the official meshgrid('ij') over (w, h))
    t = 5
    x, y = t // 2, t % 2
    omega = 1.0 / (10000.0 ** (torch.arange(2) / 2))
    want = torch.cat([torch.sin(x * omega), torch.cos(x * omega), torch.sin(y * omega),
                      torch.cos(y * omega)])
    torch.testing.assert_close(pe[0, t], want)


def test_anchors_values():
    model = RTDETR.from_name("rtdetr_r18vd")
    anchors, valid = model.decoder.generate_anchors([(2, 2), (1, 1)])
    assert anchors.shape == (1, 5, 4) and valid.shape == (1, 5, 1)
    first = torch.sigmoid(anchors[0, 0])
    torch.testing.assert_close(first, torch.tensor([0.25, 0.25, 0.05, 0.05]))
    # the 1x1 level's box centre is 0.5 with size 0.1; all inside (eps, 1-eps)
    torch.testing.assert_close(torch.sigmoid(anchors[0, 4]), torch.tensor([0.5, 0.5, 0.1, 0.1]))
    assert valid.all()
    a2, v2 = model.decoder.generate_anchors([(200, 200)])
    assert not v2.all() and torch.isinf(a2[~v2.expand_as(a2)]).all()


# ------------------------------------------------------------------------------ predict
def test_predict_mixed_inputs(tmp_path, r18):
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = (rng.random((90, 150, 3)) * 255).astype(np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    inputs = [tensor, arr, Image.fromarray(arr), str(path), torch.rand(3, 64, 40)]
    results = r18.predict(inputs, threshold=0.0, size=(160, 160))
    assert len(results) == 5
    for r in results[:4]:
        # the same pixels in four forms, batched together: the same detections; detections of
        # near-equal score (a random-weight model) may come in either order
        torch.testing.assert_close(r["scores"], results[0]["scores"])
        far = torch.cdist(r["boxes"], results[0]["boxes"], p=float("inf"))
        far = far + 1e9 * (r["labels"][:, None] != results[0]["labels"][None])
        assert far.min(1).values.max() <= 1e-3 and far.min(0).values.max() <= 1e-3
    for r in results:
        assert r["boxes"].shape == (300, 4) and r["labels"].dtype == torch.int64
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
    # boxes are in each image's own pixels: the normalised boxes scaled by (W, H)
    with torch.no_grad():
        x = torch.nn.functional.interpolate(tensor[None], size=(160, 160), mode="bilinear",
                                            align_corners=False, antialias=True)
        out = r18(x)
    cx, cy, w, h = out["pred_boxes"][0].unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    xyxy = xyxy * torch.tensor([150.0, 90.0, 150.0, 90.0])
    best = out["pred_logits"][0].sigmoid().flatten().argmax()
    torch.testing.assert_close(results[0]["boxes"][0], xyxy[best // 80], rtol=1e-4, atol=1e-3)
    assert results[0]["labels"][0] == best % 80
    assert r18.training is False


def test_predict_threshold_filters(r18):
    res = r18.predict(torch.rand(3, 64, 64), threshold=0.0, size=(128, 128))[0]
    cut = float(res["scores"][10])
    res2 = r18.predict(torch.rand(3, 64, 64), threshold=1.01, size=(128, 128))[0]
    assert res2["boxes"].shape == (0, 4)
    assert cut <= float(res["scores"][0])


@pytest.mark.parametrize("bad,err", [
    (torch.rand(1, 4, 64, 64), ValueError),
    (torch.rand(64, 64), ValueError),
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), TypeError),
    ([[1, 2, 3]], TypeError),
])
def test_bad_images_raise_clear_errors(bad, err, r18):
    with pytest.raises(err, match="image|\\[B, 3, H, W\\]"):
        r18(bad)


def test_predict_bad_inputs(r18, tmp_path):
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        r18.predict(torch.rand(4, 32, 32))
    with pytest.raises(FileNotFoundError):
        r18.predict(str(tmp_path / "missing.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        r18.predict(str(bad))
    with pytest.raises(TypeError):
        r18.predict(12)


def test_config_is_frozen_data():
    cfg = get_config("rtdetr_r50vd")
    with pytest.raises(Exception):
        cfg.num_classes = 3
    assert cfg.decoder.num_queries == 300 and cfg.encoder.in_channels == (512, 1024, 2048)
    assert get_config("rtdetr_r50vd_m").decoder.eval_idx == 2
