"""How the MRI disc labeler does on data it did not learn from: one table, printed and saved.

Rows (each scored per ground-truth disc by ``evaluate``):
* synthetic-only model -> the real shared subjects (no real image in its training);
* leave-one-subject-out folds trained with synthetic data (each subject labeled by the fold
  that never saw it; sub-sctcrop by the errsm18 fold, no fold saw it);
* every stress variant of the real subjects (``vertebral-labeling stress``), labeled by the
  same leave-one-subject-out folds, and by the synthetic-only model;
* the shipped model on its own training subjects (friendly, for reference only).

Columns: discs, mean sagittal error, identification, silent errors (wrong -- not identified
or > 5 mm off -- and not flagged), flag rate, and how often a disc with confidence >= 0.5 is
right.  Usage::

    python benchmark/evaluate_generalisation.py [--models DIR] [--stress DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "VertebralLabeling"))

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.mri import labeling  # noqa: E402
from VertebralLabelingLib.mri.evaluate import evaluate, fold_models  # noqa: E402
from VertebralLabelingLib.mri.stress import VARIANTS, write_stress_dataset  # noqa: E402

MODELS = ROOT / "VertebralLabeling" / "Resources" / "Models"


def row(name: str, model: str, metrics: dict) -> dict:
    keys = ("n_discs", "mean_error_sagittal_mm", "identification_rate", "silent_errors",
            "silent_error_rate", "flag_rate", "correct_when_confident", "n_confident")
    return dict(set=name, model=model, **{k: metrics.get(k) for k in keys})


def markdown(rows: list[dict]) -> str:
    lines = ["| set | model | discs | mean sagittal error (mm) | identified | silent errors | "
             "flagged | right when confidence ≥ 0.5 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        conf = "–" if r["correct_when_confident"] is None else \
            f"{r['correct_when_confident']:.0%} of {r['n_confident']}"
        lines.append(f"| {r['set']} | {r['model']} | {r['n_discs']} | {r['mean_error_sagittal_mm']:.2f} | "
                     f"{r['identification_rate']:.0%} | {r['silent_errors']} | {r['flag_rate']:.0%} | {conf} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=MODELS, help="folder with compact-synthetic "
                        "and loso/ fold models")
    parser.add_argument("--stress", type=Path, help="stress datasets (made here when missing)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="write all metrics here")
    parser.add_argument("--confident-peak", type=float, default=labeling.CONFIDENT_PEAK,
                        help="contrast test-time augmentation: mean peak the inverted run needs to be used "
                        "(default: the labeler's; 0 = whenever it is surer, inf = never, i.e. no augmentation)")
    args = parser.parse_args(argv)
    labeling.CONFIDENT_PEAK = args.confident_peak  # the design comparison of the README

    bids = data_root() / "mri" / "bids"
    stress_dir = args.stress or Path(tempfile.mkdtemp(prefix="vl-stress-"))
    missing = [v for v in args.variants if not (stress_dir / v / "dataset_description.json").exists()]
    if missing:
        write_stress_dataset(bids, stress_dir, variants=missing, log=lambda m: print(m, file=sys.stderr))
    synthetic = args.models / "compact-synthetic.onnx"
    folds = fold_models(args.models / "loso")
    # sub-sctcrop is in no fold's training set: any fold is honest for it.
    folds.setdefault("sub-sctcrop", next(iter(folds.values())))
    quiet = lambda message: print(message, file=sys.stderr)  # noqa: E731
    rows, details = [], {}

    def run(name, label, **kwargs):
        metrics = evaluate(kwargs.pop("bids", bids), log=quiet, **kwargs)
        details[f"{name} / {label}"] = metrics
        rows.append(row(name, label, metrics))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        if args.json:  # after every row: a long run that stops early keeps what it measured
            args.json.write_text(json.dumps({"rows": rows, "details": details}, indent=2) + "\n")

    run("real, synthetic-only model", "compact-synthetic", model=synthetic)
    run("real, leave-one-subject-out", "loso folds", model=synthetic, model_for_subject=folds)
    for variant in args.variants:
        run(f"stress: {variant}", "loso folds", bids=stress_dir / variant, model=synthetic,
            model_for_subject=folds)
        run(f"stress: {variant}", "compact-synthetic", bids=stress_dir / variant, model=synthetic)
    run("real, training subjects (friendly)", "compact (shipped)", model=args.models / "compact.onnx")
    print()
    print(markdown(rows))
    worst = [r for r in rows if "friendly" not in r["set"]]
    print(f"\nworst identification {min(r['identification_rate'] for r in worst):.0%}, "
          f"silent errors {sum(r['silent_errors'] for r in worst)} over "
          f"{sum(r['n_discs'] for r in worst)} held-out discs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
