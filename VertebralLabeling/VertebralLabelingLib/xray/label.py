"""Labeling one AP radiograph: 68 vertebral corners (T1..L5 x TL, TR, BL, BR) and Cobb angles.

Pipeline: the radiograph is scaled so its height fills the network input (``xray_data``), the
network gives a vertebra-centre heatmap and corner offsets (``xray_model``), the 17 strongest
heatmap peaks (3 x 3 non-maximum suppression) sorted from top to bottom become T1..L5, and each
reads its corners from the offsets of the cells around its peak (weighted by the heatmap).
Points go back to original pixels through the exact input geometry, then to physical space
with the image's pixel spacing and origin.  The Cobb angles are the AASCE reference method
(``cobb.py``) on the points in millimetres (pixels for images without spacing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io import models as model_lib
from . import data as xray_data
from .cobb import N_VERTEBRAE, CobbResult, cobb_angles
from .data import INPUT_SHAPE, OFFSET_SCALE, POINT_LABELS, STRIDE, Radiograph
from .network import load

#: What the user reads when the chain could sit a whole level off.
LEVEL_WARNING = ("the vertebral levels are not confirmed (the chain could be shifted by a level, e.g. "
                 "T1 on C7): check T1 and L5 before naming end vertebrae")
#: A vertebra whose centre peak is below this is flagged for review.
REVIEW_THRESHOLD = 0.3


@dataclass
class XrayResult:
    """Corners in original pixels (x, y) and physical space, per-vertebra confidence, angles."""

    points_px: np.ndarray           # (68, 2) pixel (x = column, y = row)
    points: np.ndarray              # (68, 2) physical (x, y), LPS of the 2D image
    confidence: np.ndarray          # (17,) centre peak height in [0, 1]
    cobb: CobbResult
    radiograph: Radiograph
    seconds: float = 0.0
    warnings: list = field(default_factory=list)
    #: True when the chain could sit a whole level off (see :meth:`Decoded.could_shift`).
    level_uncertain: bool = False
    #: (17,) True for the vertebrae to check to confirm the levels (the chain's uncertain ends).
    level_review: np.ndarray = field(default_factory=lambda: np.zeros(N_VERTEBRAE, bool))

    @property
    def uncertain_levels(self) -> list:
        """Names of the vertebrae whose level needs a check (e.g. ['T1'])."""
        return [xray_data.VERTEBRA_NAMES[i] for i in np.nonzero(self.level_review)[0]]

    @property
    def labels(self):
        return POINT_LABELS

    def flagged(self) -> np.ndarray:
        return self.confidence < REVIEW_THRESHOLD


def cobb_from_points(points_px, radiograph: Radiograph) -> CobbResult:
    """Reference Cobb angles of pixel points, measured in mm (pixel spacing respected)."""
    spacing = np.asarray(radiograph.spacing, float)
    return cobb_angles(np.asarray(points_px, float) * spacing,
                       image_height=radiograph.height * spacing[1])


def cobb_from_physical(points, radiograph: Radiograph) -> CobbResult:
    return cobb_from_points(radiograph.physical_to_pixel(points), radiograph)


def _window(heat, y, x):
    """The 3 x 3 cells around peak cell (y, x), clipped to the map, and their weights (heat squared)."""
    h, w = heat.shape
    y0, y1, x0, x1 = max(0, y - 1), min(h, y + 2), max(0, x - 1), min(w, x + 2)
    return (slice(y0, y1), slice(x0, x1)), heat[y0:y1, x0:x1] ** 2 + 1e-12


def _corners_at(heat, offsets, y, x):
    """Corners (4, 2) read around peak cell (y, x): heatmap-weighted mean over its 3 x 3 cells."""
    (rows, cols), weights = _window(heat, y, x)
    cy, cx = np.mgrid[rows, cols]
    cell = np.stack([(cx + 0.5) * STRIDE - 0.5, (cy + 0.5) * STRIDE - 0.5], axis=-1)
    pred = offsets[rows, cols].reshape(weights.shape + (4, 2)) * OFFSET_SCALE + cell[:, :, None, :]
    return (pred * weights[..., None, None]).sum(axis=(0, 1)) / weights.sum()


#: Default cost of one level of disagreement between a candidate's level-head reading and the level
#: it would get in the chain; a model's metadata (``level_weight``) overrides it (the shipped model
#: uses 0.1, chosen on training images).
LEVEL_WEIGHT = 1.0
#: A chain could sit a whole level off when the level head's readings, less the chain's own levels
#: (median over the 17), fall outside this range (the head reads correct chains slightly high), or
#: when its weaker end vertebra (T1 or L5) has a centre peak below END_PEAK_REVIEW.  Chosen on 80
#: training images (benchmark/xray_level_flag.py --grid) as the rule that flags every shifted chain
#: there with the fewest flags: 9 of 9 caught, 66 % of images flagged.
LEVEL_RESIDUAL_RANGE = (0.0, 0.35)
END_PEAK_REVIEW = 0.3
#: Default weight of the anchor heads in the chain decoding: the chain's T1 gains
#: ``anchor_weight`` times its T1-anchor reading, its L5 the same with the L5 anchor (a model's
#: metadata ``anchor_weight`` overrides it).
ANCHOR_WEIGHT = 1.0
#: With anchor heads, a chain is also not confirmed when its T1 or L5 reads below this on its
#: anchor heatmap, or when another candidate reads higher than the chain's own end (metadata
#: ``anchor_review`` and ``anchor_rivals`` (true/false) override them).
ANCHOR_REVIEW = 0.3


@dataclass
class Decoded:
    """The decoded chain: corners (n*4, 2) in input pixels, peak heights (n,), and with a level
    head each vertebra's level reading (n,) (None without it)."""

    corners: np.ndarray
    peaks: np.ndarray
    levels: np.ndarray | None = None
    #: With anchor heads: the chain's T1 reading on the T1 anchor and its L5 on the L5 anchor (2,),
    #: and the highest reading of any other candidate on each (2,).
    anchor_ends: np.ndarray | None = None
    anchor_rivals: np.ndarray | None = None
    anchor_review: float = ANCHOR_REVIEW
    check_anchor_rivals: bool = True

    def level_residuals(self) -> np.ndarray | None:
        return None if self.levels is None else self.levels - np.arange(len(self.levels))

    def could_shift(self) -> bool:
        """True when the chain's levels are not confirmed: a weak end vertebra, or (with a level
        head) readings that disagree with the chain (see LEVEL_RESIDUAL_RANGE)."""
        if min(self.peaks[0], self.peaks[-1]) < END_PEAK_REVIEW or self.anchors_disagree():
            return True
        r = self.level_residuals()
        if r is None:
            return False
        low, high = LEVEL_RESIDUAL_RANGE
        return bool(not low <= np.median(r) <= high)


    def uncertain_ends(self) -> tuple:
        """Chain indices (0 = T1, n-1 = L5) of the ends to check when the chain could shift: an end
        that is weak, or weak or outranked on its anchor; both ends when only the level readings
        disagree (they do not say which end is wrong)."""
        if not self.could_shift():
            return ()
        last = len(self.peaks) - 1
        weak = [end for end, i in ((0, 0), (last, 1)) if self.peaks[end] < END_PEAK_REVIEW
                or (self.anchor_ends is not None and (self.anchor_ends[i] < self.anchor_review or (
                    self.check_anchor_rivals and self.anchor_rivals[i] >= self.anchor_ends[i])))]
        return tuple(weak) or (0, last)

    def anchors_disagree(self) -> bool:
        """True when an end of the chain is weak on its anchor heatmap or another candidate is
        stronger there (False without anchor heads)."""
        if self.anchor_ends is None:
            return False
        rival = self.check_anchor_rivals and np.any(self.anchor_rivals >= self.anchor_ends)
        return bool(np.any(self.anchor_ends < self.anchor_review) or rival)


def _anchor_readings(anchors: np.ndarray, ys, xs) -> np.ndarray:
    """(k, 2): each candidate's highest T1- and L5-anchor value in its 3 x 3 cells."""
    grown = ndimage.maximum_filter(anchors, size=(3, 3, 1), mode="nearest")
    return grown[ys, xs]


def _level_at(level: np.ndarray, heat: np.ndarray, y: int, x: int) -> float:
    """The level head's reading (vertebra index, 0 = T1) around a peak, heat-weighted over 3 x 3."""
    cells, weights = _window(heat, y, x)
    return float(xray_data.level_of((level[cells] * weights).sum() / weights.sum()))


def _peak_cells(heat: np.ndarray, n: int, nms: int):
    """(rows, cols) of the ``nms`` x ``nms`` local maxima; refuses fewer than ``n``."""
    local_max = (heat == ndimage.maximum_filter(heat, size=nms, mode="constant", cval=-1.0)) & (heat > 1e-3)
    ys, xs = np.nonzero(local_max)
    if len(ys) < n:
        raise InputError(f"Only {len(ys)} vertebra candidates found; is this an AP spine radiograph?")
    return ys, xs


def _chain_candidates(heat: np.ndarray, offsets: np.ndarray, n: int, nms: int):
    """The 4 n strongest peaks, sorted top to bottom: (rows, cols, corners (k, 4, 2))."""
    ys, xs = _peak_cells(heat, n, nms)
    keep = np.argsort(-heat[ys, xs], kind="stable")[: 4 * n]
    ys, xs = ys[keep], xs[keep]
    cand = np.array([_corners_at(heat, offsets, y, x) for y, x in zip(ys, xs)])
    order = np.argsort(cand[:, :, 1].mean(axis=1), kind="stable")
    return ys[order], xs[order], cand[order]


def decode_levels(heat: np.ndarray, offsets: np.ndarray, level: np.ndarray, n: int = N_VERTEBRAE,
                  nms: int = 3, chain: float = 0.0, level_weight: float = LEVEL_WEIGHT,
                  anchors: np.ndarray | None = None, anchor_weight: float = ANCHOR_WEIGHT) -> Decoded:
    """Like :func:`decode`, but each candidate also carries its level reading and the chain is
    chosen jointly on peak height, regular spacing and agreement with the levels: vertebra m of the
    chain pays ``level_weight * |level - m|``.  So a strong peak on C7 does not become "T1" when
    the level head places it above T1, and a chain can start at the true T1 even if it is weaker.
    With ``anchors`` (h, w, 2: T1 and L5 heatmaps) the chain is also anchored on them: its first
    vertebra gains ``anchor_weight`` times its T1 reading, its last the same with L5.
    """
    ys, xs, cand = _chain_candidates(heat, offsets, n, nms)
    levels = np.array([_level_at(level, heat, y, x) for y, x in zip(ys, xs)])
    readings = None if anchors is None else _anchor_readings(anchors, ys, xs)
    chosen = _chain(cand.mean(axis=1), heat[ys, xs], n, chain, levels, level_weight,
                    None if readings is None else anchor_weight * readings)
    decoded = Decoded(cand[chosen].reshape(-1, 2), heat[ys[chosen], xs[chosen]], levels[chosen])
    if readings is not None:
        ends = np.array([readings[chosen[0], 0], readings[chosen[-1], 1]])
        others = [np.delete(readings[:, 0], chosen[0]), np.delete(readings[:, 1], chosen[-1])]
        decoded.anchor_ends = ends
        decoded.anchor_rivals = np.array([o.max() if len(o) else 0.0 for o in others])
    return decoded


def decode(heat: np.ndarray, offsets: np.ndarray, n: int = N_VERTEBRAE, nms: int = 3,
           chain: float = 0.0):
    """Heatmap (h, w) + offsets (h, w, 8) -> corners (n*4, 2) in input pixels, peak values (n,).

    Peaks are ``nms`` x ``nms`` local maxima.  Without ``chain`` the ``n`` strongest are taken
    (Yi et al. 2020); with ``chain`` > 0 the ``n`` peaks are chosen jointly by dynamic
    programming: top to bottom, maximising the summed peak height minus
    ``chain * log(gap / pitch)^2`` for each gap between consecutive vertebrae (pitch = median gap
    of the strongest peaks), so a double peak or a skipped vertebra costs.  Each vertebra's
    corners are the heatmap-weighted mean of (cell position + offset) over the 3 x 3 cells
    around its peak.
    """
    if chain > 0:
        ys, xs, cand = _chain_candidates(heat, offsets, n, nms)
        chosen = _chain(cand.mean(axis=1), heat[ys, xs], n, chain)
        corners, peaks = cand[chosen], heat[ys[chosen], xs[chosen]]
        return corners.reshape(-1, 2), peaks
    ys, xs = _peak_cells(heat, n, nms)
    order = np.argsort(-heat[ys, xs], kind="stable")[:n]
    ys, xs = ys[order], xs[order]
    corners = np.array([_corners_at(heat, offsets, y, x) for y, x in zip(ys, xs)])
    top_down = np.argsort(corners[:, :, 1].mean(axis=1), kind="stable")
    return corners[top_down].reshape(-1, 2), heat[ys, xs][top_down]


def _chain(centres, scores, n, weight, levels=None, level_weight=LEVEL_WEIGHT, end_bonus=None):
    """Indices of ``n`` candidates (sorted top-down) forming the best-scoring regular chain
    (with ``levels``, candidate i as vertebra m also pays ``level_weight * |levels[i] - m|``;
    with ``end_bonus`` (k, 2), candidate i gains ``end_bonus[i, 0]`` as the first vertebra and
    ``end_bonus[i, 1]`` as the last)."""
    k = len(centres)
    strongest = np.sort(np.argsort(-scores, kind="stable")[:n])
    pitch = max(float(np.median(np.linalg.norm(np.diff(centres[strongest], axis=0), axis=1))), 1e-3)
    d = centres[None, :, :] - centres[:, None, :]  # d[j, i] = centre_i - centre_j
    gap = np.linalg.norm(d, axis=2)
    with np.errstate(divide="ignore"):
        cost = weight * np.log(np.maximum(gap, 1e-6) / pitch) ** 2
    valid = (d[..., 1] > 0) & (np.abs(d[..., 0]) < np.abs(d[..., 1])) & (gap > 0.35 * pitch)
    cost = np.where(valid, cost, np.inf)
    best = np.full((n, k), -np.inf)
    back = np.zeros((n, k), int)
    def unary(m):
        u = scores if levels is None else scores - level_weight * np.abs(levels - m)
        if end_bonus is not None and m in (0, n - 1):
            u = u + end_bonus[:, 0 if m == 0 else 1]
        return u

    best[0] = unary(0)
    for m in range(1, n):
        total = best[m - 1][:, None] - cost  # [j, i]
        back[m] = np.argmax(total, axis=0)
        best[m] = total[back[m], np.arange(k)] + unary(m)
    end = int(np.argmax(best[n - 1]))
    if not np.isfinite(best[n - 1, end]):  # no regular chain: fall back to the strongest peaks
        return strongest
    chosen = [end]
    for m in range(n - 1, 0, -1):
        chosen.append(int(back[m, chosen[-1]]))
    return np.array(chosen[::-1])


def vertebra_tilts(corners) -> np.ndarray:
    """Tilt (radians) of each vertebra: left-side midpoint to right-side midpoint (as cobb.py)."""
    c = np.asarray(corners, float).reshape(-1, 4, 2)
    vec = (c[:, 1] + c[:, 3]) / 2 - (c[:, 0] + c[:, 2]) / 2
    return np.arctan2(vec[:, 1], vec[:, 0])


def smooth_tilts(corners, weight: float) -> np.ndarray:
    """Rotate each vertebra about its centre towards the mean tilt of its neighbours.

    new tilt = (1 - weight) * tilt + weight * mean(neighbour tilts) (T1 and L5 have one
    neighbour).  Noise in single-vertebra tilts inflates the reference method's maximum-pair
    Cobb angle; the spine's curvature is smooth, so this removes noise more than signal.
    """
    c = np.asarray(corners, float).reshape(-1, 4, 2).copy()
    tilts = vertebra_tilts(c)
    padded = np.concatenate([[tilts[1]], tilts, [tilts[-2]]])
    neighbours = (padded[:-2] + padded[2:]) / 2
    delta = weight * (neighbours - tilts)
    centres = c.mean(axis=1, keepdims=True)
    cos, sin = np.cos(delta)[:, None], np.sin(delta)[:, None]
    rel = c - centres
    rotated = np.stack([rel[..., 0] * cos - rel[..., 1] * sin, rel[..., 0] * sin + rel[..., 1] * cos], axis=-1)
    return (rotated + centres).reshape(-1, 2)


class XrayLabeler:
    """A loaded landmark model; ``label(radiograph)`` runs the whole pipeline."""

    def __init__(self, model, meta: dict):
        self.model = model_lib.as_network(model)  # ONNX Runtime, or Keras for a .keras file
        self.meta = meta
        self.shape = tuple(meta.get("input_shape", INPUT_SHAPE))
        self.flip = bool(meta.get("tta_flip", False))
        self.tilt_smoothing = float(meta.get("tilt_smoothing", 0.0))
        self.nms = int(meta.get("nms", 3))
        self.chain = float(meta.get("chain_decoding", 0.0))
        self.level_weight = float(meta.get("level_weight", LEVEL_WEIGHT))
        self.anchor_weight = float(meta.get("anchor_weight", ANCHOR_WEIGHT))
        self.anchor_review = float(meta.get("anchor_review", ANCHOR_REVIEW))
        self.anchor_rivals = bool(meta.get("anchor_rivals", True))

    @classmethod
    def load(cls, name_or_path="xray-compact") -> "XrayLabeler":
        return cls(*load(name_or_path))

    def _network(self, batch: np.ndarray):
        """(heatmap, offsets, level or None, anchors or None) for a batch (n, h, w, 1), in Keras
        output order (models without those heads give None)."""
        outputs = list(self.model.run(np.ascontiguousarray(batch, dtype=np.float32)))
        return tuple(outputs + [None] * (4 - len(outputs)))

    def predict_input(self, image: np.ndarray):
        """Corners (68, 2) and peaks (17,) in input pixels of one prepared input image.

        With ``flip`` (metadata ``tta_flip``) the mirrored image is run too and both outputs are
        averaged before decoding (the mirrored offsets are mirrored back and their left/right
        corners swapped).  With ``tilt_smoothing`` > 0 each vertebra's tilt is pulled towards
        its neighbours' (see :func:`smooth_tilts`).
        """
        decoded = self.decode_input(image)
        return decoded.corners, decoded.peaks

    def decode_input(self, image: np.ndarray) -> Decoded:
        """The decoded chain of one prepared input image (see :meth:`predict_input`)."""
        batch = image[None, ..., None].astype(np.float32)
        if self.flip:
            batch = np.concatenate([batch, batch[:, :, ::-1]])
        heat, offsets, level, anchors = self._network(batch)
        h, o = heat[0, ..., 0], offsets[0]
        lv = None if level is None else level[0, ..., 0]
        an = None if anchors is None else anchors[0]
        if self.flip:
            hf, of = heat[1, :, ::-1, 0], offsets[1, :, ::-1].reshape(o.shape[:2] + (4, 2)).copy()
            of[..., 0] *= -1.0
            of = of[:, :, [1, 0, 3, 2]].reshape(o.shape)
            h, o = (h + hf) / 2, (o + of) / 2
            if lv is not None:
                lv = (lv + level[1, :, ::-1, 0]) / 2
            if an is not None:
                an = (an + anchors[1, :, ::-1]) / 2
        if lv is None:
            decoded = Decoded(*decode(h, o, nms=self.nms, chain=self.chain))
        else:
            decoded = decode_levels(h, o, lv, nms=self.nms, chain=self.chain, level_weight=self.level_weight,
                                    anchors=an, anchor_weight=self.anchor_weight)
            decoded.anchor_review, decoded.check_anchor_rivals = self.anchor_review, self.anchor_rivals
        if self.tilt_smoothing > 0:
            decoded.corners = smooth_tilts(decoded.corners, self.tilt_smoothing)
        return decoded

    def label(self, radiograph: Radiograph, progress=None) -> XrayResult:
        start = time.perf_counter()
        if progress:
            progress(0.1, "Preparing the image")
        image, matrix = xray_data.prepare_input(radiograph, self.shape)
        if progress:
            progress(0.4, "Running the landmark network")
        decoded = self.decode_input(image)
        points_px = xray_data.apply(matrix, decoded.corners)
        points = radiograph.pixel_to_physical(points_px)
        if progress:
            progress(0.9, "Computing Cobb angles")
        result = XrayResult(points_px, points, decoded.peaks, cobb_from_points(points_px, radiograph), radiograph,
                            level_uncertain=decoded.could_shift())
        result.level_review[list(decoded.uncertain_ends())] = True
        if result.level_uncertain:
            result.warnings.append(f"{LEVEL_WARNING} (check {' and '.join(result.uncertain_levels)})")
        low = [xray_data.VERTEBRA_NAMES[i] for i in np.nonzero(result.flagged())[0]]
        if len(low) > 3:
            result.warnings.append(f"{len(low)} vertebrae found with low confidence ({', '.join(low)}); "
                                   "check that this is an AP spine radiograph from T1 to L5.")
        result.seconds = time.perf_counter() - start
        if progress:
            progress(1.0, "Done")
        return result
