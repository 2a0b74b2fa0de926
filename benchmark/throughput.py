"""Throughput of the whole `batch` command against the disk-read floor, one `label` call with its
start-up, and the install size of the inference dependencies -- printed in one run.

The shared subjects (../shared/data/mri/bids, real cervical T2w volumes) are copied under new
names into a temporary BIDS folder until there are at least ``--volumes`` images, as in a real
study.  Then:

* read floor: SimpleITK reads every one of those files (decompressing them), nothing else;
* batch: ``vertebral-labeling batch`` on the folder in a fresh process, timed over the whole
  command (start-up, model loading, labeling, writing every output, the table and QC page);
* label: one ``vertebral-labeling label`` call on one volume in a fresh process (start-up
  included), the median of ``--label-runs``;
* install size: the files of the inference dependencies' distributions in this environment.

The machine load (1-minute load average) is printed before and after: on a shared machine the
numbers are only as good as the CPU this process got.  The batch's CPU seconds per volume are
printed too, which give the rate an otherwise idle machine would reach.

Usage: python benchmark/throughput.py [--volumes 52] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "VertebralLabeling"))

INFERENCE_DISTRIBUTIONS = ("onnxruntime", "numpy", "scipy", "SimpleITK", "pillow")


def replicate(bids: Path, out: Path, n: int) -> list[Path]:
    """Copy the shared subjects' T2w images under new subject names until there are ``n``."""
    sources = sorted(bids.glob("sub-*/anat/*_T2w.nii.gz"))
    if not sources:
        raise SystemExit(f"error: no sub-*/anat/*_T2w.nii.gz under {bids}")
    images = []
    for k in range(n):
        source = sources[k % len(sources)]
        target = out / f"sub-rep{k:03d}" / "anat" / f"sub-rep{k:03d}_T2w.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        images.append(target)
    (out / "dataset_description.json").write_text('{"Name": "throughput", "BIDSVersion": "1.9.0"}\n')
    return images


def read_floor(images) -> float:
    import SimpleITK as sitk

    start = time.perf_counter()
    for image in images:
        sitk.ReadImage(str(image))
    return time.perf_counter() - start


def cli(*args) -> list[str]:
    """The command line of ``vertebral-labeling`` in this environment (entry point if installed)."""
    script = Path(sys.executable).with_name("vertebral-labeling")
    if script.exists():
        return [str(script), *map(str, args)]
    return [sys.executable, "-m", "VertebralLabelingLib.cli", *map(str, args)]


def timed(command, env) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one command; exits on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def install_size(names=INFERENCE_DISTRIBUTIONS) -> dict:
    """Megabytes on disk of each installed distribution (its RECORD'd files)."""
    from importlib import metadata

    sizes = {}
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        total = 0
        for file in dist.files or []:
            path = Path(dist.locate_file(file))
            if path.is_file():
                total += path.stat().st_size
        sizes[name] = total / 1e6
    return sizes


def main(argv=None) -> int:
    from VertebralLabelingLib.io.files import data_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids", default=str(data_root() / "mri" / "bids"))
    parser.add_argument("--volumes", type=int, default=52)
    parser.add_argument("--label-runs", type=int, default=3)
    parser.add_argument("--keep", help="build the study here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.volumes < 1:
        raise SystemExit("error: --volumes must be at least 1")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "VertebralLabeling"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vl-throughput-"))
    try:
        load_before = os.getloadavg()[0]
        images = replicate(Path(args.bids), work / "bids", args.volumes)
        import SimpleITK as sitk

        shape = sitk.ReadImage(str(images[0])).GetSize()
        t_read = read_floor(images)
        t_batch, cpu_batch = timed(cli("batch", "--bids", work / "bids", "--out", work / "deriv"), env)
        label_walls = []
        for k in range(args.label_runs):
            wall, _ = timed(cli("label", images[0], "-o", work / f"label{k}.mrk.json"), env)
            label_walls.append(wall)
        load_after = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    n = len(images)
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, load average (1 min) {load_before:.2f} before, {load_after:.2f} after")
    print(f"volumes: {n} real cervical T2w (first {shape[0]}x{shape[1]}x{shape[2]}, gzip NIfTI), "
          f"copied from {args.bids}")
    print(f"read floor (SimpleITK only, one thread): {t_read:.2f} s = {n / t_read:.2f} volumes/s")
    print(f"batch (whole command, fresh process):    {t_batch:.2f} s = {n / t_batch:.2f} volumes/s; "
          f"{cpu_batch / n:.3f} CPU s per volume (idle {cores} cores: ~{cores * n / cpu_batch:.1f} volumes/s)")
    print(f"batch / read floor: {t_batch / t_read:.2f}x the time")
    print(f"label (one call with start-up): median {statistics.median(label_walls):.2f} s "
          f"(runs: {', '.join(f'{w:.2f}' for w in label_walls)})")
    sizes = install_size()
    print(f"inference dependencies installed: {sum(sizes.values()):.0f} MB "
          f"({', '.join(f'{k} {v:.0f}' for k, v in sizes.items())})")
    tf = install_size(("tensorflow-cpu", "tensorflow", "keras"))
    if tf:
        print(f"(training only, not needed for inference: {', '.join(f'{k} {v:.0f} MB' for k, v in tf.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
