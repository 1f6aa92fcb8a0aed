"""``rtdetr-fast``: the command line. The only place argparse lives.

Verbs: train, eval, predict, export, bench, demo, info, one module each in this package, each
with its options (``add_parser``), its argument checks (``check``) and what it runs (``run``).
Model options take a preset and ``key=value`` overrides (``--set num_queries=100
decoder.num_points=2``). A checkpoint brings its own model config (preset, queries, input size,
category names); flags given explicitly win over it. Errors a user can fix (a missing dataset, a
wrong path, an unknown preset, a checkpoint that does not fit) are one line on stderr and exit
status 2. Arguments and paths are checked (:func:`validate`) before torch is imported and before
any work: a mistake is answered at once, and nothing is built, trained or written. The verb
modules import torch and the model inside ``run``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

from . import bench, demo, eval, export, info, predict, train
from ._checks import EXIT_USAGE

# the verbs, in the order --help lists them
VERBS = {"info": info, "predict": predict, "train": train, "eval": eval, "bench": bench,
         "demo": demo, "export": export}


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
    p = _Parser(prog="rtdetr-fast",
                description="RT-DETR object detection: train, evaluate, predict, export and "
                            "benchmark. `rtdetr-fast VERB --help` for a verb's options.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in VERBS.values():
        module.add_parser(sub)
    return p


def validate(args) -> None:
    """The verb's arguments and paths, checked without importing torch; raises UsageError (or
    FileNotFoundError) with a one-line message."""
    check = getattr(VERBS[args.command], "check", None)
    if check is not None:
        check(args)
    args.validated = True


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"rtdetr-fast: warning: {str(message).splitlines()[0]}\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verb = VERBS[args.command]
    if hasattr(verb, "finish_args"):  # what argparse cannot say (predict's images)
        verb.finish_args(args, parser)
    # warnings (a skipped image, ...) as one line without the source line, also in workers
    import warnings

    warnings.formatwarning = _one_line_warning
    try:
        validate(args)  # before torch is imported: a mistake is answered at once
        return verb.run(args)
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
