"""Export formats: markups JSON (LPS), CSV and disc-label NIfTI in the input's own grid."""

import numpy as np
import pytest
import SimpleITK as sitk

from VertebralLabelingLib.mri import export
from VertebralLabelingLib.mri.labeling import DiscPoint
from VertebralLabelingLib.mri.phantom import make_phantom
from VertebralLabelingLib.mri.volume import Volume, load_volume


def sample_discs():
    return [DiscPoint(3 + k, name, np.array([1.0 + k, -20.0 - k, 30.0 - 17 * k]), 0.9 - 0.1 * k,
                      flagged=k == 5, reason="low confidence" if k == 5 else "")
            for k, name in enumerate(["C2-C3", "C3-C4", "C4-C5", "C5-C6", "C6-C7", "C7-T1"])]


def test_markups_json_round_trip(tmp_path):
    discs = sample_discs()
    export.write_markups_json(discs, tmp_path / "d.mrk.json")
    back = export.read_markups_json(tmp_path / "d.mrk.json")
    assert [b[0] for b in back] == [d.name for d in discs]
    for (_, ras, description), disc in zip(back, discs):
        np.testing.assert_allclose(ras, disc.ras)
        assert f"confidence={disc.confidence:.2f}" in description
    assert "REVIEW: low confidence" in back[5][2]


@pytest.mark.parametrize("order", ["RAS", "PSR", "LIP"])
def test_disc_label_nifti_in_input_grid(tmp_path, order):
    volume, _ = make_phantom(seed=2)
    image = sitk.DICOMOrient(volume.to_sitk(), order)
    reference = Volume.from_sitk(image)
    sitk.WriteImage(image, str(tmp_path / "in.nii.gz"))
    discs = sample_discs()
    export.write_disc_label_nifti(discs, reference, tmp_path / "labels.nii.gz")
    labels = load_volume(tmp_path / "labels.nii.gz")
    assert labels.array.shape == reference.array.shape
    np.testing.assert_allclose(labels.ijk_to_ras, reference.ijk_to_ras, atol=1e-4)
    for disc in discs:
        ijk = np.argwhere(np.rint(labels.array) == disc.value)
        assert len(ijk) == 1
        assert np.linalg.norm(labels.index_to_ras(ijk[0])[0] - disc.ras) <= np.sqrt(3) / 2 + 1e-6


def test_bad_markups_file(tmp_path):
    (tmp_path / "x.mrk.json").write_text("{not json")
    with pytest.raises(Exception, match="Cannot read markups"):
        export.read_markups_json(tmp_path / "x.mrk.json")
