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
            "--steps", "3", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), "--seed", "1",
            "--anchor-head", "--flip-probability", "0.5", "--augment-strength", "1.3"]
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "5 train, 1 validation" in log and "final step 3" in log
    meta = json.loads((out / "tiny.json").read_text())
    assert meta["steps"] == 3 and meta["seed"] == 1 and meta["task"] == "xray-vertebral-corners"
    assert meta["n_train"] == 5 and len(meta["validation_files"]) == 1
    assert meta["validation_files"][0] in names
    assert meta["augmentation"] == {"flip_probability": 0.5, "strength": 1.3}
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6  # images/points/sizes x train/val
    labeler = XrayLabeler.load(out / "tiny.keras")
    heat, offsets, level, anchors = labeler._network(np.zeros((1, 640, 320, 1), np.float32))
    assert heat.shape == (1, 160, 80, 1) and offsets.shape == (1, 160, 80, 8) and level.shape == (1, 160, 80, 1)
    assert anchors.shape == (1, 160, 80, 2) and np.all((anchors >= 0) & (anchors <= 1))
    assert np.all(np.isfinite(heat)) and np.all(np.isfinite(offsets)) and np.all(np.isfinite(level))
    # training also wrote the ONNX export, recorded in the metadata, with the same outputs
    assert meta["onnx"]["file"] == "tiny.onnx" and "tf2onnx" in meta["onnx"]["versions"]
    exported = XrayLabeler.load(out / "tiny.onnx")
    heat2, offsets2, level2, anchors2 = exported._network(np.zeros((1, 640, 320, 1), np.float32))
    assert np.abs(heat2 - heat).max() <= 1e-4 and np.abs(offsets2 - offsets).max() <= 1e-4
    assert np.abs(level2 - level).max() <= 1e-4 and np.abs(anchors2 - anchors).max() <= 1e-4


@pytest.mark.slow
def test_learning_rate_warms_up_then_follows_the_cosine():
    from VertebralLabelingLib.io.models import import_keras
    from VertebralLabelingLib.xray import train as xray_train

    keras = import_keras()
    schedule, length = xray_train.cosine_schedule(keras, 1e-3, steps=1100)
    lr = [float(schedule(step)) for step in (0, 50, 100, 600, 1100, 5000)]
    assert lr[0] == pytest.approx(1e-5) and lr[1] == pytest.approx(0.505e-3, rel=1e-3)
    assert lr[2] == pytest.approx(1e-3) and lr[3] == pytest.approx(0.51e-3, rel=1e-3)  # half way down
    assert lr[4] == pytest.approx(2e-5) and lr[5] == pytest.approx(2e-5)  # FINAL_LR_FRACTION, then flat
    length.assign(400.0)  # the budget callback shortens the cosine: the end comes at step 500
    assert float(schedule(500)) == pytest.approx(2e-5) and float(schedule(300)) == pytest.approx(0.51e-3, rel=1e-3)


@pytest.mark.slow
def test_training_batches_put_each_centre_on_its_vertebra(tmp_path):
    """The tf.data pipeline yields (x, (heatmap, offsets + mask, level + mask)); the heatmap peaks
    are the vertebra centres of the augmented image, the offsets there point at the corners and
    the level map holds each vertebra's index, top to bottom."""
    import tensorflow as tf

    from VertebralLabelingLib.xray import data as xray_data
    from VertebralLabelingLib.xray import train as xray_train

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3,) + (640, 448)).astype(np.uint8)
    points = np.zeros((3, 68, 2), np.float32)
    for i in range(3):  # 17 boxes down the middle of a 448 x 640 cache image
        for v in range(17):
            x0, y0 = 190 + 4 * i, 40 + 34 * v
            points[i, 4 * v: 4 * v + 4] = [(x0, y0), (x0 + 60, y0), (x0, y0 + 24), (x0 + 60, y0 + 24)]
    dataset = xray_train.make_dataset(tf, images, points, batch_size=2, seed=3, anchors=True)
    x, (heat, offsets, level, anchors) = next(iter(dataset))
    assert x.shape == (2, 640, 320, 1) and heat.shape == (2, 160, 80, 1) and offsets.shape == (2, 160, 80, 9)
    batch = next(xray_train.batches(images, points, 2, seed=3, anchors=True))  # the same first batch, in numpy
    assert np.allclose(batch[0], x.numpy()) and np.allclose(batch[1], heat.numpy())
    heat, offsets, level, anchors = heat.numpy()[0, ..., 0], offsets.numpy()[0], level.numpy()[0], anchors.numpy()[0]
    centres = np.argwhere(heat == 1.0)  # one exact peak per vertebra
    assert len(centres) == 17
    rows_in_order = centres[np.argsort(centres[:, 0])]
    levels = [xray_data.level_of(level[r, c, 0]) for r, c in rows_in_order]
    np.testing.assert_allclose(levels, np.arange(17), atol=1e-5)  # T1 = 0 ... L5 = 16
    assert np.all(level[..., 1] == offsets[..., 8])  # the level is read where the offsets are
    for channel, vertebra in enumerate((0, 16)):  # the anchors peak on the first and last centre
        assert tuple(np.argwhere(anchors[..., channel] == 1.0)[0]) == tuple(rows_in_order[vertebra])
    for row, col in centres:
        assert offsets[row, col, 8] == 1.0  # regression mask at the centre
        corners = offsets[row, col, :8].reshape(4, 2) * xray_data.OFFSET_SCALE + [col * 4 + 1.5, row * 4 + 1.5]
        centre = corners.mean(axis=0)
        assert np.hypot(*(centre - [col * 4 + 1.5, row * 4 + 1.5])) <= 4 * 0.75  # within the cell
        width, height = np.ptp(corners[:, 0]), np.ptp(corners[:, 1])
        assert 30 < width < 120 and 10 < height < 60  # a box's corners, scaled by the augmentation


@pytest.mark.slow
def test_continuing_copies_every_layer_and_grows_new_heads():
    from VertebralLabelingLib.xray import network

    x = np.random.default_rng(0).random((1, 128, 64, 1)).astype(np.float32)
    old = network.build(level_head=False)
    with_level = network.build()
    assert network.copy_shared_weights(old, with_level) > 0  # the level head starts fresh
    for a, b in zip(old(x), with_level(x)[:2]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    again = network.build()
    network.copy_shared_weights(with_level, again)  # a model that has the level head: all of it
    for a, b in zip(with_level(x), again(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    grown = network.add_anchor_head(again)  # the anchor head grows on the same layers
    outputs = grown(x)
    assert len(outputs) == 4 and tuple(outputs[3].shape) == (1, 32, 16, 2)
    for a, b in zip(again(x), outputs[:3]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    anchored = network.build(anchor_head=True)
    assert network.copy_shared_weights(grown, anchored) > network.copy_shared_weights(with_level, again)
    for a, b in zip(outputs, anchored(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(Exception, match="add_anchor_head"):
        network.copy_shared_weights(with_level, network.build(anchor_head=True))


def test_a_fold_run_leaves_its_patients_out_and_says_which(tmp_path):
    from VertebralLabelingLib.xray import aasce
    from VertebralLabelingLib.xray import train as xray_train

    synthetic_aasce(tmp_path / "aasce", n=8)
    data = xray_train._load_data(tmp_path / "aasce", tmp_path / "cache", log=lambda m: None, folds=2, fold=1)
    everyone, _ = aasce.split_names(aasce.load_aasce(data_dir=tmp_path / "aasce").names)
    folds, fold, held = data["held_fold"]
    assert (folds, fold) == (2, 1) and held and set(held) | set(data["train_names"]) == set(everyone)
    assert len(data["images"]) == len(data["train_names"]) == len(everyone) - len(held)
    meta = xray_train._metadata(data, tmp_path, 1, 1.0, 0, 8, 1e-3, "", None, None)
    assert meta["fold"] == {"folds": 2, "fold": 1, "held_out_files": held}


def test_a_run_without_the_choosing_images_says_so(tmp_path, monkeypatch):
    from VertebralLabelingLib.xray import aasce
    from VertebralLabelingLib.xray import train as xray_train

    synthetic_aasce(tmp_path / "aasce", n=8)
    monkeypatch.setattr(aasce, "choosing_images", lambda aset, names: aset.indices_of(names[:2]))
    data = xray_train._load_data(tmp_path / "aasce", tmp_path / "cache", log=lambda m: None, hold_out_choosing=True)
    everyone, _ = aasce.split_names(aasce.load_aasce(data_dir=tmp_path / "aasce").names)
    assert data["train_names"] == everyone[2:] and len(data["images"]) == len(everyone) - 2
    meta = xray_train._metadata(data, tmp_path, 1, 1.0, 0, 8, 1e-3, "", None, None)
    assert meta["held_out_for_choices"] == 2 and "fold" not in meta


def test_the_choosing_images_held_out_do_not_depend_on_broken_labels(tmp_path, monkeypatch):
    """Leaving out broken label chains must not change which images are held out for choices
    (they are drawn from the whole training split, as the benchmarks draw them)."""
    from VertebralLabelingLib.xray import aasce
    from VertebralLabelingLib.xray import train as xray_train

    synthetic_aasce(tmp_path / "aasce", n=8)
    monkeypatch.setattr(aasce, "choosing_images", lambda aset, names: aset.indices_of(names[-2:]))
    real = aasce.load_aasce

    def with_broken(**kwargs):
        aset = real(**kwargs)
        aset.broken = (aasce.split_names(aset.names)[0][0],)
        return aset
    monkeypatch.setattr(aasce, "load_aasce", with_broken)
    data = xray_train._load_data(tmp_path / "aasce", tmp_path / "cache", log=lambda m: None, hold_out_choosing=True)
    everyone, _ = aasce.split_names(real(data_dir=tmp_path / "aasce").names)
    assert data["held_fold"][2] == everyone[-2:]  # the same two, broken chain or not
    assert data["train_names"] == everyone[1:-2]
