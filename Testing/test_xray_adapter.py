"""The X-ray MRML adapter against a real scene (slicer-core wheel): radiograph nodes with pixel
spacing, the 68-point list, .mrk.json round trips through Slicer's own storage node, the live
Cobb observer (moving a corner recomputes the angles and moves the lines) and manual mode.
"""

import json

import numpy as np
import pytest

from conftest import require_module

slicer = require_module("slicer", "the slicer-core wheel gives headless MRML")
vtk = require_module("vtk")

from slicer_markups_files import json_storage, read_with_slicer  # noqa: E402
from VertebralLabelingLib.errors import InputError  # noqa: E402
from VertebralLabelingLib.xray import export as xray_export  # noqa: E402
from VertebralLabelingLib.xray.cobb import cobb_angles  # noqa: E402
from VertebralLabelingLib.xray.data import POINT_LABELS, Radiograph  # noqa: E402
from VertebralLabelingLib.xray.label import cobb_from_physical  # noqa: E402
from VertebralLabelingSlicerLib import xray_adapter  # noqa: E402

SCHEMA = __import__("pathlib").Path(__file__).parent / "data" / "markups-schema-v1.0.3.json"
SPACING, ORIGIN = (0.35, 0.2), (12.0, -30.0)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def radiograph():
    array = np.random.default_rng(0).random((700, 260)).astype(np.float32)
    return Radiograph(array, SPACING, ORIGIN, "xr")


@pytest.fixture
def volume_node(scene, radiograph):
    return xray_adapter.add_radiograph_node(scene, radiograph)


def tilted_points(radiograph, tilt_index=6, tilt_deg=14.0):
    """The template spine (physical mm) with one vertebra rotated by tilt_deg in millimetres."""
    pts = xray_adapter.template_points(radiograph).copy()
    v = slice(4 * tilt_index, 4 * tilt_index + 4)
    centre = pts[v].mean(axis=0)
    t = np.radians(tilt_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    pts[v] = (pts[v] - centre) @ rot.T + centre
    return pts


def world(node, index):
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, p)
    return np.array(p)


# -- radiographs -----------------------------------------------------------------------------------
def test_radiograph_node_round_trip_keeps_pixels_spacing_origin(volume_node, radiograph):
    back = xray_adapter.radiograph_from_node(volume_node)
    np.testing.assert_array_equal(back.array, radiograph.array)
    assert back.spacing == pytest.approx(SPACING) and back.origin == pytest.approx(ORIGIN)
    # Slicer draws pixel (i, j) at RAS (-(ox + sx i), -(oy + sy j), z): the LPS physical point.
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ras = matrix.MultiplyPoint((10, 20, 0, 1))[:3]
    np.testing.assert_allclose(ras, [-(ORIGIN[0] + 10 * SPACING[0]), -(ORIGIN[1] + 20 * SPACING[1]), 0])


def test_3d_volume_and_empty_nodes_are_refused(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    data = vtk.vtkImageData()
    data.SetDimensions(40, 50, 6)
    data.AllocateScalars(vtk.VTK_FLOAT, 1)
    volume.SetAndObserveImageData(data)
    with pytest.raises(InputError, match="3D volume"):
        xray_adapter.radiograph_from_node(volume)
    with pytest.raises(InputError, match="no image data"):
        xray_adapter.radiograph_from_node(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "void"))
    with pytest.raises(InputError, match="Select"):
        xray_adapter.radiograph_from_node(None)


# -- the 68 points ---------------------------------------------------------------------------------
def test_68_labeled_points_in_physical_space(scene, volume_node, radiograph):
    pts = tilted_points(radiograph)
    node = xray_adapter.update_landmarks_node(scene, pts, np.linspace(0.1, 1, 17), volume_node)
    assert node.GetNumberOfControlPoints() == 68 and node.GetFixedNumberOfControlPoints()
    assert [node.GetNthControlPointLabel(i) for i in range(68)] == list(POINT_LABELS)
    for i in (0, 27, 67):
        np.testing.assert_allclose(world(node, i), [-pts[i, 0], -pts[i, 1], 0.0], atol=1e-9)
        assert node.GetNthControlPointAssociatedNodeID(i) == volume_node.GetID()
    assert node.GetNthControlPointDescription(0) == "confidence=0.10" and not node.GetNthControlPointSelected(0)
    np.testing.assert_allclose(xray_adapter.points_from_node(node), pts, atol=1e-9)
    assert not xray_adapter.node_has_user_edits(node)
    assert node.AddControlPoint(0.0, 0.0, 0.0, "extra") == -1  # fixed count


def test_vertebrae_whose_level_is_not_confirmed_are_marked_for_review(scene, volume_node, radiograph):
    pts = tilted_points(radiograph)
    review = np.zeros(17, bool)
    review[16] = True  # L5 to check
    node = xray_adapter.update_landmarks_node(scene, pts, np.ones(17), volume_node, level_review=review)
    for i in range(64, 68):
        assert "level not confirmed" in node.GetNthControlPointDescription(i) and not node.GetNthControlPointSelected(i)
    assert node.GetNthControlPointDescription(63) == "confidence=1.00" and node.GetNthControlPointSelected(63)


def test_mrk_json_round_trip_through_slicer_storage(scene, volume_node, radiograph, tmp_path):
    """Adapter -> Slicer writer -> core reader, and core writer -> Slicer reader, 68 points with
    pixel spacing and origin; the core file also validates against the markups schema."""
    pts = tilted_points(radiograph)
    node = xray_adapter.update_landmarks_node(scene, pts, np.ones(17), volume_node)
    slicer_file = tmp_path / "slicer.mrk.json"
    assert json_storage(scene, slicer_file).WriteData(node) == 1
    np.testing.assert_allclose(xray_export.read_markups_json(slicer_file), pts, atol=1e-3)

    core_file = tmp_path / "core.mrk.json"
    xray_export.write_markups_json(pts, core_file, np.ones(17))
    jsonschema = require_module("jsonschema")
    jsonschema.validate(json.loads(core_file.read_text()), json.loads(SCHEMA.read_text()))
    back = read_with_slicer(core_file)
    assert back.GetNumberOfControlPoints() == 68
    assert [back.GetNthControlPointLabel(i) for i in range(68)] == list(POINT_LABELS)
    np.testing.assert_allclose(xray_adapter.points_from_node(back), pts, atol=1e-3)
    # Pixel positions follow from the image's spacing and origin.
    pixels = radiograph.physical_to_pixel(xray_adapter.points_from_node(back))
    np.testing.assert_allclose(pixels * SPACING + ORIGIN, pts, atol=1e-3)


def test_rerun_protects_hand_edits(scene, volume_node, radiograph):
    pts = tilted_points(radiograph)
    node = xray_adapter.update_landmarks_node(scene, pts, None, volume_node)
    node.SetNthControlPointPositionWorld(5, *(world(node, 5) + [2.0, 0.0, 0.0]))
    assert xray_adapter.node_has_user_edits(node)
    with pytest.raises(xray_adapter.UserEditsWouldBeLost):
        xray_adapter.update_landmarks_node(scene, pts, None, volume_node, node)
    same = xray_adapter.update_landmarks_node(scene, pts, None, volume_node, node, overwrite_edits=True)
    assert same is node and not xray_adapter.node_has_user_edits(node)


# -- live update -----------------------------------------------------------------------------------
def line_ends(line):
    return np.array([world(line, 0), world(line, 1)])


def test_moving_a_corner_recomputes_angles_and_moves_the_lines(scene, volume_node, radiograph):
    pts = tilted_points(radiograph, tilt_index=6, tilt_deg=14.0)
    node = xray_adapter.update_landmarks_node(scene, pts, None, volume_node)
    calls = []
    live = xray_adapter.LiveCobb(scene, node, volume_node, lambda cobb, msg: calls.append(cobb))
    expected = cobb_from_physical(pts, radiograph)
    assert live.last.angles_deg == pytest.approx(expected.angles_deg)
    assert live.last.angles_deg[0] == pytest.approx(14.0, abs=0.01)
    lines = xray_adapter.line_nodes(scene, node)
    assert len(lines) == 6 and all(line.IsA("vtkMRMLMarkupsLineNode") for line in lines)
    assert "14.0 deg" in lines[0].GetName()
    before = [line_ends(line) for line in lines]
    n_calls = len(calls)

    # Drag T12's right corners 8 mm up: T12 tilts, the main curve now ends at T12.
    moved = pts.copy()
    for corner in (1, 3):
        index = 4 * 11 + corner
        moved[index, 1] -= 8.0
        node.SetNthControlPointPositionWorld(index, -moved[index, 0], -moved[index, 1], 0.0)
    assert len(calls) > n_calls  # the observer fired without any model run
    truth = cobb_from_physical(moved, radiograph)
    assert live.last.angles_deg == pytest.approx(truth.angles_deg)
    assert live.last.end_vertebrae == truth.end_vertebrae
    assert max(live.last.angles_deg) > 14.0 + 5.0
    after = [line_ends(line) for line in xray_adapter.line_nodes(scene, node)]
    assert xray_adapter.line_nodes(scene, node) == lines  # same nodes, moved
    assert any(np.abs(a - b).max() > 1.0 for a, b in zip(after, before))
    # Each line lies along its end vertebra's tilt.
    for k, (upper, lower) in enumerate(live.last.end_vertebrae):
        for j, vertebra in enumerate((upper, lower)):
            a, b = xray_adapter.end_vertebra_segment(moved, vertebra)
            np.testing.assert_allclose(after[2 * k + j][:, :2], -np.array([a, b]), atol=1e-6)
    live.remove()
    updates = live.updates
    node.SetNthControlPointPositionWorld(1, 1.0, 1.0, 0.0)
    assert live.updates == updates  # removed observers do not fire


def test_manual_mode_click_68_corners(scene, volume_node, radiograph):
    node = xray_adapter.manual_landmarks_node(scene, volume_node, template=False)
    assert node.GetNumberOfControlPoints() == 68
    assert node.GetNthControlPointPositionStatus(0) != node.PositionDefined
    messages = []
    live = xray_adapter.LiveCobb(scene, node, volume_node, lambda cobb, msg: messages.append((cobb, msg)))
    assert live.last is None and "0 of 68" in messages[-1][1] and "T1-TL" in messages[-1][1]
    pts = tilted_points(radiograph, tilt_index=3, tilt_deg=-9.0)
    for index, (x, y) in enumerate(pts):
        node.SetNthControlPointPositionWorld(index, -x, -y, 0.0)
        if index == 40:
            assert live.last is None and "41 of 68" in messages[-1][1]
    assert live.last.angles_deg[0] == pytest.approx(9.0, abs=0.01)
    assert live.last.angles_deg == pytest.approx(cobb_from_physical(pts, radiograph).angles_deg)


def test_manual_mode_template_starts_straight(scene, volume_node, radiograph):
    node = xray_adapter.manual_landmarks_node(scene, volume_node, template=True)
    live = xray_adapter.LiveCobb(scene, node, volume_node)
    assert max(live.last.angles_deg) == pytest.approx(0.0, abs=1e-6)
    pts = xray_adapter.points_from_node(node)
    pixels = radiograph.physical_to_pixel(pts)
    assert pixels[:, 0].min() > 0 and pixels[:, 0].max() < radiograph.width
    assert pixels[:, 1].min() > 0 and pixels[:, 1].max() < radiograph.height
    assert cobb_angles(pts).angles_deg == pytest.approx(live.last.angles_deg, abs=1e-6)
