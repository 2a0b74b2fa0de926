"""Installing the core's Python dependencies into Slicer's Python on first use.

Shared by both modules (VertebralLabeling and CobbAngle), so the extension has one list of
requirements (``Resources/requirements.txt`` beside this package, in the source tree and in
Slicer's ``qt-scripted-modules`` install alike) and one way to install it.  Nothing is installed
at import: only when the user first presses Apply and agrees.  Slicer's own numpy is pinned with
a constraints file, so a wheel that wants another numpy fails instead of replacing the one Slicer
was built against (SimpleITK and VTK are not in the list at all: Slicer's are used).

Inference needs only ONNX Runtime (about 80 MB, wheels for Linux, Windows and macOS on x86-64
and arm64); TensorFlow is for training and is never installed into Slicer.  The check looks
for the module the code actually imports (``onnxruntime``), not for the pip name, so a
requirement whose distribution and import names differ is still found.

Slicer's ``pip_install`` and temporary folder are passed in, so this module imports no Slicer code
and can be tested headless.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re

REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "Resources", "requirements.txt")

#: pip distribution name -> the module the core imports (where the two differ, add it here).
IMPORT_NAMES = {"onnxruntime": "onnxruntime", "onnxruntime-gpu": "onnxruntime", "pillow": "PIL"}


def read_requirements(path: str = REQUIREMENTS_FILE) -> list:
    """Package specifiers from a requirements file (comments and blank lines dropped)."""
    with open(path) as handle:
        lines = (line.split("#", 1)[0].strip() for line in handle)
        return [line for line in lines if line]


def import_name(requirement: str) -> str:
    """The module to import for a requirement specifier ('onnxruntime>=1.17,<2' -> 'onnxruntime')."""
    name = re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]
    return IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))


def missing_requirements(requirements_file: str = REQUIREMENTS_FILE) -> list:
    """Requirements whose module cannot be imported in this Python."""
    return [r for r in read_requirements(requirements_file)
            if importlib.util.find_spec(import_name(r)) is None]


def runtime_available(requirements_file: str = REQUIREMENTS_FILE) -> bool:
    """True when everything the modules import to run a model is installed (self-tests use it)."""
    return not missing_requirements(requirements_file)


def ensure_runtime(confirm, temporary_dir: str, pip_install, tag: str = "VertebralLabeling",
                   requirements_file: str = REQUIREMENTS_FILE, busy=None) -> bool:
    """True when the requirements are importable, installing the missing ones first if
    ``confirm(missing)`` agrees.  ``busy(message)`` returns a context manager held while pip runs
    (Slicer shows a wait cursor and a status line: the download takes a while)."""
    missing = missing_requirements(requirements_file)
    if not missing:
        return True
    if not confirm(missing):
        return False
    import numpy

    constraints = os.path.join(temporary_dir, f"{tag}-constraints.txt")
    with open(constraints, "w") as handle:
        handle.write(f"numpy=={numpy.__version__}\n")
    waiting = busy(f"Installing {', '.join(missing)} (once)...") if busy else contextlib.nullcontext()
    with waiting:
        pip_install(missing + ["-c", constraints])
    importlib.invalidate_caches()
    return not missing_requirements(requirements_file)
