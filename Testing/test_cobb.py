"""Tests of the AASCE reference Cobb-angle method (VertebralLabelingLib/xray/cobb.py).

Synthetic spines check the geometry; the 481 ground-truth rows of the AASCE 2019
training set (SpineWeb dataset 16) check that we reproduce the organisers'
``angles.csv``.  Run with ``pytest -s`` to see the error distribution.
"""

import json

import numpy as np
import pytest

from conftest import require_path
from VertebralLabelingLib.io.files import data_root
from VertebralLabelingLib.xray.cobb import CORNER_NAMES, VERTEBRA_NAMES, cobb_angles

#: Largest |ours - angles.csv| measured over the 481 x 3 AASCE angles was 0.014 deg (rounding in
#: the organisers' file); a real change of the method moves some angle by far more.
AASCE_TOLERANCE_DEG = 0.05


def synthetic_spine(tilts_deg=None, width=40.0, height=30.0, pitch=40.0):
    """17 rectangles stacked on a vertical line (x right, y down), vertebra k
    rotated about its centre by tilts_deg[k]; corners TL, TR, BL, BR."""
    tilts = np.radians(np.zeros(17) if tilts_deg is None else np.asarray(tilts_deg, float))
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * [width / 2, height / 2]
    pts = []
    for k, t in enumerate(tilts):
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        pts.append(corners @ rot.T + [300.0, 100.0 + k * pitch])
    return np.concatenate(pts)


def test_names():
    assert len(VERTEBRA_NAMES) == 17 and VERTEBRA_NAMES[0] == "T1" and VERTEBRA_NAMES[11] == "T12"
    assert VERTEBRA_NAMES[12] == "L1" and VERTEBRA_NAMES[-1] == "L5"
    assert CORNER_NAMES == ("TL", "TR", "BL", "BR")


def test_straight_spine_is_zero():
    res = cobb_angles(synthetic_spine(), image_height=1000)
    np.testing.assert_allclose(res.angles_deg, 0, atol=0.05)


def test_known_tilts():
    tilts = np.zeros(17)
    tilts[5], tilts[11] = 10.0, -15.0  # T6 and T12
    res = cobb_angles(synthetic_spine(tilts), image_height=1000)
    # Reference order: [0] is the largest (main) curve.
    assert abs(res.angles_deg[0] - 25.0) < 0.1
    assert res.end_vertebrae[0] == ("T6", "T12")
    assert abs(res.angles_deg[1] - 10.0) < 0.1  # T1 (0 deg) against T6
    d = res.to_dict()
    json.dumps(d)
    assert d["end_vertebrae"][0] == ["T6", "T12"]


@pytest.mark.parametrize("bad", [np.zeros((67, 2)), np.zeros((68, 3)), np.zeros(136)])
def test_bad_shape(bad):
    with pytest.raises(ValueError, match="shape"):
        cobb_angles(bad)


def test_nan_raises():
    pts = synthetic_spine()
    pts[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        cobb_angles(pts)


@pytest.mark.realdata
def test_matches_aasce_ground_truth():
    aasce = data_root() / "xray-aasce"
    require_path(aasce / "labels" / "landmarks.csv")
    from PIL import Image

    labels = aasce / "labels"
    landmarks = np.loadtxt(labels / "landmarks.csv", delimiter=",")
    truth = np.loadtxt(labels / "angles.csv", delimiter=",")
    names = (labels / "filenames.csv").read_text().splitlines()
    assert landmarks.shape == (481, 136) and truth.shape == (481, 3) and len(names) == 481

    ours = []
    for row, name in zip(landmarks, names):
        with Image.open(aasce / "images" / name) as im:  # header only, no decode
            w, h = im.size
        xy = np.stack([row[:68] * w, row[68:] * h], axis=1)  # normalised -> pixels
        ours.append(cobb_angles(xy, image_height=h).angles_deg)
    diff = np.abs(np.array(ours) - truth)

    print(f"\n|delta| over {diff.size} angles: median {np.median(diff):.4f}, "
          f"p90 {np.percentile(diff, 90):.4f}, max {diff.max():.4f} deg")
    for k, col in enumerate(("col1 (main/'PT')", "col2 ('MT')", "col3 ('TL/L')")):
        d = diff[:, k]
        print(f"  {col}: median {np.median(d):.4f}, p90 {np.percentile(d, 90):.4f}, max {d.max():.4f}")
    assert diff.max() <= AASCE_TOLERANCE_DEG
