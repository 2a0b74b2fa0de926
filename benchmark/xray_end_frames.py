"""How well an end classifier (``xray.ends``) names the levels on the *true* chains: for each image
the labelled chain is moved by −2 … +2 levels (``ends.shifted_chain``, extrapolating beyond its
ends) and the classifier's scores (``ends.shift_scores``) pick one shift.  Printed for the 80
choosing images and the validation split: the share where the joint pick (all the classifier's
names) is not 0, and for each name alone the share where it does not pick 0 among −1, 0, +1.

This is the ceiling of the shift check (``benchmark/xray_shift_check.py``), free of the first
stage's geometry.  ``--repaired-labels`` scores against the label chains put in order
(``aasce.repair_order``; broken chains left out).

    .venv/bin/python benchmark/xray_end_frames.py runs/xray_ends/xray-ends.onnx [--repaired-labels]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "VertebralLabeling"))

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.xray import aasce, ends, refine  # noqa: E402
from VertebralLabelingLib.xray import data as xray_data  # noqa: E402


def picks(classifier, aset, index) -> list:
    """The shift picked jointly (max shift 2), then by each name alone (max shift 1)."""
    radiograph = xray_data.read_radiograph(aset.image_path(index))
    source, source_to_pixel = refine.source_image(radiograph)
    truth = aset.landmarks[index] * [radiograph.width, radiograph.height]
    chain = xray_data.apply(np.linalg.inv(source_to_pixel), truth)

    def read(names):
        return lambda candidates: classifier.readings(source, candidates, names)
    joint = ends.choose_shift(ends.shift_scores(read(classifier.outputs), chain, 2, classifier.outputs))[0]
    return [joint] + [ends.choose_shift(ends.shift_scores(read((n,)), chain, 1, (n,)))[0] for n in classifier.outputs]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("classifier")
    parser.add_argument("--repaired-labels", action="store_true")
    args = parser.parse_args()
    aset = aasce.load_aasce(data_dir=data_root() / "xray-aasce", repair=args.repaired_labels)
    classifier = ends.EndClassifier.load(args.classifier)
    train, val = aasce.split_names(aset.names)
    broken = set(aset.indices_of(aset.broken))
    for split, indices in (("choosing", aasce.choosing_images(aset, train)), ("validation", aset.indices_of(val))):
        rows = np.array([picks(classifier, aset, i) for i in indices if i not in broken]) != 0
        alone = ", ".join(f"{n} {rows[:, 1 + k].mean():.1%}" for k, n in enumerate(classifier.outputs))
        print(f"{split} ({len(rows)} images): joint shift wrong {rows[:, 0].mean():.1%}; alone wrong: {alone}")


if __name__ == "__main__":
    main()
