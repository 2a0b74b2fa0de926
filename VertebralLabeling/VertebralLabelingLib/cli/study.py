"""Study-workflow subcommands: batch, study-report, qc-serve, import-corrections.

Registered by ``cli.main.parser()`` through ``register(sub)``.  Each command imports the study
code when it runs (it loads SimpleITK and ONNX Runtime), so ``--help`` answers at once.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from ..errors import InputError
from ..io.files import write_json


def register(sub) -> None:
    p = sub.add_parser("batch", help="label every image of a BIDS dataset into a BIDS derivative",
                       description="Label every image of a BIDS dataset into a BIDS derivative. "
                       "Resumable; exit status 1 when some image failed (see discs.csv and batch.log).")
    p.add_argument("--bids", required=True, help="BIDS dataset (only read, never written)")
    p.add_argument("--out", help="derivative folder (default: BIDS/derivatives/vertebral-labeling)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes, each loading the model once (default 1: one process "
                   "labels --threads images at once with one loaded model, which keeps the cores busy)")
    p.add_argument("--threads", type=int, default=None,
                   help="images in flight in one process (default: number of cores + 1)")
    p.add_argument("--contrast", default="T2w", help="image suffix to label (T2w, T1w, ...)")
    p.add_argument("--model", default="compact",
                   help="bundled model name (runs its .onnx), or a .onnx or .keras path")
    p.add_argument("--overwrite", action="store_true",
                   help="label again images already done (files edited by hand are still kept)")
    p.add_argument("--overwrite-corrected", action="store_true",
                   help="also replace prediction files a person edited in place "
                   "(*_desc-corrected_* files are never touched)")
    p.add_argument("--subjects", nargs="*", help="only these subject ids (sub-X or X)")
    p.add_argument("--shard", metavar="K/N|slurm",
                   help="only the K-th of N disjoint subject subsets (0 <= K < N); 'slurm' takes "
                   "K and N from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT")
    p.add_argument("--qc", metavar="QC_JSON", help="QC marks (default: OUT/qc/qc.json)")
    p.add_argument("--no-report", action="store_true", help="do not (re)write qc/index.html")
    p.add_argument("--summary-json", help="write the run's counts and timings here")
    p.set_defaults(handler=cmd_batch)

    p = sub.add_parser("study-report", help="rebuild discs.csv and qc/index.html of a derivative "
                       "(e.g. after the shards of a job array finished)")
    p.add_argument("--bids", required=True)
    p.add_argument("--out", help="derivative folder (default: BIDS/derivatives/vertebral-labeling)")
    p.add_argument("--contrast", default="T2w")
    p.add_argument("--qc", metavar="QC_JSON")
    p.set_defaults(handler=cmd_study_report)

    p = sub.add_parser("qc-serve", help="serve a derivative's QC page on localhost; its Save "
                       "button then writes OUT/qc/qc.json directly")
    p.add_argument("deriv", help="derivative folder written by batch")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; any other needs --allow-remote)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (e.g. 0.0.0.0): other machines can then read "
                   "the page; writes still need the page's session token")
    p.set_defaults(handler=cmd_qc_serve)

    p = sub.add_parser("import-corrections", help="turn corrected markups into SCT disc-label "
                       "NIfTI files (derivatives/labels layout) that train --labels reads")
    p.add_argument("--deriv", required=True, help="derivative folder written by batch")
    p.add_argument("--out", help="labels folder to write (default: BIDS/derivatives/labels)")
    p.add_argument("--bids", help="raw BIDS dataset (default: the one recorded in the derivative)")
    p.add_argument("--contrast", default="T2w")
    p.add_argument("--qc", metavar="QC_JSON", help="QC marks (default: DERIV/qc/qc.json)")
    p.add_argument("--accept-pass", action="store_true",
                   help="also import the predictions of images marked pass in QC")
    p.add_argument("--overwrite", action="store_true",
                   help="replace label files not written by import-corrections")
    p.set_defaults(handler=cmd_import_corrections)


def _shard(text):
    from ..study.plan import parse_shard, shard_from_env

    if text == "slurm":
        shard = shard_from_env()
        if shard is None:
            raise InputError("--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
                             "(run it inside a SLURM job array).")
        return shard
    return parse_shard(text)


def _exit_on_sigterm() -> None:
    """SIGTERM (kill, SLURM time limit) ends the batch like Ctrl+C: temporaries are removed and
    the workers are stopped on the way out, instead of the process vanishing mid-write."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (embedded use)
        pass


def cmd_batch(args) -> int:
    from ..study.batch import run_batch

    shard = _shard(args.shard)
    _exit_on_sigterm()
    summary = run_batch(args.bids, args.out, model=args.model, workers=args.workers, threads=args.threads,
                        contrast=args.contrast, overwrite=args.overwrite,
                        overwrite_corrected=args.overwrite_corrected, subjects=args.subjects,
                        shard=shard, qc_file=args.qc, report=not args.no_report)
    if args.summary_json:
        data = dict(summary.as_dict(), shard=list(shard) if shard else None)
        write_json(args.summary_json, data)
    print(f"table: {summary.table}")
    if summary.report:
        print(f"QC page: {summary.report}")
    return 1 if summary.failed else 0


def cmd_study_report(args) -> int:
    from ..study.bids import default_derivative
    from ..study.plan import remove_stale_temporaries
    from ..study.qc_report import write_report
    from ..study.table import write_table

    deriv = Path(args.out) if args.out else default_derivative(args.bids)
    remove_stale_temporaries(deriv)
    table = write_table(args.bids, deriv, args.contrast, args.qc, log=lambda m: print(m, file=sys.stderr))
    print(f"table: {table}")
    print(f"QC page: {write_report(deriv, args.bids, args.contrast, args.qc)}")
    return 0


def cmd_qc_serve(args) -> int:
    from ..study.qc_report import serve

    return serve(args.deriv, args.host, args.port, allow_remote=args.allow_remote)


def cmd_import_corrections(args) -> int:
    from ..study.corrections import import_corrections

    deriv = Path(args.deriv)
    if not deriv.is_dir():
        raise InputError(f"Derivative folder not found: {deriv}")
    out = args.out
    if out is None:
        bids = args.bids
        if bids is None:
            from ..study.table import study_entries

            item, _ = study_entries(deriv, None, args.contrast)[0]
            bids = item.image.parents[len(item.rel_dir.parts)]
        out = Path(bids) / "derivatives" / "labels"
    rejected = []
    written = import_corrections(deriv, out, bids=args.bids, contrast=args.contrast,
                                 qc_file=args.qc, accept_pass=args.accept_pass,
                                 overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr),
                                 rejected=rejected)
    print(f"{len(written)} label file(s) in {out}; train with: vertebral-labeling train --bids BIDS "
          f"--labels BIDS/derivatives/labels {out} --out MODEL_DIR")
    if rejected:
        print(f"error: {len(rejected)} correction(s) rejected (not imported): "
              f"{', '.join(key for key, _ in rejected)}; see the messages above", file=sys.stderr)
        return 1
    return 0
