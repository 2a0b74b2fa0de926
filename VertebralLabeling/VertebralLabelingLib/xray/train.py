"""Training the AP radiograph landmark network on an AASCE-layout folder.

Made for 2 CPU cores: every image is decoded, normalised and downsampled once into a .npy cache
(``cache_dir``), then each batch is a fresh random affine (scale, rotation, shift, aspect) and
intensity augmentation of cached images, prepared in a background thread while the network
trains.  Loss: penalty-reduced focal loss on the centre heatmap (CenterNet) + L1 on the corner
offsets at the cells around each centre.  The learning rate follows a cosine over the
wall-clock budget (or the step budget, whichever is shorter), and the model is saved every
``checkpoint_minutes`` and at the end, so a killed run still leaves a usable model.  The split
is the fixed patient-level split of ``xray_data.split_names``; validation images are never
trained on, and the metadata records the exact validation file list.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import numpy as np

from .. import __version__
from . import data as xray_data
from . import network as xray_model


def focal_loss(tf, target, pred):
    pred = tf.clip_by_value(pred, 1e-4, 1 - 1e-4)
    pos = tf.cast(target >= 0.999, tf.float32)
    neg = 1.0 - pos
    pos_loss = -tf.math.log(pred) * (1 - pred) ** 2 * pos
    neg_loss = -tf.math.log(1 - pred) * pred ** 2 * (1 - target) ** 4 * neg
    n_pos = tf.maximum(tf.reduce_sum(pos), 1.0)
    return (tf.reduce_sum(pos_loss) + tf.reduce_sum(neg_loss)) / n_pos


def offset_loss(tf, target, pred, mask):
    l1 = tf.reduce_sum(tf.abs(target - pred), axis=-1, keepdims=True) * mask
    return tf.reduce_sum(l1) / tf.maximum(tf.reduce_sum(mask), 1.0)


class _Batches:
    """Augmented batches from the cache, made in a background thread."""

    def __init__(self, images, points, batch_size, seed, prefetch=3):
        self.images, self.points, self.batch_size = images, points, batch_size
        self.rng = np.random.default_rng(seed)
        self.queue = queue.Queue(maxsize=prefetch)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _make(self):
        idx = self.rng.choice(len(self.images), self.batch_size, replace=False)
        xs, hs, os_, ms = [], [], [], []
        for i in idx:
            image, pts = xray_data.training_sample(self.images[i], self.points[i], self.rng)
            heat, off, mask = xray_data.targets(pts)
            xs.append(image[..., None])
            hs.append(heat)
            os_.append(off)
            ms.append(mask)
        return tuple(np.stack(a).astype(np.float32) for a in (xs, hs, os_, ms))

    def _run(self):
        while not self.stop:
            self.queue.put(self._make())

    def get(self):
        return self.queue.get()

    def close(self):
        self.stop = True
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass


def validate(model, images, points, sizes, max_images=None):
    """Quick validation on cached inputs: SMAPE (%) and mean corner error in original pixels."""
    from .cobb import cobb_angles
    from .label import XrayLabeler

    labeler = XrayLabeler(model, {"input_shape": list(xray_data.INPUT_SHAPE)})
    n = len(images) if max_images is None else min(max_images, len(images))
    smapes, errors = [], []
    for k in range(n):
        cache = images[k].astype(np.float32) / 255.0
        m = xray_data.random_transform(np.random.default_rng(0), cache.shape, strength=0.0)
        image = xray_data.warp(cache, m)
        try:
            corners, _ = labeler.predict_input(image)
        except Exception:  # noqa: BLE001 - too few peaks early in training
            smapes.append(100.0)
            continue
        W, H = sizes[k]
        scale = H / xray_data.CACHE_SHAPE[0]  # cache pixel -> original pixel
        pred = xray_data.apply(m, corners) * scale
        true = points[k] * scale
        errors.append(float(np.linalg.norm(pred - true, axis=1).mean()))
        a = np.array(cobb_angles(pred, image_height=H).angles_deg)
        b = np.array(cobb_angles(true, image_height=H).angles_deg)
        smapes.append(100.0 * np.abs(a - b).sum() / max((a + b).sum(), 1e-6))
    return float(np.mean(smapes)), float(np.mean(errors)) if errors else float("nan")


def train(out_dir, data_dir, name: str = xray_model.DEFAULT_MODEL, seed: int = 0,
          batch_size: int = 8, steps: int = 100000, time_budget_s: float = 2400.0,
          learning_rate: float = 2e-3, cache_dir="runs/xray_cache", checkpoint_minutes: float = 5.0,
          width: float = 1.0, log=print, command: str = "", init=None) -> Path:
    import tensorflow as tf

    keras = xray_model.model_lib._keras()
    start = time.time()
    tf.random.set_seed(seed)
    keras.utils.set_random_seed(seed)
    aset = xray_data.load_aasce(data_dir=data_dir)
    train_names, val_names = xray_data.split_names(aset.names)
    log(f"split (seed {xray_data.SPLIT_SEED}, by patient): {len(train_names)} train, {len(val_names)} validation")
    images, points, _ = xray_data.cache_dataset(aset, aset.indices_of(train_names), cache_dir, log)
    v_images, v_points, v_sizes = xray_data.cache_dataset(aset, aset.indices_of(val_names), cache_dir, log)
    log(f"cache ready in {time.time() - start:.0f} s")

    model = xray_model.build(width)
    previous = None
    if init:  # continue from a saved model (a second cosine cycle)
        start_model, previous = xray_model.load_keras(init)
        model.set_weights(start_model.get_weights())
        log(f"initialised from {init} ({previous.get('steps')} steps)")
    n_params = xray_model.model_lib.count_parameters(model)
    log(f"model {xray_model.ARCHITECTURE}: {n_params} parameters")
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)

    @tf.function
    def step(x, heat, off, mask, lr):
        optimizer.learning_rate.assign(lr)
        with tf.GradientTape() as tape:
            ph, po = model(x, training=True)
            lh = focal_loss(tf, heat, ph)
            lo = offset_loss(tf, off, po, mask)
            loss = lh + lo
        grads = tape.gradient(loss, model.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, 5.0)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return lh, lo

    meta = {
        "input_shape": list(xray_data.INPUT_SHAPE), "stride": xray_data.STRIDE,
        "offset_scale": xray_data.OFFSET_SCALE, "heatmap_sigma": xray_data.HEATMAP_SIGMA,
        "parameters": n_params, "width": width, "seed": seed, "batch_size": batch_size,
        "learning_rate": learning_rate, "version": __version__,
        "data": str(data_dir), "split_seed": xray_data.SPLIT_SEED,
        "val_fraction": xray_data.VAL_FRACTION, "n_train": len(train_names), "n_val": len(val_names),
        "validation_files": val_names, "command": command,
        "source": "AASCE 2019 training release (SpineWeb dataset 16; Wu et al., MICCAI 2017)",
    }
    if previous is not None:
        meta["initialised_from"] = {"model": str(init), "steps": previous.get("steps"),
                                    "train_minutes": previous.get("train_minutes"),
                                    "command": previous.get("command"), "history": previous.get("history")}
    batches = _Batches(images, points, batch_size, seed)
    budget = time_budget_s - (time.time() - start)
    t0 = time.time()
    last_ckpt = t0
    history = []
    s = 0
    out_path = None
    lh_avg = lo_avg = None
    try:
        while s < steps:
            elapsed = time.time() - t0
            progress = max(elapsed / max(budget, 1.0), s / steps)
            if progress >= 1.0:
                break
            warm = min(1.0, (s + 1) / 100)
            lr = learning_rate * warm * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * progress)))
            x, heat, off, mask = batches.get()
            lh, lo = step(x, heat, off, mask, np.float32(lr))
            lh, lo = float(lh), float(lo)
            lh_avg = lh if lh_avg is None else 0.98 * lh_avg + 0.02 * lh
            lo_avg = lo if lo_avg is None else 0.98 * lo_avg + 0.02 * lo
            s += 1
            if s % 50 == 0:
                log(f"step {s} ({elapsed / 60:.1f} min) lr {lr:.2e} heat {lh_avg:.3f} offsets {lo_avg:.4f}")
            if time.time() - last_ckpt > checkpoint_minutes * 60:
                smape, err = validate(model, v_images, v_points, v_sizes, max_images=24)
                history.append({"step": s, "minutes": round(elapsed / 60, 1), "val24_smape": round(smape, 2),
                                "val24_error_px": round(err, 1)})
                log(f"checkpoint step {s}: validation (24 images) SMAPE {smape:.1f} %, corner error {err:.1f} px")
                out_path = xray_model.save(model, dict(meta, steps=s, history=history,
                                                       train_minutes=round(elapsed / 60, 1)), out_dir, name)
                last_ckpt = time.time()
    finally:
        batches.close()
    elapsed = time.time() - t0
    smape, err = validate(model, v_images, v_points, v_sizes)
    history.append({"step": s, "minutes": round(elapsed / 60, 1), "val_smape": round(smape, 2),
                    "val_error_px": round(err, 1)})
    log(f"final step {s}: validation ({len(v_images)} images) SMAPE {smape:.2f} %, corner error {err:.1f} px")
    out_path = xray_model.save(model, dict(meta, steps=s, history=history,
                                           train_minutes=round(elapsed / 60, 1)), out_dir, name)
    (Path(out_dir) / f"{name}.history.json").write_text(json.dumps(history, indent=2) + "\n")
    from ..mri.training.train import export_after_training

    export_after_training(out_path, log)
    return out_path
