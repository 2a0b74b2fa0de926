"""Level vote: the first stage run on a few zoomed and shifted views of the same radiograph.

Why: on radiographs it has not seen, the first stage puts about one chain in five a whole level
off (its "T1" on C7, or its "L5" on S1), and which level a chain starts on is the one decision
that a small change of framing can flip.  Running it on views zoomed by a few percent (and, if
the metadata asks, moved by part of a vertebra), and matching each view's chain to the standard
view's by whole levels (:func:`level_shift`), gives a vote on the level: the chain the views agree on is kept, and an
image whose views disagree is flagged for review (the levels depend on the framing, so they are
not confirmed).  All views go through the network as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError

#: Whole-level shifts tried when matching two chains (|shift| <= this).
MAX_LEVEL_SHIFT = 4


def vertebra_centres(points_px) -> np.ndarray:
    """(n, 2) centre of each vertebra: the mean of its four corners (AASCE order)."""
    return np.asarray(points_px, float).reshape(-1, 4, 2).mean(axis=1)


def level_shift(pred_px, true_px, max_shift: int = MAX_LEVEL_SHIFT) -> int:
    """The signed whole-level offset that best matches the predicted chain to the true one.

    ``shift`` = k means predicted vertebra i lies on true vertebra i + k: 0 when every vertebra is
    on its level, -1 when the chain sits one level cranially (the predicted T1 on C7, T2 on T1).
    Each candidate k is scored by the mean centre distance over the vertebrae both chains share
    (at least half of the chain), and the best one wins (ties go to the smaller |k|).
    """
    pred, true = vertebra_centres(pred_px), vertebra_centres(true_px)
    n = len(true)
    best, best_cost = 0, np.inf
    for k in range(-max_shift, max_shift + 1):
        i = np.arange(max(0, -k), min(n, n - k))  # predicted i <-> true i + k
        if len(i) < n // 2:
            continue
        cost = float(np.linalg.norm(pred[i] - true[i + k], axis=1).mean())
        if cost < best_cost - 1e-9 or (abs(cost - best_cost) <= 1e-9 and abs(k) < abs(best)):
            best, best_cost = k, cost
    return best


def misnamed_vertebrae(pred_px, true_px) -> np.ndarray:
    """(n,) True where a predicted vertebra's centre lies nearer another labelled vertebra's centre
    than its own: named on the wrong level.  Unlike :func:`level_shift` it also sees a chain that
    skips or doubles a vertebra part-way (its lower half one level off while the upper half is
    right).  Levels beyond the labelled chain (C7, S1) are not labelled, so a vertebra placed
    there counts only when it is nearer a wrong labelled level."""
    pred, true = vertebra_centres(pred_px), vertebra_centres(true_px)
    nearest = np.linalg.norm(pred[:, None] - true[None], axis=2).argmin(axis=1)
    return nearest != np.arange(len(pred))


def _from_meta(meta: dict, key: str, build, needs: str):
    """``build(meta[key])``, None when the metadata has no ``key``; a malformed section is a
    ModelError that says what it ``needs`` (both metadata sections below are read this way)."""
    spec = meta.get(key)
    if not spec:
        return None
    try:
        return build(spec)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{key} must give {needs} ({error}).") from error


@dataclass(frozen=True)
class LevelVote:
    """The views (metadata ``level_vote``: ``scales`` and ``shifts``, every combination; a shift is
    a fraction of the input height, + moves the content up) and whether disagreement flags."""

    scales: tuple = (1.0,)
    shifts: tuple = (0.0,)
    flag: bool = True

    @classmethod
    def from_meta(cls, meta: dict) -> "LevelVote | None":
        """The vote a model's metadata asks for (None without ``level_vote``)."""
        vote = _from_meta(meta, "level_vote", lambda spec: cls(
            tuple(float(s) for s in spec["scales"]), tuple(float(s) for s in spec["shifts"]),
            bool(spec.get("flag", True))), "numeric 'scales' and 'shifts'")
        if vote is None:
            return None
        if not all(0.5 <= s <= 2.0 for s in vote.scales) or not all(abs(s) <= 0.25 for s in vote.shifts):
            raise ModelError("level_vote: scales must lie in [0.5, 2] and shifts in [-0.25, 0.25].")
        return vote

    def views(self, shape) -> list:
        """3x3 maps of input pixels onto the standard input, the standard view (identity) first."""
        rows, cols = shape
        cx, cy = (cols - 1) / 2.0, (rows - 1) / 2.0
        views = [np.eye(3)]
        for scale in self.scales:
            for shift in self.shifts:
                if scale == 1.0 and shift == 0.0:
                    continue
                views.append(np.array([[scale, 0.0, cx - scale * cx],
                                       [0.0, scale, cy - scale * cy + shift * rows], [0.0, 0.0, 1.0]]))
        return views


def vote(chains_px) -> tuple:
    """(index of the chain to keep, offsets, agreed) for chains (corners in original pixels) of the
    same radiograph, the standard view first.  Each chain's offset is its whole-level shift
    against the standard view's; the median offset wins, and the first chain with that offset is
    kept (the standard view's when the median is 0), so its vertebrae are detections, not
    extrapolations.  ``agreed`` is False when any view's offset differs."""
    reference = chains_px[0]
    offsets = np.array([level_shift(chain, reference, 2) for chain in chains_px])
    winner = int(np.round(np.median(offsets)))
    keep = int(np.nonzero(offsets == winner)[0][0]) if np.any(offsets == winner) else 0
    return keep, offsets, bool(np.all(offsets == offsets[0]))


def gap_log_ratios(points_px) -> np.ndarray:
    """(n-2,) log(g_t / g_(t-1)) of the chain's consecutive centre gaps g (t = 1 .. n-2)."""
    gaps = np.linalg.norm(np.diff(vertebra_centres(points_px), axis=0), axis=1)
    return np.diff(np.log(np.maximum(gaps, 1e-6)))


@dataclass(frozen=True)
class GapRhythm:
    """Flags a chain whose spacing jumps (metadata ``gap_rhythm``: ``mean`` and ``std`` of each
    consecutive-gap log ratio in labelled chains, ``review_z``).

    Why: vertebral height changes slowly along the spine, so in a labelled chain each gap is close
    to the one before it (the log ratio's spread is about 0.06).  A chain that skips a vertebra
    part-way has one gap about twice its neighbours (log ratio about +0.7, then -0.7), one that
    doubles a vertebra one about half: every vertebra on one side of it is then named a level off,
    although the chain as a whole may not be (``level_shift`` 0).  The end vertebrae and the three
    vertebrae around the worst jump are flagged for review."""

    mean: tuple
    std: tuple
    review_z: float

    @classmethod
    def from_meta(cls, meta: dict) -> "GapRhythm | None":
        rhythm = _from_meta(meta, "gap_rhythm", lambda spec: cls(
            tuple(float(v) for v in spec["mean"]), tuple(float(v) for v in spec["std"]), float(spec["review_z"])),
            "numeric 'mean', 'std' and 'review_z'")
        if rhythm is None:
            return None
        if len(rhythm.mean) != len(rhythm.std) or min(rhythm.std, default=0.0) <= 0 or rhythm.review_z <= 0:
            raise ModelError("gap_rhythm: 'mean' and 'std' must have the same length, std and review_z > 0.")
        return rhythm

    def z_scores(self, points_px) -> np.ndarray:
        ratios = gap_log_ratios(points_px)
        if len(ratios) != len(self.mean):
            raise ModelError(f"gap_rhythm has {len(self.mean)} ratios; the chain has {len(ratios)}.")
        return (ratios - np.asarray(self.mean)) / np.asarray(self.std)

    def irregular(self, points_px) -> tuple:
        """Chain indices of the vertebrae around the worst jump (its three vertebrae), or () when
        every ratio is within ``review_z`` standard deviations."""
        z = np.abs(self.z_scores(points_px))
        worst = int(np.argmax(z))
        return (worst, worst + 1, worst + 2) if z[worst] >= self.review_z else ()
