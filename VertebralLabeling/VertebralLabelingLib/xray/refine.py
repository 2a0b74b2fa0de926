"""Second stage of the AP landmark model: each vertebra's four corners refined on a crop.

Why: the Cobb angles depend almost only on each vertebra's tilt (on the validation split, the
first stage's corners with the true tilts give SMAPE about 1 %, the true corners with the first
stage's tilts about 10 %), and the first stage sees the whole spine at 640 rows (a vertebra is
about 40 input pixels wide).  The refiner sees one vertebra at a time, about twice as sharp,
rotated to the first stage's tilt and scaled to its width, and regresses the corners in that
frame; the residual tilt it corrects is the error that drives the angles.

Geometry: the radiograph is area-averaged once to ``SOURCE_ROWS`` rows (``source_image``, as the
training cache); a crop of ``CROP_SHAPE`` (rows, cols) pixels is sampled around a vertebra's
centre, rotated by its tilt, with ``CROP_VERTEBRA_WIDTH`` crop pixels per vertebra width
(:func:`crop_matrix`).  Targets are the corners in crop pixels, relative to the crop centre and
divided by ``CORNER_SCALE`` (TL, TR, BL, BR; x, y).
"""

from __future__ import annotations

import numpy as np

from ..io import models as model_lib
from . import data as xray_data
from .decode import vertebra_tilts

ARCHITECTURE = "xray-refine"
TASK = "xray-vertebra-refiner"
DEFAULT_MODEL = "xray-refine"
#: Rows of the area-averaged radiograph crops are taken from (about 1.8 original pixels per row).
SOURCE_ROWS = 1280
#: Source images for training are cached at this (rows, cols), centred (AASCE is at most ~0.45 wide).
SOURCE_SHAPE = (SOURCE_ROWS, 640)
#: Crop (rows, cols), and crop pixels per vertebra width.
CROP_SHAPE = (64, 96)
CROP_VERTEBRA_WIDTH = 56.0
#: Corner targets are (corner - crop centre) / CORNER_SCALE, in crop pixels.
CORNER_SCALE = 32.0


def source_image(radiograph: xray_data.Radiograph, normalized: np.ndarray | None = None):
    """(image (SOURCE_ROWS, cols) in [0, 1], its source->original-pixel 3x3 matrix);
    ``normalized`` as in :func:`xray_data.prepare_input`."""
    cols = int(np.ceil(radiograph.width * SOURCE_ROWS / radiograph.height))
    return xray_data.prepare_input(radiograph, (SOURCE_ROWS, max(cols, 8)), normalized)


def frame(corners) -> tuple:
    """(centre (2,), tilt (rad), width) of one vertebra's corners (4, 2): the tilt as cobb.py reads
    it (left-side midpoint to right-side midpoint), the width as the mean of the top and bottom."""
    c = np.asarray(corners, float).reshape(4, 2)
    width = (np.linalg.norm(c[1] - c[0]) + np.linalg.norm(c[3] - c[2])) / 2
    return c.mean(axis=0), float(vertebra_tilts(c)[0]), float(max(width, 1.0))


def tilt_error_deg(tilts, true_tilts) -> np.ndarray:
    """|tilts - true_tilts| in degrees (radians in), wrapped to [0, 180]."""
    return np.abs(np.degrees(np.angle(np.exp(1j * (np.asarray(tilts, float) - np.asarray(true_tilts, float))))))


def crop_matrix(centre, tilt: float, width: float, shape=CROP_SHAPE, vertebra_width=CROP_VERTEBRA_WIDTH):
    """3x3 map crop pixel (x, y) -> source pixel (x, y): centred, rotated by ``tilt``, scaled so
    the vertebra is ``vertebra_width`` crop pixels wide in a crop of ``shape`` (rows, cols)."""
    scale = width / vertebra_width
    c, s = np.cos(tilt) * scale, np.sin(tilt) * scale
    m = np.eye(3)
    m[:2, :2] = [[c, -s], [s, c]]
    m[:2, 2] = np.asarray(centre, float) - m[:2, :2] @ crop_mid(shape)
    return m


def crop_mid(shape=CROP_SHAPE) -> np.ndarray:
    """The centre pixel (x, y) of a crop of ``shape`` (rows, cols)."""
    rows, cols = shape
    return np.array([(cols - 1) / 2.0, (rows - 1) / 2.0])


def crops(source: np.ndarray, corners) -> tuple:
    """Crops (n, rows, cols) around each vertebra of ``corners`` (n*4, 2) in source pixels, and
    their crop->source matrices (n, 3, 3)."""
    matrices = np.array([crop_matrix(*frame(v)) for v in np.asarray(corners, float).reshape(-1, 4, 2)])
    return np.array([xray_data.warp(source, m, CROP_SHAPE) for m in matrices]), matrices


def corners_from_output(output, matrices) -> np.ndarray:
    """Network output (n, 8) -> corners (n*4, 2) in source pixels."""
    local = np.asarray(output, float).reshape(-1, 4, 2) * CORNER_SCALE + crop_mid()
    return np.concatenate([xray_data.apply(m, c) for m, c in zip(matrices, local)])


def targets(corners_in_crop) -> np.ndarray:
    """Corners (4, 2) in crop pixels -> the network's 8 targets."""
    return ((np.asarray(corners_in_crop, float) - crop_mid()) / CORNER_SCALE).ravel().astype(np.float32)


#: Refiner heads: ``dense`` regresses the 8 numbers from pooled features; ``heatmap`` predicts a
#: heatmap per corner at half the crop's resolution and reads its expected position (soft-argmax).
HEADS = ("dense", "heatmap")


def build(width: float = 1.0, head: str = "dense"):
    """A small CNN: crop (64, 96, 1) -> 8 corner coordinates (``head``: see :data:`HEADS`)."""
    keras = model_lib.import_keras()
    layers = keras.layers

    def conv(x, filters, stride=1):
        x = layers.Conv2D(max(8, int(round(filters * width))), 3, strides=stride, padding="same", use_bias=False)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    inputs = keras.Input(CROP_SHAPE + (1,), name="crop")
    if head == "heatmap":
        return keras.Model(inputs, _heatmap_head(keras, conv, inputs), name="xray_refine_heatmap")
    x = conv(inputs, 16)
    for filters in (32, 48, 64, 96):  # 64 x 96 -> 4 x 6
        x = conv(conv(x, filters, stride=2), filters)
    x = layers.Flatten()(conv(x, 32))
    x = layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(8, name="corners")(x), name="xray_refine")


def _heatmap_head(keras, conv, inputs):
    """Why: a corner read as the expected position of a heatmap (soft-argmax) is translation
    equivariant, so it generalises to new patients better than a dense regression of pooled
    features.  A small U-Net (64 x 96 -> 4 x 6 -> 32 x 48) gives each half-resolution pixel the
    whole vertebra as context; the expectation is a fixed (non-trainable) product with the grid of
    pixel positions in target units, built from standard layers so the model file holds no code."""
    layers = keras.layers
    skips, x = [], conv(inputs, 16)
    for filters in (32, 48, 64, 96):
        x = conv(conv(x, filters, stride=2), filters)
        skips.append(x)
    for filters, skip in zip((64, 48, 32), reversed(skips[:-1])):  # 4x6 -> 8x12 -> 16x24 -> 32x48
        x = conv(layers.Concatenate()([layers.UpSampling2D(2)(x), skip]), filters)
    logits = layers.Conv2D(4, 1, name="corner_logits")(x)
    rows, cols = CROP_SHAPE[0] // 2, CROP_SHAPE[1] // 2
    weights = layers.Softmax(axis=1)(layers.Reshape((rows * cols, 4))(logits))
    expectation = layers.Dense(2, use_bias=False, trainable=False, name="expected_position")
    out = layers.Reshape((8,), name="corners")(expectation(layers.Permute((2, 1))(weights)))
    expectation.set_weights([_grid_in_target_units(rows, cols)])
    return out


def _grid_in_target_units(rows: int, cols: int) -> np.ndarray:
    """(rows*cols, 2) the (x, y) of each half-resolution pixel centre as a target
    ((crop pixel - crop centre) / CORNER_SCALE), in the Reshape's row-major order."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    crop_xy = np.stack([2 * x.ravel() + 0.5, 2 * y.ravel() + 0.5], axis=1)
    return ((crop_xy - crop_mid()) / CORNER_SCALE).astype(np.float32)


is_refiner = model_lib.task_check(TASK, "an X-ray vertebra refiner")


def load(name_or_path=DEFAULT_MODEL):
    """(network, metadata) of a refiner (.onnx on ONNX Runtime, or .keras)."""
    return model_lib.load_model_file(name_or_path, is_refiner, "Refiner")


class Refiner:
    """``refine(radiograph, corners_px)``: the first stage's corners (68, 2, original pixels) ->
    refined corners, each vertebra from its own crop (mirror-averaged when ``flip``).  With
    ``members`` (more refiner networks, metadata ``ensemble``) the outputs of all are averaged."""

    def __init__(self, network, meta: dict, members=()):
        self.networks = [model_lib.as_network(n) for n in (network, *members)]
        self.network = self.networks[0]
        self.meta = meta
        self.flip = bool(meta.get("tta_flip", True))
        self.passes = int(meta.get("passes", 1))

    @classmethod
    def load(cls, name_or_path=DEFAULT_MODEL) -> "Refiner":
        """A refiner and the members its metadata names in ``ensemble`` (beside it first, else bundled)."""
        network, meta = load(name_or_path)
        path = model_lib.resolve_model_path(name_or_path)
        members = [load(model_lib.companion_path(path, name))[0] for name in meta.get("ensemble") or ()]
        return cls(network, meta, members)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(n, rows, cols) crops -> (n, 8) outputs, averaged over the networks and with the mirrored
        crops' (mirrored back)."""
        x = np.ascontiguousarray(batch[..., None], dtype=np.float32)
        n = len(batch)
        if self.flip:
            x = np.concatenate([x, x[:, :, ::-1]])
        out = np.mean([network.run(x)[0] for network in self.networks], axis=0)
        if not self.flip:
            return out
        # the outputs are relative to the crop centre, on the mirror axis
        return (out[:n] + xray_data.mirror_offsets(out[n:].reshape(n, 4, 2)).reshape(n, 8)) / 2

    def refine_source(self, source: np.ndarray, corners_src) -> np.ndarray:
        corners = np.asarray(corners_src, float)
        for _ in range(self.passes):
            batch, matrices = crops(source, corners)
            corners = corners_from_output(self.predict(batch), matrices)
        return corners

    def refine(self, radiograph: xray_data.Radiograph, corners_px, normalized=None) -> np.ndarray:
        """Refined corners (68, 2) in original pixels; ``normalized`` as in :func:`source_image`."""
        source, to_pixel = source_image(radiograph, normalized)
        corners_src = xray_data.apply(np.linalg.inv(to_pixel), corners_px)
        return xray_data.apply(to_pixel, self.refine_source(source, corners_src))
