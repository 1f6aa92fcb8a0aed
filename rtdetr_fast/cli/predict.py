"""``rtdetr-fast predict``: detect objects in images, write annotated PNGs and
detections.json."""
from __future__ import annotations

import os
import sys
from typing import List

from . import _model
from ._checks import (CHECKPOINT_KINDS, UsageError, check_checkpoint_path, check_model_args,
                      check_output_folder, check_overrides, parse_names, warn)
from ._model import add_model_args


def add_parser(sub):
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
    add_model_args(s)
    return s


def finish_args(args, parser) -> None:
    """``--set a=1 img.jpg``: --set takes every word after it; the images are the words that are
    not key=value. No image at all is a usage error."""
    if getattr(args, "set", None):
        args.images = list(args.images) + [x for x in args.set if "=" not in x]
        args.set = [x for x in args.set if "=" in x]
    if not args.images:
        parser.error("predict: give at least one image file, folder or glob")


def check(args) -> None:
    check_overrides(args)
    check_checkpoint_path(args.checkpoint)
    args.images = expand_image_inputs(args.images)
    if not args.checkpoint:
        raise UsageError("predict needs --checkpoint (" + CHECKPOINT_KINDS + ")")
    check_model_args(args)
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold is the lowest score kept, between 0 and 1, got "
                         f"{args.threshold:g}")
    parse_names(args.names)
    check_output_folder(args.out, "--out")
    readable = readable_images(args.images)
    args.unreadable = set(args.images) - set(readable)  # warned about; skipped, keeping ids


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
        warn(verb, f"skipping {path}: not a readable image ({reason})")
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


def run(args) -> int:
    import json

    from ..data.images import load_image
    from ..visualize import detections_to_records, draw_detections

    paths = args.images  # files (validate expanded folders and globs)
    unreadable = getattr(args, "unreadable", set())
    model = _model.build_model(args).eval()
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
