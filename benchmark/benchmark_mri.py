"""Speed and size of the default `compact` model next to six `romero2018` regressors.

Prints one table: parameters, float32 weight size, and the median seconds per case of the
whole labeling pipeline (midsagittal search + 3-slice test-time augmentation + networks +
checks) on the real subjects of ../shared/data/mri/bids, models already loaded, after one
warm-up call per image.  romero2018 runs with freshly initialised weights: its speed and size
do not depend on training (its accuracy is not measured here, see the README).

Usage: python benchmark/benchmark_mri.py [--bids DIR] [--repeats 5]
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "VertebralLabeling"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.mri import networks as models  # noqa: E402
from VertebralLabelingLib.mri.labeling import DiscLabeler  # noqa: E402
from VertebralLabelingLib.mri.training.dataset import find_bids_pairs  # noqa: E402
from VertebralLabelingLib.mri.volume import load_volume  # noqa: E402


def seconds_per_case(labeler, volumes, repeats):
    times = []
    for volume in volumes:
        labeler.label(volume)
        for _ in range(repeats):
            start = time.perf_counter()
            labeler.label(volume)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids", default=str(data_root() / "mri" / "bids"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    volumes = [load_volume(image) for _, image, label in find_bids_pairs(args.bids) if label]
    compact = DiscLabeler.load("compact")
    romero = DiscLabeler(models.build_romero(), {"architecture": "romero2018", "name": "romero2018"})
    rows = []
    for name, labeler in (("compact (default)", compact), ("romero2018 x6", romero)):
        params = labeler.parameters
        rows.append((name, params, params * 4 / 2**20, seconds_per_case(labeler, volumes, args.repeats)))
    print(f"{len(volumes)} volumes, {os.cpu_count()} CPU cores, median of {args.repeats} runs each")
    print(f"{'model':<20}{'parameters':>14}{'weights MB':>12}{'s / case':>10}")
    for name, params, mb, sec in rows:
        print(f"{name:<20}{params:>14,}{mb:>12.1f}{sec:>10.3f}")
    print(f"compact has {rows[1][1] / rows[0][1]:.0f}x fewer parameters than six romero2018 nets")


if __name__ == "__main__":
    main()
