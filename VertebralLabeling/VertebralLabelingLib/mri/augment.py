"""Random geometry helpers shared by the two sources of training slices.

Why one module: the augmentation of real subjects (``dataset``) and the synthetic spine
generator (``synthetic_spine``) pose planes, warp them, carry disc points into the slice and
drop those outside the field of view in exactly the same way; keeping one copy keeps their
targets consistent.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Fixed-point steps that invert a slice's elastic warp for the disc targets.
INVERSE_WARP_ITERATIONS = 6


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` (radians) about ``axis`` (Rodrigues' formula)."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def smooth_field(rng: np.random.Generator, shape, cells: int, sigma: float) -> np.ndarray:
    """A smooth random 2D field (cubic zoom of Gaussian noise on a ``cells``-pixel grid)."""
    coarse = rng.normal(0, sigma, size=(max(2, shape[0] // cells), max(2, shape[1] // cells)))
    zoom = (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1])
    return ndimage.zoom(coarse, zoom, order=3)[: shape[0], : shape[1]]


def to_slice_pixels(points, origin, basis, displacement=None) -> np.ndarray:
    """(row, col) of 3D points in a slice with axes ``basis`` (columns: row, col, normal) and
    ``origin``; ``displacement`` (2, H, W) is the slice's elastic warp, applied inversely."""
    planar = np.linalg.solve(basis, (np.atleast_2d(points) - origin).T).T[:, :2]
    rc = planar
    if displacement is not None:
        # Pixel p samples the plane at p + d(p): the point's pixel solves p + d(p) = planar.
        # Fixed-point iterations (the first is p = planar - d(planar)); the warp is smooth
        # (|grad d| << 1), so a few steps reach well under a tenth of a pixel.
        for _ in range(INVERSE_WARP_ITERATIONS):
            shift = np.stack([ndimage.map_coordinates(d, rc.T, order=1, mode="nearest") for d in displacement],
                             axis=1)
            rc = planar - shift
    return rc


def visible_or_nan(points_rc: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The points with NaN wherever they fall outside the image or its field of view."""
    out = np.array(points_rc, float).copy()
    for k, (r, c) in enumerate(out):
        if np.isnan(r):
            continue
        ri, ci = int(round(r)), int(round(c))
        if not (0 <= ri < inside.shape[0] and 0 <= ci < inside.shape[1]) or not inside[ri, ci]:
            out[k] = np.nan
    return out
