"""Decoding the landmark network's outputs into the chain of 17 vertebrae (T1..L5).

Candidates are the centre heatmap's local maxima; each reads its four corners from the offsets of
the cells around its peak (heatmap-weighted).  Plain decoding takes the 17 strongest, top to
bottom (Yi et al. 2020); with the level head (and anchor heads) the chain is chosen by dynamic
programming on peak height, regular spacing, the level readings and the T1/L5 anchors, and says
when its levels are not confirmed (``Decoded.could_shift``).  All positions are input pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import InputError
from . import data as xray_data
from .cobb import N_VERTEBRAE
from .data import OFFSET_SCALE, STRIDE


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
#: when its weaker end vertebra (T1 or L5) has a centre peak below END_PEAK_REVIEW.  Chosen for the
#: level-head model on 80 training images (benchmark/xray_level_flag.py --grid) as the rule that
#: flags every shifted chain there with the fewest flags; a model's metadata overrides them
#: (``flag_rule``, see :class:`FlagRule`).
LEVEL_RESIDUAL_RANGE = (0.0, 0.35)
END_PEAK_REVIEW = 0.3
#: Default weight of the anchor heads in the chain decoding: the chain's T1 gains
#: ``anchor_weight`` times its T1-anchor reading, its L5 the same with the L5 anchor (a model's
#: metadata ``anchor_weight`` overrides it).
ANCHOR_WEIGHT = 1.0
#: With anchor heads, a chain is also not confirmed when its T1 or L5 reads below this on its
#: anchor heatmap (or, with ``anchor_rivals``, when another candidate reads higher there).
ANCHOR_REVIEW = 0.3


@dataclass(frozen=True)
class FlagRule:
    """When a chain's levels are "not confirmed" (see :meth:`Decoded.could_shift`)."""

    residual_range: tuple = LEVEL_RESIDUAL_RANGE
    end_peak: float = END_PEAK_REVIEW
    anchor_review: float = ANCHOR_REVIEW
    anchor_rivals: bool = True

    @classmethod
    def from_meta(cls, meta: dict) -> "FlagRule":
        """The rule in a model's metadata (``flag_rule``: residual_range, end_peak, anchor_review,
        anchor_rivals; JSON null in residual_range = unbounded), defaults for what it leaves out."""
        rule = dict(meta.get("flag_rule") or {})
        if "residual_range" in rule:
            low, high = rule["residual_range"]
            rule["residual_range"] = (-np.inf if low is None else float(low), np.inf if high is None else float(high))
        return cls(**{k: v for k, v in rule.items() if k in cls.__dataclass_fields__})


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
    rule: FlagRule = field(default_factory=FlagRule)

    def level_residuals(self) -> np.ndarray | None:
        return None if self.levels is None else self.levels - np.arange(len(self.levels))

    def could_shift(self) -> bool:
        """True when the chain's levels are not confirmed (see :class:`FlagRule`): a weak end
        vertebra, an end weak on its anchor, or level readings that disagree with the chain."""
        if self._weak_ends():
            return True
        r = self.level_residuals()
        if r is None:
            return False
        low, high = self.rule.residual_range
        return bool(not low <= np.median(r) <= high)

    def uncertain_ends(self) -> tuple:
        """Chain indices (0 = T1, n-1 = L5) of the ends to check when the chain could shift: an end
        that is weak, or weak or outranked on its anchor; both ends when only the level readings
        disagree (they do not say which end is wrong)."""
        if not self.could_shift():
            return ()
        return self._weak_ends() or (0, len(self.peaks) - 1)

    def _weak_ends(self) -> tuple:
        last, rule = len(self.peaks) - 1, self.rule
        weak = []
        for end, i in ((0, 0), (last, 1)):
            anchored = self.anchor_ends is not None
            if self.peaks[end] < rule.end_peak or (anchored and (self.anchor_ends[i] < rule.anchor_review or (
                    rule.anchor_rivals and self.anchor_rivals[i] >= self.anchor_ends[i]))):
                weak.append(end)
        return tuple(weak)

    def anchors_disagree(self) -> bool:
        """True when an end of the chain is weak on its anchor heatmap or (with ``anchor_rivals``)
        another candidate is stronger there (False without anchor heads)."""
        if self.anchor_ends is None:
            return False
        rival = self.rule.anchor_rivals and np.any(self.anchor_rivals >= self.anchor_ends)
        return bool(np.any(self.anchor_ends < self.rule.anchor_review) or rival)


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
                  anchors: np.ndarray | None = None, anchor_weight: float = ANCHOR_WEIGHT,
                  end_readings=None) -> Decoded:
    """Like :func:`decode`, but each candidate also carries its level reading and the chain is
    chosen jointly on peak height, regular spacing and agreement with the levels: vertebra m of the
    chain pays ``level_weight * |level - m|``.  So a strong peak on C7 does not become "T1" when
    the level head places it above T1, and a chain can start at the true T1 even if it is weaker.
    With ``anchors`` (h, w, 2: T1 and L5 heatmaps) the chain is also anchored on them: its first
    vertebra gains ``anchor_weight`` times its T1 reading, its last the same with L5.
    ``end_readings`` (a function: candidate corners (k, 4, 2) -> (k, 2) P(T1), P(L5), the end
    classifier of ``xray.ends``) replaces the anchor readings when given.
    """
    ys, xs, cand = _chain_candidates(heat, offsets, n, nms)
    levels = np.array([_level_at(level, heat, y, x) for y, x in zip(ys, xs)])
    if end_readings is not None:
        readings = np.asarray(end_readings(cand), float).reshape(-1, 2)
    else:
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
