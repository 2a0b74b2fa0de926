"""The study table ``discs.csv`` (one row per disc, corrections first) and the list of labeled
items read back from a derivative folder (the QC page, the Slicer study panel)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from .. import DISC_NAMES, DISC_VALUES
from ..errors import InputError
from ..io.files import read_json, read_qc_marks, write_atomic_bytes
from ..io.markups import read_disc_points
from .bids import SUFFIX_CORRECTED, SUFFIX_RECORD, Item, default_qc_file, find_items, walk_files

TABLE_NAME = "discs.csv"
TABLE_COLUMNS = ("subject", "session", "image", "disc", "value", "R", "A", "S", "confidence",
                 "flagged", "reason", "source", "model_version", "status", "qc", "error")


# -- the study table -------------------------------------------------------------------------
def corrected_discs(item: Item, deriv, record=None):
    """(label, RAS) pairs of the human-corrected markups of an item, or None when there is none.

    Validated (markups format and anatomy, see ``io.markups``; inside the image when the
    record holds its geometry): InputError with the reason when the correction is unusable.
    """
    path = item.path(deriv, SUFFIX_CORRECTED)
    if not path.exists():
        return None
    return read_disc_points(path, (record or {}).get("geometry"))


def write_table(bids, deriv, contrast="T2w", qc_file=None, log=None) -> Path:
    """(Re)build ``discs.csv`` from the item records: corrected points win over predictions.

    A correction that fails validation gives one row with status ``correction-rejected`` and
    the reason (also sent to ``log``); the other images are unaffected.
    """
    deriv = Path(deriv)
    marks = read_qc_marks(qc_file or default_qc_file(deriv))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for item in find_items(bids, contrast):
        record = read_json(item.path(deriv, SUFFIX_RECORD))
        if not isinstance(record, dict):
            continue
        base = {"subject": item.subject, "session": item.session, "image": record.get("image", ""),
                "model_version": record.get("model_version", ""), "qc": marks.get(item.key, ""),
                "status": record.get("status", ""), "error": record.get("error", "")}
        try:
            corrected = corrected_discs(item, deriv, record)
        except InputError as error:
            corrected = None
            base.update(status="correction-rejected", error=str(error))
            if log:
                log(f"{item.key}: correction rejected, {error}")
            writer.writerow([base[c] if c in base else "" for c in TABLE_COLUMNS])
            continue
        if corrected is not None:
            value_of = dict(zip(DISC_NAMES, DISC_VALUES))
            for label, ras in corrected:
                writer.writerow(_row(base, label, value_of[label], ras, "", 0, "", "corrected"))
        elif record.get("status") == "ok" and isinstance(record.get("discs"), list):
            for d in record["discs"]:
                writer.writerow(_row(base, d["name"], d["value"], d["ras"], f"{d['confidence']:.3f}",
                                     int(d["flagged"]), d["reason"], "model"))
        else:
            writer.writerow([base[c] if c in base else "" for c in TABLE_COLUMNS])
    path = deriv / TABLE_NAME
    write_atomic_bytes(path, buffer.getvalue().encode())
    return path


def _row(base, name, value, ras, confidence, flagged, reason, source):
    values = dict(base, disc=name, value=value, R=f"{ras[0]:.2f}", A=f"{ras[1]:.2f}",
                  S=f"{ras[2]:.2f}", confidence=confidence, flagged=flagged, reason=reason,
                  source=source)
    return [values.get(c, "") for c in TABLE_COLUMNS]


def study_entries(deriv, bids=None, contrast="T2w"):
    """Every item that has a record in ``deriv``: (Item, record) pairs, sorted by key.

    Works from the derivative folder alone (the Slicer study panel, the QC page): the raw image
    path comes from the record (relative to ``bids`` when given, else as recorded).
    """
    deriv = Path(deriv)
    if bids is None and deriv.resolve().parent.name == "derivatives" and \
            (deriv.resolve().parent.parent / "dataset_description.json").exists():
        bids = deriv.resolve().parent.parent  # the default place: BIDS/derivatives/NAME
    if bids is None:
        description = read_json(deriv / "dataset_description.json", {}) or {}
        sources = description.get("SourceDatasets") or [{}]
        url = sources[0].get("URL", "")
        if url.startswith("file://"):
            bids = Path(unquote(urlparse(url).path))
    entries = []
    for path in walk_files(deriv, lambda rel: rel.parts[0].startswith("sub-"),
                           lambda name: name.endswith(f"_{contrast}{SUFFIX_RECORD}")):
        record = read_json(path)
        if not isinstance(record, dict) or not record:
            continue
        image = Path(record.get("image", ""))
        if not image.is_absolute() and bids is not None:
            image = Path(bids) / image
        rel_dir = path.parent.relative_to(deriv)
        stem = path.name[: -len(SUFFIX_RECORD)]
        entries.append((Item(record.get("subject", rel_dir.parts[0]), record.get("session", ""),
                             image, rel_dir, stem), record))
    if not entries:
        raise InputError(f"No batch results (*{SUFFIX_RECORD}) found in {deriv}.")
    return entries
