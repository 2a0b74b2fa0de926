"""Helpers shared by the study-workflow tests (Testing/test_study_*.py)."""

from pathlib import Path

from conftest import REPO, require_path

FOLD_MODEL = REPO / "VertebralLabeling" / "Resources" / "Models" / "loso" / "compact-loso-sub-errsm18.onnx"
SUBJECTS = ("sub-errsm18", "sub-errsm20", "sub-errsm22", "sub-sctcrop")


def fold_model() -> Path:
    """A bundled leave-one-subject-out model: fixed, so the tests do not move with retraining."""
    return require_path(FOLD_MODEL)


def run_cli(*args) -> int:
    from VertebralLabelingLib.cli import main

    return main([str(a) for a in args])


def batch(bids, deriv, *extra) -> int:
    return run_cli("batch", "--bids", bids, "--out", deriv, "--model", fold_model(), *extra)
