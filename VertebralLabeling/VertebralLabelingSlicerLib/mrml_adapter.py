"""MRML <-> core conversion: the only VertebralLabeling code that touches Slicer's scene.

Why a separate layer: the core (``VertebralLabelingLib``) must run without Slicer (command
line, batch studies, CI), and the module widget should stay a thin GUI.  Every MRML call lives
here, so there is one file to test against a real scene and one file to fix when Slicer's
markups API changes.  Only ``vtkMRML*`` classes and VTK are used (no ``slicer.util``, no Qt),
so the same code runs inside Slicer and headless with the ``slicer-core`` wheel.

Markups conventions (what the rest of the extension relies on):

* one control point per disc, in ``DISC_NAMES`` order, label = disc name;
* the number of points is fixed (``SetFixedNumberOfControlPoints``): the user can move points
  but not add or delete them by accident.  MRML has no way to lock labels, so relabelling is
  detected instead (see ``node_has_user_edits``);
* description = ``confidence=0.87`` plus ``; REVIEW: <reason>`` for a flagged disc; flagged
  points are *unselected*, so they take the display node's (unselected) review colour;
* every point is associated with the input volume (``SetNthControlPointAssociatedNodeID``);
* the predicted positions are kept in the node attribute ``VertebralLabeling.predicted`` so a
  later run can tell whether the user corrected anything before it overwrites the points.
"""

from __future__ import annotations

import json
import re

import numpy as np
import SimpleITK as sitk
import slicer  # noqa: F401 (loads the markups MRML classes that AddNewNodeByClass creates)
import vtk

from VertebralLabelingLib import DISC_NAMES, DISC_VALUES
from VertebralLabelingLib.errors import InputError
from VertebralLabelingLib.mri.export import describe  # same description text as the .mrk.json export
from VertebralLabelingLib.mri.labeling import DiscPoint
from VertebralLabelingLib.mri.volume import Volume
from VertebralLabelingSlicerLib.nodes import UserEditsWouldBeLost, ijk_to_world  # noqa: F401 (re-exported)

#: Node attribute holding the last prediction written to the node: [{"label", "position"}].
PREDICTED_ATTRIBUTE = "VertebralLabeling.predicted"
#: A point farther than this (mm) from its prediction counts as moved by the user.
EDIT_TOLERANCE_MM = 0.01
#: Colour of confident points (selected) and of points flagged for review (unselected).
CONFIDENT_COLOR = (0.3, 1.0, 0.4)
REVIEW_COLOR = (1.0, 0.55, 0.0)

_VALUE_BY_NAME = dict(zip(DISC_NAMES, DISC_VALUES))
_CONFIDENCE = re.compile(r"confidence\s*=\s*([-+0-9.eE]+|nan)")


# -- volumes ---------------------------------------------------------------------------------
def volume_from_node(volume_node) -> Volume:
    """Copy a scalar volume node into a core ``Volume`` (voxels in i,j,k order + IJK->RAS).

    The voxels go through ``Volume.from_sitk`` so the panel refuses the same images (2D, tiny,
    empty, NaN-filled) with the same messages as the command line.  The geometry is taken from
    the node itself (IJKToRAS, times the parent transform when it is linear), because that is
    where Slicer draws the volume and therefore where the points must go.
    """
    if volume_node is None:
        raise InputError("Select an input volume first.")
    name = volume_node.GetName() or "volume"
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f'"{name}" is not a scalar volume ({volume_node.GetClassName()}).')
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f'"{name}" is a label map; select the MRI volume instead.')
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise InputError(f'"{name}" has no image data (is it still loading?).')
    components = image_data.GetNumberOfScalarComponents()
    if components != 1 or volume_node.IsA("vtkMRMLVectorVolumeNode"):
        raise InputError(
            f'"{name}" has {components} components per voxel (colour, vector, diffusion or 4D '
            "multi-volume); a single scalar 3D MRI volume is needed (extract one frame first)."
        )
    from vtkmodules.util import numpy_support

    ni, nj, nk = image_data.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    kji = flat.reshape(nk, nj, ni)  # VTK stores x (i) fastest: C order is k, j, i
    volume = Volume.from_sitk(sitk.GetImageFromArray(kji), name=name)  # checks + i,j,k array
    volume.ijk_to_ras = ijk_to_world(volume_node)
    return volume


def add_volume_node(scene, volume: Volume, name: str | None = None):
    """Put a core ``Volume`` into the scene as a scalar volume node (self-tests, demos)."""
    from vtkmodules.util import numpy_support

    kji = np.ascontiguousarray(np.transpose(volume.array, (2, 1, 0)))
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*volume.array.shape)
    scalars = numpy_support.numpy_to_vtk(kji.ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or volume.name)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(volume.ijk_to_ras[r, c]))
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(image_data)
    node.CreateDefaultDisplayNodes()
    return node


# -- markups ---------------------------------------------------------------------------------
def update_markups_node(scene, discs, volume_node=None, node=None, overwrite_edits=False):
    """Write ``discs`` into a point list: a new one, or ``node`` updated in place.

    Updating in place keeps the node's ID, display settings and scene references, so a second
    run does not leave a stale copy behind.  It raises ``UserEditsWouldBeLost`` (and changes
    nothing) when the user has corrected the points and ``overwrite_edits`` is False.
    """
    discs = list(discs)
    if node is None:
        name = f"{volume_node.GetName()} discs" if volume_node is not None else "Discs"
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    elif not overwrite_edits and node_has_user_edits(node):
        raise UserEditsWouldBeLost(
            f'The points in "{node.GetName()}" were moved, added, removed or renamed since they '
            "were labeled; labeling again would replace them."
        )
    first_fill = node.GetAttribute(PREDICTED_ATTRIBUTE) is None
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    if first_fill and node.GetDisplayNode() is not None:
        display = node.GetDisplayNode()
        display.SetSelectedColor(*CONFIDENT_COLOR)
        display.SetColor(*REVIEW_COLOR)
    volume_id = volume_node.GetID() if volume_node is not None else ""
    labels = [disc.name for disc in discs]
    was_modifying = node.StartModify()
    try:
        if _labels(node) != labels:
            node.SetFixedNumberOfControlPoints(False)  # a fixed list refuses add/remove
            node.RemoveAllControlPoints()
            for label in labels:
                node.AddControlPoint(0.0, 0.0, 0.0, label)
        for index, disc in enumerate(discs):
            node.SetNthControlPointPositionWorld(index, *(float(v) for v in disc.ras))
            node.SetNthControlPointLabel(index, disc.name)
            node.SetNthControlPointDescription(index, describe(disc))
            node.SetNthControlPointSelected(index, not disc.flagged)
            node.SetNthControlPointVisibility(index, True)
            node.SetNthControlPointAssociatedNodeID(index, volume_id)
        node.SetFixedNumberOfControlPoints(True)
        predicted = [{"label": label, "position": _position(node, index)}
                     for index, label in enumerate(labels)]
        node.SetAttribute(PREDICTED_ATTRIBUTE, json.dumps(predicted))
    finally:
        node.EndModify(was_modifying)
    return node


def node_has_user_edits(node) -> bool:
    """True when the points differ from the last prediction written by ``update_markups_node``.

    Differences are: a point moved more than EDIT_TOLERANCE_MM, points added or removed, a
    label changed, or a position unset.  A non-empty node with no stored prediction (a point
    list the user made) also counts: its points are the user's work.
    """
    predicted = _predicted(node)
    count = node.GetNumberOfControlPoints()
    if predicted is None:
        return count > 0
    if count != len(predicted) or _labels(node) != [p["label"] for p in predicted]:
        return True
    for index, point in enumerate(predicted):
        if node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
            return True
        moved = np.linalg.norm(np.subtract(_position(node, index), point["position"]))
        if moved > EDIT_TOLERANCE_MM:
            return True
    return False


def discs_from_node(node) -> list:
    """The discs as they are now in the node (user corrections included), for exports.

    Points whose label is not a disc name, or whose position is unset, are left out.  The
    confidence is parsed from the description (NaN when absent); a disc is flagged while its
    description still says ``REVIEW:``, so a reviewer can clear the flag by editing the text.
    """
    discs = []
    for index in range(node.GetNumberOfControlPoints()):
        label = node.GetNthControlPointLabel(index)
        if label not in _VALUE_BY_NAME or \
                node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, position)
        description = node.GetNthControlPointDescription(index) or ""
        match = _CONFIDENCE.search(description)
        confidence = float(match.group(1)) if match else float("nan")
        flagged = "REVIEW:" in description
        reason = description.split("REVIEW:", 1)[1].strip() if flagged else ""
        discs.append(DiscPoint(_VALUE_BY_NAME[label], label, np.array(position), confidence,
                               flagged, reason))
    return sorted(discs, key=lambda disc: disc.value)


def _labels(node) -> list:
    return [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]


def _position(node, index) -> list:
    """Position in the node's own coordinates (unaffected by moving its parent transform)."""
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(index, position)
    return position


def _predicted(node):
    text = node.GetAttribute(PREDICTED_ATTRIBUTE)
    if not text:
        return None
    try:
        predicted = json.loads(text)
        return [{"label": str(p["label"]), "position": [float(v) for v in p["position"]]}
                for p in predicted]
    except (ValueError, KeyError, TypeError):
        return None


# -- study (BIDS derivative) review ------------------------------------------------------------
#: Node attributes naming the study item a node belongs to and where its points came from.
STUDY_ITEM_ATTRIBUTE = "VertebralLabeling.studyItem"
STUDY_SOURCE_ATTRIBUTE = "VertebralLabeling.studySource"


def discs_from_markups_file(path) -> list:
    """DiscPoints from a .mrk.json, with the confidence and review flag of its descriptions."""
    from VertebralLabelingLib.mri.export import read_markups_json

    discs = []
    for label, ras, description in read_markups_json(path):
        if label not in _VALUE_BY_NAME:
            continue
        match = _CONFIDENCE.search(description or "")
        flagged = "REVIEW:" in (description or "")
        reason = description.split("REVIEW:", 1)[1].strip() if flagged else ""
        discs.append(DiscPoint(_VALUE_BY_NAME[label], label, np.asarray(ras, float),
                               float(match.group(1)) if match else float("nan"), flagged, reason))
    return sorted(discs, key=lambda disc: disc.value)


def load_study_item(scene, item, deriv):
    """Load one study image and its points (the correction if there is one, else the prediction).

    Returns (volume node, markups node, source) with source "corrected" or "predicted".  The
    points count as unedited right after loading, so ``node_has_user_edits`` tells whether the
    reviewer changed anything since.
    """
    from VertebralLabelingLib.mri.volume import load_volume
    from VertebralLabelingLib.study.bids import SUFFIX_CORRECTED, SUFFIX_MARKUPS

    corrected = item.path(deriv, SUFFIX_CORRECTED)
    source_path = corrected if corrected.exists() else item.path(deriv, SUFFIX_MARKUPS)
    if not source_path.exists():
        raise InputError(f"No markups for {item.key} in {deriv} (was the batch run?).")
    if not item.image.exists():
        raise InputError(f"Image of {item.key} not found: {item.image}")
    volume = load_volume(item.image)
    volume_node = add_volume_node(scene, volume, item.stem)
    markups = update_markups_node(scene, discs_from_markups_file(source_path), volume_node)
    markups.SetName(f"{item.stem} discs")
    source = "corrected" if source_path == corrected else "predicted"
    markups.SetAttribute(STUDY_ITEM_ATTRIBUTE, item.key)
    markups.SetAttribute(STUDY_SOURCE_ATTRIBUTE, source)
    return volume_node, markups, source


def save_study_correction(node, item, deriv):
    """Save the node's points as the item's human-corrected markups; returns the file path.

    Afterwards the node counts as unedited again (its points are saved).
    """
    from VertebralLabelingLib.study.bids import SUFFIX_CORRECTED
    from VertebralLabelingLib.study.corrections import save_corrected

    discs = discs_from_node(node)
    if not discs:
        raise InputError(f'"{node.GetName()}" has no disc points to save.')
    path = save_corrected(discs, item.path(deriv, SUFFIX_CORRECTED), source_image=item.image)
    predicted = [{"label": node.GetNthControlPointLabel(i), "position": _position(node, i)}
                 for i in range(node.GetNumberOfControlPoints())]
    node.SetAttribute(PREDICTED_ATTRIBUTE, json.dumps(predicted))
    node.SetAttribute(STUDY_SOURCE_ATTRIBUTE, "corrected")
    return path
