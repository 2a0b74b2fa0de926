"""Lazy TensorFlow install shared by both Slicer modules, tested with Slicer's hooks injected."""

import numpy as np

from VertebralLabelingSlicerLib import dependencies


def test_requirements_file_is_the_pinned_tensorflow():
    assert dependencies.read_requirements() == ["tensorflow-cpu==2.21.0"]


def test_nothing_is_asked_when_tensorflow_is_importable(monkeypatch):
    monkeypatch.setattr(dependencies.importlib.util, "find_spec", lambda name: object())
    calls = []
    assert dependencies.ensure_tensorflow(calls.append, "/nonexistent", calls.append)
    assert calls == []


def test_install_asks_first_and_pins_numpy(monkeypatch, tmp_path):
    installed = []
    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name: object() if installed else None)
    asked = []

    def refuse(requirements):
        asked.append(requirements)
        return False

    assert not dependencies.ensure_tensorflow(refuse, str(tmp_path), installed.append)
    assert asked == [["tensorflow-cpu==2.21.0"]] and installed == []

    assert dependencies.ensure_tensorflow(lambda r: True, str(tmp_path), installed.append, tag="T")
    (args,) = installed
    assert args[:1] == ["tensorflow-cpu==2.21.0"] and args[1] == "-c"
    assert open(args[2]).read().strip() == f"numpy=={np.__version__}"
