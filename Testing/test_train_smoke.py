"""`vertebral-labeling train` runs end to end on the real data and writes a loadable model."""

import json

import pytest

from VertebralLabelingLib.cli import main
from VertebralLabelingLib.mri.labeling import DiscLabeler
from VertebralLabelingLib.mri.phantom import make_phantom


@pytest.mark.slow
def test_train_a_few_steps(tmp_path, mri_bids, pam50_dir):
    code = main(["train", "--bids", str(mri_bids), "--pam50", str(pam50_dir), "--out", str(tmp_path),
                 "--steps", "2", "--batch-size", "2", "--phantoms", "1", "--name", "tiny",
                 "--exclude", "sub-errsm22"])
    assert code == 0
    meta = json.loads((tmp_path / "tiny.json").read_text())
    assert meta["training"]["steps_done"] == 2
    assert "sub-errsm22" not in meta["training"]["subjects"]
    assert meta["training"]["seed"] == 0
    assert meta["onnx"]["file"] == "tiny.onnx" and (tmp_path / "tiny.onnx").exists()  # written by train
    assert DiscLabeler.load(tmp_path / "tiny.onnx").label(make_phantom(seed=1)[0]).discs
    labeler = DiscLabeler.load(tmp_path / "tiny.keras")
    volume, _ = make_phantom(seed=1)
    result = labeler.label(volume)
    assert len(result.discs) == 6
