"""The work of one item (label, write outputs, write the record) and the threads or worker
processes that run it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from ..errors import VertebralLabelingError
from ..io.files import read_json, sha256_file, write_json
from ..io.outputs import write_all
from ..mri import export
from ..mri.labeling import DiscLabeler
from ..mri.volume import load_volume
from .bids import SUFFIX_DLABEL, SUFFIX_MARKUPS, SUFFIX_QC, SUFFIX_RECORD, Item

# -- the work of one item (runs in a worker) ---------------------------------------------------
_WORKER = {}


def die_with_parent(parent: int | None = None) -> None:
    """Make this worker process end when the batch process that started it ends.

    Why: a killed batch (SIGKILL, out-of-memory killer, closed terminal) otherwise leaves its
    workers running, each holding a model (0.7 GB).  Linux delivers SIGKILL on the parent's
    death (prctl PR_SET_PDEATHSIG); elsewhere, and as a backstop, a daemon thread watches the
    parent process id and exits when the worker has been re-parented.
    """
    parent = parent or os.getppid()
    if sys.platform.startswith("linux"):
        try:
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


def init_worker(model, threads, parent=None):
    """Worker set-up: load the model once, ONNX Runtime limited to ``threads`` per call (0: all).

    ``parent``: the batch process's id in a pool worker, which then ends with it
    (:func:`die_with_parent`); None when the batch process loads the model itself.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # only for a user's .keras model
    if parent is not None:
        die_with_parent(parent)

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


def label_in_threads(todo, deriv, model_version, bids, threads):
    """Label ``todo`` with ``threads`` items in flight in this process; yield records as they end.

    The labeler keeps no state between calls and ONNX Runtime sessions may run concurrently, so
    the threads share one model.  Each thread reads its own volume when it starts an item, so
    at most ``threads`` volumes are in memory.
    """
    pool = ThreadPoolExecutor(threads, thread_name_prefix="label")
    try:
        futures = {pool.submit(label_item, item, deriv, model_version, bids): item for item in todo}
        for future in as_completed(futures):
            try:
                record = future.result()
            except Exception as error:  # label_item records its own failures; this is a last resort
                record = crashed(futures[future], deriv, model_version, bids, error)
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


def crashed(item, deriv, model_version, bids, error) -> dict:
    record = {"key": item.key, "subject": item.subject, "session": item.session,
              "image": _rel_image(item, bids), "model_version": model_version, "status": "failed",
              "error": f"worker process failed: {type(error).__name__}: {error}".splitlines()[0],
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0}
    write_json(item.path(deriv, SUFFIX_RECORD), record)
    return record


def _pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def warm_pool(pool, n, timeout=600.0):
    """Return once all ``n`` workers have started and loaded the model (initializer done)."""
    pids, deadline = set(), time.time() + timeout
    while len(pids) < n and time.time() < deadline:
        pids |= {f.result() for f in [pool.submit(_pid_after, 0.2) for _ in range(n)]}


def run_one(item, deriv, model_version, bids):
    return label_item(item, deriv, model_version, bids)


def stop_workers(pool) -> None:
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.terminate()
        except (OSError, AttributeError):
            pass
