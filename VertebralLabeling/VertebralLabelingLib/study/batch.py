"""Batch labeling of a BIDS dataset into a BIDS-derivatives folder (the study workflow).

One *item* is one image of the chosen contrast (``sub-X/[ses-Y/]anat/sub-X[_ses-Y]_..._T2w.nii.gz``).
For each item the batch writes, next to the raw data's naming, under the derivative folder::

    sub-X/[ses-Y/]anat/<stem>_label-discs_dlabel.nii.gz   SCT disc labels (3..8) in the image grid
    sub-X/[ses-Y/]anat/<stem>_discs.mrk.json              Slicer markups (LPS), the prediction
    sub-X/[ses-Y/]anat/<stem>_qc.png                      midsagittal slice with the discs drawn
    sub-X/[ses-Y/]anat/<stem>_discs.json                  the item's record (see below)

and, for the whole study, ``dataset_description.json``, ``discs.csv`` (one row per disc, or one
row per failed image) and ``qc/index.html`` (see ``qc_report``).

The record makes runs *resumable* and *safe for corrections*: it holds the image's SHA-256, the
model's identity and the SHA-256 of every file the batch wrote.  A re-run skips an item whose
record says ``ok`` for the same image and model.  A written file whose content no longer matches
its hash was edited by a person and is never replaced (unless ``overwrite_corrected``); files
named ``*_desc-corrected_discs.mrk.json`` (saved by the Slicer study panel or by hand) are never
written by the batch at all, and they win over the prediction in ``discs.csv``.

By default one process labels ``threads`` items at once (one per core, plus one) with a single
loaded ONNX Runtime session: while one thread runs the network, the others read and decompress
their volumes or write outputs, all of which release the GIL, so both cores stay busy without
the start-up and memory of extra processes.  ``workers`` > 1 runs worker processes instead
(each loading the model once).  One item's failure is recorded (table, log) and never stops the
others.  ``shard=(k, n)`` and
``subjects`` select a subset, so many machines (a SLURM job array, ...) can share one study.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .. import DISC_NAMES, DISC_VALUES, __version__
from ..errors import InputError
from ..mri.volume import write_atomic_bytes

PIPELINE = "vertebral-labeling"
DEFAULT_DERIVATIVE = Path("derivatives") / PIPELINE
SUFFIX_DLABEL = "_label-discs_dlabel.nii.gz"
SUFFIX_MARKUPS = "_discs.mrk.json"
SUFFIX_QC = "_qc.png"
SUFFIX_RECORD = "_discs.json"
SUFFIX_CORRECTED = "_desc-corrected_discs.mrk.json"
TABLE_NAME = "discs.csv"
TABLE_COLUMNS = ("subject", "session", "image", "disc", "value", "R", "A", "S", "confidence",
                 "flagged", "reason", "source", "model_version", "status", "qc", "error")
LOG_NAME = "batch.log"

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
                            lambda name: fnmatch.fnmatch(name, f"*_{contrast}.nii*")):
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


def default_derivative(bids) -> Path:
    return Path(bids) / DEFAULT_DERIVATIVE


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
    from ..io.models import resolve_model_path

    path = resolve_model_path(model)
    meta = read_json(path.with_suffix(".json"), {}) or {}
    digest = sha256_file(path)[:12] if path.exists() else "missing"
    name = meta.get("name", Path(path).stem)
    return {"model": str(model), "name": name, "version": f"{name}-{meta.get('version', '?')}-{digest}",
            "sha256_12": digest}


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


def default_qc_file(deriv) -> Path:
    return Path(deriv) / "qc" / "qc.json"


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


# -- the work of one item (runs in a worker) ---------------------------------------------------
_WORKER = {}


def die_with_parent(parent: int | None = None) -> None:
    """Make this worker process end when the batch process that started it ends.

    Why: a killed batch (SIGKILL, out-of-memory killer, closed terminal) otherwise leaves its
    workers running, each holding a model (0.7 GB).  Linux delivers SIGKILL on the parent's
    death (prctl PR_SET_PDEATHSIG); elsewhere, and as a backstop, a daemon thread watches the
    parent process id and exits when the worker has been re-parented.
    """
    import threading

    parent = parent or os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the batch died before this worker got here
        os._exit(1)

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


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


def _init_worker(model, threads, parent=None):
    """Worker set-up: load the model once, ONNX Runtime limited to ``threads`` per call (0: all).

    ``parent``: the batch process's id in a pool worker, which then ends with it
    (:func:`die_with_parent`); None when the batch process loads the model itself.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # only for a user's .keras model
    if parent is not None:
        die_with_parent(parent)
    from ..mri.labeling import DiscLabeler

    _WORKER["labeler"] = DiscLabeler.load(model, threads=threads)


def usable_cores() -> int:
    """Cores this process may run on (a SLURM task's allocation, not the whole node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Items in flight in one process: one per usable core, plus one to cover reads from disk."""
    return usable_cores() + 1


def _label_in_threads(todo, deriv, model_version, bids, threads):
    """Label ``todo`` with ``threads`` items in flight in this process; yield records as they end.

    The labeler keeps no state between calls and ONNX Runtime sessions may run concurrently, so
    the threads share one model.  Each thread reads its own volume when it starts an item, so
    at most ``threads`` volumes are in memory.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    pool = ThreadPoolExecutor(threads, thread_name_prefix="label")
    try:
        futures = {pool.submit(label_item, item, deriv, model_version, bids): item for item in todo}
        for future in as_completed(futures):
            try:
                record = future.result()
            except Exception as error:  # label_item records its own failures; this is a last resort
                record = _crashed(futures[future], deriv, model_version, bids, error)
            yield record
    finally:
        # On Ctrl-C (or any stop) the items already running finish their atomic writes and the
        # queued ones are dropped, instead of labeling the rest of the study before exiting.
        pool.shutdown(wait=True, cancel_futures=True)


def label_item(item: Item, deriv, model_version: str, bids=None) -> dict:
    """Label one item and write its outputs and record; never raises (failures are recorded).

    The record is a journal: it says ``started`` before anything is written and ``ok`` (with the
    outputs' hashes) only after all outputs are in place, and the outputs are written
    all-or-nothing.  A run killed in between leaves ``started``, so the next run labels the
    item again instead of taking its outputs for a person's files and skipping it for good.
    """
    from ..io.outputs import write_all
    from ..mri import export
    from ..mri.volume import load_volume

    deriv = Path(deriv)
    start = time.perf_counter()
    record = {"key": item.key, "subject": item.subject, "session": item.session,
              "image": _rel_image(item, bids), "model_version": model_version,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}
    record_path = item.path(deriv, SUFFIX_RECORD)
    previous = read_json(record_path)
    # The files of the last good run stay known (a person may still edit them), and the new
    # files' hashes are added just before they are renamed in (see write_all's before_commit).
    started = dict(record, status="started",
                   outputs=(previous.get("outputs") or {}) if isinstance(previous, dict) else {})

    def journal(staged):
        write_json(record_path, dict(started, pending={path.name: sha256_file(tmp) for tmp, path in staged}))

    try:
        write_json(record_path, started)
        stat = item.image.stat()
        record.update(image_sha256=sha256_file(item.image), image_size=stat.st_size,
                      image_mtime_ns=stat.st_mtime_ns)
        volume = load_volume(item.image)
        result = _WORKER["labeler"].label(volume)
        writers = ((SUFFIX_DLABEL, lambda p: export.write_disc_label_nifti(result.discs, volume, p)),
                   (SUFFIX_MARKUPS, lambda p: export.write_markups_json(result.discs, p)),
                   (SUFFIX_QC, lambda p: export.write_qc_png(result, p)))
        write_all([(item.path(deriv, suffix), write) for suffix, write in writers], before_commit=journal)
        outputs = {item.path(deriv, suffix).name: sha256_file(item.path(deriv, suffix))
                   for suffix, _ in writers}
        record.update(status="ok", outputs=outputs, discs=[d.to_dict() for d in result.discs],
                      warnings=list(result.warnings), spine_found=bool(result.spine_found),
                      geometry={"shape": [int(n) for n in volume.array.shape],
                                "ijk_to_ras": [[float(v) for v in row] for row in volume.ijk_to_ras]})
    except Exception as error:  # one image's failure never stops the study
        from ..errors import VertebralLabelingError

        record.update(status="failed", error=f"{type(error).__name__}: {error}".splitlines()[0])
        if not isinstance(error, VertebralLabelingError):
            record["traceback"] = traceback.format_exc(limit=8)
    record["seconds"] = round(time.perf_counter() - start, 3)
    write_json(record_path, record)
    return record


def _rel_image(item: Item, bids) -> str:
    if bids is not None:
        try:
            return str(item.image.relative_to(Path(os.path.abspath(bids))))
        except ValueError:
            pass
    return str(item.image)


def _crashed(item, deriv, model_version, bids, error) -> dict:
    record = {"key": item.key, "subject": item.subject, "session": item.session,
              "image": _rel_image(item, bids), "model_version": model_version, "status": "failed",
              "error": f"worker process failed: {type(error).__name__}: {error}".splitlines()[0],
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0}
    write_json(item.path(deriv, SUFFIX_RECORD), record)
    return record


def _pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def _warm_pool(pool, n, timeout=600.0):
    """Return once all ``n`` workers have started and loaded the model (initializer done)."""
    pids, deadline = set(), time.time() + timeout
    while len(pids) < n and time.time() < deadline:
        pids |= {f.result() for f in [pool.submit(_pid_after, 0.2) for _ in range(n)]}


def _run_one(item, deriv, model_version, bids):
    return label_item(item, deriv, model_version, bids)


# -- progress ----------------------------------------------------------------------------------
class Progress:
    """A text progress bar with rate and ETA (one line per item when not on a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self, note: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        remaining = (self.total - self.done) / rate if rate else float("nan")
        filled = int(self.width * self.done / max(self.total, 1))
        eta = _clock(remaining) if remaining == remaining else "--:--"
        bar = "#" * filled + "." * (self.width - filled)
        return (f"[{bar}] {self.done}/{self.total} {rate:.2f} vol/s "
                f"elapsed {_clock(elapsed)} ETA {eta}" + (f"  {note}" if note else ""))

    def step(self, note: str = "") -> None:
        self.done += 1
        if self.tty:
            self.stream.write("\r" + self.line(note)[:160].ljust(160))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(self.line(note) + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


# -- the batch -------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    labeled: int = 0
    failed: int = 0
    skipped_done: int = 0
    skipped_edited: int = 0
    skipped_exists: int = 0
    seconds_labeling: float = 0.0  # wall time from the first submission to the last result
    seconds_total: float = 0.0  # including worker start-up and model loading
    workers: int = 1
    table: Path | None = None
    report: Path | None = None

    @property
    def throughput(self) -> float:
        """Volumes per second of wall time spent labeling (start-up excluded)."""
        n = self.labeled + self.failed
        return n / self.seconds_labeling if self.seconds_labeling > 0 else 0.0

    def as_dict(self) -> dict:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        data["volumes_per_second"] = round(self.throughput, 4)
        return data


def run_batch(bids, deriv=None, model="compact", workers: int = 1, contrast: str = "T2w",
              overwrite=False, overwrite_corrected=False, subjects=None, shard=None, qc_file=None,
              log=None, progress_stream=None, report=True, threads: int | None = None) -> BatchSummary:
    """Label every matching image of ``bids`` into ``deriv``; see the module docstring.

    ``threads``: items labeled at once in one process (default :func:`default_threads`).
    """
    bids = Path(bids)
    deriv = Path(deriv) if deriv else default_derivative(bids)
    if workers < 1:
        raise InputError("--workers must be at least 1")
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise InputError("--threads must be at least 1")
    items = find_items(bids, contrast, subjects, shard)
    identity = model_identity(model)
    if identity["sha256_12"] == "missing":
        from ..errors import ModelError
        from ..io.models import resolve_model_path

        raise ModelError(f"Model file not found: {resolve_model_path(model)}")
    try:
        deriv.mkdir(parents=True, exist_ok=True)
        write_dataset_description(deriv, bids)
    except OSError as error:
        raise InputError(f"Cannot write the derivative folder {deriv} ({error.strerror}); "
                         "pass --out to write it elsewhere (e.g. when the dataset is read-only).") from error
    logger = _Log(deriv / LOG_NAME, log)
    stale = remove_stale_temporaries(deriv)
    if stale:
        logger(f"removed {len(stale)} temporary file(s) left by an interrupted run")
    t0 = time.perf_counter()
    summary = BatchSummary(workers=workers)
    todo = []
    for item in items:
        action, why = plan(item, deriv, identity["version"], overwrite, overwrite_corrected)
        if action == "label":
            todo.append(item)
        elif action == "skip-done":
            summary.skipped_done += 1
        elif action == "skip-edited":
            summary.skipped_edited += 1
            logger(f"{item.key}: kept, {why}")
        else:
            summary.skipped_exists += 1
            logger(f"{item.key}: skipped, {why}")
    logger(f"batch: {len(items)} images, {len(todo)} to label, {summary.skipped_done} already done, "
           f"model {identity['version']}, {workers} worker(s)")
    if todo:
        bar = Progress(len(todo), progress_stream)
        per_process = max(1, usable_cores() // min(workers, len(todo)))
        records = []
        if min(workers, len(todo)) == 1:  # one process: items in threads, one loaded session
            in_flight = min(threads, len(todo))
            _init_worker(model, 1 if in_flight > 1 else 0)  # parallel items, not parallel kernels
            t_label = bar.start = time.perf_counter()
            for record in _label_in_threads(todo, deriv, identity["version"], bids, in_flight):
                records.append(record)
                _report_record(records[-1], logger, bar)
            t_end = time.perf_counter()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from concurrent.futures.process import BrokenProcessPool

            context = multiprocessing.get_context("spawn")  # ONNX Runtime / TensorFlow are not fork-safe
            try:
                pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                                           initializer=_init_worker,
                                           initargs=(model, per_process, os.getpid()))
                _warm_pool(pool, min(workers, len(todo)))  # start-up + model loading untimed
            except BrokenProcessPool as error:
                from ..errors import ModelError

                pool.shutdown(cancel_futures=True)
                raise ModelError(f"The worker processes could not start or load the model "
                                 f"{model} ({error}); try --workers 1 to see the error.") from error
            with pool:
                try:
                    t_label = bar.start = time.perf_counter()
                    futures = {pool.submit(_run_one, item, deriv, identity["version"], bids): item
                               for item in todo}
                    for future in as_completed(futures):
                        try:
                            records.append(future.result())
                        except Exception as error:  # the worker process died (e.g. out of memory)
                            records.append(_crashed(futures[future], deriv, identity["version"], bids, error))
                        _report_record(records[-1], logger, bar)
                    t_end = time.perf_counter()  # before the pool shuts down
                except BaseException:  # Ctrl+C, SIGTERM: take the workers down now, not after their items
                    _stop_workers(pool)
                    raise
        summary.seconds_labeling = t_end - t_label
        summary.labeled = sum(r["status"] == "ok" for r in records)
        summary.failed = sum(r["status"] != "ok" for r in records)
    summary.seconds_total = time.perf_counter() - t0
    summary.table = write_table(bids, deriv, contrast, qc_file, log=logger)
    if report:
        from .qc_report import write_report

        summary.report = write_report(deriv, bids=bids, contrast=contrast, qc_file=qc_file)
    marks = read_qc_marks(qc_file or default_qc_file(deriv))
    failed_qc = sorted(k for k, v in marks.items() if v == "fail")
    logger(f"batch done: {summary.labeled} labeled, {summary.failed} failed, "
           f"{summary.skipped_done} already done, {summary.skipped_edited} kept (edited by hand), "
           f"{summary.skipped_exists} skipped (existing files); "
           f"{summary.throughput:.3f} volumes/s over {summary.seconds_labeling:.1f} s of labeling, "
           f"{summary.seconds_total:.1f} s in all")
    if failed_qc:
        logger(f"QC marked fail ({len(failed_qc)}): {', '.join(failed_qc)}")
    return summary


def _stop_workers(pool) -> None:
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.terminate()
        except (OSError, AttributeError):
            pass


def _report_record(record, logger, bar):
    if record["status"] == "ok":
        flagged = [d["name"] for d in record["discs"] if d["flagged"]]
        note = f"{record['key']} ok {record['seconds']:.1f} s" + (f", review {','.join(flagged)}" if flagged else "")
        logger(note, echo=False)
    else:
        note = f"{record['key']} FAILED: {record['error']}"
        logger(note, echo=False)
        print(f"error: {note}", file=sys.stderr)
    bar.step(note)


class _Log:
    """Appends to the derivative's batch.log and echoes to ``log`` (stderr by default)."""

    def __init__(self, path: Path, echo=None):
        self.path = path
        self.echo = echo or (lambda message: print(message, file=sys.stderr, flush=True))

    def __call__(self, message: str, echo: bool = True) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a") as handle:
            handle.write(f"{stamp} [{os.getpid()}] {message}\n")
        if echo:
            self.echo(message)


# -- the study table -------------------------------------------------------------------------
def corrected_discs(item: Item, deriv, record=None):
    """(label, RAS) pairs of the human-corrected markups of an item, or None when there is none.

    Validated (markups format and anatomy, see ``markups_check``; inside the image when the
    record holds its geometry): InputError with the reason when the correction is unusable.
    """
    from ..io.markups import read_disc_points

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
            from urllib.parse import unquote, urlparse

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
