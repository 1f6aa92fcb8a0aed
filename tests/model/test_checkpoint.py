"""Checkpoint loading: official .pth layouts, our folders, fine-tuning, bad files."""
import copy

import pytest
import torch

from rtdetr_fast import RTDETR
from rtdetr_fast.model.checkpoint import CheckpointError, infer_preset

X = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))


def _same_outputs(a, b):
    with torch.no_grad():
        oa, ob = a.eval()(X), b.eval()(X)
    return all(torch.equal(oa[k], ob[k]) for k in ("pred_logits", "pred_boxes"))


def test_official_pth_prefers_ema(tmp_path, r18):
    decoy = RTDETR.from_name("rtdetr_r18vd").state_dict()
    path = tmp_path / "rtdetr_r18vd_dec3_6x_coco.pth"
    torch.save({"ema": {"module": r18.state_dict(), "updates": 5}, "model": decoy,
                "last_epoch": 71}, path)
    model = RTDETR.from_pretrained(path)
    assert model.config.name == "rtdetr_r18vd" and model.num_classes == 80
    assert _same_outputs(model, r18)


def test_official_pth_model_key_and_ddp_prefix(tmp_path, r18):
    path = tmp_path / "m.pth"
    torch.save({"model": {"module." + k: v for k, v in r18.state_dict().items()}}, path)
    assert _same_outputs(RTDETR.from_pretrained(path), r18)


@pytest.mark.parametrize("name", ["rtdetr_r34vd", "rtdetr_r50vd_m", "rtdetr_r50vd",
                                  "rtdetr_r101vd"])
def test_infer_preset_from_every_layout(name):
    sd = RTDETR.from_name(name, num_classes=91).state_dict()
    assert infer_preset(sd) == (name, 91, {})


def test_infer_preset_reports_changed_hyperparameters():
    sd = RTDETR.from_name("rtdetr_r18vd", num_classes=3, num_decoder_layers=2).state_dict()
    name, n, overrides = infer_preset(sd)
    assert (name, n) == ("rtdetr_r18vd", 3)
    assert overrides["decoder.num_decoder_layers"] == 2


def test_finetune_num_classes_reinitialises_class_heads_only(tmp_path, r18):
    path = tmp_path / "m.pth"
    torch.save({"model": r18.state_dict()}, path)
    model = RTDETR.from_pretrained(path, num_classes=5)
    assert model.num_classes == 5
    assert model.decoder.enc_score_head.out_features == 5
    assert all(h.out_features == 5 for h in model.decoder.dec_score_head)
    assert model.decoder.denoising_class_embed.num_embeddings == 6
    ref = r18.state_dict()
    for k, v in model.state_dict().items():
        if "score_head" in k or "denoising_class_embed" in k:
            assert v.shape[0] in (5, 6)
        else:
            assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        assert model.eval()(X)["pred_logits"].shape == (1, 300, 5)


def test_save_pretrained_round_trip_keeps_config(tmp_path):
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=4, num_queries=120).eval()
    model.save_pretrained(tmp_path / "out")
    loaded = RTDETR.from_pretrained(tmp_path / "out")
    assert loaded.config == model.config
    assert _same_outputs(model, loaded)
    assert not list(tmp_path.joinpath("out").glob("*.tmp"))


def test_checkpoint_of_another_preset_lists_keys(r18):
    r34 = RTDETR.from_name("rtdetr_r34vd")
    with pytest.raises(RuntimeError, match="Missing key"):
        r34.load_state_dict(r18.state_dict())
    from rtdetr_fast.model.checkpoint import load_state_dict_strict

    with pytest.raises(CheckpointError, match="missing keys") as info:
        load_state_dict_strict(r34, r18.state_dict(), "r18.pth")
    assert "backbone.res_layers.0.blocks.2" in str(info.value)


def test_asserted_preset_mismatch(tmp_path, r18):
    path = tmp_path / "m.pth"
    torch.save({"model": r18.state_dict()}, path)
    with pytest.raises(CheckpointError, match="rtdetr_r18vd checkpoint, not rtdetr_r50vd"):
        RTDETR.from_pretrained(path, name="rtdetr_r50vd")


def test_shape_mismatch_is_reported(tmp_path, r18):
    sd = copy.deepcopy(r18.state_dict())
    sd["decoder.enc_output.0.weight"] = torch.zeros(256, 128)
    path = tmp_path / "m.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="shape mismatches.*enc_output.0.weight"):
        RTDETR.from_pretrained(path)


def test_missing_key_is_reported(tmp_path, r18):
    sd = dict(r18.state_dict())
    del sd["decoder.query_pos_head.layers.0.bias"]
    path = tmp_path / "m.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="missing keys \\(1\\).*query_pos_head"):
        RTDETR.from_pretrained(path)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        RTDETR.from_pretrained(bad)
    with pytest.raises(FileNotFoundError):
        RTDETR.from_pretrained(tmp_path / "nope.pth")
    empty = tmp_path / "dir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        RTDETR.from_pretrained(empty)
    other = tmp_path / "other.pth"
    torch.save({"optimizer": {"lr": 1.0}}, other)
    with pytest.raises(CheckpointError, match="no model weights"):
        RTDETR.from_pretrained(other)


def test_truncated_file(tmp_path, r18):
    path = tmp_path / "m.pth"
    torch.save({"model": r18.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        RTDETR.from_pretrained(path)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_transformers_folder(tmp_path, r18, tied):
    """A folder laid out like a transformers RT-DETR checkpoint loads to the same model."""
    import json

    from safetensors.torch import save_file

    from rtdetr_fast.model.hf_mapping import hf_config_for, official_to_hf

    folder = tmp_path / "hf"
    folder.mkdir()
    hf_sd = official_to_hf(r18.state_dict(), tied_heads=tied)
    assert "model.decoder.layers.0.self_attn.q_proj.weight" in hf_sd
    save_file({k: v.clone().contiguous() for k, v in hf_sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config_for("rtdetr_r18vd", 80)))
    model = RTDETR.from_pretrained(folder)
    assert model.config.name == "rtdetr_r18vd" and model.num_classes == 80
    assert _same_outputs(model, r18)


def test_hf_folder_with_unknown_keys_fails_clearly(tmp_path, r18):
    import json

    from safetensors.torch import save_file

    from rtdetr_fast.model.hf_mapping import hf_config_for, official_to_hf

    hf_sd = official_to_hf(r18.state_dict())
    hf_sd["model.something_new.weight"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_for("rtdetr_r18vd", 80)))
    with pytest.raises(ValueError, match="model.something_new.weight"):
        RTDETR.from_pretrained(tmp_path)


def test_transformers_model_loads_when_installed(tmp_path, r18):
    transformers = pytest.importorskip("transformers")
    from rtdetr_fast.model.hf_mapping import hf_config_for, official_to_hf

    cfg = transformers.RTDetrConfig(**{k: v for k, v in hf_config_for("rtdetr_r18vd", 80).items()
                                       if k != "model_type"})
    hf = transformers.RTDetrForObjectDetection(cfg)
    hf.load_state_dict(official_to_hf(r18.state_dict()), strict=False)
    hf.save_pretrained(tmp_path)
    model = RTDETR.from_pretrained(tmp_path)
    assert _same_outputs(model, r18)
