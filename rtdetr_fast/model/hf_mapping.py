"""Key mapping between Hugging Face transformers RT-DETR (v1 and v2) and the official layouts.

The Hugging Face names come from transformers' ``models/rt_detr``: the rename list and
q/k/v split of ``convert_rt_detr_original_pytorch_checkpoint_to_hf.py``, the module tree of
``modeling_rt_detr.py`` (``RTDetrForObjectDetection``) and ``modeling_rt_detr_resnet.py``
(the PResNet-vd backbone), and ``configuration_rt_detr{,_resnet}.py`` for config.json.

Facts encoded here:

* every HF key of ``RTDetrForObjectDetection`` starts with ``model.``; the backbone lives
  under ``model.backbone.model.`` (``embedder.embedder.{0,1,2}`` is the stem,
  ``encoder.stages.{s}.layers.{b}.layer.{0,1,2}`` are branch2a/b/c, the shortcut is
  ``shortcut.`` at stage 0 and ``shortcut.1.`` (after an AvgPool) elsewhere);
* HF splits ``nn.MultiheadAttention``'s fused ``in_proj_weight``/``in_proj_bias`` into
  ``q_proj``/``k_proj``/``v_proj`` (rows in q, k, v order);
* HF's backbone uses frozen batch norms (no ``num_batches_tracked``); its encoder/decoder
  batch norms are plain ``nn.BatchNorm2d`` (they have it);
* ``RTDetrV2ForObjectDetection`` (``models/rt_detr_v2``, model_type ``rt_detr_v2``) has the v1
  tree plus each decoder layer's ``encoder_attn.n_points_scale`` buffer; the official v2 layout
  names the encoder's input projections ``.conv``/``.norm`` and ``enc_output`` ``.proj``/
  ``.norm``, where transformers keeps ``.0``/``.1``, and stores ``anchors``/``valid_mask``
  (derived from the eval size), which transformers does not;
* older transformers releases also register the decoder heads at the top level
  (``class_embed.{i}``/``bbox_embed.{i}``, tied to ``model.decoder.class_embed``/
  ``bbox_embed``); newer ones (and, normally, saved checkpoints) have only the
  ``model.decoder.`` copy.
"""
from __future__ import annotations

import re

import torch

__all__ = ["hf_to_official", "official_to_hf", "preset_from_hf_config", "hf_config_for"]

# ---------------------------------------------------------------------------------------------
# key rules: (official template, HF template). {a}..{z}: an integer index, {p}: a parameter or
# buffer name, {t}: any dotted tail. The first rule whose pattern fully matches wins.
_HB = "model.backbone.model."
_RULES: list[tuple[str, str]] = []
for _lvl in range(3):
    _RULES += [
        (f"backbone.conv1.conv1_{_lvl + 1}.conv.{{p}}", f"{_HB}embedder.embedder.{_lvl}.convolution.{{p}}"),
        (f"backbone.conv1.conv1_{_lvl + 1}.norm.{{p}}", f"{_HB}embedder.embedder.{_lvl}.normalization.{{p}}"),
    ]
_BLK, _HBLK = "backbone.res_layers.{s}.blocks.{b}.", _HB + "encoder.stages.{s}.layers.{b}."
for _k, _branch in enumerate(("branch2a", "branch2b", "branch2c")):
    _RULES += [
        (f"{_BLK}{_branch}.conv.{{p}}", f"{_HBLK}layer.{_k}.convolution.{{p}}"),
        (f"{_BLK}{_branch}.norm.{{p}}", f"{_HBLK}layer.{_k}.normalization.{{p}}"),
    ]
_RULES += [
    (_BLK + "short.conv.conv.{p}", _HBLK + "shortcut.1.convolution.{p}"),
    (_BLK + "short.conv.norm.{p}", _HBLK + "shortcut.1.normalization.{p}"),
    (_BLK + "short.conv.{p}", _HBLK + "shortcut.convolution.{p}"),
    (_BLK + "short.norm.{p}", _HBLK + "shortcut.normalization.{p}"),
    # hybrid encoder
    ("encoder.input_proj.{i}.{j}.{p}", "model.encoder_input_proj.{i}.{j}.{p}"),
]
_ENC, _HENC = "encoder.encoder.{i}.layers.{j}.", "model.encoder.encoder.{i}.layers.{j}."
_DEC, _HDEC = "decoder.decoder.layers.{i}.", "model.decoder.layers.{i}."
_RULES += [
    (_ENC + "self_attn.out_proj.{p}", _HENC + "self_attn.out_proj.{p}"),
    (_ENC + "linear1.{p}", _HENC + "fc1.{p}"),
    (_ENC + "linear2.{p}", _HENC + "fc2.{p}"),
    (_ENC + "norm1.{p}", _HENC + "self_attn_layer_norm.{p}"),
    (_ENC + "norm2.{p}", _HENC + "final_layer_norm.{p}"),
]
for _name in ("lateral_convs", "fpn_blocks", "downsample_convs", "pan_blocks"):
    _RULES.append((f"encoder.{_name}.{{t}}", f"model.encoder.{_name}.{{t}}"))
# decoder
_RULES += [
    (_DEC + "self_attn.out_proj.{p}", _HDEC + "self_attn.out_proj.{p}"),
    (_DEC + "cross_attn.{t}", _HDEC + "encoder_attn.{t}"),
    (_DEC + "norm1.{p}", _HDEC + "self_attn_layer_norm.{p}"),
    (_DEC + "norm2.{p}", _HDEC + "encoder_attn_layer_norm.{p}"),
    (_DEC + "norm3.{p}", _HDEC + "final_layer_norm.{p}"),
    (_DEC + "linear1.{p}", _HDEC + "fc1.{p}"),
    (_DEC + "linear2.{p}", _HDEC + "fc2.{p}"),
    ("decoder.input_proj.{i}.conv.{p}", "model.decoder_input_proj.{i}.0.{p}"),
    ("decoder.input_proj.{i}.norm.{p}", "model.decoder_input_proj.{i}.1.{p}"),
    ("decoder.dec_score_head.{i}.{p}", "model.decoder.class_embed.{i}.{p}"),
    ("decoder.dec_bbox_head.{i}.{t}", "model.decoder.bbox_embed.{i}.{t}"),
    ("decoder.query_pos_head.{t}", "model.decoder.query_pos_head.{t}"),
    ("decoder.denoising_class_embed.{p}", "model.denoising_class_embed.{p}"),
    ("decoder.enc_output.{t}", "model.enc_output.{t}"),
    ("decoder.enc_score_head.{p}", "model.enc_score_head.{p}"),
    ("decoder.enc_bbox_head.{t}", "model.enc_bbox_head.{t}"),
    # learnt_init_query=True only (official tgt_embed, HF weight_embedding)
    ("decoder.tgt_embed.{p}", "model.weight_embedding.{p}"),
]
# v2: tried before the v1 rules
_RULES_V2: list[tuple[str, str]] = [
    ("encoder.input_proj.{i}.conv.{p}", "model.encoder_input_proj.{i}.0.{p}"),
    ("encoder.input_proj.{i}.norm.{p}", "model.encoder_input_proj.{i}.1.{p}"),
    ("decoder.enc_output.proj.{p}", "model.enc_output.0.{p}"),
    ("decoder.enc_output.norm.{p}", "model.enc_output.1.{p}"),
    (_DEC + "cross_attn.num_points_scale", _HDEC + "encoder_attn.n_points_scale"),
] + _RULES
# official v2 buffers with no transformers counterpart (made from the eval size)
_DERIVED_V2 = ("decoder.anchors", "decoder.valid_mask")
VERSIONS = ("v1", "v2")
# self-attention prefixes whose fused in_proj HF stores as q_proj/k_proj/v_proj
_FUSED = [(_ENC + "self_attn", _HENC + "self_attn"), (_DEC + "self_attn", _HDEC + "self_attn")]


def _compile(template: str) -> re.Pattern:
    out = ""
    for piece in re.split(r"(\{[a-z]\})", template):
        if piece == "{p}":
            out += r"(?P<p>\w+)"
        elif piece == "{t}":
            out += r"(?P<t>\w+(?:\.\w+)*)"
        elif re.fullmatch(r"\{[a-z]\}", piece):
            out += rf"(?P<{piece[1]}>\d+)"
        else:
            out += re.escape(piece)
    return re.compile(out)


_RULES_RE = {"v1": [(o, h, _compile(o), _compile(h)) for o, h in _RULES],
             "v2": [(o, h, _compile(o), _compile(h)) for o, h in _RULES_V2]}
_FUSED_RE = [(o, h, _compile(o), _compile(h)) for o, h in _FUSED]


def _translate(key: str, rules, src: int) -> str | None:
    """Map ``key`` with the first matching rule; src 0: official -> HF, 1: HF -> official."""
    for rule in rules:
        m = rule[2 + src].fullmatch(key)
        if m:
            return rule[1 - src].format(**m.groupdict())
    return None


def _put(out: dict, key: str, value: torch.Tensor, source: str) -> None:
    if key in out:
        raise ValueError(f"two keys map to {key!r} (second one: {source!r})")
    out[key] = value


def _is_backbone_nbt(official_key: str) -> bool:
    return official_key.startswith("backbone.") and official_key.endswith(".num_batches_tracked")


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")


def official_to_hf(sd: dict, *, tied_heads: bool = False,
                   backbone_num_batches_tracked: bool = False, version: str = "v1") -> dict:
    """Official state dict -> keys of a transformers ``RTDetrForObjectDetection`` (``version``
    "v1") or ``RTDetrV2ForObjectDetection`` ("v2": the anchors buffers are dropped).

    ``tied_heads`` also emits the top-level ``class_embed``/``bbox_embed`` copies that older
    transformers releases have; ``backbone_num_batches_tracked`` keeps the backbone's
    ``num_batches_tracked`` (HF's frozen backbone norms have none, so they are dropped).
    """
    _check_version(version)
    out: dict = {}
    unknown = []
    for key, value in sd.items():
        if _is_backbone_nbt(key) and not backbone_num_batches_tracked:
            continue
        if version == "v2" and key in _DERIVED_V2:
            continue
        m = re.fullmatch(r"(.+)\.in_proj_(weight|bias)", key)
        prefix = _translate(m.group(1), _FUSED_RE, 0) if m else None
        if prefix is not None:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                _put(out, f"{prefix}.{name}_proj.{m.group(2)}", part.clone(), key)
            continue
        new = _translate(key, _RULES_RE[version], 0)
        if new is None:
            unknown.append(key)
        else:
            _put(out, new, value, key)
    _raise_unknown(unknown, "official", version)
    if tied_heads:
        for key in list(out):
            if key.startswith(("model.decoder.class_embed.", "model.decoder.bbox_embed.")):
                out[key[len("model.decoder."):]] = out[key]
    return out


def hf_to_official(sd: dict, version: str = "v1") -> dict:
    """transformers ``RTDetrForObjectDetection`` state dict -> official v1 keys, or
    ``RTDetrV2ForObjectDetection`` -> official v2 keys (``version`` "v2"; without the anchors
    buffers, which the model makes).

    Joins q/k/v into ``in_proj_*``, folds the tied top-level ``class_embed``/``bbox_embed``
    copies into ``model.decoder.*`` (they must be equal) and passes ``num_batches_tracked``
    through. Raises ValueError listing every key it cannot map.
    """
    _check_version(version)
    sd = dict(sd)
    for key in [k for k in sd if k.startswith(("class_embed.", "bbox_embed."))]:
        canonical = "model.decoder." + key
        value = sd.pop(key)
        if canonical not in sd:
            sd[canonical] = value
        elif not torch.equal(sd[canonical], value):
            raise ValueError(f"tied head {key!r} differs from {canonical!r}")
    out: dict = {}
    qkv: dict = {}
    unknown = []
    for key, value in sd.items():
        m = re.fullmatch(r"(.+)\.([qkv])_proj\.(weight|bias)", key)
        prefix = _translate(m.group(1), _FUSED_RE, 1) if m else None
        if prefix is not None:
            qkv.setdefault((prefix, m.group(3)), {})[m.group(2)] = key
            continue
        new = _translate(key, _RULES_RE[version], 1)
        if new is None:
            unknown.append(key)
        else:
            _put(out, new, value, key)
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:  # a lone q/k/v cannot be fused
            unknown += [f"{k} (q/k/v incomplete)" for k in parts.values()]
            continue
        _put(out, f"{prefix}.in_proj_{kind}", torch.cat([sd[parts[c]] for c in "qkv"], 0), prefix)
    _raise_unknown(unknown, "Hugging Face", version)
    return out


def _raise_unknown(keys: list, layout: str, version: str) -> None:
    if keys:
        shown = ", ".join(repr(k) for k in keys[:20])
        more = f" (and {len(keys) - 20} more)" if len(keys) > 20 else ""
        raise ValueError(f"{len(keys)} key(s) not in the {layout} RT-DETR {version} layout: "
                         f"{shown}{more}")


# ---------------------------------------------------------------------------------------------
# config.json
_BASIC, _BOTTLE = [64, 128, 256, 512], [256, 512, 1024, 2048]
# preset: backbone (depths, layer_type, hidden_sizes), then RTDetrConfig fields
_PRESETS = {
    "rtdetr_r18vd": ([2, 2, 2, 2], "basic", _BASIC,
                     dict(encoder_in_channels=[128, 256, 512], hidden_expansion=0.5, decoder_layers=3)),
    "rtdetr_r34vd": ([3, 4, 6, 3], "basic", _BASIC,
                     dict(encoder_in_channels=[128, 256, 512], hidden_expansion=0.5, decoder_layers=4)),
    "rtdetr_r50vd_m": ([3, 4, 6, 3], "bottleneck", _BOTTLE, dict(hidden_expansion=0.5, eval_idx=2)),
    "rtdetr_r50vd": ([3, 4, 6, 3], "bottleneck", _BOTTLE, {}),
    "rtdetr_r101vd": ([3, 4, 23, 3], "bottleneck", _BOTTLE,
                      dict(encoder_hidden_dim=384, encoder_ffn_dim=2048, decoder_in_channels=[384] * 3)),
}
_PRESETS.update({"rtdetrv2" + k[len("rtdetr"):]: v for k, v in list(_PRESETS.items())})
_MODEL_TYPES = {"rt_detr": "v1", "rt_detr_v2": "v2"}
# RTDetrConfig defaults (what a config.json saved with use_diff omits)
_HF_DEFAULTS = dict(encoder_in_channels=[512, 1024, 2048], encoder_hidden_dim=256, encoder_ffn_dim=1024,
                    hidden_expansion=1.0, decoder_layers=6, eval_idx=-1, num_queries=300,
                    decoder_in_channels=[256, 256, 256], d_model=256, decoder_ffn_dim=1024,
                    num_denoising=100)
# HF field -> our get_config override name
_OVERRIDES = {"num_queries": "num_queries", "decoder_layers": "num_decoder_layers", "eval_idx": "eval_idx",
              "encoder_hidden_dim": "encoder.hidden_dim", "encoder_ffn_dim": "encoder.dim_feedforward",
              "hidden_expansion": "encoder.expansion", "decoder_ffn_dim": "decoder.dim_feedforward",
              "d_model": "decoder.hidden_dim", "num_denoising": "num_denoising"}


# RTDetrV2Config's decoder fields and defaults -> our decoder fields
_HF_V2 = {"decoder_n_points": ("decoder.num_points", 4),
          "decoder_method": ("decoder.cross_attn_method", "default"),
          "decoder_offset_scale": ("decoder.offset_scale", 0.5)}


def _preset_fields(preset: str) -> dict:
    return {**_HF_DEFAULTS, **_PRESETS[preset][3]}


def hf_version(cfg: dict) -> str:
    """"v1" for model_type rt_detr (the default), "v2" for rt_detr_v2."""
    model_type = cfg.get("model_type", "rt_detr")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"not an RT-DETR config: model_type {model_type!r}, expected one of "
                         f"{', '.join(_MODEL_TYPES)}")
    return _MODEL_TYPES[model_type]


def preset_from_hf_config(cfg: dict) -> tuple:
    """config.json of an HF RT-DETR (model_type rt_detr) or RT-DETRv2 (rt_detr_v2) ->
    (preset name, num_classes, get_config overrides)."""
    version = hf_version(cfg)
    bb = cfg.get("backbone_config")
    if not isinstance(bb, dict):
        raise ValueError("config has no backbone_config (timm backbones are not supported)")
    depths, layer_type = list(bb.get("depths", [3, 4, 6, 3])), bb.get("layer_type", "bottleneck")
    prefix = "rtdetrv2_" if version == "v2" else "rtdetr_"
    matches = [p for p, v in _PRESETS.items()
               if p.startswith(prefix) and v[0] == depths and v[1] == layer_type]
    if not matches:
        raise ValueError(f"unsupported backbone: depths={depths}, layer_type={layer_type!r}")
    if len(matches) > 1:  # ResNet-50: r50vd_m has the half-width CSP blocks
        half = float(cfg.get("hidden_expansion", 1.0)) == 0.5
        matches = [p for p in matches if p.endswith("_m") == half]
    preset = matches[0]

    if isinstance(cfg.get("id2label"), dict) and cfg["id2label"]:
        num_classes = len(cfg["id2label"])
    elif "num_labels" in cfg:
        num_classes = int(cfg["num_labels"])
    else:
        raise ValueError("config has neither id2label nor num_labels")

    want = _preset_fields(preset)
    n_layers = int(cfg.get("decoder_layers", _HF_DEFAULTS["decoder_layers"]))
    overrides = {}
    for field, name in _OVERRIDES.items():
        have, ref = cfg.get(field, _HF_DEFAULTS[field]), want[field]
        if field == "eval_idx":  # -1 and n-1 name the same (last) layer
            if not -n_layers <= ref < n_layers or have % n_layers != ref % n_layers:
                overrides[name] = int(have)
        elif have != ref:
            overrides[name] = type(ref)(have)
    if version == "v2":
        for field, (name, default) in _HF_V2.items():
            have = cfg.get(field, default)
            if isinstance(have, list):
                have = tuple(int(v) for v in have)
            if have != default:
                overrides[name] = have
    return preset, num_classes, overrides


def hf_config_for(preset: str, num_classes: int) -> dict:
    """A minimal HF config.json dict for ``preset`` (what preset_from_hf_config maps back)."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}")
    depths, layer_type, hidden_sizes, _ = _PRESETS[preset]
    id2label = {str(i): f"class_{i}" for i in range(num_classes)}
    v2 = preset.startswith("rtdetrv2_")
    return {
        "model_type": "rt_detr_v2" if v2 else "rt_detr",
        "architectures": ["RTDetrV2ForObjectDetection" if v2 else "RTDetrForObjectDetection"],
        "use_timm_backbone": False,
        "backbone": None,
        "use_pretrained_backbone": False,
        "backbone_config": {
            "model_type": "rt_detr_resnet", "depths": list(depths), "layer_type": layer_type,
            "hidden_sizes": list(hidden_sizes), "embedding_size": 64,
            "out_features": ["stage2", "stage3", "stage4"], "out_indices": [2, 3, 4],
        },
        **{k: (list(v) if isinstance(v, list) else v) for k, v in _preset_fields(preset).items()},
        **({k: d for k, (_, d) in _HF_V2.items()} if v2 else {}),
        "id2label": id2label,
        "label2id": {v: int(k) for k, v in id2label.items()},
    }
