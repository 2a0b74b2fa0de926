"""Files: atomic writes, JSON, content hashes, sidecars and the shared data folder.

Every writer is atomic (temporary file in the same folder, then rename), so an interrupted run
never leaves a half-written file where a study expects a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import InputError

#: Environment variable naming the shared data folder (overrides ``DEFAULT_DATA``).
DATA_ENV = "VERTEBRAL_LABELING_DATA"
#: ``../shared/data`` beside the repository checkout.
DEFAULT_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
#: ``Source`` of a disc-label sidecar written from a person's correction, or from a model label a
#: person accepted on the QC page: both count as human labels (kept in training despite a QC fail).
SOURCE_HUMAN = "human-corrected"
SOURCE_QC_PASS = "model-accepted-in-qc"
#: A Slicer markups file (what ``label -o`` and ``xray label -o`` write).
MARKUPS_SUFFIX = ".mrk.json"
#: An SCT disc-label image beside (or below derivatives/labels, as) ``<image stem>``.
DISC_LABEL_SUFFIX = "_label-discs_dlabel.nii.gz"
#: The images of one contrast in a BIDS subject folder (``*_T2w.nii`` and ``*_T2w.nii.gz``).
BIDS_IMAGE_GLOB = "*_{contrast}.nii*"
#: The two values of a QC mark (qc.json of the study QC page).
QC_PASS, QC_FAIL = "pass", "fail"


def data_root() -> Path:
    """The shared data folder (VERTEBRAL_LABELING_DATA overrides ../shared/data)."""
    return Path(os.environ.get(DATA_ENV, DEFAULT_DATA))


def write_atomic_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers never see it half-written (write to temp, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- files -------------------------------------------------------------------------------------
def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_json(path, data) -> None:
    write_atomic_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def read_qc_marks(path) -> dict:
    """qc.json -> {item key: "pass" | "fail"} (empty when the file does not exist)."""
    if path is None or not Path(path).exists():
        return {}
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("marks", {}), dict):
        raise InputError(f"{path} is not a VertebralLabeling qc.json file.")
    marks = {}
    for key, mark in data.get("marks", {}).items():
        status = mark.get("status") if isinstance(mark, dict) else mark
        if status in ("pass", "fail"):
            marks[str(key)] = status
    return marks


def label_sidecar(label_path) -> Path:
    """The JSON sidecar of a NIfTI label file (``x.nii.gz`` -> ``x.json``)."""
    path = Path(label_path)
    return path.with_name(path.name.split(".nii")[0] + ".json")


def label_is_human(label_path) -> bool:
    """True when a disc-label file's sidecar says it was corrected (or checked) by a person."""
    return (read_json(label_sidecar(label_path), {}) or {}).get("Source") in (SOURCE_HUMAN, SOURCE_QC_PASS)
