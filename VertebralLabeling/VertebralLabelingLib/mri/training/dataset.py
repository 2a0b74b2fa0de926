"""Training data: reading labeled subjects and generating augmented midsagittal samples.

Only a few labeled subjects exist, so every training sample is a fresh, randomly posed slice
through a 3D volume: the plane is shifted off the midline (slice offset), rotated in and out
of plane, scaled, elastically warped, averaged over a slab (thick slices), cut to a smaller
field of view, and its intensities are re-mapped (gamma, inversion for T1-like contrast, bias
field, noise, blur).  Disc positions are carried through the same transform, so the labels stay
exact.  Synthetic phantoms and the PAM50 template add anatomy the few subjects lack.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ... import DISC_VALUES
from ...errors import InputError
from ...io.files import BIDS_IMAGE_GLOB, DISC_LABEL_SUFFIX, label_is_human, read_qc_marks
from ...io.images import read_image
from ..augment import rotation, smooth_field, to_slice_pixels, visible_or_nan
from ..midsagittal import normalize_intensity, sample_plane
from ..phantom import make_phantom
from ..synthetic_samples import render_sample
from ..volume import Volume, load_volume

#: Every disc below C2 that a label file may hold (C2/C3 = 3 ... L5/S1 = 25): the level-agnostic
#: disc detector learns from all of them.
ALL_DISC_VALUES = tuple(range(3, 26))


@dataclass
class Subject:
    """A volume with ground-truth disc posterior tips (SCT value -> RAS mm)."""

    name: str
    volume: Volume
    discs: dict = field(default_factory=dict)
    image_path: Path | None = None
    label_path: Path | None = None


def read_disc_labels(path: str | os.PathLike, values=DISC_VALUES) -> dict:
    """Read an SCT disc-label image: one (or a few) voxels per value -> mean RAS position."""
    image = read_image(path)
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    geometry = Volume(array=np.zeros((1, 1, 1)), ijk_to_ras=_ijk_to_ras(image))
    discs = {}
    for value in values:
        idx = np.argwhere(np.rint(array) == value)
        if len(idx):
            discs[int(value)] = geometry.index_to_ras(idx).mean(axis=0)
    return discs


def _ijk_to_ras(image: sitk.Image) -> np.ndarray:
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    matrix = np.eye(4)
    flip = np.diag([-1.0, -1.0, 1.0])
    matrix[:3, :3] = flip @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = flip @ np.array(image.GetOrigin(), float)
    return matrix


def find_bids_pairs(bids_dir: str | os.PathLike, contrast: str = "T2w", labels=None):
    """(subject id, image path, disc-label path or None) for every image of the contrast.

    ``labels``: disc-label folders in the ``derivatives/labels`` layout, searched in order with
    the *last* one that has an image's label winning (so ``[<bids>/derivatives/labels,
    corrections]`` lets new corrections override older labels).  Default: the dataset's own
    ``derivatives/labels``.
    """
    bids_dir = Path(bids_dir)
    label_dirs = [Path(d) for d in labels] if labels else [bids_dir / "derivatives" / "labels"]
    pairs = []
    pattern = str(bids_dir / "sub-*" / "**" / BIDS_IMAGE_GLOB.format(contrast=contrast))
    for image in sorted(glob.glob(pattern, recursive=True)):
        image = Path(image)
        rel = image.relative_to(bids_dir)
        stem = image.name.split(".nii")[0]
        found = None
        for folder in label_dirs:
            label = folder / rel.parent / f"{stem}{DISC_LABEL_SUFFIX}"
            if label.exists():
                found = label
        pairs.append((rel.parts[0], image, found))
    return pairs


def load_bids_subjects(bids_dir, contrast: str = "T2w", exclude=(), labels=None, qc=None,
                       log=None) -> list[Subject]:
    """Labeled subjects of a BIDS dataset (those without a disc-label file are skipped).

    ``labels``: see ``find_bids_pairs``.  ``qc``: a qc.json of the study page; images marked
    *fail* there are left out unless their label is a human correction (its sidecar says so).
    """
    marks = read_qc_marks(qc) if qc else {}
    if qc and not Path(qc).exists():
        raise InputError(f"QC file not found: {qc}")
    subjects = []
    for sub, image, label in find_bids_pairs(bids_dir, contrast, labels):
        if label is None or sub in exclude:
            continue
        if marks.get(image.name.split(".nii")[0]) == "fail":
            if not label_is_human(label):
                if log:
                    log(f"{image.name}: marked fail in QC and not corrected, left out")
                continue
        discs = read_disc_labels(label, values=ALL_DISC_VALUES)
        if any(v in discs for v in DISC_VALUES):
            subjects.append(Subject(sub, load_volume(image), discs, image, label))
    if not subjects:
        raise InputError(f"No labeled {contrast} images found under {bids_dir}"
                         + (f" with labels in {', '.join(map(str, labels))}" if labels else "") + ".")
    return subjects


def load_pam50(pam50_dir) -> Subject:
    pam50_dir = Path(pam50_dir)
    volume = load_volume(pam50_dir / "PAM50_small_t2.nii.gz")
    discs = read_disc_labels(pam50_dir / "PAM50_small_label_discPosterior.nii.gz", values=ALL_DISC_VALUES)
    return Subject("PAM50", volume, discs)


def make_phantom_subjects(count: int, seed: int) -> list[Subject]:
    rng = np.random.default_rng(seed)
    subjects = []
    for i in range(count):
        volume, discs = make_phantom(seed=int(rng.integers(1 << 30)),
                                     lateral_shift=rng.uniform(-6, 6), lateral_tilt=rng.uniform(-0.08, 0.08))
        subjects.append(Subject(f"phantom{i}", volume, {v: p for v, p in discs.items() if v in DISC_VALUES}))
    return subjects


# ---------------------------------------------------------------------------------------------
def _midline_of(points: np.ndarray) -> tuple[float, float]:
    if len(points) >= 3 and np.ptp(points[:, 2]) > 20:
        b, a = np.polyfit(points[:, 2], points[:, 0], 1)
        return float(a), float(np.clip(b, -0.3, 0.3))
    return float(points[:, 0].mean()), 0.0


def augmented_sample(subject: Subject, rng: np.random.Generator, shape=(192, 128),
                     strength: float = 1.0, keep_all_discs: bool = False, with_extras: bool = False):
    """One randomly posed and re-contrasted slice of ``subject``.

    Returns ``(image, targets)``: image (H, W) float32 in ~[0, 1.5]; targets (6, 2) pixel
    (row, col) of discs C2-C3..C7-T1, NaN where absent or outside the field of view.
    ``keep_all_discs`` keeps every disc in view (fixed-size regressors need that).
    ``with_extras`` also returns a ``SampleExtras`` for the level-agnostic disc detector: every
    labeled disc in view, and the rows where that list is complete (outside the labeled run a
    real subject has unlabeled discs, so the detector's target is unknown there).
    """
    values = [v for v in DISC_VALUES if v in subject.discs]
    points = np.array([subject.discs[v] for v in values])
    a, b = _midline_of(np.array(list(subject.discs.values())))
    row = np.array([-b, 0.0, -1.0])
    row /= np.linalg.norm(row)
    col = np.array([0.0, -1.0, 0.0])
    normal = np.cross(col, row)
    deg = np.pi / 180 * strength
    rot = (rotation(normal, rng.uniform(-15, 15) * deg) @ rotation(row, rng.uniform(-6, 6) * deg)
           @ rotation(col, rng.uniform(-4, 4) * deg))
    scale = np.exp(rng.uniform(np.log(0.85), np.log(1.2)) * strength)
    row, col, normal = rot @ row * scale, rot @ col * scale, rot @ normal
    if keep_all_discs:
        anchor = points.mean(axis=0) + np.array([0, rng.uniform(-8, 8), rng.uniform(-8, 8)])
        r0, c0 = shape[0] / 2, shape[1] / 2 + 10
    else:
        anchor = points[rng.integers(len(points))] + np.array([0, rng.uniform(-15, 15), rng.uniform(-45, 45)])
        r0, c0 = rng.uniform(0.2, 0.8) * shape[0], rng.uniform(0.3, 0.7) * shape[1]
    anchor[0] = a + b * anchor[2] + rng.normal(0, 1.5) * strength
    origin = anchor - r0 * row - c0 * col
    disp = None
    if rng.random() < 0.5 * strength:
        disp = np.stack([smooth_field(rng, shape, 32, 3.0), smooth_field(rng, shape, 32, 3.0)])
    offsets = (0.0,)
    if rng.random() < 0.25 * strength:
        thick = rng.uniform(2, 5)
        offsets = (-thick / 2, 0.0, thick / 2)
    plane = sample_plane(subject.volume, origin, row, col, shape, disp, offsets)

    targets = np.full((len(DISC_VALUES), 2), np.nan)
    basis = np.stack([row, col, normal], axis=1)
    targets[[DISC_VALUES.index(v) for v in values]] = to_slice_pixels(points, origin, basis, disp)
    inside = plane.inside.copy()
    if not keep_all_discs and rng.random() < 0.45 * strength:  # smaller field of view
        cut = int(rng.uniform(0.15, 0.6) * shape[0])
        if rng.random() < 0.5:
            inside[:cut] = False
        else:
            inside[shape[0] - cut:] = False
    targets = visible_or_nan(targets, inside)
    image = normalize_intensity(plane.image, inside)
    image = _augment_intensity(image, inside, rng, strength)
    if not with_extras:
        return image, targets
    return image, targets, _real_extras(subject, basis, origin, disp, inside)


@dataclass
class SampleExtras:
    """Targets of the level-agnostic outputs: all discs in view, where that list is complete,
    and the dens tip (None = unknown, as for real subjects whose dens is not annotated)."""

    discs: np.ndarray
    disc_rows: tuple = (-np.inf, np.inf)
    anchor: np.ndarray | None = None


def _real_extras(subject, basis, origin, disp, inside) -> SampleExtras:
    values = sorted(v for v in subject.discs if v >= DISC_VALUES[0])
    rcs = to_slice_pixels(np.array([subject.discs[v] for v in values]), origin, basis, disp)
    top = -np.inf if values[0] == DISC_VALUES[0] else rcs[0, 0] - 6.0
    visible = visible_or_nan(rcs, inside)
    return SampleExtras(visible[~np.isnan(visible[:, 0])], (top, rcs[-1, 0] + 6.0), None)


def _augment_intensity(image, inside, rng, strength):
    x = image
    if rng.random() < 0.8 * strength:
        x = np.clip(x, 0, None) ** np.exp(rng.uniform(-0.5, 0.5))
    # Contrast is what a new scan changes most (T1-like, odd protocols): the real subjects are all
    # T2, so more than half of their samples get another contrast, lest fine-tuning on them undo
    # the contrast-agnostic features the synthetic spines taught.
    if rng.random() < 0.3 * strength:  # T1-like: fluid dark, but only inside the body (air stays dark)
        body = ndimage.gaussian_filter(x, 2.0) > rng.uniform(0.05, 0.12)
        x = np.where(body, np.clip(1.15 - x, 0, None), x * 0.3)
    elif rng.random() < 0.45 * strength:  # any intensity curve, monotonic or not (SynthSeg-style)
        knots = np.linspace(0, 1.5, int(rng.integers(4, 10)))
        values = rng.uniform(0, 1, len(knots))
        values[0] = rng.uniform(0, 0.1)
        x = np.interp(x, knots, values)
    if rng.random() < 0.5 * strength:
        x = x * np.exp(smooth_field(rng, x.shape, 48, 0.25))
    if rng.random() < 0.2 * strength:
        x = ndimage.gaussian_filter(x, rng.uniform(0.5, 1.2))
    if rng.random() < 0.6 * strength:
        x = np.abs(x + rng.normal(0, rng.uniform(0, 0.07), x.shape))
    x = x * rng.uniform(0.85, 1.15)
    x = np.where(inside, x, 0.0)
    return x.astype(np.float32)


def negative_sample(rng: np.random.Generator, shape=(192, 128)):
    """An image with no spine (smooth random texture): teaches the network to stay quiet."""
    x = np.abs(smooth_field(rng, shape, rng.choice([4, 8, 16]), 1.0))
    x = x / (x.max() + 1e-6) * rng.uniform(0.5, 1.2) + rng.normal(0, 0.05, shape)
    return np.clip(x, 0, 1.5).astype(np.float32), np.full((len(DISC_VALUES), 2), np.nan)


def heatmap_targets(targets: np.ndarray, shape, stride: int, sigma: float) -> np.ndarray:
    """Gaussian heatmaps (H/stride, W/stride, n_discs) centred on the target pixels."""
    h, w = shape[0] // stride, shape[1] // stride
    rows = (np.arange(h) * stride + (stride - 1) / 2)[:, None]
    cols = (np.arange(w) * stride + (stride - 1) / 2)[None, :]
    maps = np.zeros((h, w, len(targets)), np.float32)
    for k, (r, c) in enumerate(targets):
        if not np.isnan(r):
            maps[..., k] = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma ** 2))
    return maps


class SampleMixer:
    """Draws training samples from real subjects, PAM50, phantoms, synthetic spines, negatives.

    ``draw`` returns ``(image, level targets (6, 2), SampleExtras)``.
    """

    def __init__(self, real, pam50=None, phantoms=(), seed=0, weights=(0.62, 0.13, 0.2, 0.05),
                 synthetic: float = 0.0):
        self.sources = [list(real), [pam50] if pam50 else [], list(phantoms), ["negative"],
                        ["synthetic"] if synthetic > 0 else []]
        shares = [1 - synthetic] * 3 + [1.0]  # negatives keep their share
        w = np.array([wt * share if src else 0.0
                      for wt, share, src in zip(weights, shares, self.sources[:4])] + [synthetic])
        self.weights = w / w.sum()
        self.rng = np.random.default_rng(seed)

    def draw(self, shape, keep_all_discs=False):
        source = self.sources[self.rng.choice(len(self.sources), p=self.weights)]
        item = source[self.rng.integers(len(source))]
        if item == "negative":
            if keep_all_discs:
                return self.draw(shape, keep_all_discs)
            image, targets = negative_sample(self.rng, shape)
            return image, targets, SampleExtras(np.zeros((0, 2)), (-np.inf, np.inf), np.full(2, np.nan))
        if item == "synthetic":
            sample = render_sample(self.rng, shape)
            if keep_all_discs and np.isnan(sample.levels).any():
                return self.draw(shape, keep_all_discs)
            return sample.image, sample.levels, SampleExtras(sample.discs, (-np.inf, np.inf), sample.anchor)
        return augmented_sample(item, self.rng, shape, keep_all_discs=keep_all_discs, with_extras=True)
