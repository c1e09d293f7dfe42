"""The stages depend only on the stages to their left (docs/ir.md, ../shared/spec/architecture.md): read
from every module's imports, so an edge against the flow fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package -> the packages of ours it may import (besides itself and `knobs`, the one module of switches)
ALLOWED = {
    "ir": set(),
    "passes": {"ir"},
    "backends": {"ir", "passes"},
    "frontend": {"ir", "passes"},
}
# within backends: a target imports no other target; the one exception is the interpreter class itself, which
# the cpu host subclasses to run the ops it keeps (views, weights, per-call block maps) by their reference
# semantics. Analyses (weight-only ops, shape binding) are ir's, never the oracle's.
BACKENDS = ("cpu", "triton", "reference")
INTERPRETER = ("sparsa.backends.reference.interpreter", "Interpreter")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `sparsa.` import in the file, top-level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparsa."):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("sparsa.")]
    return out


def test_every_import_follows_the_flow():
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in _imports(path):
                top = module.split(".")[1]
                if top not in (package, "knobs") and top not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "imports against the flow:\n" + "\n".join(bad)


def test_backends_do_not_import_each_other():
    bad = []
    for name in BACKENDS:
        for path in sorted((ROOT / "backends" / name).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("sparsa.backends."):
                    continue
                other = node.module.split(".")[2]
                names = [a.name for a in node.names]
                if other in BACKENDS and other != name and [(node.module, n) for n in names] != [INTERPRETER]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}: {', '.join(names)}")
    assert not bad, "backends importing another backend:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_package():
    """`from sparsa.passes.x import _name` in another package reaches into that package's internals."""
    bad = []
    for package in (*ALLOWED, "runtime"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
                if module.startswith("sparsa.") and module.split(".")[1] != package:
                    bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {module}.{a.name}"
                            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)
