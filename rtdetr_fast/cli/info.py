"""``rtdetr-fast info``: versions, the extension's build, the backend of each op per device
(``python -m rtdetr_fast.info`` has the options, ``--check`` among them)."""
from __future__ import annotations


def add_parser(sub):
    return sub.add_parser("info", help="versions, extension build, backends per op and device")


def run(args) -> int:
    from ..info import main as info_main

    return info_main([])  # its own options are python -m rtdetr_fast.info's
