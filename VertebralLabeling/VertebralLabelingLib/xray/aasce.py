"""The AASCE data set: reading its labels, the fixed patient-level train/validation split, and
a cache of decoded, downsampled training images.

AASCE layout (SpineWeb dataset 16, AASCE 2019 training release)::

    DIR/images/<name>.jpg
    DIR/labels/filenames.csv     one image name a row
    DIR/labels/landmarks.csv     68 x then 68 y, normalised by width / height, no header
    DIR/labels/angles.csv        three Cobb angles (degrees), reference method order
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .cobb import N_POINTS
from .data import INPUT_SHAPE, apply, prepare_input, read_radiograph

#: Validation split: seed and fraction of patients held out.
SPLIT_SEED = 0
VAL_FRACTION = 0.17
# -- training cache and augmentation ---------------------------------------------------------
CACHE_SHAPE = (INPUT_SHAPE[0], INPUT_SHAPE[1] + 128)  # room for shifts/rotations


# -- AASCE labels ----------------------------------------------------------------------------
@dataclass
class AasceSet:
    """An AASCE-layout data set: image folder, names, landmarks (normalised) and angles."""

    images_dir: Path
    names: list
    landmarks: np.ndarray  # (n, 68, 2) x / width, y / height
    angles: np.ndarray | None  # (n, 3) degrees, or None without angles.csv
    #: Names whose labelled chain does not run top to bottom and could not be put in order (see
    #: :func:`repair_order`); filled by ``load_aasce(repair=True)``.
    broken: tuple = ()

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.names[index]

    def indices_of(self, names) -> list:
        where = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in where]
        if missing:
            raise InputError(f"{len(missing)} names are not in filenames.csv, e.g. {missing[0]!r}")
        return [where[n] for n in names]


def load_aasce(images_dir=None, labels_dir=None, data_dir=None, repair: bool = False) -> AasceSet:
    """Read an AASCE-layout folder (see module docstring); ``data_dir`` = parent of both.  With
    ``repair``, chains stored out of order are put in order (:func:`repair_order`) and the ones
    that cannot be are named in ``broken`` (trainers leave them out)."""
    if data_dir is not None:
        images_dir, labels_dir = Path(data_dir) / "images", Path(data_dir) / "labels"
    if images_dir is None or labels_dir is None:
        raise InputError("Give the images and labels folders (or the folder holding both).")
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise InputError(f"No such folder: {folder}")
    for name in ("filenames.csv", "landmarks.csv"):
        if not (labels_dir / name).is_file():
            raise InputError(f"{labels_dir} is not an AASCE label folder: {name} is missing.")
    names = [n.strip().strip('"') for n in (labels_dir / "filenames.csv").read_text().splitlines()]
    names = [n for n in names if n]
    try:
        table = np.loadtxt(labels_dir / "landmarks.csv", delimiter=",", ndmin=2)
    except ValueError as error:
        raise InputError(f"Cannot read {labels_dir / 'landmarks.csv'}: {error}") from error
    if table.shape != (len(names), 2 * N_POINTS):
        raise InputError(f"landmarks.csv has shape {table.shape}; expected ({len(names)}, "
                         f"{2 * N_POINTS}) for {len(names)} file names.")
    landmarks = np.stack([table[:, :N_POINTS], table[:, N_POINTS:]], axis=2)
    angles = None
    if (labels_dir / "angles.csv").is_file():
        angles = np.loadtxt(labels_dir / "angles.csv", delimiter=",", ndmin=2)
        if angles.shape != (len(names), 3):
            raise InputError(f"angles.csv has shape {angles.shape}; expected ({len(names)}, 3).")
    if not repair:
        return AasceSet(images_dir, names, landmarks, angles)
    repaired = [repair_order(points) for points in landmarks]
    broken = tuple(n for n, r in zip(names, repaired) if r is None)
    landmarks = np.stack([p if r is None else r for p, r in zip(landmarks, repaired)])
    return AasceSet(images_dir, names, landmarks, angles, broken)


def order_status(points) -> str:
    """Whether a labelled chain (68 corners) runs top to bottom: "ok"; "rotated" when only its
    last vertebra (L5) is stored above its first (T1) and the other 16 run top to bottom; else
    "broken".

    Why: in 18 of the 481 AASCE training images the top vertebra of the labelled chain is stored
    last, about one level above "T1" (and the "L4" sits where L5 usually is, above the sacrum):
    the labels name every vertebra one level too high there.  In 6 more one vertebra is stored
    somewhere else in the chain.  Trained as they are, they teach the level cues that L5 can be at
    the top of the image; measured as they are, a model that is right looks one level off."""
    y = np.asarray(points, float).reshape(-1, 4, 2).mean(axis=1)[:, 1]
    if np.all(np.diff(y) > 0):
        return "ok"
    if y[-1] < y[0] and np.all(np.diff(y[:-1]) > 0):
        return "rotated"
    return "broken"


def repair_order(points):
    """The chain put top to bottom: a "rotated" chain's last vertebra moved to the front (it is
    T1, and every other vertebra moves down one name); an "ok" chain as it is; None when "broken"."""
    status = order_status(points)
    if status == "broken":
        return None
    chain = np.asarray(points, float).reshape(-1, 4, 2)
    if status == "rotated":
        chain = np.concatenate([chain[-1:], chain[:-1]])
    return chain.reshape(np.shape(points))


def patient_key(name: str) -> str:
    """Images of one patient share a key ('...-162 A AP.jpg', '...-162 B AP.jpg' -> '...-162')."""
    stem = re.sub(r"\.(jpe?g|png)$", "", name, flags=re.IGNORECASE)
    match = re.match(r"^(.*?-\d+)\s+[A-Z]\b", stem)
    return match.group(1) if match else stem


def split_names(names, seed: int = SPLIT_SEED, val_fraction: float = VAL_FRACTION):
    """Fixed patient-level split: (train names, validation names), both in input order.

    Patients (see :func:`patient_key`) are ordered by a seeded hash, and whole patients go to
    validation until it holds ``val_fraction`` of the images, so no patient is in both.
    """
    groups = {}
    for name in names:
        groups.setdefault(patient_key(name), []).append(name)

    def rank(key):
        return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()

    target = int(round(val_fraction * len(names)))
    val = set()
    for key in sorted(groups, key=rank):
        if len(val) >= target:
            break
        val.update(groups[key])
    return [n for n in names if n not in val], [n for n in names if n in val]


def fold_names(train_names, folds: int, fold: int, seed: int = SPLIT_SEED) -> tuple:
    """Patient-level fold ``fold`` of ``folds`` of the training split: (names to fit, names held
    out), both in input order.  Patients are dealt round-robin in their seeded-hash order, so the
    folds are about equal and one patient is never on both sides.  Why: a first stage trained
    without a fold says how its level cues and angles behave on patients it has not seen, and
    choices can be made on those images without the bias of a model that learned them."""
    if not 0 <= fold < folds or folds < 2:
        raise InputError(f"fold must be in 0..{folds - 1} with at least 2 folds (got fold {fold} of {folds})")
    keys = sorted({patient_key(n) for n in train_names},
                  key=lambda k: hashlib.sha256(f"fold{seed}:{k}".encode()).hexdigest())
    held_keys = set(keys[fold::folds])
    held = [n for n in train_names if patient_key(n) in held_keys]
    return [n for n in train_names if patient_key(n) not in held_keys], held


#: How many training images the post-processing and flag choices are made on (``choosing_images``).
CHOOSING_COUNT = 80


def choosing_images(aset: "AasceSet", train_names, count: int = CHOOSING_COUNT) -> list:
    """Indices of the training images that decoding options and flag rules are chosen on:
    ``count`` drawn with seed 0, in file order.  Models trained after those choices were first
    made (the end classifier) leave them out, so that the choices are made on images they
    have not seen."""
    rng = np.random.default_rng(0)
    return sorted(rng.choice(aset.indices_of(train_names), count, replace=False).tolist())


def training_indices(aset: "AasceSet", train_names, hold_out_choosing: bool) -> list:
    """Indices of the training images a model learns from: all of the training split, or (with
    ``hold_out_choosing``) all but the 80 that choices are made on, so those choices are made on
    images the model has not seen; never a chain whose order is broken (``aset.broken``)."""
    broken = set(aset.indices_of(aset.broken))
    indices = [i for i in aset.indices_of(train_names) if i not in broken]
    if not hold_out_choosing:
        return indices
    held = set(choosing_images(aset, train_names))
    return [i for i in indices if i not in held]


def read_names_file(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No such file: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def cache_dataset(aset: AasceSet, indices, cache_dir, log=print, shape=CACHE_SHAPE):
    """Decode, normalise and downsample each image once; return (images uint8, points, sizes).

    images: (n, shape) uint8 (default CACHE_SHAPE); points: (n, 68, 2) in cache-pixel (x, y); sizes (n, 2) = (W, H)
    of the originals.  Stored in ``cache_dir`` as .npy keyed by the file list.
    """
    cache_dir = Path(cache_dir)
    digest = hashlib.sha256(("\n".join(aset.names[i] for i in indices) + f"{tuple(shape)}").encode())
    digest.update(np.ascontiguousarray(aset.landmarks[list(indices)], np.float64).tobytes())  # repaired labels
    key = digest.hexdigest()[:12]
    files = [cache_dir / f"xray_{key}_{part}.npy" for part in ("images", "points", "sizes")]
    if all(f.exists() for f in files):
        return tuple(np.load(f) for f in files)
    cache_dir.mkdir(parents=True, exist_ok=True)
    images = np.zeros((len(indices),) + tuple(shape), np.uint8)
    points = np.zeros((len(indices), N_POINTS, 2), np.float32)
    sizes = np.zeros((len(indices), 2), np.float32)
    for k, index in enumerate(indices):
        radiograph = read_radiograph(aset.image_path(index))
        array, matrix = prepare_input(radiograph, shape)
        images[k] = np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8)
        pix = aset.landmarks[index] * [radiograph.width, radiograph.height]
        points[k] = apply(np.linalg.inv(matrix), pix)
        sizes[k] = (radiograph.width, radiograph.height)
        if log and k % 50 == 0:
            log(f"cached {k + 1}/{len(indices)}")
    for f, arr in zip(files, (images, points, sizes)):
        np.save(f, arr)
    return images, points, sizes
