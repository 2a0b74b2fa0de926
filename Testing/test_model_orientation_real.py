"""The shipped model on a real subject stored in other axis orders, obliquely, and in thick slices.

Users load whatever their scanner wrote: the labeled points must not depend on how the voxels
are stored (same RAS result for every axis order), and must stay on the discs for an oblique
acquisition or a thick-slice sagittal stack.  Ground truth: sub-errsm20's disc labels (RAS).
"""

import numpy as np
import pytest
import SimpleITK as sitk

from VertebralLabelingLib.io.images import read_image
from VertebralLabelingLib.mri.evaluate import score_subject
from VertebralLabelingLib.mri.training.dataset import find_bids_pairs, read_disc_labels
from VertebralLabelingLib.mri.volume import Volume

SUBJECT = "sub-errsm20"


@pytest.fixture(scope="module")
def subject(mri_bids):
    image_path, label_path = next((img, lab) for sub, img, lab in find_bids_pairs(mri_bids)
                                  if sub == SUBJECT)
    return read_image(image_path), read_disc_labels(label_path)


def label_points(labeler, image: sitk.Image) -> dict:
    result = labeler.label(Volume.from_sitk(image))
    return {d.value: d.ras for d in result.discs}


def oblique(image: sitk.Image, degrees) -> sitk.Image:
    """The same anatomy resampled on a rotated 1 mm grid (an oblique acquisition)."""
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*np.deg2rad(degrees))
    direction = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in image.GetSize()]))
    size = [int(s * 1.15) for s in image.GetSize()]
    origin = centre - direction @ ((np.array(size, float) - 1) / 2 * np.array(image.GetSpacing()))
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         image.GetSpacing(), direction.ravel().tolist(), 0.0)


def thick_sagittal(image: sitk.Image, thickness: int) -> sitk.Image:
    """Average ``thickness`` neighbouring sagittal slices into one (a thick-slice 2D stack)."""
    oriented = sitk.DICOMOrient(image, "RAS")
    return sitk.BinShrink(oriented, [thickness, 1, 1])


@pytest.mark.parametrize("order", ["LPS", "RAS", "SAR", "PIR", "ILA"])
def test_same_points_in_every_axis_order(labeler, subject, order):
    image, truth = subject
    reference = label_points(labeler, image)
    other = label_points(labeler, sitk.DICOMOrient(image, order))
    for value, point in reference.items():
        assert np.linalg.norm(other[value] - point) < 0.5, (order, value, other[value], point)
    rows = score_subject(other, truth)
    assert all(r["identified"] for r in rows), rows


@pytest.mark.parametrize("degrees", [(10.0, 0.0, 0.0), (0.0, 8.0, 0.0), (6.0, 0.0, 10.0)])
def test_oblique_acquisition_stays_on_the_discs(labeler, subject, degrees):
    image, truth = subject
    rows = score_subject(label_points(labeler, oblique(image, degrees)), truth)
    assert all(r["identified"] for r in rows), rows
    assert np.mean([r["error_sagittal_mm"] for r in rows]) < 3.0, rows


@pytest.mark.parametrize("thickness", [3, 4])
def test_thick_slice_sagittal_stack(labeler, subject, thickness):
    image, truth = subject
    thick = thick_sagittal(image, thickness)
    assert thick.GetSpacing()[0] == pytest.approx(thickness)
    rows = score_subject(label_points(labeler, thick), truth)
    assert all(r["identified"] for r in rows), rows
    assert np.mean([r["error_sagittal_mm"] for r in rows]) < 3.0, rows
