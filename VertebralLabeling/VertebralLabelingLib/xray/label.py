"""Labeling one AP radiograph: 68 vertebral corners (T1..L5 x TL, TR, BL, BR) and Cobb angles.

Pipeline: the radiograph is scaled so its height fills the network input (``xray_data``), the
network gives a vertebra-centre heatmap, corner offsets, level readings and T1/L5 anchors
(``network``), the chain of 17 is decoded from them (``decode``), and each vertebra is refined
on its own crop when the model has a refiner (``refine``). Points go back to original pixels
through the exact input geometry, then to physical space with the image's pixel spacing and
origin. The Cobb angles are the AASCE reference method (``cobb.py``) on the points in
millimetres (pixels for images without spacing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelError
from ..io import models as model_lib
from . import data as xray_data
from . import ends, refine
from . import vote as level_vote
from .cobb import N_VERTEBRAE, CobbResult, cobb_angles
from .data import INPUT_SHAPE, POINT_LABELS, Radiograph
from .decode import ANCHOR_WEIGHT, LEVEL_WEIGHT, Decoded, FlagRule, decode, decode_levels, smooth_tilts
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
    #: (17,) True for the vertebrae to check to confirm the levels (the chain's uncertain ends).
    level_review: np.ndarray = field(default_factory=lambda: np.zeros(N_VERTEBRAE, bool))

    @property
    def level_uncertain(self) -> bool:
        """True when the chain could sit a whole level off (see :meth:`Decoded.could_shift`): then
        at least one end is named for review (:meth:`Decoded.uncertain_ends`)."""
        return bool(self.level_review.any())

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


class XrayLabeler:
    """A loaded landmark model; ``label(radiograph)`` runs the whole pipeline.  ``refiner`` (a
    :class:`refine.Refiner`, loaded by :meth:`load` when the metadata names one in ``refiner``)
    refines each vertebra's corners on a crop after the chain is decoded."""

    def __init__(self, model, meta: dict, refiner=None, end_classifier=None, shift_check=None):
        self.model = model_lib.as_network(model)  # ONNX Runtime, or Keras for a .keras file
        self.meta = meta
        self.refiner = refiner
        self.end_classifier = end_classifier
        #: An :class:`ends.ShiftCheck` that may move the decoded chain by whole levels (or None).
        self.shift_check = shift_check
        self.shape = tuple(meta.get("input_shape", INPUT_SHAPE))
        self.flip = bool(meta.get("tta_flip", False))
        self.tilt_smoothing = float(meta.get("tilt_smoothing", 0.0))
        self.nms = int(meta.get("nms", 3))
        self.chain = float(meta.get("chain_decoding", 0.0))
        self.level_weight = float(meta.get("level_weight", LEVEL_WEIGHT))
        self.anchor_weight = float(meta.get("anchor_weight", ANCHOR_WEIGHT))
        self.end_weight = float(meta.get("end_weight", ANCHOR_WEIGHT))
        self.flag_rule = FlagRule.from_meta(meta)
        #: A :class:`level_vote.LevelVote` (metadata ``level_vote``) or None: run on zoomed and
        #: shifted views too and keep the chain they agree on.
        self.level_vote = level_vote.LevelVote.from_meta(meta)
        #: A :class:`level_vote.GapRhythm` (metadata ``gap_rhythm``) or None: flags a chain whose
        #: spacing jumps (a vertebra skipped or doubled part-way).
        self.gap_rhythm = level_vote.GapRhythm.from_meta(meta)

    @classmethod
    def load(cls, name_or_path="xray-compact") -> "XrayLabeler":
        network, meta = load(name_or_path)
        path = model_lib.resolve_model_path(name_or_path)

        def companion(kind, key):
            return kind.load(model_lib.companion_path(path, meta[key])) if meta.get(key) else None

        check = meta.get("shift_check")
        shift_check = None
        if check:
            if not isinstance(check, dict) or not check.get("classifier"):
                raise ModelError(f"{path}: metadata shift_check must name its end classifier ('classifier').")
            shift_check = ends.ShiftCheck(ends.EndClassifier.load(model_lib.companion_path(path, check["classifier"])),
                                          check)
        return cls(network, meta, companion(refine.Refiner, "refiner"), companion(ends.EndClassifier, "end_classifier"),
                   shift_check)

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

    def decode_input(self, image: np.ndarray, end_readings=None) -> Decoded:
        """The decoded chain of one prepared input image (see :meth:`predict_input`);
        ``end_readings`` as in :func:`decode_levels` (then weighted by ``end_weight``)."""
        return self.decode_inputs([image], [end_readings])[0]

    def decode_inputs(self, images, end_readings=None) -> list:
        """The decoded chain of each prepared input image (one network batch; with ``flip`` the
        mirrored images join it); ``end_readings``: one reader (or None) per image."""
        n = len(images)
        readers = list(end_readings) if end_readings is not None else [None] * n
        batch = np.stack(images)[..., None].astype(np.float32)
        if self.flip:
            batch = np.concatenate([batch, batch[:, :, ::-1]])
        outputs = self._network(batch)
        return [self._decode_outputs([None if o is None else o[[v, v + n] if self.flip else [v]] for o in outputs],
                                     readers[v]) for v in range(n)]

    def _decode_outputs(self, outputs, end_readings) -> Decoded:
        """Decode one image's network outputs (its mirrored image's second when ``flip``)."""
        heat, offsets, level, anchors = outputs
        h, o = heat[0, ..., 0], offsets[0]
        lv = None if level is None else level[0, ..., 0]
        an = None if anchors is None else anchors[0]
        if self.flip:
            hf = heat[1, :, ::-1, 0]
            of = xray_data.mirror_offsets(offsets[1, :, ::-1].reshape(o.shape[:2] + (4, 2))).reshape(o.shape)
            h, o = (h + hf) / 2, (o + of) / 2
            if lv is not None:
                lv = (lv + level[1, :, ::-1, 0]) / 2
            if an is not None:
                an = (an + anchors[1, :, ::-1]) / 2
        if lv is None:
            decoded = Decoded(*decode(h, o, nms=self.nms, chain=self.chain))
        else:
            decoded = decode_levels(h, o, lv, nms=self.nms, chain=self.chain, level_weight=self.level_weight,
                                    anchors=an, anchor_weight=self.end_weight if end_readings else self.anchor_weight,
                                    end_readings=end_readings)
            decoded.rule = self.flag_rule
        if self.tilt_smoothing > 0:
            decoded.corners = smooth_tilts(decoded.corners, self.tilt_smoothing)
        return decoded

    def decode_radiograph(self, radiograph: Radiograph, normalized=None) -> tuple:
        """(decoded chain, its input->pixel matrix, crop source, source->pixel matrix, vote agreed).
        With a level vote the chain is the one the views agree on (:func:`level_vote.vote`);
        ``agreed`` is False when they disagree (always True without a vote)."""
        views = self.level_vote.views(self.shape) if self.level_vote else [np.eye(3)]
        images, matrices = xray_data.prepare_inputs(radiograph, self.shape, normalized, views)
        source, source_to_pixel, _ = self.crop_source(radiograph, matrices[0], normalized)
        to_source = [None if source is None else np.linalg.inv(source_to_pixel) @ m for m in matrices]
        chains = self.decode_inputs(images, [self.end_reader(source, t) for t in to_source])
        keep, agreed = 0, True
        if len(chains) > 1:
            keep, _, agreed = level_vote.vote([xray_data.apply(m, d.corners) for d, m in zip(chains, matrices)])
        return chains[keep], matrices[keep], source, source_to_pixel, agreed

    def crop_source(self, radiograph: Radiograph, matrix, normalized=None) -> tuple:
        """(source image, its source->original-pixel matrix, the input->source matrix) that the
        refiner, the end classifier and the shift check crop from, made once (all None when the
        model has none of them)."""
        if self.refiner is None and self.end_classifier is None and self.shift_check is None:
            return None, None, None
        source, source_to_pixel = refine.source_image(radiograph, normalized)
        return source, source_to_pixel, np.linalg.inv(source_to_pixel) @ matrix

    def end_reader(self, source, to_source, classifier=None, names=ends.OUTPUTS):
        """The end classifier's readings (``names``) of candidates given in input pixels (None
        without one)."""
        classifier = classifier or self.end_classifier
        if classifier is None:
            return None
        return lambda candidates: classifier.readings(
            source, xray_data.apply(to_source, np.asarray(candidates, float).reshape(-1, 2)), names)

    def check_shift(self, decoded: Decoded, source, to_source) -> tuple:
        """(chain indices of the ends to review, shift) after the shift check moved ``decoded`` (in
        place) to the shift the end classifier reads best; without a check, the first stage's
        flag rule alone (:meth:`Decoded.uncertain_ends`).  Extrapolated vertebrae get confidence 0
        (the first stage did not find them)."""
        first_stage_ends = decoded.uncertain_ends()
        if self.shift_check is None:
            return first_stage_ends, 0
        check = self.shift_check
        read = self.end_reader(source, to_source, check.classifier, check.classifier.outputs)
        decoded.corners, shift, support = check.check(read, decoded.corners)
        k = abs(shift)  # the peaks move with their vertebrae, as in ends.shifted_chain
        decoded.peaks = np.pad(decoded.peaks, k)[k + shift: k + shift + len(decoded.peaks)]
        first_stage_rules = check.flag == "either"
        if first_stage_rules and first_stage_ends and not shift:
            return first_stage_ends, shift  # its rule names its weak end, and the chain stayed
        if check.unsure(support) or (first_stage_rules and first_stage_ends):
            return (0, len(decoded.peaks) - 1), shift  # the shift check does not say which end
        return (), shift

    def levels_to_review(self, decoded: Decoded, matrix, source, to_source, agreed: bool) -> tuple:
        """(chain indices whose level needs a check, the vertebrae around a spacing jump or ()):
        the first stage's rule or the shift check (:meth:`check_shift`), both ends when the level
        vote's views disagree, and both ends plus the vertebrae around the jump when the gap
        rhythm flags one."""
        review, _ = self.check_shift(decoded, source, to_source)
        last = len(decoded.peaks) - 1
        if not agreed and self.level_vote is not None and self.level_vote.flag:
            review = (0, last)  # the views disagree: either end could be off
        jump = self.gap_rhythm.irregular(xray_data.apply(matrix, decoded.corners)) if self.gap_rhythm else ()
        if jump:
            review = tuple(sorted(set(review) | {0, last} | set(jump)))
        return review, jump

    def label(self, radiograph: Radiograph, progress=None) -> XrayResult:
        start = time.perf_counter()
        if progress:
            progress(0.1, "Preparing the image")
        normalized = xray_data.normalize(radiograph.array)  # once, for both stages
        if progress:
            progress(0.4, "Running the landmark network")
        decoded, matrix, source, source_to_pixel, agreed = self.decode_radiograph(radiograph, normalized)
        to_source = None if source is None else np.linalg.inv(source_to_pixel) @ matrix
        review, jump = self.levels_to_review(decoded, matrix, source, to_source, agreed)
        points_px = xray_data.apply(matrix, decoded.corners)
        if self.refiner is not None:
            if progress:
                progress(0.7, "Refining each vertebra")
            refined = self.refiner.refine_source(source, xray_data.apply(to_source, decoded.corners))
            points_px = xray_data.apply(source_to_pixel, refined)
        points = radiograph.pixel_to_physical(points_px)
        if progress:
            progress(0.9, "Computing Cobb angles")
        result = XrayResult(points_px, points, decoded.peaks, cobb_from_points(points_px, radiograph), radiograph)
        result.level_review[list(review)] = True
        if result.level_uncertain:
            result.warnings.append(f"{LEVEL_WARNING} (check {' and '.join(result.uncertain_levels)})")
        if jump:
            names = [xray_data.VERTEBRA_NAMES[i] for i in jump]
            result.warnings.append(f"the spacing jumps around {names[0]}-{names[-1]}: a vertebra may be skipped "
                                   "or doubled there, so the levels on one side of it may be one off")
        low = [xray_data.VERTEBRA_NAMES[i] for i in np.nonzero(result.flagged())[0]]
        if len(low) > 3:
            result.warnings.append(f"{len(low)} vertebrae found with low confidence ({', '.join(low)}); "
                                   "check that this is an AP spine radiograph from T1 to L5.")
        result.seconds = time.perf_counter() - start
        if progress:
            progress(1.0, "Done")
        return result
