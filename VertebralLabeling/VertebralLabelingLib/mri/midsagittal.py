"""Finding the midsagittal plane and resampling it to a 1 mm x 1 mm image.

Method (why it follows the spinal canal, not the field of view): the neck is mirror-symmetric
about the plane through the spinal canal.  For every axial level we sample the volume on a RAS
grid and find the left-right position about which the axial image is most symmetric
(normalised cross-correlation of the image with its mirror).  A weighted, outlier-trimmed line
``R = a + b * S`` through those centres gives a plane that follows a shifted or laterally
tilted spine.  Sampling is done in patient RAS space, so the axis order, slice direction and an
oblique direction matrix of the input do not matter.

The 2D image convention: row 0 is the most superior row and rows go caudally, column 0 is the
most anterior column and columns go posteriorly, 1 mm per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..io.images import LPS_TO_RAS
from .volume import Volume, trilinear

#: Mirror centres are only searched where at least this much image lies on each side (mm).
MIN_HALF_WIDTH_MM = 8.0
#: Samples used for the symmetry search are capped so huge volumes stay fast.
MAX_SEARCH_POINTS = 250_000
#: A lateral tilt steeper than this (mm of R per mm of S) is not a spine: clamp it.
MAX_TILT = 0.35
#: Rotations about S (degrees) the symmetry search tries: a head turned in the scanner, or a
#: double-oblique image, puts the midsagittal plane at an angle to the R axis, and a plane
#: searched only along R then cuts the spine obliquely (millimetres off left-right).
YAW_SEARCH_DEG = (-20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0)
#: A turned plane is taken only when its symmetry beats the unturned one by this factor, so
#: straight images keep exactly the unturned search.
YAW_GAIN = 1.05
#: Smaller turns are not taken: real necks are not perfectly symmetric, and on the real
#: subjects a turn of 2.5-5 degrees "found" that way moved the discs away from the annotated
#: ones; below 10 degrees the plane is at most about 2 mm off at the posterior disc tips.
MIN_YAW_DEG = 10.0


def _rotation_s(yaw_deg: float) -> np.ndarray:
    a = np.radians(yaw_deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


@dataclass
class Midline:
    """The midsagittal plane R = offset + tilt * S (RAS mm), turned by ``yaw_deg`` about the S
    axis through ``pivot`` (RAS): offset and tilt are measured in that turned frame."""

    offset: float
    tilt: float = 0.0
    yaw_deg: float = 0.0
    pivot: tuple = (0.0, 0.0, 0.0)

    def r_at(self, s: np.ndarray | float) -> np.ndarray | float:
        return self.offset + self.tilt * np.asarray(s)

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 3) of the turned frame in RAS."""
        if not self.yaw_deg:
            return points
        pivot = np.asarray(self.pivot, float)
        return pivot + (np.asarray(points, float) - pivot) @ _rotation_s(self.yaw_deg).T

    def direction_to_world(self, vector: np.ndarray) -> np.ndarray:
        return vector if not self.yaw_deg else _rotation_s(self.yaw_deg) @ np.asarray(vector, float)


@dataclass
class SagittalSlice:
    """A 2D image sampled on a plane, with the mapping from pixels back to RAS.

    ``pixel_to_ras(r, c) = origin + r * row_axis + c * col_axis``; the axes have length 1 mm.
    ``inside`` marks pixels that lie inside the source volume.
    """

    image: np.ndarray
    inside: np.ndarray
    origin: np.ndarray
    row_axis: np.ndarray
    col_axis: np.ndarray

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.col_axis, self.row_axis)
        return n / np.linalg.norm(n)

    def pixel_to_ras(self, rc: np.ndarray) -> np.ndarray:
        rc = np.atleast_2d(np.asarray(rc, dtype=float))
        return self.origin + rc[:, :1] * self.row_axis + rc[:, 1:2] * self.col_axis

    def ras_to_pixel(self, ras: np.ndarray) -> np.ndarray:
        """Project RAS points onto the plane; returns (row, col) pixel coordinates."""
        basis = np.stack([self.row_axis, self.col_axis], axis=1)
        d = np.atleast_2d(np.asarray(ras, dtype=float)) - self.origin
        rc, *_ = np.linalg.lstsq(basis, d.T, rcond=None)
        return rc.T


def sample_plane(
    volume: Volume,
    origin: np.ndarray,
    row_axis: np.ndarray,
    col_axis: np.ndarray,
    shape: tuple[int, int],
    displacement: np.ndarray | None = None,
    normal_offsets: tuple[float, ...] = (0.0,),
) -> SagittalSlice:
    """Sample ``volume`` on a regular planar grid (optionally warped and slab-averaged).

    ``displacement`` (2, H, W) shifts each pixel's sampling position in pixel units (elastic
    augmentation); ``normal_offsets`` averages several parallel planes (simulates thick slices).

    ``sitk.Resample`` (linear, edges clamped as ``Volume.sample``) onto a one-slice reference
    image with the plane's geometry; the displacement is a ``DisplacementFieldTransform`` on
    that grid (plus the slab offset), so every pixel is sampled where the hand-written sampler
    sampled it.  Pixels outside the volume get the volume's minimum and ``inside=False``.
    """
    origin, row_axis, col_axis = (np.asarray(v, float) for v in (origin, row_axis, col_axis))
    normal = np.cross(col_axis, row_axis)
    normal = normal / np.linalg.norm(normal)
    reference = _plane_reference(origin, row_axis, col_axis, normal, shape)
    source, background = volume.sitk_image, volume.background
    total = np.zeros(shape, dtype=np.float32)
    inside_any = np.zeros(shape, dtype=bool)
    for offset in normal_offsets:
        shift = LPS_TO_RAS @ (offset * normal)  # RAS -> LPS (the matrix is its own inverse)
        if displacement is None:
            transform = sitk.TranslationTransform(3, [float(v) for v in shift])
        else:
            transform = _displacement_transform(reference, displacement, row_axis, col_axis, shift)
        sampled = sitk.Resample(source, reference, transform, sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
        values = sitk.GetArrayViewFromImage(sampled)[0]
        inside = ~np.isnan(values)
        total += np.where(inside, values, background)
        inside_any |= inside
    image = total / len(normal_offsets)
    return SagittalSlice(image=image, inside=inside_any, origin=origin, row_axis=row_axis, col_axis=col_axis)


def _plane_reference(origin, row_axis, col_axis, normal, shape) -> sitk.Image:
    """A (cols x rows x 1) image whose voxel (c, r, 0) sits at ``origin + r row + c col`` (LPS)."""
    reference = sitk.Image([int(shape[1]), int(shape[0]), 1], sitk.sitkFloat32)
    spacing = [float(np.linalg.norm(col_axis)), float(np.linalg.norm(row_axis)), 1.0]
    axes = np.stack([col_axis / spacing[0], row_axis / spacing[1], normal], axis=1)
    reference.SetSpacing(spacing)
    reference.SetOrigin([float(v) for v in LPS_TO_RAS @ origin])
    reference.SetDirection([float(v) for v in (LPS_TO_RAS @ axes).ravel()])
    return reference


def _displacement_transform(reference, displacement, row_axis, col_axis, shift):
    """Per-pixel physical shift (LPS mm) = displacement rows * row axis + cols * col axis + ``shift``."""
    field = displacement[0][..., None] * row_axis + displacement[1][..., None] * col_axis
    field = (field @ LPS_TO_RAS.T + shift)[None].astype(np.float64)  # (1, rows, cols, 3)
    image = sitk.GetImageFromArray(field, isVector=True)
    image.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(image)


def estimate_midline(volume: Volume) -> Midline:
    """Estimate the midsagittal plane from left-right mirror symmetry of axial levels.

    The mirror search runs in frames turned about S (``YAW_SEARCH_DEG``, coarse first); the
    most symmetric turn wins when it clearly beats the unturned frame (``YAW_GAIN``) and is
    refined to 2.5 degrees, so a rotated head or double-oblique image is followed instead of
    cut obliquely (turns under ``MIN_YAW_DEG`` are not taken).
    """
    lo, hi = volume.corners_ras().min(axis=0), volume.corners_ras().max(axis=0)
    extent = hi - lo
    if extent[0] < 2 * MIN_HALF_WIDTH_MM:
        return Midline(offset=float((lo[0] + hi[0]) / 2))
    centre = (lo + hi) / 2
    searches = {}

    def search(angle):  # each turn is searched once (the unturned one is also the answer, mostly)
        if angle not in searches:
            searches[angle] = _symmetry_search(volume, lo, hi, angle, centre, MAX_SEARCH_POINTS)
        return searches[angle]

    yaw = _best_yaw(lambda angle: search(angle)[3])
    s_axis, centres, weights, _ = search(yaw)
    midline = _fit_midline(s_axis, centres, weights, default=float((lo[0] + hi[0]) / 2))
    if yaw:
        midline.yaw_deg, midline.pivot = float(yaw), tuple(float(v) for v in centre)
    return midline


def _best_yaw(score) -> float:
    """The turn about S (degrees) of the most symmetric frame, or 0.

    ``score(angle)`` is the symmetry of the frame turned by ``angle``.  0 and +-MIN_YAW_DEG are
    tried first; only when a turn beats 0 by ``YAW_GAIN`` does the search go on in that
    direction (``YAW_SEARCH_DEG``) and refine the best by 2.5 degrees; a best turn under
    ``MIN_YAW_DEG`` is not taken.  Straight images thus cost two extra searches and keep the
    unturned plane exactly.
    """
    scores = {0.0: score(0.0)}
    for angle in (-MIN_YAW_DEG, MIN_YAW_DEG):
        scores[angle] = score(angle)
    side = max((-MIN_YAW_DEG, MIN_YAW_DEG), key=scores.get)
    if not scores[side] > YAW_GAIN * scores[0.0]:
        return 0.0
    for angle in YAW_SEARCH_DEG:
        if angle * side > 0 and abs(angle) > MIN_YAW_DEG:
            scores[angle] = score(angle)
    best = max(scores, key=scores.get)
    for angle in (best - 2.5, best + 2.5):
        if angle not in scores and abs(angle) <= max(YAW_SEARCH_DEG):
            scores[angle] = score(angle)
    best = float(max(scores, key=scores.get))
    return best if abs(best) >= MIN_YAW_DEG else 0.0


def _symmetry_search(volume: Volume, lo, hi, yaw_deg: float, centre, max_points: int,
                     disc: bool = False):
    """Mirror centres of the axial levels in the frame turned ``yaw_deg`` about S through
    ``centre``: (S levels, centres, weights, total symmetry score).

    ``disc``: only points within the largest axial circle about ``centre`` that fits in the
    box count, so every turn sees the same tissue and the scores of different turns compare
    fairly (the box corners would otherwise bring tissue in or out with the turn).
    """
    extent = hi - lo
    step_r = 1.0
    n_r = int(extent[0] / step_r) + 1
    step_as = max(3.0, float(np.sqrt(extent[1] * extent[2] * n_r / max_points)))
    r_axis = lo[0] + np.arange(n_r) * step_r
    a_axis = np.arange(lo[1], hi[1] + 1e-6, step_as)
    s_axis = np.arange(lo[2], hi[2] + 1e-6, 2 * step_as)
    # Voxel indices of the grid written out per axis (the grid is separable in R, A, S, also
    # when turned): no (N, 3) @ (3, 3) products on the ~250 k points, which are slow on busy cores.
    turn = _rotation_s(yaw_deg) if yaw_deg else np.eye(3)
    to_ijk = volume.ras_to_ijk
    matrix = to_ijk[:3, :3] @ turn
    shift = to_ijk[:3, :3] @ (centre - turn @ centre) + to_ijk[:3, 3]
    ijk = (shift + r_axis[:, None, None, None] * matrix[:, 0] + a_axis[None, :, None, None] * matrix[:, 1]
           + s_axis[None, None, :, None] * matrix[:, 2])
    shape = np.array(volume.array.shape)
    inside = np.all((ijk >= -0.5) & (ijk <= shape - 0.5), axis=-1)
    values = np.where(inside, trilinear(volume.array, ijk.reshape(-1, 3)).reshape(inside.shape),
                      volume.background)
    if disc:
        world = (r_axis[:, None, None, None] * turn[:2, 0] + a_axis[None, :, None, None] * turn[:2, 1]
                 + (centre - turn @ centre)[:2])
        radius = 0.5 * min(extent[0], extent[1])
        inside = inside & (((world - centre[:2]) ** 2).sum(axis=-1) <= radius ** 2)
    centres, weights = _mirror_centres(values, inside, r_axis)
    return s_axis, centres, weights, float(weights.sum())


def _mirror_centres(values: np.ndarray, inside: np.ndarray, r_axis: np.ndarray):
    """Per axial level (last axis), the R position of best mirror symmetry and its weight."""
    n_r = values.shape[0]
    # Only tissue counts: air and the zero fill around an oblique or cropped field of view
    # would otherwise make the field of view's own edges look like the axis of symmetry.
    tissue = inside & (values > _tissue_threshold(values, inside))
    v = np.where(tissue, values, np.nan)
    count = tissue.sum(axis=(0, 1), keepdims=True)
    v = v - np.nansum(v, axis=(0, 1), keepdims=True) / np.maximum(count, 1)
    v = np.nan_to_num(v)
    energy = (v * v).sum(axis=(0, 1)) + 1e-9
    min_half = int(MIN_HALF_WIDTH_MM / (r_axis[1] - r_axis[0]))
    ms = np.arange(2 * min_half, 2 * (n_r - 1 - min_half) + 1)
    # Mirror about index m / 2: score(m) = sum_i sum_a v[i] v[m - i] (v is 0 outside tissue, so
    # no extra mask is needed): per level, the self-convolution of v along R summed over A, done
    # with one FFT instead of a loop of full-array products (several times faster: the search
    # runs once per turn about S).  Not a BLAS product: multi-threaded BLAS crawls on busy cores.
    if len(ms):
        spectrum = np.fft.rfft(v.astype(np.float64), n=2 * n_r, axis=0)
        conv = np.fft.irfft((spectrum * spectrum).sum(axis=1), n=2 * n_r, axis=0)  # (2 n_r, S)
        # Normalised by the level's whole energy, not the overlap's: a mirror axis must explain
        # most of the tissue, so a sliver at the edge of the field of view cannot win.
        scores = conv[ms] / energy
        best = np.argmax(scores, axis=0)
        best_score = scores[best, np.arange(scores.shape[1])]
        best_m = ms[best]
    else:
        best_score = np.full(values.shape[2], -np.inf)
        best_m = np.zeros(values.shape[2])
    # Parabolic refinement around the best mirror index, per level.
    idx = np.clip(np.searchsorted(ms, best_m), 1, len(ms) - 2) if len(ms) >= 3 else None
    refined = best_m.astype(float)
    if idx is not None:
        cols = np.arange(scores.shape[1])
        y0, y1, y2 = scores[idx - 1, cols], scores[idx, cols], scores[idx + 1, cols]
        denom = y0 - 2 * y1 + y2
        with np.errstate(all="ignore"):
            shift = np.where(np.abs(denom) > 1e-9, 0.5 * (y0 - y2) / denom, 0.0)
        refined = ms[idx] + np.clip(shift, -1, 1)
    centres = r_axis[0] + (refined / 2.0) * (r_axis[1] - r_axis[0])
    content = values.std(axis=(0, 1))
    weights = np.clip(best_score, 0, None) ** 2 * (content > 0.05 * content.max())
    return centres, weights


def _tissue_threshold(values: np.ndarray, inside: np.ndarray) -> float:
    """Intensity above which a voxel is tissue rather than air (10 % of the robust range)."""
    if not inside.any():
        return -np.inf
    lo, hi = np.percentile(values[inside], [1.0, 99.0])
    return lo + 0.1 * (hi - lo)


def _fit_midline(s: np.ndarray, centres: np.ndarray, weights: np.ndarray, default: float) -> Midline:
    """Weighted line fit R = a + b*S with two rounds of outlier trimming (residual > 4 mm)."""
    keep = weights > 0
    if keep.sum() < 3:
        return Midline(offset=float(np.average(centres, weights=weights)) if keep.any() else default)
    a, b = float(np.median(centres[keep])), 0.0
    for _ in range(3):
        w = weights * keep
        design = np.stack([np.ones_like(s), s], axis=1) * np.sqrt(w)[:, None]
        (a, b), *_ = np.linalg.lstsq(design, centres * np.sqrt(w), rcond=None)
        b = float(np.clip(b, -MAX_TILT, MAX_TILT))
        residual = np.abs(centres - (a + b * s))
        keep = (weights > 0) & (residual < max(4.0, np.percentile(residual[weights > 0], 70)))
    return Midline(offset=float(a), tilt=float(b))


def extract_midsagittal(volume: Volume, midline: Midline | None = None,
                        normal_offset: float = 0.0) -> SagittalSlice:
    """Resample the midsagittal plane (estimated if not given) at 1 mm x 1 mm.

    The image covers the volume's full superior-inferior and anterior-posterior extent.
    """
    midline = midline or estimate_midline(volume)
    lo, hi = volume.corners_ras().min(axis=0), volume.corners_ras().max(axis=0)
    row_axis = np.array([-midline.tilt, 0.0, -1.0])
    row_axis /= np.linalg.norm(row_axis)
    col_axis = np.array([0.0, -1.0, 0.0])
    top_s = hi[2]
    origin = np.array([midline.r_at(top_s), hi[1], top_s])
    shape = (int(np.floor((hi[2] - lo[2]) / abs(row_axis[2]))) + 1, int(np.floor(hi[1] - lo[1])) + 1)
    if midline.yaw_deg:  # the plane was found in a frame turned about S: turn it back
        origin = midline.to_world(origin)
        row_axis, col_axis = midline.direction_to_world(row_axis), midline.direction_to_world(col_axis)
    return sample_plane(volume, origin, row_axis, col_axis, shape,
                        normal_offsets=(normal_offset,))


def normalize_intensity(image: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """Map the 1st..99th intensity percentile of the pixels inside the volume to 0..1.

    Percentiles (not min/max) make the network input independent of scanner scaling and of a
    few very bright voxels (fat, vessels).  Pixels outside the volume become 0.
    """
    mask = inside if inside is not None and inside.any() else np.ones(image.shape, bool)
    lo, hi = np.percentile(image[mask], [1.0, 99.0])
    scale = hi - lo if hi > lo else 1.0
    out = np.clip((image - lo) / scale, 0.0, 1.5).astype(np.float32)
    out[~mask] = 0.0
    return out
