"""The shipped models on the real subjects of ../shared/data/mri/bids.

Two floors that fail when a model regresses:
* leave-one-subject-out: each errsm subject labeled by the bundled fold model that never saw
  it, sctcrop (never used by any fold) by the errsm18 fold -- the honest generalisation check;
* the shipped default model on all subjects (it was trained on them: a sanity floor).
The measured numbers are in the README; the floors leave a margin for CPU nondeterminism.
"""

import pytest

from VertebralLabelingLib.io.models import models_dir
from VertebralLabelingLib.mri.evaluate import evaluate


def fold_models():
    folds = {p.stem.split("-loso-", 1)[1]: p for p in (models_dir() / "loso").glob("*-loso-*.onnx")}
    assert len(folds) == 3, f"bundled fold models missing in {models_dir() / 'loso'}"
    return folds


@pytest.fixture(scope="module")
def loso_metrics(mri_bids):
    folds = fold_models()
    return evaluate(mri_bids, model=folds["sub-errsm18"], model_for_subject=folds, log=print)


@pytest.mark.slow
def test_leave_one_subject_out_accuracy(loso_metrics):
    m = loso_metrics
    print({k: m[k] for k in ("n_discs", "mean_error_mm", "mean_error_sagittal_mm", "identification_rate")})
    assert m["n_subjects"] == 4 and m["n_discs"] == 20
    assert m["mean_error_sagittal_mm"] <= 4.0
    assert m["identification_rate"] >= 0.95


@pytest.mark.slow
def test_shipped_model_on_training_subjects(mri_bids, labeler):
    m = evaluate(mri_bids, model="compact", log=print)
    assert m["mean_error_sagittal_mm"] <= 3.0
    assert m["identification_rate"] >= 0.95
    assert m["model_parameters"] < 400_000
