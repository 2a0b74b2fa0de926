"""Both Slicer modules' Logic and their own self-tests (``runTest``), run by pytest.

The module files are loaded by conftest's ``slicer_module`` fixture over the real slicer-core
MRML scene, so what Slicer's "Reload and Test" runs is also run on every test run: a change that
breaks a module's Logic or self-test fails here, not only inside Slicer.  The Logic tests use a
fake labeler (no model): they check where the points land, under which labels, and that hand
edits are never replaced without ``overwriteEdits``.
"""

import json

import numpy as np
import pytest

from VertebralLabelingLib import DISC_NAMES, DISC_VALUES


def world(node, index):
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return np.array(position)


class FakeResult:
    """What the labelers return, as far as the Logic reads it."""

    def __init__(self, **fields):
        self.warnings, self.seconds = ["a warning"], 1.25
        self.__dict__.update(fields)


@pytest.fixture
def vl(slicer_module):
    return slicer_module("VertebralLabeling")


@pytest.fixture
def cobb(slicer_module):
    return slicer_module("CobbAngle")


# -- self-tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["VertebralLabeling", "CobbAngle"])
def test_module_self_test_passes(slicer_module, name):
    """The module's runTest as Slicer runs it (bundled models included: ONNX Runtime is a base
    dependency, so nothing is skipped here)."""
    from VertebralLabelingSlicerLib.dependencies import missing_requirements

    assert not missing_requirements()
    module = slicer_module(name)
    result = getattr(module, f"{name}Test")().run()
    assert result.testsRun == 1 and result.wasSuccessful(), result.errors + result.failures


def test_self_tests_list_only_existing_methods(vl, cobb):
    """runTest calls its tests by name: a renamed test method would otherwise be an AttributeError
    only inside Slicer."""
    for test in (vl.VertebralLabelingTest, cobb.CobbAngleTest):
        names = test.fakeModelTests + test.bundledModelTests
        assert names and all(callable(getattr(test, name, None)) for name in names)


def test_one_edit_error_class_for_both_adapters():
    from VertebralLabelingSlicerLib import mrml_adapter, nodes, xray_adapter

    assert mrml_adapter.UserEditsWouldBeLost is nodes.UserEditsWouldBeLost
    assert xray_adapter.UserEditsWouldBeLost is nodes.UserEditsWouldBeLost


# -- VertebralLabelingLogic -------------------------------------------------------------------
def disc_logic(vl, calls):
    from VertebralLabelingLib.mri.labeling import DiscPoint

    class FakeLabeler:
        def label(self, volume, slice_r_mm=None, progress=None):
            calls.append(slice_r_mm)
            discs = [DiscPoint(v, n, np.array([1.0 + k, -2.0 * k, 30.0 - 15 * k]), 0.9 - 0.5 * (k == 2),
                               flagged=k == 2, reason="low confidence" if k == 2 else "")
                     for k, (v, n) in enumerate(zip(DISC_VALUES, DISC_NAMES))]
            return FakeResult(discs=discs)

    return vl.VertebralLabelingLogic(labelerFactory=lambda name: FakeLabeler())


@pytest.fixture
def volume_node(vl):
    import slicer

    from VertebralLabelingLib.mri.phantom import make_phantom
    from VertebralLabelingSlicerLib import mrml_adapter

    volume, _ = make_phantom(seed=0)
    return mrml_adapter.add_volume_node(slicer.mrmlScene, volume, "phantom")


def test_disc_logic_writes_labeled_points_and_guards_edits(vl, volume_node):
    from VertebralLabelingSlicerLib.nodes import UserEditsWouldBeLost

    calls = []
    logic = disc_logic(vl, calls)
    node = logic.process(volume_node, sliceR=-1.5)
    assert calls == [-1.5]
    assert [node.GetNthControlPointLabel(i) for i in range(6)] == list(DISC_NAMES)
    np.testing.assert_allclose(world(node, 4), [5.0, -8.0, -30.0], atol=1e-9)
    assert logic.summary() == "6 discs labeled in 1.2 s; review: C4-C5 a warning"
    node.SetNthControlPointPositionWorld(0, 0.0, 0.0, 0.0)
    with pytest.raises(UserEditsWouldBeLost, match='"phantom discs" were moved'):
        logic.process(volume_node, node)
    assert len(calls) == 1  # refused before the network ran
    assert logic.process(volume_node, node, overwriteEdits=True) is node
    np.testing.assert_allclose(world(node, 0), [1.0, 0.0, 30.0], atol=1e-9)
    assert logic.process(volume_node, None).GetID() != node.GetID()


def test_disc_logic_exports_the_edited_points(vl, volume_node, tmp_path):
    from VertebralLabelingLib.mri.export import read_markups_json

    logic = disc_logic(vl, [])
    node = logic.process(volume_node)
    node.SetNthControlPointPositionWorld(1, 7.0, 8.0, 9.0)
    logic.export(node, tmp_path / "discs.mrk.json", "json")
    logic.export(node, tmp_path / "discs.csv", "csv")
    logic.export(node, tmp_path / "discs.nii.gz", "nifti", volume_node)
    label, ras, _ = read_markups_json(tmp_path / "discs.mrk.json")[1]
    assert label == "C3-C4"
    np.testing.assert_allclose(ras, [7.0, 8.0, 9.0], atol=1e-6)
    assert "C3-C4" in (tmp_path / "discs.csv").read_text()
    assert (tmp_path / "discs.nii.gz").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown export kind"):
        logic.export(node, tmp_path / "x", "png")


def test_logic_keeps_one_labeler_per_model_and_needs_no_runtime_with_a_fake(vl):
    made = []
    logic = vl.VertebralLabelingLogic(labelerFactory=lambda name: made.append(name) or object())
    assert logic.labeler() is logic.labeler() and made == ["compact"]
    logic.modelName = "other"
    logic.labeler()
    assert made == ["compact", "other"]
    assert logic.ensureRuntime(confirm=lambda requirements: pytest.fail("asked to install"))


# -- CobbAngleLogic ---------------------------------------------------------------------------
@pytest.fixture
def radiograph_node(cobb):
    import slicer

    from VertebralLabelingLib.xray.data import Radiograph
    from VertebralLabelingSlicerLib import xray_adapter

    radiograph = Radiograph(np.random.default_rng(0).random((600, 240)).astype(np.float32), (0.5, 0.5))
    return radiograph, xray_adapter.add_radiograph_node(slicer.mrmlScene, radiograph, "ap")


def corner_logic(cobb, radiograph, calls):
    from VertebralLabelingLib.xray.label import cobb_from_physical
    from VertebralLabelingSlicerLib import xray_adapter

    points = xray_adapter.template_points(radiograph)

    class FakeLabeler:
        def label(self, image, progress=None):
            calls.append(image)
            return FakeResult(points=points, confidence=np.full(17, 0.8), level_review=np.arange(17) == 16,
                              cobb=cobb_from_physical(points, image))

    return cobb.CobbAngleLogic(labelerFactory=lambda name: FakeLabeler()), points


def test_cobb_logic_writes_corners_guards_edits_and_exports(cobb, radiograph_node, tmp_path):
    from VertebralLabelingSlicerLib.nodes import UserEditsWouldBeLost

    radiograph, volume_node = radiograph_node
    calls = []
    logic, points = corner_logic(cobb, radiograph, calls)
    node = logic.process(volume_node)
    assert node.GetNumberOfControlPoints() == 68 and node.GetNthControlPointLabel(5) == "T2-TR"
    assert logic.summary() == "68 corners in 1.2 s; Cobb angles 0.0, 0.0, 0.0 deg a warning"
    # the vertebra whose level is to be checked (here L5) is marked on its four corners
    marked = [i for i in range(68) if "level not confirmed" in node.GetNthControlPointDescription(i)]
    assert marked == [64, 65, 66, 67] and not node.GetNthControlPointSelected(64)
    node.SetNthControlPointPositionWorld(0, 1.0, 1.0, 0.0)
    with pytest.raises(UserEditsWouldBeLost, match='"ap'):
        logic.process(volume_node, node)
    assert len(calls) == 1
    live = logic.startLive(volume_node, node)
    assert logic.lastCobb is live.last
    logic.export(node, tmp_path / "cobb.json", "angles", volume_node)
    assert len(json.loads((tmp_path / "cobb.json").read_text())["angles_deg"]) == 3
    logic.releaseScene()
    assert logic.live is None and logic.lastCobb is None


def test_cobb_logic_manual_template_is_a_straight_spine(cobb, radiograph_node):
    radiograph, volume_node = radiograph_node
    logic = cobb.CobbAngleLogic()
    node = logic.manualNode(volume_node, template=True)
    live = logic.startLive(volume_node, node)
    assert node.GetNumberOfControlPoints() == 68
    assert max(live.last.angles_deg) == pytest.approx(0.0, abs=1e-6)
    logic.stopLive()


# -- ONNX Runtime on first use ------------------------------------------------------------------
@pytest.fixture
def runtime_missing(monkeypatch):
    """ONNX Runtime reported missing until Slicer's pip_install (recorded) has run."""
    import slicer

    from VertebralLabelingSlicerLib import dependencies

    installed = []

    def missing(path=dependencies.REQUIREMENTS_FILE):
        return [] if installed else dependencies.read_requirements(path)

    monkeypatch.setattr(dependencies, "missing_requirements", missing)
    monkeypatch.setattr(slicer.util, "pip_install", installed.append)
    return installed


@pytest.mark.parametrize("name", ["VertebralLabeling", "CobbAngle"])
def test_logic_installs_the_requirements_file_with_slicers_pip(slicer_module, runtime_missing, name):
    from VertebralLabelingSlicerLib.dependencies import read_requirements

    logic = getattr(slicer_module(name), f"{name}Logic")()
    assert not logic.ensureRuntime(confirm=lambda requirements: False) and runtime_missing == []
    asked = []
    assert logic.ensureRuntime(confirm=lambda requirements: asked.append(requirements) or True)
    requirements = read_requirements()
    assert requirements[0].startswith("onnxruntime") and asked == [requirements]
    (arguments,) = runtime_missing
    assert arguments[:-2] == requirements and arguments[-2] == "-c"  # numpy pinned by constraints


@pytest.mark.parametrize("name", ["VertebralLabeling", "CobbAngle"])
def test_self_test_skips_the_bundled_model_without_the_runtime(slicer_module, runtime_missing, name):
    test_class = getattr(slicer_module(name), f"{name}Test")
    ran = []
    for method in test_class.fakeModelTests + test_class.bundledModelTests:
        setattr(test_class, method, lambda self, method=method: ran.append(method))
    assert test_class().run().wasSuccessful()
    assert ran == list(test_class.fakeModelTests) and runtime_missing == []


# -- the widget's edit guard (module_base), the one piece of Apply that needs no Qt ---------------
@pytest.mark.parametrize("replace", [True, False])
def test_apply_asks_before_replacing_edits(vl, volume_node, monkeypatch, replace):
    """Yes replaces the edited points in place; No writes a new point list and keeps them."""
    import types

    import slicer

    widget = vl.VertebralLabelingWidget()
    widget.logic = disc_logic(vl, [])
    edited = widget.logic.process(volume_node)
    edited.SetNthControlPointPositionWorld(0, 0.0, 0.0, 0.0)
    asked = []
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay",
                        lambda text, windowTitle: asked.append((text, windowTitle)) or replace)
    params = types.SimpleNamespace(inputVolume=volume_node, outputMarkups=edited)
    node = widget._processKeepingEdits(params, {"sliceR": None})
    assert len(asked) == 1 and asked[0][1] == "Vertebral Labeling" and "Replace your edited points" in asked[0][0]
    assert (node is edited) == replace
    np.testing.assert_allclose(world(edited, 0), [1.0, 0.0, 30.0] if replace else [0.0, 0.0, 0.0], atol=1e-9)
