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
architecture, input size, heatmap stride, training metadata) and ``NAME.md`` (the model card),
plus ``NAME.onnx``, the same network exported for ONNX Runtime (``onnx_export``), which is what
inference loads for a bundled name: TensorFlow is needed only to train and export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import DISC_NAMES
from ..errors import ModelError

#: Heatmap output stride of the compact network (input pixels per output cell).
COMPACT_STRIDE = 2
#: Input sizes must be multiples of this (four poolings after a stride-2 stem).
COMPACT_MULTIPLE = 32
#: Crop side of the romero2018 regressors (mm, 1 mm pixels).
ROMERO_INPUT = 160
#: Gaussian width of the training heatmaps, in input pixels (mm).
HEATMAP_SIGMA = 3.0

ARCHITECTURES = ("compact", "romero2018")
#: Model file types: ONNX for inference without TensorFlow, Keras for training and user models.
MODEL_SUFFIXES = (".onnx", ".keras")


def models_dir() -> Path:
    """Where the bundled models live (overridable with VERTEBRAL_LABELING_MODELS)."""
    env = os.environ.get("VERTEBRAL_LABELING_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras  # noqa: WPS433  (imported lazily: TensorFlow is slow to import)
    except ImportError as error:
        raise ModelError(f"Keras/TensorFlow is not installed ({error}): .keras models and training "
                         "need pip install 'vertebral-labeling[train]'; the bundled models run as "
                         ".onnx without it.") from error
    return keras


#: Outputs of the compact network after the six per-disc heatmaps: a level-agnostic disc
#: detector ("any disc here") and the dens tip.  Together they give a second opinion on the
#: level, by counting discs down from C2, that does not rely on the per-disc heads.
EXTRA_OUTPUTS = ("any-disc", "dens-tip")


def build_compact(n_discs: int = len(DISC_NAMES) + len(EXTRA_OUTPUTS)):
    """The default heatmap network (~0.3 M parameters): per-disc heatmaps + EXTRA_OUTPUTS."""
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
    """A bundled model name ('compact') or a path to a .keras / .onnx file.

    A bundled name resolves to ``NAME.onnx`` when it exists (inference needs only ONNX Runtime,
    not TensorFlow), else to ``NAME.keras``.  An explicit path is taken as given.
    """
    path = Path(name_or_path)
    if path.suffix in MODEL_SUFFIXES or path.exists():
        return path
    onnx_path = models_dir() / f"{name_or_path}.onnx"
    return onnx_path if onnx_path.exists() else models_dir() / f"{name_or_path}.keras"


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


def _dims(shape) -> tuple:
    """A shape as a tuple of ints, None for a dimension the model leaves open."""
    return tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in shape)


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


def read_metadata(path: Path, check_meta) -> dict:
    """``NAME.json`` beside a model file, checked by ``check_meta`` (see load_keras_with_metadata)."""
    if not path.exists():
        raise ModelError(f"Model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not a model file (.onnx or .keras).")
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
    return meta


def load_with_metadata(path: Path, check_meta, threads: int = 0):
    """(Network, metadata) for inference: an ``.onnx`` file runs on ONNX Runtime (no TensorFlow
    import), anything else is loaded through Keras in safe mode.  Errors as in
    :func:`load_keras_with_metadata`."""
    path = Path(path)
    meta = read_metadata(path, check_meta)
    if path.suffix == ".onnx":
        return OnnxNetwork.load(path, meta, threads), meta
    model, meta = load_keras_with_metadata(path, check_meta)
    return KerasNetwork(model), meta


def load_keras_with_metadata(path: Path, check_meta):
    """(keras model, metadata) from ``NAME.keras`` + ``NAME.json``, for every kind of model.

    ``check_meta(meta, meta_path)`` returns an error message when the metadata is not the
    caller's kind of model (a disc model given to the X-ray labeler, say), else None.  Every
    problem -- missing file, missing or broken JSON, wrong kind, corrupt Keras file -- becomes a
    ModelError whose message the CLI and the Slicer panel show as is.  Used by training, the
    ONNX export and for users' own ``.keras`` models; bundled models run through ONNX Runtime.
    """
    path = Path(path)
    meta = read_metadata(path, check_meta)
    if path.suffix == ".onnx":
        raise ModelError(f"{path} is an ONNX file; a .keras model is needed here (training, export).")
    keras = _keras()
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad file
        raise ModelError(f"Cannot load model {path}: the file is corrupt or not a Keras model "
                         f"({type(error).__name__}).") from error
    return model, meta


class Network:
    """A loaded network as the labelers use it: ``run(batch)`` -> list of numpy outputs.

    Two implementations, so the labelers need not know which runtime is underneath:
    :class:`OnnxNetwork` (shipped models; ONNX Runtime imports in 0.2 s, TensorFlow in 3-4 s)
    and :class:`KerasNetwork` (a user's retrained ``.keras`` file, or a model in training).
    Output shapes are read from the model, never assumed (the disc model's channel count
    may change between versions).
    """

    def run(self, batch: np.ndarray) -> list:
        raise NotImplementedError

    def count_params(self) -> int:
        raise NotImplementedError

    @property
    def output_channels(self) -> list:
        """Last dimension of each output (None where the model does not say)."""
        return [shape[-1] if shape else None for shape in self.output_shapes]

    @property
    def input_shapes(self) -> list:
        """Shape of each input, a tuple with None for open dimensions (batch, H, W)."""
        raise NotImplementedError

    @property
    def output_shapes(self) -> list:
        """Shape of each output, as :attr:`input_shapes`."""
        raise NotImplementedError


class KerasNetwork(Network):
    """A Keras model behind the Network interface (imports TensorFlow)."""

    def __init__(self, model):
        self.model = model
        self._predict = None

    def run(self, batch):
        if self._predict is None:
            import tensorflow as tf

            # One traced graph per input shape (not relaxed to unknown sizes: Keras' bilinear
            # UpSampling2D cannot trace those); about twice as fast as eager calls on 2 cores.
            self._predict = tf.function(lambda x: self.model(x, training=False))
        out = self._predict(np.asarray(batch, np.float32))
        return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]

    def count_params(self) -> int:
        return int(self.model.count_params())

    @property
    def input_shapes(self):
        inputs = self.model.inputs if isinstance(self.model.inputs, (list, tuple)) else [self.model.inputs]
        return [_dims(i.shape) for i in inputs]

    @property
    def output_shapes(self):
        outputs = self.model.outputs if isinstance(self.model.outputs, (list, tuple)) else [self.model.outputs]
        return [_dims(o.shape) for o in outputs]


class OnnxNetwork(Network):
    """An exported model on ONNX Runtime (CPU), outputs in the Keras model's order."""

    def __init__(self, session, meta: dict, path: Path):
        self.session = session
        self.path = path
        self.meta = meta
        self.input_name = session.get_inputs()[0].name
        names = [o.name for o in session.get_outputs()]
        wanted = (meta.get("onnx") or {}).get("outputs") or []
        wanted = [o["name"] for o in wanted if isinstance(o, dict) and o.get("name") in names]
        self.output_names = wanted if len(wanted) == len(names) else names
        shapes = {o.name: _dims(o.shape) for o in session.get_outputs()}
        self._output_shapes = [shapes[n] for n in self.output_names]
        self._input_shapes = [_dims(i.shape) for i in session.get_inputs()]

    @classmethod
    def load(cls, path: Path, meta: dict, threads: int = 0) -> "OnnxNetwork":
        """Open ``path`` in an ONNX Runtime session; ``threads`` 0 lets it use every core."""
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise ModelError(f"{path.name} needs the onnxruntime package (pip install onnxruntime), "
                             "or pass a .keras model.") from error
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ONNX Runtime raises its own types for a bad file
            raise ModelError(f"Cannot load model {path}: the file is corrupt or not an ONNX model "
                             f"({type(error).__name__}).") from error
        return cls(session, meta, path)

    def run(self, batch):
        return self.session.run(self.output_names, {self.input_name: np.asarray(batch, np.float32)})

    def count_params(self) -> int:
        return int(self.meta.get("parameters", 0))

    @property
    def input_shapes(self):
        return list(self._input_shapes)

    @property
    def output_shapes(self):
        return list(self._output_shapes)


def as_network(model) -> Network:
    """A Network as is; a bare Keras model (training, tests) wrapped in a KerasNetwork."""
    return model if isinstance(model, Network) else KerasNetwork(model)


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
