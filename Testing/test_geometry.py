"""Orientation handling and the midsagittal search, on the synthetic phantom (known discs)."""

import numpy as np
import pytest
import SimpleITK as sitk

from VertebralLabelingLib.mri.midsagittal import Midline, estimate_midline, extract_midsagittal
from VertebralLabelingLib.mri.phantom import make_phantom
from VertebralLabelingLib.mri.volume import Volume, load_volume

AXIS_ORDERS = ["RAS", "LPS", "PSR", "PIR", "ASL", "LIP"]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=3, lateral_shift=4.0)


def reoriented(volume: Volume, order: str) -> Volume:
    return Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), order))


def oblique(volume: Volume, degrees=(12.0, 0.0, 8.0)) -> Volume:
    """The same object sampled on a rotated 1 mm grid (an oblique acquisition)."""
    image = volume.to_sitk()
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*np.deg2rad(degrees))
    direction = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    size = [int(s * 1.2) for s in image.GetSize()]
    origin = centre - direction @ (np.array(size, float) - 1) / 2
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), image.GetSpacing(),
                        direction.ravel().tolist(), 0.0)
    return Volume.from_sitk(out)


@pytest.mark.parametrize("order", AXIS_ORDERS)
def test_axis_order_gives_identical_slice_and_mapping(phantom, order):
    volume, discs = phantom
    midline = Midline(offset=4.0)
    reference = extract_midsagittal(volume, midline)
    other = reoriented(volume, order)
    assert not np.allclose(other.ijk_to_ras, volume.ijk_to_ras) or order == "LPS" or order == "RAS"
    plane = extract_midsagittal(other, midline)
    np.testing.assert_allclose(plane.origin, reference.origin, atol=1e-6)
    np.testing.assert_allclose(plane.image, reference.image, atol=1e-4)
    for point in discs.values():
        np.testing.assert_allclose(plane.ras_to_pixel(point), reference.ras_to_pixel(point), atol=1e-6)


@pytest.mark.parametrize("order", AXIS_ORDERS)
def test_index_to_ras_matches_simpleitk(phantom, order):
    volume, _ = phantom
    image = sitk.DICOMOrient(volume.to_sitk(), order)
    other = Volume.from_sitk(image)
    index = (5, 7, 11)
    lps = np.array(image.TransformIndexToPhysicalPoint(index))
    np.testing.assert_allclose(other.index_to_ras(index)[0], lps * [-1, -1, 1], atol=1e-6)


def test_pixel_ras_round_trip(phantom):
    volume, discs = phantom
    plane = extract_midsagittal(volume, Midline(offset=4.0, tilt=0.05))
    for point in discs.values():
        on_plane = plane.pixel_to_ras(plane.ras_to_pixel(point))[0]
        # Only the component along the plane normal may be lost.
        residual = point - on_plane
        assert abs(abs(residual @ plane.normal) - np.linalg.norm(residual)) < 1e-6


@pytest.mark.parametrize("shift,tilt", [(0.0, 0.0), (9.0, 0.0), (-6.0, 0.08), (3.0, -0.1)])
def test_midline_follows_shifted_and_tilted_spine(shift, tilt):
    volume, discs = make_phantom(seed=5, lateral_shift=shift, lateral_tilt=tilt)
    midline = estimate_midline(volume)
    for point in discs.values():
        assert abs(midline.r_at(point[2]) - point[0]) < 1.5, (midline, point)


def test_midline_on_oblique_volume(phantom):
    volume, discs = phantom
    midline = estimate_midline(oblique(volume))
    for point in discs.values():
        assert abs(midline.r_at(point[2]) - point[0]) < 2.0


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_file_formats_round_trip_geometry(tmp_path, phantom, suffix):
    volume, _ = phantom
    other = reoriented(volume, "PSR")
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(other.to_sitk(), str(path))
    loaded = load_volume(path)
    np.testing.assert_allclose(loaded.ijk_to_ras, other.ijk_to_ras, atol=1e-4)
    np.testing.assert_allclose(loaded.array, other.array, atol=1e-5)


def test_dicom_series_folder(tmp_path, phantom):
    volume, _ = phantom
    image = sitk.Cast(sitk.RescaleIntensity(volume.to_sitk(), 0, 1000), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [("0020|000e", series), ("0020|0032", "\\".join(map(str, origin))),
                           ("0020|0037", "\\".join(map(str, direction[0:3] + direction[3:6]))),
                           ("0020|0013", str(k)), ("0008|0060", "MR"), ("0028|0030", "1\\1"),
                           ("0018|0050", "1")]:
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    loaded = load_volume(tmp_path)
    assert loaded.array.shape == volume.array.shape
    np.testing.assert_allclose(loaded.ijk_to_ras, volume.ijk_to_ras, atol=1e-3)


def test_trilinear_sampling_matches_scipy():
    from scipy import ndimage

    from VertebralLabelingLib.mri.volume import trilinear

    rng = np.random.default_rng(0)
    array = rng.random((17, 9, 5)).astype(np.float32)
    # Inside, on the edges and slightly outside (clamped like mode="nearest").
    ijk = rng.uniform(-0.5, 1, (500, 3)) * (np.array(array.shape) - 0.5)
    ijk[:10] = np.array(array.shape) - 1
    ijk[10:20] = 0
    expected = ndimage.map_coordinates(array, ijk.T, order=1, mode="nearest")
    np.testing.assert_allclose(trilinear(array, ijk), expected, atol=1e-5)


def test_trilinear_reads_c_ordered_arrays_and_the_transposed_view_from_sitk():
    """Volume.from_sitk keeps SimpleITK's (k, j, i) memory behind an (i, j, k) view (no copy);
    trilinear must give map_coordinates' values for that layout and for a C-ordered array."""
    from scipy import ndimage

    from VertebralLabelingLib.mri.volume import trilinear

    rng = np.random.default_rng(3)
    array = rng.random((9, 7, 5)).astype(np.float32)
    view = np.transpose(np.ascontiguousarray(np.transpose(array, (2, 1, 0))), (2, 1, 0))
    assert not view.flags.c_contiguous
    ijk = rng.uniform(-1, 9, (500, 3))
    expected = ndimage.map_coordinates(array, ijk.T, order=1, mode="nearest")
    np.testing.assert_allclose(trilinear(array, ijk), expected, atol=1e-5)
    np.testing.assert_allclose(trilinear(view, ijk), expected, atol=1e-5)
    big = rng.random((40, 30, 20)).astype(np.float32)
    volume = Volume.from_sitk(sitk.GetImageFromArray(np.transpose(big, (2, 1, 0)).copy()))
    np.testing.assert_array_equal(volume.array, big)


def _map_coordinates_plane(volume, origin, row, col, shape, displacement, offsets):
    """The plane sampler as it was written by hand: every pixel's RAS point -> voxel index ->
    scipy linear interpolation with clamped edges; outside the volume its minimum."""
    from scipy import ndimage

    rows, cols = np.meshgrid(np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float), indexing="ij")
    if displacement is not None:
        rows, cols = rows + displacement[0], cols + displacement[1]
    grid = origin + rows[..., None] * row + cols[..., None] * col
    normal = np.cross(col, row) / np.linalg.norm(np.cross(col, row))
    total, inside_any = np.zeros(shape), np.zeros(shape, bool)
    for offset in offsets:
        ijk = volume.ras_to_index((grid + offset * normal).reshape(-1, 3))
        inside = np.all((ijk >= -0.5) & (ijk <= np.array(volume.array.shape) - 0.5), axis=1)
        values = ndimage.map_coordinates(volume.array, ijk.T, order=1, mode="nearest")
        total += np.where(inside, values, volume.background).reshape(shape)
        inside_any |= inside.reshape(shape)
    return total / len(offsets), inside_any


@pytest.mark.parametrize("warped", [False, True], ids=["plane", "warped"])
@pytest.mark.parametrize("offsets", [(0.0,), (-1.5, 0.0, 1.5)], ids=["thin", "slab"])
def test_resampled_plane_matches_map_coordinates(warped, offsets):
    """sample_plane (sitk.Resample) against scipy map_coordinates on a random, obliquely placed
    volume cut by an oblique, anisotropic plane, with a displacement field and slab offsets."""
    from scipy import ndimage

    from VertebralLabelingLib.mri.midsagittal import sample_plane

    rng = np.random.default_rng(3)
    array = rng.normal(size=(30, 40, 50)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([1.2, 0.9, 2.5])
    matrix[:3, 3] = [-10.0, 5.0, -30.0]
    volume = Volume(array, matrix)
    plane, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    row, col = plane[:, 0] * 0.8, plane[:, 1] * 1.1
    origin = volume.index_to_ras(np.array([[15.0, 20.0, 25.0]]))[0] - 30 * row - 25 * col
    shape = (60, 50)
    displacement = ndimage.gaussian_filter(rng.normal(size=(2, *shape)), (0, 4, 4)) * 20 if warped else None
    got = sample_plane(volume, origin, row, col, shape, displacement, offsets)
    want, inside = _map_coordinates_plane(volume, origin, row, col, shape, displacement, offsets)
    assert 0.6 < inside.mean() < 0.95  # the plane leaves the volume: the outside matters too
    assert np.array_equal(got.inside, inside)
    assert np.abs(got.image - want).max() <= 1e-5 * np.ptp(array)
    if warped:
        assert np.abs(displacement).max() > 2.0  # a real warp, not a rounding of the plain plane
        plain = sample_plane(volume, origin, row, col, shape, None, offsets)
        assert np.abs(plain.image - got.image).max() > 0.5
