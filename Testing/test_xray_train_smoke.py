"""``vertebral-labeling xray train`` end to end on a tiny synthetic AASCE-layout folder: the
cache, the patient-level split, a few training steps, checkpoint metadata, and a model that the
labeler loads and runs."""

import json

import numpy as np
import pytest
from PIL import Image

from VertebralLabelingLib import cli
from VertebralLabelingLib.xray.label import XrayLabeler


def synthetic_aasce(root, n=6, seed=0):
    """n radiograph-like images (bright vertebra blocks on noise) with AASCE label tables."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    names, rows = [], []
    for i in range(n):
        h, w = int(rng.integers(900, 1100)), int(rng.integers(320, 420))
        image = rng.normal(60, 10, (h, w))
        pts = []
        for v in range(17):
            cx, cy = w / 2 + 20 * np.sin(v / 3 + i), 60 + v * (h - 120) / 17
            x0, x1, y0, y1 = cx - 30, cx + 30, cy - 18, cy + 18
            image[int(y0):int(y1), int(x0):int(x1)] += 120
            pts += [(x0, y0), (x1, y0), (x0, y1), (x1, y1)]
        pts = np.array(pts)
        name = f"synthetic-{i} A AP.jpg"  # spaces, as in AASCE
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / name)
        names.append(name)
        rows.append(np.concatenate([pts[:, 0] / w, pts[:, 1] / h]))
    np.savetxt(root / "labels" / "landmarks.csv", np.array(rows), delimiter=",")
    (root / "labels" / "filenames.csv").write_text("\n".join(names) + "\n")
    return names


@pytest.mark.slow
def test_train_command_makes_a_loadable_model(tmp_path, capsys):
    names = synthetic_aasce(tmp_path / "aasce")
    out = tmp_path / "models"
    argv = ["xray", "train", "--data", str(tmp_path / "aasce"), "--out", str(out), "--name", "tiny",
            "--steps", "3", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), "--seed", "1"]
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "5 train, 1 validation" in log and "final step 3" in log
    meta = json.loads((out / "tiny.json").read_text())
    assert meta["steps"] == 3 and meta["seed"] == 1 and meta["task"] == "xray-vertebral-corners"
    assert meta["n_train"] == 5 and len(meta["validation_files"]) == 1
    assert meta["validation_files"][0] in names
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6  # images/points/sizes x train/val
    labeler = XrayLabeler.load(out / "tiny.keras")
    heat, offsets = labeler._network(np.zeros((1, 640, 320, 1), np.float32))
    assert heat.shape == (1, 160, 80, 1) and offsets.shape == (1, 160, 80, 8)
    assert np.all(np.isfinite(heat)) and np.all(np.isfinite(offsets))
    # training also wrote the ONNX export, recorded in the metadata, with the same outputs
    assert meta["onnx"]["file"] == "tiny.onnx" and "tf2onnx" in meta["onnx"]["versions"]
    exported = XrayLabeler.load(out / "tiny.onnx")
    heat2, offsets2 = exported._network(np.zeros((1, 640, 320, 1), np.float32))
    assert np.abs(heat2 - heat).max() <= 1e-4 and np.abs(offsets2 - offsets).max() <= 1e-4
