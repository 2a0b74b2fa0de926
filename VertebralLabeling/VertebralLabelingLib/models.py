"""Network architectures, and loading/saving models with their metadata.

Two architectures are available by name:

* ``compact`` (default): one small fully convolutional network with one output heatmap per disc
  (C2-C3 ... C7-T1).  A dilated bottleneck at 1/16 resolution gives it a receptive field of
  several hundred millimetres, so it can tell discs apart by counting from C2 and the skull
  base, while its weights are shared by all discs (six heads on one backbone), which is what
  lets it learn from a handful of subjects.  Output is at 1/2 resolution; positions are
  refined to sub-pixel by a local weighted centroid.
* ``romero2018``: the seed design of Romero et al. 2018, faithful to the paper: one regressor
  per disc, Conv 32@9x9 stride 2 -> maxpool -> Conv 64@9x9 -> maxpool -> Conv 128@9x9 ->
  Conv 128@5x5 -> Dense 512 -> Dense 512 -> Dropout 0.5 -> Dense 2 (linear), on an N x N crop.

A model on disk is ``NAME.keras`` (weights + architecture) beside ``NAME.json`` (how to feed it:
architecture, input size, heatmap stride, training metadata) and ``NAME.md`` (the model card).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import DISC_NAMES
from .errors import ModelError

#: Heatmap output stride of the compact network (input pixels per output cell).
COMPACT_STRIDE = 2
#: Input sizes must be multiples of this (four poolings after a stride-2 stem).
COMPACT_MULTIPLE = 32
#: Crop side of the romero2018 regressors (mm, 1 mm pixels).
ROMERO_INPUT = 160
#: Gaussian width of the training heatmaps, in input pixels (mm).
HEATMAP_SIGMA = 3.0

ARCHITECTURES = ("compact", "romero2018")


def models_dir() -> Path:
    """Where the bundled models live (overridable with VERTEBRAL_LABELING_MODELS)."""
    env = os.environ.get("VERTEBRAL_LABELING_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # noqa: WPS433  (imported lazily: TensorFlow is slow to import)

    return keras


def build_compact(n_discs: int = len(DISC_NAMES)):
    """The default heatmap network (~0.3 M parameters)."""
    keras = _keras()
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
    keras = _keras()
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
    keras = _keras()
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


def count_parameters(model) -> int:
    return int(sum(int(w.numpy().size) for w in model.weights if w.trainable) +
               sum(int(w.numpy().size) for w in model.weights if not w.trainable))


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled model name ('compact') or a path to a .keras file."""
    path = Path(name_or_path)
    if path.suffix == ".keras" or path.exists():
        return path
    return models_dir() / f"{name_or_path}.keras"


def load(name_or_path: str | os.PathLike = "compact"):
    """Load a model and its metadata; raise ModelError with a clear message if unusable."""
    def is_disc_model(meta, meta_path):
        if not isinstance(meta, dict) or meta.get("architecture") not in ARCHITECTURES:
            return f"{meta_path} does not describe a VertebralLabeling model."
        return None

    path = resolve_model_path(name_or_path)
    model, meta = load_keras_with_metadata(path, is_disc_model)
    check_disc_shapes(model, meta, path)
    return model, meta


def check_disc_shapes(model, meta: dict, path) -> None:
    """Refuse a model whose input or output shape is not what its architecture needs.

    Why: the metadata names the architecture, but the .keras file may hold anything; a wrong
    shape would otherwise fail deep inside TensorFlow with a traceback (or, worse, decode a
    heatmap of the wrong number of discs).
    """
    inputs = model.inputs if isinstance(model.inputs, (list, tuple)) else [model.inputs]
    outputs = model.outputs if isinstance(model.outputs, (list, tuple)) else [model.outputs]
    n = len(DISC_NAMES)
    name = Path(path).name
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{name} has {len(inputs)} inputs and {len(outputs)} outputs; a disc model "
                         "has one of each.")
    shape_in, shape_out = tuple(inputs[0].shape), tuple(outputs[0].shape)
    if meta["architecture"] == "compact":
        ok = len(shape_in) == 4 and shape_in[-1] == 1 and len(shape_out) == 4 and shape_out[-1] == n
        want = f"(batch, H, W, 1) -> (batch, H/2, W/2, {n})"
    else:
        size = int(meta.get("romero_input", ROMERO_INPUT))
        ok = shape_in[1:] == (size, size, 1) and shape_out[1:] == (n, 2)
        want = f"(batch, {size}, {size}, 1) -> (batch, {n}, 2)"
    if not ok:
        raise ModelError(f"{name} maps {shape_in} -> {shape_out}, but a {meta['architecture']} disc "
                         f"model maps {want}; it is not a VertebralLabeling disc model.")


def load_keras_with_metadata(path: Path, check_meta):
    """(keras model, metadata) from ``NAME.keras`` + ``NAME.json``, for every kind of model.

    ``check_meta(meta, meta_path)`` returns an error message when the metadata is not the
    caller's kind of model (a disc model given to the X-ray labeler, say), else None.  Every
    problem -- missing file, missing or broken JSON, wrong kind, corrupt Keras file -- becomes a
    ModelError whose message the CLI and the Slicer panel show as is.
    """
    if not path.exists():
        raise ModelError(f"Model file not found: {path}")
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise ModelError(f"Model metadata missing: {meta_path} (expected beside {path.name}).")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"Model metadata {meta_path} is not valid JSON: {error}") from error
    problem = check_meta(meta, meta_path)
    if problem:
        raise ModelError(problem)
    keras = _keras()
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a bad file
        raise ModelError(f"Cannot load model {path}: the file is corrupt or not a Keras model "
                         f"({type(error).__name__}).") from error
    return model, meta


def _weights_only(model):
    """An uncompiled copy: shipped files carry no optimizer state (a third of the size)."""
    if getattr(model, "optimizer", None) is None:
        return model
    keras = _keras()
    return keras.Model(model.inputs, model.outputs, name=model.name)  # same layers, uncompiled


def save(model, meta: dict, out_dir: str | os.PathLike, name: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.keras"
    tmp = out_dir / f".{name}.tmp.keras"
    _weights_only(model).save(tmp)
    os.replace(tmp, path)
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path
