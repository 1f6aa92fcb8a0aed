"""RT-DETRv2 in the model: decoder options, their errors, the v2 layout against v1."""
import pytest
import torch

from rtdetr_fast import RTDETR, get_config

from conftest import randomize_batch_norms


def small(name="rtdetrv2_r18vd", **kw):
    base = dict(hidden_dim=64, dim_feedforward=128, num_queries=30, num_denoising=10,
                eval_spatial_size=(96, 128))
    base.update(kw)
    return RTDETR.from_name(name, num_classes=5, **base)


def test_per_level_points_reach_every_layer():
    model = small(**{"decoder.num_points": (3, 6, 3)})
    for layer in model.decoder.decoder.layers:
        attn = layer.cross_attn
        assert attn.num_points_list == [3, 6, 3]
        assert attn.sampling_offsets.out_features == 8 * 12 * 2
        assert attn.attention_weights.out_features == 8 * 12
        expect = torch.tensor([1 / 3] * 3 + [1 / 6] * 6 + [1 / 3] * 3)
        assert torch.equal(attn.num_points_scale, expect)
    assert "decoder.decoder.layers.0.cross_attn.num_points_scale" in model.state_dict()
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 96, 128))
    assert out["pred_boxes"].shape == (1, 30, 4) and torch.isfinite(out["pred_logits"]).all()


def test_an_int_and_equal_per_level_counts_are_the_same_model():
    a = small(num_points=2)
    torch.manual_seed(0)
    b = small(**{"decoder.num_points": (2, 2, 2)})
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        oa, ob = a.eval()(x), b.eval()(x)
    assert torch.equal(oa["pred_logits"], ob["pred_logits"])
    assert torch.equal(oa["pred_boxes"], ob["pred_boxes"])


def test_discrete_freezes_the_sampling_offsets_only():
    model = small(**{"decoder.cross_attn_method": "discrete"})
    for layer in model.decoder.decoder.layers:
        assert not any(p.requires_grad for p in layer.cross_attn.sampling_offsets.parameters())
        assert layer.cross_attn.attention_weights.weight.requires_grad
    default = small()
    assert all(p.requires_grad for p in
               default.decoder.decoder.layers[0].cross_attn.sampling_offsets.parameters())


def test_agnostic_query_selection_scores_one_class():
    model = small(**{"decoder.query_select_method": "agnostic"})
    assert model.decoder.enc_score_head.out_features == 1
    assert model.decoder.dec_score_head[0].out_features == 5
    model.reset_classes(3)
    assert model.decoder.enc_score_head.out_features == 1
    assert model.decoder.dec_score_head[0].out_features == 3
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 96, 128))
    assert out["pred_logits"].shape == (1, 30, 3)


@pytest.mark.parametrize("override, words", [
    ({"decoder.num_points": (3, 6)}, "one count per level (3 levels), got (3, 6)"),
    ({"decoder.num_points": (3, 0, 3)}, "must be positive"),
    ({"decoder.num_points": "4"}, "expected an int or one int per level"),
    ({"cross_attn_method": "bilinear"}, "one of default, discrete, got 'bilinear'"),
    ({"query_select_method": "one2many"}, "one of default, agnostic, got 'one2many'"),
    ({"version": "v3"}, "version must be one of v1, v2"),
])
def test_bad_decoder_options_are_one_line_errors(override, words):
    with pytest.raises(ValueError) as err:
        get_config("rtdetrv2_r18vd", **override)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_v1_and_v2_with_four_points_agree_on_the_same_weights():
    """v2 changes names and the offset arithmetic's form (a per-point 1/P buffer), not the
    function: the same weights give the same outputs in float64."""
    kw = dict(hidden_dim=64, dim_feedforward=128, num_queries=30, eval_spatial_size=(96, 128))
    v1 = RTDETR.from_name("rtdetr_r18vd", num_classes=5, **kw).double().eval()
    randomize_batch_norms(v1)
    v2 = RTDETR.from_name("rtdetrv2_r18vd", num_classes=5, **kw).double().eval()
    sd = {}
    for k, v in v1.state_dict().items():
        k = k.replace("decoder.enc_output.0.", "decoder.enc_output.proj.")
        k = k.replace("decoder.enc_output.1.", "decoder.enc_output.norm.")
        for i in range(3):
            k = k.replace(f"encoder.input_proj.{i}.0.", f"encoder.input_proj.{i}.conv.")
            k = k.replace(f"encoder.input_proj.{i}.1.", f"encoder.input_proj.{i}.norm.")
        sd[k] = v
    missing, unexpected = v2.load_state_dict(sd, strict=False)
    assert unexpected == [] and all("num_points_scale" in k for k in missing)
    x = torch.rand(2, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        a, b = v1(x), v2(x)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=1e-12, atol=1e-12)


def test_anchor_buffers_follow_the_models_own_size():
    """The anchors in a v2 state dict are derived data: a file made at 640x640 loads into a
    model evaluated at another size, which keeps its own."""
    at640 = small(eval_spatial_size=(640, 640))
    at_other = small(eval_spatial_size=(96, 128))
    assert at640.state_dict()["decoder.anchors"].shape == (1, 8400, 4)
    own = at_other.decoder.anchors.clone()
    at_other.load_state_dict(at640.state_dict(), strict=True)
    assert torch.equal(at_other.decoder.anchors, own)
    assert at_other.decoder.anchors.shape == (1, 12 * 16 + 6 * 8 + 3 * 4, 4)
    sd = at640.state_dict()
    del sd["decoder.anchors"], sd["decoder.valid_mask"]
    at_other.load_state_dict(sd, strict=True)


def test_v2_trains_with_per_level_points_discrete_and_agnostic():
    torch.manual_seed(0)
    model = small(**{"decoder.num_points": (3, 6, 3), "query_select_method": "agnostic"}).train()
    images = torch.rand(2, 3, 96, 128)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    out = model(images, targets)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    attn = model.decoder.decoder.layers[0].cross_attn
    assert attn.sampling_offsets.weight.grad is not None
    assert model.decoder.enc_score_head.weight.grad is not None
