"""Training the AP radiograph landmark network on an AASCE-layout folder.

Made for 2 CPU cores: every image is decoded, normalised and downsampled once into a .npy cache
(``cache_dir``), then each batch is a fresh random affine (scale, rotation, shift, aspect) and
intensity augmentation of cached images, made by a ``tf.data`` pipeline (a generator, prefetched)
while the network trains (``Model.fit``).  Loss: penalty-reduced focal loss on the centre heatmap
(CenterNet) + L1 on the corner offsets at the cells around each centre.  The learning rate warms
up linearly, then follows a cosine (``keras.optimizers.schedules.CosineDecay``) over the step
budget or the wall-clock budget, whichever is shorter: a callback measures the speed and sets the
cosine's length, stops at the time budget, and saves the model every ``checkpoint_minutes`` and
at the end, so a killed run still leaves a usable model.  The split is the fixed patient-level
split of ``aasce.split_names``; validation images are never trained on, and the metadata records
the exact validation file list.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..io.models import count_parameters, import_keras
from ..io.onnx_export import export_after_training
from . import aasce
from . import data as xray_data
from . import network as xray_model
from .cobb import cobb_angles
from .label import XrayLabeler

#: Steps of linear learning-rate warm-up (from 1 % of the peak).
WARMUP_STEPS = 100
#: The cosine ends at this fraction of the peak learning rate.
FINAL_LR_FRACTION = 0.02
#: Global gradient-norm clipping.
CLIP_NORM = 5.0
#: Batches prepared ahead of the training step.
PREFETCH = 3
#: A progress line every this many steps.
LOG_EVERY = 50
#: Validation images checked at each checkpoint (all of them at the end).
CHECKPOINT_VALIDATION_IMAGES = 24


def focal_loss(tf, target, pred):
    pred = tf.clip_by_value(pred, 1e-4, 1 - 1e-4)
    pos = tf.cast(target >= 0.999, tf.float32)
    neg = 1.0 - pos
    pos_loss = -tf.math.log(pred) * (1 - pred) ** 2 * pos
    neg_loss = -tf.math.log(1 - pred) * pred ** 2 * (1 - target) ** 4 * neg
    n_pos = tf.maximum(tf.reduce_sum(pos), 1.0)
    return (tf.reduce_sum(pos_loss) + tf.reduce_sum(neg_loss)) / n_pos


#: Weight of the level head's L1 loss (its target spans [-1, 1]; one level = 1/8).
LEVEL_LOSS_WEIGHT = 2.0


def offset_loss(tf, target, pred, mask):
    l1 = tf.reduce_sum(tf.abs(target - pred), axis=-1, keepdims=True) * mask
    return tf.reduce_sum(l1) / tf.maximum(tf.reduce_sum(mask), 1.0)


#: Weight of the anchor heads' focal loss (T1 and L5 centres), beside the centre heatmap's 1.
ANCHOR_LOSS_WEIGHT = 1.0


def batches(images, points, batch_size: int, seed: int, anchors: bool = False, flip_probability: float = 0.0,
            strength: float = 1.0):
    """Endless augmented batches: (x, heatmap, offsets + regression mask (9 channels),
    level + regression mask (2 channels) [, T1 and L5 anchor heatmaps (2 channels)])."""
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.choice(len(images), batch_size, replace=False)
        xs, hs, os_, ls, an = [], [], [], [], []
        for i in idx:
            image, pts = xray_data.training_sample(images[i], points[i], rng, strength=strength,
                                                   flip_probability=flip_probability)
            heat, off, mask, level = xray_data.targets(pts, with_level=True)
            xs.append(image[..., None])
            hs.append(heat)
            os_.append(np.concatenate([off, mask], axis=-1))
            ls.append(np.concatenate([level, mask], axis=-1))
            if anchors:
                an.append(xray_data.anchor_targets(pts))
        yield tuple(np.stack(a).astype(np.float32) for a in (xs, hs, os_, ls, an) if len(a))


def make_dataset(tf, images, points, batch_size: int, seed: int, **augmentation):
    """The batches as a prefetched ``tf.data.Dataset`` of (x, (heatmap, offsets+mask, level+mask
    [, anchors])); ``augmentation``: ``anchors``, ``flip_probability``, ``strength`` of :func:`batches`."""
    rows, cols = xray_data.INPUT_SHAPE
    out = (rows // xray_data.STRIDE, cols // xray_data.STRIDE)
    channels = (1, 9, 2, 2)[: 4 if augmentation.get("anchors") else 3]
    signature = (tf.TensorSpec((batch_size, rows, cols, 1), tf.float32),
                 tuple(tf.TensorSpec((batch_size, *out, c), tf.float32) for c in channels))
    dataset = tf.data.Dataset.from_generator(
        lambda: ((batch[0], batch[1:]) for batch in batches(images, points, batch_size, seed, **augmentation)),
        output_signature=signature)
    return dataset.prefetch(PREFETCH)


def cosine_schedule(keras, learning_rate: float, steps: int):
    """Linear warm-up then cosine decay; its length (a variable) is set by :class:`_Budget`."""
    length = keras.Variable(float(max(steps - WARMUP_STEPS, 1)), dtype="float32", trainable=False,
                            name="cosine_steps")
    return keras.optimizers.schedules.CosineDecay(
        learning_rate * 0.01, length, alpha=FINAL_LR_FRACTION, warmup_target=learning_rate,
        warmup_steps=WARMUP_STEPS), length


def compile_model(tf, keras, model, learning_rate: float, steps: int):
    """Adam with the warm-up cosine and gradient clipping; focal + masked L1 losses (+ focal on
    the anchor heatmaps when the model has them)."""
    schedule, length = cosine_schedule(keras, learning_rate, steps)
    losses = [lambda target, pred: focal_loss(tf, target, pred),
              lambda target, pred: offset_loss(tf, target[..., :8], pred, target[..., 8:]),
              lambda target, pred: LEVEL_LOSS_WEIGHT * offset_loss(tf, target[..., :1], pred, target[..., 1:]),
              lambda target, pred: ANCHOR_LOSS_WEIGHT * focal_loss(tf, target, pred)]
    model.compile(optimizer=keras.optimizers.Adam(schedule, global_clipnorm=CLIP_NORM),
                  loss=losses[: len(model.outputs)])
    return length


def keep_to_budget(model, length, steps: int, elapsed: float, budget_s: float, max_steps: int) -> None:
    """After a training step: stop at the time budget, else (every 10 steps) set the cosine's
    ``length`` to the steps that fit in the time left at the speed so far (at most ``max_steps``)."""
    if elapsed >= budget_s:
        model.stop_training = True
    elif steps % 10 == 0:
        fit = steps + (budget_s - elapsed) * steps / elapsed
        length.assign(float(max(min(max_steps, fit) - WARMUP_STEPS, 1)))


class _Budget:
    """Keras callback (mixed with ``keras.callbacks.Callback`` by :func:`_budget_callback`): logs,
    fits the cosine to the step or time budget, stops at the time budget, saves checkpoints."""

    def __init__(self, run: dict, length, log):
        super().__init__()
        self.run, self.length, self.log = run, length, log
        self.steps, self.history = 0, []

    def on_train_begin(self, logs=None):
        self.t0 = self.last_checkpoint = time.time()

    def on_train_batch_end(self, batch, logs=None):
        self.steps = batch + 1
        elapsed = time.time() - self.t0
        if self.steps % LOG_EVERY == 0:
            lr = float(self.model.optimizer.learning_rate)
            self.log(f"step {self.steps} ({elapsed / 60:.1f} min) lr {lr:.2e} heat {logs['heatmap_loss']:.3f} "
                     f"offsets {logs['offsets_loss']:.4f} level {logs.get('level_loss', 0.0):.4f} "
                     f"anchors {logs.get('anchors_loss', 0.0):.3f}")
        keep_to_budget(self.model, self.length, self.steps, elapsed, self.run["budget"], self.run["steps"])
        if time.time() - self.last_checkpoint > self.run["checkpoint_minutes"] * 60:
            self.checkpoint(CHECKPOINT_VALIDATION_IMAGES)
            self.last_checkpoint = time.time()

    def checkpoint(self, max_images=None) -> Path:
        """Validate, add to the history, save NAME.keras + NAME.json."""
        run, minutes = self.run, round((time.time() - self.t0) / 60, 1)
        smape, err = validate(self.model, *run["validation"], max_images=max_images)
        tag = "val24" if max_images else "val"
        self.history.append({"step": self.steps, "minutes": minutes, f"{tag}_smape": round(smape, 2),
                             f"{tag}_error_px": round(err, 1)})
        if max_images:
            self.log(f"checkpoint step {self.steps}: validation ({max_images} images) SMAPE {smape:.1f} %, "
                     f"corner error {err:.1f} px")
        else:
            self.log(f"final step {self.steps}: validation ({len(run['validation'][0])} images) SMAPE "
                     f"{smape:.2f} %, corner error {err:.1f} px")
        meta = dict(run["meta"], steps=self.steps, history=self.history, train_minutes=minutes)
        return xray_model.save(self.model, meta, run["out_dir"], run["name"])


def _budget_callback(keras, run: dict, length, log):
    # keras (TensorFlow) is imported at first use, so the Callback base is mixed in here.
    return type("BudgetCallback", (_Budget, keras.callbacks.Callback), {})(run, length, log)


def validate(model, images, points, sizes, max_images=None):
    """Quick validation on cached inputs: SMAPE (%) and mean corner error in original pixels."""
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
        scale = H / aasce.CACHE_SHAPE[0]  # cache pixel -> original pixel
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
          width: float = 1.0, log=print, command: str = "", init=None, anchor_head: bool = False,
          flip_probability: float = 0.0, augment_strength: float = 1.0, folds: int = 0, fold: int = 0,
          hold_out_choosing: bool = False, repair_labels: bool = True) -> Path:
    """Train (or continue ``init``) for the step or time budget; returns the saved ``.keras`` path.
    ``anchor_head`` adds the T1/L5 anchor heatmaps (kept when ``init`` has them); ``flip_probability``
    and ``augment_strength`` widen the augmentation (mirrors; larger scale, rotation and shift);
    with ``folds`` > 1, patient fold ``fold`` of the training split is left out (``aasce.fold_names``);
    with ``hold_out_choosing``, the 80 images choices are made on (``aasce.choosing_images``);
    ``repair_labels`` puts label chains stored out of order in order and leaves out the broken ones."""
    import tensorflow as tf  # deferred: TensorFlow takes seconds to import and only training needs it

    keras = import_keras()
    start = time.time()
    tf.random.set_seed(seed)
    keras.utils.set_random_seed(seed)
    data = _load_data(data_dir, cache_dir, log, folds, fold, hold_out_choosing, repair_labels)
    log(f"cache ready in {time.time() - start:.0f} s")
    start_model, previous = xray_model.load_keras(init) if init else (None, None)
    anchor_head = anchor_head or (start_model is not None and len(start_model.outputs) > 3)
    grow = anchor_head and start_model is not None and len(start_model.outputs) <= 3
    model = xray_model.build(width, anchor_head=anchor_head and not grow)
    if init:  # continue from a saved model (a second cosine cycle)
        xray_model.copy_shared_weights(start_model, model)
        if grow:
            model = xray_model.add_anchor_head(model, width)
        fresh = "" if len(start_model.outputs) == len(model.outputs) else "; the new heads start fresh"
        log(f"initialised from {init} ({previous.get('steps')} steps){fresh}")
    n_params = count_parameters(model)
    log(f"model {xray_model.ARCHITECTURE}: {n_params} parameters")
    meta = _metadata(data, data_dir, n_params, width, seed, batch_size, learning_rate, command, init, previous)
    augmentation = {"anchors": anchor_head, "flip_probability": flip_probability, "strength": augment_strength}
    meta["augmentation"] = {"flip_probability": flip_probability, "strength": augment_strength}
    length = compile_model(tf, keras, model, learning_rate, steps)
    run = {"budget": time_budget_s - (time.time() - start), "steps": steps, "meta": meta,
           "checkpoint_minutes": checkpoint_minutes, "out_dir": out_dir, "name": name,
           "validation": (data["v_images"], data["v_points"], data["v_sizes"])}
    budget = _budget_callback(keras, run, length, log)
    model.fit(make_dataset(tf, data["images"], data["points"], batch_size, seed, **augmentation), epochs=1,
              steps_per_epoch=steps, callbacks=[budget], verbose=0)
    out_path = budget.checkpoint()
    (Path(out_dir) / f"{name}.history.json").write_text(json.dumps(budget.history, indent=2) + "\n")
    export_after_training(out_path, log)
    return out_path


def _load_data(data_dir, cache_dir, log, folds: int = 0, fold: int = 0, hold_out_choosing: bool = False,
               repair_labels: bool = False) -> dict:
    """The patient-level split (less a held-out fold when ``folds`` > 1, or the choosing images)
    and the cached training and validation arrays."""
    aset = aasce.load_aasce(data_dir=data_dir, repair=repair_labels)
    train_names, val_names = aasce.split_names(aset.names)
    held = []  # chosen on the whole training split, so folds and choosing images match the benchmarks'
    if folds > 1:
        train_names, held = aasce.fold_names(train_names, folds, fold)
        log(f"fold {fold} of {folds}: {len(held)} training images held out")
    elif hold_out_choosing:
        held = [aset.names[i] for i in aasce.choosing_images(aset, train_names)]
        chosen = set(held)
        train_names = [n for n in train_names if n not in chosen]
        log(f"{len(held)} choosing images held out")
    kept = [aset.names[i] for i in aasce.training_indices(aset, train_names, False)]  # never a broken chain
    if len(kept) < len(train_names):
        log(f"{len(train_names) - len(kept)} label chains out of order and not repairable left out")
    train_names = kept
    log(f"split (seed {aasce.SPLIT_SEED}, by patient): {len(train_names)} train, {len(val_names)} validation")
    images, points, _ = aasce.cache_dataset(aset, aset.indices_of(train_names), cache_dir, log)
    v_images, v_points, v_sizes = aasce.cache_dataset(aset, aset.indices_of(val_names), cache_dir, log)
    return {"train_names": train_names, "val_names": val_names, "held_fold": (folds, fold, held),
            "labels_repaired": repair_labels,
            "images": images, "points": points,
            "v_images": v_images, "v_points": v_points, "v_sizes": v_sizes}


def _metadata(data, data_dir, n_params, width, seed, batch_size, learning_rate, command, init, previous) -> dict:
    meta = {
        "input_shape": list(xray_data.INPUT_SHAPE), "stride": xray_data.STRIDE,
        "offset_scale": xray_data.OFFSET_SCALE, "heatmap_sigma": xray_data.HEATMAP_SIGMA,
        "parameters": n_params, "width": width, "seed": seed, "batch_size": batch_size,
        "learning_rate": learning_rate, "version": __version__,
        "data": str(data_dir), "split_seed": aasce.SPLIT_SEED, "val_fraction": aasce.VAL_FRACTION,
        "n_train": len(data["train_names"]), "n_val": len(data["val_names"]),
        "validation_files": data["val_names"], "command": command,
        "source": "AASCE 2019 training release (SpineWeb dataset 16; Wu et al., MICCAI 2017)",
    }
    meta["labels_repaired"] = bool(data.get("labels_repaired", False))
    folds, fold, held = data.get("held_fold", (0, 0, []))
    if folds > 1:
        meta["fold"] = {"folds": folds, "fold": fold, "held_out_files": held}
    elif held:
        meta["held_out_for_choices"] = len(held)
    if previous is not None:
        meta["initialised_from"] = {"model": str(init), "steps": previous.get("steps"),
                                    "train_minutes": previous.get("train_minutes"),
                                    "command": previous.get("command"), "history": previous.get("history")}
    return meta
