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

import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError, ModelError
from ..io.files import read_qc_marks
from ..io.models import resolve_model_path
from .bids import default_derivative, default_qc_file, find_items
from .plan import model_identity, plan, remove_stale_temporaries, write_dataset_description
from .qc_report import write_report
from .table import write_table
from .workers import (
    crashed,
    default_threads,
    init_worker,
    label_in_threads,
    run_one,
    stop_workers,
    usable_cores,
    warm_pool,
)

LOG_NAME = "batch.log"
#: batch.log lines: time, process id, message.
LOG_FORMAT = "%(asctime)s [%(process)d] %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
#: The progress line: bar, count, rate, elapsed time, ETA and the last item's note.
PROGRESS_FORMAT = "[{bar:30}] {n_fmt}/{total_fmt} {rate_noinv_fmt} elapsed {elapsed} ETA {remaining}{postfix}"


# -- progress ----------------------------------------------------------------------------------
class _Lines:
    """A stream for tqdm off a terminal (a file, SLURM logs): one line per update, no carriage returns."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, stream=None) -> tqdm:
    """A tqdm bar with rate (vol/s) and ETA on ``stream`` (stderr); one line per item when the
    stream is not a terminal."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, file=stream if tty else _Lines(stream), unit="vol", ascii=" #",
                bar_format=PROGRESS_FORMAT, mininterval=0, miniters=1, smoothing=0, dynamic_ncols=tty,
                leave=tty)


# -- the log -----------------------------------------------------------------------------------
class _Echo(logging.Handler):
    """Hands each record's message to the caller's ``log`` function, unless it is file-only."""

    def __init__(self, echo):
        super().__init__()
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "echo", True):
            self.echo(record.getMessage())


def open_log(path: Path, echo=None):
    """``log(message, echo=True)``: appends to batch.log (``logging``), and echoes the message to
    ``echo`` (stderr by default) unless ``echo=False``.  ``log.close()`` detaches the file."""
    logger = logging.getLogger(f"{__name__}.{os.getpid()}.{id(path)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    logger.addHandler(file_handler)
    logger.addHandler(_Echo(echo or (lambda message: print(message, file=sys.stderr, flush=True))))

    def log(message: str, echo: bool = True) -> None:
        logger.info(message, extra={"echo": echo})

    def close() -> None:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()

    log.close = close
    return log


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


@dataclass
class _Run:
    """What the labeling loops share: the study, the model and where progress goes."""

    deriv: Path
    bids: Path
    model: str
    version: str
    log: object
    bar: tqdm


def run_batch(bids, deriv=None, model="compact", workers: int = 1, contrast: str = "T2w",
              overwrite=False, overwrite_corrected=False, subjects=None, shard=None, qc_file=None,
              log=None, progress_stream=None, report=True, threads: int | None = None) -> BatchSummary:
    """Label every matching image of ``bids`` into ``deriv``; see the module docstring.

    ``threads``: items labeled at once in one process (default :func:`default_threads`).
    """
    bids = Path(bids)
    deriv = Path(deriv) if deriv else default_derivative(bids)
    threads = _check_counts(workers, threads)
    items = find_items(bids, contrast, subjects, shard)
    identity = model_identity(model)
    if identity["sha256_12"] == "missing":
        raise ModelError(f"Model file not found: {resolve_model_path(model)}")
    _prepare(deriv, bids)
    logger = open_log(deriv / LOG_NAME, log)
    try:
        t0 = time.perf_counter()
        summary = BatchSummary(workers=workers)
        stale = remove_stale_temporaries(deriv)
        if stale:
            logger(f"removed {len(stale)} temporary file(s) left by an interrupted run")
        todo = _plan_items(items, deriv, identity["version"], overwrite, overwrite_corrected, summary, logger)
        logger(f"batch: {len(items)} images, {len(todo)} to label, {summary.skipped_done} already done, "
               f"model {identity['version']}, {workers} worker(s)")
        if todo:
            with progress_bar(len(todo), progress_stream) as bar:
                run = _Run(deriv, bids, model, identity["version"], logger, bar)
                if min(workers, len(todo)) == 1:
                    records, seconds = _label_in_process(run, todo, threads)
                else:
                    records, seconds = _label_in_workers(run, todo, workers)
            summary.seconds_labeling = seconds
            summary.labeled = sum(r["status"] == "ok" for r in records)
            summary.failed = sum(r["status"] != "ok" for r in records)
        summary.seconds_total = time.perf_counter() - t0
        summary.table = write_table(bids, deriv, contrast, qc_file, log=logger)
        if report:
            summary.report = write_report(deriv, bids=bids, contrast=contrast, qc_file=qc_file)
        _log_summary(summary, read_qc_marks(qc_file or default_qc_file(deriv)), logger)
        return summary
    finally:
        logger.close()


def _check_counts(workers, threads) -> int:
    if workers < 1:
        raise InputError("--workers must be at least 1")
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise InputError("--threads must be at least 1")
    return threads


def _prepare(deriv: Path, bids: Path) -> None:
    try:
        deriv.mkdir(parents=True, exist_ok=True)
        write_dataset_description(deriv, bids)
    except OSError as error:
        raise InputError(f"Cannot write the derivative folder {deriv} ({error.strerror}); "
                         "pass --out to write it elsewhere (e.g. when the dataset is read-only).") from error


def _plan_items(items, deriv, version, overwrite, overwrite_corrected, summary, logger) -> list:
    todo = []
    for item in items:
        action, why = plan(item, deriv, version, overwrite, overwrite_corrected)
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
    return todo


def _label_in_process(run: _Run, todo, threads):
    """One process: items in threads sharing one loaded session; (records, labeling seconds)."""
    in_flight = min(threads, len(todo))
    init_worker(run.model, 1 if in_flight > 1 else 0)  # parallel items, not parallel kernels
    records, start = [], time.perf_counter()
    for record in label_in_threads(todo, run.deriv, run.version, run.bids, in_flight):
        records.append(record)
        _report_record(record, run.log, run.bar)
    return records, time.perf_counter() - start


def _label_in_workers(run: _Run, todo, workers):
    """Worker processes, each with its own model; (records, labeling seconds)."""
    n = min(workers, len(todo))
    context = multiprocessing.get_context("spawn")  # ONNX Runtime / TensorFlow are not fork-safe
    try:
        pool = ProcessPoolExecutor(n, mp_context=context, initializer=init_worker,
                                   initargs=(run.model, max(1, usable_cores() // n), os.getpid()))
        warm_pool(pool, n)  # start-up + model loading untimed
    except BrokenProcessPool as error:
        pool.shutdown(cancel_futures=True)
        raise ModelError(f"The worker processes could not start or load the model "
                         f"{run.model} ({error}); try --workers 1 to see the error.") from error
    records = []
    with pool:
        try:
            start = time.perf_counter()
            futures = {pool.submit(run_one, item, run.deriv, run.version, run.bids): item for item in todo}
            for future in as_completed(futures):
                try:
                    records.append(future.result())
                except Exception as error:  # the worker process died (e.g. out of memory)
                    records.append(crashed(futures[future], run.deriv, run.version, run.bids, error))
                _report_record(records[-1], run.log, run.bar)
            seconds = time.perf_counter() - start  # before the pool shuts down
        except BaseException:  # Ctrl+C, SIGTERM: take the workers down now, not after their items
            stop_workers(pool)
            raise
    return records, seconds


def _report_record(record, logger, bar):
    if record["status"] == "ok":
        flagged = [d["name"] for d in record["discs"] if d["flagged"]]
        note = f"{record['key']} ok {record['seconds']:.1f} s" + (f", review {','.join(flagged)}" if flagged else "")
        logger(note, echo=False)
    else:
        note = f"{record['key']} FAILED: {record['error']}"
        logger(note, echo=False)
        print(f"error: {note}", file=sys.stderr)
    bar.set_postfix_str(note, refresh=False)
    bar.update()


def _log_summary(summary: BatchSummary, marks: dict, logger) -> None:
    failed_qc = sorted(k for k, v in marks.items() if v == "fail")
    logger(f"batch done: {summary.labeled} labeled, {summary.failed} failed, "
           f"{summary.skipped_done} already done, {summary.skipped_edited} kept (edited by hand), "
           f"{summary.skipped_exists} skipped (existing files); "
           f"{summary.throughput:.3f} volumes/s over {summary.seconds_labeling:.1f} s of labeling, "
           f"{summary.seconds_total:.1f} s in all")
    if failed_qc:
        logger(f"QC marked fail ({len(failed_qc)}): {', '.join(failed_qc)}")
