"""The core's shape: mri / xray / study over one io layer, no cycles, small modules and functions.

Imports are read with ``ast`` from every module of VertebralLabelingLib (also imports inside
functions), resolved to the module they name, and checked against the allowed layers:

* ``io`` imports nothing of the other parts (only itself and ``errors`` / the package root);
* ``mri`` and ``xray`` import ``io`` (and themselves), never each other, never ``study``;
* ``study`` imports ``mri`` and ``io``;
* nothing imports ``cli`` (the command line is the top), and no two modules import each other,
  directly or around a longer loop.

``errors`` and the package root (``__version__`` and the disc names) are allowed everywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "VertebralLabeling" / "VertebralLabelingLib"
ROOT = "VertebralLabelingLib"
PARTS = ("io", "mri", "xray", "study", "cli")
#: Which parts each part may import (besides the package root and ``errors``).
ALLOWED = {
    "io": {"io"},
    "mri": {"mri", "io"},
    "xray": {"xray", "io"},
    "study": {"study", "mri", "io"},
    "cli": {"cli", "study", "mri", "xray", "io"},
    "root": set(),
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
#: Third-party packages that may be imported inside a function (slow to import, optional).
DEFERRABLE = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "selenium")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([ROOT, *parts])


MODULES = {module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "errors":
        return "root"
    return parts[1]


def _package(module: str, path: Path) -> list[str]:
    names = module.split(".")
    return names if path.name == "__init__.py" else names[:-1]


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """(imported first-party module, line, inside a function) for every import of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        nested = id(node) not in top
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, nested) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package(module, path)
                base = ".".join(package[: len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").split(".")[0] == ROOT:
                target = node.module
            else:
                continue
            for alias in node.names:  # ``from . import networks``: the submodule, if it is one
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno, nested))
    return found


def third_party_in_functions(module: str) -> list[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    bad = []
    for node in ast.walk(tree):
        if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "level", 0):
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            if name.split(".")[0] not in DEFERRABLE and name.split(".")[0] != ROOT:
                bad.append(f"line {node.lineno}: {name}")
    return bad


def test_every_module_is_in_a_part():
    for module in MODULES:
        assert part_of(module) in (*PARTS, "root"), module
    for part in PARTS:
        assert f"{ROOT}.{part}" in MODULES, f"missing sub-package {part}"
    assert f"{ROOT}.mri.training" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES), ids=lambda m: m[len(ROOT) + 1:] or "root")
def test_layers(module):
    mine = part_of(module)
    for target, line, _ in imports_of(module):
        theirs = part_of(target)
        assert target in MODULES, f"{module}:{line} imports {target}, which does not exist"
        if theirs == "root":
            continue
        assert theirs in ALLOWED[mine], f"{module}:{line} ({mine}) imports {target} ({theirs})"


@pytest.mark.parametrize("module", sorted(MODULES), ids=lambda m: m[len(ROOT) + 1:] or "root")
def test_imports_at_the_top(module):
    """First-party imports are at the top (the cli defers its commands to keep ``--help`` light);
    inside functions only the slow optional packages (TensorFlow, ONNX, selenium) are imported."""
    if part_of(module) != "cli":
        nested = [f"line {line}: {target}" for target, line, inside in imports_of(module) if inside]
        assert not nested, f"{module} imports first-party modules inside functions: {nested}"
    assert not third_party_in_functions(module), third_party_in_functions(module)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_layering_check_catches_a_violation(tmp_path, monkeypatch):
    """The rule above can fail: an xray module importing mri is reported."""
    monkeypatch.setitem(MODULES, f"{ROOT}.xray.fake", tmp_path / "fake.py")
    (tmp_path / "fake.py").write_text("from ..mri import volume\n")
    monkeypatch.setattr(sys.modules[__name__], "_package", lambda module, path: [ROOT, "xray"])
    with pytest.raises(AssertionError, match="imports VertebralLabelingLib.mri.volume"):
        test_layers(f"{ROOT}.xray.fake")


@pytest.mark.parametrize("path", sorted(LIB.rglob("*.py")), ids=lambda p: p.relative_to(LIB).as_posix())
def test_module_and_function_sizes(path):
    source = path.read_text(encoding="utf-8")
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines (at most {MAX_MODULE_LINES})"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, \
                f"{path.name}:{node.lineno} {node.name} has {length} lines (at most {MAX_FUNCTION_LINES})"


def test_help_imports_no_image_or_network_library():
    """``vertebral-labeling --help`` answers without SimpleITK, scipy or TensorFlow."""
    code = ("import sys\nfrom VertebralLabelingLib.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('SimpleITK', 'scipy', 'tensorflow', 'keras', 'onnxruntime') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(LIB.parent), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "usage: vertebral-labeling" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout.strip().splitlines()[-1]
