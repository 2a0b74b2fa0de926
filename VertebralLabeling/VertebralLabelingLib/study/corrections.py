"""Human corrections: saving them, recognising them, and turning them into training labels.

A correction is a markups file ``<stem>_desc-corrected_discs.mrk.json`` beside the batch's
``<stem>_discs.mrk.json`` in the derivative folder.  It also carries
``"VertebralLabeling": {"humanCorrected": true, ...}`` at the top level (the markups schema
allows extra properties and Slicer ignores them), so a copied or renamed file is still known
to be a person's work.  Corrections win everywhere afterwards: the study table, the QC page,
``import-corrections``, and the batch never writes or deletes them.  A prediction file the
person edited in place (its hash no longer matches the batch record) counts as a correction too.

``import_corrections`` writes SCT disc-label NIfTI files in the ``derivatives/labels`` layout
(``sub-X/[ses-Y/]anat/<stem>_label-discs_dlabel.nii.gz`` + a JSON sidecar saying where the
label came from), which ``vertebral-labeling train --labels DIR`` reads directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import DISC_NAMES, DISC_VALUES, __version__
from ..errors import InputError
from ..io.files import (
    SOURCE_HUMAN,
    SOURCE_QC_PASS,
    read_json,
    read_qc_marks,
    sha256_file,
    write_json,
)
from ..io.markups import geometry_of, read_disc_points
from ..mri.export import markups_dict, write_disc_label_nifti
from ..mri.labeling import DiscPoint
from ..mri.volume import load_volume
from .bids import SUFFIX_CORRECTED, SUFFIX_DLABEL, SUFFIX_MARKUPS, default_qc_file
from .table import study_entries

CORRECTED_KEY = "VertebralLabeling"
_VALUE_BY_NAME = dict(zip(DISC_NAMES, DISC_VALUES))


def corrected_path(markups_path) -> Path:
    """``<stem>_discs.mrk.json`` -> ``<stem>_desc-corrected_discs.mrk.json`` (same folder)."""
    path = Path(markups_path)
    if path.name.endswith(SUFFIX_CORRECTED):
        return path
    if not path.name.endswith(SUFFIX_MARKUPS):
        raise InputError(f"{path.name} is not a batch markups file (*{SUFFIX_MARKUPS}).")
    return path.with_name(path.name[: -len(SUFFIX_MARKUPS)] + SUFFIX_CORRECTED)


def save_corrected(discs, path, source_image=None, note: str = "") -> Path:
    """Write ``discs`` (DiscPoint list, RAS) as a human-corrected markups file, atomically."""
    data = markups_dict(discs)
    for point in data["markups"][0]["controlPoints"]:
        point["description"] = "checked and corrected by hand"
        point["selected"] = True
    data[CORRECTED_KEY] = {"humanCorrected": True, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "sourceImage": str(source_image) if source_image else "",
                           "note": note, "tool": f"vertebral-labeling {__version__}"}
    write_json(path, data)
    return Path(path)


def is_human_corrected(path) -> bool:
    path = Path(path)
    if path.name.endswith(SUFFIX_CORRECTED):
        return True
    data = read_json(path, {}) or {}
    return bool(isinstance(data, dict) and (data.get(CORRECTED_KEY) or {}).get("humanCorrected"))


def discs_from_markups(path, geometry=None) -> list:
    """DiscPoints (confidence 1, not flagged) from a corrected markups file, validated.

    The file must pass :func:`io.markups.read_disc_points` (markups format, six distinct
    disc labels at most, finite, in cranio-caudal order, inside the image when ``geometry`` is
    given); otherwise InputError says why, and the caller rejects that one image.
    """
    return [DiscPoint(_VALUE_BY_NAME[label], label, np.asarray(ras, float), 1.0)
            for label, ras in read_disc_points(path, geometry)]


def _label_source(item, record, deriv, marks, accept_pass):
    """(markups path, source) to import for an item, or (None, why not)."""
    corrected = item.path(deriv, SUFFIX_CORRECTED)
    if corrected.exists():
        return corrected, SOURCE_HUMAN
    predicted = item.path(deriv, SUFFIX_MARKUPS)
    if predicted.exists():
        written = (record.get("outputs") or {}).get(predicted.name)
        if is_human_corrected(predicted) or (written and sha256_file(predicted) != written):
            return predicted, SOURCE_HUMAN  # edited in place
        if accept_pass and marks.get(item.key) == "pass" and record.get("status") == "ok":
            return predicted, SOURCE_QC_PASS
    return None, "no correction"


def import_corrections(deriv, out, bids=None, contrast="T2w", qc_file=None, accept_pass=False,
                       overwrite=False, log=print, rejected=None) -> list[Path]:
    """Write SCT disc-label NIfTI files (``derivatives/labels`` layout) from the corrections.

    ``accept_pass`` also imports the predictions of images marked *pass* in qc.json (a person
    looked at them and found them right).  Images marked *fail* without a correction are never
    imported.  An existing label file not written by this command is only replaced with
    ``overwrite`` (it may be a manual label).  Returns the written label paths.

    A correction that fails validation (see ``discs_from_markups``) or whose image cannot be
    read is rejected for that image only: logged with the reason, appended to ``rejected`` as
    ``(key, reason)``, and the other images are still imported.
    """
    deriv, out = Path(deriv), Path(out)
    marks = read_qc_marks(qc_file or default_qc_file(deriv))
    jobs = []
    for item, record in study_entries(deriv, bids, contrast):
        source, kind = _label_source(item, record, deriv, marks, accept_pass)
        if source is not None:
            jobs.append((item, source, kind))
    if not jobs:
        raise InputError(f"No corrected markups (*{SUFFIX_CORRECTED}) found in {deriv}"
                         + ("" if accept_pass else " (use --accept-pass to import QC-passed predictions)"))
    written = []
    for item, source, kind in jobs:
        target = out / item.rel_dir / f"{item.stem}{SUFFIX_DLABEL}"
        sidecar = target.with_name(target.name[: -len(".nii.gz")] + ".json")
        ours = (read_json(sidecar, {}) or {}).get("GeneratedBy") == "vertebral-labeling import-corrections"
        if target.exists() and not ours and not overwrite:
            raise InputError(f"{target} exists and was not written by import-corrections (it may be "
                             "a manual label); pass --overwrite to replace it.")
        if not item.image.exists():
            raise InputError(f"Source image of {item.key} not found: {item.image} (pass --bids).")
        try:
            volume = load_volume(item.image)
            discs = discs_from_markups(source, geometry_of(volume))
        except InputError as error:
            log(f"{item.key}: rejected, {error}")
            if rejected is not None:
                rejected.append((item.key, str(error)))
            continue
        write_disc_label_nifti(discs, volume, target)
        write_json(sidecar, {"GeneratedBy": "vertebral-labeling import-corrections",
                             "Source": kind, "Markups": str(source.resolve()),
                             "MarkupsSHA256": sha256_file(source), "Discs": [d.name for d in discs]})
        written.append(target)
        log(f"{item.key}: {kind} -> {target}")
    description = out / "dataset_description.json"
    if not description.exists():
        write_json(description, {"Name": "Disc labels (human corrections of vertebral-labeling)",
                                 "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                                 "GeneratedBy": [{"Name": "vertebral-labeling import-corrections",
                                                  "Version": __version__}]})
    return written


__all__ = ["corrected_path", "save_corrected", "is_human_corrected", "discs_from_markups",
           "import_corrections"]
