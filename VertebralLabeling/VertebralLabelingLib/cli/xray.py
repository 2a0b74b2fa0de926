"""``vertebral-labeling xray ...``: AP radiograph corners and Cobb angles on the command line.

Registered by ``cli.main.parser()`` (``register(sub)``).  Subcommands: ``label``, ``cobb``,
``evaluate``, ``train``; each imports the X-ray code when it runs (SimpleITK, scipy, ONNX Runtime
or TensorFlow), so ``--help`` answers at once.  User errors raise InputError/ModelError (one
``error:`` line, exit status 2); outputs are written only after labeling succeeded, each
atomically, and an existing output is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.files import MARKUPS_SUFFIX, data_root, write_json

#: The refiner heads (``xray.refine.HEADS``, not imported here: it would slow every command's start).
REFINER_HEADS = ("dense", "heatmap")


def register(sub) -> None:
    xray = sub.add_parser("xray", help="AP spine X-ray: vertebral corners (T1-L5) and Cobb angles")
    xsub = xray.add_subparsers(dest="xray_command", required=True)

    p = xsub.add_parser("label", help="68 vertebral corners and the three Cobb angles of one radiograph")
    p.add_argument("input", help="image file (JPEG, PNG, DICOM, NRRD, ...; 8/16-bit; gray or RGB)")
    p.add_argument("-o", "--output", help="markups file to write (.mrk.json)")
    p.add_argument("--json", help="also write the angles and end vertebrae (JSON)")
    p.add_argument("--csv", help="also write the 68 points as CSV")
    p.add_argument("--qc", help="also write a QC picture (PNG)")
    p.add_argument("--markups", help="manual mode: take the 68 corners from this .mrk.json "
                   "(e.g. corrected in Slicer) instead of running the model")
    p.add_argument("--model", default="xray-compact",
                   help="bundled model name (runs its .onnx), or a .onnx or .keras path")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(handler=cmd_label)

    p = xsub.add_parser("cobb", help="Cobb angles from the ground-truth landmarks of an AASCE folder")
    p.add_argument("--images", required=True, help="folder of radiographs (gives the pixel sizes)")
    p.add_argument("--labels", required=True, help="folder with filenames.csv, landmarks.csv, angles.csv")
    p.add_argument("--json", required=True, help="where to write the comparison")
    p.add_argument("--split", default="all", choices=["all", "train", "val"])
    p.add_argument("--files", help="text file of image names to use (one a line)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=cmd_cobb)

    p = xsub.add_parser("evaluate", help="landmark model accuracy on an AASCE folder")
    p.add_argument("--images", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--json", required=True, help="where to write the metrics")
    p.add_argument("--model", default="xray-compact")
    p.add_argument("--split", default="all", choices=["all", "train", "val"],
                   help="the fixed patient-level split of the training code (default: all images)")
    p.add_argument("--files", help="text file of image names to use (overrides --split)")
    p.add_argument("--limit", type=int, help="only the first N selected images")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=cmd_evaluate)

    _register_training(xsub)


def _training_parser(xsub, command, help_text, name, batch_size, budget_min, handler):
    """A training command's parser with the arguments both trainers take."""
    p = xsub.add_parser(command, help=help_text)
    p.add_argument("--data", default=str(data_root() / "xray-aasce"),
                   help="AASCE folder holding images/ and labels/")
    p.add_argument("--out", required=True, help="folder for NAME.keras + NAME.json")
    p.add_argument("--name", default=name)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--time-budget-min", type=float, default=budget_min)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--cache-dir", default="runs/xray_cache", help="where preprocessed arrays are cached")
    p.add_argument("--labels-as-stored", action="store_true",
                   help="train on the label chains as stored, even those out of top-to-bottom order "
                        "(as the shipped models were); by default they are put in order or left out")
    p.set_defaults(handler=handler)
    return p


def _register_training(xsub) -> None:
    p = _training_parser(xsub, "train", "train the landmark network on an AASCE folder", "xray-compact", 8,
                         40.0, cmd_train)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--init", help="start from this model (.keras) instead of random weights")
    p.add_argument("--anchor-head", action="store_true",
                   help="add the T1 and L5 anchor heatmaps (kept when --init has them)")
    p.add_argument("--flip-probability", type=float, default=0.0,
                   help="chance that a training sample is mirrored left-right (default 0)")
    p.add_argument("--augment-strength", type=float, default=1.0,
                   help="scale of the random scale, rotation and shift (default 1)")
    p.add_argument("--folds", type=int, default=0, help="with --fold: leave out one of this many patient folds")
    p.add_argument("--fold", type=int, default=0, help="the patient fold of the training split to leave out")
    p.add_argument("--hold-out-choosing", action="store_true",
                   help="leave out the 80 training images the decoding and flag choices are made on")
    p = _training_parser(xsub, "train-refiner", "train the second stage that refines each vertebra on a crop",
                         "xray-refine", 64, 30.0, cmd_train_refiner)
    p.add_argument("--init", help="continue from this refiner (.keras)")
    p.add_argument("--head", choices=REFINER_HEADS, default="dense",
                   help="dense regression or per-corner heatmaps read by soft-argmax (default dense)")
    p.add_argument("--hold-out-choosing", action="store_true",
                   help="leave out the 80 training images the settings are chosen on")
    p = _training_parser(xsub, "train-ends", "train the classifier that finds T1 and L5 among the candidates",
                         "xray-ends", 32, 40.0, cmd_train_ends)
    p.add_argument("--no-hold-out", action="store_true",
                   help="train on the 80 training images the decoding choices are made on too")
    p.add_argument("--crop", type=float, nargs=3, metavar=("ROWS", "COLS", "WIDTH_PX"), default=None,
                   help="field of view: crop rows and columns, and crop pixels per vertebra width "
                        "(default 128 160 28)")
    p.add_argument("--with-t12", action="store_true",
                   help="also name T12, the last rib's vertebra (a third output)")


def _refuse_existing(paths, overwrite):
    existing = [str(p) for p in paths if p and Path(p).exists()]
    if existing and not overwrite:
        raise InputError(f"Output exists: {', '.join(existing)}. It may hold corrections; "
                         "pass --overwrite to replace it.")


def cmd_label(args) -> int:
    from ..xray import export as xray_export
    from ..xray.cobb import N_VERTEBRAE
    from ..xray.data import read_radiograph
    from ..xray.label import XrayLabeler, XrayResult, cobb_from_physical

    if args.output and not args.output.endswith(MARKUPS_SUFFIX):
        raise InputError(f"The output file name must end with {MARKUPS_SUFFIX}")
    if not any((args.output, args.json, args.csv, args.qc)):
        raise InputError("Nothing to write: give -o OUT.mrk.json and/or --json, --csv, --qc.")
    from ..io.outputs import check_outputs, write_all

    check_outputs([("-o", args.output), ("--json", args.json), ("--csv", args.csv), ("--qc", args.qc)],
                  inputs=[args.input, args.markups], overwrite=args.overwrite)
    radiograph = read_radiograph(args.input)
    if args.markups:
        points = xray_export.read_markups_json(args.markups)
        result = XrayResult(radiograph.physical_to_pixel(points), points, np.ones(N_VERTEBRAE),
                            cobb_from_physical(points, radiograph), radiograph)
        confidence = level_review = None
    else:
        labeler = XrayLabeler.load(args.model)
        result = labeler.label(radiograph)
        confidence, level_review = result.confidence, result.level_review
    jobs = []
    if args.output:
        jobs.append((args.output, lambda p: xray_export.write_markups_json(
            result.points, p, confidence, radiograph.slice_z, level_review)))
    if args.csv:
        jobs.append((args.csv, lambda p: xray_export.write_csv(
            result.points, p, result.points_px, confidence, radiograph.slice_z)))
    if args.json:
        jobs.append((args.json, lambda p: xray_export.write_angles_json(result.cobb, p, {
            "image": str(args.input), "pixel_spacing": list(radiograph.spacing),
            "source": "markups" if args.markups else str(args.model),
            # the chain could sit a whole level off (T1 on C7): end vertebrae need a check
            "level_uncertain": bool(result.level_uncertain), "uncertain_levels": result.uncertain_levels,
            "warnings": list(result.warnings)})))
    if args.qc:
        jobs.append((args.qc, lambda p: xray_export.write_qc_png(
            radiograph.array, result.points_px, result.cobb, p, confidence)))
    write_all(jobs)  # all or nothing
    for column, angle, (upper, lower) in zip(xray_export.ANGLE_COLUMNS, result.cobb.angles_deg,
                                             result.cobb.end_vertebrae):
        print(f"{column:5s} {angle:6.1f} deg  {upper}-{lower}  ({xray_export.curve_region(upper, lower)})")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.markups:
        print(f"labeled in {result.seconds:.2f} s")
    return 0


def cmd_train_refiner(args) -> int:
    from ..xray.refine_train import train

    path = train(args.out, args.data, name=args.name, seed=args.seed, batch_size=args.batch_size,
                 steps=args.steps, time_budget_s=args.time_budget_min * 60, learning_rate=args.learning_rate,
                 cache_dir=args.cache_dir, log=lambda m: print(m, flush=True), command=_command_line(), init=args.init,
                 head=args.head, hold_out_choosing=args.hold_out_choosing,
                 repair_labels=not args.labels_as_stored)
    print(f"saved {path}")
    return 0


def cmd_train_ends(args) -> int:
    from ..xray.ends_train import train

    path = train(args.out, args.data, name=args.name, seed=args.seed, batch_size=args.batch_size,
                 steps=args.steps, time_budget_s=args.time_budget_min * 60, learning_rate=args.learning_rate,
                 cache_dir=args.cache_dir, log=lambda m: print(m, flush=True), command=_command_line(),
                 hold_out_choosing=not args.no_hold_out, repair_labels=not args.labels_as_stored,
                 outputs=("T1", "T12", "L5") if args.with_t12 else ("T1", "L5"),
                 **_crop_options(args.crop))
    print(f"saved {path}")
    return 0


def _crop_options(crop) -> dict:
    """``--crop ROWS COLS WIDTH_PX`` as the end classifier trainer's keyword arguments."""
    if crop is None:
        return {}
    rows, cols, width = crop
    if min(rows, cols) < 32 or width <= 0:
        raise InputError("--crop needs ROWS and COLS of at least 32 and a positive WIDTH_PX")
    return {"crop_shape": (int(rows), int(cols)), "vertebra_width": float(width)}


def _command_line() -> str:
    """The command as typed, for the model card's metadata ("" when not run from the command line)."""
    return "vertebral-labeling " + " ".join(sys.argv[1:]) if sys.argv and "xray" in sys.argv else ""


def cmd_cobb(args) -> int:
    from ..xray.evaluate import cobb_from_ground_truth

    _refuse_existing([args.json], args.overwrite)
    summary = cobb_from_ground_truth(args.images, args.labels, args.split, args.files,
                                     log=lambda m: print(m, file=sys.stderr))
    write_json(args.json, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "images"}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from ..xray.evaluate import evaluate_model

    _refuse_existing([args.json], args.overwrite)
    metrics = evaluate_model(args.images, args.labels, args.model, args.split, args.files,
                             args.limit, log=lambda m: print(m, file=sys.stderr))
    write_json(args.json, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "images"}, indent=2))
    return 0


def _check_held_out(args) -> None:
    """Refuse fold options that would otherwise be ignored."""
    if args.folds or args.fold:
        if args.folds < 2 or not 0 <= args.fold < args.folds:
            raise InputError(f"--folds needs at least 2 folds and --fold in 0..folds-1 (got {args.folds}, {args.fold})")
        if args.hold_out_choosing:
            raise InputError("--folds and --hold-out-choosing hold out different images: give one of them")


def cmd_train(args) -> int:
    from ..xray.train import train

    _check_held_out(args)
    path = train(args.out, args.data, name=args.name, seed=args.seed, batch_size=args.batch_size,
                 steps=args.steps, time_budget_s=args.time_budget_min * 60,
                 learning_rate=args.learning_rate, cache_dir=args.cache_dir,
                 checkpoint_minutes=args.checkpoint_minutes, log=lambda m: print(m, flush=True),
                 command=_command_line(), init=args.init, anchor_head=args.anchor_head,
                 flip_probability=args.flip_probability, augment_strength=args.augment_strength,
                 folds=args.folds, fold=args.fold, hold_out_choosing=args.hold_out_choosing,
                 repair_labels=not args.labels_as_stored)
    print(f"saved {path}")
    return 0
