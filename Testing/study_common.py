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


def person_correction(markups, image=None):
    """DiscPoints as a person would save them after checking a prediction: the prediction's
    points, with any disc the model left above its upper neighbour moved 6 mm below it and,
    when ``image`` is given, discs outside it removed (the import refuses both)."""
    import numpy as np

    from VertebralLabelingLib import DISC_NAMES, DISC_VALUES
    from VertebralLabelingLib.mri.export import read_markups_json
    from VertebralLabelingLib.mri.labeling import DiscPoint

    value_of = dict(zip(DISC_NAMES, DISC_VALUES))
    discs = []
    for label, ras, _ in read_markups_json(markups):
        ras = np.array(ras, float)
        if discs and ras[2] >= discs[-1].ras[2]:
            ras[2] = discs[-1].ras[2] - 6.0
        discs.append(DiscPoint(value_of[label], label, ras, 1.0))
    if image is not None:
        from VertebralLabelingLib.mri.volume import load_volume

        volume = load_volume(image)
        shape = np.array(volume.array.shape)
        discs = [d for d in discs if np.all((volume.ras_to_index(d.ras)[0] >= 0)
                                            & (volume.ras_to_index(d.ras)[0] <= shape - 1))]
    return discs
