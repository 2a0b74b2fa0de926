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
#: The classifier's two outputs: this candidate is T1; it is L5.
OUTPUTS = ("T1", "L5")


def chain_frames(points) -> list:
    """(centre, tilt, width) of C7, T1 .. L5, S1 (19 frames) from the 68 labelled corners: C7 and
    S1 are one pitch beyond T1 and L5, with their neighbour's tilt and width."""
    frames = [refine.frame(v) for v in np.asarray(points, float).reshape(-1, 4, 2)]
    beyond = []
    for end, inner in ((frames[0], frames[1]), (frames[-1], frames[-2])):
        beyond.append((2 * end[0] - inner[0], end[1], end[2]))
    return [beyond[0]] + frames + [beyond[1]]


def crop_matrix(centre, tilt: float, width: float) -> np.ndarray:
    """3x3 map crop pixel -> source pixel for one candidate (see :func:`refine.crop_matrix`)."""
    return refine.crop_matrix(centre, tilt, width, CROP_SHAPE, CROP_VERTEBRA_WIDTH)


def build(width: float = 1.0):
    """A small CNN: crop (128, 160, 1) -> P(T1), P(L5) (sigmoids).  The features are flattened,
    not pooled: whether the ribs or the crests are beside the *centre* vertebra is the question."""
    keras = model_lib.import_keras()
    layers = keras.layers

    def conv(x, filters, stride=1):
        x = layers.Conv2D(max(8, int(round(filters * width))), 3, strides=stride, padding="same", use_bias=False)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    inputs = keras.Input(CROP_SHAPE + (1,), name="crop")
    x = conv(inputs, 16, stride=2)
    for filters in (24, 32, 48, 64, 96):  # 64 x 80 -> 2 x 3 (after the stem)
        x = conv(conv(x, filters, stride=2), filters)
    x = layers.Flatten()(conv(x, 32))
    x = layers.Dropout(0.3)(layers.Dense(64, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(2, activation="sigmoid", name="ends")(x), name="xray_ends")


is_end_classifier = model_lib.task_check(TASK, "an X-ray end-vertebra classifier")


def load(name_or_path=DEFAULT_MODEL):
    """(network, metadata) of an end classifier (.onnx on ONNX Runtime, or .keras)."""
    return model_lib.load_model_file(name_or_path, is_end_classifier, "End-vertebra")


class EndClassifier:
    """``readings(source, candidates)``: P(T1), P(L5) of each candidate vertebra (k, 4, 2 corners
    in source pixels), averaged with the mirrored crops' when ``flip``."""

    def __init__(self, network, meta: dict):
        self.network = model_lib.as_network(network)
        self.meta = meta
        self.flip = bool(meta.get("tta_flip", True))

    @classmethod
    def load(cls, name_or_path=DEFAULT_MODEL) -> "EndClassifier":
        return cls(*load(name_or_path))

    def readings(self, source: np.ndarray, candidates) -> np.ndarray:
        frames = [refine.frame(v) for v in np.asarray(candidates, float).reshape(-1, 4, 2)]
        batch = np.array([xray_data.warp(source, crop_matrix(*f), CROP_SHAPE) for f in frames])[..., None]
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if not self.flip:
            return self.network.run(x)[0]
        out = self.network.run(np.concatenate([x, x[:, :, ::-1]]))[0]
        return (out[: len(x)] + out[len(x):]) / 2
