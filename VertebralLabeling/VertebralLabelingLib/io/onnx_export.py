"""Export a ``.keras`` model to ``NAME.onnx`` beside it, for inference without TensorFlow.

Why: TensorFlow takes 3-4 s to import and has no wheel for macOS, so every use of a trained
model paid for it; ONNX Runtime imports in 0.2 s and installs everywhere.  Training stays in
Keras: ``train`` and ``xray train`` call :func:`export_onnx` after saving, and a model retrained
by hand (or a bundled one after retraining) is converted with::

    vertebral-labeling export-onnx PATH.keras [PATH.keras ...]
    python -m VertebralLabelingLib.io.onnx_export PATH.keras [...]

The export keeps every input dimension the Keras model leaves open (batch, and height/width
of the fully convolutional networks: the MRI net is fed whole padded slices of any size), reads
the output shapes from the model (nothing assumes six disc channels), checks ONNX Runtime
against Keras on one input, and records in ``NAME.json`` under ``"onnx"``: the input name and
shape, the outputs (names, shapes, in the Keras model's order), the exporting versions, the
opset, both files' hashes and the measured difference.  Files are written atomically.

This module imports TensorFlow (through Keras): it belongs to the training side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import ModelError
from . import models as model_lib
from .files import sha256_file, write_json

#: ONNX opset of the export (ONNX Runtime >= 1.17 runs it).
OPSET = 17
#: Largest |ONNX - Keras| accepted by the export check (float32 networks with sigmoid heads).
TOLERANCE = 1e-4


@contextlib.contextmanager
def _dynamic_upsampling():
    """Let Keras' bilinear UpSampling2D trace with unknown height/width.

    Keras 3 computes the new size from the input shape in Python (``ops.image.resize`` then
    tests it), which fails for a symbolic size, so a signature with open height/width cannot
    be exported.  During the export the layer resizes with ``tf.image.resize`` on the runtime
    shape instead: the same half-pixel bilinear interpolation Keras' TensorFlow backend uses
    (checked by the export against the Keras output).
    """
    import tensorflow as tf  # deferred: the export needs the train extra (TensorFlow, tf2onnx)
    from keras.src.layers.reshaping.up_sampling2d import UpSampling2D

    original = UpSampling2D._resize_images

    def resize(self, x, height_factor, width_factor, data_format, interpolation="nearest"):
        if data_format != "channels_last" or interpolation != "bilinear":
            return original(self, x, height_factor, width_factor, data_format, interpolation)
        size = tf.shape(x)[1:3] * tf.constant([height_factor, width_factor], tf.int32)
        return tf.image.resize(x, size, method="bilinear", antialias=False)

    UpSampling2D._resize_images = resize
    try:
        yield
    finally:
        UpSampling2D._resize_images = original


def _versions() -> dict:
    import keras  # deferred: train extra, slow to import
    import onnx
    import tensorflow as tf
    import tf2onnx

    versions = {"keras": keras.__version__, "tensorflow": tf.__version__,
                "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime  # deferred, like the others

        versions["onnxruntime_checked_with"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def check_input(model, meta: dict) -> np.ndarray:
    """A deterministic test input of a size the model accepts (open dims filled from metadata)."""
    shape = list(model.inputs[0].shape)
    fixed = meta.get("input_shape") or meta.get("training", {}).get("train_shape") or [128, 96]
    for i, default in zip((1, 2), fixed):
        if shape[i] is None:
            shape[i] = int(default)
    shape[0] = 2
    shape = [int(s) if s is not None else 1 for s in shape]
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 1.0, shape).astype(np.float32)


def export_onnx(keras_path, onnx_path=None, tolerance: float = TOLERANCE) -> Path:
    """Write ``onnx_path`` (default: ``keras_path`` with ``.onnx``) and record it in ``NAME.json``.

    Raises ModelError when the model cannot be loaded or exported, or when ONNX Runtime and
    Keras disagree by more than ``tolerance`` on the check input (nothing is written then).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras_path = Path(keras_path)
    if keras_path.suffix != ".keras":
        raise ModelError(f"{keras_path} is not a .keras model (the export converts .keras files).")
    onnx_path = Path(onnx_path) if onnx_path else keras_path.with_suffix(".onnx")
    model, meta = model_lib.load_keras_with_metadata(keras_path, lambda m, p: None
                                                     if isinstance(m, dict) else f"{p} is not a JSON object.")
    try:
        import onnxruntime as ort  # deferred: the train extra and ONNX Runtime load only to export
        import tensorflow as tf
    except ImportError as error:
        raise ModelError(f"The ONNX export needs tensorflow, tf2onnx, onnx and onnxruntime "
                         f"({error}); pip install 'vertebral-labeling[train]'.") from error
    input_shape = [None] + [d for d in model.inputs[0].shape[1:]]
    input_name = model.inputs[0].name or "input"
    signature = [tf.TensorSpec(input_shape, tf.float32, name=input_name)]
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp-{os.getpid()}")
    try:
        with _dynamic_upsampling(), contextlib.redirect_stdout(sys.stderr):
            model.export(str(tmp), format="onnx", input_signature=signature, opset_version=OPSET,
                         verbose=False)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        x = check_input(model, meta)
        ort_out = session.run(None, {session.get_inputs()[0].name: x})
        keras_out = model(x, training=False)
        keras_out = [np.asarray(o) for o in (keras_out if isinstance(keras_out, (list, tuple)) else [keras_out])]
        names = [o.name for o in session.get_outputs()]
        order, diffs = _match_outputs(keras_out, ort_out)
        if max(diffs) > tolerance:
            raise ModelError(f"The ONNX export of {keras_path.name} differs from Keras by {max(diffs):.2g} "
                             f"(> {tolerance:g}); not written.")
        os.replace(tmp, onnx_path)
    except ModelError:
        raise
    except Exception as error:  # tf2onnx / TensorFlow raise many types
        raise ModelError(f"Cannot export {keras_path} to ONNX: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from error
    finally:
        if tmp.exists():
            tmp.unlink()
    meta["onnx"] = _onnx_record(session, names, order, onnx_path, keras_path, max(diffs), x.shape)
    meta.setdefault("parameters", int(model.count_params()))
    # Beside the .onnx (the same NAME.json as the .keras file's when they sit together).
    write_json(onnx_path.with_suffix(".json"), meta)
    return onnx_path


def _onnx_record(session, names, order, onnx_path: Path, keras_path: Path, max_diff: float, check_shape) -> dict:
    """The ``onnx`` entry of NAME.json: file, input and outputs, opset, hashes and the check."""
    shapes = {o.name: o.shape for o in session.get_outputs()}
    return {
        "file": onnx_path.name,
        "input_name": session.get_inputs()[0].name,
        "input_shape": [d if isinstance(d, int) else None for d in session.get_inputs()[0].shape],
        "outputs": [{"name": names[i], "shape": [d if isinstance(d, int) else None for d in shapes[names[i]]]}
                    for i in order],
        "opset": OPSET,
        "exported_from": keras_path.name,
        "keras_sha256": sha256_file(keras_path),
        "onnx_sha256": sha256_file(onnx_path),
        "check_max_abs_diff": float(f"{max_diff:.3g}"),
        "check_input_shape": list(check_shape),
        "versions": _versions(),
    }


def export_after_training(path: Path, log=print) -> Path:
    """Write NAME.onnx beside the trained NAME.keras (what label, batch and Slicer run).

    Only once, at the end: an export takes seconds, checkpoints are for resuming and stay Keras.
    A failed export keeps the .keras and says how to retry.
    """
    try:
        onnx_path = export_onnx(path)
    except ModelError as error:
        raise ModelError(f"{path} was saved, but its ONNX export failed ({error}); retry with "
                         f"`vertebral-labeling export-onnx {path}`.") from error
    log(f"exported {onnx_path}")
    return onnx_path


def _match_outputs(keras_out, ort_out):
    """For each Keras output (in order), the index of the ONNX output it is, and the max diff.

    The exporter may name and order outputs its own way; matching by value makes the recorded
    order the Keras one, which is what the labelers expect (heatmap first, then offsets).
    """
    order, diffs, free = [], [], list(range(len(ort_out)))
    for k in keras_out:
        best = min((i for i in free if ort_out[i].shape == k.shape),
                   key=lambda i: float(np.abs(ort_out[i] - k).max()), default=None)
        if best is None:
            raise ModelError(f"The ONNX export has no output of shape {k.shape}.")
        free.remove(best)
        order.append(best)
        diffs.append(float(np.abs(ort_out[best] - k).max()))
    return order, diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m VertebralLabelingLib.io.onnx_export",
                                     description="export .keras models to .onnx beside them")
    parser.add_argument("models", nargs="+", help=".keras files (NAME.json beside each)")
    args = parser.parse_args(argv)
    return run(args.models)


def run(paths) -> int:
    """Export each path; print one line per model; exit status 2 if any failed."""
    status = 0
    for path in paths:
        try:
            out = export_onnx(path)
            meta = json.loads(out.with_suffix(".json").read_text())["onnx"]
            print(f"{out} ({out.stat().st_size / 1e6:.2f} MB, max |onnx - keras| "
                  f"{meta['check_max_abs_diff']:.2g})")
        except ModelError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
