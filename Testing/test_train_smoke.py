"""MRI training: the sample path puts each disc target on its disc (through every augmentation),
and `vertebral-labeling train` runs end to end on the real data and writes a loadable model
whose metadata, outputs and decoded discs are what the labeler expects."""

import json

import numpy as np
import pytest

from VertebralLabelingLib import DISC_NAMES, DISC_VALUES
from VertebralLabelingLib.cli import main
from VertebralLabelingLib.mri import networks
from VertebralLabelingLib.mri.labeling import DiscLabeler
from VertebralLabelingLib.mri.phantom import make_phantom
from VertebralLabelingLib.mri.training import dataset
from VertebralLabelingLib.mri.volume import Volume

BLOB_SIGMA_MM = 1.5


def marker_subject(seed: int) -> dataset.Subject:
    """A phantom's geometry whose only content is a small bright blob on each disc tip: wherever
    the sample path carries a disc's target, the blob must be there in the sampled image."""
    phantom, discs = make_phantom(seed=seed, lateral_shift=3.0, lateral_tilt=0.05, noise=0.0)
    discs = {v: p for v, p in discs.items() if v in DISC_VALUES}
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in phantom.array.shape],
                               indexing="ij"), axis=-1)
    ras = ijk @ phantom.ijk_to_ras[:3, :3].T.astype(np.float32) + phantom.ijk_to_ras[:3, 3].astype(np.float32)
    array = np.zeros(phantom.array.shape, np.float32)
    for point in discs.values():
        array += np.exp(-np.sum((ras - point.astype(np.float32)) ** 2, axis=-1) / (2 * BLOB_SIGMA_MM ** 2))
    return dataset.Subject("markers", Volume(array + 1e-3, phantom.ijk_to_ras), discs)


def test_augmented_targets_land_on_their_discs(monkeypatch):
    """Rotation, scale, elastic warp, thick slabs and cut fields of view move the sampled plane;
    the targets must move with it.  Intensity changes are switched off so the blobs stay visible."""
    monkeypatch.setattr(dataset, "_augment_intensity", lambda image, inside, rng, strength: image)
    monkeypatch.setattr(dataset, "normalize_intensity", lambda image, inside=None: image.astype(np.float32))
    subject = marker_subject(seed=4)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(24):
        image, targets = dataset.augmented_sample(subject, rng, shape=(192, 128), strength=1.0)
        assert targets.shape == (len(DISC_VALUES), 2)
        for row, col in targets[~np.isnan(targets[:, 0])]:
            r, c = int(round(row)), int(round(col))
            window = image[max(r - 4, 0):r + 5, max(c - 4, 0):c + 5]
            if window.max() < 0.1:  # the plane passes beside this blob (lateral jitter, tilt)
                continue
            peak = np.unravel_index(int(np.argmax(window)), window.shape)
            peak_rc = np.array(peak) + [max(r - 4, 0), max(c - 4, 0)]
            assert np.hypot(*(peak_rc - [row, col])) <= 1.5, (row, col, peak_rc)
            assert image[r, c] >= 0.5 * window.max()  # on the blob, not beside it
            checked += 1
    assert checked >= 50  # most discs of most samples are in view and cut by the plane


def test_heatmap_targets_peak_at_the_target():
    targets = np.array([[40.3, 60.8], [np.nan, np.nan], [101.0, 33.0]])
    maps = dataset.heatmap_targets(targets, (192, 128), stride=2, sigma=3.0)
    assert maps.shape == (96, 64, 3) and not maps[..., 1].any()
    for k in (0, 2):
        r, c = np.unravel_index(int(np.argmax(maps[..., k])), maps.shape[:2])
        assert abs(r * 2 + 0.5 - targets[k, 0]) <= 1.0 and abs(c * 2 + 0.5 - targets[k, 1]) <= 1.0


@pytest.mark.slow
def test_train_a_few_steps(tmp_path, mri_bids, pam50_dir):
    code = main(["train", "--bids", str(mri_bids), "--pam50", str(pam50_dir), "--out", str(tmp_path),
                 "--steps", "2", "--batch-size", "2", "--phantoms", "1", "--name", "tiny",
                 "--exclude", "sub-errsm22"])
    assert code == 0
    meta = json.loads((tmp_path / "tiny.json").read_text())
    assert meta["training"]["steps_done"] == 2
    assert "sub-errsm22" not in meta["training"]["subjects"] and meta["training"]["subjects"]
    assert meta["training"]["seed"] == 0 and np.isfinite(meta["training"]["final_loss"])
    assert meta["architecture"] == "compact" and meta["name"] == "tiny"
    assert meta["discs"] == list(DISC_NAMES)
    assert meta["outputs"] == list(DISC_NAMES) + list(networks.EXTRA_OUTPUTS)
    assert meta["onnx"]["file"] == "tiny.onnx" and (tmp_path / "tiny.onnx").exists()  # written by train
    assert meta["onnx"]["outputs"][0]["shape"][-1] == len(meta["outputs"])
    volume, truth = make_phantom(seed=1)
    results = {}
    for suffix in ("keras", "onnx"):
        labeler = DiscLabeler.load(tmp_path / f"tiny.{suffix}")
        assert labeler.model.output_channels == [len(meta["outputs"])]
        results[suffix] = labeler.label(volume)
    keras_result, onnx_result = results["keras"], results["onnx"]
    # Every level comes back once, cranial to caudal, with a finite position inside the volume.
    assert [d.name for d in keras_result.discs] == list(DISC_NAMES)
    assert [d.value for d in keras_result.discs] == list(DISC_VALUES)
    lo, hi = volume.corners_ras().min(axis=0), volume.corners_ras().max(axis=0)
    for disc in keras_result.discs:
        assert np.all(np.isfinite(disc.ras)) and np.all(disc.ras >= lo - 1) and np.all(disc.ras <= hi + 1)
        assert 0.0 <= disc.confidence <= 1.0
    # The exported model decodes to the same discs as its Keras source.
    for a, b in zip(keras_result.discs, onnx_result.discs):
        assert a.name == b.name and np.allclose(a.ras, b.ras, atol=0.5)
    assert set(truth) >= set(DISC_VALUES)
