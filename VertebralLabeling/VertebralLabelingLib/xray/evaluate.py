"""Accuracy on an AASCE-layout folder: Cobb angles from ground truth, and the landmark model.

* :func:`cobb_from_ground_truth` applies the reference Cobb method to the labelled landmarks
  (pixels, with each image's real size) and compares with ``angles.csv``.
* :func:`evaluate_model` labels every image with the model and reports the AASCE metric
  (SMAPE over the three angles, per image, averaged, in percent), the mean absolute error per
  angle, the mean corner error in original pixels, and the median seconds per case with the
  model already loaded.
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from ..errors import InputError
from .aasce import load_aasce, order_status, read_names_file, repair_order, split_names
from .cobb import cobb_angles
from .data import VERTEBRA_NAMES, read_radiograph
from .export import ANGLE_COLUMNS
from .label import XrayLabeler
from .vote import level_shift, misnamed_vertebrae


def image_size(path) -> tuple:
    """(width, height) of an image: from its header when PIL reads it, else by reading it."""
    try:
        with Image.open(path) as image:  # header only
            return image.size
    except (OSError, ValueError):
        radiograph = read_radiograph(path)
        return radiograph.width, radiograph.height


def smape(pred, true) -> float:
    """AASCE SMAPE (%) of one image: sum |pred - true| / sum (pred + true) * 100."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    den = float(np.sum(pred + true))
    return 100.0 * float(np.sum(np.abs(pred - true))) / den if den > 0 else 0.0


def select(aset, split: str = "all", files=None) -> list:
    """Indices of the images to use: a names file, or the fixed split ('all', 'train', 'val')."""
    if files:
        return aset.indices_of(read_names_file(files))
    if split == "all":
        return list(range(len(aset.names)))
    train, val = split_names(aset.names)
    if split not in ("train", "val"):
        raise InputError(f"Unknown split {split!r}: use all, train or val.")
    return aset.indices_of(val if split == "val" else train)


def cobb_from_ground_truth(images_dir, labels_dir, split: str = "all", files=None, log=None) -> dict:
    aset = load_aasce(images_dir, labels_dir)
    if aset.angles is None:
        raise InputError(f"{labels_dir} has no angles.csv to compare with.")
    indices = select(aset, split, files)
    rows = []
    for index in indices:
        w, h = image_size(aset.image_path(index))
        xy = aset.landmarks[index] * [w, h]
        result = cobb_angles(xy, image_height=h)
        rows.append({"image": aset.names[index], "angles_deg": [round(a, 4) for a in result.angles_deg],
                     "reference_deg": [float(a) for a in aset.angles[index]],
                     "end_vertebrae": [list(p) for p in result.end_vertebrae], "branch": result.branch})
    ours = np.array([r["angles_deg"] for r in rows])
    diff = np.abs(ours - np.array([r["reference_deg"] for r in rows]))
    summary = {
        "n_images": len(rows),
        "median_abs_diff_deg": float(np.median(diff)),
        "p90_abs_diff_deg": float(np.percentile(diff, 90)),
        "max_abs_diff_deg": float(diff.max()),
        "per_angle": {c: {"median_abs_diff_deg": float(np.median(diff[:, k])),
                          "max_abs_diff_deg": float(diff[:, k].max())}
                      for k, c in enumerate(ANGLE_COLUMNS)},
        "images": rows,
    }
    if log:
        log(f"{len(rows)} images: |delta| median {summary['median_abs_diff_deg']:.4f}, "
            f"p90 {summary['p90_abs_diff_deg']:.4f}, max {summary['max_abs_diff_deg']:.4f} deg")
    return summary


def evaluate_model(images_dir, labels_dir, model="xray-compact", split: str = "val", files=None,
                   limit: int | None = None, log=None) -> dict:
    aset = load_aasce(images_dir, labels_dir)
    indices = select(aset, split, files)
    if limit:
        indices = indices[:limit]
    if not indices:
        raise InputError("No images selected.")
    labeler = XrayLabeler.load(model)
    rows, seconds, errors, smapes, abs_err, shifts = [], [], [], [], [], []
    for n, index in enumerate(indices):
        radiograph = read_radiograph(aset.image_path(index))
        start = time.perf_counter()
        result = labeler.label(radiograph)
        seconds.append(time.perf_counter() - start)
        true_px = aset.landmarks[index] * [radiograph.width, radiograph.height]
        err = np.linalg.norm(result.points_px - true_px, axis=1)
        truth = cobb_angles(true_px, image_height=radiograph.height).angles_deg
        if aset.angles is not None:
            truth = aset.angles[index]
        pred = np.array(result.cobb.angles_deg)
        s = smape(pred, truth)
        errors.append(float(err.mean()))
        smapes.append(s)
        abs_err.append(np.abs(pred - np.asarray(truth)))
        shift = level_shift(result.points_px, true_px)
        shifts.append(shift)
        rows.append({"image": aset.names[index], "smape": round(s, 3),
                     "angles_deg": [round(a, 2) for a in pred], "reference_deg": [float(a) for a in truth],
                     "landmark_mean_error_px": round(float(err.mean()), 2),
                     "min_confidence": round(float(result.confidence.min()), 3),
                     "level_shift": shift, "level_flagged": bool(result.level_uncertain),
                     "misnamed_vertebrae": [VERTEBRA_NAMES[i] for i in
                                            np.nonzero(misnamed_vertebrae(result.points_px, true_px))[0]],
                     "uncertain_levels": result.uncertain_levels,
                     "points_px": [[round(float(x), 2), round(float(y), 2)] for x, y in result.points_px],
                     "seconds": round(seconds[-1], 3), **_against_repaired_labels(result, true_px, truth, radiograph)})
        if log:
            log(f"[{n + 1}/{len(indices)}] {aset.names[index]}: SMAPE {s:.1f} %, corner error "
                f"{err.mean():.1f} px, {seconds[-1]:.2f} s")
    abs_err = np.array(abs_err)
    return {
        "n_images": len(rows),
        "model": str(model),
        "split": "files" if files else split,
        "smape": float(np.mean(smapes)),
        "smape_median": float(np.median(smapes)),
        "mae_deg": {c: float(abs_err[:, k].mean()) for k, c in enumerate(ANGLE_COLUMNS)},
        "mae_deg_all": float(abs_err.mean()),
        "landmark_mean_error_px": float(np.mean(errors)),
        "landmark_median_error_px": float(np.median(errors)),
        "level_shift_rate": float(np.mean(np.array(shifts) != 0)),
        **_level_flag_summary(rows),
        **_repaired_summary(rows),
        "seconds_per_case": float(np.median(seconds)),
        "model_parameters": int(labeler.meta.get("parameters", 0)),
        "images": rows,
    }


def _against_repaired_labels(result, true_px, truth, radiograph) -> dict:
    """For a labelled chain stored out of top-to-bottom order (``aasce.order_status``): its status
    and, when it can be put in order, the level shift and SMAPE against the chain in order (its
    angles recomputed by the reference method).  Nothing for a chain in order."""
    status = order_status(true_px)
    if status == "ok":
        return {}
    repaired = repair_order(true_px)
    if repaired is None:
        return {"label_order": status}
    angles = cobb_angles(repaired, image_height=radiograph.height).angles_deg
    misnamed = misnamed_vertebrae(result.points_px, repaired)
    return {"label_order": status, "level_shift_repaired": level_shift(result.points_px, repaired),
            "misnamed_vertebrae_repaired": [VERTEBRA_NAMES[i] for i in np.nonzero(misnamed)[0]],
            "reference_deg_repaired": [round(a, 3) for a in angles],
            "smape_repaired": round(smape(result.cobb.angles_deg, angles), 3)}


def _repaired_summary(rows: list) -> dict:
    """The headline figures again with the chains stored out of order put in order (the broken
    ones as stored): how much of the level-shift rate is the labels' order, not the model."""
    shifts = [r.get("level_shift_repaired", r["level_shift"]) for r in rows]
    smapes = [r.get("smape_repaired", r["smape"]) for r in rows]
    misnamed = [bool(r.get("misnamed_vertebrae_repaired", r["misnamed_vertebrae"])) for r in rows]
    return {"labels_out_of_order": sum("label_order" in r for r in rows),
            "misnamed_image_rate_repaired_labels": float(np.mean(misnamed)),
            "level_shift_rate_repaired_labels": float(np.mean(np.array(shifts) != 0)),
            "smape_repaired_labels": float(np.mean(smapes))}


def _level_flag_summary(rows: list) -> dict:
    """How well the "chain could be shifted" flag covers the images whose chain is shifted."""
    shifted = np.array([r["level_shift"] != 0 for r in rows])
    flagged = np.array([r["level_flagged"] for r in rows])
    misnamed = np.array([bool(r["misnamed_vertebrae"]) for r in rows])
    return {
        "level_flag_rate": float(flagged.mean()),
        # the promise "never silently on the wrong level", broken: shifted and not flagged
        "level_shift_silent_rate": float((shifted & ~flagged).mean()),
        "level_shift_caught": int((shifted & flagged).sum()),
        "level_shift_missed": int((shifted & ~flagged).sum()),
        # the same promise per vertebra: any vertebra nearer another level than its own, even when
        # the chain as a whole is not shifted (a vertebra skipped or doubled part-way)
        "misnamed_vertebra_rate": float(np.mean([len(r["misnamed_vertebrae"]) / (len(r["points_px"]) // 4)
                                                 for r in rows])),
        "misnamed_image_rate": float(misnamed.mean()),
        "misnamed_silent_rate": float((misnamed & ~flagged).mean()),
    }
