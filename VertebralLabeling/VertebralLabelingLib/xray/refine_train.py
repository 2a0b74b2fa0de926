"""Training the vertebra refiner (``xray.refine``) on the AASCE training split.

Each sample is one vertebra of one training radiograph, cropped around its true corners after a
random error like the first stage's (centre, tilt, width), then mirrored half of the time and
intensity-augmented; the target is its true corners in the crop.  The split is the fixed
patient-level split of ``aasce.split_names``: validation images are never trained on, and are
only used for the logged tilt error at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..io.files import write_json
from ..io.models import count_parameters, import_keras, load_keras_with_metadata, save
from ..io.onnx_export import export_after_training
from . import aasce, refine
from . import data as xray_data
from .train import CLIP_NORM, cosine_schedule, keep_to_budget

#: The simulated first-stage error (standard deviations): centre (vertebra widths), tilt (deg),
#: log width.  Measured first-stage tilt error on training images is about 2.5 deg (mean |error|).
CENTRE_JITTER, TILT_JITTER_DEG, WIDTH_JITTER = 0.08, 4.0, 0.08


def sample(image_u8, points, rng) -> tuple:
    """One (crop, 8 targets) from a random vertebra of one cached source image."""
    vertebra = np.asarray(points, float).reshape(-1, 4, 2)[rng.integers(0, 17)]
    centre, tilt, width = refine.frame(vertebra)
    centre = centre + rng.normal(0, CENTRE_JITTER * width, 2)
    tilt += np.radians(np.clip(rng.normal(0, TILT_JITTER_DEG), -12, 12))
    width *= np.exp(rng.normal(0, WIDTH_JITTER))
    m = refine.crop_matrix(centre, tilt, width)
    crop = xray_data.warp(image_u8.astype(np.float32) / 255.0, m, refine.CROP_SHAPE)
    local = xray_data.apply(np.linalg.inv(m), vertebra)
    if rng.random() < 0.5:
        crop, local = xray_data.mirror(crop, local)
    return xray_data.augment_intensity(crop, rng), refine.targets(local)


def batches(images, points, batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        pairs = [sample(images[i], points[i], rng) for i in rng.integers(0, len(images), batch_size)]
        yield np.stack([p[0] for p in pairs])[..., None], np.stack([p[1] for p in pairs])


def tilt_error(predict, images, points, seed: int = 0, per_image: int = 17) -> tuple:
    """Mean |tilt error| (deg) of perturbed true frames before and after refinement."""
    rng = np.random.default_rng(seed)
    before, after = [], []
    for image, pts in zip(images, points):
        source = image.astype(np.float32) / 255.0
        for vertebra in np.asarray(pts, float).reshape(-1, 4, 2)[:per_image]:
            centre, tilt, width = refine.frame(vertebra)
            noisy = tilt + np.radians(rng.normal(0, TILT_JITTER_DEG))
            m = refine.crop_matrix(centre + rng.normal(0, CENTRE_JITTER * width, 2), noisy, width)
            crop = xray_data.warp(source, m, refine.CROP_SHAPE)
            corners = refine.corners_from_output(predict(crop[None]), m[None])
            before.append(float(refine.tilt_error_deg(noisy, tilt)))
            after.append(float(refine.tilt_error_deg(refine.frame(corners)[1], tilt)))
    return float(np.mean(before)), float(np.mean(after))


def train(out_dir, data_dir, name: str = refine.DEFAULT_MODEL, seed: int = 0, batch_size: int = 64,
          steps: int = 100000, time_budget_s: float = 1800.0, learning_rate: float = 2e-3,
          cache_dir="runs/xray_cache", log=print, command: str = "", init=None, head: str = "dense",
          hold_out_choosing: bool = False, repair_labels: bool = True) -> Path:
    """Train a refiner (or continue ``init``, a refiner ``.keras`` with the same ``head``) for the
    step or time budget; with ``hold_out_choosing``, without the 80 choosing images (to choose a
    design on images the refiner has not seen); ``repair_labels`` as in ``ends_train.train``."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    start = time.time()
    aset = aasce.load_aasce(data_dir=data_dir, repair=repair_labels)
    train_names, val_names = aasce.split_names(aset.names)
    indices = aasce.training_indices(aset, train_names, hold_out_choosing)
    images, points, _ = aasce.cache_dataset(aset, indices, cache_dir, log, refine.SOURCE_SHAPE)
    v_images, v_points, _ = aasce.cache_dataset(aset, aset.indices_of(val_names), cache_dir, log, refine.SOURCE_SHAPE)
    model = refine.build(head=head)
    if init:  # a second cosine cycle from a trained refiner (same architecture)
        model.set_weights(load_keras_with_metadata(Path(init), refine.is_refiner)[0].get_weights())
        log(f"initialised from {init}")
    callback = fit_on_crops(model, lambda: batches(images, points, batch_size, seed), (batch_size, 8), "mae",
                            learning_rate, steps, time_budget_s - (time.time() - start), log)
    before, after = tilt_error(lambda x: model.predict(x[..., None], verbose=0), v_images, v_points)
    log(f"validation tilt error of perturbed frames: {before:.2f} deg -> {after:.2f} deg")
    meta = {"input_shape": list(refine.CROP_SHAPE), "source_rows": refine.SOURCE_ROWS,
            "crop_vertebra_width": refine.CROP_VERTEBRA_WIDTH, "corner_scale": refine.CORNER_SCALE,
            "parameters": count_parameters(model), "seed": seed, "batch_size": batch_size,
            "learning_rate": learning_rate, "steps": callback.steps, "train_minutes": round(callback.minutes, 1),
            "version": __version__, "data": str(data_dir), "split_seed": aasce.SPLIT_SEED,
            "n_train": len(indices), "n_val": len(val_names), "command": command,
            "held_out_for_choices": aasce.CHOOSING_COUNT if hold_out_choosing else 0, "labels_repaired": repair_labels,
            "validation_tilt_error_deg": {"perturbed": round(before, 2), "refined": round(after, 2)},
            "tta_flip": True, "passes": 1, "head": head, "architecture": refine.ARCHITECTURE, "task": refine.TASK,
            "initialised_from": str(init) if init else None}
    path = save(model, meta, out_dir, name)
    export_after_training(path, log)
    write_json(Path(out_dir) / f"{name}.history.json", callback.history)
    return path


def fit_on_crops(model, make_batches, target_shape, loss, learning_rate: float, steps: int, budget_s: float, log):
    """Compile ``model`` (Adam with the warm-up + cosine schedule, gradient clipping) and fit it on
    ``make_batches()`` (a generator of (crops (batch, rows, cols, 1), targets ``target_shape``))
    for ``steps`` or ``budget_s``; returns the :func:`budget_callback` (steps, minutes, history).
    Both crop trainers (refiner, end classifier) use it."""
    import tensorflow as tf  # deferred: only training needs TensorFlow

    keras = import_keras()
    schedule, length = cosine_schedule(keras, learning_rate, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule, global_clipnorm=CLIP_NORM), loss=loss)
    crop_shape = (target_shape[0],) + tuple(model.input_shape[1:])
    dataset = tf.data.Dataset.from_generator(
        make_batches, output_signature=(tf.TensorSpec(crop_shape, tf.float32),
                                        tf.TensorSpec(target_shape, tf.float32))).prefetch(3)
    callback = budget_callback(keras, budget_s, steps, length, log)
    model.fit(dataset, epochs=1, steps_per_epoch=steps, callbacks=[callback], verbose=0)
    return callback


def budget_callback(keras, budget_s: float, steps: int, length, log):
    """Stops at the time budget and fits the cosine to it (``train.keep_to_budget``), logging the loss."""

    class Budget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t0, self.steps, self.history, self.minutes = time.time(), 0, [], 0.0

        def on_train_batch_end(self, batch, logs=None):
            self.steps = batch + 1
            elapsed = time.time() - self.t0
            self.minutes = elapsed / 60
            if self.steps % 200 == 0:
                self.history.append({"step": self.steps, "minutes": round(self.minutes, 1),
                                     "loss": round(float(logs["loss"]), 4)})
                log(f"step {self.steps} ({self.minutes:.1f} min) loss {logs['loss']:.4f}")
            keep_to_budget(self.model, length, self.steps, elapsed, budget_s, steps)

    return Budget()
