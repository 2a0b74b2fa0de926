"""Lazy ONNX Runtime install shared by both Slicer modules, tested with Slicer's hooks injected."""

import contextlib

import numpy as np

from VertebralLabelingSlicerLib import dependencies


def test_requirements_file_is_onnxruntime_with_a_range():
    requirement, progress = dependencies.read_requirements()
    assert requirement.startswith("onnxruntime") and ">=" in requirement and "<" in requirement
    assert "==" not in requirement  # Slicer's guidance: no exact pins in a module's pip install
    assert dependencies.import_name(requirement) == "onnxruntime"
    assert progress.startswith("tqdm>=") and dependencies.import_name(progress) == "tqdm"  # study batch


def test_import_names_are_what_the_code_imports():
    assert dependencies.import_name("Pillow>=10") == "PIL"
    assert dependencies.import_name("onnxruntime-gpu ; sys_platform=='linux'") == "onnxruntime"
    assert dependencies.import_name("some-package[extra]==1") == "some_package"


def test_nothing_is_asked_when_the_runtime_is_importable(monkeypatch):
    looked_for = []
    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name: looked_for.append(name) or object())
    calls = []
    assert dependencies.ensure_runtime(calls.append, "/nonexistent", calls.append)
    assert calls == [] and looked_for == ["onnxruntime", "tqdm"]


def test_install_asks_first_pins_numpy_and_shows_it_is_busy(monkeypatch, tmp_path):
    installed, busy = [], []
    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name: object() if installed else None)
    asked = []

    def refuse(requirements):
        asked.append(requirements)
        return False

    assert not dependencies.ensure_runtime(refuse, str(tmp_path), installed.append)
    assert asked == [dependencies.read_requirements()] and installed == []

    @contextlib.contextmanager
    def waiting(message):
        busy.append(message)
        yield

    assert dependencies.ensure_runtime(lambda r: True, str(tmp_path), installed.append, tag="T", busy=waiting)
    (args,) = installed
    n = len(dependencies.read_requirements())
    assert args[:n] == dependencies.read_requirements() and args[n] == "-c"
    assert open(args[n + 1]).read().strip() == f"numpy=={np.__version__}"
    assert busy and "onnxruntime" in busy[0]


def test_a_failed_install_reports_false(monkeypatch, tmp_path):
    monkeypatch.setattr(dependencies.importlib.util, "find_spec", lambda name: None)
    assert not dependencies.ensure_runtime(lambda r: True, str(tmp_path), lambda args: None)
