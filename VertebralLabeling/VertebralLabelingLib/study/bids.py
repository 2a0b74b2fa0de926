"""The images of a BIDS dataset (one *item* per image of a contrast) and where each item's
outputs go below the derivative folder (``sub-X/[ses-Y/]anat/<stem><SUFFIX>``)."""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io.files import BIDS_IMAGE_GLOB, DISC_LABEL_SUFFIX

PIPELINE = "vertebral-labeling"
DEFAULT_DERIVATIVE = Path("derivatives") / PIPELINE
SUFFIX_DLABEL = DISC_LABEL_SUFFIX
SUFFIX_MARKUPS = "_discs.mrk.json"
SUFFIX_QC = "_qc.png"
SUFFIX_RECORD = "_discs.json"
SUFFIX_CORRECTED = "_desc-corrected_discs.mrk.json"
_SUBJECT = re.compile(r"^sub-[A-Za-z0-9]+$")


# -- items -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One image of the study and where its outputs go (paths relative to their roots)."""

    subject: str
    session: str  # "" when the dataset has no sessions
    image: Path  # absolute path of the raw image
    rel_dir: Path  # sub-X/[ses-Y/]anat, the same below the derivative folder
    stem: str  # image file name without .nii[.gz]

    @property
    def key(self) -> str:
        """Unique id of the item in the study (used by qc.json): the image stem."""
        return self.stem

    def path(self, deriv: Path, suffix: str) -> Path:
        return Path(deriv) / self.rel_dir / f"{self.stem}{suffix}"


def find_items(bids, contrast: str = "T2w", subjects=None, shard=None) -> list[Item]:
    """Images of ``contrast`` in a BIDS dataset, sorted; optionally a subset.

    ``subjects``: ids with or without the ``sub-`` prefix.  ``shard=(k, n)``: the k-th of n
    disjoint parts (0 <= k < n), subjects dealt round-robin in sorted order, so every image of
    a subject lands in the same shard and the parts have near-equal sizes.
    """
    bids = Path(bids)
    if not bids.is_dir():
        raise InputError(f"BIDS folder not found: {bids}")
    items, keys = [], set()
    for image in walk_files(bids, lambda rel: _SUBJECT.match(rel.parts[0]) is not None,
                            lambda name: fnmatch.fnmatch(name, BIDS_IMAGE_GLOB.format(contrast=contrast))):
        rel = image.relative_to(bids)
        if not _SUBJECT.match(rel.parts[0]) or "derivatives" in rel.parts:
            continue
        session = next((p for p in rel.parts[1:-1] if p.startswith("ses-")), "")
        stem = image.name.split(".nii")[0]
        if stem in keys:  # the same image reached twice (a symlinked folder): label it once
            continue
        keys.add(stem)
        # abspath, not resolve(): symlinked datasets (DataLad, git-annex) keep their own paths
        items.append(Item(rel.parts[0], session, Path(os.path.abspath(image)), rel.parent, stem))
    if not items:
        raise InputError(f"No *_{contrast}.nii[.gz] images found under {bids}/sub-*/.")
    if subjects:
        wanted = {s if s.startswith("sub-") else f"sub-{s}" for s in subjects}
        unknown = wanted - {item.subject for item in items}
        if unknown:
            raise InputError(f"Subjects not in the dataset: {', '.join(sorted(unknown))}")
        items = [item for item in items if item.subject in wanted]
    if shard is not None:
        k, n = shard
        order = sorted({item.subject for item in items})
        mine = set(order[k::n])
        items = [item for item in items if item.subject in mine]
    return items


#: Deepest folder level below the dataset root that is searched for images.
MAX_WALK_DEPTH = 12


def walk_files(root, top_ok, name_ok, max_depth: int = MAX_WALK_DEPTH) -> list[Path]:
    """Files under ``root`` whose name passes ``name_ok``, sorted, each folder visited once.

    Why not ``glob("**")``: it follows symlinked folders without remembering where it has been,
    so a symlink loop in a dataset makes it list one image again and again (or never end).
    Here symlinked folders are followed (DataLad/git-annex datasets use links) but every real
    folder is entered once, and the depth is bounded.  ``top_ok(relative path)`` filters the
    first level (``sub-*``).
    """
    root = Path(root)
    seen, found = set(), []

    def visit(folder: Path, depth: int):
        try:
            stat = folder.stat()
        except OSError:
            return
        if (stat.st_dev, stat.st_ino) in seen or depth > max_depth:
            return
        seen.add((stat.st_dev, stat.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            if depth == 0 and not top_ok(path.relative_to(root)):
                continue
            try:
                is_dir = entry.is_dir()  # follows links; a dangling or looping link is False/raises
            except OSError:
                continue
            if is_dir:
                visit(path, depth + 1)
            elif name_ok(entry.name):
                found.append(path)

    visit(root, 0)
    return sorted(found)


def default_derivative(bids) -> Path:
    return Path(bids) / DEFAULT_DERIVATIVE


def default_qc_file(deriv) -> Path:
    return Path(deriv) / "qc" / "qc.json"
