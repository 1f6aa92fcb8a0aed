"""Model configuration: frozen dataclasses and the named presets of the official RT-DETR (v1)
and RT-DETRv2.

The presets reproduce the official YAML configs (``rtdetr_pytorch/configs/rtdetr/*.yml`` and
``rtdetrv2_pytorch/configs/rtdetrv2/*.yml``; for the v1 HGNetv2 presets, the paper's RT-DETR-L
and X, ``rtdetr_paddle/configs/rtdetr/rtdetr_hgnetv2_*.yml``) field for field. Every field is
an override of :func:`get_config`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Tuple, Union

__all__ = [
    "BackboneConfig",
    "EncoderConfig",
    "DecoderConfig",
    "RTDETRConfig",
    "PRESETS",
    "get_config",
    "list_presets",
]


@dataclass(frozen=True)
class BackboneConfig:
    # ResNet-vd ("presnet"): depth 18-152, variant "a"-"d"
    depth: int = 50
    # the family's member: ResNet's "d"; HGNetv2's "B0"-"B6" or "L" / "X" / "H" (B4 / B5 / B6)
    variant: str = "d"
    num_stages: int = 4
    return_idx: Tuple[int, ...] = (1, 2, 3)
    act: str = "relu"
    # freeze_at >= 0 freezes the stem and the first freeze_at stages (requires_grad=False)
    freeze_at: int = 0
    # freeze_norm replaces every BatchNorm2d by FrozenBatchNorm2d (statistics as buffers)
    freeze_norm: bool = True
    # the backbone family, a name of model.backbones.BACKBONES: "presnet" or "hgnetv2"
    name: str = "presnet"
    # HGNetv2: a learnable affine (scale, bias) after every activation (the B0-B3 configs)
    use_lab: bool = False


@dataclass(frozen=True)
class EncoderConfig:
    in_channels: Tuple[int, ...] = (512, 1024, 2048)
    feat_strides: Tuple[int, ...] = (8, 16, 32)
    hidden_dim: int = 256
    nhead: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.0
    enc_act: str = "gelu"
    use_encoder_idx: Tuple[int, ...] = (2,)
    num_encoder_layers: int = 1
    pe_temperature: float = 10000.0
    expansion: float = 1.0
    depth_mult: float = 1.0
    act: str = "silu"
    # state-dict layout of the input projections: "v1" (input_proj.N.0/1) or "v2" (.conv/.norm)
    version: str = "v1"


@dataclass(frozen=True)
class DecoderConfig:
    hidden_dim: int = 256
    num_levels: int = 3
    # sampling points per head: one count for every level, or one count per level (v2)
    num_points: Union[int, Tuple[int, ...]] = 4
    nhead: int = 8
    num_decoder_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.0
    activation: str = "relu"
    num_queries: int = 300
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    learnt_init_query: bool = False
    eval_idx: int = -1
    eps: float = 1e-2
    aux_loss: bool = True
    # "v1": the official RTDETRTransformer layout; "v2": RTDETRTransformerv2 (enc_output.proj/
    # norm, a num_points_scale buffer per layer, anchors and valid_mask buffers)
    version: str = "v1"
    # offsets are in units of the box size times offset_scale, divided by the level's points
    offset_scale: float = 0.5
    # "default": bilinear sampling; "discrete": the nearest cell, its sampling offsets frozen
    cross_attn_method: str = "default"
    # "default": top-K by the best class score; "agnostic": by one class-agnostic score
    query_select_method: str = "default"

    @property
    def num_points_list(self) -> Tuple[int, ...]:
        """One sampling-point count per level."""
        if isinstance(self.num_points, tuple):
            return self.num_points
        return (self.num_points,) * self.num_levels


@dataclass(frozen=True)
class RTDETRConfig:
    name: str = "rtdetr_r50vd"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # (H, W) the model is evaluated at; anchors and position embeddings are cached for it
    eval_spatial_size: Tuple[int, int] = (640, 640)
    # detections kept by the post-processor (top-K over queries x classes)
    num_top_queries: int = 300
    # the data set's category names and COCO category ids, one per class (label i is
    # class_names[i], category_ids[i]); empty when unknown
    class_names: Tuple[str, ...] = ()
    category_ids: Tuple[int, ...] = ()

    @property
    def feat_strides(self) -> Tuple[int, ...]:
        return self.encoder.feat_strides

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RTDETRConfig":
        d = dict(d)
        sub = {
            "backbone": BackboneConfig,
            "encoder": EncoderConfig,
            "decoder": DecoderConfig,
        }
        kwargs = {}
        for k, v in d.items():
            if k in sub:
                kwargs[k] = sub[k](**{kk: _tupled(vv) for kk, vv in v.items()})
            else:
                kwargs[k] = _tupled(v)
        return cls(**kwargs)


def _tupled(v):
    return tuple(v) if isinstance(v, list) else v


def _preset(name, depth, freeze, in_channels, hidden_dim, dim_feedforward, expansion,
            num_decoder_layers, eval_idx=-1, version="v1") -> RTDETRConfig:
    return RTDETRConfig(
        name=name,
        backbone=BackboneConfig(depth=depth, freeze_at=0 if freeze else -1, freeze_norm=freeze),
        encoder=EncoderConfig(in_channels=in_channels, hidden_dim=hidden_dim,
                              dim_feedforward=dim_feedforward, expansion=expansion,
                              version=version),
        decoder=DecoderConfig(num_decoder_layers=num_decoder_layers, eval_idx=eval_idx,
                              version=version),
    )


def _v2(name, *args, **kw) -> RTDETRConfig:
    # rtdetrv2_pytorch/configs/rtdetrv2: the v1 architecture fields unchanged, num_points
    # [4, 4, 4], cross_attn_method default, query_select_method default
    return _preset(name, *args, version="v2", **kw)


def _hgnetv2(name, variant, hidden_dim, dim_feedforward, num_encoder_layers, version
             ) -> RTDETRConfig:
    # rtdetrv2_pytorch/configs/rtdetrv2/rtdetrv2_hgnetv2_*.yml and, for v1,
    # rtdetr_paddle/configs/rtdetr/rtdetr_hgnetv2_*.yml: the r50vd config with the backbone
    # replaced (its stem frozen, frozen norms) and the encoder widened for X and H
    return RTDETRConfig(
        name=name,
        backbone=BackboneConfig(name="hgnetv2", variant=variant, freeze_at=0, freeze_norm=True),
        encoder=EncoderConfig(in_channels=(512, 1024, 2048), hidden_dim=hidden_dim,
                              dim_feedforward=dim_feedforward,
                              num_encoder_layers=num_encoder_layers, version=version),
        decoder=DecoderConfig(version=version),
    )


PRESETS = {
    "rtdetr_r18vd": _preset("rtdetr_r18vd", 18, False, (128, 256, 512), 256, 1024, 0.5, 3),
    "rtdetr_r34vd": _preset("rtdetr_r34vd", 34, False, (128, 256, 512), 256, 1024, 0.5, 4),
    "rtdetr_r50vd_m": _preset("rtdetr_r50vd_m", 50, True, (512, 1024, 2048), 256, 1024, 0.5, 6,
                              eval_idx=2),
    "rtdetr_r50vd": _preset("rtdetr_r50vd", 50, True, (512, 1024, 2048), 256, 1024, 1.0, 6),
    "rtdetr_r101vd": _preset("rtdetr_r101vd", 101, True, (512, 1024, 2048), 384, 2048, 1.0, 6),
    "rtdetrv2_r18vd": _v2("rtdetrv2_r18vd", 18, False, (128, 256, 512), 256, 1024, 0.5, 3),
    "rtdetrv2_r34vd": _v2("rtdetrv2_r34vd", 34, False, (128, 256, 512), 256, 1024, 0.5, 4),
    "rtdetrv2_r50vd_m": _v2("rtdetrv2_r50vd_m", 50, True, (512, 1024, 2048), 256, 1024, 0.5, 6,
                            eval_idx=2),
    "rtdetrv2_r50vd": _v2("rtdetrv2_r50vd", 50, True, (512, 1024, 2048), 256, 1024, 1.0, 6),
    "rtdetrv2_r101vd": _v2("rtdetrv2_r101vd", 101, True, (512, 1024, 2048), 384, 2048, 1.0, 6),
    # the paper's RT-DETR-L / X (v1 decoder) and RT-DETRv2-L / X / H
    "rtdetr_hgnetv2_l": _hgnetv2("rtdetr_hgnetv2_l", "L", 256, 1024, 1, "v1"),
    "rtdetr_hgnetv2_x": _hgnetv2("rtdetr_hgnetv2_x", "X", 384, 2048, 1, "v1"),
    "rtdetrv2_hgnetv2_l": _hgnetv2("rtdetrv2_hgnetv2_l", "L", 256, 1024, 1, "v2"),
    "rtdetrv2_hgnetv2_x": _hgnetv2("rtdetrv2_hgnetv2_x", "X", 384, 2048, 1, "v2"),
    "rtdetrv2_hgnetv2_h": _hgnetv2("rtdetrv2_hgnetv2_h", "H", 512, 2048, 2, "v2"),
}

VERSIONS = ("v1", "v2")
BACKBONE_NAMES = ("presnet", "hgnetv2")
# model/backbones/hgnetv2.py's table (kept here so the config needs no model import)
HGNETV2_VARIANTS = ("B0", "B1", "B2", "B3", "B4", "B5", "B6", "L", "X", "H")
CROSS_ATTN_METHODS = ("default", "discrete")
QUERY_SELECT_METHODS = ("default", "agnostic")

_SECTIONS = ("backbone", "encoder", "decoder")


def list_presets() -> list:
    return list(PRESETS)


def get_config(name: str, num_classes: int = 80, **overrides) -> RTDETRConfig:
    """Return preset ``name`` with ``num_classes`` and ``overrides`` applied.

    An override is a field name (``num_queries=500``), applied to every section that has the
    field (``hidden_dim`` sets the encoder's and the decoder's), or ``section.field``
    (``**{"encoder.hidden_dim": 384}``) for one section only. Top-level fields
    (``eval_spatial_size``, ``num_top_queries``) are accepted too.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    cfg = PRESETS[name]
    sections = {s: {} for s in _SECTIONS}
    top = {"num_classes": num_classes}
    for key, value in overrides.items():
        value = _tupled(value)
        _check_type(cfg, key, value)
        if "." in key:
            section, fname = key.split(".", 1)
            if section not in sections or fname not in _field_names(getattr(cfg, section)):
                raise ValueError(f"unknown override {key!r}")
            sections[section][fname] = value
            continue
        hit = False
        if key in _field_names(cfg) and key not in _SECTIONS and key != "name":
            top[key] = value
            hit = True
        for section in _SECTIONS:
            if key in _field_names(getattr(cfg, section)):
                sections[section][key] = value
                hit = True
        if not hit:
            raise ValueError(f"unknown override {key!r} for preset {name!r}")
    replaced = {s: dataclasses.replace(getattr(cfg, s), **kw) for s, kw in sections.items() if kw}
    cfg = dataclasses.replace(cfg, **top, **replaced)
    _validate(cfg)
    return cfg


def _check_type(cfg: RTDETRConfig, key: str, value) -> None:
    """A one-line error for an override whose value has the wrong type (``num_queries=abc``)."""
    fname = key.split(".", 1)[-1]
    holders = [getattr(cfg, key.split(".", 1)[0])] if "." in key else \
        [cfg] + [getattr(cfg, s) for s in _SECTIONS]
    for obj in holders:
        if not dataclasses.is_dataclass(obj) or fname not in _field_names(obj) or fname in _SECTIONS:
            continue
        default = getattr(obj, fname)
        if fname == "num_points":
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, tuple)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
            if not ok:
                raise ValueError(f"override {key}={value!r}: expected an int or one int per "
                                 f"level like (4, 4, 4)")
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, tuple):
            ok = isinstance(value, tuple)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"override {key}={value!r}: expected {type(default).__name__} "
                             f"like {default!r}")


def _field_names(obj) -> set:
    return {f.name for f in dataclasses.fields(obj)}


def _validate(cfg: RTDETRConfig) -> None:
    enc, dec, bb = cfg.encoder, cfg.decoder, cfg.backbone
    if bb.name not in BACKBONE_NAMES:
        raise ValueError(f"backbone name must be one of {', '.join(BACKBONE_NAMES)}, "
                         f"got {bb.name!r}")
    if bb.name == "presnet" and bb.depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"backbone depth must be one of 18, 34, 50, 101, 152, got {bb.depth}")
    if bb.name == "hgnetv2" and bb.variant not in HGNETV2_VARIANTS:
        raise ValueError(f"hgnetv2 variant must be one of {', '.join(HGNETV2_VARIANTS)}, "
                         f"got {bb.variant!r}")
    if enc.hidden_dim % 4:
        raise ValueError(f"encoder hidden_dim must be a multiple of 4, got {enc.hidden_dim}")
    if dec.hidden_dim % dec.nhead:
        raise ValueError(f"decoder hidden_dim {dec.hidden_dim} is not divisible by nhead {dec.nhead}")
    if enc.hidden_dim % enc.nhead:
        raise ValueError(f"encoder hidden_dim {enc.hidden_dim} is not divisible by nhead {enc.nhead}")
    if len(enc.in_channels) != len(bb.return_idx):
        raise ValueError("encoder in_channels must have one entry per backbone return_idx")
    if dec.num_levels < len(enc.in_channels):
        raise ValueError("decoder num_levels must be >= the number of encoder feature maps")
    if isinstance(dec.num_points, tuple):
        if len(dec.num_points) != dec.num_levels:
            raise ValueError(f"decoder num_points must be an int or one count per level "
                             f"({dec.num_levels} levels), got {dec.num_points}")
    if any(p < 1 for p in dec.num_points_list):
        raise ValueError(f"decoder num_points must be positive, got {dec.num_points}")
    for section, value in (("encoder", enc.version), ("decoder", dec.version)):
        if value not in VERSIONS:
            raise ValueError(f"{section} version must be one of {', '.join(VERSIONS)}, "
                             f"got {value!r}")
    if dec.cross_attn_method not in CROSS_ATTN_METHODS:
        raise ValueError(f"decoder cross_attn_method must be one of "
                         f"{', '.join(CROSS_ATTN_METHODS)}, got {dec.cross_attn_method!r}")
    if dec.query_select_method not in QUERY_SELECT_METHODS:
        raise ValueError(f"decoder query_select_method must be one of "
                         f"{', '.join(QUERY_SELECT_METHODS)}, got {dec.query_select_method!r}")
    if not -dec.num_decoder_layers <= dec.eval_idx < dec.num_decoder_layers:
        raise ValueError(f"eval_idx {dec.eval_idx} out of range for {dec.num_decoder_layers} layers")
    if dec.num_queries < 1 or cfg.num_top_queries < 1:
        raise ValueError("num_queries and num_top_queries must be positive")
    if len(cfg.eval_spatial_size) != 2 or min(cfg.eval_spatial_size) < 32:
        raise ValueError(f"eval_spatial_size must be (H, W) of at least 32, got "
                         f"{cfg.eval_spatial_size}")
    for what in ("class_names", "category_ids"):
        given = getattr(cfg, what)
        if given and len(given) != cfg.num_classes:
            raise ValueError(f"{len(given)} {what} given for {cfg.num_classes} classes")
