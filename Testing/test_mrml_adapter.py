"""The MRML adapter against a real scene (slicer-core wheel): points, edits, files, volumes.

These tests pin down what the Slicer panel relies on: one labeled control point per disc at the
predicted RAS position, updates in place, user corrections never overwritten silently, exports
that contain the corrections, and .mrk.json files that Slicer's own reader accepts.
"""

import json

import numpy as np
import pytest

from conftest import require_module

slicer = require_module("slicer", "the slicer-core wheel gives headless MRML")
vtk = require_module("vtk")

from slicer_markups_files import json_storage, read_with_slicer  # noqa: E402
from VertebralLabelingLib import DISC_NAMES  # noqa: E402
from VertebralLabelingLib.errors import InputError, VertebralLabelingError  # noqa: E402
from VertebralLabelingLib.mri import export  # noqa: E402
from VertebralLabelingLib.mri.labeling import DiscPoint  # noqa: E402
from VertebralLabelingLib.mri.volume import Volume  # noqa: E402
from VertebralLabelingSlicerLib import mrml_adapter  # noqa: E402
from VertebralLabelingSlicerLib.mrml_adapter import UserEditsWouldBeLost  # noqa: E402

SCHEMA = __import__("pathlib").Path(__file__).parent / "data" / "markups-schema-v1.0.3.json"


def sample_discs(shift=0.0):
    return [DiscPoint(3 + k, name, np.array([1.5 + k + shift, -20.25 - k, 30.0 - 17 * k]),
                      0.9 - 0.1 * k, flagged=k == 5, reason="low confidence (0.40)" if k == 5 else "")
            for k, name in enumerate(DISC_NAMES)]


def small_volume(name="T2w"):
    rng = np.random.default_rng(0)
    matrix = np.eye(4)
    matrix[:3, 3] = (-10.0, -20.0, 40.0)
    return Volume(rng.random((16, 18, 20)).astype(np.float32), matrix, name)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def volume_node(scene):
    return mrml_adapter.add_volume_node(scene, small_volume())


def world(node, index):
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return np.array(position)


def fiducial_nodes(scene):
    return [scene.GetNthNodeByClass(i, "vtkMRMLMarkupsFiducialNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode"))]


# -- writing points --------------------------------------------------------------------------
def test_creates_labeled_points_at_the_predicted_positions(scene, volume_node):
    discs = sample_discs()
    node = mrml_adapter.update_markups_node(scene, discs, volume_node)
    assert node.IsA("vtkMRMLMarkupsFiducialNode") and node.GetScene() is scene
    assert node.GetName() == "T2w discs"
    assert node.GetNumberOfControlPoints() == 6
    assert node.GetFixedNumberOfControlPoints()
    for index, disc in enumerate(discs):
        assert node.GetNthControlPointLabel(index) == disc.name
        np.testing.assert_allclose(world(node, index), disc.ras, atol=1e-9)
        assert node.GetNthControlPointAssociatedNodeID(index) == volume_node.GetID()
        assert node.GetNthControlPointDescription(index).startswith(f"confidence={disc.confidence:.2f}")
        assert node.GetNthControlPointSelected(index) == (not disc.flagged)
    assert node.GetNthControlPointDescription(5) == "confidence=0.40; REVIEW: low confidence (0.40)"
    display = node.GetDisplayNode()
    assert display is not None and display.GetColor() != display.GetSelectedColor()
    assert not mrml_adapter.node_has_user_edits(node)
    # The point count is fixed: an accidental click cannot add a seventh disc.
    assert node.AddControlPoint(0.0, 0.0, 0.0, "extra") == -1
    assert node.GetNumberOfControlPoints() == 6


def test_default_name_without_volume(scene):
    node = mrml_adapter.update_markups_node(scene, sample_discs())
    assert node.GetName() == "Discs"
    assert node.GetNthControlPointAssociatedNodeID(0) in ("", None)


def test_rerun_updates_the_same_node_in_place(scene, volume_node):
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node)
    node_id, display_id = node.GetID(), node.GetDisplayNodeID()
    again = mrml_adapter.update_markups_node(scene, sample_discs(shift=4.0), volume_node, node)
    assert again is node and node.GetID() == node_id and node.GetDisplayNodeID() == display_id
    assert fiducial_nodes(scene) == [node]
    assert [node.GetNthControlPointLabel(i) for i in range(6)] == list(DISC_NAMES)
    for index, disc in enumerate(sample_discs(shift=4.0)):
        np.testing.assert_allclose(world(node, index), disc.ras, atol=1e-9)
    assert not mrml_adapter.node_has_user_edits(node)


def test_fills_an_empty_node_the_user_created(scene, volume_node):
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my points")
    assert not mrml_adapter.node_has_user_edits(empty)
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node, empty)
    assert node is empty and node.GetNumberOfControlPoints() == 6


# -- user edits ------------------------------------------------------------------------------
def test_moved_point_is_protected_until_overwrite_is_confirmed(scene, volume_node):
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node)
    moved = sample_discs()[2].ras + np.array([0.0, 3.0, -2.0])
    node.SetNthControlPointPositionWorld(2, *moved)
    assert mrml_adapter.node_has_user_edits(node)
    with pytest.raises(UserEditsWouldBeLost) as caught:
        mrml_adapter.update_markups_node(scene, sample_discs(shift=1.0), volume_node, node)
    assert isinstance(caught.value, VertebralLabelingError) and "T2w discs" in str(caught.value)
    np.testing.assert_allclose(world(node, 2), moved, atol=1e-9)  # nothing was touched
    np.testing.assert_allclose(world(node, 0), sample_discs()[0].ras, atol=1e-9)

    mrml_adapter.update_markups_node(scene, sample_discs(shift=1.0), volume_node, node,
                                     overwrite_edits=True)
    for index, disc in enumerate(sample_discs(shift=1.0)):
        np.testing.assert_allclose(world(node, index), disc.ras, atol=1e-9)
    assert not mrml_adapter.node_has_user_edits(node)


def test_tiny_moves_are_not_edits(scene, volume_node):
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node)
    node.SetNthControlPointPositionWorld(1, *(sample_discs()[1].ras + 0.004))
    assert not mrml_adapter.node_has_user_edits(node)


@pytest.mark.parametrize("edit", ["relabel", "remove", "add", "unset"])
def test_other_edits_are_detected(scene, volume_node, edit):
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node)
    if edit == "relabel":
        node.SetNthControlPointLabel(3, "C4-C5")
    else:
        node.SetFixedNumberOfControlPoints(False)
        if edit == "remove":
            node.RemoveNthControlPoint(5)
        elif edit == "add":
            node.AddControlPoint(0.0, 0.0, 0.0, "T1-T2")
        else:
            node.UnsetNthControlPointPosition(0)
    assert mrml_adapter.node_has_user_edits(node)
    with pytest.raises(UserEditsWouldBeLost):
        mrml_adapter.update_markups_node(scene, sample_discs(), volume_node, node)


def test_a_point_list_the_user_made_is_never_overwritten_silently(scene, volume_node):
    own = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "manual")
    own.AddControlPoint(1.0, 2.0, 3.0, "C2-C3")
    assert mrml_adapter.node_has_user_edits(own)
    with pytest.raises(UserEditsWouldBeLost):
        mrml_adapter.update_markups_node(scene, sample_discs(), volume_node, own)
    assert own.GetNumberOfControlPoints() == 1


def test_corrupt_prediction_attribute_counts_as_edited(scene, volume_node):
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node)
    node.SetAttribute(mrml_adapter.PREDICTED_ATTRIBUTE, "{not json")
    assert mrml_adapter.node_has_user_edits(node)


def test_moving_the_parent_transform_is_not_an_edit(scene, volume_node):
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 7.0)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert not mrml_adapter.node_has_user_edits(node)
    discs = mrml_adapter.discs_from_node(node)  # exports use world (displayed) positions
    np.testing.assert_allclose(discs[0].ras, sample_discs()[0].ras + [7.0, 0, 0], atol=1e-9)


def test_discs_from_node_returns_the_user_corrections(scene, volume_node):
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node)
    moved = np.array([4.0, -30.0, -10.0])
    node.SetNthControlPointPositionWorld(3, *moved)
    discs = mrml_adapter.discs_from_node(node)
    assert [d.name for d in discs] == list(DISC_NAMES)
    assert [d.value for d in discs] == [3, 4, 5, 6, 7, 8]
    np.testing.assert_allclose(discs[3].ras, moved, atol=1e-9)
    np.testing.assert_allclose(discs[0].ras, sample_discs()[0].ras, atol=1e-9)
    assert discs[0].confidence == pytest.approx(0.9) and not discs[0].flagged
    assert discs[5].flagged and discs[5].reason == "low confidence (0.40)"
    assert discs[5].confidence == pytest.approx(0.4)
    # A reviewer clears the flag by editing the description; exports follow.
    node.SetNthControlPointDescription(5, "confidence=0.40")
    assert not mrml_adapter.discs_from_node(node)[5].flagged


def test_discs_from_node_skips_unknown_and_unset_points(scene):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "mixed")
    node.AddControlPoint(1.0, 2.0, 3.0, "C5-C6")
    node.AddControlPoint(1.0, 2.0, 3.0, "my note")
    node.AddControlPoint(1.0, 2.0, 3.0, "C2-C3")
    node.UnsetNthControlPointPosition(2)
    discs = mrml_adapter.discs_from_node(node)
    assert [(d.value, d.name) for d in discs] == [(6, "C5-C6")]
    assert np.isnan(discs[0].confidence) and not discs[0].flagged


# -- files -----------------------------------------------------------------------------------
def test_mrk_json_round_trip_through_slicer_storage(scene, volume_node, tmp_path):
    discs = sample_discs()
    node = mrml_adapter.update_markups_node(scene, discs, volume_node)
    node.SetNthControlPointLocked(1, True)
    path = tmp_path / "discs.mrk.json"
    assert json_storage(scene, path).WriteData(node) == 1

    data = json.loads(path.read_text())
    markup = data["markups"][0]
    assert markup["coordinateSystem"] == "LPS"
    for point, disc in zip(markup["controlPoints"], discs):
        r, a, s = disc.ras
        np.testing.assert_allclose(point["position"], [-r, -a, s], atol=1e-9)

    back = read_with_slicer(path)
    assert back.GetNumberOfControlPoints() == 6 and back.GetFixedNumberOfControlPoints()
    for index, disc in enumerate(discs):
        assert back.GetNthControlPointLabel(index) == disc.name
        np.testing.assert_allclose(world(back, index), disc.ras, atol=1e-3)
        assert back.GetNthControlPointLocked(index) == (index == 1)
        assert back.GetNthControlPointSelected(index) == (not disc.flagged)
        assert back.GetNthControlPointAssociatedNodeID(index) == volume_node.GetID()
        assert back.GetNthControlPointDescription(index) == node.GetNthControlPointDescription(index)
    assert [(d.name, d.flagged) for d in mrml_adapter.discs_from_node(back)] == \
        [(d.name, d.flagged) for d in discs]


def test_core_markups_file_is_read_by_slicer(tmp_path):
    discs = sample_discs()
    path = tmp_path / "core.mrk.json"
    export.write_markups_json(discs, path)
    back = read_with_slicer(path)
    assert back.GetNumberOfControlPoints() == len(discs)
    for index, disc in enumerate(discs):
        assert back.GetNthControlPointLabel(index) == disc.name
        np.testing.assert_allclose(world(back, index), disc.ras, atol=1e-3)
    back_discs = mrml_adapter.discs_from_node(back)
    assert [d.flagged for d in back_discs] == [d.flagged for d in discs]
    np.testing.assert_allclose([d.confidence for d in back_discs],
                               [round(d.confidence, 2) for d in discs])


def test_exports_from_corrected_node_contain_the_correction(scene, volume_node, tmp_path):
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node)
    moved = np.array([2.0, -25.0, 5.0])
    node.SetNthControlPointPositionWorld(2, *moved)
    export.write_markups_json(mrml_adapter.discs_from_node(node), tmp_path / "c.mrk.json")
    np.testing.assert_allclose(world(read_with_slicer(tmp_path / "c.mrk.json"), 2), moved, atol=1e-3)
    export.write_csv(mrml_adapter.discs_from_node(node), tmp_path / "c.csv")
    row = (tmp_path / "c.csv").read_text().splitlines()[3].split(",")
    assert row[0] == "C4-C5" and [float(v) for v in row[2:5]] == [2.0, -25.0, 5.0]


def validate_markups(document):
    """Slicer's official markups schema (draft-07), checked by jsonschema (a test extra)."""
    jsonschema = require_module("jsonschema", "test extra")
    schema = json.loads(SCHEMA.read_text())
    try:
        jsonschema.Draft7Validator(schema).validate(document)
    except jsonschema.ValidationError as error:
        raise AssertionError(str(error)) from error


def test_core_markups_file_matches_the_official_schema(tmp_path):
    export.write_markups_json(sample_discs(), tmp_path / "core.mrk.json")
    document = json.loads((tmp_path / "core.mrk.json").read_text())
    assert document["@schema"].endswith("markups-schema-v1.0.3.json#")
    validate_markups(document)


def test_schema_check_accepts_slicer_files_and_rejects_broken_ones(scene, volume_node, tmp_path):
    node = mrml_adapter.update_markups_node(scene, sample_discs(), volume_node)
    json_storage(scene, tmp_path / "slicer.mrk.json").WriteData(node)
    validate_markups(json.loads((tmp_path / "slicer.mrk.json").read_text()))
    broken = json.loads((tmp_path / "slicer.mrk.json").read_text())
    broken["markups"][0]["controlPoints"][0]["position"] = [1.0, 2.0]
    with pytest.raises(AssertionError):
        validate_markups(broken)
    broken = json.loads((tmp_path / "slicer.mrk.json").read_text())
    broken["markups"][0]["coordinateSystem"] = "XYZ"
    with pytest.raises(AssertionError):
        validate_markups(broken)


# -- volumes ---------------------------------------------------------------------------------
def psr_volume_node(scene, array, components=1, cls="vtkMRMLScalarVolumeNode"):
    """A node whose axes are i -> P, j -> S, k -> R with spacing (1, 1, 2) and an offset origin."""
    from vtkmodules.util import numpy_support

    data = vtk.vtkImageData()
    data.SetDimensions(*array.shape[:3])
    kji = np.ascontiguousarray(np.moveaxis(array, (0, 1, 2), (2, 1, 0)))
    scalars = numpy_support.numpy_to_vtk(kji.reshape(-1, components), deep=True)
    data.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass(cls, "psr")
    node.SetSpacing(1.0, 1.0, 2.0)
    node.SetOrigin(12.0, -7.5, 30.25)
    directions = vtk.vtkMatrix4x4()
    for row in range(3):
        for col in range(3):
            directions.SetElement(row, col, 0.0)
    directions.SetElement(1, 0, -1.0)  # i -> posterior
    directions.SetElement(2, 1, 1.0)  # j -> superior
    directions.SetElement(0, 2, 1.0)  # k -> right
    node.SetIJKToRASDirectionMatrix(directions)
    node.SetAndObserveImageData(data)
    return node


def node_ijk_to_ras(node, ijk):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint((*map(float, ijk), 1.0))[:3])


def test_volume_from_node_keeps_voxels_and_geometry(scene):
    array = np.random.default_rng(1).normal(size=(20, 17, 16)).astype(np.float32)
    node = psr_volume_node(scene, array)
    volume = mrml_adapter.volume_from_node(node)
    assert volume.name == "psr" and volume.array.shape == (20, 17, 16)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, [1.0, 1.0, 2.0])
    for ijk in [(0, 0, 0), (19, 0, 0), (0, 16, 0), (0, 0, 15), (3, 5, 7), (19, 16, 15)]:
        expected = node_ijk_to_ras(node, ijk)
        np.testing.assert_allclose(volume.index_to_ras(ijk)[0], expected, atol=1e-9)
    # i runs posterior, j superior, k right.
    np.testing.assert_allclose(volume.index_to_ras((1, 0, 0))[0] - volume.index_to_ras((0, 0, 0))[0],
                               [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(volume.index_to_ras((0, 0, 1))[0] - volume.index_to_ras((0, 0, 0))[0],
                               [2, 0, 0], atol=1e-12)


def test_volume_from_node_applies_a_linear_parent_transform(scene):
    array = np.random.default_rng(2).random((18, 17, 16)).astype(np.float32)
    node = psr_volume_node(scene, array)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 5.0)
    matrix.SetElement(2, 3, -3.0)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    volume = mrml_adapter.volume_from_node(node)
    np.testing.assert_allclose(volume.index_to_ras((2, 3, 4))[0],
                               node_ijk_to_ras(node, (2, 3, 4)) + [5.0, 0.0, -3.0], atol=1e-9)


def test_add_volume_node_round_trip(scene):
    volume = small_volume()
    node = mrml_adapter.add_volume_node(scene, volume)
    back = mrml_adapter.volume_from_node(node)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-12)
    assert node_ijk_to_ras(node, (3, 4, 5)) == pytest.approx(volume.index_to_ras((3, 4, 5))[0])


def test_volume_from_node_refuses_unusable_nodes(scene):
    with pytest.raises(InputError, match="Select an input volume"):
        mrml_adapter.volume_from_node(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no image data"):
        mrml_adapter.volume_from_node(empty)
    vector = psr_volume_node(scene, np.random.default_rng(3).random((18, 17, 16, 3)), 3,
                             "vtkMRMLVectorVolumeNode")
    with pytest.raises(InputError, match="3 components"):
        mrml_adapter.volume_from_node(vector)
    labels = psr_volume_node(scene, np.ones((18, 17, 16), np.int16), 1, "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="label map"):
        mrml_adapter.volume_from_node(labels)
    constant = psr_volume_node(scene, np.ones((18, 17, 16), np.float32))
    with pytest.raises(InputError, match="empty"):
        mrml_adapter.volume_from_node(constant)
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
    with pytest.raises(InputError, match="not a scalar volume"):
        mrml_adapter.volume_from_node(markups)
