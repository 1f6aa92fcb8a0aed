"""The engine, data and command-line modules import without cycles: each module of
rtdetr_fast.engine imports alone in a fresh interpreter, and no chain of imports (function-level
ones included, so that a cycle cannot hide inside a function) leads from one of those modules
back to itself."""
import ast
import os
import subprocess
import sys

import pytest

import rtdetr_fast

PACKAGE = os.path.dirname(rtdetr_fast.__file__)
CHECKED = ("rtdetr_fast.engine", "rtdetr_fast.data", "rtdetr_fast.cli")


def package_modules():
    """module name -> (file, whether it is a package's __init__)."""
    out = {}
    root = os.path.dirname(PACKAGE)
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                if f == "__init__.py":
                    name = name[:-len(".__init__")]
                out[name] = (path, f == "__init__.py")
    return out


def import_graph():
    """module -> the package's modules it imports, at module level or inside functions."""
    mods = package_modules()
    graph = {}
    for name, (path, is_package) in mods.items():
        package = name if is_package else name.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1])
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in mods else source)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def test_no_import_cycle_through_engine_data_or_cli():
    graph = import_graph()
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    ours = [c for c in cycles if any(m.startswith(CHECKED) for m in c)]
    assert not ours, " ; ".join(" -> ".join(c) for c in ours)


ENGINE = sorted(m for m in package_modules() if m.startswith("rtdetr_fast.engine."))


@pytest.mark.parametrize("module", ENGINE)
def test_each_engine_module_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
