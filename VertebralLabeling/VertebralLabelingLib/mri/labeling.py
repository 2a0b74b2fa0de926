"""Labeling discs in a volume: midsagittal slice -> networks -> RAS points with confidence.

Confidence (in [0, 1]) has a fixed meaning: the network's peak heatmap response for the disc
(how disc-like the best location looks, trained to be 1 on a disc and 0 elsewhere), multiplied
by a test-time-augmentation agreement term ``exp(-spread^2 / (2 * 2 mm^2))``, where ``spread``
is the RMS distance between the positions found on three parallel slices (midline and +-2 mm).
A disc is *flagged for review* when its confidence is below ``REVIEW_BELOW`` or when the
anatomical check fails (discs out of cranio-caudal order, or spacing outside 7..35 mm).
Flagged discs are still returned and placed, never hidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .. import DISC_NAMES, DISC_VALUES
from ..errors import InputError
from . import networks as model_lib
from .level_count import (
    _centroid_at,
    _flag,
    _local_maxima,
    _refine_peak,
    check_level_by_count,
    count_from_c2,
)
from .midsagittal import (
    YAW_SEARCH_DEG,
    Midline,
    SagittalSlice,
    estimate_midline,
    extract_midsagittal,
    normalize_intensity,
)
from .volume import Volume

REVIEW_BELOW = 0.35
#: Flag a disc whose chosen peak is below this fraction of its channel's strongest response
#: (mean over the test-time slices): the anatomical decoder overruled a clearly stronger peak.
#: On the leave-one-subject-out folds, correctly placed discs had ratios >= 0.71.
SECONDARY_PEAK_RATIO = 0.6
TTA_OFFSETS_MM = (-2.0, 0.0, 2.0)
#: Contrast test-time augmentation: the slices are also run with their intensities inverted inside
#: the body (bright fluid dark and the other way round, as between T2 and T1).  The inverted run is
#: used only when the network is confident on it (mean disc peak at least CONFIDENT_PEAK, the
#: product's "confident") and more confident than on the slice as acquired: two low-confidence
#: guesses are not a reason to change the contrast.
CONFIDENT_PEAK = 0.5
#: Smoothed intensity (normalised slice) above which a pixel counts as inside the body.
BODY_THRESHOLD = 0.08
MIN_SPACING_MM, MAX_SPACING_MM = 7.0, 35.0
#: Below this mean confidence over all discs we report that no spine was found.
NO_SPINE_BELOW = 0.2


def invert_inside_body(images: np.ndarray) -> np.ndarray:
    """(n, H, W) normalised slices with the intensities inverted inside the body and the air kept
    dark: a T1-like slice looks T2-like, and the other way round."""
    body = ndimage.gaussian_filter(images, (0, 2.0, 2.0)) > BODY_THRESHOLD
    return np.where(body, np.clip(1.15 - images, 0, None), images * 0.3).astype(images.dtype)


@dataclass
class DiscPoint:
    """One labeled disc: SCT value, fixed name, RAS position (posterior tip), confidence."""

    value: int
    name: str
    ras: np.ndarray
    confidence: float
    flagged: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return {"value": self.value, "name": self.name, "ras": [float(v) for v in self.ras],
                "confidence": round(float(self.confidence), 4), "flagged": bool(self.flagged),
                "reason": self.reason}


@dataclass
class LabelingResult:
    discs: list
    midline: Midline
    slice: SagittalSlice
    seconds: float = 0.0
    model_name: str = ""
    warnings: list = field(default_factory=list)
    #: The independent level count (``LevelCount``), None for models without those outputs.
    level_check: object = None

    @property
    def spine_found(self) -> bool:
        return bool(self.discs) and np.mean([d.confidence for d in self.discs]) >= NO_SPINE_BELOW


def _pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    pad = [(0, 0)] * (image.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(image, pad)


class DiscLabeler:
    """Holds a loaded model; ``label(volume)`` runs the whole pipeline on one volume."""

    def __init__(self, model, meta: dict):
        self.model = model_lib.as_network(model)  # ONNX Runtime, or Keras for a .keras file
        self.meta = meta
        self.architecture = meta["architecture"]
        self.name = meta.get("name", self.architecture)

    @classmethod
    def load(cls, name_or_path="compact", threads: int = 0) -> "DiscLabeler":
        """A bundled name runs its ``.onnx`` on ONNX Runtime (no TensorFlow import); a
        ``.keras`` path is loaded through Keras (safe mode), an ``.onnx`` path through ONNX
        Runtime.  ``threads``: ONNX Runtime threads per call (0: all cores).  ``label`` keeps no
        state, so one labeler may serve several threads at once (the batch does)."""
        return cls(*model_lib.load(name_or_path, threads))

    @property
    def parameters(self) -> int:
        return self.model.count_params()

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """The network's first output for a batch (n, h, w, 1); channels as the model has them."""
        return self.model.run(np.ascontiguousarray(batch, dtype=np.float32))[0]

    def label(self, volume: Volume, slice_r_mm: float | None = None, progress=None) -> LabelingResult:
        """Label the discs of ``volume``; ``slice_r_mm`` forces a sagittal plane at that R."""
        report = progress or (lambda fraction, message: None)
        start = time.perf_counter()
        report(0.05, "Finding the midsagittal plane")
        midline = Midline(offset=float(slice_r_mm)) if slice_r_mm is not None else estimate_midline(volume)
        self._check_plane_hits_volume(volume, midline)
        slices = [extract_midsagittal(volume, midline, normal_offset=o) for o in TTA_OFFSETS_MM]
        centre = slices[TTA_OFFSETS_MM.index(0.0)]
        report(0.35, "Running the disc networks")
        images = np.stack([normalize_intensity(s.image, s.inside) for s in slices])
        if self.architecture == "compact":
            positions, peaks, top_ratio, extra = self._run_compact(images)
        else:
            positions, peaks, top_ratio, extra = self._run_romero(images)
        report(0.85, "Checking anatomical consistency")
        discs = self._to_discs(centre, positions, peaks)
        for disc, ratio in zip(discs, top_ratio):
            if ratio < SECONDARY_PEAK_RATIO and disc.confidence > 0:
                _flag(disc, f"placed on a secondary peak ({ratio:.2f} of the strongest) "
                            "to keep anatomical order")
            if disc.confidence == 0:
                _flag(disc, "not found in the field of view")
        check_consistency(discs, centre)
        count = None
        if extra is not None:
            stride = int(self.meta.get("stride", model_lib.COMPACT_STRIDE))
            count = count_from_c2(extra[..., 0], extra[..., 1], stride)
            check_level_by_count(discs, centre, count)
        result = LabelingResult(discs, midline, centre, time.perf_counter() - start, self.name,
                                level_check=count)
        if not result.spine_found:
            result.warnings.append("No spine found with confidence: every disc is flagged for review.")
        if abs(midline.yaw_deg) >= max(YAW_SEARCH_DEG):
            result.warnings.append(f"The head is turned {midline.yaw_deg:+.1f} degrees or more about S "
                                   "(the search limit): check the discs left-right.")
            for disc in discs:
                _flag(disc, "head turned beyond the midsagittal search range")
        report(1.0, "Done")
        return result

    @staticmethod
    def _check_plane_hits_volume(volume: Volume, midline: Midline) -> None:
        lo, hi = volume.corners_ras().min(axis=0), volume.corners_ras().max(axis=0)
        r_top, r_bottom = midline.r_at(hi[2]), midline.r_at(lo[2])
        margin = 0.5 * max(volume.spacing.max(), 1.0)
        if max(r_top, r_bottom) < lo[0] - margin or min(r_top, r_bottom) > hi[0] + margin:
            raise InputError(f"The sagittal slice at R = {midline.offset:.1f} mm lies outside the "
                             f"volume (R from {lo[0]:.1f} to {hi[0]:.1f} mm).")

    def _run_compact(self, images):
        stride = int(self.meta.get("stride", model_lib.COMPACT_STRIDE))
        multiple = 2 * int(self.meta.get("input_multiple", model_lib.COMPACT_MULTIPLE))
        both = np.concatenate([images, invert_inside_body(images)])
        acquired, inverted = (self._decode_compact(part, stride) for part in
                              np.split(self._forward(_pad_to_multiple(both, multiple)[..., None]), 2))
        confidence = [float(np.mean(run[1])) for run in (acquired, inverted)]
        if confidence[1] >= CONFIDENT_PEAK and confidence[1] > confidence[0]:
            return inverted
        return acquired

    @staticmethod
    def _decode_compact(heatmaps, stride):
        """Disc positions and peaks per parallel slice, their mean peak ratios, the extra maps."""
        n_discs = len(DISC_NAMES)
        n_tta = heatmaps.shape[0]
        positions = np.zeros((n_tta, n_discs, 2))
        peaks = np.zeros((n_tta, n_discs))
        ratios = np.ones((n_tta, n_discs))
        for t in range(n_tta):
            positions[t], peaks[t], ratios[t] = decode_chain(heatmaps[t, ..., :n_discs], stride)
        # Level-agnostic outputs (any-disc, dens tip), averaged over the parallel slices.
        extra = heatmaps[..., n_discs:].mean(axis=0) if heatmaps.shape[-1] > n_discs else None
        return positions, peaks, ratios.mean(axis=0), extra

    def _run_romero(self, images):
        size = int(self.meta.get("romero_input", model_lib.ROMERO_INPUT))
        corner = romero_crop_corner(images[TTA_OFFSETS_MM.index(0.0)], size)
        padded = np.pad(images, ((0, 0), (size, size), (size, size)))
        r0, c0 = corner + size
        crops = padded[:, r0:r0 + size, c0:c0 + size]
        out = self._forward(crops[..., None])  # (n_tta, n_discs, 2), normalised
        positions = out * size + corner
        # Regressors have no peaks to overrule: every ratio is 1 (never a secondary peak).
        return positions, np.ones(out.shape[:2]), np.ones(out.shape[1]), None

    @staticmethod
    def _to_discs(plane: SagittalSlice, positions, peaks) -> list:
        # The median slice, not the mean: when one parallel slice decodes a chain a level off,
        # the mean would land between two discs; the spread still lowers the confidence.
        centre = np.median(positions, axis=0)
        mean = positions.mean(axis=0)
        spread = np.sqrt(((positions - mean) ** 2).sum(axis=-1).mean(axis=0))
        confidence = np.clip(peaks.mean(axis=0), 0, 1) * np.exp(-spread ** 2 / (2 * 2.0 ** 2))
        ras = plane.pixel_to_ras(centre)
        return [DiscPoint(v, n, ras[k], float(confidence[k]))
                for k, (v, n) in enumerate(zip(DISC_VALUES, DISC_NAMES))]


def romero_crop_corner(image: np.ndarray, size: int) -> np.ndarray:
    """Top-left corner of the N x N crop fed to the romero2018 regressors.

    Centred on the intensity-weighted centre of the slice (the neck in a cervical field of
    view): the seed design regresses from a fixed crop and has no detection stage of its own.
    """
    weights = np.clip(image, 0, None)
    rows, cols = np.indices(image.shape)
    total = weights.sum() or 1.0
    centre = np.array([(rows * weights).sum() / total, (cols * weights).sum() / total])
    return np.round(centre - size / 2).astype(int)


def _candidates(heatmap: np.ndarray, stride: int, limit: int = 8):
    """Local maxima of one disc's heatmap: [(row, col) in input pixels, peak value]."""
    peaks = _local_maxima(heatmap, 0.02)
    order = np.argsort(-heatmap[peaks[:, 0], peaks[:, 1]], kind="stable")[:limit]
    out = [_centroid_at(heatmap, r, c, stride) for r, c in peaks[order]]
    if not out:
        out.append(_refine_peak(heatmap, stride))
    return out


def _compatible(upper, lower) -> bool:
    """Consecutive discs: lower one 7..35 mm further down, not more than 45 degrees off axis."""
    d_row, d_col = lower[0] - upper[0], abs(lower[1] - upper[1])
    return MIN_SPACING_MM <= np.hypot(d_row, d_col) <= MAX_SPACING_MM and d_row >= d_col


#: A candidate peak must exceed this to count as a disc in view (else the disc is outside it).
PRESENCE_THRESHOLD = 0.15


def decode_chain(heatmaps: np.ndarray, stride: int):
    """Pick one peak per disc so the summed heatmap response is maximal under anatomical order.

    Per-disc heatmaps often also fire on a neighbouring disc; taking each channel's global
    maximum then puts two labels on one disc.  Here every channel offers its local maxima and
    a dynamic programme (Viterbi over the cranio-caudal chain) chooses the best combination in
    which each disc lies 7..35 mm below the previous one.  Discs may also be *outside the field
    of view*: the discs in view form one contiguous run (C3-C4..C4-C5 in a small crop), and a
    candidate adds ``peak - PRESENCE_THRESHOLD`` so weak responses are not forced into view.
    Returns positions (n, 2), peaks (n,; 0 for discs outside the view, which keep their
    channel's top peak position) and, per disc, the chosen peak's response divided by the
    channel's strongest one (1 when the top peak was taken or the disc is out of view): a low
    ratio means the decoder overruled a much stronger response, which is worth a review.
    """
    n = heatmaps.shape[-1]
    cands = [_candidates(heatmaps[..., k], stride) for k in range(n)]
    above, below = -1, -2  # state ids for "outside the view", above or below the run
    # states[k]: dict state -> (score, previous state)
    states = [{above: (0.0, None), below: (0.0, None)}]
    states[0].update({i: (peak - PRESENCE_THRESHOLD, None) for i, (_, peak) in enumerate(cands[0])})
    for k in range(1, n):
        prev, cur = states[-1], {}

        def offer(state, score, source, cur=cur):
            if state not in cur or score > cur[state][0]:
                cur[state] = (score, source)

        for s, (score, _) in prev.items():
            if s == above:
                offer(above, score, s)
                offer(below, score, s)
            elif s == below:
                offer(below, score, s)
            else:
                offer(below, score, s)
            for j, (pos, peak) in enumerate(cands[k]):
                if s == above or (s >= 0 and _compatible(cands[k - 1][s][0], pos)):
                    offer(j, score + peak - PRESENCE_THRESHOLD, s)
        states.append(cur)
    state = max(states[-1], key=lambda s: states[-1][s][0])
    chosen = [state]
    for k in range(n - 1, 0, -1):
        state = states[k][state][1]
        chosen.append(state)
    chosen.reverse()
    positions = np.array([cands[k][max(i, 0)][0] for k, i in enumerate(chosen)])
    peaks = np.array([cands[k][i][1] if i >= 0 else 0.0 for k, i in enumerate(chosen)])
    tops = np.array([cands[k][0][1] for k in range(n)])
    ratios = np.where(peaks > 0, peaks / np.maximum(tops, 1e-9), 1.0)
    return positions, peaks, np.clip(ratios, 0.0, 1.0)


def check_consistency(discs: list, plane: SagittalSlice) -> None:
    """Flag discs that break cranio-caudal order or plausible spacing, and low-confidence ones.

    Distances are measured along the slice's cranio-caudal axis.  When two neighbours disagree,
    the less confident one is flagged (the other is more likely right).
    """
    rows = plane.ras_to_pixel(np.array([d.ras for d in discs]))[:, 0]
    for k in range(1, len(discs)):
        gap = rows[k] - rows[k - 1]
        if MIN_SPACING_MM <= gap <= MAX_SPACING_MM:
            continue
        upper, lower = discs[k - 1], discs[k]
        worse = upper if upper.confidence < lower.confidence else lower
        problem = "out of cranio-caudal order" if gap < MIN_SPACING_MM / 2 else \
            f"implausible spacing ({gap:.0f} mm) to {upper.name if worse is lower else lower.name}"
        _flag(worse, problem)
    for disc in discs:
        if disc.confidence < REVIEW_BELOW:
            _flag(disc, f"low confidence ({disc.confidence:.2f})")
