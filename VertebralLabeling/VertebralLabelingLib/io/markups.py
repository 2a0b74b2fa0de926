"""Slicer markups files: writing a point list, reading its control points, and validating a disc
markups file a person edited, before it is trusted as a label.

A corrected ``.mrk.json`` feeds the study table and, through ``import-corrections``, training;
a damaged or hostile one must be refused for that one image (with the reason), never turned
into a label with discs silently missing or doubled, and never crash the whole study.  Two
levels of checks:

* **format** -- the parts of Slicer's markups schema v1.0.3 this tool reads (``markups`` a
  non-empty list of objects with ``type``, ``coordinateSystem`` LPS/RAS, ``coordinateUnits``
  mm, ``controlPoints`` a list of objects with a string ``label`` and a 3-number ``position``);
  a light check in code, so the runtime needs no ``jsonschema`` (the tests compare it with
  the real schema);
* **anatomy** -- every point is one of the six disc labels, each at most once, finite and
  within ``MAX_COORDINATE_MM``, inside the image (when its geometry is known), and the discs
  go down the neck in order (C2-C3 highest).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import DISC_NAMES, DISC_VALUES
from ..errors import InputError

#: Larger markups files are refused unread (six points take about 4 kB).
MAX_MARKUPS_BYTES = 1_000_000
#: More control points than this are refused (six discs, plus room for unplaced extras).
MAX_POINTS = 64
#: Coordinates beyond this (mm) are refused (also when the image geometry is unknown).
MAX_COORDINATE_MM = 1.0e4
#: How far (voxels) a point may lie outside the image before it is refused.
INSIDE_MARGIN_VOXELS = 0.5

MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")
MARKUP_TYPES = ("Fiducial", "Line", "Angle", "Curve", "ClosedCurve", "Plane", "ROI")
_VALUE_BY_NAME = dict(zip(DISC_NAMES, DISC_VALUES))


def _reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def load_markups_document(path) -> dict:
    """The JSON of a markups file, size-bounded; NaN/Infinity tokens are refused (not JSON)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_MARKUPS_BYTES:
            raise InputError(f"{path.name} is larger than {MAX_MARKUPS_BYTES:,} bytes; not a disc "
                             "markups file.")
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InputError(f"{path.name} is not a readable markups file ({error}).") from error


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_markups_format(data) -> None:
    """The parts of the markups schema (v1.0.3) that are read here; InputError naming the first
    violation."""
    if not isinstance(data, dict):
        raise InputError("the document is not a JSON object")
    if not isinstance(data.get("@schema"), str):
        raise InputError("'@schema' is missing or not a string")
    markups = data.get("markups")
    if not isinstance(markups, list) or not markups:
        raise InputError("'markups' is not a non-empty list")
    for markup in markups:
        if not isinstance(markup, dict):
            raise InputError("an item of 'markups' is not an object")
        if markup.get("type") not in MARKUP_TYPES:
            raise InputError(f"markup type {markup.get('type')!r} is not one of {', '.join(MARKUP_TYPES)}")
        if markup.get("coordinateSystem", "LPS") not in ("LPS", "RAS"):
            raise InputError(f"coordinateSystem {markup.get('coordinateSystem')!r} is not LPS or RAS")
        units = markup.get("coordinateUnits", "mm")
        if not (units in ("mm", "um") or (isinstance(units, list) and len(units) == 3
                                          and all(isinstance(u, str) for u in units))):
            raise InputError(f"coordinateUnits {units!r} is not mm or um")
        points = markup.get("controlPoints", [])
        if not isinstance(points, list):
            raise InputError("'controlPoints' is not a list")
        for point in points:
            if not isinstance(point, dict):
                raise InputError("a control point is not an object")
            if "label" in point and not isinstance(point["label"], str):
                raise InputError(f"a control point label is {type(point['label']).__name__}, not text")
            if "position" in point and not (isinstance(point["position"], list)
                                            and len(point["position"]) == 3
                                            and all(_number(v) for v in point["position"])):
                raise InputError(f"control point {point.get('label', '')!r} has a position that is "
                                 "not 3 numbers")


def read_disc_points(path, geometry=None) -> list:
    """(disc name, RAS position) of a disc markups file, in disc order, or InputError (the reason).

    ``geometry``: ``{"shape": (ni, nj, nk), "ijk_to_ras": 4x4}`` of the image the points belong
    to; points outside it are refused.  Points whose ``positionStatus`` is not ``defined``
    (unset in Slicer) count as absent discs.
    """
    path = Path(path)
    data = load_markups_document(path)
    try:
        check_markups_format(data)
    except InputError as error:
        raise InputError(f"{path.name} is not a valid Slicer markups file: {error}") from None
    markup = data["markups"][0]
    if markup["type"] != "Fiducial":
        raise InputError(f"{path.name} holds a {markup['type']}, not a point list.")
    if markup.get("coordinateUnits", "mm") != "mm":
        raise InputError(f"{path.name} has coordinates in {markup['coordinateUnits']!r}, not mm.")
    points = markup.get("controlPoints", [])
    if len(points) > MAX_POINTS:
        raise InputError(f"{path.name} has {len(points)} control points (at most {MAX_POINTS}).")
    flip = np.array([-1.0, -1.0, 1.0]) if markup.get("coordinateSystem", "LPS") == "LPS" else np.ones(3)
    found = {}
    for point in points:
        label = point.get("label", "")
        if point.get("positionStatus", "defined") != "defined":
            continue
        if label not in _VALUE_BY_NAME:
            raise InputError(f"{path.name}: label {label!r} is not a disc ({', '.join(DISC_NAMES)}).")
        if label in found:
            raise InputError(f"{path.name}: disc {label} is placed twice.")
        if "position" not in point:
            raise InputError(f"{path.name}: disc {label} has no position.")
        ras = np.array(point["position"], dtype=float) * flip
        if not np.all(np.isfinite(ras)) or np.any(np.abs(ras) > MAX_COORDINATE_MM):
            raise InputError(f"{path.name}: disc {label} is at {point['position']}, not a finite "
                             f"position within {MAX_COORDINATE_MM:.0f} mm.")
        found[label] = ras
    if not found:
        raise InputError(f"{path.name} has no placed disc points (labels {', '.join(DISC_NAMES)}).")
    ordered = [(name, found[name]) for name in DISC_NAMES if name in found]
    for (upper, a), (lower, b) in zip(ordered, ordered[1:]):
        if not b[2] < a[2]:
            raise InputError(f"{path.name}: disc {lower} is not below {upper} (S {b[2]:.1f} vs "
                             f"{a[2]:.1f} mm); the discs are out of cranio-caudal order.")
    if geometry:
        try:
            matrix = np.asarray(geometry["ijk_to_ras"], float)
            shape = np.asarray(geometry["shape"], float)
            ijk = (np.linalg.inv(matrix) @ np.c_[np.array([p for _, p in ordered]),
                                                  np.ones(len(ordered))].T)[:3].T
        except (KeyError, TypeError, ValueError, np.linalg.LinAlgError):
            ijk = None
        if ijk is not None:
            margin = INSIDE_MARGIN_VOXELS
            for (name, _), index in zip(ordered, ijk):
                if np.any(index < -margin) or np.any(index > shape - 1 + margin):
                    raise InputError(f"{path.name}: disc {name} lies outside the image.")
    return ordered


def geometry_of(volume) -> dict:
    """The ``geometry`` argument of :func:`read_disc_points` for a loaded Volume."""
    return {"shape": list(volume.array.shape), "ijk_to_ras": volume.ijk_to_ras.tolist()}


def control_point(label: str, lps, description: str, flagged: bool) -> dict:
    """One labeled LPS control point; flagged points are left unselected so they stand out."""
    return {
        "label": label, "description": description, "associatedNodeID": "",
        "position": [float(v) for v in lps],
        "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
        "selected": not flagged, "visibility": True, "positionStatus": "defined",
    }


def markups_document(points: list, locked: bool = False) -> dict:
    """A fixed-size LPS point list (schema v1.0.3) around ``control_point`` dicts (MRI and X-ray)."""
    numbered = [dict(point, id=str(index), locked=locked) for index, point in enumerate(points, 1)]
    return {
        "@schema": MARKUPS_SCHEMA,
        "markups": [{
            "type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
            "locked": locked, "fixedNumberOfControlPoints": True, "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": len(numbered), "controlPoints": numbered,
            "measurements": [],
        }],
    }


def read_control_points(path) -> list:
    """Control points of a .mrk.json as dicts with ``label``, ``lps`` (3,), ``description`` and
    ``status`` (Slicer's positionStatus); a file in RAS is converted.  InputError if unreadable."""
    try:
        data = load_markups_document(path)  # size-bounded, no NaN/Infinity tokens
        check_markups_format(data)  # a controlPoints object or a list label: InputError, not a crash
        markup = data["markups"][0]
        flip = np.array([1.0, 1.0, 1.0]) if markup.get("coordinateSystem", "LPS") == "LPS" \
            else np.array([-1.0, -1.0, 1.0])
        points = []
        for point in markup.get("controlPoints", []):
            status = point.get("positionStatus", "defined")
            # An unplaced point may come without a position; a placed one must have it.
            has_position = status == "defined" or "position" in point
            lps = np.array([float(v) for v in point["position"]]) * flip if has_position else None
            points.append({"label": point.get("label", ""), "lps": lps,
                           "description": point.get("description", ""), "status": status})
        return points
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, InputError) as error:
        raise InputError(f"Cannot read markups file {path}: {error}") from error
