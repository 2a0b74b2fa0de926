"""MRML <-> core conversion for AP radiographs (the CobbAngle module): the only X-ray code that
touches Slicer's scene.  Headless-safe: only ``vtkMRML*`` classes and VTK, the scene is always
an argument, so the same code runs in Slicer and with the ``slicer-core`` wheel in tests.

Conventions:

* a radiograph is a scalar (or RGB vector) volume node with one slice; its pixel (i, j) lies at
  LPS (x, y) = origin + spacing * (i, j), which is ``xray_data.Radiograph``'s physical space;
* the landmarks are one point list of 68 points labeled ``T1-TL`` ... ``L5-BR`` (fixed count),
  description ``confidence=0.87`` per point (from its vertebra);
* the Cobb lines are six line nodes (two end vertebrae per curve) whose IDs are kept in the
  point list's attribute ``CobbAngle.lines``; they are drawn along each end vertebra's tilt;
* :class:`LiveCobb` observes the point list: any point moved, placed or unset recomputes the
  angles (no network run) and redraws the lines, then calls back the GUI.
"""

from __future__ import annotations

import json

import numpy as np
import vtk

from VertebralLabelingLib.errors import InputError
from VertebralLabelingLib.xray.cobb import N_POINTS, VERTEBRA_NAMES
from VertebralLabelingLib.xray.data import POINT_LABELS, Radiograph, radiograph_from_sitk
from VertebralLabelingLib.xray.export import LEVEL_REVIEW, REVIEW_BELOW, with_review
from VertebralLabelingSlicerLib.nodes import UserEditsWouldBeLost, ijk_to_world  # noqa: F401 (re-exported)

LINES_ATTRIBUTE = "CobbAngle.lines"
PREDICTED_ATTRIBUTE = "CobbAngle.predicted"
EDIT_TOLERANCE_MM = 0.01
LINE_COLORS = ((0.0, 0.85, 1.0), (1.0, 0.78, 0.0), (1.0, 0.3, 0.8))
CURVE_NAMES = ("PT", "MT", "TL/L")
POINT_COLOR = (0.25, 1.0, 0.35)
REVIEW_COLOR = (1.0, 0.25, 0.25)


# -- images ----------------------------------------------------------------------------------
def _lps_matrix(volume_node) -> np.ndarray:
    """IJK -> world LPS (the core's radiograph space) of a volume node."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_world(volume_node)


def radiograph_from_node(volume_node) -> Radiograph:
    """Copy a single-slice volume node into a core ``Radiograph`` (same checks as the CLI)."""
    import SimpleITK as sitk
    from vtkmodules.util import numpy_support

    if volume_node is None:
        raise InputError("Select an input radiograph first.")
    name = volume_node.GetName() or "xray"
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f'"{name}" is not a grayscale or colour image ({volume_node.GetClassName()}).')
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise InputError(f'"{name}" has no image data (is it still loading?).')
    ni, nj, nk = image_data.GetDimensions()
    if nk != 1:
        raise InputError(f'"{name}" is a 3D volume ({ni} x {nj} x {nk}); an AP radiograph is one slice.')
    lps = _lps_matrix(volume_node)
    linear = lps[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-6 * np.abs(linear).max() or \
            linear[0, 0] <= 0 or linear[1, 1] <= 0:
        raise InputError(f'"{name}" is rotated or flipped in the scene; the X-ray model needs an '
                         "upright image (reset or harden its transform / IJK-to-RAS directions).")
    components = image_data.GetNumberOfScalarComponents()
    flat = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    array = flat.reshape(nj, ni, components) if components > 1 else flat.reshape(nj, ni)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=components > 1)
    image.SetSpacing((float(linear[0, 0]), float(linear[1, 1])))
    image.SetOrigin((float(lps[0, 3]), float(lps[1, 3])))
    radiograph = radiograph_from_sitk(image, name)
    radiograph.slice_z = float(lps[2, 3])
    return radiograph


def geometry_from_node(volume_node) -> Radiograph:
    """Spacing, origin and size of a radiograph node without copying its pixels."""
    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None:
        raise InputError("The radiograph has no image data.")
    ni, nj, _ = image_data.GetDimensions()
    lps = _lps_matrix(volume_node)
    zeros = np.broadcast_to(np.float32(0), (nj, ni))
    return Radiograph(zeros, (float(lps[0, 0]), float(lps[1, 1])), (float(lps[0, 3]), float(lps[1, 3])),
                      volume_node.GetName() or "xray", float(lps[2, 3]))


def add_radiograph_node(scene, radiograph: Radiograph, name: str | None = None):
    """Put a core ``Radiograph`` into the scene as a single-slice scalar volume (tests, demos)."""
    from vtkmodules.util import numpy_support

    image_data = vtk.vtkImageData()
    image_data.SetDimensions(radiograph.width, radiograph.height, 1)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(radiograph.array, np.float32).ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or radiograph.name)
    node.SetSpacing(radiograph.spacing[0], radiograph.spacing[1], 1.0)
    node.SetOrigin(-radiograph.origin[0], -radiograph.origin[1], radiograph.slice_z)
    directions = vtk.vtkMatrix4x4()
    directions.SetElement(0, 0, -1.0)
    directions.SetElement(1, 1, -1.0)
    node.SetIJKToRASDirectionMatrix(directions)
    node.SetAndObserveImageData(image_data)
    node.CreateDefaultDisplayNodes()
    return node


# -- the 68 landmarks ------------------------------------------------------------------------
def _ras(x, y, z):
    return (-float(x), -float(y), float(z))


def update_landmarks_node(scene, points, confidence=None, volume_node=None, node=None,
                          overwrite_edits=False, slice_z: float | None = None, level_review=None):
    """Write 68 corners (physical LPS x, y) into a point list (new, or ``node`` in place);
    ``level_review`` (17,) marks vertebrae whose level is to be checked (unselected, with the
    reason in their description, like a low-confidence vertebra)."""
    points = np.asarray(points, float)
    if points.shape != (N_POINTS, 2):
        raise InputError(f"expected {N_POINTS} points, got {points.shape}")
    if slice_z is None:
        slice_z = geometry_from_node(volume_node).slice_z if volume_node is not None else 0.0
    if node is None:
        name = f"{volume_node.GetName()} corners" if volume_node is not None else "Vertebral corners"
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    elif not overwrite_edits and node_has_user_edits(node):
        raise UserEditsWouldBeLost(f'The corners in "{node.GetName()}" were edited by hand; '
                                   "labeling again would replace them.")
    _prepare_node(node)
    volume_id = volume_node.GetID() if volume_node is not None else ""
    was = node.StartModify()
    try:
        _ensure_labels(node)
        for index, (x, y) in enumerate(points):
            node.SetNthControlPointPositionWorld(index, *_ras(x, y, slice_z))
            conf = None if confidence is None else float(confidence[index // 4])
            description = "" if conf is None else f"confidence={conf:.2f}"
            check_level = level_review is not None and bool(level_review[index // 4])
            if check_level:
                description = with_review(description, LEVEL_REVIEW)
            node.SetNthControlPointDescription(index, description)
            node.SetNthControlPointSelected(index, (conf is None or conf >= REVIEW_BELOW) and not check_level)
            node.SetNthControlPointAssociatedNodeID(index, volume_id)
        node.SetAttribute(PREDICTED_ATTRIBUTE, json.dumps(_positions(node)))
    finally:
        node.EndModify(was)
    return node


def _prepare_node(node):
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None and node.GetAttribute(PREDICTED_ATTRIBUTE) is None:
        display.SetSelectedColor(*POINT_COLOR)
        display.SetColor(*REVIEW_COLOR)
        display.SetPointLabelsVisibility(False)
        display.SetGlyphScale(1.5)


def _ensure_labels(node):
    labels = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
    if labels != list(POINT_LABELS):
        node.SetFixedNumberOfControlPoints(False)
        node.RemoveAllControlPoints()
        for label in POINT_LABELS:
            node.AddControlPoint(0.0, 0.0, 0.0, label)
    node.SetFixedNumberOfControlPoints(True)


def _positions(node):
    out = []
    for i in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, p)
        out.append(p)
    return out


def node_has_user_edits(node) -> bool:
    """True if the points differ from the last prediction written into the node."""
    text = node.GetAttribute(PREDICTED_ATTRIBUTE)
    if not text:
        return any(node.GetNthControlPointPositionStatus(i) == node.PositionDefined
                   for i in range(node.GetNumberOfControlPoints()))
    try:
        predicted = np.array(json.loads(text), float)
    except (ValueError, TypeError):
        return True
    if predicted.shape != (node.GetNumberOfControlPoints(), 3):
        return True
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != node.PositionDefined or \
                node.GetNthControlPointLabel(i) != POINT_LABELS[i]:
            return True
    return bool(np.linalg.norm(np.array(_positions(node)) - predicted, axis=1).max() > EDIT_TOLERANCE_MM)


def manual_landmarks_node(scene, volume_node=None, template: bool = True, name: str | None = None):
    """A point list for manual mode: 68 labeled corners, either a straight template spine to drag
    onto the vertebrae (``template``) or unplaced points to click one after the other."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(
        name or (f"{volume_node.GetName()} corners (manual)" if volume_node else "Vertebral corners (manual)")))
    _prepare_node(node)
    geometry = geometry_from_node(volume_node) if volume_node is not None else None
    was = node.StartModify()
    try:
        _ensure_labels(node)
        if template and geometry is not None:
            points = template_points(geometry)
            for index, (x, y) in enumerate(points):
                node.SetNthControlPointPositionWorld(index, *_ras(x, y, geometry.slice_z))
        else:
            for index in range(N_POINTS):
                node.UnsetNthControlPointPosition(index)
        if volume_node is not None:
            for index in range(N_POINTS):
                node.SetNthControlPointAssociatedNodeID(index, volume_node.GetID())
    finally:
        node.EndModify(was)
    return node


def template_points(geometry: Radiograph) -> np.ndarray:
    """A straight upright spine (physical x, y) centred on the image, T1 at 8 %, L5 at 92 %."""
    w, h = geometry.width, geometry.height
    pitch = 0.84 * h / 17
    half_w, half_h = 0.07 * w, 0.36 * pitch
    pts = []
    for v in range(17):
        cy = 0.08 * h + (v + 0.5) * pitch
        for dx, dy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
            pts.append((w / 2 + dx * half_w, cy + dy * half_h))
    return geometry.pixel_to_physical(np.array(pts))


def points_from_node(node) -> np.ndarray:
    """The 68 corners (physical LPS x, y) as they are now, matched by label; InputError if any
    is missing or unplaced."""
    found = {}
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != node.PositionDefined:
            continue
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        found[node.GetNthControlPointLabel(i)] = (-p[0], -p[1])
    missing = [label for label in POINT_LABELS if label not in found]
    if missing:
        raise InputError(f"{N_POINTS - len(missing)} of {N_POINTS} corners placed; next: {missing[0]}")
    return np.array([found[label] for label in POINT_LABELS])


def confidence_from_node(node) -> np.ndarray | None:
    values = []
    for v in range(17):
        text = node.GetNthControlPointDescription(4 * v) if node.GetNumberOfControlPoints() > 4 * v else ""
        if not text.startswith("confidence="):
            return None
        try:
            values.append(float(text.split("=", 1)[1].split(";")[0]))
        except ValueError:
            return None
    return np.array(values)


# -- Cobb angles and lines -------------------------------------------------------------------
def cobb_from_node(node, volume_node=None):
    """Reference Cobb angles of the node's 68 corners (mm; the image geometry when given)."""
    from VertebralLabelingLib.xray.cobb import cobb_angles
    from VertebralLabelingLib.xray.label import cobb_from_physical

    points = points_from_node(node)
    if volume_node is not None and volume_node.GetImageData() is not None:
        return cobb_from_physical(points, geometry_from_node(volume_node))
    return cobb_angles(points)


def end_vertebra_segment(points, vertebra: str, extend: float = 1.6):
    """Line along a vertebra's tilt (left-side midpoint to right-side midpoint), lengthened."""
    v = VERTEBRA_NAMES.index(vertebra)
    tl, tr, bl, br = np.asarray(points, float)[4 * v: 4 * v + 4]
    left, right = (tl + bl) / 2, (tr + br) / 2
    mid, half = (left + right) / 2, (right - left) / 2 * extend
    return mid - half, mid + half


def update_cobb_lines(scene, node, cobb, points=None, slice_z: float = 0.0) -> list:
    """Create or move the six line nodes (two end vertebrae per curve); returns them."""
    points = points_from_node(node) if points is None else points
    ids = json.loads(node.GetAttribute(LINES_ATTRIBUTE) or "[]")
    lines = [scene.GetNodeByID(i) for i in ids]
    if len(lines) != 6 or any(line is None for line in lines):
        lines = []
        for k in range(3):
            for end in ("upper", "lower"):
                line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode",
                                               scene.GenerateUniqueName(f"{CURVE_NAMES[k]} {end}"))
                line.CreateDefaultDisplayNodes()
                display = line.GetDisplayNode()
                if display is not None:
                    display.SetSelectedColor(*LINE_COLORS[k])
                    display.SetColor(*LINE_COLORS[k])
                    display.SetPropertiesLabelVisibility(False)
                    display.SetPointLabelsVisibility(False)
                line.SetLocked(True)
                for m in range(line.GetNumberOfMeasurements()):  # the angle is the measurement here
                    line.GetNthMeasurement(m).SetEnabled(False)
                for _ in range(2):
                    line.AddControlPoint(0.0, 0.0, 0.0)
                lines.append(line)
        node.SetAttribute(LINES_ATTRIBUTE, json.dumps([line.GetID() for line in lines]))
    for k, (angle, ends) in enumerate(zip(cobb.angles_deg, cobb.end_vertebrae)):
        for j, vertebra in enumerate(ends):
            line = lines[2 * k + j]
            a, b = end_vertebra_segment(points, vertebra)
            was = line.StartModify()
            line.SetNthControlPointPositionWorld(0, *_ras(a[0], a[1], slice_z))
            line.SetNthControlPointPositionWorld(1, *_ras(b[0], b[1], slice_z))
            line.SetName(f"{CURVE_NAMES[k]} {angle:.1f} deg ({'upper' if j == 0 else 'lower'} {vertebra})")
            line.EndModify(was)
    return lines


def line_nodes(scene, node) -> list:
    ids = json.loads(node.GetAttribute(LINES_ATTRIBUTE) or "[]")
    return [n for n in (scene.GetNodeByID(i) for i in ids) if n is not None]


class LiveCobb:
    """Recompute the angles and redraw the lines whenever a corner of ``node`` changes.

    ``callback(cobb_or_None, message)`` is called after every update (None while fewer than 68
    corners are placed).  Call :meth:`remove` to stop observing.
    """

    EVENTS = ("PointModifiedEvent", "PointPositionDefinedEvent", "PointPositionUndefinedEvent",
              "PointAddedEvent", "PointRemovedEvent")

    def __init__(self, scene, node, volume_node=None, callback=None):
        self.scene, self.node, self.volume_node, self.callback = scene, node, volume_node, callback
        self.last = None
        self.updates = 0
        self._tags = [node.AddObserver(getattr(node, name), self._on_event) for name in self.EVENTS]
        self.update()

    def _on_event(self, caller, event):
        self.update()

    def update(self):
        self.updates += 1
        try:
            points = points_from_node(self.node)
            if self.volume_node is not None:
                from VertebralLabelingLib.xray.label import cobb_from_physical

                geometry = geometry_from_node(self.volume_node)
                cobb, z = cobb_from_physical(points, geometry), geometry.slice_z
            else:
                from VertebralLabelingLib.xray.cobb import cobb_angles

                cobb, z = cobb_angles(points), 0.0
            update_cobb_lines(self.scene, self.node, cobb, points, z)
            message = ", ".join(f"{n} {a:.1f}" for n, a in zip(CURVE_NAMES, cobb.angles_deg))
        except (InputError, ValueError) as error:
            cobb, message = None, str(error)
        self.last = cobb
        if self.callback is not None:
            self.callback(cobb, message)
        return cobb

    def remove(self):
        for tag in self._tags:
            self.node.RemoveObserver(tag)
        self._tags = []
