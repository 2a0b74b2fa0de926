"""Installing the core's Python dependencies into Slicer's Python on first use.

Shared by both modules (VertebralLabeling and CobbAngle), so the extension has one list of
requirements (``Resources/requirements.txt`` beside this package, in the source tree and in
Slicer's ``qt-scripted-modules`` install alike) and one way to install it.  Nothing is installed
at import: only when the user first presses Apply and agrees.  Slicer's own numpy is pinned with
a constraints file, so a wheel that wants another numpy fails instead of replacing the one Slicer
was built against (SimpleITK and VTK are not in the list at all: Slicer's are used).

Slicer's ``pip_install`` and temporary folder are passed in, so this module imports no Slicer code
and can be tested headless.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "Resources", "requirements.txt")


def read_requirements(path: str = REQUIREMENTS_FILE) -> list:
    """Package specifiers from a requirements file (comments and blank lines dropped)."""
    with open(path) as handle:
        lines = (line.split("#", 1)[0].strip() for line in handle)
        return [line for line in lines if line]


def ensure_tensorflow(confirm, temporary_dir: str, pip_install, tag: str = "VertebralLabeling",
                      requirements_file: str = REQUIREMENTS_FILE) -> bool:
    """True when TensorFlow can be imported, installing it first if ``confirm(requirements)`` agrees."""
    if importlib.util.find_spec("tensorflow") is not None:
        return True
    requirements = read_requirements(requirements_file)
    if not confirm(requirements):
        return False
    import numpy

    constraints = os.path.join(temporary_dir, f"{tag}-constraints.txt")
    with open(constraints, "w") as handle:
        handle.write(f"numpy=={numpy.__version__}\n")
    pip_install(requirements + ["-c", constraints])
    importlib.invalidate_caches()
    return importlib.util.find_spec("tensorflow") is not None
