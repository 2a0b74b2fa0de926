"""Measure the X-ray post-processing options (flip averaging, chain decoding, tilt smoothing) of a model.

The options are chosen on TRAINING images (never on the validation split); validation numbers
for every option are printed too, for the model card, but are not used to choose.

    .venv/bin/python benchmark/xray_postprocessing.py [MODEL] [--train-images 80]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "VertebralLabeling"))

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.xray import aasce  # noqa: E402
from VertebralLabelingLib.xray import data as xray_data  # noqa: E402
from VertebralLabelingLib.xray.aasce import choosing_images  # noqa: E402
from VertebralLabelingLib.xray.decode import smooth_tilts  # noqa: E402
from VertebralLabelingLib.xray.evaluate import level_shift, smape  # noqa: E402
from VertebralLabelingLib.xray.label import XrayLabeler, cobb_from_points  # noqa: E402

SMOOTHING = (0.0, 0.25, 0.5, 0.75, 1.0)
CHAIN = (0.0, 1.0)


def run(labeler, aset, indices, log):
    rows = {}
    for n, index in enumerate(indices):
        radiograph = xray_data.read_radiograph(aset.image_path(index))
        image, matrix = xray_data.prepare_input(radiograph, labeler.shape)
        truth_px = aset.landmarks[index] * [radiograph.width, radiograph.height]
        for flip in (False, True):
            for chain in CHAIN:
                labeler.flip, labeler.chain, labeler.tilt_smoothing = flip, chain, 0.0
                corners, _ = labeler.predict_input(image)
                for weight in SMOOTHING:
                    c = smooth_tilts(corners, weight) if weight else corners
                    pts = xray_data.apply(matrix, c)
                    s = smape(cobb_from_points(pts, radiograph).angles_deg, aset.angles[index])
                    err = float(np.linalg.norm(pts - truth_px, axis=1).mean())
                    shifted = level_shift(pts, truth_px) != 0
                    rows.setdefault((flip, chain, weight), []).append((s, err, shifted))
        if n % 20 == 0:
            log(f"{n + 1}/{len(indices)}")
    return {k: tuple(float(np.mean([r[i] for r in v])) for i in range(3)) for k, v in rows.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="xray-compact")
    parser.add_argument("--train-images", type=int, default=80)
    parser.add_argument("--json")
    args = parser.parse_args()
    aset = aasce.load_aasce(data_dir=data_root() / "xray-aasce")
    train, val = aasce.split_names(aset.names)
    train_idx = choosing_images(aset, train, args.train_images)
    labeler = XrayLabeler.load(args.model)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    start = time.time()
    on_train = run(labeler, aset, train_idx, log)
    on_val = run(labeler, aset, aset.indices_of(val), log)
    best = min(on_train, key=lambda k: on_train[k][0])
    print(f"{'flip':>5} {'chain':>5} {'smooth':>6} | train SMAPE  err px shifted | val SMAPE  err px shifted")
    for key in sorted(on_train):
        mark = "  <- chosen on train" if key == best else ""
        print(f"{str(key[0]):>5} {key[1]:5.1f} {key[2]:6.2f} | {on_train[key][0]:10.2f} {on_train[key][1]:7.1f} "
              f"{on_train[key][2]:7.1%} | {on_val[key][0]:9.2f} {on_val[key][1]:7.1f} {on_val[key][2]:7.1%}{mark}")
    print(f"chosen on {len(train_idx)} training images: tta_flip={best[0]}, chain_decoding={best[1]}, "
          f"tilt_smoothing={best[2]} ({time.time() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "chosen": {"tta_flip": best[0], "chain_decoding": best[1], "tilt_smoothing": best[2]},
            "train_images": len(train_idx),
            "table": [{"tta_flip": k[0], "chain_decoding": k[1], "tilt_smoothing": k[2], "train_smape": on_train[k][0],
                       "train_error_px": on_train[k][1], "train_level_shift_rate": on_train[k][2],
                       "val_smape": on_val[k][0], "val_error_px": on_val[k][1], "val_level_shift_rate": on_val[k][2]}
                      for k in sorted(on_train)]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
