"""The model a verb runs: its options (``--preset``, ``--checkpoint``, ``--set``...) and the
model built from them. torch and the model are imported when a model is built, not before."""
from __future__ import annotations

from typing import Optional

from ..config import list_presets
from ._checks import DEFAULT_PRESET, DEFAULT_SIZE, SIZE_MULTIPLE, parse_names, parse_overrides


def add_model_args(sp, size: int = DEFAULT_SIZE) -> None:
    """The model options of predict, train, eval and bench."""
    sp.add_argument("--preset", default=None, choices=list_presets(),
                    help=f"model preset (default: {DEFAULT_PRESET}, or the checkpoint's; a "
                         "preset other than the checkpoint's is an error)")
    sp.add_argument("--checkpoint",
                    help="weights to start from: a .pth written by train (best.pth, "
                         "last.pth), an official RT-DETR .pth, a save_pretrained folder or a "
                         "Hugging Face folder; its saved config (queries, input size, "
                         "category names) is used")
    sp.add_argument("--num-classes", type=int, default=None,
                    help="class count of a model without checkpoint (default: 80)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    sp.add_argument("--size", type=int, default=None,
                    help=f"square input size in pixels (default: the checkpoint's, else "
                         f"{size})")
    sp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="model config overrides, e.g. num_queries=100 "
                         "decoder.num_points=2 (they win over the checkpoint's config)")


def torch_device(name: str):
    """``--device`` as a torch.device; a CUDA device torch does not see is an error."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device: cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return dev


def build_model(args, num_classes: Optional[int] = None, checkpoint: Optional[str] = None,
                class_names=None, category_ids=None):
    """A model from ``--checkpoint`` (its saved config, explicit flags winning) or from
    ``--preset``. ``num_classes`` different from the checkpoint's re-initialises the class
    heads (fine-tuning); ``class_names``/``category_ids`` are recorded in the model."""
    from .. import RTDETR

    overrides = parse_overrides(args.set)
    if getattr(args, "size", None) is not None:
        if args.size < SIZE_MULTIPLE:
            raise ValueError(f"--size must be a multiple of {SIZE_MULTIPLE}, at least "
                             f"{SIZE_MULTIPLE}, got {args.size}")
        overrides.setdefault("eval_spatial_size", (args.size, args.size))
    checkpoint = checkpoint or args.checkpoint
    if checkpoint:
        model = RTDETR.from_pretrained(checkpoint, num_classes=num_classes, name=args.preset,
                                       **overrides)
    else:
        overrides.setdefault("eval_spatial_size", (DEFAULT_SIZE, DEFAULT_SIZE))
        model = RTDETR.from_name(args.preset or DEFAULT_PRESET,
                                 num_classes=num_classes or getattr(args, "num_classes", None)
                                 or 80, **overrides)
    names = parse_names(getattr(args, "names", None))
    if names is not None:
        class_names = names
    if class_names is not None or category_ids is not None:
        if class_names is not None and len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} category names for a model of "
                             f"{model.num_classes} classes")
        model.set_categories(class_names if class_names is not None else model.config.class_names,
                             category_ids if category_ids is not None
                             else model.config.category_ids)
    if getattr(args, "deploy", False):
        model.deploy()
    return model.to(torch_device(args.device))
