"""Training the end-vertebra classifier (``xray.ends``) on the AASCE training split.

Each sample is a crop around one vertebra of one training radiograph, after a random error like
the first stage's (centre, tilt, width): mostly T1 or L5 and their neighbours on both sides (C7 and
S1 placed one pitch beyond the chain), the rest any vertebra.  Targets: is it T1, is it L5.  The
patient-level validation split is never trained on; with ``hold_out_choosing`` the 80 training
images that decoding and flag choices are made on are left out too (``aasce.choosing_images``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..io.files import write_json
from ..io.models import count_parameters, import_keras, save
from ..io.onnx_export import export_after_training
from . import aasce, ends, refine
from . import data as xray_data
from .refine_train import fit_on_crops

#: Frame error (standard deviations): centre (vertebra widths), tilt (deg), log width.
CENTRE_JITTER, TILT_JITTER_DEG, WIDTH_JITTER = 0.12, 5.0, 0.12
#: Which of the 19 frames (0 = C7, 1 = T1 .. 17 = L5, 18 = S1) a sample is centred on: one of the
#: landmarks the classifier names and its neighbours (the hard negatives), or (the rest of the
#: time) any vertebra.
NEIGHBOURHOODS = {"T1": ((0, 1, 2, 3), (0.4, 0.4, 0.15, 0.05)),
                  "T12": ((12, 11, 13, 10, 14), (0.4, 0.2, 0.2, 0.1, 0.1)),
                  "L5": ((18, 17, 16, 15), (0.4, 0.4, 0.15, 0.05))}
ANY_VERTEBRA = 0.2


def pick_frame(rng, outputs=ends.OUTPUTS) -> int:
    if rng.random() < ANY_VERTEBRA:
        return int(rng.integers(1, 18))
    frames, weights = NEIGHBOURHOODS[outputs[int(rng.integers(len(outputs)))]]
    return int(rng.choice(frames, p=weights))


def sample(image_u8, points, rng, crop_shape=ends.CROP_SHAPE, vertebra_width=ends.CROP_VERTEBRA_WIDTH,
           outputs=ends.OUTPUTS) -> tuple:
    """One (crop, targets: is it each of ``outputs``) from one cached source image."""
    k = pick_frame(rng, outputs)
    centre, tilt, width = ends.chain_frames(points)[k]
    centre = centre + rng.normal(0, CENTRE_JITTER * width, 2)
    tilt += np.radians(np.clip(rng.normal(0, TILT_JITTER_DEG), -15, 15))
    width *= np.exp(rng.normal(0, WIDTH_JITTER))
    crop = xray_data.warp(image_u8.astype(np.float32) / 255.0,
                          ends.crop_matrix(centre, tilt, width, crop_shape, vertebra_width), crop_shape)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return xray_data.augment_intensity(crop, rng), np.array([k == ends.FRAMES[o] for o in outputs], np.float32)


def batches(images, points, batch_size: int, seed: int, crop=(ends.CROP_SHAPE, ends.CROP_VERTEBRA_WIDTH),
            outputs=ends.OUTPUTS):
    rng = np.random.default_rng(seed)
    while True:
        pairs = [sample(images[i], points[i], rng, *crop, outputs) for i in rng.integers(0, len(images), batch_size)]
        yield np.stack([p[0] for p in pairs])[..., None], np.stack([p[1] for p in pairs])


def train(out_dir, data_dir, name: str = ends.DEFAULT_MODEL, seed: int = 0, batch_size: int = 32,
          steps: int = 100000, time_budget_s: float = 2400.0, learning_rate: float = 1e-3,
          cache_dir="runs/xray_cache", log=print, command: str = "", hold_out_choosing: bool = True,
          crop_shape=ends.CROP_SHAPE, vertebra_width: float = ends.CROP_VERTEBRA_WIDTH,
          outputs=ends.OUTPUTS, repair_labels: bool = True) -> Path:
    """Train an end classifier for the step or time budget; writes NAME.keras/.onnx/.json.
    ``crop_shape`` and ``vertebra_width`` (crop pixels per vertebra width) set its field of view,
    ``outputs`` the vertebrae it names (T1 and L5, optionally T12, the last rib's); ``repair_labels``
    puts label chains stored out of order in order and leaves out the broken ones (``aasce.repair_order``)."""
    outputs = tuple(outputs)  # checked before the data are read and cached
    unknown = [o for o in outputs if o not in ends.FRAMES]
    if unknown or "T1" not in outputs or "L5" not in outputs:
        raise InputError(f"outputs must include T1 and L5, from {sorted(ends.FRAMES)}; got {list(outputs)}")
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    start = time.time()
    aset = aasce.load_aasce(data_dir=data_dir, repair=repair_labels)
    train_names, val_names = aasce.split_names(aset.names)
    indices = aasce.training_indices(aset, train_names, hold_out_choosing)
    images, points, _ = aasce.cache_dataset(aset, indices, cache_dir, log, refine.SOURCE_SHAPE)
    log(f"{len(indices)} training images ({len(train_names) - len(indices)} held out: choosing images, "
        "label chains out of order)")
    crop = (tuple(int(v) for v in crop_shape), float(vertebra_width))
    model = ends.build(crop_shape=crop[0], outputs=len(outputs))
    callback = fit_on_crops(model, lambda: batches(images, points, batch_size, seed, crop, outputs),
                            (batch_size, len(outputs)),
                            "binary_crossentropy", learning_rate, steps, time_budget_s - (time.time() - start), log)
    meta = {"input_shape": list(crop[0]), "source_rows": refine.SOURCE_ROWS, "crop_vertebra_width": crop[1],
            "outputs": list(outputs),
            "parameters": count_parameters(model), "seed": seed, "batch_size": batch_size,
            "learning_rate": learning_rate, "steps": callback.steps, "train_minutes": round(callback.minutes, 1),
            "version": __version__, "data": str(data_dir), "split_seed": aasce.SPLIT_SEED,
            "n_train": len(indices), "n_val": len(val_names),
            "held_out_for_choices": aasce.CHOOSING_COUNT if hold_out_choosing else 0,
            "command": command, "labels_repaired": repair_labels, "tta_flip": True,
            "architecture": ends.ARCHITECTURE, "task": ends.TASK}
    path = save(model, meta, out_dir, name)
    export_after_training(path, log)
    write_json(Path(out_dir) / f"{name}.history.json", callback.history)
    return path
