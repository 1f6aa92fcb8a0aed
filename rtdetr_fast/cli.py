"""``rtdetr-fast``: the command line. The only place argparse lives.

Verbs: train, eval, predict, bench, info, demo. Model options take a preset and ``key=value``
overrides (``--set num_queries=100 decoder.num_points=2``). A checkpoint brings its own model
config (preset, queries, input size, category names); flags given explicitly win over it.
Errors a user can fix (a missing dataset, a wrong path, an unknown preset, a checkpoint that
does not fit) are one line on stderr and exit status 2. Arguments and paths are checked
(:func:`validate`) before torch is imported and before any work: a mistake is answered at once,
and nothing is built, trained or written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake on the command line (a flag's value, a path): one line, exit status 2."""


def _warn(verb: str, message: str) -> None:
    print(f"rtdetr-fast {verb}: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------- checks
# Everything below runs before torch is imported (``validate``), so that a mistake is answered
# at once and before any work: nothing is trained, built or written when one of them fails.

SIZE_MULTIPLE = 32
# what a checkpoint folder holds (model/checkpoint.py reads them)
FOLDER_FILES = ("config.json", "model.safetensors")


def _check_int(args, dest: str, minimum: int, what: str = "") -> None:
    value = getattr(args, dest, None)
    if value is not None and value < minimum:
        flag = "--" + dest.replace("_", "-")
        raise UsageError(f"{flag} must be >= {minimum}{what}, got {value}")


def check_size(verb: str, size: Optional[int], flag: str = "--size") -> None:
    """Input sizes: positive; a size that is not a multiple of 32 runs, with a warning."""
    if size is None:
        return
    if size < SIZE_MULTIPLE:
        raise UsageError(f"{flag} is the square input size in pixels: a multiple of "
                         f"{SIZE_MULTIPLE}, at least {SIZE_MULTIPLE} (e.g. 640), got {size}")
    if size % SIZE_MULTIPLE:
        lo = size // SIZE_MULTIPLE * SIZE_MULTIPLE
        _warn(verb, f"{flag} {size} is not a multiple of {SIZE_MULTIPLE} ({lo} or "
                    f"{lo + SIZE_MULTIPLE} are): the model runs, but matching the official "
                    "model's outputs and ONNX export need multiples of 32")


def _existing_parent(path: str) -> str:
    """The nearest folder above ``path`` (or ``path``) that exists; raises when a file is in the
    way."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def check_output_folder(path: str, flag: str) -> None:
    """A folder that exists and is writable, or one that can be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file, not a folder: give a folder to write into")
    parent = _existing_parent(path)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r} cannot be created: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        what = "folder" if parent == os.path.abspath(path) else f"folder {parent!r} above it"
        raise UsageError(f"{flag} {path!r} is not writable (no write permission on the {what})")


def check_output_file(path: str, flag: str) -> None:
    """A file that can be written: not a folder, in a folder that exists or can be created."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UsageError(f"{flag} {path!r} is a folder: give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path!r} is not writable")
    parent = _existing_parent(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r} cannot be created: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r} is not writable (no write permission on the folder "
                         f"{parent!r})")


def _is_torch_file(path: str) -> bool:
    """Whether ``path`` looks like a torch.save file: a zip archive with a data.pkl record, or
    a pickle (the format before torch 1.6). Reads the first bytes and the zip directory only."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


CHECKPOINT_KINDS = ("a .pth written by train, an official RT-DETR .pth, or a save_pretrained / "
                    "Hugging Face folder")


def check_checkpoint_path(path: Optional[str], flag: str = "--checkpoint") -> None:
    if not path:
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r} ({flag}: no such file or folder)")
    if os.path.isdir(path):
        missing = [f for f in FOLDER_FILES if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise UsageError(f"{flag} {path!r} is a folder without {' and '.join(missing)}: not "
                             f"a checkpoint folder (give {CHECKPOINT_KINDS})")
        return
    if not _is_torch_file(path):
        raise UsageError(f"{flag} {path!r} is not a checkpoint: not a file written by "
                         f"torch.save (give {CHECKPOINT_KINDS})")


def check_data_folder(root: str, splits: Sequence[str]) -> None:
    """The COCO layout ``train``/``eval`` read (engine.loaders.find_coco_split), checked for
    existence only."""
    if not os.path.exists(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise UsageError(f"--data {root!r} is a file: give a COCO folder ({{train,val}}[2017]/ "
                         "and annotations/instances_{train,val}[2017].json)")
    for split in splits:
        if not any(os.path.isdir(os.path.join(root, f"{split}{suffix}")) and os.path.isfile(
                os.path.join(root, "annotations", f"instances_{split}{suffix}.json"))
                for suffix in ("2017", "")):
            raise FileNotFoundError(f"no {split} split in {root!r}: expected {split}2017/ or "
                                    f"{split}/ and annotations/instances_{split}[2017].json")


def check_device(device: Optional[str]) -> None:
    import re

    if device is not None and not re.fullmatch(r"(cpu|cuda|mps|xpu|hpu|mtia|meta)(:\d+)?",
                                                device):
        raise UsageError(f"--device {device!r} is not a device: cpu, cuda or cuda:N")


def _check_model_args(args) -> None:
    verb = args.command
    _check_overrides(args)
    _check_int(args, "num_classes", 1)
    check_device(getattr(args, "device", None))
    check_checkpoint_path(getattr(args, "checkpoint", None))
    check_size(verb, getattr(args, "size", None))


def _validate_predict(args) -> None:
    _check_overrides(args)
    check_checkpoint_path(args.checkpoint)
    args.images = expand_image_inputs(args.images)
    if not args.checkpoint:
        raise UsageError("predict needs --checkpoint (" + CHECKPOINT_KINDS + ")")
    _check_model_args(args)
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold is the lowest score kept, between 0 and 1, got "
                         f"{args.threshold:g}")
    _parse_names(args.names)
    check_output_folder(args.out, "--out")
    readable = readable_images(args.images)
    args.unreadable = set(args.images) - set(readable)  # warned about; skipped, keeping ids


def _validate_train(args) -> None:
    for dest in ("epochs", "batch_size", "max_steps"):
        _check_int(args, dest, 1)
    for dest in ("workers", "warmup_steps", "stop_aug_epochs", "seed"):
        _check_int(args, dest, 0)
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr:g}")
    if args.backbone_lr is not None and not args.backbone_lr >= 0:
        raise UsageError(f"--backbone-lr must be >= 0, got {args.backbone_lr:g}")
    if args.resume and args.checkpoint:
        raise UsageError("give --resume (continue a run) or --checkpoint (start from weights), "
                         "not both")
    check_data_folder(args.data, ("train", "val"))
    _check_model_args(args)
    check_checkpoint_path(args.resume, "--resume")
    _parse_names(args.names)
    check_output_folder(args.output_dir, "--output-dir")
    check_earlier_run(args.output_dir, args.resume)


def check_earlier_run(output_dir: str, resume: Optional[str]) -> None:
    """A run does not overwrite the checkpoints of another one: an ``--output-dir`` that holds
    last.pth or best.pth is refused, except the folder of the run being resumed."""
    found = [f for f in ("last.pth", "best.pth") if os.path.isfile(os.path.join(output_dir, f))]
    if not found:
        return
    if resume and os.path.samefile(os.path.dirname(os.path.abspath(resume)), output_dir):
        return
    raise UsageError(f"--output-dir {output_dir!r} holds the checkpoints of another run "
                     f"({', '.join(found)}), which this one would overwrite: choose a new "
                     f"folder, or continue that run with --resume "
                     f"{os.path.join(output_dir, 'last.pth')}")


def _validate_eval(args) -> None:
    for dest in ("batch_size",):
        _check_int(args, dest, 1)
    _check_int(args, "workers", 0)
    check_data_folder(args.data, (args.split,))
    if not args.checkpoint:
        raise UsageError("eval needs --checkpoint (" + CHECKPOINT_KINDS + ")")
    _check_model_args(args)
    if args.json:
        check_output_file(args.json, "--json")


def _validate_bench(args) -> None:
    _check_int(args, "batch", 1)
    _check_int(args, "repeats", 1)
    _check_model_args(args)


def _validate_demo(args) -> None:
    for dest in ("epochs", "num_train", "num_val", "batch_size"):
        _check_int(args, dest, 1)
    _check_int(args, "seed", 0)
    if args.time_budget is not None and not args.time_budget > 0:
        raise UsageError(f"--time-budget is in seconds, > 0, got {args.time_budget:g}")
    check_device(args.device)
    check_output_folder(args.out, "--out")


def _validate_export(args) -> None:
    _check_overrides(args)
    _check_int(args, "num_classes", 1)
    check_checkpoint_path(args.checkpoint)
    check_output_file(args.output, "--output")


VALIDATORS = {"predict": _validate_predict, "train": _validate_train, "eval": _validate_eval,
              "bench": _validate_bench, "demo": _validate_demo, "export": _validate_export}


def validate(args) -> None:
    """The verb's arguments and paths, checked without importing torch; raises UsageError (or
    FileNotFoundError) with a one-line message."""
    check = VALIDATORS.get(args.command)
    if check is not None:
        check(args)
    args.validated = True


def _free_bytes(path: str) -> int:
    import shutil

    return shutil.disk_usage(_existing_parent(path)).free


def checkpoint_bytes(model) -> int:
    """What a run writes at most at once: last.pth (the weights, their EMA and AdamW's two
    moments: four copies), best.pth (one) and, while last.pth is replaced, a temporary copy of
    it (four more)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 9 * weights + (1 << 20)


def check_free_space(output_dir: str, model) -> None:
    """Before the first step: room in ``output_dir`` for the checkpoints the run writes."""
    need, free = checkpoint_bytes(model), _free_bytes(output_dir)
    if free < need:
        raise UsageError(f"--output-dir {output_dir!r}: not enough free space for the run's "
                         f"checkpoints: about {need / 2**20:.0f} MiB needed (last.pth, best.pth "
                         f"and a copy while saving), {free / 2**20:.0f} MiB free")


def _parse_overrides(items: List[str]) -> dict:
    """``key=value`` pairs; values are parsed as Python literals where possible."""
    import ast

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _device(name: str):
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device: cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return dev


DEFAULT_PRESET = "rtdetr_r18vd"
DEFAULT_SIZE = 640


def _looks_like_a_file(text: str) -> bool:
    """A ``--names`` value meant as a file: a path with a folder, or one word with an
    extension (``names.txt``); a category name is neither."""
    import re

    return "," not in text and ("/" in text or os.sep in text
                                or re.fullmatch(r"[^\s]+\.[A-Za-z0-9]{1,5}", text) is not None)


def _parse_names(text: Optional[str]) -> Optional[List[str]]:
    """``--names``: comma-separated category names, or a file with one name per line."""
    if not text:
        return None
    if os.path.isdir(text):
        raise UsageError(f"--names {text!r} is a folder: give comma-separated names or a file "
                         "with one name per line")
    if os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--names {text!r}: cannot read it as a text file of names "
                             f"({type(exc).__name__})") from exc
    elif _looks_like_a_file(text):
        raise FileNotFoundError(f"--names {text!r}: no such file (give comma-separated names, "
                                "e.g. --names cat,dog, or a file with one name per line)")
    else:
        names = [n.strip() for n in text.split(",")]
    if not names or not all(names):
        raise ValueError(f"--names {text!r}: expected comma-separated names or a file with one "
                         "name per line")
    return names


def _check_overrides(args) -> None:
    """Unknown keys and values of the wrong type in ``--set``, before any slow work."""
    from .config import get_config

    for key, value in _parse_overrides(args.set).items():
        try:
            get_config(DEFAULT_PRESET, 80, **{key: value})
        except ValueError as exc:
            if str(exc).startswith(("unknown override", "override ")):
                raise


def _build_model(args, num_classes: Optional[int] = None, checkpoint: Optional[str] = None,
                 class_names=None, category_ids=None):
    """A model from ``--checkpoint`` (its saved config, explicit flags winning) or from
    ``--preset``. ``num_classes`` different from the checkpoint's re-initialises the class
    heads (fine-tuning); ``class_names``/``category_ids`` are recorded in the model."""
    from . import RTDETR

    overrides = _parse_overrides(args.set)
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
    names = _parse_names(getattr(args, "names", None))
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
    return model.to(_device(args.device))


def cmd_info(args) -> int:
    from .info import main as info_main

    return info_main([])  # its own options are python -m rtdetr_fast.info's


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


def expand_image_inputs(items: List[str]) -> List[str]:
    """Files, folders (their image files, sorted) and glob patterns -> image paths, in order,
    without repeats. A path that does not exist and matches nothing is an error."""
    import glob

    out: List[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(item, f)))
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                                        f"folder {item!r}")
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"no image file, folder or glob match at {item!r}")
        out.extend(p for p in found if p not in out)
    return out


def readable_images(paths: List[str], verb: str = "predict") -> List[str]:
    """The paths whose file is an image Pillow recognises (its header only is read; a file
    that is damaged further on is found when it is decoded). Unrecognised ones are skipped with
    a one-line warning; none readable is an error."""
    from PIL import Image

    out, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 - the header is parsed by open
        except Exception as exc:  # Pillow raises several types for foreign or damaged files
            bad.append((path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        out.append(path)
    if not out:
        path, reason = bad[0]
        raise UsageError(f"{path!r} is not a readable image ({reason})" if len(paths) == 1 else
                         f"none of the {len(paths)} inputs is a readable image ({path!r}: "
                         f"{reason})")
    for path, reason in bad:
        _warn(verb, f"skipping {path}: not a readable image ({reason})")
    return out


def unique_output_names(paths: List[str], suffix: str = "_det.png") -> List[str]:
    """One output file name per input; inputs that share a file name get their parent
    folder's name in front (then a counter), so no output overwrites another."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    used, out = set(), []
    for path, stem in zip(paths, stems):
        if counts[stem] > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
            stem = f"{parent}_{stem}" if parent else stem
        name, k = stem + suffix, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}{suffix}"
        used.add(name)
        out.append(name)
    return out


def cmd_predict(args) -> int:
    import json

    from .data.images import load_image
    from .visualize import detections_to_records, draw_detections

    paths = args.images  # files (validate expanded folders and globs)
    unreadable = getattr(args, "unreadable", set())
    model = _build_model(args).eval()
    names = model.class_names
    cat_ids = list(model.config.category_ids) or list(range(model.num_classes))
    os.makedirs(args.out, exist_ok=True)
    records, failed = [], 0
    for image_id, (path, png) in enumerate(zip(paths, unique_output_names(paths)), start=1):
        if path in unreadable:
            failed += 1
            continue
        try:
            image = load_image(path)
        except (ValueError, OSError) as exc:
            failed += 1
            print(f"rtdetr-fast predict: warning: skipping {path}: {str(exc).splitlines()[0]}",
                  file=sys.stderr)
            continue
        det = model.predict(image, threshold=args.threshold)[0]
        out_png = os.path.join(args.out, png)
        draw_detections(image, det, class_names=names).save(out_png)
        records.extend(detections_to_records(det, image_id, path, names, cat_ids,
                                             image_size=tuple(image.shape[-2:])))
        print(f"{path}: {len(det['scores'])} detections -> {out_png}")
    if failed == len(paths):
        # nothing read: an earlier run's detections.json is left as it was
        print(f"rtdetr-fast predict: error: none of the {len(paths)} images could be read",
              file=sys.stderr)
        return 1
    json_path = os.path.join(args.out, "detections.json")
    with open(json_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    print(f"{len(paths) - failed} images, {len(records)} detections (score >= {args.threshold})"
          f" -> {json_path}" + (f"; {failed} unreadable images skipped" if failed else ""))
    return 0


def _checkpoint_size(path: Optional[str]):
    """The input size saved in a checkpoint's config, or None."""
    if not path:
        return None
    from .model.checkpoint import CheckpointError, read_checkpoint

    try:
        if os.path.isdir(path):
            import json

            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f).get("rtdetr_fast") or {}
        else:
            cfg = read_checkpoint(path)[1] or {}
    except (OSError, ValueError, CheckpointError):
        return None
    size = cfg.get("eval_spatial_size")
    return tuple(size) if size else None


def _datasets(args, size, augment="official"):
    from .engine.loaders import coco_datasets

    return coco_datasets(args.data, size, augment=augment)


def _flag_text(dest, value) -> str:
    from .engine.plan import RECIPE_FLAGS

    option = RECIPE_FLAGS[dest]
    if dest == "multi_scale":
        return "--multi-scale" if value else "--no-multi-scale"
    if dest == "no_ema":
        return option
    return f"{option} {value:g}" if isinstance(value, float) else f"{option} {value}"


def _epochs_text(what: str, stop: Optional[int], epochs: int) -> str:
    """'<what> in epochs 1-9 of 12' (epochs counted from 1, as everywhere the user sees them)."""
    if stop is None or stop >= epochs:
        return f"{what} every epoch"
    if stop <= 0:
        return f"no {what}"
    return f"{what} in epoch{' 1' if stop == 1 else f's 1-{stop}'} of {epochs}"


def recipe_line(plan, trainer) -> str:
    """The one line saying which recipe the run uses and what the flags overrode."""
    cfg = trainer.cfg
    groups = ", ".join(f"{g.get('name', i)} {base:g}" for i, (g, base) in
                       enumerate(zip(trainer.optimizer.param_groups, trainer.schedule.base)))
    aug = {"official": "strong augmentation", "light": "light augmentation",
           "none": "no augmentation"}[plan.augment]
    if plan.augment == "none":
        pipeline = aug
    else:
        pipeline = _epochs_text(aug, plan.stop_epoch, plan.epochs)
    ms = _epochs_text("multi-scale", plan.multi_scale_stop_epoch, plan.epochs) \
        if plan.multi_scale else "no multi-scale"
    ema = f"EMA decay {cfg.ema_decay:.4g}" if cfg.ema else "no EMA"
    if plan.recipe is None:
        head = f"recipe: none for {plan.preset} (v1 presets train with the command's defaults)"
    else:
        r = plan.recipe
        src = ", from the resumed checkpoint" if plan.from_checkpoint else ""
        from .engine.recipes import recipe_for

        base = recipe_for(plan.preset)
        head = f"recipe: {plan.preset} ({base.epochs} epochs{src})"
        if plan.epochs != base.epochs:
            head += f", run for {plan.epochs}"
        loss = " ".join(f"{k[len('loss_'):]} {v:g}" for k, v in r.loss_weights)
        ms += f"; loss {loss}"
    flags = ", ".join(_flag_text(k, v) for k, v in plan.overrides) or "nothing"
    return (f"{head}: {pipeline}; {ms}; AdamW {groups} (weight decay {cfg.weight_decay:g}); "
            f"{ema}; clip {cfg.clip_max_norm:g}; overridden by flags: {flags}")


def prepare_train(args):
    """Everything ``rtdetr-fast train`` does before training: data, model, plan, loader and the
    Trainer (resumed when asked). Returns (trainer, plan, info) with info the numbers the
    command prints."""
    from .engine import distributed as D
    from .data.policies import EpochCollate, StopEpochPolicy
    from .engine.loaders import coco_evaluate_fn, make_loader
    from .engine.plan import plan_training, saved_train_config
    from .engine.train import TrainConfig, Trainer, scaled_schedule
    from .data.transforms import MultiScaleCollate, collate_fn

    if not getattr(args, "validated", False):
        validate(args)
    device = D.init_distributed(args.device)
    from .engine.seeding import seed_everything, set_deterministic

    if args.deterministic:
        set_deterministic(True)
    # one seed for the whole run; the same on every rank, so the initialisation is identical
    # (each rank's data order share, augmentation and denoising noise differ by rank). A resumed
    # run without --seed continues with the seed saved in its checkpoint.
    seed = args.seed if args.seed is not None else (None if args.resume else 0)
    seed_everything(seed or 0)
    if args.amp != "none" and device.type == "cpu":
        print(f"rtdetr-fast train: warning: --amp {args.amp} on a CPU is usually much slower "
              "than float32 (--amp none)", file=sys.stderr)
    saved = saved_train_config(args.resume) if args.resume else None
    augment = args.augment
    if augment is None and saved and saved.get("recipe"):
        # a recipe run's --augment is part of what it resumes with
        augment = dict(saved.get("recipe_overrides") or ()).get("augment")
    augment = augment or "official"
    # the input size: --size, else the checkpoint's, else 640
    size = args.size or (_checkpoint_size(args.checkpoint or args.resume)
                         or (DEFAULT_SIZE,) * 2)[0]
    args.size = size
    train_ds, val_ds = _datasets(args, (size, size), augment)
    if len(train_ds) == 0:
        raise ValueError(f"the training set of {args.data!r} lists no images")
    names = train_ds.class_names
    if args.resume:
        # the run's own model config; the class count must be the data set's
        model = _build_model(args, checkpoint=args.resume)
        if model.num_classes != train_ds.num_classes:
            raise ValueError(f"cannot resume {args.resume!r}: it was trained for "
                             f"{model.num_classes} classes, the data set has "
                             f"{train_ds.num_classes}")
        model.set_categories(_parse_names(args.names) or names, train_ds.label_to_cat_id)
        if saved is None:
            saved = {}  # a checkpoint without train_config: the v1 groups, as it was trained
    else:
        model = _build_model(args, num_classes=train_ds.num_classes, class_names=names,
                             category_ids=train_ds.label_to_cat_id)
    check_free_space(args.output_dir, model)
    plan = plan_training(args, model.config.name, saved if args.resume else None)
    if plan.recipe is None:
        collate = collate_fn
        if plan.multi_scale:
            sizes = [s for s in range(int(size * 0.75) // 32 * 32, int(size * 1.25) + 1, 32)]
            collate = MultiScaleCollate(sizes=sizes, stop_epoch=plan.multi_scale_stop_epoch)
    else:
        tf = train_ds.transforms
        policy = StopEpochPolicy(getattr(tf, "transforms", [tf]), plan.stop_epoch)
        train_ds.transforms = policy
        collate = plan.recipe.collate(size, policy) if plan.multi_scale else \
            EpochCollate(collate_fn, policy)
    loader = make_loader(train_ds, args.batch_size, train=True, workers=args.workers,
                         collate=collate, seed=seed or 0)
    steps_per_epoch = len(loader) if not args.max_steps else min(len(loader), args.max_steps)
    total = steps_per_epoch * plan.epochs
    r = plan.recipe
    sched = scaled_schedule(total) if r is None else scaled_schedule(
        total, r.warmup_steps, r.ema_warmups, r.ema_decay)
    if plan.warmup_steps is not None:
        sched["warmup_steps"] = plan.warmup_steps
    extra = {} if r is None else dict(
        recipe=plan.preset, weight_decay=r.weight_decay, betas=r.betas,
        clip_max_norm=r.clip_max_norm,
        recipe_overrides=tuple((k, v) for k, v in plan.overrides if k != "epochs"))
    cfg = TrainConfig(epochs=plan.epochs, lr=plan.lr, backbone_lr=plan.backbone_lr,
                      warmup_steps=sched["warmup_steps"], ema_decay=sched["ema_decay"],
                      ema_warmups=sched["ema_warmups"], amp=args.amp, sync_bn=args.sync_bn,
                      output_dir=args.output_dir, ema=plan.ema,
                      max_steps_per_epoch=args.max_steps, seed=seed,
                      deterministic=args.deterministic, **extra)
    evaluate_fn = coco_evaluate_fn(val_ds, args.batch_size, device, workers=args.workers,
                                   progress=D.is_main_process())
    trainer = Trainer(model, loader, cfg, evaluate_fn=evaluate_fn, device=device)
    if args.resume:
        trainer.resume(args.resume)
        for obj in (loader.sampler, loader.worker_init_fn):
            obj.seed = trainer.cfg.seed if trainer.cfg.seed is not None else 0
        if trainer.epoch >= cfg.epochs:
            raise ValueError(f"nothing to train: {args.resume!r} has already trained "
                             f"{trainer.epoch} epochs; pass --epochs larger than "
                             f"{trainer.epoch} to train more")
    info = dict(size=size, train_images=len(train_ds), steps_per_epoch=steps_per_epoch)
    return trainer, plan, info


def cmd_train(args) -> int:
    from .engine import distributed as D

    trainer, plan, info = prepare_train(args)
    model, cfg = unwrap_model(trainer.model), trainer.cfg
    if D.is_main_process():
        print(recipe_line(plan, trainer), file=sys.stderr)
        print(f"training {model.config.name} ({model.num_classes} classes: "
              f"{', '.join(model.class_names[:10])}{' ...' if model.num_classes > 10 else ''}) "
              f"at {info['size']}x{info['size']} on {info['train_images']} images: "
              f"{cfg.epochs} epochs x {info['steps_per_epoch']} steps of {args.batch_size}; "
              f"warm-up {cfg.warmup_steps} steps, EMA decay {cfg.ema_decay:.4g}",
              file=sys.stderr)
    records = trainer.fit()
    if D.is_main_process() and records:
        last = records[-1]
        print(f"trained {trainer.epoch} epochs, {trainer.step} steps; last loss "
              f"{last.get('train_loss', float('nan')):.3f}; AP "
              f"{last.get('eval_AP', float('nan')):.3f}; checkpoints in {cfg.output_dir} "
              f"(best.pth: the model for eval/predict; last.pth: to --resume)")
    D.cleanup()
    return 0


def unwrap_model(model):
    from .engine.ema import unwrap

    return unwrap(model)


def cmd_eval(args) -> int:
    from .engine.evaluate import CocoEvaluator, evaluate
    from .engine.loaders import find_coco_split, make_loader
    from .data.coco import CocoDetection
    from .data.transforms import eval_transforms

    images, ann = find_coco_split(args.data, args.split)
    model = _build_model(args)
    size = tuple(model.config.eval_spatial_size)
    ds = CocoDetection(images, ann, transforms=eval_transforms(size))
    if model.num_classes != ds.num_classes:
        raise ValueError(f"the checkpoint has {model.num_classes} classes, the {args.split} set "
                         f"of {args.data!r} has {ds.num_classes}; evaluate on data with the "
                         "same categories (or fine-tune with train --checkpoint first)")
    # the checkpoint's label -> category id mapping when it names the same ids as the data
    ids = list(model.config.category_ids)
    mapping = ids if ids and set(ids) == set(ds.label_to_cat_id) else ds.label_to_cat_id
    evaluator = CocoEvaluator(ds.coco, mapping)
    loader = make_loader(ds, args.batch_size, train=False, workers=args.workers)
    stats = evaluate(model, loader, _device(args.device), evaluator, progress=True)
    for k, v in stats.items():
        print(f"{k:<6} {v:.3f}")
    per_class = evaluator.per_class_ap()
    if per_class:
        width = max(8, *(len(r["name"]) for r in per_class))
        print(f"\n{'category':<{width}}  {'id':>4}  {'AP':>6}  {'AP50':>6}  {'objects':>7}")
        for r in per_class:
            print(f"{r['name']:<{width}}  {r['category_id']:>4}  {r['AP']:>6.3f}  "
                  f"{r['AP50']:>6.3f}  {r['objects']:>7}")
    if args.json:
        import json

        parent = os.path.dirname(args.json)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": args.checkpoint, "data": args.data, "split": args.split,
                       "input_size": list(size), "metrics": stats, "per_class": per_class},
                      f, indent=2)
        print(f"wrote {args.json}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    run_bench(preset=args.preset or DEFAULT_PRESET, size=args.size or DEFAULT_SIZE,
              batch=args.batch, device=args.device,
              repeats=args.repeats, set_overrides=_parse_overrides(args.set))
    return 0


def cmd_demo(args) -> int:
    from .engine.demo import run_demo

    summary = run_demo(out_dir=args.out, epochs=args.epochs, num_train=args.num_train,
                       num_val=args.num_val, batch_size=args.batch_size,
                       time_budget=args.time_budget, device=str(_device(args.device)),
                       seed=args.seed, progress=not args.no_progress)
    return 0 if summary["metrics"] else 1


def cmd_export(args) -> int:
    from .export_cli import run_export

    return run_export(args, _build_model)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None, off switches)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default == []:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)parser shows defaults in --help; a mistake is one line (no usage block)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message.splitlines()[0]} "
                              f"({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    from .config import list_presets

    p = _Parser(prog="rtdetr-fast",
                description="RT-DETR object detection: train, evaluate, predict, export and "
                            "benchmark. `rtdetr-fast VERB --help` for a verb's options.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(sp, size=DEFAULT_SIZE):
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

    s = sub.add_parser("info", help="versions, extension build, backends per op and device")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("predict", help="detect objects in images and write annotated PNGs")
    s.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files, folders (their images) or glob patterns ('data/*.jpg')")
    s.add_argument("--out", default="outputs",
                   help="folder for one <name>_det.png per image and detections.json")
    s.add_argument("--threshold", type=float, default=0.5, help="keep detections scoring at least this")
    s.add_argument("--names", help="category names, comma-separated or a file with one per "
                                   "line (default: the names saved in the checkpoint)")
    s.add_argument("--deploy", action="store_true",
                   help="run the deployed form (RepConv and batch norms folded; on the CPU "
                        "the Winograd RepConv kernel and fused convs): faster")
    model_args(s)
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("train", help="train on a COCO-format dataset (torchrun for DDP)")
    s.add_argument("--data", required=True,
                   help="COCO folder: train2017/ val2017/ (or train/ val/) + "
                        "annotations/instances_{train,val}[2017].json")
    s.add_argument("--epochs", type=int, default=None,
                   help="epochs to train, in all with --resume (default: 72); an rtdetrv2 "
                        "preset's default is its recipe's, a resumed run's its own")
    s.add_argument("--batch-size", type=int, default=4, help="images per step (per GPU)")
    s.add_argument("--lr", type=float, default=None,
                   help="base learning rate: the encoder's and decoder's (default: 1e-4, an "
                        "rtdetrv2 preset's recipe's)")
    s.add_argument("--backbone-lr", type=float, default=None,
                   help="learning rate of the backbone (default: 1e-5; an rtdetrv2 preset's "
                        "recipe sets it per preset)")
    s.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: 5%% of the run's steps, at most 2000)")
    s.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision (GPUs; slow on CPUs)")
    s.add_argument("--resume", help="continue a run from its last.pth")
    s.add_argument("--names", help="category names, comma-separated or a file with one per "
                                   "line (default: the data set's category names)")
    s.add_argument("--output-dir", default="outputs/train",
                   help="where last.pth, best.pth and log.jsonl go")
    s.add_argument("--augment", choices=["official", "light", "none"], default=None,
                   help="train augmentation: the RT-DETR pipeline, photometric + flip, or none "
                        "(default: official)")
    s.add_argument("--multi-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="random input size per batch (default: off; an rtdetrv2 preset's "
                        "recipe's)")
    s.add_argument("--stop-aug-epochs", type=int, default=None,
                   help="final epochs without multi-scale (default: 2) and, with a recipe, "
                        "without strong augmentation (default: the recipe's, scaled to "
                        "--epochs)")
    s.add_argument("--workers", type=int, default=2, help="data loader processes")
    s.add_argument("--sync-bn", action="store_true", help="synchronised batch norm (torchrun)")
    s.add_argument("--no-ema", action="store_true", help="no weight EMA")
    s.add_argument("--max-steps", type=int, help="cap on steps per epoch (smoke runs)")
    s.add_argument("--seed", type=int, default=None,
                   help="seed of the initialisation, data order, augmentation and denoising "
                        "noise (default: 0, or the resumed checkpoint's)")
    s.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (torch.use_deterministic_algorithms); "
                        "an op without a deterministic form is an error")
    model_args(s)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="COCO evaluation of a model on a dataset split")
    s.add_argument("--data", required=True, help="COCO folder, as for train")
    s.add_argument("--split", default="val", choices=["train", "val"], help="split to evaluate")
    s.add_argument("--batch-size", type=int, default=4, help="images per batch")
    s.add_argument("--workers", type=int, default=0, help="data loader processes")
    s.add_argument("--json", help="also write the metrics and per-class AP to this JSON file")
    model_args(s)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("bench", help="time the model and each op per backend")
    s.add_argument("--batch", type=int, default=1, help="batch size")
    s.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    model_args(s)
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("demo", help="synthetic data, train, evaluate, draw: no download")
    s.add_argument("--out", default="demo_output", help="folder for data, checkpoints, PNGs")
    s.add_argument("--epochs", type=int, default=12, help="training epochs")
    s.add_argument("--num-train", type=int, default=400, help="generated training images")
    s.add_argument("--num-val", type=int, default=60, help="generated held-out images")
    s.add_argument("--batch-size", type=int, default=8, help="images per step")
    s.add_argument("--time-budget", type=float, default=None,
                   help="stop training early so the run ends within this many seconds")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_demo)

    from .export_cli import add_export_parser

    add_export_parser(sub, list_presets(), DEFAULT_PRESET).set_defaults(fn=cmd_export)
    return p


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"rtdetr-fast: warning: {str(message).splitlines()[0]}\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "images") and getattr(args, "set", None):
        # `--set a=1 img.jpg`: --set takes every word after it; the images are the words
        # that are not key=value
        args.images = list(args.images) + [x for x in args.set if "=" not in x]
        args.set = [x for x in args.set if "=" in x]
    if hasattr(args, "images") and not args.images:
        parser.error("predict: give at least one image file, folder or glob")
    # warnings (a skipped image, ...) as one line without the source line, also in workers
    import warnings

    warnings.formatwarning = _one_line_warning
    try:
        validate(args)  # before torch is imported: a mistake is answered at once
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"rtdetr-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        answer = _error_answer(exc)
        if answer is None:
            raise
        message, code = answer
        print(f"rtdetr-fast {args.command}: error: {message}", file=sys.stderr)
        return code


# path errors: the user's to fix (exit 2); another OSError (a full disk...) exits 1
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError)


def _error_answer(exc: BaseException) -> Optional[Tuple[str, int]]:
    """(one-line message, exit status) for the errors a user can act on; None for a bug (its
    traceback is shown)."""
    def first_line(text: str) -> str:
        return text.splitlines()[0] if text else type(exc).__name__

    # the package's own error types, when their modules were imported (else none was raised)
    own = []
    for module, name in (("rtdetr_fast.model.checkpoint", "CheckpointError"),
                         ("rtdetr_fast.engine.train", "TrainingDiverged")):
        if module in sys.modules:
            own.append(getattr(sys.modules[module], name))
    if isinstance(exc, OSError):
        text = (f"{exc.strerror}: {exc.filename!r}" if exc.strerror and exc.filename
                else first_line(str(exc)))
        return text, EXIT_USAGE if isinstance(exc, PATH_ERRORS) else 1
    if isinstance(exc, (ValueError, *own)):
        return first_line(str(exc)), EXIT_USAGE
    if isinstance(exc, RuntimeError) and "does not have a deterministic implementation" in str(exc):
        # torch's and the ops' refusal under --deterministic: one line, not a traceback
        import re

        what = re.split(r"\. |; ", first_line(str(exc)))[0]
        return (f"{what}; drop --deterministic or choose a backend that has one "
                "(RTDETR_FAST_BACKEND=native)", EXIT_USAGE)
    return None


if __name__ == "__main__":
    sys.exit(main())
