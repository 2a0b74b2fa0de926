#!/usr/bin/env python3
"""Measure `vertebral-labeling batch` throughput for 1 and 2 workers on the real subjects.

    .venv/bin/python scripts/study_throughput.py [--repeats 3] [--model PATH] [--workers 1 2]

Builds a temporary BIDS folder whose images are symbolic links to the shared real subjects
(each one ``--repeats`` times, as sub-<name>r<k>), runs a fresh batch per worker count into a
temporary derivative, and prints volumes/s over the labeling phase (worker start-up and model
loading excluded) and over the whole command.  The machine's load average is printed too:
other jobs on the cores lower the numbers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "VertebralLabeling"))

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.study.bids import find_items  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids", default=str(data_root() / "mri" / "bids"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="compact")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    items = find_items(args.bids)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bids = Path(tmp) / "bids"
        for item in items:
            for k in range(args.repeats):
                sub = f"{item.subject}r{k}"
                folder = bids / sub / "anat"
                folder.mkdir(parents=True)
                os.symlink(item.image, folder / f"{sub}_T2w.nii.gz")
        n = len(items) * args.repeats
        for workers in args.workers:
            summary = Path(tmp) / f"summary{workers}.json"
            load = os.getloadavg()[0]
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "VertebralLabelingLib.cli", "batch", "--bids", str(bids),
                            "--out", str(Path(tmp) / f"deriv{workers}"), "--model", args.model,
                            "--workers", str(workers), "--no-report", "--summary-json", str(summary)],
                           check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                                PYTHONPATH=str(REPO / "VertebralLabeling")),
                           stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            data = json.loads(summary.read_text())
            rows.append((workers, n, data["seconds_labeling"], data["volumes_per_second"], wall, n / wall,
                         load, os.getloadavg()[0]))
    print(f"{os.cpu_count()} CPU cores; {len(items)} subjects x {args.repeats} = {rows[0][1]} volumes; "
          f"model {args.model}")
    print("| workers | volumes | labeling s | volumes/s (labeling) | command s | volumes/s (command) "
          "| load avg before/after |")
    print("|---|---|---|---|---|---|---|")
    for w, n, s, v, wall, vw, l0, l1 in rows:
        print(f"| {w} | {n} | {s:.1f} | {v:.2f} | {wall:.1f} | {vw:.2f} | {l0:.1f} / {l1:.1f} |")


if __name__ == "__main__":
    main()
