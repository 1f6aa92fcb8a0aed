"""Transformers RT-DETR folders, from the layouts transformers itself wrote (tests/data/transformers:
every tensor of model.safetensors with its shape and dtype, and config.json). A folder with exactly
those tensors must load strictly into the matching preset, and every tensor must land somewhere:
this checks the key mapping against the real files, not against a second copy of itself."""
import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import save_file

import rtdetr_fast
from rtdetr_fast.model.hf_mapping import hf_to_official, preset_from_hf_config

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
LAYOUTS = DATA / "transformers"
KEYS = DATA / "checkpoint_keys"
V1 = {"r18": ("rtdetr_r18vd", "v1_r18.txt"), "r34": ("rtdetr_r34vd", "v1_r34.txt"),
      "r50": ("rtdetr_r50vd", "v1_r50.txt"), "r101": ("rtdetr_r101vd", "v1_r101.txt")}
V2 = {"r18": ("rtdetrv2_r18vd", "v2_r18.txt"), "r34": ("rtdetrv2_r34vd", "v2_r34.txt"),
      "r50": ("rtdetrv2_r50vd", "v2_r50.txt"), "r101": ("rtdetrv2_r101vd", "v2_r101.txt")}
# official v2 buffers transformers does not save (made from the eval size)
DERIVED_V2 = ("decoder.anchors", "decoder.valid_mask")
DTYPES = {"F32": torch.float32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_layout(path):
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, rest = line.split(" ", 1)
        shape_txt, dtype_txt = rest.rsplit(" ", 1)
        shape = tuple(int(x) for x in shape_txt.strip("()").split(",") if x.strip())
        out[name] = (shape, DTYPES[dtype_txt])
    return out


def _official_keys(name):
    return [ln.split(" ", 1)[0] for ln in (KEYS / name).read_text().splitlines() if ln.strip()]


def _hf_folder(tmp_path, arch, version="v1"):
    """A folder shaped exactly like transformers' save_pretrained output, distinct values."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (shape, dtype) in _read_layout(LAYOUTS / f"hf_{version}_{arch}.txt").items():
        if dtype.is_floating_point:
            t = torch.rand(shape, generator=g, dtype=torch.float32).to(dtype)
            if name.endswith("running_var"):
                t = t + 0.5
        else:
            t = torch.randint(0, 100, shape, generator=g).to(dtype)
        tensors[name] = t
    folder = tmp_path / f"hf_{version}_{arch}"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    shutil.copy(LAYOUTS / f"hf_{version}_{arch}.config.json", folder / "config.json")
    return folder, tensors


# The recorded r50 folder is transformers' default configuration, whose backbone hands only its
# last stage to the encoder (out_features ["stage4"]): one input projection of 2048 channels, a
# layout no official preset has. It must be refused clearly, not half-loaded.
EXACT = ["r18", "r34", "r101"]


@pytest.mark.parametrize("arch", EXACT)
def test_recorded_v1_layout_maps_onto_every_official_key(arch):
    preset, key_file = V1[arch]
    layout = _read_layout(LAYOUTS / f"hf_v1_{arch}.txt")
    fake = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in layout.items()}
    mapped = hf_to_official(fake)
    official = _official_keys(key_file)
    # the official lists carry num_batches_tracked counters that transformers does not save for
    # frozen backbone norms; everything else must correspond one to one
    missing = [k for k in official if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in set(official)]
    assert not missing, missing[:10]
    assert not unexpected, unexpected[:10]
    cfg = json.loads((LAYOUTS / f"hf_v1_{arch}.config.json").read_text())
    assert preset_from_hf_config(cfg)[0] == preset


def test_recorded_single_level_r50_folder_is_a_clear_checkpoint_error(tmp_path):
    from rtdetr_fast.model.checkpoint import CheckpointError

    folder, _ = _hf_folder(tmp_path, "r50")
    with pytest.raises(CheckpointError) as err:
        rtdetr_fast.RTDETR.from_pretrained(str(folder))
    msg = str(err.value)
    assert "rtdetr_r50vd" in msg and "encoder.input_proj.1.0.weight" in msg
    assert "encoder.input_proj.0.0.weight: checkpoint (256, 2048, 1, 1)" in msg


@pytest.mark.parametrize("arch", ["r18", "r34"])
def test_recorded_v1_folder_loads_strictly_with_its_values(tmp_path, arch):
    preset, key_file = V1[arch]
    folder, tensors = _hf_folder(tmp_path, arch)
    model = rtdetr_fast.RTDETR.from_pretrained(str(folder))
    sd = model.state_dict()
    assert list(sd) == _official_keys(key_file)
    assert model.config.num_classes == 80
    # a value travels: the stem conv and the last decoder layer's class head
    stem = next(k for k in tensors if k.endswith("embedder.embedder.0.convolution.weight"))
    assert torch.equal(sd["backbone.conv1.conv1_1.conv.weight"], tensors[stem])
    n_dec = json.loads((folder / "config.json").read_text())["decoder_layers"]
    head = f"model.decoder.class_embed.{n_dec - 1}.weight"
    head = head if head in tensors else f"class_embed.{n_dec - 1}.weight"
    assert torch.equal(sd[f"decoder.dec_score_head.{n_dec - 1}.weight"], tensors[head])


@pytest.mark.parametrize("arch", EXACT)
def test_recorded_v2_layout_maps_onto_every_official_v2_key(arch):
    preset, key_file = V2[arch]
    layout = _read_layout(LAYOUTS / f"hf_v2_{arch}.txt")
    fake = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in layout.items()}
    mapped = hf_to_official(fake, "v2")
    official = _official_keys(key_file)
    missing = [k for k in official if k not in mapped
               and not k.endswith("num_batches_tracked") and k not in DERIVED_V2]
    unexpected = [k for k in mapped if k not in set(official)]
    assert not missing, missing[:10]
    assert not unexpected, unexpected[:10]
    assert "decoder.decoder.layers.0.cross_attn.num_points_scale" in mapped
    cfg = json.loads((LAYOUTS / f"hf_v2_{arch}.config.json").read_text())
    assert preset_from_hf_config(cfg) == (preset, 80, {})


def test_recorded_v2_folder_labelled_v1_is_a_clear_checkpoint_error(tmp_path):
    from rtdetr_fast.model.checkpoint import CheckpointError

    folder, _ = _hf_folder(tmp_path, "r18", "v2")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "rt_detr"}))
    with pytest.raises(CheckpointError) as err:
        rtdetr_fast.RTDETR.from_pretrained(str(folder))
    msg = str(err.value)
    assert "rtdetr_r18vd" in msg and "unexpected keys (3)" in msg
    assert "decoder.decoder.layers.0.cross_attn.n_points_scale" in msg


@pytest.mark.parametrize("arch", ["r18", "r34"])
def test_recorded_v2_folder_loads_strictly_with_its_values(tmp_path, arch):
    preset, key_file = V2[arch]
    folder, tensors = _hf_folder(tmp_path, arch, "v2")
    model = rtdetr_fast.RTDETR.from_pretrained(str(folder))
    assert model.config.name == preset and model.config.num_classes == 80
    sd = model.state_dict()
    assert list(sd) == _official_keys(key_file)
    stem = next(k for k in tensors if k.endswith("embedder.embedder.0.convolution.weight"))
    assert torch.equal(sd["backbone.conv1.conv1_1.conv.weight"], tensors[stem])
    for ours, theirs in [("encoder.input_proj.2.conv.weight", "model.encoder_input_proj.2.0.weight"),
                         ("encoder.input_proj.2.norm.running_var",
                          "model.encoder_input_proj.2.1.running_var"),
                         ("decoder.enc_output.proj.weight", "model.enc_output.0.weight"),
                         ("decoder.enc_output.norm.bias", "model.enc_output.1.bias"),
                         ("decoder.decoder.layers.1.cross_attn.num_points_scale",
                          "model.decoder.layers.1.encoder_attn.n_points_scale")]:
        assert torch.equal(sd[ours], tensors[theirs]), ours


def test_recorded_single_level_r50_v2_folder_is_a_clear_checkpoint_error(tmp_path):
    from rtdetr_fast.model.checkpoint import CheckpointError

    folder, _ = _hf_folder(tmp_path, "r50", "v2")
    with pytest.raises(CheckpointError) as err:
        rtdetr_fast.RTDETR.from_pretrained(str(folder))
    msg = str(err.value)
    assert "rtdetrv2_r50vd" in msg and "encoder.input_proj.1.conv.weight" in msg
    assert "encoder.input_proj.0.conv.weight: checkpoint (256, 2048, 1, 1)" in msg


def test_v2_config_decoder_fields_become_overrides():
    cfg = json.loads((LAYOUTS / "hf_v2_r18.config.json").read_text())
    cfg.update(decoder_n_points=[3, 6, 3], decoder_method="discrete", decoder_offset_scale=0.25)
    assert preset_from_hf_config(cfg) == ("rtdetrv2_r18vd", 80, {
        "decoder.num_points": (3, 6, 3), "decoder.cross_attn_method": "discrete",
        "decoder.offset_scale": 0.25})
    from rtdetr_fast.model.hf_mapping import hf_config_for

    assert preset_from_hf_config(hf_config_for("rtdetrv2_r50vd_m", 80)) == (
        "rtdetrv2_r50vd_m", 80, {})
    assert hf_config_for("rtdetrv2_r50vd", 3)["model_type"] == "rt_detr_v2"
