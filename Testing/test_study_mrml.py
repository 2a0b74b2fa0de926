"""The Slicer study panel's MRML side against a real scene (slicer-core): open a batch
derivative, step through subjects (image + points), correct a point, save the correction, and
find it again (it wins over the prediction) - what the panel's Logic delegates to."""

import json

import numpy as np
import pytest

from conftest import require_module

slicer = require_module("slicer", "the slicer-core wheel gives headless MRML")

from study_common import SUBJECTS, batch  # noqa: E402
from VertebralLabelingLib import DISC_NAMES  # noqa: E402
from VertebralLabelingLib.errors import InputError  # noqa: E402
from VertebralLabelingLib.mri.export import read_markups_json  # noqa: E402
from VertebralLabelingLib.study.corrections import is_human_corrected  # noqa: E402
from VertebralLabelingLib.study.table import study_entries  # noqa: E402
from VertebralLabelingSlicerLib import mrml_adapter  # noqa: E402


@pytest.fixture(scope="module")
def deriv(tmp_path_factory, mri_bids):
    folder = tmp_path_factory.mktemp("mrmlstudy") / "deriv"
    assert batch(mri_bids, folder, "--subjects", "sub-errsm20", "sub-sctcrop", "--no-report") == 0
    return folder


def world(node, index):
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return np.array(position)


def test_open_step_correct_save_reload(deriv):
    entries = study_entries(deriv)  # the folder alone: the raw image is found via the record
    assert [item.key for item, _ in entries] == ["sub-errsm20_T2w", "sub-sctcrop_T2w"]
    assert all(item.image.exists() for item, _ in entries)
    scene = slicer.vtkMRMLScene()
    item = entries[0][0]
    volume_node, node, source = mrml_adapter.load_study_item(scene, item, deriv)
    assert source == "predicted" and volume_node.GetName() == "sub-errsm20_T2w"
    assert volume_node.GetImageData().GetDimensions() == tuple(
        __import__("SimpleITK").ReadImage(str(item.image)).GetSize())
    predicted = read_markups_json(item.path(deriv, "_discs.mrk.json"))
    assert [node.GetNthControlPointLabel(i) for i in range(6)] == list(DISC_NAMES)
    for index, (_, ras, _) in enumerate(predicted):
        np.testing.assert_allclose(world(node, index), ras, atol=1e-6)
        assert node.GetNthControlPointAssociatedNodeID(index) == volume_node.GetID()
    assert not mrml_adapter.node_has_user_edits(node)
    assert node.GetAttribute(mrml_adapter.STUDY_ITEM_ATTRIBUTE) == item.key

    moved = world(node, 3) + np.array([0.0, 2.0, -4.0])
    node.SetNthControlPointPositionWorld(3, *moved)
    assert mrml_adapter.node_has_user_edits(node)  # the panel asks before stepping on
    path = mrml_adapter.save_study_correction(node, item, deriv)
    assert path.name == "sub-errsm20_T2w_desc-corrected_discs.mrk.json" and is_human_corrected(path)
    assert not mrml_adapter.node_has_user_edits(node)
    assert json.loads(path.read_text())["VertebralLabeling"]["humanCorrected"] is True
    saved = read_markups_json(path)
    np.testing.assert_allclose(saved[3][1], moved, atol=1e-6)
    # The prediction file is left as the batch wrote it.
    assert read_markups_json(item.path(deriv, "_discs.mrk.json"))[3][1].tolist() == predicted[3][1].tolist()

    # Slicer's own reader takes the corrected file (extra top-level key allowed by the schema).
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    check = slicer.vtkMRMLScene()
    check.AddNode(storage)
    read_node = check.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "read")
    storage.SetFileName(str(path))
    assert storage.ReadData(read_node) == 1 and read_node.GetNumberOfControlPoints() == 6

    # Next subject, then back: the correction is what comes back.
    scene.Clear(0)
    _, other, source = mrml_adapter.load_study_item(scene, entries[1][0], deriv)
    assert source == "predicted" and other.GetNumberOfControlPoints() == 6
    scene.Clear(0)
    _, again, source = mrml_adapter.load_study_item(scene, item, deriv)
    assert source == "corrected"
    np.testing.assert_allclose(world(again, 3), moved, atol=1e-6)
    assert not mrml_adapter.node_has_user_edits(again)


def test_missing_outputs_are_user_errors(deriv, tmp_path):
    with pytest.raises(InputError, match="No batch results"):
        study_entries(tmp_path)
    item = study_entries(deriv)[1][0]
    scene = slicer.vtkMRMLScene()
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "empty")
    with pytest.raises(InputError, match="no disc points"):
        mrml_adapter.save_study_correction(empty, item, deriv)
    assert SUBJECTS[3] in item.key


# -- the module's Logic (VertebralLabeling.py), loaded headless by conftest's slicer_module ------
@pytest.fixture
def module(slicer_module):
    return slicer_module("VertebralLabeling")


def test_module_logic_steps_through_a_study(module, deriv):
    logic = module.VertebralLabelingLogic()
    assert logic.openStudy(str(deriv)) == ["sub-errsm20_T2w", "sub-sctcrop_T2w"]
    scene = slicer.mrmlScene
    volume_node, node, source = logic.loadStudyItem(1)
    assert source == "predicted" and volume_node.GetScene() is scene
    assert logic.studyItemText().startswith("sub-sctcrop_T2w (2/2): predicted points; flagged:")
    assert not logic.studyHasUnsavedEdits()
    node.SetNthControlPointPositionWorld(1, 1.0, 2.0, 3.0)
    assert logic.studyHasUnsavedEdits()
    path = logic.saveStudyCorrection()
    assert path.name == "sub-sctcrop_T2w_desc-corrected_discs.mrk.json"
    assert not logic.studyHasUnsavedEdits()
    logic.loadStudyItem(0)
    assert volume_node.GetScene() is None and node.GetScene() is None  # previous subject removed
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 1
    _, node, source = logic.loadStudyItem(1)
    assert source == "corrected"
    np.testing.assert_allclose(world(node, 1), [1.0, 2.0, 3.0], atol=1e-6)
