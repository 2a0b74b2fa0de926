"""Seconds per radiograph of the shipped X-ray model, model loaded (the CobbAngle Apply time).

A timing, not a test: it depends on the machine and on what else runs on it, so it lives here
and not in pytest (an assertion on it would fail on a busy CI box and pass a slow change on a
fast one).  Reference: 0.17 s (median, landmarks on 3 views for the level vote + refiner) on this
project's 2-core machine (README, X-ray table).

    .venv/bin/python benchmark/xray_inference.py [MODEL] [--images 6] [--runs 3]
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "VertebralLabeling"))

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.xray import aasce  # noqa: E402
from VertebralLabelingLib.xray import data as xray_data  # noqa: E402
from VertebralLabelingLib.xray.label import XrayLabeler  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="xray-compact")
    parser.add_argument("--images", type=int, default=6, help="validation radiographs to time")
    parser.add_argument("--runs", type=int, default=3, help="runs per radiograph (the median is kept)")
    args = parser.parse_args(argv)
    aset = aasce.load_aasce(data_dir=data_root() / "xray-aasce")
    _, validation = aasce.split_names(aset.names)
    labeler = XrayLabeler.load(args.model)
    seconds = []
    for index in aset.indices_of(validation[: args.images]):
        radiograph = xray_data.read_radiograph(aset.image_path(index))
        seconds.append(statistics.median(labeler.label(radiograph).seconds for _ in range(args.runs)))
    print(f"{args.model}: {statistics.median(seconds):.3f} s per radiograph (median of {len(seconds)} "
          f"images x {args.runs} runs; load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
