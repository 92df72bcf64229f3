"""The layering rule, checked by parsing every module's imports (``ast``, nothing is imported).

Floors only look down::

    ground   errors artifacts copying options progress envinfo flow tokenizer validators threads child
    model    pipeline generator data presets components parity merge
    runtime  runtime/*  generate
    stages   quantize/*  →  convert/*   (convert may import quantize, never the reverse)
             train/*                    (train and convert never import each other)
    digits   digits/*
    entry    cli/*  bench/*  report/*

An internal import sits at its module's top, unless it is *heavy* (the imported module pulls torch,
numpy, onnx… at import time) or it is made by an entry module (the CLI loads a command's verb only when
the command runs, so ``--help`` stays fast).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"instaflow_edge": "instaflow_edge", "train": "instaflow_edge.train", "convert": "instaflow_edge.convert",
                "quantize": "instaflow_edge.quantize", "bench": "instaflow_edge.bench"}
HEAVY_THIRD_PARTY = {"torch", "numpy", "scipy", "sklearn", "diffusers", "transformers", "onnx", "onnxruntime",
                     "coremltools", "accelerate", "neural_compressor", "PIL", "safetensors", "openvino", "nncf",
                     "executorch", "torchao"}

# (floor, group): an import may go to a lower floor, or within its own group
_GROUND = ("errors", "artifacts", "copying", "options", "progress", "envinfo", "flow", "tokenizer", "validators", "threads", "child")
_MODEL = ("pipeline", "model_files", "hub", "generator", "data", "presets", "components", "parity", "merge")


def place(module: str) -> tuple[int, str]:
    """The floor and group of an ``instaflow_edge`` module."""
    parts = module.split(".")
    if parts == ["instaflow_edge"]:
        return 0, "ground"
    head = parts[1]
    if head in _GROUND:
        return 0, "ground"
    if head in _MODEL:
        return 1, "model"
    if head in ("runtime", "generate"):
        return 2, "runtime"
    if head == "quantize":
        return 3, "quantize"
    if head in ("convert", "train"):
        return 4, head
    if head == "digits":
        return 5, "digits"
    if head in ("cli", "bench", "report"):
        return 6, "entry"
    raise AssertionError(f"module {module} has no floor: add it to tests/test_layers.py (and docs/DESIGN.md)")


def module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    name = PACKAGE_DIRS[parts[0]].split(".") + parts[1:]
    is_pkg = name[-1] == "__init__"
    return ".".join(name[:-1] if is_pkg else name), is_pkg


def sources() -> dict[str, tuple[str, bool]]:
    """``{module: (source, is_package)}`` of every installed module."""
    out = {}
    for top in PACKAGE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            name, is_pkg = module_name(path)
            out[name] = (path.read_text(encoding="utf-8"), is_pkg)
    return out


def imports(module: str, source: str, is_pkg: bool) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module top)`` for every import in ``source``; ``from pkg import sub``
    resolves to ``pkg.sub`` when the caller knows ``pkg.sub`` is a module (see :func:`resolve`)."""
    tree = ast.parse(source)
    top_level = {id(n) for n in tree.body}
    # imports under `if TYPE_CHECKING:` or `try:` at module level count as top level
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top_level |= {id(m) for m in ast.walk(n)}
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - (node.level - 1)]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                out.append((f"{target}\0{a.name}", node.lineno, id(node) in top_level))
    return out


def resolve(entry: str, known: set[str]) -> str:
    """``pkg\\0name`` → ``pkg.name`` if that is a module, else ``pkg``."""
    if "\0" not in entry:
        return entry
    pkg, name = entry.split("\0")
    return f"{pkg}.{name}" if f"{pkg}.{name}" in known else pkg


def heavy_modules(srcs: dict[str, tuple[str, bool]]) -> set[str]:
    """Internal modules whose import pulls a heavy third-party library, directly or through others."""
    known = set(srcs)
    graph: dict[str, set[str]] = {}
    heavy: set[str] = set()
    for mod, (src, is_pkg) in srcs.items():
        graph[mod] = set()
        for entry, _, top in imports(mod, src, is_pkg):
            if not top:
                continue
            target = resolve(entry, known)
            if target.split(".")[0] in HEAVY_THIRD_PARTY:
                heavy.add(mod)
            elif target in known:
                graph[mod].add(target)
    changed = True
    while changed:
        changed = False
        for mod, deps in graph.items():
            if mod not in heavy and deps & heavy:
                heavy.add(mod)
                changed = True
    return heavy


def violations(srcs: dict[str, tuple[str, bool]]) -> list[str]:
    known = set(srcs)
    heavy = heavy_modules(srcs)
    out = []
    for mod, (src, is_pkg) in sorted(srcs.items()):
        floor, group = place(mod)
        for entry, line, top in imports(mod, src, is_pkg):
            target = resolve(entry, known)
            if not target.startswith("instaflow_edge") or target == mod:
                continue
            t_floor, t_group = place(target)
            if t_floor > floor or (t_floor == floor and t_group != group):
                out.append(f"{mod}:{line} imports {target} ({group} may not import {t_group})")
            elif not top and group != "entry" and target not in heavy:
                out.append(f"{mod}:{line} imports {target} inside a function: move it to the module top")
    return out


def test_every_module_has_a_floor():
    for mod in sources():
        place(mod)


def test_imports_only_look_down():
    assert violations(sources()) == []


@pytest.mark.parametrize("module,planted,expected", [
    ("instaflow_edge.quantize.onnx", "from ..convert import onnx as _onnx\n", "quantize may not import convert"),
    ("instaflow_edge.train.reflow", "from ..convert.config import ConvertConfig\n", "train may not import convert"),
    ("instaflow_edge.generate", "from .quantize.onnx import SCHEMES\n", "runtime may not import quantize"),
    ("instaflow_edge.pipeline", "from .runtime import onnx_io\n", "model may not import runtime"),
    ("instaflow_edge.errors", "from .digits import judge\n", "ground may not import digits"),
    ("instaflow_edge.convert.onnx", "def _late():\n    from ..validators import flag\n", "inside a function"),
])
def test_a_planted_import_fails(module, planted, expected):
    srcs = sources()
    src, is_pkg = srcs[module]
    srcs[module] = (src + "\n" + planted, is_pkg)
    found = violations(srcs)
    assert any(expected in v and v.startswith(module + ":") for v in found), found


def test_no_import_cycle_between_packages():
    """Top-level imports between modules form no cycle (a cycle would make import order matter)."""
    srcs = sources()
    known = set(srcs)
    graph = {m: {resolve(e, known) for e, _, top in imports(m, *srcs[m]) if top} & known for m in srcs}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            if d == m:
                continue
            if state.get(d) == 1:
                raise AssertionError(" → ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("module", ["instaflow_edge.generate", "instaflow_edge.digits.evaluate"])
def test_generate_and_eval_stand_on_the_runtime(module):
    """Running a model or an export never needs a stage: everything they import, at any depth, sits on
    the runtime floor or below (digits' own modules aside)."""
    srcs = sources()
    known = set(srcs)
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [t for e, _, _ in imports(m, *srcs[m]) if (t := resolve(e, known)) in known]
    stages = sorted(m for m in seen if place(m)[1] in ("quantize", "convert", "train"))
    assert stages == [], f"{module} reaches {stages}"
