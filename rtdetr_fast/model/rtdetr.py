"""RTDETR: backbone -> hybrid encoder -> decoder, with the post-processor and user-facing API."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RTDETRConfig, get_config
from .backbones import build_backbone
from .box_ops import box_xyxy_to_cxcywh
from .criterion import RTDETRCriterion
from .decoder import MSDeformableAttention, RTDETRDecoder
from .denoising import contrastive_denoising_group
from .encoder import HybridEncoder, RepVggBlock
from .postprocess import PostProcessor

ImageLike = Union[torch.Tensor, np.ndarray, "PIL.Image.Image", str, os.PathLike]  # noqa: F821


class RTDETR(nn.Module):
    """RT-DETR detector with the official state-dict layout.

    ``model(images)`` takes float images [B,3,H,W] in [0,1], RGB, without mean/std
    normalisation, and returns ``pred_logits`` [B,Q,C] and ``pred_boxes`` [B,Q,4] (cxcywh,
    normalised to the input). Any H and W work; multiples of 32 match the official model's
    feature-map sizes exactly.
    """

    def __init__(self, config: RTDETRConfig):
        super().__init__()
        self.config = config
        enc = config.encoder
        # attribute order matches the official model (backbone, decoder, encoder) so that the
        # state dict lists keys in the released checkpoints' order
        self.backbone = build_backbone(config.backbone)
        if list(self.backbone.out_channels) != list(enc.in_channels):
            raise ValueError(f"encoder in_channels {list(enc.in_channels)} do not match the "
                             f"backbone's outputs {self.backbone.out_channels}")
        self.decoder = RTDETRDecoder(config.decoder, config.num_classes,
                                     [enc.hidden_dim] * len(enc.in_channels), list(enc.feat_strides),
                                     config.eval_spatial_size)
        self.encoder = HybridEncoder(enc, config.eval_spatial_size)
        self.postprocessor = PostProcessor(config.num_top_queries)
        self.criterion = RTDETRCriterion(config.num_classes)

    # ----------------------------------------------------------------------------- builders
    @classmethod
    def from_config(cls, config: RTDETRConfig) -> "RTDETR":
        return cls(config)

    @classmethod
    def from_name(cls, name: str, num_classes: int = 80, **overrides: Any) -> "RTDETR":
        """A randomly initialised preset (``rtdetr_r18vd`` ... ``rtdetr_r101vd``, the
        ``rtdetrv2_*`` ones, ``rtdetr_hgnetv2_l`` / ``_x``, ``rtdetrv2_hgnetv2_l`` / ``_x`` /
        ``_h``: ``rtdetr_fast.config.list_presets()``); no download. Every config field is an
        override, e.g. ``num_queries=500``."""
        return cls(get_config(name, num_classes, **overrides))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], num_classes: Optional[int] = None,
                        name: Optional[str] = None, map_location="cpu", **overrides: Any
                        ) -> "RTDETR":
        """Load an official RT-DETR ``.pth`` (``ckpt["ema"]["module"]``, else ``ckpt["model"]``),
        a Hugging Face transformers RT-DETR folder (config.json + model.safetensors), or a folder
        written by :meth:`save_pretrained`. The preset and class count are inferred; ``name``
        asserts the preset. ``num_classes`` different from the checkpoint's re-initialises the
        class heads only (fine-tuning)."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, num_classes=num_classes, name=name,
                               map_location=map_location, **overrides)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` and ``model.safetensors`` (official key layout)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, directory)

    # ----------------------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def deployed(self) -> bool:
        return any(m.deployed for m in self.modules() if isinstance(m, RepVggBlock))

    def reset_classes(self, num_classes: int, class_names: Optional[Sequence[str]] = None,
                      category_ids: Optional[Sequence[int]] = None) -> "RTDETR":
        """Re-initialise every class-dependent part for ``num_classes`` (fine-tuning to another
        class count): the decoder's class heads and denoising embedding, the loss and the
        config (whose category names and ids are replaced by the ones given, else cleared).
        Everything else keeps its weights."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.decoder.reset_class_heads(num_classes)
        self.criterion = RTDETRCriterion(num_classes, matcher=self.criterion.matcher)
        self.config = dataclasses.replace(self.config, num_classes=num_classes, class_names=(),
                                          category_ids=())
        return self.set_categories(class_names or (), category_ids or ())

    def set_categories(self, class_names: Sequence[str] = (), category_ids: Sequence[int] = ()
                       ) -> "RTDETR":
        """Record the category name and COCO category id of each class (label i is
        ``class_names[i]``); saved with every checkpoint, used by ``predict`` and ``eval``."""
        names = tuple(str(n) for n in class_names)
        ids = tuple(int(i) for i in category_ids)
        for what, given in (("category names", names), ("category ids", ids)):
            if given and len(given) != self.num_classes:
                raise ValueError(f"{len(given)} {what} given for a model of {self.num_classes} "
                                 "classes")
        self.config = dataclasses.replace(self.config, class_names=names, category_ids=ids)
        return self

    @property
    def class_names(self) -> List[str]:
        """The name of each class: the saved category names, else the label as text."""
        return list(self.config.class_names) or [str(i) for i in range(self.num_classes)]

    # ----------------------------------------------------------------------------- forward
    @staticmethod
    def _check_images(images: Any) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a float tensor [B, 3, H, W]; got {type(images).__name__}"
                            " (use model.predict for PIL images, arrays or paths)")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] (RGB), got "
                             f"[{', '.join(map(str, images.shape))}]")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
        if images.shape[2] < 32 or images.shape[3] < 32:
            raise ValueError(f"images must be at least 32x32, got {tuple(images.shape[2:])}")

    def forward(self, images: torch.Tensor, targets: Optional[List[Dict]] = None) -> Dict:
        """Detect; with ``targets`` also compute the loss.

        ``targets``: one dict per image, either ``boxes`` [N,4] xyxy in pixels of ``images`` and
        ``labels`` [N] int64 (the torchvision convention), or the Hugging Face form
        ``class_labels`` [N] with ``boxes`` cxcywh normalised. Images without boxes are valid.
        With targets the output adds ``loss`` (a scalar) and ``loss_dict`` (every weighted
        term); in train mode the terms cover every decoder layer, the encoder's proposals and
        the denoising groups, in eval mode the final layer only."""
        self._check_images(images)
        feats = self.encoder(self.backbone(images))
        if targets is None:
            return self.decoder(feats)
        norm_targets = self.normalize_targets(targets, images)
        denoising = None
        if self.training:
            dec = self.config.decoder
            denoising = contrastive_denoising_group(
                norm_targets, self.num_classes, dec.num_queries, self.decoder.denoising_class_embed,
                dec.num_denoising, dec.label_noise_ratio, dec.box_noise_scale
            ) if dec.num_denoising > 0 else None
        out = self.decoder(feats, denoising)
        # the loss runs in float32 whatever the autocast around the forward
        with torch.autocast(device_type=images.device.type, enabled=False):
            losses = self.criterion(out, norm_targets)
        loss = sum(losses.values())
        if self.training and denoising is None and self.config.decoder.num_denoising > 0:
            # keep the denoising embedding in the graph, so DistributedDataParallel sees the
            # same parameters used on every rank even when this rank's batch has no boxes
            loss = loss + 0.0 * self.decoder.denoising_class_embed.weight.sum()
        out["loss"] = loss
        out["loss_dict"] = losses
        return out

    def normalize_targets(self, targets: List[Dict], images: torch.Tensor) -> List[Dict]:
        """Targets as the loss wants them: ``labels`` int64 and ``boxes`` cxcywh normalised."""
        if not isinstance(targets, (list, tuple)) or len(targets) != images.shape[0]:
            raise ValueError(f"targets must be a list of {images.shape[0]} dicts (one per image), "
                             f"got {type(targets).__name__} of length "
                             f"{len(targets) if hasattr(targets, '__len__') else '?'}")
        h, w = images.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=images.device)
        out = []
        for i, t in enumerate(targets):
            hf = "class_labels" in t
            labels = t["class_labels"] if hf else t.get("labels")
            boxes = t.get("boxes")
            if labels is None or boxes is None:
                raise ValueError(f"targets[{i}] needs 'boxes' and 'labels' (or 'class_labels'), "
                                 f"got keys {sorted(t)}")
            labels = torch.as_tensor(labels, device=images.device).long().reshape(-1)
            boxes = torch.as_tensor(boxes, device=images.device, dtype=torch.float32)
            if boxes.numel() == 0:
                boxes = boxes.reshape(0, 4)
            if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != labels.shape[0]:
                raise ValueError(f"targets[{i}]: boxes must be [N, 4] with N = len(labels) = "
                                 f"{labels.shape[0]}, got {list(boxes.shape)}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"targets[{i}]: labels must be in [0, {self.num_classes}), got "
                                 f"min {int(labels.min())} max {int(labels.max())}")
            if not hf:
                boxes = box_xyxy_to_cxcywh(boxes / scale)
            out.append({"labels": labels, "boxes": boxes})
        return out

    # ----------------------------------------------------------------------------- inference
    @torch.no_grad()
    def postprocess(self, outputs: Dict, image_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """Top-K detections per image; ``image_sizes`` [B,2] as (H, W) in pixels."""
        return self.postprocessor(outputs, image_sizes)

    @torch.no_grad()
    def predict(self, images: Union[ImageLike, Sequence[ImageLike]], threshold: float = 0.5,
                size: Optional[Sequence[int]] = None) -> List[Dict[str, torch.Tensor]]:
        """Detect objects in one image or a list of images.

        Accepts tensors ([3,H,W] or [B,3,H,W], float in [0,1] or uint8), numpy arrays (HWC,
        uint8 or float in [0,1]), PIL images and file paths, mixed and of different sizes. Each
        image is resized to ``size`` (default: the config's eval size), run in eval mode, and
        its boxes mapped back to its own pixels. Returns per image a dict with ``boxes`` [N,4]
        (xyxy, original pixels, clipped to the image), ``scores`` [N] and ``labels`` [N] for
        scores >= threshold; ``model.class_names[label]`` names the class.
        """
        from ..data.images import to_tensor_list

        tensors = to_tensor_list(images)
        size = tuple(size) if size is not None else tuple(self.config.eval_spatial_size)
        if len(size) != 2:
            raise ValueError(f"size must be (H, W), got {size}")
        param = next(self.parameters())
        batch = torch.stack([
            F.interpolate(t[None].to(param.device, torch.float32), size=size, mode="bilinear",
                          align_corners=False, antialias=True)[0]
            for t in tensors]).to(param.dtype)
        sizes = torch.tensor([t.shape[-2:] for t in tensors], device=param.device)
        was_training = self.training
        self.eval()
        try:
            outputs = self(batch)
        finally:
            self.train(was_training)
        results = []
        for det, (h, w) in zip(self.postprocess(outputs, sizes), sizes.tolist()):
            keep = det["scores"] >= threshold
            det = {k: v[keep] for k, v in det.items()}
            # boxes stay inside the image they were found in
            boxes = det["boxes"].clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            det["boxes"] = boxes
            results.append(det)
        return results

    # ----------------------------------------------------------------------------- speed-ups
    def deploy(self, memory_format: Union[str, torch.memory_format] = "auto") -> "RTDETR":
        """Inference form (eval mode), idempotent: every RepVggBlock folded into one 3x3 conv
        with bias, then every batch norm (backbone, frozen ones included; input projections;
        encoder convs) folded into its conv. Outputs are unchanged up to rounding (the folds
        run in float64; the float64 test holds them to 1e-10).

        On the CPU the deployed forward also takes faster routes to the same function:
        folded 3x3 stride-1 convs of 64+ channels (32+ in float32 with the kernel's AVX-512
        build) run the Winograd F(4x4, 3x3) RepConv
        kernel (``ops.rep_conv``; in float32 about 1e-6 relative difference on the encoder's
        features, from the transforms' rounding), other convs (and narrower 3x3 ones) run
        oneDNN's convolution with their activation fused, the stem runs NCHW on the Winograd
        kernel and the extension's max pool where its convs are wide enough for the kernel,
        else channels_last, the
        encoder's box head runs on the top-K selected rows only, and each decoder layer's
        ``value_proj`` runs after the deformable sampling instead of on every memory token
        (``MSDeformableAttention.project_after_sampling``: the same linear function without
        a [S, C] x [C, C] GEMM over the S memory tokens per layer; off on CUDA, where it was
        not measured).

        ``memory_format``: ``"auto"`` (channels_last on CUDA, where cuDNN's convolutions prefer
        it; contiguous on the CPU, where channels_last is no faster: see docs/export.md),
        ``torch.channels_last`` or ``torch.contiguous_format``.

        The deployed state dict holds ``...bottlenecks.N.conv.weight`` / ``.bias`` in place of
        ``...bottlenecks.N.conv1.*`` and ``conv2.*``, and each folded conv's ``.bias`` in place
        of its norm's entries; load it into a deployed model."""
        from .deploy import fold_batch_norms

        self.eval()
        self.fold_rep_convs()
        fold_batch_norms(self)
        if hasattr(self.backbone, "fold_norms"):
            # a backbone whose conv + norm pairs are its own modules folds them itself
            self.backbone.fold_norms()
        if hasattr(self.backbone, "deploy_stem"):
            self.backbone.deploy_stem()
        self.decoder.select_before_box_head = True
        device = next(self.parameters()).device
        for m in self.modules():
            if isinstance(m, MSDeformableAttention):
                m.project_after_sampling = device.type == "cpu"
        if memory_format == "auto":
            memory_format = (torch.channels_last if device.type == "cuda"
                             else torch.contiguous_format)
        if memory_format not in (torch.channels_last, torch.contiguous_format):
            raise ValueError(f"memory_format must be 'auto', torch.channels_last or "
                             f"torch.contiguous_format, got {memory_format!r}")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=memory_format)
        return self

    def fold_rep_convs(self) -> "RTDETR":
        """Fold every RepVggBlock into one 3x3 conv with bias and nothing else (the first step
        of :meth:`deploy`; also the form of checkpoints deployed by earlier versions, whose
        batch norms stay unfolded). Idempotent."""
        for m in list(self.modules()):
            if isinstance(m, RepVggBlock):
                m.fold()
        return self

    def set_eval_layers(self, k: int) -> "RTDETR":
        """Use the first ``k`` decoder layers at inference (the paper's speed/accuracy knob,
        Table 5), without retraining."""
        n = self.decoder.num_decoder_layers
        if not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"k must be an int in [1, {n}], got {k!r}")
        self.decoder.decoder.eval_idx = k - 1
        dec = dataclasses.replace(self.config.decoder, eval_idx=k - 1)
        self.config = dataclasses.replace(self.config, decoder=dec)
        return self
