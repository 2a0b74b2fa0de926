"""Heatmap peaks, and a second opinion on the level: find the dens, count the discs below it.

Used by ``labeling``: its decoder reads peaks with the same sub-pixel centroid, and every
labeled chain is checked against the count from C2 (``check_level_by_count``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .. import DISC_NAMES
from .midsagittal import SagittalSlice

#: A dens-tip or any-disc peak must exceed this to count as seen.
ANCHOR_THRESHOLD = 0.3
DETECTOR_THRESHOLD = 0.25
#: A placed disc must lie this close to a disc the level-agnostic detector sees (mm).
AGREEMENT_MM = 4.0
#: The first disc below the dens tip (C2/C3) lies this far below it (mm, along the image rows):
#: the dens (>= 10 mm) plus the C2 body (>= 14 mm) in the synthetic anatomy, with a margin.
DENS_TO_C2C3_MM = (20.0, 60.0)
#: How far the detected dens tip may sit below the true one: detections less than
#: ``DENS_TO_C2C3_MM[0] - DENS_TIP_TOLERANCE_MM`` (15 mm) below it (the C1/C2 joint, the dens
#: base) are not counted as discs.
DENS_TIP_TOLERANCE_MM = 5.0
#: When the first detected disc lies beyond DENS_TO_C2C3_MM[1], discs were missed: its level is
#: estimated from this usual dens-to-C2/C3 distance plus whole disc spacings.
USUAL_DENS_TO_C2C3_MM = 30.0


def _refine_peak(heatmap: np.ndarray, stride: int):
    """Argmax plus a weighted centroid in a 5x5 window -> (row, col) in input pixels, peak."""
    r, c = divmod(int(np.argmax(heatmap)), heatmap.shape[1])
    return _centroid_at(heatmap, r, c, stride)


def _centroid_at(heatmap: np.ndarray, r: int, c: int, stride: int):
    """Sub-pixel position of the peak at (r, c): weighted centroid of its 5x5 neighbourhood."""
    peak = float(heatmap[r, c])
    r0, c0 = max(r - 2, 0), max(c - 2, 0)
    window = np.clip(heatmap[r0:r + 3, c0:c + 3] - 0.3 * peak, 0, None)
    total = window.sum()
    if total > 0:
        rows = np.arange(r0, r0 + window.shape[0])
        cols = np.arange(c0, c0 + window.shape[1])
        rc = np.array([rows @ window.sum(axis=1), cols @ window.sum(axis=0)]) / total
    else:
        rc = np.array([r, c], float)
    return rc * stride + (stride - 1) / 2, peak


def _local_maxima(heatmap: np.ndarray, threshold: float) -> np.ndarray:
    """(row, col) heatmap cells that are the maximum of their 5 x 5 neighbourhood and exceed
    ``threshold`` (the peak finder of both the disc decoder and the level count)."""
    return np.argwhere((heatmap == ndimage.maximum_filter(heatmap, size=5)) & (heatmap > threshold))


def _flag(disc, reason: str) -> None:
    """Mark a DiscPoint for review with ``reason`` (each reason once)."""
    disc.flagged = True
    if reason not in disc.reason:
        disc.reason = f"{disc.reason}; {reason}" if disc.reason else reason


@dataclass
class LevelCount:
    """Discs seen by the level-agnostic detector, numbered by counting down from the dens.

    ``discs``: (n, 2) pixel (row, col) positions, cranial first; ``levels``: for each, its index
    counted from C2/C3 = 0 (None when no dens is in view: the count has no anchor); ``dens``:
    the dens tip (row, col) or None.
    """

    discs: np.ndarray
    levels: list
    dens: np.ndarray | None

    @property
    def anchored(self) -> bool:
        return self.dens is not None


def count_from_c2(any_disc: np.ndarray, dens: np.ndarray, stride: int) -> LevelCount:
    """Number the detected discs by counting down from the dens tip.

    Why a second opinion: the per-disc heads recognise each level by its appearance and
    context, and when they are wrong they are wrong together (a whole chain one level off).
    Counting discs below the one unmistakable landmark, the dens of C2, fails differently.
    A gap of more than 1.6 typical spacings counts as a missed disc.
    """
    found = [_centroid_at(any_disc, r, c, stride)[0] for r, c in _local_maxima(any_disc, DETECTOR_THRESHOLD)]
    points = np.array(sorted(found, key=lambda rc: rc[0])) if found else np.zeros((0, 2))
    anchor = None
    if dens.max() > ANCHOR_THRESHOLD:
        anchor = _refine_peak(dens, stride)[0]
    if anchor is None or not len(points):
        return LevelCount(points, [None] * len(points), anchor)
    below = points[:, 0] > anchor[0] + DENS_TO_C2C3_MM[0] - DENS_TIP_TOLERANCE_MM
    points = points[below]
    levels, level = [], 0
    gaps = np.diff(points[:, 0]) if len(points) > 1 else np.array([])
    typical = float(np.median(gaps)) if len(gaps) else 18.0
    for k, point in enumerate(points):
        if k == 0:
            level = 0 if point[0] - anchor[0] <= DENS_TO_C2C3_MM[1] else \
                int(round((point[0] - anchor[0] - USUAL_DENS_TO_C2C3_MM) / max(typical, 10.0)))
        else:
            gap = point[0] - points[k - 1][0]
            level += max(1, int(round(gap / max(typical, 10.0)))) if gap > 1.6 * typical else 1
        levels.append(level)
    return LevelCount(points, levels, anchor)


def check_level_by_count(discs: list, plane: SagittalSlice, count: LevelCount) -> None:
    """Flag every disc whose level the count from C2 does not confirm."""
    rows = plane.ras_to_pixel(np.array([d.ras for d in discs]))
    for index, (disc, rc) in enumerate(zip(discs, rows)):
        if disc.confidence == 0:
            continue  # already flagged: not found in view
        if not len(count.discs):
            _flag(disc, "the disc detector sees no disc here")
            continue
        distances = np.linalg.norm(count.discs - rc, axis=1)
        nearest = int(np.argmin(distances))
        if distances[nearest] > AGREEMENT_MM:
            _flag(disc, f"the disc detector sees no disc within {AGREEMENT_MM:.0f} mm")
        elif not count.anchored:
            _flag(disc, "level not confirmed: no C2 (dens) in view to count from")
        elif count.levels[nearest] != index:
            said = count.levels[nearest]
            name = DISC_NAMES[said] if 0 <= said < len(DISC_NAMES) else "another level"
            _flag(disc, f"counting from C2 puts this disc at {name}")
