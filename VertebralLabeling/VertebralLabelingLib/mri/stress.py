"""Stress variants of a labeled BIDS dataset: the same subjects as a new user's scans might be.

Why: a labeler judged only on the subjects it learned from (or their leave-one-out folds) never
shows how it fails.  Each variant here changes one thing a real scan changes -- contrast
(dark and flat, T1-like with dark CSF, an arbitrary intensity remap), field of view (starting
at C2 or C3, ending at C5), slice thickness (3 and 4 mm) and noise -- and writes a BIDS dataset
with the disc labels carried into the new grid, so ``evaluate`` scores it like any other.
Every variant is reproducible from its seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..io.files import DISC_LABEL_SUFFIX, write_atomic_bytes
from ..io.images import LPS_TO_RAS, write_image_atomic
from .training.dataset import find_bids_pairs, read_disc_labels

VARIANTS = ("dark", "t1like", "remap", "fov-c2", "fov-c3", "fov-end-c5", "thick3", "thick4", "noise")
#: Label values carried into the variants (all discs a label file may hold).
_LABEL_VALUES = tuple(range(1, 26))


def _robust_unit(array):
    lo, hi = np.percentile(array, [1.0, 99.0])
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0, 1.5)


def _body_mask(unit):
    """Inside the body: smoothed signal above a low threshold, holes filled per slice."""
    mask = ndimage.gaussian_filter(unit, 2.0) > 0.08
    return ndimage.binary_closing(mask, iterations=2)


def contrast_variant(array: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """New intensities for one of 'dark', 't1like', 'remap', 'noise' (geometry unchanged)."""
    unit = _robust_unit(array.astype(np.float32))
    if kind == "dark":  # dark, flat and a little noisy: compressed range, steep gamma
        out = 0.05 + 0.3 * unit ** 1.8
        return out + rng.normal(0, 0.012, out.shape)
    if kind == "t1like":  # bright fluid becomes dark inside the body, air stays dark
        return np.where(_body_mask(unit), np.clip(1.15 - unit, 0, None), 0.02 * unit)
    if kind == "remap":  # an arbitrary, non-monotonic intensity curve
        knots = np.linspace(0, 1.5, 9)
        values = rng.uniform(0, 1, len(knots))
        values[0] = 0.0
        return np.interp(unit, knots, values)
    if kind == "noise":
        sigma = 0.08
        return np.sqrt((unit + rng.normal(0, sigma, unit.shape)) ** 2 + rng.normal(0, sigma, unit.shape) ** 2)
    raise InputError(f"Unknown contrast variant {kind!r}")


def _axis_along(image: sitk.Image, ras_axis: int) -> int:
    """Index (x=0, y=1, z=2 in ITK order) of the image axis most aligned with a RAS axis."""
    direction = LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[ras_axis])))


def _s_of_index(image, axis, index):
    point = [0, 0, 0]
    point[axis] = index
    return (LPS_TO_RAS @ np.array(image.TransformContinuousIndexToPhysicalPoint(point)))[2]


def crop_superior_inferior(image: sitk.Image, top_s: float | None, bottom_s: float | None) -> sitk.Image:
    """Keep only the part of the image between two S coordinates (mm)."""
    axis = _axis_along(image, 2)
    size = image.GetSize()[axis]
    s = np.array([_s_of_index(image, axis, i) for i in range(size)])
    keep = np.ones(size, bool)
    if top_s is not None:
        keep &= s <= top_s
    if bottom_s is not None:
        keep &= s >= bottom_s
    idx = np.flatnonzero(keep)
    if len(idx) < 16:
        raise InputError("The cropped field of view would be empty.")
    start = [0, 0, 0]
    extent = list(image.GetSize())
    start[axis], extent[axis] = int(idx[0]), int(idx[-1] - idx[0] + 1)
    return sitk.RegionOfInterest(image, extent, start)


def thick_slices(image: sitk.Image, thickness: float) -> sitk.Image:
    """Resample to ``thickness`` mm along left-right (sagittal slices), averaging each slab."""
    axis = _axis_along(image, 0)
    spacing = list(image.GetSpacing())
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    # FWHM of the slab profile = the slice thickness (numpy axes are ITK axes reversed).
    array = ndimage.gaussian_filter1d(array, thickness / 2.355 / spacing[axis], axis=2 - axis)
    smoothed = sitk.GetImageFromArray(array)
    smoothed.CopyInformation(image)
    new_spacing = list(spacing)
    new_spacing[axis] = thickness
    size = list(image.GetSize())
    size[axis] = max(1, int(round(size[axis] * spacing[axis] / thickness)))
    return sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         new_spacing, image.GetDirection(), 0.0, sitk.sitkFloat32)


def labels_in_grid(discs: dict, reference: sitk.Image) -> sitk.Image:
    """A disc-label image in ``reference``'s grid; discs outside it are dropped."""
    labels = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(reference)
    for value, ras in discs.items():
        index = reference.TransformPhysicalPointToContinuousIndex([float(v) for v in LPS_TO_RAS @ ras])
        index = [int(round(v)) for v in index]
        if all(0 <= i < n for i, n in zip(index, reference.GetSize())):
            labels[index] = int(value)
    return labels


def make_variant(image: sitk.Image, discs: dict, kind: str, seed: int = 0):
    """(new image, discs in view) for one variant of one labeled image."""
    rng = np.random.default_rng(seed)
    if kind in ("dark", "t1like", "remap", "noise"):
        array = sitk.GetArrayFromImage(image)
        out = sitk.GetImageFromArray(contrast_variant(array, kind, rng).astype(np.float32))
        out.CopyInformation(image)
        return out, discs
    if kind in ("thick3", "thick4"):
        return thick_slices(image, float(kind[-1])), discs
    s = {v: p[2] for v, p in discs.items()}
    if 3 not in s or 6 not in s:
        raise InputError("Field-of-view variants need the C2/C3 and C5/C6 labels.")
    if kind == "fov-c2":    # top inside the C2 body: no skull base, no dens
        out = crop_superior_inferior(image, s[3] + 12.0, None)
    elif kind == "fov-c3":  # top inside the C3 body: C2/C3 is gone
        out = crop_superior_inferior(image, s[3] - 5.0, None)
    elif kind == "fov-end-c5":  # bottom inside the C5 body: C5/C6 and below are gone
        out = crop_superior_inferior(image, None, s[6] + 5.0)
    else:
        raise InputError(f"Unknown stress variant {kind!r}; choose from {', '.join(VARIANTS)}")
    return out, discs


def write_stress_dataset(bids_in, out_dir, variants=VARIANTS, seed: int = 0, log=print) -> list:
    """Write one BIDS dataset per variant under ``out_dir/VARIANT``; returns the folders."""
    pairs = [(sub, image, label) for sub, image, label in find_bids_pairs(bids_in) if label]
    if not pairs:
        raise InputError(f"No labeled images under {bids_in}.")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"Unknown stress variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    folders = []
    for kind in variants:
        root = Path(out_dir) / kind
        written = 0
        for n, (sub, image_path, label_path) in enumerate(pairs):
            discs = read_disc_labels(label_path, values=_LABEL_VALUES)
            image = sitk.ReadImage(str(image_path))
            try:
                new, kept = make_variant(image, discs, kind, seed=seed + n)
            except InputError as error:
                log(f"{kind}: {sub} skipped ({error})")
                continue
            rel = image_path.relative_to(bids_in)
            write_image_atomic(new, root / rel)
            stem = image_path.name.split(".nii")[0]
            label_out = root / "derivatives" / "labels" / rel.parent / f"{stem}{DISC_LABEL_SUFFIX}"
            write_image_atomic(labels_in_grid(kept, new), label_out)
            written += 1
        description = {"Name": f"stress variant {kind}", "BIDSVersion": "1.8.0", "DatasetType": "derived",
                       "GeneratedBy": [{"Name": "vertebral-labeling stress", "Description": f"seed {seed}"}]}
        write_atomic_bytes(root / "dataset_description.json", (json.dumps(description) + "\n").encode())
        log(f"{kind}: {written} image(s) -> {root}")
        folders.append(root)
    return folders


def default_out() -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / "vertebral-labeling-stress"
