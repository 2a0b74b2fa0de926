"""Does the vertebra refiner (``xray.refine``) help, and with which settings?

For each image the first stage's corners (MODEL, without a refiner) are refined with each setting
(mirror averaging on/off, 1 or 2 passes); SMAPE, mean corner error and mean |tilt error| per
vertebra are printed for the 80 training images the X-ray options are chosen on (seed 0, as
``xray_postprocessing.py``) and for the validation split, which is shown and never used to choose.
The refiner was trained on the training images, so its training-image figures flatter it; the
rule is written down before the validation figures are seen: use it when it lowers the training
SMAPE, with the setting that lowers it most.

    .venv/bin/python benchmark/xray_refiner.py MODEL REFINER [--with OTHER_REFINER ...]
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
from VertebralLabelingLib.xray.aasce import choosing_images  # noqa: E402
from VertebralLabelingLib.xray.decode import vertebra_tilts  # noqa: E402
from VertebralLabelingLib.xray.evaluate import smape  # noqa: E402
from VertebralLabelingLib.xray.label import XrayLabeler, cobb_from_points  # noqa: E402
from VertebralLabelingLib.xray.refine import Refiner, tilt_error_deg  # noqa: E402
from VertebralLabelingLib.xray.refine import load as load_refiner  # noqa: E402

SETTINGS = [None] + list(itertools.product((False, True), (1, 2)))  # None: the first stage alone


def scores(points, truth, radiograph, reference):
    tilt = tilt_error_deg(vertebra_tilts(points), vertebra_tilts(truth))
    return (smape(cobb_from_points(points, radiograph).angles_deg, reference),
            float(np.linalg.norm(points - truth, axis=1).mean()), float(tilt.mean()))


def table(labeler, refiner, aset, indices):
    rows = {setting: [] for setting in SETTINGS}
    for index in indices:
        radiograph = xray_data.read_radiograph(aset.image_path(index))
        truth = aset.landmarks[index] * [radiograph.width, radiograph.height]
        first = labeler.label(radiograph).points_px
        for setting in SETTINGS:
            points = first
            if setting is not None:
                refiner.flip, refiner.passes = setting
                points = refiner.refine(radiograph, first)
            rows[setting].append(scores(points, truth, radiograph, aset.angles[index]))
    return {k: np.array(v) for k, v in rows.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="first-stage model (.onnx or .keras, or a bundled name)")
    parser.add_argument("refiner", help="refiner model (.onnx or .keras)")
    parser.add_argument("--with", dest="members", nargs="*", default=[],
                        help="more refiners whose outputs are averaged with it (an ensemble)")
    args = parser.parse_args()
    aset = aasce.load_aasce(data_dir=data_root() / "xray-aasce")
    train, val = aasce.split_names(aset.names)
    labeler = XrayLabeler.load(args.model)
    labeler.refiner = None
    refiner = Refiner.load(args.refiner)
    if args.members:
        members = [load_refiner(path)[0] for path in args.members]
        refiner = Refiner(refiner.networks[0], refiner.meta, [*refiner.networks[1:], *members])
    tables = {name: table(labeler, refiner, aset, idx)
              for name, idx in (("train", choosing_images(aset, train)), ("val", aset.indices_of(val)))}
    for setting in SETTINGS:
        name = "first stage only" if setting is None else f"refined, flip {setting[0]!s:5}, passes {setting[1]}"
        t, v = tables["train"][setting].mean(axis=0), tables["val"][setting].mean(axis=0)
        print(f"{name:34s} train SMAPE {t[0]:5.2f} %, corner {t[1]:5.1f} px, tilt {t[2]:4.2f} deg | "
              f"val SMAPE {v[0]:5.2f} %, corner {v[1]:5.1f} px, tilt {v[2]:4.2f} deg")
    best = min(SETTINGS, key=lambda s: tables["train"][s][:, 0].mean())
    print(f"chosen on training images: {'no refiner' if best is None else best}")


if __name__ == "__main__":
    main()
