"""The level head's decoding weight, and how well the "chain could be shifted" flag covers shifts.

``--weights``: SMAPE, corner error and level-shift rate for each weight of the level term in the
chain decoding (``level_weight`` in the model's .json; "plain" = the 17 strongest peaks).

The flag's thresholds (``xray.label.LEVEL_RESIDUAL_RANGE``, ``END_PEAK_REVIEW``) were chosen on the
80 training images this script draws (seed 0, as ``xray_postprocessing.py``); the validation split
is reported beside them, never used to choose.  Per image: the whole-level shift of the decoded
chain against the truth (``xray.evaluate.level_shift``) and whether the flag is raised.

    .venv/bin/python benchmark/xray_level_flag.py [MODEL] [--grid]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "VertebralLabeling"))

from xray_postprocessing import choosing_images  # noqa: E402  (this folder: the same 80 images)

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.xray import aasce  # noqa: E402
from VertebralLabelingLib.xray import data as xray_data  # noqa: E402
from VertebralLabelingLib.xray import label as xray_label  # noqa: E402
from VertebralLabelingLib.xray.evaluate import level_shift, smape  # noqa: E402

WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0)


def weight_table(labeler, aset, indices):
    """Per level weight (and "plain"): mean SMAPE, mean and median corner error, level-shift rate."""
    rows = {}
    for index in indices:
        radiograph = xray_data.read_radiograph(aset.image_path(index))
        image, matrix = xray_data.prepare_input(radiograph, labeler.shape)
        heat, offsets, level = (out[0, ..., 0] if out.shape[-1] == 1 else out[0]
                                for out in labeler._network(image[None, ..., None].astype(np.float32)))
        truth = aset.landmarks[index] * [radiograph.width, radiograph.height]
        chains = {"plain": xray_label.decode(heat, offsets)[0]}
        chains.update({w: xray_label.decode_levels(heat, offsets, level, level_weight=w).corners for w in WEIGHTS})
        for key, corners in chains.items():
            points = xray_data.apply(matrix, corners)
            rows.setdefault(key, []).append((
                smape(xray_label.cobb_from_points(points, radiograph).angles_deg, aset.angles[index]),
                np.linalg.norm(points - truth, axis=1).mean(), level_shift(points, truth) != 0))
    return {key: np.array(v, float) for key, v in rows.items()}


def measure(labeler, aset, indices):
    """(shifted, median level residual, weaker end peak) per image."""
    rows = []
    for index in indices:
        radiograph = xray_data.read_radiograph(aset.image_path(index))
        image, matrix = xray_data.prepare_input(radiograph, labeler.shape)
        decoded = labeler.decode_input(image)
        truth = aset.landmarks[index] * [radiograph.width, radiograph.height]
        shifted = level_shift(xray_data.apply(matrix, decoded.corners), truth) != 0
        residuals = decoded.level_residuals()
        median = float(np.median(residuals)) if residuals is not None else 0.0
        rows.append((shifted, median, float(min(decoded.peaks[0], decoded.peaks[-1]))))
    return np.array(rows, float)


def coverage(rows, low, high, end_peak):
    shifted = rows[:, 0] > 0
    flagged = (rows[:, 1] < low) | (rows[:, 1] > high) | (rows[:, 2] < end_peak)
    return (f"shifted {shifted.sum():.0f}/{len(rows)}, caught {np.sum(flagged & shifted):.0f}, "
            f"missed {np.sum(~flagged & shifted):.0f}, flagged {flagged.mean():.0%}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="xray-compact")
    parser.add_argument("--grid", action="store_true", help="also print the thresholds tried on training images")
    parser.add_argument("--weights", action="store_true", help="also print the level-weight table")
    args = parser.parse_args()
    aset = aasce.load_aasce(data_dir=data_root() / "xray-aasce")
    train, val = aasce.split_names(aset.names)
    train_idx = choosing_images(aset, train)
    labeler = xray_label.XrayLabeler.load(args.model)
    if args.weights:
        for name, indices in (("train", train_idx), ("val", aset.indices_of(val))):
            for key, v in weight_table(labeler, aset, indices).items():
                print(f"{name} level weight {key}: SMAPE {v[:, 0].mean():.2f} %, corner error mean "
                      f"{v[:, 1].mean():.1f} px, median {np.median(v[:, 1]):.1f} px, shifted {v[:, 2].mean():.1%}")
    on_train, on_val = measure(labeler, aset, train_idx), measure(labeler, aset, aset.indices_of(val))
    low, high = xray_label.LEVEL_RESIDUAL_RANGE
    if args.grid:
        for lo in (-0.15, -0.1, -0.05, 0.0, 0.05):
            for end_peak in (0.0, 0.3):
                print(f"train, residual < {lo:5.2f} or > {high}, end peak < {end_peak}: "
                      f"{coverage(on_train, lo, high, end_peak)}")
    print(f"shipped rule, 80 training images:   {coverage(on_train, low, high, xray_label.END_PEAK_REVIEW)}")
    print(f"shipped rule, {len(on_val)} validation images: {coverage(on_val, low, high, xray_label.END_PEAK_REVIEW)}")


if __name__ == "__main__":
    main()
