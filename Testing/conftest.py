"""Shared test setup: import paths, the shared data folder, the bundled models, and the Slicer
module files loaded headless.

Tests that need ../shared/data fail (not skip) when CI=true and the data is missing, so CI can
never pass by silently skipping the real-data tests.
"""

import importlib
import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "VertebralLabeling"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from VertebralLabelingLib.dataset import data_root  # noqa: E402


def require_path(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise fail in CI and skip elsewhere."""
    if path.exists():
        return path
    message = f"test data missing: {path} (set VERTEBRAL_LABELING_DATA)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str, reason: str = ""):
    """Import ``name``; if it is not installed, fail in CI (the test extras must install it) and
    skip elsewhere, like ``require_path``."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        message = f"{name} not installed ({reason or error}); scripts/test.sh installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="session")
def mri_bids() -> Path:
    return require_path(data_root() / "mri" / "bids")


@pytest.fixture(scope="session")
def pam50_dir() -> Path:
    return require_path(data_root() / "mri" / "pam50")


@pytest.fixture(scope="session")
def labeler():
    """The shipped default model, loaded once for the session."""
    from VertebralLabelingLib.labeling import DiscLabeler

    return DiscLabeler.load("compact")


# -- the Slicer module files (VertebralLabeling.py, CobbAngle.py) without Slicer's GUI ----------
def _scripted_module_stand_ins():
    """``slicer.ScriptedLoadableModule`` as far as the modules use it: the Test base is a
    ``unittest.TestCase`` (as in Slicer), so a module's ``runTest`` runs as a unittest."""
    base = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(base, cls.__name__, cls)
    return base


@pytest.fixture
def slicer_module(monkeypatch, tmp_path):
    """``slicer_module("CobbAngle")``: that module file imported headless.  MRML is the real
    slicer-core scene (a fresh ``slicer.mrmlScene``); qt, ctk, Slicer's scripted-module base
    classes and the parameter node wrapper are stand-ins, which only the GUI (Widget) would need,
    so the Logic and the module's own self-tests run as in Slicer.  Skips (fails in CI) without
    the slicer-core wheel."""
    slicer = require_module("slicer", "the slicer-core wheel gives headless MRML")
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    for name, stub in (("qt", types.ModuleType("qt")), ("ctk", types.ModuleType("ctk")),
                       ("slicer.ScriptedLoadableModule", _scripted_module_stand_ins()),
                       ("slicer.parameterNodeWrapper", wrapper)):
        monkeypatch.setitem(sys.modules, name, stub)
    base_module = "VertebralLabelingSlicerLib.module_base"  # imported anew over the stand-ins
    sys.modules.pop(base_module, None)
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)

    def load(name):
        spec = importlib.util.spec_from_file_location(f"{name}ModuleUnderTest", REPO / name / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    sys.modules.pop(base_module, None)  # it holds the stand-ins; never leave it to other tests
