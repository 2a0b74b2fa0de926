"""The end-vertebra classifier (``xray.ends``): where its crops are, what its training samples
say, and that its readings move the decoded chain onto T1..L5 (``decode_levels(end_readings=)``)."""

import json

import numpy as np
from test_xray_core import _chain_maps, spine_points

from VertebralLabelingLib.xray import data as xray_data
from VertebralLabelingLib.xray import ends, ends_train
from VertebralLabelingLib.xray.decode import decode_levels


def test_chain_frames_put_c7_and_s1_one_pitch_beyond_the_chain():
    pts = spine_points(centre_x=150, top=80, pitch=32)
    frames = ends.chain_frames(pts)
    centres = np.array([f[0] for f in frames])
    assert len(frames) == 19
    np.testing.assert_allclose(centres[1:18], pts.reshape(17, 4, 2).mean(axis=1), atol=1e-9)
    np.testing.assert_allclose(centres[0], centres[1] - (centres[2] - centres[1]), atol=1e-9)  # C7
    np.testing.assert_allclose(centres[18], centres[17] + (centres[17] - centres[16]), atol=1e-9)  # S1


def test_the_crop_is_centred_on_the_candidate_at_its_width():
    pts = spine_points(centre_x=150, top=80, pitch=32).reshape(17, 4, 2)
    centre, tilt, width = ends.chain_frames(pts)[9]
    m = ends.crop_matrix(centre, tilt, width)
    local = xray_data.apply(np.linalg.inv(m), pts[8])  # frame 9 is vertebra index 8 (T9)
    rows, cols = ends.CROP_SHAPE
    np.testing.assert_allclose(local.mean(axis=0), [(cols - 1) / 2, (rows - 1) / 2], atol=1e-6)
    assert abs(np.ptp(local[:, 0]) - ends.CROP_VERTEBRA_WIDTH) < 1e-6  # scaled to its width


def test_training_samples_name_t1_and_l5_only_on_them():
    pts = spine_points(centre_x=320, top=200, pitch=45)
    image = np.zeros((1280, 640), np.uint8)
    rng = np.random.default_rng(0)
    picks = [ends_train.pick_frame(rng) for _ in range(4000)]
    counts = np.bincount(picks, minlength=19)
    assert counts[[0, 1, 17, 18]].min() > 400  # the ends and their outer neighbours are frequent
    assert counts[5:14].min() > 10 and counts.sum() == 4000  # every vertebra appears
    for _ in range(50):
        state = rng.bit_generator.state
        k = ends_train.pick_frame(rng)
        rng.bit_generator.state = state
        crop, target = ends_train.sample(image, pts, rng)
        assert crop.shape == ends.CROP_SHAPE
        assert list(target) == [k == 1, k == 17]


def test_end_readings_move_the_chain_onto_t1_and_flag_a_weak_end():
    """A C7-like peak stronger than L5 and level readings of no weight: without end readings the
    chain starts on C7; readings that say "T1" on the true T1 (and "L5" on L5) put it back, and a
    reader that sees no T1 anywhere leaves the chain's T1 to be checked."""
    pts = spine_points(centre_x=150, top=80, pitch=32)
    heat, offsets, level = _chain_maps(pts, (150, 80 - 32), level_of_extra=-1.0, extra_height=1.0)
    heat[(heat > 0.99)] = 1.0
    l5 = np.unravel_index(np.argmax(heat * (np.arange(heat.shape[0]) > heat.shape[0] * 0.8)[:, None]), heat.shape)
    heat[l5] = 0.9
    true_centres = pts.reshape(17, 4, 2).mean(axis=1)

    def reader(candidates):
        c = np.asarray(candidates).reshape(-1, 4, 2).mean(axis=1)
        near = lambda target: (np.linalg.norm(c - target, axis=1) < 8).astype(float)  # noqa: E731
        return np.stack([near(true_centres[0]), near(true_centres[-1])], axis=1)

    plain = decode_levels(heat, offsets, level, level_weight=0.0)
    assert plain.corners.reshape(17, 4, 2)[0].mean(axis=0)[1] < 80 - 16  # T1 on C7
    decoded = decode_levels(heat, offsets, level, level_weight=0.0, anchor_weight=1.0, end_readings=reader)
    np.testing.assert_allclose(decoded.corners.reshape(17, 4, 2).mean(axis=1), true_centres, atol=1.0)
    assert decoded.anchor_ends.min() == 1.0 and decoded.anchor_rivals.max() == 0.0
    blind = decode_levels(heat, offsets, level, level_weight=0.0, end_readings=lambda c: np.zeros((len(c), 2)))
    assert blind.anchors_disagree() and 0 in blind.uncertain_ends()


def test_train_ends_command_makes_a_loadable_classifier(tmp_path):
    """``xray train-ends`` end to end on a tiny synthetic folder: metadata, readings in [0, 1], and
    its ONNX export reads the same as the Keras file."""
    from test_xray_train_smoke import synthetic_aasce

    from VertebralLabelingLib import cli

    synthetic_aasce(tmp_path / "aasce", n=8)
    out = tmp_path / "models"
    argv = ["xray", "train-ends", "--data", str(tmp_path / "aasce"), "--out", str(out), "--name", "tiny-ends",
            "--steps", "3", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--no-hold-out",
            "--crop", "96", "128", "20"]
    assert cli.main(argv) == 0
    meta = (out / "tiny-ends.json").read_text()
    assert '"task": "xray-end-vertebrae"' in meta and '"steps": 3' in meta and '"held_out_for_choices": 0' in meta
    assert json.loads(meta)["input_shape"] == [96, 128] and json.loads(meta)["crop_vertebra_width"] == 20.0
    candidates = spine_points(centre_x=320, top=200, pitch=45).reshape(17, 4, 2)[:5]
    source = np.random.default_rng(0).random((1280, 640)).astype(np.float32)
    keras_out = ends.EndClassifier.load(out / "tiny-ends.keras").readings(source, candidates)
    onnx_out = ends.EndClassifier.load(out / "tiny-ends.onnx").readings(source, candidates)
    assert keras_out.shape == (5, 2) and np.all((keras_out >= 0) & (keras_out <= 1))
    np.testing.assert_allclose(onnx_out, keras_out, atol=1e-4)


def test_shifted_chain_extrapolates_whole_pitches_beyond_the_ends():
    pts = spine_points(np.linspace(-6, 6, 17), centre_x=150, top=80, pitch=32).reshape(17, 4, 2)
    np.testing.assert_allclose(ends.shifted_chain(pts, 0), pts)
    up = ends.shifted_chain(pts, -1)  # its T1 on C7: one pitch above the old T1, same shape
    np.testing.assert_allclose(up[1:], pts[:-1])
    np.testing.assert_allclose(up[0], pts[0] + (pts[0].mean(axis=0) - pts[1].mean(axis=0)))
    down = ends.shifted_chain(pts, 2)  # its T1 on T3; the last two are S1 and S2
    np.testing.assert_allclose(down[:15], pts[2:])
    step = pts[16].mean(axis=0) - pts[15].mean(axis=0)
    np.testing.assert_allclose(down[15:], [pts[16] + step, pts[16] + 2 * step])


class _ReadsTheTruth:
    """A stand-in end classifier: P(name) = 0.9 on the true vertebra of that name, 0.1 elsewhere
    (whatever the pixels)."""

    def __init__(self, truth, outputs=("T1", "L5")):
        self.outputs = outputs
        self.centres = np.asarray(truth, float).reshape(17, 4, 2).mean(axis=1)

    def readings(self, source, candidates, names=("T1", "L5")):
        c = np.asarray(candidates, float).reshape(-1, 4, 2).mean(axis=1)
        targets = self.centres[[ends.FRAMES[n] - 1 for n in names]]
        return np.where(np.linalg.norm(c[:, None] - targets[None], axis=2) < 4, 0.9, 0.1)


def test_shift_scores_find_the_true_levels_and_a_keep_bonus_can_overrule_them():
    truth = spine_points(centre_x=150, top=80, pitch=32).reshape(17, 4, 2)
    decoded = ends.shifted_chain(truth, 1)  # the decoded "T1" sits on T2
    scores = ends.shift_scores(lambda c: _ReadsTheTruth(truth).readings(None, c), decoded, max_shift=2)
    assert sorted(scores) == [-2, -1, 0, 1, 2]
    shift, margin = ends.choose_shift(scores)
    assert shift == -1 and margin > 4  # both ends read: 2 x (logit 0.9 - logit 0.1)
    np.testing.assert_allclose(ends.shifted_chain(decoded, shift), truth, atol=1e-9)
    kept, support = ends.choose_shift(scores, keep_bonus=margin + 1)
    assert kept == 0 and support < 0  # the bonus kept a chain the classifier reads worse
    three = ("T1", "T12", "L5")  # a classifier that also names T12 adds its vote
    scores3 = ends.shift_scores(lambda c: _ReadsTheTruth(truth, three).readings(None, c, three), decoded, 2, three)
    assert ends.choose_shift(scores3)[0] == -1 and ends.choose_shift(scores3)[1] > margin


def test_the_labeler_moves_a_shifted_chain_and_flags_a_narrow_margin():
    from VertebralLabelingLib.xray.decode import Decoded
    from VertebralLabelingLib.xray.label import XrayLabeler

    truth = spine_points(centre_x=150, top=80, pitch=32).reshape(17, 4, 2)
    identity, source, peaks = np.eye(3), np.zeros((600, 300), np.float32), np.linspace(0.5, 0.9, 17)
    for decoded_shift, margin, flagged in ((-1, 1.0, False), (-1, 100.0, True), (1, 1.0, False)):
        check = ends.ShiftCheck(_ReadsTheTruth(truth), {"max_shift": 1, "review_margin": margin, "flag": "margin"})
        labeler = XrayLabeler(model=None, meta={}, shift_check=check)
        decoded = Decoded(ends.shifted_chain(truth, decoded_shift).reshape(-1, 2), peaks.copy())
        review_ends, shift = labeler.check_shift(decoded, source, identity)
        assert shift == -decoded_shift and bool(review_ends) is flagged
        assert review_ends in ((), (0, 16))  # the shift check names both ends
        np.testing.assert_allclose(decoded.corners.reshape(17, 4, 2), truth, atol=1e-9)
        if shift == 1:  # moved caudally: the extrapolated L5 was not found by the first stage
            assert decoded.peaks[-1] == 0.0
            np.testing.assert_allclose(decoded.peaks[:-1], peaks[1:])
        else:  # moved cranially: the extrapolated T1
            assert decoded.peaks[0] == 0.0
            np.testing.assert_allclose(decoded.peaks[1:], peaks[:-1])
    plain = Decoded(truth.reshape(-1, 2), np.ones(17))
    assert XrayLabeler(model=None, meta={}).check_shift(plain, None, None) == ((), 0)


def test_a_tie_keeps_the_decoded_chain():
    assert ends.choose_shift({-1: 2.0, 0: 2.0, 1: 2.0}) == (0, 0.0)


def test_the_classifier_crops_the_field_of_view_its_metadata_names():
    from VertebralLabelingLib.io.models import Network

    class Columns(Network):
        def __init__(self):
            self.seen = []

        def run(self, batch):
            self.seen.append(batch.shape)
            return [np.tile(np.float32([0.1, 0.2, 0.3]), (len(batch), 1))]

    network = Columns()
    classifier = ends.EndClassifier(network, {"input_shape": [96, 128], "crop_vertebra_width": 20.0,
                                              "tta_flip": False, "outputs": ["T1", "T12", "L5"]})
    boxes = spine_points(centre_x=150, top=80, pitch=32).reshape(17, 4, 2)[:3]
    source = np.zeros((600, 300), np.float32)
    np.testing.assert_allclose(classifier.readings(source, boxes), [[0.1, 0.3]] * 3)  # T1, L5 by default
    np.testing.assert_allclose(classifier.readings(source, boxes, ("T12",)), [[0.2]] * 3)
    assert network.seen == [(3, 96, 128, 1)] * 2
    assert ends.crop_geometry({}) == (ends.CROP_SHAPE, ends.CROP_VERTEBRA_WIDTH)


def test_train_ends_refuses_a_crop_too_small(tmp_path, capsys):
    from VertebralLabelingLib import cli

    argv = ["xray", "train-ends", "--out", str(tmp_path / "m"), "--crop", "16", "160", "28"]
    assert cli.main(argv) != 0
    assert "--crop needs ROWS and COLS of at least 32" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_t12_output_is_trained_on_t12_and_its_neighbours():
    pts = spine_points(centre_x=320, top=200, pitch=45)
    image = np.zeros((1280, 640), np.uint8)
    rng = np.random.default_rng(1)
    three = ("T1", "T12", "L5")
    counts = np.bincount([ends_train.pick_frame(rng, three) for _ in range(3000)], minlength=19)
    assert counts[[11, 12, 13]].min() > 100 and counts[12] > counts[5]
    for _ in range(30):
        state = rng.bit_generator.state
        k = ends_train.pick_frame(rng, three)
        rng.bit_generator.state = state
        _, target = ends_train.sample(image, pts, rng, outputs=three)
        assert list(target) == [k == 1, k == 12, k == 17]
