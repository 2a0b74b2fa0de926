"""The MRI disc networks: the compact heatmap network (default) and the Romero et al. 2018
regressors, and loading a disc model (its shapes checked against its architecture).

Model files (``NAME.onnx`` / ``NAME.keras`` + ``NAME.json``) are read and written by
``io.models``; TensorFlow is imported only when a network is built (``io.models.import_keras``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import DISC_NAMES
from ..errors import ModelError
from ..io.models import as_network, import_keras, load_with_metadata, resolve_model_path

#: Heatmap output stride of the compact network (input pixels per output cell).
COMPACT_STRIDE = 2
#: Input sizes must be multiples of this (four poolings after a stride-2 stem).
COMPACT_MULTIPLE = 32
#: Crop side of the romero2018 regressors (mm, 1 mm pixels).
ROMERO_INPUT = 160
#: Gaussian width of the training heatmaps, in input pixels (mm).
HEATMAP_SIGMA = 3.0
ARCHITECTURES = ("compact", "romero2018")

#: Outputs of the compact network after the six per-disc heatmaps: a level-agnostic disc
#: detector ("any disc here") and the dens tip.  Together they give a second opinion on the
#: level, by counting discs down from C2, that does not rely on the per-disc heads.
EXTRA_OUTPUTS = ("any-disc", "dens-tip")


def build_compact(n_discs: int = len(DISC_NAMES) + len(EXTRA_OUTPUTS)):
    """The default heatmap network (~0.3 M parameters): per-disc heatmaps + EXTRA_OUTPUTS."""
    keras = import_keras()
    layers = keras.layers

    def conv(x, filters, dilation=1, stride=1):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", dilation_rate=dilation,
                          use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x)

    inputs = keras.Input((None, None, 1), name="midsagittal")
    x2 = conv(conv(inputs, 16, stride=2), 16)                       # 1/2
    x4 = conv(conv(layers.MaxPooling2D()(x2), 32), 32)              # 1/4
    x8 = conv(conv(layers.MaxPooling2D()(x4), 48), 48)              # 1/8
    x16 = conv(conv(layers.MaxPooling2D()(x8), 64), 64)             # 1/16
    for dilation in (2, 4, 8):                                       # long-range context
        x16 = layers.Add()([x16, conv(x16, 64, dilation=dilation)])
    y = layers.UpSampling2D(interpolation="bilinear")(x16)
    y = conv(layers.Concatenate()([y, x8]), 48)
    y = layers.UpSampling2D(interpolation="bilinear")(y)
    y = conv(layers.Concatenate()([y, x4]), 32)
    y = layers.UpSampling2D(interpolation="bilinear")(y)
    y = conv(layers.Concatenate()([y, x2]), 16)
    heatmaps = layers.Conv2D(n_discs, 1, activation="sigmoid", name="heatmaps")(y)
    return keras.Model(inputs, heatmaps, name="compact")


def build_romero_single(size: int = ROMERO_INPUT, name: str = "disc"):
    """One Romero et al. 2018 regressor: image -> (row, col) of one disc, normalised to [0, 1]."""
    keras = import_keras()
    layers = keras.layers
    inputs = keras.Input((size, size, 1))
    x = layers.Conv2D(32, 9, strides=2, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 9, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(128, 9, padding="same", activation="relu")(x)
    x = layers.Conv2D(128, 5, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(2, activation="linear")(x)
    return keras.Model(inputs, outputs, name=name)


def build_romero(size: int = ROMERO_INPUT, n_discs: int = len(DISC_NAMES)):
    """Six independent Romero regressors side by side in one Keras model (one file to ship).

    The nets share nothing (each has its own weights, as in the paper); the wrapper only lets
    one call run all of them.  Output: (batch, n_discs, 2).
    """
    keras = import_keras()
    inputs = keras.Input((size, size, 1), name="midsagittal")
    outs = [build_romero_single(size, name=f"disc_{i}")(inputs) for i in range(n_discs)]
    stacked = keras.layers.Concatenate(axis=1)([keras.layers.Reshape((1, 2))(o) for o in outs])
    return keras.Model(inputs, stacked, name="romero2018")


def build(architecture: str):
    if architecture == "compact":
        return build_compact()
    if architecture == "romero2018":
        return build_romero()
    raise ModelError(f"Unknown architecture {architecture!r}; choose one of {ARCHITECTURES}.")


def load(name_or_path: str | os.PathLike = "compact", threads: int = 0):
    """(network, metadata) of a disc model; ModelError with a clear message if unusable.

    The network is a :class:`Network`: ONNX Runtime for ``.onnx`` files, Keras for ``.keras``.
    ``threads``: ONNX Runtime's threads per call (0: all cores; the batch uses 1 per item and
    runs several items at once).
    """
    def is_disc_model(meta, meta_path):
        if not isinstance(meta, dict) or meta.get("architecture") not in ARCHITECTURES:
            return f"{meta_path} does not describe a VertebralLabeling model."
        return None

    path = resolve_model_path(name_or_path)
    network, meta = load_with_metadata(path, is_disc_model, threads)
    check_disc_shapes(network, meta, path)
    return network, meta


def check_disc_shapes(network, meta: dict, path) -> None:
    """Refuse a model whose input or output shape is not what its architecture needs.

    Why: the metadata names the architecture, but the .keras / .onnx file may hold anything; a
    wrong shape would otherwise fail deep inside the runtime with a traceback (or, worse, decode
    a heatmap of the wrong number of discs).  ``network``: a :class:`Network` or a bare Keras
    model.  A compact model has at least one heatmap per disc; channels after those are
    EXTRA_OUTPUTS (older models have none, current ones have both).
    """
    network = as_network(network)
    shapes_in, shapes_out = network.input_shapes, network.output_shapes
    n = len(DISC_NAMES)
    name = Path(path).name
    if len(shapes_in) != 1 or len(shapes_out) != 1:
        raise ModelError(f"{name} has {len(shapes_in)} inputs and {len(shapes_out)} outputs; a disc "
                         "model has one of each.")
    shape_in, shape_out = shapes_in[0], shapes_out[0]
    if meta["architecture"] == "compact":
        channels = shape_out[-1] if shape_out else None
        ok = (len(shape_in) == 4 and shape_in[-1] == 1 and len(shape_out) == 4
              and channels is not None and channels >= n)
        want = f"(batch, H, W, 1) -> (batch, H/2, W/2, {n} or more)"
    else:
        size = int(meta.get("romero_input", ROMERO_INPUT))
        ok = shape_in[1:] == (size, size, 1) and shape_out[1:] == (n, 2)
        want = f"(batch, {size}, {size}, 1) -> (batch, {n}, 2)"
    if not ok:
        raise ModelError(f"{name} maps {shape_in} -> {shape_out}, but a {meta['architecture']} disc "
                         f"model maps {want}; it is not a VertebralLabeling disc model.")
