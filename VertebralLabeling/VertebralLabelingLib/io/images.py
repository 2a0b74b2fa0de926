"""Reading image files safely (NIfTI, NRRD, MHA, DICOM series, 2D pictures) and writing them.

The header (size, voxel size, origin, direction) is checked before any pixel is read, and a
file whose voxel data is cut short is refused; see README "Refused inputs".
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

#: ITK stores physical points in LPS; RAS = LPS_TO_RAS @ LPS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: Largest fraction of non-finite voxels that is silently replaced before we refuse the image.
MAX_NONFINITE_FRACTION = 0.01
# -- limits decided from the header, before any pixel is read (see README "Refused inputs") ----
#: Most voxels along any one axis of a volume.
MAX_SIDE = 4096
#: Most voxels in a volume (2^27: 512 MB as float32; labeling needs about three copies).
MAX_VOXELS = 2 ** 27
#: Voxel sizes (mm) outside this range are header errors, not scans.
MIN_SPACING_MM, MAX_SPACING_MM = 0.01, 50.0
#: Largest field of view along any axis (mm): the midsagittal search samples a 1 mm grid.
MAX_EXTENT_MM = 2000.0
#: Largest coordinate of the origin (mm).
MAX_ORIGIN_MM = 1.0e5
#: Two consecutive DICOM slices further apart than this many times the median spacing mean
#: that slices are missing from the series.
MAX_SLICE_GAP_RATIO = 1.5
#: File name endings of the image formats read here (longest first: ``.nii.gz`` before ``.nii``).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def image_stem(path) -> str:
    """The file name without its image suffix (``sub-01_T2w.nii.gz`` -> ``sub-01_T2w``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def validate_image(image: sitk.Image) -> None:
    """Refuse images the pipeline cannot label, with a message that says why."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"The image has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(colour or vector image); a scalar MRI volume is needed."
        )
    dim = image.GetDimension()
    if dim == 2:
        raise InputError("The image is 2D; a 3D MRI volume (or a sagittal stack) is needed.")
    if dim != 3:
        raise InputError(
            f"The image is {dim}D; a single 3D volume is needed (extract one time point first)."
        )
    if min(image.GetSize()) < 1 or sorted(image.GetSize())[1] < 16:
        raise InputError(f"The image is too small to hold a spine: size {image.GetSize()}.")
    check_geometry(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def check_geometry(size, spacing, origin, direction, max_side: int = MAX_SIDE,
                   max_voxels: int = MAX_VOXELS, what: str = "volume",
                   spacing_range=(MIN_SPACING_MM, MAX_SPACING_MM),
                   max_extent: float = MAX_EXTENT_MM) -> None:
    """Refuse a size or geometry no scan has, from header values alone (no pixel is read).

    Why: a few hundred bytes of header decide how much memory and time reading and labeling
    take (20000 x 20000 voxels, a voxel size of 0 or 1e6 mm).  Checking them before the pixels
    are read turns a size bomb into one clear error instead of gigabytes and minutes.
    """
    size = [int(v) for v in size]
    if any(v > max_side for v in size) or int(np.prod(size, dtype=np.float64)) > max_voxels:
        raise InputError(f"The {what} is too large: size {tuple(size)} (at most {max_side} voxels per "
                         f"axis and {max_voxels:,} in all); crop or resample it first.")
    spacing = np.asarray(spacing, dtype=float)
    low, high = spacing_range
    if not np.all(np.isfinite(spacing)) or np.any(spacing < low) or np.any(spacing > high):
        raise InputError(f"The {what}'s voxel size {tuple(float(v) for v in spacing)} mm is not "
                         f"plausible (each must be between {low} and {high} mm); "
                         "the header is damaged.")
    extent = spacing * np.asarray(size[: len(spacing)], dtype=float)
    if np.any(extent > max_extent):
        raise InputError(f"The {what}'s field of view {tuple(round(float(v)) for v in extent)} mm is "
                         f"larger than {max_extent:.0f} mm; the header is damaged.")
    origin = np.asarray(origin, dtype=float)
    if not np.all(np.isfinite(origin)) or np.any(np.abs(origin) > MAX_ORIGIN_MM):
        raise InputError(f"The {what}'s origin {tuple(float(v) for v in origin)} is not finite or "
                         "not plausible; the header is damaged.")
    n = len(spacing)
    matrix = np.asarray(direction, dtype=float).reshape(n, n)
    if not np.all(np.isfinite(matrix)) or abs(abs(np.linalg.det(matrix)) - 1.0) > 1e-3:
        raise InputError(f"The {what}'s direction matrix is not a rotation; the header is damaged.")


def read_image(path: str | os.PathLike, check=None) -> sitk.Image:
    """Read a file SimpleITK understands, or the first DICOM series in a folder.

    Before any pixel is read, the header (size, voxel size, origin, direction) goes through
    ``check(size, spacing, origin, direction)`` (default: :func:`check_header_3d`), the file's
    data is checked to be complete (a truncated or cut ``.nii[.gz]`` or gzip file, a DICOM
    series with missing slices is refused), and NIfTI voxels that were NaN or infinite on disk
    are remembered in ``image.nonfinite_indices`` -- ITK's NIfTI reader silently turns them into 0.
    """
    path = Path(path)
    check = check or check_header_3d
    if not path.exists():
        raise InputError(f"No such file or folder: {path}")
    try:
        if path.is_dir():
            return _read_dicom_series(path, check)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        check(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
        nonfinite = verify_file_data(path)
        image = reader.Execute()
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputError(f"Cannot read {path}: not an image file SimpleITK can open. {first_line}") from error
    except MemoryError as error:
        raise InputError(f"Cannot read {path}: not enough memory for an image of size "
                         f"{reader.GetSize()}.") from error
    if nonfinite is not None and len(nonfinite):
        image.nonfinite_indices = nonfinite  # SimpleITK images take attributes
    return image


def check_header_3d(size, spacing, origin, direction) -> None:
    """The MRI limits (see :func:`check_geometry`); a 2D image is refused here, unread."""
    if len(size) == 2:
        raise InputError("The image is 2D; a 3D MRI volume (or a sagittal stack) is needed.")
    if len(size) == 3:
        check_geometry(size, spacing, origin, direction)
    elif len(size) > 3:
        check_geometry(size[:3], spacing[:3], origin[:3],
                       np.asarray(direction, float).reshape(len(size), len(size))[:3, :3].ravel())
        if int(np.prod([int(v) for v in size], dtype=np.float64)) > MAX_VOXELS:
            raise InputError(f"The image is too large: size {tuple(size)}.")


def _read_dicom_series(path: Path, check) -> sitk.Image:
    """The first DICOM series of a folder, refused when slices are missing or duplicated.

    Why: GDCM sorts the files by position and ITK stacks them with one spacing; with slices
    missing the volume is silently squeezed (discs land on the wrong levels).  The positions
    come from each file's header (ImagePositionPatient), so the check reads no pixels.
    """
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise InputError(f"No DICOM series found in folder {path}")
    names = reader.GetGDCMSeriesFileNames(str(path), series[0])
    if len(names) > MAX_SIDE:
        raise InputError(f"The DICOM series in {path} has {len(names)} slices (at most {MAX_SIDE}).")
    info = sitk.ImageFileReader()
    info.SetFileName(names[0])
    info.ReadImageInformation()
    size = list(info.GetSize())[:2] + [len(names)]
    check(size, list(info.GetSpacing())[:2] + [1.0], list(info.GetOrigin())[:2] + [0.0], np.eye(3).ravel())
    if len(names) > 2:
        positions = []
        normal = None
        for name in names:
            info.SetFileName(name)
            info.ReadImageInformation()
            keys = set(info.GetMetaDataKeys())
            if "0020|0032" not in keys or "0020|0037" not in keys:
                positions = None
                break
            try:
                position = np.array([float(v) for v in info.GetMetaData("0020|0032").split("\\")])
                if normal is None:
                    cosines = np.array([float(v) for v in info.GetMetaData("0020|0037").split("\\")])
                    normal = np.cross(cosines[:3], cosines[3:6])
            except ValueError:
                positions = None
                break
            positions.append(float(position @ normal))
        if positions:
            gaps = np.diff(np.sort(positions))
            median = float(np.median(gaps))
            if not np.isfinite(median) or median <= 1e-6 or np.min(gaps) < 0.5 * median:
                raise InputError(f"The DICOM series in {path} has duplicate or overlapping slice "
                                 "positions; export one series per folder.")
            if np.max(gaps) > MAX_SLICE_GAP_RATIO * median:
                missing = int(round(float(np.sum(gaps / median - 1))))
                raise InputError(f"The DICOM series in {path} has slices missing (about {missing}; "
                                 f"a gap of {np.max(gaps):.1f} mm where slices are {median:.1f} mm "
                                 "apart); re-export the complete series.")
    reader.SetFileNames(names)
    return reader.Execute()


#: NIfTI datatype code -> (numpy kind, bytes) for the types whose non-finite values we track.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def verify_file_data(path: Path):
    """Check that the file holds all the data its header promises, before pixels are used.

    * any gzip file (``.gz`` or gzip magic): decompressed to the end once, in 4 MB pieces, so a
      truncated stream (EOFError) or a bad CRC is caught -- ITK would return zeros for the rest;
    * NIfTI-1 (``.nii``, ``.nii.gz``): the voxel bytes the header declares (dims x bitpix from
      vox_offset) must be there, and float voxels that are NaN or infinite are located (ITK's
      NIfTI reader silently writes 0 over them).

    Returns the flat (file-order) indices of the non-finite voxels of a float NIfTI, or None.
    Raises InputError for incomplete or corrupt data.
    """
    with open(path, "rb") as handle:
        magic = handle.read(2)
    compressed = magic == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    is_nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if not compressed and not is_nifti:
        return None
    try:
        with opener(path, "rb") as stream:
            nonfinite = _read_nifti_voxels(stream, path) if is_nifti else None
            while stream.read(1 << 22):  # to the end: gzip checks length and CRC there
                pass
    except (EOFError, gzip.BadGzipFile, zlib.error, struct.error) as error:
        raise InputError(f"{path.name} is damaged: its compressed data is truncated or corrupt "
                         f"({error}); copy the file again.") from error
    return nonfinite


def _read_nifti_voxels(stream, path: Path):
    header = stream.read(348)
    if len(header) < 348:
        raise InputError(f"{path.name} is damaged: the NIfTI header is cut short.")
    if struct.unpack("<i", header[:4])[0] == 348:
        order = "<"
    elif struct.unpack(">i", header[:4])[0] == 348:
        order = ">"
    else:
        return None  # NIfTI-2 or not NIfTI: ITK's own checks apply
    dims = struct.unpack(order + "8h", header[40:56])
    datatype, bitpix = struct.unpack(order + "hh", header[70:74])
    pixdim = struct.unpack(order + "8f", header[76:108])
    vox_offset = int(struct.unpack(order + "f", header[108:112])[0]) if header[344:347] == b"n+1" else 0
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]) or bitpix <= 0:
        raise InputError(f"{path.name} is damaged: its NIfTI header declares dimensions {dims}.")
    used = [float(v) for v in pixdim[1:min(ndim, 3) + 1]]
    if not all(np.isfinite(used)) or min(used) <= 0:
        raise InputError(f"{path.name} has voxel size {tuple(used)} in its NIfTI header (each must "
                         "be finite and positive); the header is damaged.")
    n_voxels = int(np.prod([int(d) for d in dims[1:ndim + 1]], dtype=np.int64))
    need = n_voxels * bitpix // 8
    if vox_offset > 348:
        stream.read(vox_offset - 348)
    kind = _NIFTI_FLOATS.get(int(datatype))
    dtype = np.dtype(order + kind) if kind else None
    limit = int(MAX_NONFINITE_FRACTION * n_voxels)
    found, got, carry, index = [], 0, b"", 0
    while got < need:
        chunk = stream.read(min(1 << 22, need - got))
        if not chunk:
            break
        got += len(chunk)
        if dtype is not None:
            buffer = carry + chunk
            count = len(buffer) // dtype.itemsize
            values = np.frombuffer(buffer, dtype, count)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                found.append(bad + index)
                if sum(len(f) for f in found) > limit:
                    raise InputError(f"More than {MAX_NONFINITE_FRACTION:.0%} of the voxels of "
                                     f"{path.name} are NaN or infinite; the volume cannot be labeled.")
            index += count
            carry = buffer[count * dtype.itemsize:]
    if got < need:
        raise InputError(f"{path.name} is damaged: its header declares {need:,} bytes of voxels but "
                         f"the file holds only {got:,} ({got / need:.0%}); the file was cut short.")
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def write_image_atomic(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write an image with SimpleITK atomically (the temp name keeps the real extension)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
