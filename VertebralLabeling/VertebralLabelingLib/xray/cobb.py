"""Cobb angles from 68 AP-radiograph landmarks, the AASCE 2019 reference method.

This is a numpy re-implementation of the organisers' reference code of the
AASCE challenge (Accurate Automated Spinal Curvature Estimation, MICCAI 2019),
whose training labels are SpineWeb dataset 16 (Wu et al., "Automatic landmark
estimation for adolescent idiopathic scoliosis assessment using BoostNet",
MICCAI 2017).  The dataset's ``angles.csv`` was produced by that code, so
reproducing it exactly lets our own predictions be scored like the labels.

Followed sources (read and re-written, not copied):

* the organisers' MATLAB reference ``angleCal`` / ``isS`` / ``linefun``, as
  kept in github.com/Junlin639/spinal_landmark_estimation_heatmap,
  ``utils/angleCal.m`` (commit e13dc4dd); where ports differ we follow it;
* its Python port ``cobb_evaluate.py`` (``cobb_angle_calc``, ``is_S``, "transfered
  from matlab version of the MICCAI challenge") in
  github.com/yijingru/Vertebra-Landmark-Detection (commit 1bc65c2b).

With pixel coordinates and the image height this reproduces all 481 rows of
the training ``angles.csv`` to within 0.014 degrees (the rounding of the csv
files); normalised coordinates or the Python port's half-image test do not.

Method, in short: each vertebra is reduced to one vector, from the midpoint
of its left side to the midpoint of its right side (the mean of its upper and
lower endplate vectors).  The Cobb angle of two vertebrae is the angle
between their vectors.  The largest angle over all pairs is the main curve.
A line test (``_is_s``) decides whether the spine is S-shaped; if not, the
two other angles are measured from the main curve's end vertebrae to T1 and
L5; if it is, the neighbouring curves are searched above and/or below the
main one, depending on whether the main curve lies in the upper or lower half
of the image.

Quirks reproduced on purpose (they shape ``angles.csv``):

* cosines are rounded to 8 decimals before ``arccos`` (MATLAB ``roundn``);
* the S test uses an exact float ``!=`` and omits the last two midpoints;
* the upper/lower-half test uses the *bottom* endplate midpoints of the main
  curve's end vertebrae (MATLAB's 1-based ``mid_p_v(pos*2, 2)``; the Python
  port reads the top ones) and the *image height*, so coordinates must be in
  pixels (or mm) with the true aspect ratio, not normalised;
* ties go to the first index (MATLAB ``max``), so the main curve's upper end
  vertebra is the first maximal column.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

VERTEBRA_NAMES = tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))
CORNER_NAMES = ("TL", "TR", "BL", "BR")
#: T1..L5: the 17 vertebrae of an AP radiograph's landmarks.
N_VERTEBRAE = len(VERTEBRA_NAMES)
N_POINTS = len(CORNER_NAMES) * N_VERTEBRAE  # 68


@dataclass(frozen=True)
class CobbResult:
    """Output of :func:`cobb_angles`.

    ``angles_deg`` keeps the reference output order (the columns of AASCE
    ``angles.csv``): [0] the largest angle (main curve; the reference prints
    it as "PT"), [1] the curve above it ("MT"), [2] the curve below it, or,
    for an S-shape whose main curve lies in the lower half, the next curve
    above curve [1] ("TL/L").  ``end_vertebrae[k]`` is (upper, lower) for
    angle k.  ``branch`` is "single" (not S), "S-upper" or "S-lower".
    """

    angles_deg: tuple[float, float, float]
    end_vertebrae: tuple[tuple[str, str], ...]
    branch: str

    def to_dict(self) -> dict:
        """Plain dict (floats, strings, lists) ready for ``json.dumps``."""
        d = asdict(self)
        d["angles_deg"] = [float(a) for a in self.angles_deg]
        d["end_vertebrae"] = [list(p) for p in self.end_vertebrae]
        return d


def _validate(landmarks_xy) -> np.ndarray:
    """Return a float64 (68, 2) copy, or raise ValueError saying what is wrong."""
    pts = np.asarray(landmarks_xy, dtype=np.float64)
    if pts.shape != (N_POINTS, 2):
        raise ValueError(f"landmarks_xy must have shape ({N_POINTS}, 2) (17 vertebrae x 4 corners, x/y), "
                         f"got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks_xy must be finite (no NaN/inf)")
    return pts


def _is_s(mid_p_v: np.ndarray) -> bool:
    """Reference ``isS``: are the endplate midpoints on both sides of the T1-L5 line?

    For each midpoint the reference takes (y - y_end)/(y_0 - y_end) minus
    (x - x_end)/(x_0 - x_end), which is zero on the straight line joining the
    first and last midpoint and changes sign across it.  The spine is called
    S-shaped when two points have opposite signs, written as the sum of the
    outer product differing from the sum of its absolute values.  Only the
    first n-2 points are tested and the comparison is exact, as in MATLAB; a
    perfectly vertical line divides by zero and yields NaN, which counts as S.
    """
    p, n = mid_p_v, len(mid_p_v)
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = (p[: n - 2, 1] - p[-1, 1]) / (p[0, 1] - p[-1, 1]) - (p[: n - 2, 0] - p[-1, 0]) / (p[0, 0] - p[-1, 0])
        prod = np.outer(ll, ll)
        return bool(prod.sum(axis=0).sum() != np.abs(prod).sum(axis=0).sum())


def _tilt_angles(pts: np.ndarray) -> np.ndarray:
    """(17, 17) angles (radians) between the vertebrae's tilts, as the reference computes them."""
    # Per vertebra: left-side midpoint (TL+BL)/2 to right-side midpoint
    # (TR+BR)/2, i.e. the average tilt of both endplates.
    tl, tr, bl, br = (pts[k::4] for k in range(4))
    vec = (tr + br) / 2 - (tl + bl) / 2
    norm = np.sqrt(np.sum(vec * vec, axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        cosines = (vec @ vec.T) / np.outer(norm, norm)
    if not np.all(np.isfinite(cosines)):
        raise ValueError("each vertebra needs distinct left and right side midpoints (zero-width vertebra)")
    # Reference: acos(roundn(cos, -8)); rounding also keeps |cos| <= 1.
    return np.arccos(np.round(cosines, 8))  # radians, as the reference


def cobb_angles(landmarks_xy, image_height: float | None = None) -> CobbResult:
    """Three Cobb angles (degrees) of one AP radiograph, as the AASCE reference computes them.

    ``landmarks_xy``: (68, 2) corners in pixels (or mm), x right, y down,
    vertebrae T1..L5, corners TL, TR, BL, BR.  Angles depend on the aspect
    ratio, so normalised coordinates must be multiplied by width/height first.

    ``image_height``: height of the image in the same unit.  The reference
    uses it to tell whether the main curve is in the upper half (then look
    for the other curves above and below it) or the lower half (then look for
    two curves above it).  If omitted, the middle of the landmarks (T1 top to
    L5 bottom) stands in for the image middle; this only matters for S-shaped
    spines and may then differ from the reference (21 of 481 training rows).

    Reference: AASCE 2019 organisers' ``angleCal.m`` (see module docstring;
    Python port ``cobb_angle_calc`` in yijingru/Vertebra-Landmark-Detection,
    ``cobb_evaluate.py``), labels of Wu et al., MICCAI 2017.
    """
    pts = _validate(landmarks_xy)
    last = len(VERTEBRA_NAMES) - 1  # index of L5

    # Endplate midpoints (top of T1, bottom of T1, top of T2, ...): used by
    # the S test and the half-image test.
    mid_p_v = (pts[0::2] + pts[1::2]) / 2
    angles = _tilt_angles(pts)

    # Main curve: the most tilted pair; first maximal column (MATLAB max) is
    # the upper end vertebra, the row of its maximum the lower one.
    pos1 = np.argmax(angles, axis=0)
    pos2 = int(np.argmax(angles.max(axis=0)))
    low = int(pos1[pos2])
    main = angles[low, pos2]

    if not _is_s(mid_p_v):
        # Single curve: the other two angles are T1 vs the upper end vertebra
        # and the lower end vertebra vs L5.
        branch = "single"
        second, ends2 = angles[0, pos2], (0, pos2)
        third, ends3 = angles[last, low], (low, last)
    else:
        # Curve just above the main one: the vertebra above pos2 most tilted
        # against pos2 (searched T1..pos2).
        up = int(np.argmax(angles[pos2, : pos2 + 1]))
        second, ends2 = angles[pos2, up], (up, pos2)
        if image_height is None:
            image_height = pts[0:2, 1].mean() + pts[-2:, 1].mean()
        if mid_p_v[2 * pos2 + 1, 1] + mid_p_v[2 * low + 1, 1] < image_height:
            # Main curve in the upper half: third curve below it (low..L5).
            branch = "S-upper"
            down = low + int(np.argmax(angles[low, low:]))
            third, ends3 = angles[low, down], (low, down)
        else:
            # Main curve in the lower half: third curve above the second (T1..up).
            branch = "S-lower"
            top = int(np.argmax(angles[up, : up + 1]))
            third, ends3 = angles[up, top], (top, up)

    ends = tuple((VERTEBRA_NAMES[min(a, b)], VERTEBRA_NAMES[max(a, b)]) for a, b in ((pos2, low), ends2, ends3))
    degrees = tuple(float(np.degrees(a)) for a in (main, second, third))
    return CobbResult(angles_deg=degrees, end_vertebrae=ends, branch=branch)
