"""What a batch run does with each item: shards of a study, the model's identity, the
resume/skip decision from the item's record (hashes of the image and of every written file),
and the clean-up of temporaries a killed run left behind."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..io.files import read_json, sha256_file, write_json
from ..io.models import resolve_model_path
from .bids import (
    PIPELINE,
    SUFFIX_DLABEL,
    SUFFIX_MARKUPS,
    SUFFIX_QC,
    SUFFIX_RECORD,
    Item,
    walk_files,
)


def parse_shard(text: str | None):
    """'K/N' -> (K, N) with 0 <= K < N; None passes through."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise InputError(f"--shard must be K/N with 0 <= K < N (e.g. 0/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def shard_from_env(env=None):
    """The shard of a SLURM array task: SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN) of
    SLURM_ARRAY_TASK_COUNT; None outside an array job."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    count = int(env.get("SLURM_ARRAY_TASK_COUNT", 0))
    if count <= 0:
        raise InputError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not.")
    return parse_shard(f"{task}/{count}")


def write_dataset_description(deriv, bids=None) -> None:
    path = Path(deriv) / "dataset_description.json"
    if path.exists():
        return
    description = {
        "Name": "VertebralLabeling cervical disc labels",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": PIPELINE, "Version": __version__,
                         "Description": "Cervical intervertebral discs C2-C3..C7-T1 (SCT values 3..8)"}],
    }
    if bids is not None:
        description["SourceDatasets"] = [{"URL": Path(os.path.abspath(bids)).as_uri()}]
    write_json(path, description)


def model_identity(model) -> dict:
    """Name, version and content hash of a model (bundled name, .onnx or .keras path); the hash
    is of the file that runs (a bundled name's .onnx), so a re-export redoes the study."""
    path = resolve_model_path(model)
    meta = read_json(path.with_suffix(".json"), {}) or {}
    digest = sha256_file(path)[:12] if path.exists() else "missing"
    name = meta.get("name", Path(path).stem)
    return {"model": str(model), "name": name, "version": f"{name}-{meta.get('version', '?')}-{digest}",
            "sha256_12": digest}


# -- decisions -------------------------------------------------------------------------------
def edited_outputs(item: Item, deriv, record) -> list[Path]:
    """Outputs that exist but differ from what the batch wrote (a person changed them)."""
    written = (record or {}).get("outputs") or {}
    pending = (record or {}).get("pending") or {}  # files an interrupted run was renaming in
    edited = []
    for suffix in (SUFFIX_MARKUPS, SUFFIX_DLABEL):
        path = item.path(deriv, suffix)
        if path.exists() and path.name in written and \
                sha256_file(path) not in (written[path.name], pending.get(path.name)):
            edited.append(path)
    return edited


def plan(item: Item, deriv, model_version: str, overwrite=False, overwrite_corrected=False):
    """What to do with an item: ('label' | 'skip-done' | 'skip-edited' | 'skip-exists', why)."""
    record = read_json(item.path(deriv, SUFFIX_RECORD))
    if record is not None and not isinstance(record, dict):
        record = None
    edited = edited_outputs(item, deriv, record)
    if edited and not overwrite_corrected:
        return "skip-edited", (f"{', '.join(p.name for p in edited)} edited by hand since the batch "
                               "wrote it; pass --overwrite-corrected to replace it")
    if overwrite:
        return "label", "--overwrite"
    if record is None:
        existing = [item.path(deriv, s) for s in (SUFFIX_MARKUPS, SUFFIX_DLABEL)
                    if item.path(deriv, s).exists()]
        if existing:
            return "skip-exists", (f"{existing[0].name} exists but was not written by a batch run; "
                                   "pass --overwrite to replace it")
        return "label", "new"
    if record.get("status") != "ok":
        return "label", "previous run failed"
    if not all(item.path(deriv, s).exists() for s in (SUFFIX_MARKUPS, SUFFIX_DLABEL, SUFFIX_QC)):
        return "label", "outputs missing"
    try:
        stat = item.image.stat()
        same_stat = [record.get("image_size"), record.get("image_mtime_ns")] == [stat.st_size, stat.st_mtime_ns]
        if not same_stat and record.get("image_sha256") != sha256_file(item.image):
            return "label", "image changed"
    except OSError:
        return "label", "image unreadable"  # label_item records the failure
    if record.get("model_version") != model_version:
        return "label", "model changed"
    return "skip-done", "done"


#: Temporary files of our atomic writers: ``.NAME.tmp-PID``, ``.tmp-PID-NAME``, ``.part-PID-NAME``.
_TEMPORARY = re.compile(r"^\.(?:.+\.tmp-(\d+)|tmp-(\d+)-.+|part-(\d+)-.+)$")


def remove_stale_temporaries(deriv, min_age_s: float = 60.0, max_age_s: float = 3600.0) -> list[Path]:
    """Delete temporary files that a killed run left in the derivative folder.

    A temporary is stale when the process in its name is gone and it is older than ``min_age_s``,
    or when it is older than ``max_age_s`` whatever its process (shards on other machines write
    to the same folder, so a young file of an unknown process is left alone).
    """
    removed, now = [], time.time()
    for path in walk_files(deriv, lambda rel: True, lambda name: _TEMPORARY.match(name) is not None):
        pid = int(next(g for g in _TEMPORARY.match(path.name).groups() if g))
        try:
            age = now - path.lstat().st_mtime
        except OSError:
            continue
        alive = True
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except OSError:
                pass
        else:
            alive = False
        if age > max_age_s or (not alive and age > min_age_s):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed
