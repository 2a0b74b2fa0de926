"""The AP radiograph landmark network, and loading/saving it with its metadata.

Vertebra-focused design (after Yi et al., "Vertebra-focused landmark detection for scoliosis
assessment", ISBI 2020): a small fully convolutional encoder-decoder outputs, at 1/4 of the
input resolution,

* ``heatmap`` (1 channel): one Gaussian peak per vertebra centre;
* ``offsets`` (8 channels): the four corners (TL, TR, BL, BR; x, y) relative to each cell,
  in units of ``xray_data.OFFSET_SCALE`` input pixels;
* ``level`` (1 channel, models from v0.2 on): which vertebra (T1 ... L5) a centre cell belongs
  to, regressed from the whole view (ribs, pelvis), so the chain is decoded on its levels and
  not only as "the 17 strongest peaks" (see ``xray.decode``).

At inference the 17 strongest heatmap peaks, sorted from top to bottom, are T1..L5 and each
reads its four corners from the offsets (see ``xray.label``).  The encoder goes down to 1/32
with a dilated residual bottleneck, so a vertebra sees most of the spine when it decides
whether it is a vertebra centre.

Files follow the MRI models' convention (``io.models``): ``NAME.keras`` (weights only, no
optimizer state), ``NAME.json`` (how to feed it) and ``NAME.md`` (model card).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from ..io import models as model_lib

ARCHITECTURE = "xray-compact"
TASK = "xray-vertebral-corners"
DEFAULT_MODEL = "xray-compact"


#: Output channels of the model generations: centre heatmap + offsets (+ level (+ anchors)).
OUTPUT_CHANNELS = ([1, 8], [1, 8, 1], [1, 8, 1, 2])
#: Name prefixes of the optional heads' layers, in the order they are built.
HEAD_PREFIXES = ("level", "anchor")


def build(width: float = 1.0, level_head: bool = True, anchor_head: bool = False):
    """The landmark network (~1.4 M parameters at width 1).  ``anchor_head`` (needs the level
    head) adds ``anchors``: heatmaps of the T1 and L5 centres, read from the level branch (which
    sees the whole view): the first rib and clavicles mark T1, the sacrum and iliac crests L5."""
    keras = model_lib.import_keras()
    layers = keras.layers

    def ch(n):
        return max(8, int(round(n * width)))

    def conv(x, filters, stride=1, dilation=1, kernel=3, name=None):
        names = (f"{name}_conv", f"{name}_bn", f"{name}_relu") if name else (None, None, None)
        x = layers.Conv2D(ch(filters), kernel, strides=stride, padding="same",
                          dilation_rate=dilation, use_bias=False, name=names[0])(x)
        x = layers.BatchNormalization(name=names[1])(x)
        return layers.ReLU(name=names[2])(x)

    def block(x, filters, stride):
        y = conv(x, filters, stride=stride)
        y = layers.Conv2D(ch(filters), 3, padding="same", use_bias=False)(y)
        y = layers.BatchNormalization()(y)
        shortcut = x
        if stride != 1 or x.shape[-1] != ch(filters):
            shortcut = layers.Conv2D(ch(filters), 1, strides=stride, use_bias=False)(x)
            shortcut = layers.BatchNormalization()(shortcut)
        return layers.ReLU()(layers.Add()([y, shortcut]))

    inputs = keras.Input((None, None, 1), name="radiograph")
    x2 = conv(inputs, 16, stride=2)                  # 1/2
    x4 = block(x2, 32, 2)                            # 1/4
    x8 = block(block(x4, 64, 2), 64, 1)              # 1/8
    x16 = block(block(x8, 96, 2), 96, 1)             # 1/16
    x32 = block(x16, 128, 2)                         # 1/32
    for dilation in (2, 4):
        x32 = layers.Add()([x32, conv(x32, 128, dilation=dilation)])
    y = layers.UpSampling2D(interpolation="bilinear")(x32)
    y = conv(layers.Concatenate()([y, x16]), 96)
    y = layers.UpSampling2D(interpolation="bilinear")(y)
    y = conv(layers.Concatenate()([y, x8]), 64)
    y = layers.UpSampling2D(interpolation="bilinear")(y)
    y = conv(layers.Concatenate()([y, x4]), 32)
    h = conv(y, 32)
    heat = layers.Conv2D(1, 1, activation="sigmoid", name="heatmap",
                         bias_initializer=keras.initializers.Constant(-2.19))(h)
    o = conv(y, 32)
    offsets = layers.Conv2D(8, 1, name="offsets")(o)
    if not level_head:
        return keras.Model(inputs, [heat, offsets], name="xray_compact")
    context = layers.UpSampling2D(8, interpolation="bilinear", name="level_context")(x32)
    lv = conv(layers.Concatenate(name="level_concat")([y, context]), 32, name="level_branch")
    level = layers.Conv2D(1, 1, name="level")(lv)
    model = keras.Model(inputs, [heat, offsets, level], name="xray_compact")
    return add_anchor_head(model, width) if anchor_head else model


def add_anchor_head(model, width: float = 1.0):
    """``model`` (with the level head) plus the ``anchors`` output, on the level branch's features;
    the existing layers (and their weights) are shared, so a trained model can grow the head."""
    keras = model_lib.import_keras()
    layers = keras.layers
    features = model.get_layer("level_branch_relu").output
    x = layers.Conv2D(max(8, int(round(32 * width))), 3, padding="same", use_bias=False,
                      name="anchor_branch_conv")(features)
    x = layers.ReLU(name="anchor_branch_relu")(layers.BatchNormalization(name="anchor_branch_bn")(x))
    anchors = layers.Conv2D(2, 1, activation="sigmoid", name="anchors",
                            bias_initializer=keras.initializers.Constant(-2.19))(x)
    return keras.Model(model.inputs, list(model.outputs) + [anchors], name=model.name)


def copy_shared_weights(source, target) -> int:
    """Copy the weights of ``source`` into the same layers of ``target``, which may add heads
    (layers named ``level*``, ``anchor*``), so a model without them can be continued; returns the
    number of layers copied.  Layers are paired in graph order (the shared part is built by the
    same code); any shape mismatch is refused rather than silently skipped.
    """
    missing = tuple(prefix for prefix in HEAD_PREFIXES
                    if not any(layer.name.startswith(prefix) for layer in source.layers))
    if "anchor" in missing and any(layer.name.startswith("anchor") for layer in target.layers):
        raise ModelError("grow the anchor head with add_anchor_head after copying (layer order differs)")
    shared = [layer for layer in target.layers if not (missing and layer.name.startswith(missing))]
    if len(shared) != len(source.layers):
        raise ModelError(f"cannot continue from {source.name}: {len(source.layers)} layers, "
                         f"expected {len(shared)}")
    copied = 0
    for old, new in zip(source.layers, shared):
        weights = old.get_weights()
        if [w.shape for w in weights] != [tuple(v.shape) for v in new.weights]:
            raise ModelError(f"cannot continue from {source.name}: layer {old.name} does not match {new.name}")
        if weights:
            new.set_weights(weights)
            copied += 1
    return copied


def save(model, meta: dict, out_dir, name: str = DEFAULT_MODEL) -> Path:
    meta = dict(meta, architecture=ARCHITECTURE, task=TASK)
    return model_lib.save(model, meta, out_dir, name)


def load(name_or_path=DEFAULT_MODEL):
    """(network, metadata); ModelError with a clear message for anything unusable.

    The bundled name runs on ONNX Runtime (``xray-compact.onnx``); a ``.keras`` path is loaded
    through Keras, an ``.onnx`` path through ONNX Runtime (see ``models.load_with_metadata``).
    """
    path = model_lib.resolve_model_path(name_or_path)
    if not path.exists():
        raise ModelError(f"Model file not found: {path}")
    if path.is_dir() or path.suffix not in model_lib.MODEL_SUFFIXES:
        raise ModelError(f"{path} is not a model file (.onnx or .keras).")

    def is_xray_model(meta, meta_path):
        if not isinstance(meta, dict) or meta.get("task") != TASK:
            return (f"{path.name} is not an X-ray landmark model ({meta_path} says task "
                    f"{meta.get('task') if isinstance(meta, dict) else None!r}, expected {TASK!r}).")
        return None

    network, meta = model_lib.load_with_metadata(path, is_xray_model)
    if network.output_channels not in OUTPUT_CHANNELS:
        raise ModelError(f"{path.name} does not have the X-ray heads (heatmap + 8 offsets [+ level [+ 2 anchors]]).")
    return network, meta


def load_keras(name_or_path=DEFAULT_MODEL):
    """(keras model, metadata) of a ``.keras`` X-ray model, for training from it (``--init``)."""
    path = model_lib.resolve_model_path(name_or_path)
    if path.suffix == ".onnx":
        path = path.with_suffix(".keras")
    network, meta = load(path)
    return network.model, meta


def models_dir_file(filename: str) -> Path:
    """A file of the bundled models folder (e.g. 'xray-compact.json')."""
    return model_lib.models_dir() / filename
