"""Which candidate vertebra is T1 and which is L5, read on a crop around each candidate.

Why: a chain one level off (the predicted "T1" on C7) keeps its Cobb angles but names the wrong
vertebrae.  The first stage's anchor heatmaps learned the training patients' ends without
generalising (shift rate 7.5 % on training images, 22.6 % on new patients).  This classifier looks
at one candidate at a time, rotated to its tilt and scaled to its width, with the context that
names the level: C7 above and the first ribs beside T1; the iliac crests beside and the sacrum
below L5.  It is trained on the hard negatives, the vertebra on each side of each end (C7 and S1
placed one pitch beyond the labelled chain), and its readings take the anchor heads' place as the
chain decoding's end bonus (``decode._chain``).

Crops come from the same area-averaged source image as the refiner's (``refine.source_image``).
"""

from __future__ import annotations

import numpy as np

from ..io import models as model_lib
from . import data as xray_data
from . import refine

ARCHITECTURE = "xray-ends"
TASK = "xray-end-vertebrae"
DEFAULT_MODEL = "xray-ends"
#: Crop (rows, cols) and crop pixels per vertebra width: about 4.6 widths tall (two levels on each
#: side) and 5.7 wide (rib heads, iliac crests).
CROP_SHAPE = (128, 160)
CROP_VERTEBRA_WIDTH = 28.0
#: The classifier's outputs by default: this candidate is T1; it is L5.  A model may also name T12
#: (the last rib's vertebra), in its metadata ``outputs``.
OUTPUTS = ("T1", "L5")
#: Each nameable vertebra's frame in :func:`chain_frames` (0 = C7, 1 = T1 .. 17 = L5, 18 = S1); its
#: index in the chain T1..L5 is one less.
FRAMES = {"T1": 1, "T12": 12, "L5": 17}


def chain_frames(points) -> list:
    """(centre, tilt, width) of C7, T1 .. L5, S1 (19 frames) from the 68 labelled corners: C7 and
    S1 are one pitch beyond T1 and L5, with their neighbour's tilt and width."""
    frames = [refine.frame(v) for v in np.asarray(points, float).reshape(-1, 4, 2)]
    beyond = []
    for end, inner in ((frames[0], frames[1]), (frames[-1], frames[-2])):
        beyond.append((2 * end[0] - inner[0], end[1], end[2]))
    return [beyond[0]] + frames + [beyond[1]]


def crop_matrix(centre, tilt: float, width: float, crop_shape=CROP_SHAPE,
                vertebra_width: float = CROP_VERTEBRA_WIDTH) -> np.ndarray:
    """3x3 map crop pixel -> source pixel for one candidate (see :func:`refine.crop_matrix`)."""
    return refine.crop_matrix(centre, tilt, width, tuple(crop_shape), vertebra_width)


def crop_geometry(meta: dict) -> tuple:
    """(crop shape, crop pixels per vertebra width) of a model, from its metadata: a classifier
    is trained for one field of view, and reads only crops of that field of view."""
    return (tuple(int(v) for v in meta.get("input_shape", CROP_SHAPE)),
            float(meta.get("crop_vertebra_width", CROP_VERTEBRA_WIDTH)))


def build(width: float = 1.0, crop_shape=CROP_SHAPE, outputs: int = len(OUTPUTS)):
    """A small CNN: crop (rows, cols, 1) -> P(each of ``outputs`` names) (sigmoids).  The features are flattened,
    not pooled: whether the ribs or the crests are beside the *centre* vertebra is the question."""
    keras = model_lib.import_keras()
    layers = keras.layers

    def conv(x, filters, stride=1):
        x = layers.Conv2D(max(8, int(round(filters * width))), 3, strides=stride, padding="same", use_bias=False)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    inputs = keras.Input(tuple(crop_shape) + (1,), name="crop")
    x = conv(inputs, 16, stride=2)
    for filters in (24, 32, 48, 64, 96):  # 64 x 80 -> 2 x 3 (after the stem, default crop)
        x = conv(conv(x, filters, stride=2), filters)
    x = layers.Flatten()(conv(x, 32))
    x = layers.Dropout(0.3)(layers.Dense(64, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(outputs, activation="sigmoid", name="ends")(x), name="xray_ends")


is_end_classifier = model_lib.task_check(TASK, "an X-ray end-vertebra classifier")


def load(name_or_path=DEFAULT_MODEL):
    """(network, metadata) of an end classifier (.onnx on ONNX Runtime, or .keras)."""
    return model_lib.load_model_file(name_or_path, is_end_classifier, "End-vertebra")


class EndClassifier:
    """``readings(source, candidates)``: P(T1), P(L5) of each candidate vertebra (k, 4, 2 corners
    in source pixels), averaged with the mirrored crops' when ``flip``; P(T12) too when the model
    names it (``outputs``)."""

    def __init__(self, network, meta: dict):
        self.network = model_lib.as_network(network)
        self.meta = meta
        self.flip = bool(meta.get("tta_flip", True))
        self.crop_shape, self.vertebra_width = crop_geometry(meta)
        self.outputs = tuple(meta.get("outputs", OUTPUTS))

    @classmethod
    def load(cls, name_or_path=DEFAULT_MODEL) -> "EndClassifier":
        return cls(*load(name_or_path))

    def readings(self, source: np.ndarray, candidates, names=OUTPUTS) -> np.ndarray:
        """(k, len(names)): P(each named vertebra) of each candidate (default P(T1), P(L5))."""
        columns = [self.outputs.index(n) for n in names]
        return self._read(source, candidates)[:, columns]

    def _read(self, source: np.ndarray, candidates) -> np.ndarray:
        frames = [refine.frame(v) for v in np.asarray(candidates, float).reshape(-1, 4, 2)]
        batch = np.array([xray_data.warp(source, crop_matrix(*f, self.crop_shape, self.vertebra_width),
                                         self.crop_shape) for f in frames])[..., None]
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if not self.flip:
            return self.network.run(x)[0]
        out = self.network.run(np.concatenate([x, x[:, :, ::-1]]))[0]
        return (out[: len(x)] + out[len(x):]) / 2


def shifted_chain(corners, shift: int) -> np.ndarray:
    """The chain (n, 4, 2) moved ``shift`` levels: + caudally (its T1 on T2), - cranially (on C7).
    Vertebrae beyond the old ends are extrapolated: the end vertebra moved by whole pitches."""
    c = np.asarray(corners, float).reshape(-1, 4, 2)
    k, n = abs(int(shift)), len(c)
    up = c[0].mean(axis=0) - c[1].mean(axis=0)
    down = c[-1].mean(axis=0) - c[-2].mean(axis=0)
    above = [c[0] + j * up for j in range(k, 0, -1)]
    below = [c[-1] + j * down for j in range(1, k + 1)]
    extended = np.concatenate([np.reshape(above, (-1, 4, 2)), c, np.reshape(below, (-1, 4, 2))])
    return extended[k + shift: k + shift + n]


def shift_scores(read, corners, max_shift: int, names=OUTPUTS) -> dict:
    """{shift: evidence that the chain moved by ``shift`` is T1..L5}: the classifier's log-odds of
    its first vertebra being T1, plus those of its last being L5 (plus its T12 being T12 when
    ``names`` has it).  ``read``: candidate corners (k, 4, 2) -> (k, len(names)) probabilities
    (as :meth:`EndClassifier.readings` with ``names``)."""
    shifts = list(range(-max_shift, max_shift + 1))
    where = [FRAMES[n] - 1 for n in names]  # chain index of each named vertebra
    candidates = np.concatenate([shifted_chain(corners, s)[where] for s in shifts])
    readings = np.clip(np.asarray(read(candidates), float), 1e-4, 1 - 1e-4).reshape(len(shifts), len(names), -1)
    own = readings[:, np.arange(len(names)), np.arange(len(names))]  # each candidate on its own name
    log_odds = np.log(own / (1 - own)).sum(axis=1)
    return {s: float(v) for s, v in zip(shifts, log_odds)}


def choose_shift(scores: dict, keep_bonus: float = 0.0) -> tuple:
    """(shift, support): the best-scoring shift once the decoded chain (shift 0) gains
    ``keep_bonus``, and how far the classifier's own score for it leads the best other shift
    (without the bonus; negative when the bonus kept a chain the classifier reads worse)."""
    adjusted = {s: v + (keep_bonus if s == 0 else 0.0) for s, v in scores.items()}
    chosen = max(adjusted, key=lambda s: (adjusted[s], s == 0))  # a tie keeps the decoded chain
    others = [v for s, v in scores.items() if s != chosen]
    return chosen, float(scores[chosen] - max(others)) if others else np.inf


class ShiftCheck:
    """After decoding, move the whole chain to the shift the end classifier reads best (metadata
    ``shift_check``: ``classifier`` file, ``max_shift``, ``keep_bonus`` for the decoded chain,
    ``review_margin``: the levels are flagged when the classifier's support for the chosen shift is
    below it, ``flag`` "margin" to flag on the margin
    alone or "either" to keep the first stage's rule too).

    Why: the first stage's level cues were trained on every training image, so their errors on
    those images say nothing about new patients, and it can only choose among the peaks it found;
    the end classifier reads extrapolated C7 / S1 candidates as well."""

    def __init__(self, classifier: EndClassifier, settings: dict):
        self.classifier = classifier
        self.max_shift = int(settings.get("max_shift", 2))
        self.keep_bonus = float(settings.get("keep_bonus", 0.0))
        self.review_margin = float(settings.get("review_margin", 0.0))
        self.flag = str(settings.get("flag", "either"))

    def check(self, read, corners) -> tuple:
        """(corners moved to the chosen shift, shift, its support (see :func:`choose_shift`)) of one
        chain (n*4, 2 or n, 4, 2); ``read`` gives the classifier's readings of candidates for all its outputs."""
        scores = shift_scores(read, corners, self.max_shift, self.classifier.outputs)
        shift, support = choose_shift(scores, self.keep_bonus)
        return shifted_chain(corners, shift).reshape(-1, 2), shift, support

    def unsure(self, support: float) -> bool:
        """True when the classifier's support for the chosen chain is too small to vouch for it."""
        return support < self.review_margin
