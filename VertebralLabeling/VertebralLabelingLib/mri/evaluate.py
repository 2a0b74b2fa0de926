"""Accuracy and speed of disc labeling against SCT disc labels in a BIDS dataset.

Metrics (per ground-truth disc 3..8 present in the labels; a missing prediction is a miss):
* error: 3D distance between the prediction and the ground truth of the same label;
* sagittal error: the same with the left-right (R) component removed, since the annotation's
  lateral position follows the cord and is not what the labeling is about;
* identified: the same-label prediction lies within 8 mm and the ground-truth disc nearest to
  that prediction is the right one (a prediction on the neighbouring disc is a miss).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import DISC_NAME_BY_VALUE, DISC_VALUES
from .labeling import DiscLabeler
from .training.dataset import find_bids_pairs, read_disc_labels
from .volume import load_volume

IDENTIFICATION_RADIUS_MM = 8.0
#: A disc further than this from the truth (sagittal plane), or not identified, is *wrong*; a
#: wrong disc that is not flagged for review is a *silent error*.
WRONG_ABOVE_MM = 5.0


def fold_models(fold_dir) -> dict:
    """Subject id -> model of the leave-one-subject-out fold that left it out, from files named
    ``NAME-loso-sub-X.onnx`` (preferred) or ``.keras`` in ``fold_dir``."""
    folds = {}
    for path in sorted(Path(fold_dir).glob("*-loso-*.*"), key=lambda p: p.suffix == ".onnx"):
        if path.suffix in (".onnx", ".keras"):
            folds[path.stem.split("-loso-", 1)[1]] = path  # .onnx sorts last and wins
    return folds


def score_subject(predicted: dict, truth: dict) -> list[dict]:
    """Per-disc scores; ``predicted`` and ``truth`` map SCT value -> RAS (truth may have 9 etc.)."""
    rows = []
    truth_values = list(truth)
    truth_points = np.array([truth[v] for v in truth_values])
    for value in DISC_VALUES:
        if value not in truth:
            continue
        gt = truth[value]
        pred = predicted.get(value)
        if pred is None:
            rows.append({"value": value, "disc": DISC_NAME_BY_VALUE[value], "error_mm": None,
                         "error_sagittal_mm": None, "identified": False})
            continue
        diff = np.asarray(pred) - gt
        nearest = truth_values[int(np.argmin(np.linalg.norm(truth_points - pred, axis=1)))]
        error = float(np.linalg.norm(diff))
        rows.append({"value": value, "disc": DISC_NAME_BY_VALUE[value], "error_mm": error,
                     "error_sagittal_mm": float(np.linalg.norm(diff[1:])),
                     "identified": bool(error <= IDENTIFICATION_RADIUS_MM and nearest == value),
                     "predicted_ras": [round(float(v), 2) for v in pred],
                     "truth_ras": [round(float(v), 2) for v in gt]})
    return rows


def is_wrong(row: dict) -> bool:
    """Wrong = not identified (missing, off by a level, > 8 mm) or > 5 mm off in the sagittal
    plane.  The lateral component is left out: the annotation follows the cord, not the disc."""
    return not row["identified"] or row["error_sagittal_mm"] is None or \
        row["error_sagittal_mm"] > WRONG_ABOVE_MM


def _review_summary(rows: list[dict]) -> dict:
    """How well the review flags keep their promise, and what a confidence of 0.5 means."""
    scored = [r for r in rows if "flagged" in r]
    if not scored:
        return {}
    wrong = [is_wrong(r) for r in scored]
    silent = [w and not r["flagged"] for w, r in zip(wrong, scored)]
    confident = [not w for w, r in zip(wrong, scored) if (r.get("confidence") or 0) >= 0.5]
    return {
        "silent_errors": int(sum(silent)),
        "silent_error_rate": float(np.mean(silent)),
        "flag_rate": float(np.mean([r["flagged"] for r in scored])),
        "wrong_rate": float(np.mean(wrong)),
        "n_confident": len(confident),
        "correct_when_confident": float(np.mean(confident)) if confident else None,
    }


def _summary(rows: list[dict]) -> dict:
    errors = [r["error_mm"] for r in rows if r["error_mm"] is not None]
    sagittal = [r["error_sagittal_mm"] for r in rows if r["error_sagittal_mm"] is not None]
    return {**_review_summary(rows),
        "n_discs": len(rows),
        "mean_error_mm": float(np.mean(errors)) if errors else None,
        "median_error_mm": float(np.median(errors)) if errors else None,
        "mean_error_sagittal_mm": float(np.mean(sagittal)) if sagittal else None,
        "max_error_mm": float(np.max(errors)) if errors else None,
        "identification_rate": float(np.mean([r["identified"] for r in rows])) if rows else None,
    }


def evaluate(bids, model="compact", model_for_subject=None, subjects=None, contrast="T2w",
             log=print) -> dict:
    """Label every labeled image of a BIDS dataset and score it.

    ``model_for_subject`` maps a subject id to another model (leave-one-subject-out folds);
    subjects not in it use ``model``.  Timing covers labeling only (models loaded, image read).
    """
    model_for_subject = model_for_subject or {}
    labelers = {}

    def labeler_for(sub):
        key = str(model_for_subject.get(sub, model))
        if key not in labelers:
            labelers[key] = DiscLabeler.load(key)
        return labelers[key], key

    per_subject, all_rows, seconds = {}, [], []
    for sub, image, label in find_bids_pairs(bids, contrast):
        if label is None or (subjects and sub not in subjects):
            continue
        truth = read_disc_labels(label, values=range(1, 30))
        if not any(v in truth for v in DISC_VALUES):
            continue
        labeler, key = labeler_for(sub)
        volume = load_volume(image)
        labeler.label(volume)  # warm-up: the first call traces the graph for this image size
        start = time.perf_counter()
        result = labeler.label(volume)
        seconds.append(time.perf_counter() - start)
        predicted = {d.value: d.ras for d in result.discs}
        rows = score_subject(predicted, truth)
        for row, disc in zip(rows, [d for d in result.discs if d.value in truth]):
            row.update(confidence=round(disc.confidence, 3), flagged=disc.flagged, reason=disc.reason)
            row["wrong"] = is_wrong(row)
        all_rows += [dict(r, subject=sub) for r in rows]
        per_subject[sub] = dict(_summary(rows), model=key, image=str(image.name), discs=rows)
        log(f"{sub}: mean {per_subject[sub]['mean_error_mm']:.2f} mm, identified "
            f"{per_subject[sub]['identification_rate']:.2f}, silent errors "
            f"{per_subject[sub].get('silent_errors')} ({key}, {seconds[-1]:.2f} s)")
    summary = _summary(all_rows)
    per_disc = {DISC_NAME_BY_VALUE[v]: _summary([r for r in all_rows if r["value"] == v])
                for v in DISC_VALUES if any(r["value"] == v for r in all_rows)}
    first = next(iter(labelers.values())) if labelers else None
    return dict(summary, n_subjects=len(per_subject),
                seconds_per_case=float(np.median(seconds)) if seconds else None,
                model_parameters=first.parameters if first else None,
                models=sorted(labelers), per_disc=per_disc, per_subject=per_subject)
