"""The chain decoding's weights (level head, anchor heads, flip averaging), and how well the
"chain could be shifted" flag covers shifts.

``--weights``: SMAPE, corner error and level-shift rate for each decoding setting (``level_weight``,
``anchor_weight`` and ``tta_flip`` in the model's .json; "plain" = the 17 strongest peaks).
``--ends MODEL``: decode with that end classifier's readings instead of the anchor heads' (the
anchor weights are then ``end_weight``).  It is trained without these 80 images.

Every option and threshold is chosen on the 80 training images this script draws (seed 0, as
``xray_postprocessing.py``); the validation split is printed beside them, never used to choose.
Per image: the whole-level shift of the decoded chain against the truth
(``xray.evaluate.level_shift``) and whether the flag is raised.

    .venv/bin/python benchmark/xray_level_flag.py [MODEL] [--weights] [--grid]
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "VertebralLabeling"))

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.xray import aasce  # noqa: E402
from VertebralLabelingLib.xray import data as xray_data  # noqa: E402
from VertebralLabelingLib.xray import label as xray_label  # noqa: E402
from VertebralLabelingLib.xray.aasce import choosing_images  # noqa: E402
from VertebralLabelingLib.xray.ends import EndClassifier  # noqa: E402
from VertebralLabelingLib.xray.evaluate import level_shift, smape  # noqa: E402

LEVEL_WEIGHTS = (0.0, 0.1, 0.25, 0.5)
ANCHOR_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
FLIPS = (False, True)


def _setting(labeler, flip, level_weight, anchor_weight):
    labeler.flip, labeler.level_weight = flip, level_weight
    labeler.anchor_weight = labeler.end_weight = anchor_weight


#: The end classifier's readings of the current radiograph, per candidate set.
_END_MEMORY = {}


def _decode(labeler, radiograph):
    """(decoded chain, input->pixel matrix) of one radiograph; the end classifier's readings are
    remembered per candidate set (decoding settings that share candidates reuse them)."""
    image, matrix = xray_data.prepare_input(radiograph, labeler.shape)
    source, _, to_source = labeler.crop_source(radiograph, matrix)
    reader = labeler.end_reader(source, to_source)
    if reader is not None:
        if _END_MEMORY.get("image") is not radiograph:
            _END_MEMORY.clear()
            _END_MEMORY["image"] = radiograph

        def remembered(candidates, read=reader):
            key = np.asarray(candidates, np.float32).tobytes()
            if key not in _END_MEMORY:
                _END_MEMORY[key] = read(candidates)
            return _END_MEMORY[key]
        reader = remembered
    return labeler.decode_input(image, reader), matrix


def _remember_network(labeler):
    """Run the network once per image and flip setting (decoding settings reuse its outputs)."""
    run, memory = labeler._network, {}

    def network(batch):
        key = (batch.shape, float(batch[0, ::7, ::7].sum()))
        if key not in memory:
            memory.clear()
            memory[key] = run(batch)
        return memory[key]
    labeler._network = network


def weight_table(labeler, aset, indices):
    """Per (flip, level weight, anchor weight): rows of (SMAPE, corner error, shifted) per image."""
    anchored = len(labeler.model.output_channels) > 3 or labeler.end_classifier is not None
    settings = list(itertools.product(FLIPS, LEVEL_WEIGHTS, ANCHOR_WEIGHTS if anchored else (0.0,)))
    rows = {}
    _remember_network(labeler)
    for index in indices:
        radiograph = xray_data.read_radiograph(aset.image_path(index))
        truth = aset.landmarks[index] * [radiograph.width, radiograph.height]
        for setting in settings:
            _setting(labeler, *setting)
            decoded, matrix = _decode(labeler, radiograph)
            points = xray_data.apply(matrix, decoded.corners)
            rows.setdefault(setting, []).append((
                smape(xray_label.cobb_from_points(points, radiograph).angles_deg, aset.angles[index]),
                np.linalg.norm(points - truth, axis=1).mean(), level_shift(points, truth) != 0))
    return {key: np.array(v, float) for key, v in rows.items()}


def measure(labeler, aset, indices):
    """Per image: shifted, median level residual, weaker end peak, weaker anchor end, and the
    anchor margin (end reading less the best rival's, the smaller of T1 and L5)."""
    rows = []
    for index in indices:
        radiograph = xray_data.read_radiograph(aset.image_path(index))
        decoded, matrix = _decode(labeler, radiograph)
        truth = aset.landmarks[index] * [radiograph.width, radiograph.height]
        shifted = level_shift(xray_data.apply(matrix, decoded.corners), truth) != 0
        residuals = decoded.level_residuals()
        median = float(np.median(residuals)) if residuals is not None else 0.0
        ends = decoded.anchor_ends if decoded.anchor_ends is not None else np.ones(2)
        margin = ends - decoded.anchor_rivals if decoded.anchor_rivals is not None else np.ones(2)
        rows.append((shifted, median, float(min(decoded.peaks[0], decoded.peaks[-1])), ends.min(), margin.min()))
    return np.array(rows, float)


def flagged(rows, low, high, end_peak, anchor_review, rivals=True):
    return ((rows[:, 1] < low) | (rows[:, 1] > high) | (rows[:, 2] < end_peak) | (rows[:, 3] < anchor_review)
            | (rivals & (rows[:, 4] <= 0)))


def coverage(rows, *rule):
    shifted, flags = rows[:, 0] > 0, flagged(rows, *rule)
    return (f"shifted {shifted.sum():.0f}/{len(rows)}, caught {np.sum(flags & shifted):.0f}, "
            f"missed {np.sum(~flags & shifted):.0f}, flagged {flags.mean():.0%}")


def choose_rule(rows):
    """The rule that misses the fewest shifted training chains, then flags the fewest images."""
    shifted = rows[:, 0] > 0
    anchor_levels = np.arange(0.0, 0.95, 0.1).round(1)
    rules = itertools.product((-np.inf, -0.1, 0.0, 0.05), (0.35, np.inf), (0.0, 0.3), anchor_levels,
                              (False, True))
    return min(rules, key=lambda r: (np.sum(~flagged(rows, *r) & shifted), flagged(rows, *r).mean()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="xray-compact")
    parser.add_argument("--grid", action="store_true", help="choose the flag rule on training images")
    parser.add_argument("--weights", action="store_true", help="also print the decoding-weight table")
    parser.add_argument("--ends", help="decode with this end classifier (.onnx/.keras) instead of the anchor heads")
    args = parser.parse_args()
    aset = aasce.load_aasce(data_dir=data_root() / "xray-aasce")
    train, val = aasce.split_names(aset.names)
    train_idx, val_idx = choosing_images(aset, train), aset.indices_of(val)
    labeler = xray_label.XrayLabeler.load(args.model)
    if args.ends:
        labeler.end_classifier = EndClassifier.load(args.ends)
    shipped = (labeler.flip, labeler.level_weight,
               labeler.end_weight if labeler.end_classifier is not None else labeler.anchor_weight)
    if args.weights:
        tables = {name: weight_table(labeler, aset, idx) for name, idx in (("train", train_idx), ("val", val_idx))}
        best = min(tables["train"], key=lambda k: (tables["train"][k][:, 2].mean(), tables["train"][k][:, 0].mean()))
        for key, v in tables["train"].items():
            w = tables["val"][key]
            print(f"flip {key[0]!s:5} level {key[1]:4} anchor {key[2]:3}: train SMAPE {v[:, 0].mean():5.2f} %, corner "
                  f"{v[:, 1].mean():5.1f} px, shifted {v[:, 2].mean():5.1%} | val SMAPE {w[:, 0].mean():5.2f} %, "
                  f"corner {w[:, 1].mean():5.1f} px, shifted {w[:, 2].mean():5.1%}")
        print(f"lowest training shift rate (then SMAPE): flip {best[0]}, level weight {best[1]}, "
              f"anchor weight {best[2]}")
    _setting(labeler, *shipped)
    on_train, on_val = measure(labeler, aset, train_idx), measure(labeler, aset, val_idx)
    shipped_rule = labeler.flag_rule
    rule = (*shipped_rule.residual_range, shipped_rule.end_peak, shipped_rule.anchor_review, shipped_rule.anchor_rivals)
    if args.grid:
        chosen = choose_rule(on_train)
        print(f"chosen on training images (flag_rule): residual in [{chosen[0]}, {chosen[1]}], "
              f"end peak >= {chosen[2]}, "
              f"anchor ends >= {chosen[3]}, rival check {chosen[4]}:\n  train {coverage(on_train, *chosen)}\n"
              f"  val {coverage(on_val, *chosen)}")
    print(f"shipped rule, {len(on_train)} training images: {coverage(on_train, *rule)}")
    print(f"shipped rule, {len(on_val)} validation images: {coverage(on_val, *rule)}")


if __name__ == "__main__":
    main()
