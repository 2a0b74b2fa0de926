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

from ..errors import ModelError

#: Model file types: ONNX for inference without TensorFlow, Keras for training and user models.
MODEL_SUFFIXES = (".onnx", ".keras")


def models_dir() -> Path:
    """Where the bundled models live (overridable with VERTEBRAL_LABELING_MODELS)."""
    env = os.environ.get("VERTEBRAL_LABELING_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def import_keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras  # noqa: WPS433  (imported lazily: TensorFlow is slow to import)
    except ImportError as error:
        raise ModelError(f"Keras/TensorFlow is not installed ({error}): .keras models and training "
                         "need pip install 'vertebral-labeling[train]'; the bundled models run as "
                         ".onnx without it.") from error
    return keras


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


def companion_path(model_path, name: str):
    """Where a model named in another model's metadata (a refiner, an end classifier) is: beside
    that model first (a training run's folder), else the bundled one of that name."""
    beside = [Path(model_path).with_name(name + suffix) for suffix in MODEL_SUFFIXES]
    return next((p for p in beside if p.exists()), name)


def task_check(task: str, kind: str):
    """A ``check_meta`` (see :func:`read_metadata`) that accepts only metadata naming ``task``;
    ``kind`` says what such a model is ("an X-ray vertebra refiner")."""

    def check(meta, meta_path):
        if not isinstance(meta, dict) or meta.get("task") != task:
            return f"{meta_path} is not {kind} (task {task!r} expected)."
        return None
    return check


def load_model_file(name_or_path, check_meta, kind: str):
    """(network, metadata) of a bundled name or an .onnx / .keras path; ModelError naming
    ``kind`` ("Refiner") when there is no such file."""
    path = resolve_model_path(name_or_path)
    if not path.is_file() or path.suffix not in MODEL_SUFFIXES:
        raise ModelError(f"{kind} model not found (an .onnx or .keras file): {path}")
    return load_with_metadata(path, check_meta)


def _dims(shape) -> tuple:
    """A shape as a tuple of ints, None for a dimension the model leaves open."""
    return tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in shape)


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
    keras = import_keras()
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
            import tensorflow as tf  # deferred: only a .keras model needs TensorFlow (slow to import)

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
            import onnxruntime as ort  # deferred: ONNX Runtime loads only when a model first runs
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
    keras = import_keras()
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
