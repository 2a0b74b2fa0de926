"""MRI subcommands: label, evaluate, train, export-onnx, phantom, stress.

Each command imports what it runs when it runs (SimpleITK, scipy, ONNX Runtime, TensorFlow):
``vertebral-labeling --help`` and a mistyped option answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import InputError
from ..io.files import MARKUPS_SUFFIX, data_root, write_json


def _add_label(sub):
    p = sub.add_parser("label", help="label the discs of one MRI volume")
    p.add_argument("input", help="image file (NIfTI, NRRD, MHA, ...) or DICOM folder")
    p.add_argument("-o", "--output", required=True, help="markups file to write (.mrk.json)")
    p.add_argument("--csv", help="also write a CSV table")
    p.add_argument("--dlabel", help="also write an SCT disc-label NIfTI in the input's grid")
    p.add_argument("--qc", help="also write a QC picture (PNG)")
    p.add_argument("--slice", type=finite_float, dest="slice_r", metavar="R_MM",
                   help="use the sagittal plane at this R coordinate (mm) instead of the automatic one")
    p.add_argument("--model", default="compact",
                   help="bundled model name (runs its .onnx), or a .onnx or .keras path")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (they may hold corrections)")


def finite_float(text: str) -> float:
    """argparse type: a finite number (``float`` alone takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="accuracy against SCT disc labels of a BIDS dataset")
    p.add_argument("--bids", required=True)
    p.add_argument("--json", required=True, help="where to write the metrics")
    p.add_argument("--model", default="compact")
    p.add_argument("--fold-dir", help="folder of NAME-loso-sub-X.onnx (or .keras) models: each subject is "
                   "labeled by the model that did not see it (leave-one-subject-out)")
    p.add_argument("--subjects", nargs="*", help="only these subject ids")


def _add_train(sub):
    p = sub.add_parser("train", help="train the disc networks")
    p.add_argument("--bids", help="BIDS dataset with derivatives/labels disc labels "
                   "(omit with --synthetic 1 to train on synthetic spines alone)")
    p.add_argument("--out", required=True, help="folder for NAME.keras + NAME.json")
    p.add_argument("--synthetic", type=float, default=0.5, metavar="SHARE",
                   help="share of training samples from the procedural spine generator (0..1)")
    p.add_argument("--init", metavar="MODEL", help="continue from this model (fine-tuning)")
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--pam50", default=str(data_root() / "mri" / "pam50"),
                   help="PAM50 template folder as extra data ('' to skip)")
    p.add_argument("--architecture", default="compact", choices=["compact", "romero2018"])
    p.add_argument("--name", help="model name (default: the architecture)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-min", type=float, default=60.0)
    p.add_argument("--phantoms", type=int, default=12, help="synthetic phantoms added to training")
    p.add_argument("--exclude", nargs="*", default=[], help="subject ids left out")
    p.add_argument("--subjects", nargs="*", help="only these subject ids")
    p.add_argument("--contrast", default="T2w")
    p.add_argument("--labels", nargs="+", metavar="DIR",
                   help="disc-label folders in the derivatives/labels layout (e.g. the output of "
                   "import-corrections); the last one holding an image's label wins "
                   "(default: BIDS/derivatives/labels)")
    p.add_argument("--qc", metavar="QC_JSON", help="qc.json of the study QC page: images marked "
                   "fail are left out unless their label is a human correction")


def _add_export_onnx(sub):
    p = sub.add_parser("export-onnx", help="convert .keras models to .onnx beside them "
                       "(needs the train extra: tensorflow, tf2onnx, onnx)")
    p.add_argument("models", nargs="+", metavar="MODEL.keras")


def _add_phantom(sub):
    p = sub.add_parser("phantom", help="write a synthetic cervical-spine volume (demo / tests)")
    p.add_argument("output", help="image file to write, e.g. phantom.nii.gz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", metavar="CONTRAST", nargs="?", const="T2",
                   choices=["T2", "T1", "STIR", "PD", "random"],
                   help="a spine from the training generator (realistic anatomy, default T2) "
                   "instead of the simple geometric phantom")


def _add_stress(sub):
    p = sub.add_parser("stress", help="write stress variants of a labeled BIDS dataset "
                       "(contrast, field of view, slice thickness, noise) for evaluate")
    p.add_argument("--bids", required=True, help="labeled BIDS dataset")
    p.add_argument("--out", required=True, help="folder; one BIDS dataset per variant is written in it")
    p.add_argument("--variants", nargs="+", help="default: all (dark t1like remap fov-c2 fov-c3 "
                   "fov-end-c5 thick3 thick4 noise)")
    p.add_argument("--seed", type=int, default=0)


def cmd_label(args):
    from ..io.outputs import check_outputs, write_all
    from ..mri import export
    from ..mri.labeling import DiscLabeler
    from ..mri.volume import load_volume

    if not args.output.endswith(MARKUPS_SUFFIX):
        raise InputError(f"The output file name must end with {MARKUPS_SUFFIX}")
    check_outputs([("-o", args.output), ("--csv", args.csv), ("--dlabel", args.dlabel),
                   ("--qc", args.qc)], inputs=[args.input], overwrite=args.overwrite)
    volume = load_volume(args.input)
    labeler = DiscLabeler.load(args.model)
    result = labeler.label(volume, slice_r_mm=args.slice_r)
    jobs = [(args.output, lambda p: export.write_markups_json(result.discs, p))]
    if args.csv:
        jobs.append((args.csv, lambda p: export.write_csv(result.discs, p)))
    if args.dlabel:
        jobs.append((args.dlabel, lambda p: export.write_disc_label_nifti(result.discs, volume, p)))
    if args.qc:
        jobs.append((args.qc, lambda p: export.write_qc_png(result, p)))
    write_all(jobs)  # all or nothing
    for disc in result.discs:
        flag = f"  REVIEW: {disc.reason}" if disc.flagged else ""
        r, a, s = disc.ras
        print(f"{disc.name}: R {r:7.1f}  A {a:7.1f}  S {s:7.1f}  confidence {disc.confidence:.2f}{flag}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"labeled in {result.seconds:.2f} s -> {args.output}")
    return 0


def cmd_evaluate(args):
    from ..mri.evaluate import evaluate, fold_models

    folds = fold_models(args.fold_dir) if args.fold_dir else {}
    metrics = evaluate(args.bids, model=args.model, model_for_subject=folds, subjects=args.subjects,
                       log=lambda m: print(m, file=sys.stderr))
    write_json(args.json, metrics)
    keys = ("n_subjects", "n_discs", "mean_error_mm", "median_error_mm", "mean_error_sagittal_mm",
            "identification_rate", "silent_error_rate", "flag_rate", "correct_when_confident",
            "seconds_per_case", "model_parameters")
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    return 0


def cmd_train(args):
    from ..mri.training.train import train

    exclude = list(args.exclude)
    if not 0.0 <= args.synthetic <= 1.0:
        raise InputError("--synthetic is a share between 0 and 1.")
    if not args.bids and args.synthetic < 1.0:
        raise InputError("--bids is required unless --synthetic 1 (synthetic data only).")
    if args.subjects:
        from ..mri.training.dataset import find_bids_pairs

        wanted = {s if s.startswith("sub-") else f"sub-{s}" for s in args.subjects}
        everyone = {sub for sub, _, _ in find_bids_pairs(args.bids, args.contrast)}
        if wanted - everyone:
            raise InputError(f"Subjects not in the dataset: {', '.join(sorted(wanted - everyone))}")
        exclude += sorted(everyone - wanted)
    for folder in args.labels or []:
        if not Path(folder).is_dir():
            raise InputError(f"Labels folder not found: {folder}")
    path = train(args.out, bids=args.bids, pam50=args.pam50 or None, architecture=args.architecture,
                 steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                 time_budget_s=args.time_budget_min * 60, exclude=tuple(exclude),
                 labels=args.labels, qc=args.qc,
                 n_phantoms=args.phantoms, name=args.name, contrast=args.contrast,
                 synthetic=args.synthetic, init=args.init, learning_rate=args.learning_rate,
                 log=lambda m: print(m, flush=True))
    print(f"saved {path}")
    return 0


def cmd_export_onnx(args):
    from ..io.onnx_export import run

    return run(args.models)


def cmd_phantom(args):
    from ..io.images import write_image_atomic
    from ..mri.phantom import make_phantom
    from ..mri.synthetic_samples import synthetic_volume

    if args.synthetic:
        volume, discs = synthetic_volume(seed=args.seed, family=args.synthetic)
    else:
        volume, discs = make_phantom(seed=args.seed)
    write_image_atomic(volume.to_sitk(), args.output)
    for value, point in sorted(discs.items()):
        print(f"disc {value}: RAS {point.round(1).tolist()}")
    return 0


def cmd_stress(args):
    from ..mri.stress import VARIANTS, write_stress_dataset

    if not Path(args.bids).is_dir():
        raise InputError(f"BIDS folder not found: {args.bids}")
    folders = write_stress_dataset(args.bids, args.out, variants=args.variants or VARIANTS,
                                   seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps([str(f) for f in folders], indent=2))
    return 0


HANDLERS = {"label": cmd_label, "evaluate": cmd_evaluate, "train": cmd_train,
            "export-onnx": cmd_export_onnx, "phantom": cmd_phantom, "stress": cmd_stress}


def register(sub) -> None:
    """The MRI subcommands, each with its ``handler`` default."""
    for add in (_add_label, _add_evaluate, _add_train, _add_export_onnx, _add_phantom, _add_stress):
        add(sub)
    for name, handler in HANDLERS.items():
        sub.choices[name].set_defaults(handler=handler)
