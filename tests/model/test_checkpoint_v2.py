"""Loading RT-DETRv2: official v2 .pth files (the v2 key lists' layout), preset and decoder
options inferred from the weights, clear errors."""
import pytest
import torch

from rtdetr_fast import RTDETR
from rtdetr_fast.model.checkpoint import CheckpointError, infer_preset

from conftest import randomize_batch_norms

X = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
SMALL = dict(hidden_dim=64, dim_feedforward=128, num_queries=50, eval_spatial_size=(160, 160))


def _same_outputs(a, b):
    with torch.no_grad():
        oa, ob = a.eval()(X), b.eval()(X)
    return all(torch.equal(oa[k], ob[k]) for k in ("pred_logits", "pred_boxes"))


@pytest.mark.parametrize("name", ["rtdetrv2_r18vd", "rtdetrv2_r34vd", "rtdetrv2_r50vd_m",
                                  "rtdetrv2_r50vd", "rtdetrv2_r101vd"])
def test_infer_v2_preset_from_every_layout(name):
    sd = RTDETR.from_name(name, num_classes=91).state_dict()
    assert infer_preset(sd) == (name, 91, {})


def test_infer_v2_decoder_options_from_the_weights():
    sd = RTDETR.from_name("rtdetrv2_r18vd", **{"decoder.num_points": (3, 6, 3),
                                               "query_select_method": "agnostic"}).state_dict()
    assert infer_preset(sd) == ("rtdetrv2_r18vd", 80, {"decoder.num_points": (3, 6, 3),
                                                       "decoder.query_select_method": "agnostic"})
    sd = RTDETR.from_name("rtdetrv2_r50vd", num_points=2).state_dict()
    assert infer_preset(sd) == ("rtdetrv2_r50vd", 80, {"decoder.num_points": 2})


def test_official_v2_pth_loads_with_its_values(tmp_path):
    src = RTDETR.from_name("rtdetrv2_r18vd", **SMALL, **{"decoder.num_points": (3, 6, 3)}).eval()
    randomize_batch_norms(src)
    path = tmp_path / "rtdetrv2_r18vd_120e_coco.pth"
    torch.save({"ema": {"module": src.state_dict(), "updates": 3}, "last_epoch": 119}, path)
    # the query count and the input size leave no trace in the weights
    model = RTDETR.from_pretrained(path, num_queries=50, eval_spatial_size=(160, 160))
    assert model.config.name == "rtdetrv2_r18vd"
    assert model.config.decoder.num_points == (3, 6, 3)
    assert _same_outputs(model, src)


def test_discrete_checkpoint_needs_the_method_named(tmp_path):
    src = RTDETR.from_name("rtdetrv2_r18vd", **SMALL, cross_attn_method="discrete").eval()
    path = tmp_path / "rtdetrv2_r18vd_dsp_3x_coco.pth"
    torch.save({"model": src.state_dict()}, path)
    model = RTDETR.from_pretrained(path, cross_attn_method="discrete", num_queries=50,
                                   eval_spatial_size=(160, 160))
    assert model.config.decoder.cross_attn_method == "discrete"
    assert _same_outputs(model, src)


def test_v2_file_at_640_loads_into_another_eval_size(tmp_path):
    """An official file holds anchors for 640x640; a model evaluated at 160x160 loads it and
    keeps anchors for its own size."""
    src = RTDETR.from_name("rtdetrv2_r18vd", hidden_dim=64, dim_feedforward=128, num_queries=50)
    assert src.state_dict()["decoder.anchors"].shape == (1, 8400, 4)
    path = tmp_path / "v2.pth"
    torch.save({"model": src.state_dict()}, path)
    model = RTDETR.from_pretrained(path, num_queries=50, eval_spatial_size=(160, 160))
    assert model.decoder.anchors.shape == (1, 20 * 20 + 10 * 10 + 5 * 5, 4)
    with torch.no_grad():
        assert model.eval()(X)["pred_boxes"].shape == (1, 50, 4)


def test_v1_v2_mismatches_are_checkpoint_errors(tmp_path):
    v2 = RTDETR.from_name("rtdetrv2_r18vd")
    path = tmp_path / "v2.pth"
    torch.save({"model": v2.state_dict()}, path)
    with pytest.raises(CheckpointError, match="holds a rtdetrv2_r18vd checkpoint, not rtdetr_r18vd"):
        RTDETR.from_pretrained(path, name="rtdetr_r18vd")
    v1 = RTDETR.from_name("rtdetr_r18vd")
    with pytest.raises(CheckpointError) as err:
        from rtdetr_fast.model.checkpoint import load_state_dict_strict
        load_state_dict_strict(v1, v2.state_dict(), "'v2.pth'")
    msg = str(err.value)
    assert "missing keys" in msg and "encoder.input_proj.0.0.weight" in msg
    assert "unexpected keys" in msg and "encoder.input_proj.0.conv.weight" in msg


def test_v2_shape_mismatch_is_reported(tmp_path):
    sd = RTDETR.from_name("rtdetrv2_r18vd", num_points=3).state_dict()
    model = RTDETR.from_name("rtdetrv2_r18vd")
    from rtdetr_fast.model.checkpoint import load_state_dict_strict
    with pytest.raises(CheckpointError, match=r"cross_attn.sampling_offsets.weight: checkpoint "
                                              r"\(144, 256\) vs model \(192, 256\)"):
        load_state_dict_strict(model, sd, "'x.pth'")
