"""Shared test setup: import paths, the shared data folder, the bundled models, and the Slicer
module files loaded headless.

Tests that need ../shared/data fail (not skip) when CI=true and the data is missing, so CI can
never pass by silently skipping the real-data tests.  That rule is ``skip_or_fail``, here only:
tests reach it through ``require_path`` and ``require_module``.  Tests that read the shared data
are marked ``realdata`` (those using the data fixtures automatically); long ones ``slow``.
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

from VertebralLabelingLib.io.files import data_root  # noqa: E402

#: Fixtures that hand out the shared data folder: a test using one reads real data.
REAL_DATA_FIXTURES = {"mri_bids", "pam50_dir", "aasce"}


def pytest_collection_modifyitems(items):
    """Mark every test that uses a shared-data fixture ``realdata`` (``-m "not realdata"`` runs
    what a clone without ../shared/data can run)."""
    for item in items:
        if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realdata)


def skip_or_fail(message: str):
    """Skip the test, but fail it in CI (CI=true): CI must never pass by skipping."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def require_path(path: Path, hint: str = "test data: set VERTEBRAL_LABELING_DATA") -> Path:
    """Return ``path`` if it exists; otherwise skip, or fail in CI."""
    if path.exists():
        return path
    skip_or_fail(f"missing: {path} ({hint})")


def require_module(name: str, reason: str = ""):
    """Import ``name``; if it is not installed, fail in CI (the test extras must install it) and
    skip elsewhere, like ``require_path``."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        skip_or_fail(f"{name} not installed ({reason or error}); scripts/test.sh installs it")


@pytest.fixture(scope="session")
def mri_bids() -> Path:
    return require_path(data_root() / "mri" / "bids")


@pytest.fixture(scope="session")
def pam50_dir() -> Path:
    return require_path(data_root() / "mri" / "pam50")


@pytest.fixture(scope="session")
def labeler():
    """The shipped default model, loaded once for the session."""
    from VertebralLabelingLib.mri.labeling import DiscLabeler

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
