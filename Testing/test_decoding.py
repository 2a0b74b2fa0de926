"""The joint disc decoder on synthetic heatmaps with known answers."""

import numpy as np
import pytest

from VertebralLabelingLib.mri.labeling import decode_chain

STRIDE = 2


def blob(shape, row, col, peak, sigma=1.5):
    r, c = np.mgrid[0:shape[0], 0:shape[1]]
    cr, cc = (row - 0.5) / STRIDE, (col - 0.5) / STRIDE
    return peak * np.exp(-((r - cr) ** 2 + (c - cc) ** 2) / (2 * sigma ** 2))


def heatmaps(shape, responses):
    """responses[k] = list of (row, col, peak) in input pixels for channel k."""
    maps = np.zeros(shape + (len(responses),))
    for k, items in enumerate(responses):
        for row, col, peak in items:
            maps[..., k] = np.maximum(maps[..., k], blob(shape, row, col, peak))
    return maps


TRUE_ROWS = [30, 48, 66, 84, 102, 120]


def test_clean_heatmaps_give_top_peaks():
    maps = heatmaps((80, 40), [[(r, 40, 0.8)] for r in TRUE_ROWS])
    positions, peaks, top_ratio = decode_chain(maps, STRIDE)
    np.testing.assert_allclose(positions[:, 0], TRUE_ROWS, atol=0.6)
    assert (top_ratio == 1.0).all() and (peaks > 0.7).all()


def test_channel_firing_on_neighbour_is_resolved():
    # C7-T1's strongest response sits on C6-C7; its true disc has a weaker peak.
    responses = [[(r, 40, 0.8)] for r in TRUE_ROWS]
    responses[5] = [(84, 40, 0.6), (120, 40, 0.35)]
    positions, peaks, top_ratio = decode_chain(heatmaps((80, 40), responses), STRIDE)
    np.testing.assert_allclose(positions[:, 0], TRUE_ROWS, atol=0.6)
    assert top_ratio[5] == pytest.approx(0.35 / 0.6, abs=0.05) and (top_ratio[:5] == 1.0).all()


def test_small_field_of_view_leaves_missing_discs_out():
    # Only C3-C4 and C4-C5 are in view; the other channels have weak, misplaced responses.
    responses = [[(10, 20, 0.1)], [(20, 22, 0.6)], [(37, 24, 0.65)], [(37, 24, 0.5)],
                 [(20, 22, 0.12)], [(36, 24, 0.11)]]
    positions, peaks, _ = decode_chain(heatmaps((30, 30), responses), STRIDE)
    np.testing.assert_allclose(positions[1:3, 0], [20, 37], atol=0.6)
    assert peaks[1] > 0.5 and peaks[2] > 0.5
    assert peaks[0] == 0 and (peaks[3:] == 0).all()


# -- contrast test-time augmentation ---------------------------------------------------------------
def test_inverting_inside_the_body_keeps_the_air_dark():
    from VertebralLabelingLib.mri.labeling import invert_inside_body

    image = np.zeros((1, 64, 48), np.float32)
    image[0, 16:48, 12:36] = 0.2  # "tissue"
    image[0, 28:36, 20:28] = 1.0  # "fluid", bright as in T2
    out = invert_inside_body(image)
    assert out[0, 0, 0] == 0.0 and out[0, 60, 2] == 0.0  # air stays dark
    assert out[0, 32, 24] < 0.2 < out[0, 20, 14]  # fluid now darker than tissue, as in T1


@pytest.mark.parametrize("acquired, inverted, chosen", [
    (0.8, 0.6, "acquired"),   # the acquired contrast is surer
    (0.35, 0.45, "acquired"),  # both unsure: the contrast is not changed on two low guesses
    (0.35, 0.7, "inverted"),  # confident only once inverted (a T1-like scan)
])
def test_contrast_tta_takes_the_inverted_run_only_when_confident(monkeypatch, acquired, inverted, chosen):
    from VertebralLabelingLib.mri import labeling

    labeler = labeling.DiscLabeler.__new__(labeling.DiscLabeler)
    labeler.meta = {}
    images = np.full((3, 64, 48), 0.5, np.float32)
    # the network sees the three acquired slices, then the three inverted ones
    labeler._forward = lambda batch: np.concatenate([np.full((3, 4, 4, 8), acquired), np.full((3, 4, 4, 8), inverted)])
    monkeypatch.setattr(labeling.DiscLabeler, "_decode_compact", staticmethod(
        lambda heatmaps, stride: ("positions", np.full((3, 6), heatmaps.max()), np.ones(6), None)))
    run = labeler._run_compact(images)
    assert run[1].max() == (acquired if chosen == "acquired" else inverted)
