"""The synthetic spine generator, the level count from the dens, stress variants, and the
silent-error metrics of evaluate."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from VertebralLabelingLib import DISC_NAMES
from VertebralLabelingLib.mri import synthetic_samples as samples
from VertebralLabelingLib.mri import synthetic_spine as synth
from VertebralLabelingLib.mri.evaluate import _summary, is_wrong
from VertebralLabelingLib.mri.labeling import DiscPoint
from VertebralLabelingLib.mri.level_count import LevelCount, check_level_by_count, count_from_c2
from VertebralLabelingLib.mri.midsagittal import SagittalSlice
from VertebralLabelingLib.mri.stress import make_variant
from VertebralLabelingLib.mri.training.dataset import read_disc_labels


# -- generator ---------------------------------------------------------------------------------
def test_render_is_reproducible_by_seed():
    a = samples.render_sample(np.random.default_rng(7))
    b = samples.render_sample(np.random.default_rng(7))
    c = samples.render_sample(np.random.default_rng(8))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.levels, b.levels, equal_nan=True)
    assert not np.array_equal(a.image, c.image)


def test_anatomy_is_in_cranio_caudal_order_with_dens_on_top():
    for seed in range(10):
        spine = samples.random_spine(np.random.default_rng(seed))
        tips = spine.disc_tips()
        s = [tips[v][2] for v in sorted(tips)]
        assert np.all(np.diff(s) < -5), f"seed {seed}: discs not descending {np.round(s, 1)}"
        gaps = np.linalg.norm(np.diff([tips[v] for v in sorted(tips)], axis=0), axis=1)
        assert gaps.min() > 8 and gaps.max() < 40, f"seed {seed}: spacing {gaps.round(1)}"
        assert spine.dens_tip()[2] > tips[3][2] + 10, "the dens rises above C2/C3"


def test_tissues_at_known_places():
    spine = samples.random_spine(np.random.default_rng(3))
    tips = spine.disc_tips()
    k = 4  # plane index of value 6 (C5/C6)
    nucleus = spine.planes[k] + 0.5 * spine.body_depth[k - 1] * spine.anteriors[k]
    canal = spine.planes[k] - 0.5 * spine.params["canal_ap"] * spine.anteriors[k] + \
        0.5 * (spine.planes[k - 1] - spine.planes[k])
    body = 0.5 * (spine.planes[k] + spine.planes[k + 1]) + 0.5 * spine.body_depth[k] * spine.anteriors[k]
    far = tips[6] + np.array([0.0, 400.0, 0.0])
    tissue = spine.tissue_at(np.array([nucleus, canal, body, far]))
    if spine.disc_thickness[k] > 0:
        assert tissue[0] in (synth.ANNULUS, synth.NUCLEUS)
    assert tissue[1] in (synth.CSF, synth.CORD)
    assert tissue[2] in (synth.MARROW, synth.CORTEX)
    assert tissue[3] == synth.AIR


def test_targets_are_on_the_rendered_discs():
    """A disc target must sit where the rendered slice shows disc tissue next to the canal."""
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(6):
        sample = samples.render_sample(rng, family="T2")
        assert sample.image.shape == (192, 128) and sample.image.dtype == np.float32
        visible = sample.levels[~np.isnan(sample.levels[:, 0])]
        assert np.all((visible >= 0) & (visible < [192, 128]))
        hits += len(visible)
        assert len(sample.discs) >= len(visible)
    assert hits > 6


@pytest.mark.parametrize("family", samples.CONTRAST_FAMILIES)
def test_every_contrast_renders(family):
    sample = samples.render_sample(np.random.default_rng(1), family=family)
    assert np.isfinite(sample.image).all() and sample.image.max() > 0.5


def test_real_chain_shapes_are_scale_free(tmp_path):
    path = tmp_path / "chains.csv"
    path.write_text("subject,contrast,disc,row,col\n" + "".join(
        f"s1,T2w,{d},{200 - 20 * d},{100 + d}\n" for d in range(1, 11)))
    shapes = samples.real_chain_shapes(str(path))
    assert len(shapes) == 1
    values, pts = shapes[0]
    assert values[0] == 2 and np.allclose(np.linalg.norm(np.diff(pts, axis=0), axis=1), 1.0, atol=0.01)


# -- level count from the dens -----------------------------------------------------------------
def _blob_map(shape, points, sigma=1.5):
    r, c = np.mgrid[0:shape[0], 0:shape[1]]
    out = np.zeros(shape)
    for row, col in points:
        out = np.maximum(out, np.exp(-((r - (row - 0.5) / 2) ** 2 + (c - (col - 0.5) / 2) ** 2) / (2 * sigma ** 2)))
    return out


def _plane():
    return SagittalSlice(np.zeros((200, 100)), np.ones((200, 100), bool), np.zeros(3),
                         np.array([0.0, 0.0, -1.0]), np.array([0.0, -1.0, 0.0]))


DISC_ROWS = [60, 78, 96, 114, 132, 150]


def _discs_at(rows, col=40):
    plane = _plane()
    return [DiscPoint(3 + k, DISC_NAMES[k], plane.pixel_to_ras([r, col])[0], 0.9) for k, r in enumerate(rows)]


def test_count_from_dens_numbers_the_discs():
    shape = (100, 50)
    count = count_from_c2(_blob_map(shape, [(r, 40) for r in DISC_ROWS]), _blob_map(shape, [(28, 42)]), 2)
    assert count.anchored and count.levels == [0, 1, 2, 3, 4, 5]
    assert np.allclose(count.discs[:, 0], DISC_ROWS, atol=1.0)


def test_count_skips_a_missed_disc():
    shape = (100, 50)
    rows = [r for r in DISC_ROWS if r != 96]
    count = count_from_c2(_blob_map(shape, [(r, 40) for r in rows]), _blob_map(shape, [(28, 42)]), 2)
    assert count.levels == [0, 1, 3, 4, 5]


def test_chain_one_level_off_is_flagged_everywhere():
    """Per-disc heads that slid one level down (C2-C3 placed on C3/C4 ...) disagree with the
    count from the dens on every disc: all are flagged, none silently wrong."""
    count = LevelCount(np.array([[r, 40.0] for r in DISC_ROWS]), [0, 1, 2, 3, 4, 5], np.array([28.0, 42.0]))
    discs = _discs_at(DISC_ROWS[1:] + [168])
    check_level_by_count(discs, _plane(), count)
    assert all(d.flagged for d in discs)
    assert "counting from C2 puts this disc at C3-C4" in discs[0].reason


def test_agreeing_chain_is_not_flagged_and_no_dens_is():
    count = LevelCount(np.array([[r, 40.0] for r in DISC_ROWS]), [0, 1, 2, 3, 4, 5], np.array([28.0, 42.0]))
    discs = _discs_at(DISC_ROWS)
    check_level_by_count(discs, _plane(), count)
    assert not any(d.flagged for d in discs)
    unanchored = LevelCount(count.discs, [None] * 6, None)
    discs = _discs_at(DISC_ROWS)
    check_level_by_count(discs, _plane(), unanchored)
    assert all("no C2 (dens) in view" in d.reason for d in discs)


def test_disc_off_the_detected_discs_is_flagged():
    count = LevelCount(np.array([[r, 40.0] for r in DISC_ROWS]), [0, 1, 2, 3, 4, 5], np.array([28.0, 42.0]))
    rows = list(DISC_ROWS)
    rows[2] += 7  # 7 mm below its disc
    discs = _discs_at(rows)
    check_level_by_count(discs, _plane(), count)
    assert [d.flagged for d in discs] == [False, False, True, False, False, False]


# -- evaluate metrics ----------------------------------------------------------------------------
def test_silent_error_rate_counts_wrong_unflagged_discs():
    rows = [
        {"identified": True, "error_mm": 1.0, "error_sagittal_mm": 1.0, "flagged": False, "confidence": 0.9},
        {"identified": False, "error_mm": 18.0, "error_sagittal_mm": 18.0, "flagged": False, "confidence": 0.6},
        {"identified": True, "error_mm": 6.0, "error_sagittal_mm": 6.0, "flagged": True, "confidence": 0.2},
        {"identified": True, "error_mm": 2.0, "error_sagittal_mm": 2.0, "flagged": True, "confidence": 0.3},
    ]
    assert [is_wrong(r) for r in rows] == [False, True, True, False]
    summary = _summary(rows)
    assert summary["silent_errors"] == 1 and summary["silent_error_rate"] == 0.25
    assert summary["flag_rate"] == 0.5 and summary["wrong_rate"] == 0.5
    assert summary["n_confident"] == 2 and summary["correct_when_confident"] == 0.5


# -- stress variants ---------------------------------------------------------------------------
def _labeled_subject(mri_bids, sub="sub-errsm20"):
    image = sitk.ReadImage(str(mri_bids / sub / "anat" / f"{sub}_T2w.nii.gz"))
    discs = read_disc_labels(mri_bids / "derivatives" / "labels" / sub / "anat" /
                             f"{sub}_T2w_label-discs_dlabel.nii.gz", values=range(1, 26))
    return image, discs


@pytest.mark.parametrize("kind,dropped", [("fov-c2", set()), ("fov-c3", {3}), ("fov-end-c5", {6, 7, 8, 9})])
def test_field_of_view_variants_drop_the_discs_out_of_view(mri_bids, tmp_path, kind, dropped):
    image, discs = _labeled_subject(mri_bids)
    cropped, _ = make_variant(image, discs, kind)
    from VertebralLabelingLib.mri.stress import labels_in_grid

    sitk.WriteImage(labels_in_grid(discs, cropped), str(tmp_path / "l.nii.gz"))
    kept = read_disc_labels(tmp_path / "l.nii.gz", values=range(1, 26))
    assert set(discs) - set(kept) == dropped
    for value in kept:  # labels stay on their voxel (within half a voxel)
        assert np.linalg.norm(kept[value] - discs[value]) < 0.9


def test_contrast_variants_keep_geometry_and_change_intensities(mri_bids):
    image, discs = _labeled_subject(mri_bids)
    original = sitk.GetArrayFromImage(image).astype(float)
    for kind in ("dark", "t1like", "remap", "noise"):
        new, kept = make_variant(image, discs, kind, seed=1)
        assert new.GetSize() == image.GetSize() and new.GetOrigin() == image.GetOrigin()
        assert kept == discs
        corr = np.corrcoef(original.ravel()[::97], sitk.GetArrayFromImage(new).ravel()[::97])[0, 1]
        assert corr < 0.995, kind
    t1 = sitk.GetArrayFromImage(make_variant(image, discs, "t1like")[0])
    assert np.corrcoef(original.ravel()[::97], t1.ravel()[::97])[0, 1] < 0.5  # fluid became dark


def test_thick_slices_resample_left_right(mri_bids):
    image, discs = _labeled_subject(mri_bids)
    thick, _ = make_variant(image, discs, "thick4")
    assert sorted(thick.GetSpacing())[-1] == pytest.approx(4.0)
    assert sorted(thick.GetSpacing())[:2] == pytest.approx(sorted(image.GetSpacing())[:2])


@pytest.mark.slow
def test_stress_command_writes_an_evaluable_dataset(mri_bids, tmp_path):
    from VertebralLabelingLib.cli import main
    from VertebralLabelingLib.mri.training.dataset import find_bids_pairs

    assert main(["stress", "--bids", str(mri_bids), "--out", str(tmp_path), "--variants", "fov-c3", "dark"]) == 0
    for variant in ("fov-c3", "dark"):
        pairs = find_bids_pairs(tmp_path / variant)
        assert len(pairs) >= 3 and all(label is not None for _, _, label in pairs)
        assert json.loads((tmp_path / variant / "dataset_description.json").read_text())["DatasetType"] == "derived"
    assert main(["stress", "--bids", str(mri_bids), "--out", str(tmp_path), "--variants", "upside-down"]) == 2


# -- the demo input ----------------------------------------------------------------------------
def test_demo_synthetic_volume_is_labeled_by_the_shipped_model(tmp_path):
    """`phantom --synthetic` (the demo's default input) round-trips through a file, and the
    shipped model puts every disc within 3 mm of its known posterior tip (sagittal plane)."""
    from VertebralLabelingLib.cli import main
    from VertebralLabelingLib.mri.labeling import DiscLabeler
    from VertebralLabelingLib.mri.synthetic_samples import synthetic_volume
    from VertebralLabelingLib.mri.volume import load_volume

    path = tmp_path / "demo.nii.gz"
    assert main(["phantom", str(path), "--synthetic"]) == 0
    _, tips = synthetic_volume(seed=0)
    result = DiscLabeler.load("compact").label(load_volume(path))
    errors = [float(np.linalg.norm((d.ras - tips[d.value])[1:])) for d in result.discs]
    assert max(errors) < 3.0, np.round(errors, 1)
    assert [d.name for d in result.discs] == list(DISC_NAMES)
