"""The argument and path checks the verbs share, and the command line's error type.

Everything here runs before torch is imported (``rtdetr_fast.cli.validate``), so that a mistake
is answered at once and before any work: nothing is trained, built or written when one of them
fails.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from ..config import get_config

EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake on the command line (a flag's value, a path): one line, exit status 2."""


def warn(verb: str, message: str) -> None:
    print(f"rtdetr-fast {verb}: warning: {message}", file=sys.stderr)


DEFAULT_PRESET = "rtdetr_r18vd"
DEFAULT_SIZE = 640
SIZE_MULTIPLE = 32
# what a checkpoint folder holds (model/checkpoint.py reads them)
FOLDER_FILES = ("config.json", "model.safetensors")


def check_int(args, dest: str, minimum: int, what: str = "") -> None:
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
        warn(verb, f"{flag} {size} is not a multiple of {SIZE_MULTIPLE} ({lo} or "
                   f"{lo + SIZE_MULTIPLE} are): the model runs, but matching the official "
                   "model's outputs and ONNX export need multiples of 32")


def existing_parent(path: str) -> str:
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
    parent = existing_parent(path)
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
    parent = existing_parent(os.path.dirname(os.path.abspath(path)))
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


def check_model_args(args) -> None:
    verb = args.command
    check_overrides(args)
    check_int(args, "num_classes", 1)
    check_device(getattr(args, "device", None))
    check_checkpoint_path(getattr(args, "checkpoint", None))
    check_size(verb, getattr(args, "size", None))


def parse_overrides(items: List[str]) -> dict:
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


def _looks_like_a_file(text: str) -> bool:
    """A ``--names`` value meant as a file: a path with a folder, or one word with an
    extension (``names.txt``); a category name is neither."""
    import re

    return "," not in text and ("/" in text or os.sep in text
                                or re.fullmatch(r"[^\s]+\.[A-Za-z0-9]{1,5}", text) is not None)


def parse_names(text: Optional[str]) -> Optional[List[str]]:
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


def check_overrides(args) -> None:
    """Unknown keys and values of the wrong type in ``--set``, before any slow work."""
    for key, value in parse_overrides(args.set).items():
        try:
            get_config(DEFAULT_PRESET, 80, **{key: value})
        except ValueError as exc:
            if str(exc).startswith(("unknown override", "override ")):
                raise
