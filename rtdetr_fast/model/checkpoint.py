"""Loading and saving checkpoints: official RT-DETR ``.pth`` files, Hugging Face transformers
RT-DETR folders, and our own ``save_pretrained`` folders."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, Optional, Tuple

import torch

from ..config import PRESETS, get_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# layers whose shapes depend on the number of classes
CLASS_KEYS = re.compile(r"^decoder\.(enc_score_head|dec_score_head\.\d+|denoising_class_embed)\.")
DEPLOYED_KEY = re.compile(r"\.bottlenecks\.\d+\.conv\.weight$")
# v2 buffers made from the model's eval size: optional in a file, and never a shape mismatch
DERIVED_KEYS = ("decoder.anchors", "decoder.valid_mask")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# --------------------------------------------------------------------------------- reading
def read_official(path: str, map_location="cpu") -> Dict[str, torch.Tensor]:
    """The model state dict of an official ``.pth``: ``ckpt["ema"]["module"]``, else
    ``ckpt["model"]``, else the file itself when it is a plain state dict."""
    return read_checkpoint(path, map_location)[0]


def read_checkpoint(path: str, map_location="cpu") -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(state dict, the model config saved with it or None) of a ``.pth``: the official layout,
    or one written by our trainer (``last.pth``, ``best.pth``), which adds ``model_config``."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path!r}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, not a dict")
    if isinstance(ckpt.get("ema"), dict) and isinstance(ckpt["ema"].get("module"), dict):
        sd = ckpt["ema"]["module"]
    elif isinstance(ckpt.get("model"), dict):
        sd = ckpt["model"]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt
    else:
        raise CheckpointError(f"checkpoint {path!r} has no model weights: expected "
                              f"ckpt['ema']['module'] or ckpt['model'], found keys "
                              f"{sorted(ckpt)[:10]}")
    # checkpoints saved from DistributedDataParallel prefix every key
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    model_config = ckpt.get("model_config")
    return dict(sd), model_config if isinstance(model_config, dict) else None


def _read_folder(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    cfg_path = os.path.join(path, CONFIG_NAME)
    weights = os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, weights):
        if not os.path.isfile(p):
            raise CheckpointError(f"{path!r} is not a checkpoint folder: {os.path.basename(p)} "
                                  "is missing")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        from safetensors.torch import load_file

        sd = load_file(weights)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint folder {path!r}: {type(exc).__name__}: "
                              f"{exc}") from exc
    return sd, cfg


# --------------------------------------------------------------------------------- inference
def infer_preset(sd: Dict[str, torch.Tensor]) -> Tuple[str, int, dict]:
    """(preset name, num_classes, overrides) of an official-layout state dict, v1 or v2 (the v2
    layout has ``encoder.input_proj.N.conv``; its per-level point counts are read from the
    ``num_points_scale`` buffers), with a ResNet-vd or an HGNetv2 backbone (``backbone.stem.``).
    The discrete sampling mode leaves no trace in the weights: load a ``*_dsp_*`` checkpoint
    with ``cross_attn_method="discrete"``."""
    v2 = "encoder.input_proj.0.conv.weight" in sd
    prefix = "rtdetrv2_" if v2 else "rtdetr_"
    try:
        hidden = sd[f"encoder.input_proj.0.{'conv' if v2 else '0'}.weight"].shape[0]
        enc_classes = sd["decoder.enc_score_head.weight"].shape[0]
        num_classes = sd.get("decoder.dec_score_head.0.weight",
                             sd["decoder.enc_score_head.weight"]).shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not an RT-DETR state dict: key {exc.args[0]!r} is missing") from exc
    fpn_hidden = _first_shape(sd, "encoder.fpn_blocks.0.conv1.conv.weight", 0)
    expansion = fpn_hidden / hidden if fpn_hidden else 1.0
    n_dec = len({k.split(".")[2] for k in sd if k.startswith("decoder.dec_score_head.")})
    overrides = {}
    if "backbone.stem.stem1.conv.weight" in sd:
        name = _infer_hgnetv2(sd, prefix, hidden, overrides)
    else:
        name = _infer_presnet(sd, prefix, expansion, overrides)
    preset = PRESETS[name]
    n_enc = len({k.split(".")[4] for k in sd if k.startswith("encoder.encoder.0.layers.")})
    derived = {
        "encoder.hidden_dim": hidden,
        "encoder.expansion": expansion,
        "encoder.dim_feedforward": _first_shape(sd, "encoder.encoder.0.layers.0.linear1.weight", 0),
        "encoder.num_encoder_layers": n_enc or None,
        "encoder.in_channels": tuple(
            sd[f"encoder.input_proj.{i}.{'conv' if v2 else '0'}.weight"].shape[1]
            for i in range(len(preset.encoder.in_channels))
            if f"encoder.input_proj.{i}.{'conv' if v2 else '0'}.weight" in sd) or None,
        "decoder.hidden_dim": _first_shape(
            sd, f"decoder.enc_output.{'proj' if v2 else '0'}.weight", 0),
        "decoder.dim_feedforward": _first_shape(sd, "decoder.decoder.layers.0.linear1.weight", 0),
        "decoder.num_decoder_layers": n_dec,
        "decoder.num_denoising": (preset.decoder.num_denoising
                                  if "decoder.denoising_class_embed.weight" in sd else 0),
        "decoder.learnt_init_query": "decoder.tgt_embed.weight" in sd,
    }
    if "decoder.tgt_embed.weight" in sd:
        derived["decoder.num_queries"] = sd["decoder.tgt_embed.weight"].shape[0]
    if enc_classes == 1 and num_classes > 1:
        derived["decoder.query_select_method"] = "agnostic"
    points = _points_per_level(sd, preset)
    if points is not None:
        derived["decoder.num_points"] = points
    for key, value in derived.items():
        section, field = key.split(".")
        if value is not None and getattr(getattr(preset, section), field) != value:
            overrides[key] = value
    if "decoder.num_decoder_layers" in overrides:
        overrides["decoder.eval_idx"] = -1
    return name, num_classes, overrides


def _infer_presnet(sd, prefix, expansion, overrides) -> str:
    stages = {}
    for k in sd:
        m = re.match(r"backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            stages[i] = max(stages.get(i, 0), j + 1)
    counts = tuple(stages[i] for i in sorted(stages))
    bottleneck = any(".branch2c." in k for k in sd)
    depth = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
             ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}.get((counts, bottleneck))
    if depth is None:
        raise CheckpointError(f"unrecognised backbone: blocks per stage {counts}, "
                              f"{'bottleneck' if bottleneck else 'basic'} blocks")
    candidates = [n for n, c in PRESETS.items() if c.backbone.name == "presnet"
                  and c.backbone.depth == depth and n.startswith(prefix)] or [prefix + "r50vd"]
    name = min(candidates, key=lambda n: abs(PRESETS[n].encoder.expansion - expansion))
    if depth != PRESETS[name].backbone.depth:
        overrides["backbone.depth"] = depth
    return name


def _infer_hgnetv2(sd, prefix, hidden, overrides) -> str:
    """The HGNetv2 variant from the stem's widths and each stage's blocks, layers per block and
    output channels; the preset of that variant (else the nearest in encoder width, its
    variant overridden)."""
    from .backbones import hgnetv2

    def count(pattern):
        found = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
        return max(found) + 1 if found else 0

    stages = []
    for i in range(count(r"backbone\.stages\.(\d+)\.")):
        out = _first_shape(sd, f"backbone.stages.{i}.blocks.0.aggregation_excitation_conv."
                               "conv.weight", 0)
        stages.append((count(rf"backbone\.stages\.{i}\.blocks\.(\d+)\."),
                       count(rf"backbone\.stages\.{i}\.blocks\.0\.layers\.(\d+)\."), out))
    found = (_first_shape(sd, "backbone.stem.stem1.conv.weight", 0),
             _first_shape(sd, "backbone.stem.stem4.conv.weight", 0), tuple(stages))
    variant = next((v for v, (stem, specs) in hgnetv2.ARCHS.items()
                    if found == (stem[1], stem[2], tuple((s.num_blocks, s.num_layers,
                                                          s.out_channels) for s in specs))),
                   None)
    if variant is None:
        raise CheckpointError(f"unrecognised HGNetv2 backbone: stem widths {found[:2]}, "
                              f"(blocks, layers, channels) per stage {list(found[2])}")
    candidates = [n for n, c in PRESETS.items()
                  if c.backbone.name == "hgnetv2" and n.startswith(prefix)]
    same = [n for n in candidates
            if hgnetv2.ALIASES.get(PRESETS[n].backbone.variant, PRESETS[n].backbone.variant)
            == variant]
    name = (same or sorted(candidates, key=lambda n: abs(PRESETS[n].encoder.hidden_dim
                                                         - hidden)))[0]
    bb = PRESETS[name].backbone
    if hgnetv2.ALIASES.get(bb.variant, bb.variant) != variant:
        overrides["backbone.variant"] = variant
    use_lab = any(k.startswith("backbone.") and ".lab." in k for k in sd)
    if use_lab != bb.use_lab:
        overrides["backbone.use_lab"] = use_lab
    return name


def _first_shape(sd, key, dim):
    return sd[key].shape[dim] if key in sd else None


def _points_per_level(sd, preset):
    """The sampling points per level: from v2's ``num_points_scale`` (1/P_l repeated P_l
    times), else from the size of the first layer's attention weights (H * L * P)."""
    scale = sd.get("decoder.decoder.layers.0.cross_attn.num_points_scale")
    if scale is not None:
        counts, i = [], 0
        while i < scale.numel():
            n = int(round(1.0 / float(scale[i])))
            if n < 1:
                raise CheckpointError(f"num_points_scale holds {float(scale[i])}, not 1/P")
            counts.append(n)
            i += n
        counts = tuple(counts)
        return counts[0] if len(set(counts)) == 1 else counts
    weights = sd.get("decoder.decoder.layers.0.cross_attn.attention_weights.weight")
    if weights is None:
        return None
    dec = preset.decoder
    per_level, rest = divmod(weights.shape[0], dec.nhead * dec.num_levels)
    return per_level if not rest else None


# --------------------------------------------------------------------------------- loading
def load_state_dict_strict(model: torch.nn.Module, sd: Dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one clear error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    sd = dict(sd)
    for k in DERIVED_KEYS:
        if k in own:
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mis = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mis:
        def show(title, items):
            if not items:
                return ""
            more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:10]) + more

        raise CheckpointError(f"checkpoint {source} does not fit {model.config.name} "
                              f"(num_classes={model.config.num_classes})"
                              + show("missing keys", missing) + show("unexpected keys", unexpected)
                              + show("shape mismatches", mis))
    model.load_state_dict(sd, strict=True)


def load_pretrained(cls, path, num_classes: Optional[int] = None, name: Optional[str] = None,
                    map_location="cpu", **overrides):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    # category names and ids are set after a class-count change, which clears them
    names = overrides.pop("class_names", None)
    cat_ids = overrides.pop("category_ids", None)
    cfg_json = None
    from_hf = False
    if os.path.isdir(path):
        sd, cfg_json = _read_folder(path)
        if cfg_json.get("model_type") in ("rt_detr", "rt_detr_v2"):
            from .hf_mapping import hf_to_official, hf_version, preset_from_hf_config

            sd = hf_to_official(sd, hf_version(cfg_json))
            from_hf = True
            inferred = preset_from_hf_config(cfg_json)
            cfg_json = None
        elif "rtdetr_fast" in cfg_json:
            inferred = None
            cfg_json = cfg_json["rtdetr_fast"]
        else:
            raise CheckpointError(f"{path!r}: config.json is neither a transformers RT-DETR "
                                  "config (model_type 'rt_detr' or 'rt_detr_v2') nor an "
                                  "rtdetr_fast one")
    else:
        sd, cfg_json = read_checkpoint(path, map_location)
        inferred = None
    if cfg_json is not None:
        # the config saved with the weights (queries, input size, names...); overrides win
        from ..config import RTDETRConfig

        try:
            config = RTDETRConfig.from_dict(cfg_json)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path!r}: the model config saved in it is not readable by "
                                  f"this version: {exc}") from exc
        if name is not None and name != config.name:
            raise CheckpointError(f"{path!r} holds a {config.name} checkpoint, not {name}")
        if overrides:
            config = get_config(config.name, config.num_classes,
                                **{**_flatten(config), **overrides})
    else:
        inferred_name, ckpt_classes, ckpt_overrides = inferred or infer_preset(sd)
        if name is not None and name != inferred_name:
            raise CheckpointError(f"{path!r} holds a {inferred_name} checkpoint, not {name}")
        config = get_config(inferred_name, ckpt_classes, **{**ckpt_overrides, **overrides})
    model = cls(config)
    deployed = any(DEPLOYED_KEY.search(k) for k in sd)
    # deployed by an earlier version, which folded only the RepConv blocks and kept every
    # batch norm: loaded into that form, then deployed as today
    norms_kept = deployed and any(k.endswith(".running_var") for k in sd)
    if norms_kept:
        model.fold_rep_convs()
    elif deployed:
        model.deploy()
    if from_hf:
        # transformers' backbone uses frozen batch norms: the counters our unfrozen r18/r34
        # backbones keep are absent there, and their value does not affect inference
        for k, v in model.state_dict().items():
            if k.endswith(".num_batches_tracked") and k not in sd:
                sd[k] = torch.zeros_like(v)
    load_state_dict_strict(model, sd, repr(path))
    if norms_kept:
        model.deploy()
    if num_classes is not None and num_classes != config.num_classes:
        model.reset_classes(num_classes)
    if names is not None or cat_ids is not None:
        model.set_categories(names if names is not None else model.config.class_names,
                             cat_ids if cat_ids is not None else model.config.category_ids)
    return model


def _flatten(config) -> dict:
    out = {}
    for section in ("backbone", "encoder", "decoder"):
        for k, v in dataclasses.asdict(getattr(config, section)).items():
            out[f"{section}.{k}"] = v
    for f in dataclasses.fields(config):
        if f.name not in ("name", "num_classes", "backbone", "encoder", "decoder"):
            out[f.name] = getattr(config, f.name)
    return out


def save_pretrained(model, directory) -> None:
    """``config.json`` (our config) + ``model.safetensors`` (official key layout), each written
    to a temporary file and renamed, so an interrupted save leaves no half-written file."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    cfg = {"rtdetr_fast": dataclasses.asdict(model.config), "deployed": model.deployed}
    tmp_cfg = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp_cfg, "w") as f:
        json.dump(cfg, f, indent=2)
    tmp_w = os.path.join(directory, WEIGHTS_NAME + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp_w)
    os.replace(tmp_w, os.path.join(directory, WEIGHTS_NAME))
    os.replace(tmp_cfg, os.path.join(directory, CONFIG_NAME))
