"""The vertebra refiner's crop geometry (``xray.refine``): crops centred on a vertebra, rotated to
its tilt; targets and outputs map back to the same corners; mirror averaging maps back."""

import numpy as np
import pytest

from VertebralLabelingLib.io.models import Network
from VertebralLabelingLib.xray import data as xray_data
from VertebralLabelingLib.xray import refine


def rotated_box(centre, tilt_deg, width=80.0, height=50.0):
    t = np.radians(tilt_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * [width / 2, height / 2]
    return corners @ rot.T + centre


def test_frame_reads_centre_tilt_and_width():
    centre, tilt, width = refine.frame(rotated_box((200.0, 300.0), 12.0))
    np.testing.assert_allclose(centre, (200, 300))
    assert np.degrees(tilt) == pytest.approx(12.0) and width == pytest.approx(80.0)


def test_crop_shows_the_vertebra_level_and_centred():
    """A bright tilted box in a source image appears as an upright box in the middle of its crop."""
    rows, cols = np.mgrid[0:600, 0:400]
    box = rotated_box((200.0, 300.0), 15.0)
    centre, tilt, width = refine.frame(box)
    t = -tilt
    u = (cols - 200) * np.cos(t) - (rows - 300) * np.sin(t)
    v = (cols - 200) * np.sin(t) + (rows - 300) * np.cos(t)
    source = ((np.abs(u) < 40) & (np.abs(v) < 25)).astype(np.float32)
    crop, matrices = refine.crops(source, box)
    crop = crop[0]
    assert crop.shape == refine.CROP_SHAPE
    ys, xs = np.nonzero(crop > 0.5)
    mid = refine.crop_mid()
    assert abs(xs.mean() - mid[0]) < 1.0 and abs(ys.mean() - mid[1]) < 1.0
    assert np.ptp(xs) + 1 == pytest.approx(refine.CROP_VERTEBRA_WIDTH, abs=2)  # scaled to its width
    assert np.ptp(ys) + 1 == pytest.approx(refine.CROP_VERTEBRA_WIDTH * 50 / 80, abs=2)  # upright


def test_targets_map_back_to_the_corners():
    box = rotated_box((150.0, 220.0), -8.0)
    m = refine.crop_matrix(*refine.frame(box))
    target = refine.targets(xray_data.apply(np.linalg.inv(m), box))
    np.testing.assert_allclose(refine.corners_from_output(target[None], m[None]), box, atol=1e-4)
    local = target.reshape(4, 2) * refine.CORNER_SCALE
    assert np.all(np.abs(local[:, 1]) < refine.CROP_SHAPE[0] / 2)  # inside the crop


class _Fixed(Network):
    """A stand-in network that returns given outputs for the crops and their mirrors."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.seen = []

    def run(self, batch):
        self.seen.append(batch.shape)
        return [self.outputs[: len(batch)]]


def test_mirror_averaging_maps_the_mirrored_answer_back():
    box = rotated_box((150.0, 220.0), 5.0)
    m = refine.crop_matrix(*refine.frame(box))
    target = refine.targets(xray_data.apply(np.linalg.inv(m), box))
    mirrored = target.reshape(4, 2)[[1, 0, 3, 2]].copy()
    mirrored[:, 0] *= -1  # what a perfect network answers on the mirrored crop
    network = _Fixed(np.stack([target, mirrored.ravel()]))
    refiner = refine.Refiner(network, {"tta_flip": True})
    np.testing.assert_allclose(refiner.predict(np.zeros((1,) + refine.CROP_SHAPE)), target[None], atol=1e-6)
    assert network.seen == [(2,) + refine.CROP_SHAPE + (1,)]


def test_refiner_keeps_perfect_corners_and_loads_only_refiners(tmp_path):
    from VertebralLabelingLib.errors import ModelError

    boxes = np.concatenate([rotated_box((200.0, 100.0 + 40 * k), 3.0 * k - 20) for k in range(17)])
    source = np.zeros((900, 400), np.float32)

    class Perfect(Network):
        def run(self, batch):  # the corners the crops were cut around, whatever the pixels
            return [np.array([refine.targets(xray_data.apply(np.linalg.inv(m), box))
                              for m, box in zip(matrices, boxes.reshape(-1, 4, 2))])]

    _, matrices = refine.crops(source, boxes)
    refiner = refine.Refiner(Perfect(), {"tta_flip": False, "passes": 2})
    np.testing.assert_allclose(refiner.refine_source(source, boxes), boxes, atol=1e-3)
    with pytest.raises(ModelError, match="not found"):
        refine.load(tmp_path / "missing.onnx")


def test_heatmap_head_reads_each_corner_at_its_heatmap_peak():
    """The soft-argmax head: a sharp peak of corner k's logits at half-resolution pixel (r, c)
    gives corner k at that pixel's centre, in crop pixels (the peak rows/cols are arbitrary)."""
    keras = pytest.importorskip("keras")
    model = refine.build(head="heatmap")
    names = [layer.name for layer in model.layers]
    after = model.layers[names.index("corner_logits") + 1:]
    rows, cols = refine.CROP_SHAPE[0] // 2, refine.CROP_SHAPE[1] // 2
    logits_in = keras.Input((rows, cols, 4))
    x = logits_in
    for layer in after:
        x = layer(x)
    head = keras.Model(logits_in, x)
    peaks = [(3, 5), (3, 40), (28, 7), (30, 44)]  # TL, TR, BL, BR
    logits = np.zeros((1, rows, cols, 4), np.float32)
    for k, (r, c) in enumerate(peaks):
        logits[0, r, c, k] = 60.0
    out = np.asarray(head(logits)).reshape(4, 2) * refine.CORNER_SCALE + refine.crop_mid()
    np.testing.assert_allclose(out, [(2 * c + 0.5, 2 * r + 0.5) for r, c in peaks], atol=1e-3)


def test_heatmap_refiner_trains_exports_and_loads(tmp_path, capsys):
    """``xray train-refiner --head heatmap`` end to end on a tiny synthetic folder: metadata, the
    Keras file loads without running code, and its ONNX export gives the same corners."""
    from test_xray_train_smoke import synthetic_aasce

    from VertebralLabelingLib import cli

    synthetic_aasce(tmp_path / "aasce")
    out = tmp_path / "models"
    argv = ["xray", "train-refiner", "--data", str(tmp_path / "aasce"), "--out", str(out), "--name", "tiny",
            "--steps", "3", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--head", "heatmap"]
    assert cli.main(argv) == 0
    meta = (out / "tiny.json").read_text()
    assert '"head": "heatmap"' in meta and '"steps": 3' in meta
    crops = np.random.default_rng(0).random((3,) + refine.CROP_SHAPE).astype(np.float32)
    keras_out = refine.Refiner.load(out / "tiny.keras").predict(crops)
    onnx_out = refine.Refiner.load(out / "tiny.onnx").predict(crops)
    np.testing.assert_allclose(onnx_out, keras_out, atol=1e-4)
    local = keras_out.reshape(-1, 4, 2) * refine.CORNER_SCALE  # soft-argmax stays inside the crop
    assert np.all(np.abs(local) <= np.array(refine.CROP_SHAPE[::-1]) / 2)


def test_an_ensemble_averages_its_members_outputs():
    a = np.arange(16, dtype=np.float32).reshape(2, 8) / 10
    b = -np.ones((2, 8), np.float32)
    refiner = refine.Refiner(_Fixed(a), {"tta_flip": False}, members=[_Fixed(b)])
    np.testing.assert_allclose(refiner.predict(np.zeros((2,) + refine.CROP_SHAPE)), (a + b) / 2, atol=1e-7)
    assert len(refiner.networks) == 2 and refiner.network is refiner.networks[0]
