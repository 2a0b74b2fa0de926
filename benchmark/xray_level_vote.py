"""The level vote (``xray.vote``): which views to run, and how often a shifted chain goes unflagged.

Each radiograph is run through the first stage (no refiner) on a grid of views (zoom 0.85-1.15,
content moved by up to 25 input rows, about 3/4 of a vertebra), once per radiograph; every view set
below is a subset of that grid with the standard view first.  Per view set and per image variant:
how many chains are shifted after the vote (``xray.vote.level_shift`` against the labels,
repaired where stored out of order), and how many shifted chains the vote's disagreement flag, the
first stage's flag rule, or either of them leaves unflagged.

Variants: the radiograph as it is, and two stress variants made from it (blurred with noise; low
contrast).  The first stage was trained on the 80 choosing images, so as they are its chains are
rarely shifted; the stress variants shift about one in six, as often as new patients' radiographs
do, and give the choice something to choose on.  Rule, written before any validation figure was
seen: the view set with the fewest shifted chains over the three variants of the 80 choosing
images (ties: fewer views), then the flag (vote, or vote or the first stage's rule) that misses
the fewest shifted chains there (ties: fewer flagged).  Broken label chains are left out.  The
validation split is printed beside them, never used to choose.

    .venv/bin/python benchmark/xray_level_vote.py [MODEL] [--val]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "VertebralLabeling"))

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.xray import aasce  # noqa: E402
from VertebralLabelingLib.xray import data as xray_data  # noqa: E402
from VertebralLabelingLib.xray import label as xray_label  # noqa: E402
from VertebralLabelingLib.xray.vote import LevelVote, level_shift, vote  # noqa: E402

SCALES = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15)
SHIFTS = (-25, -17, -8, 0, 8, 17, 25)  # input rows (of 640)
VIEW_SETS = {
    "standard view only": ((1.0,), (0,)),
    "zoom 0.9-1.1": ((0.9, 1.0, 1.1), (0,)),
    "shift +-17": ((1.0,), (-17, 0, 17)),
    "zoom 0.9-1.1 x shift +-17": ((0.9, 1.0, 1.1), (-17, 0, 17)),
    "zoom 0.85-1.15 x shift +-25": ((0.85, 1.0, 1.15), (-25, 0, 25)),
    "zoom 0.9-1.1 x 5 shifts": ((0.9, 1.0, 1.1), (-25, -8, 0, 8, 25)),
    "5 zooms x shift +-17": ((0.85, 0.95, 1.0, 1.05, 1.15), (-17, 0, 17)),
}
#: At most 15 views: each costs one first-stage pass (about 35 ms on 2 cores), and the whole
#: pipeline must stay within 1 s per radiograph.
VARIANTS = ("as is", "blur and noise", "low contrast")


def stressed(image, variant, seed):
    """A stress variant of a prepared input image (values in [0, 1])."""
    if variant == "blur and noise":
        noise = np.random.default_rng(seed).normal(0.0, 0.08, image.shape)
        return np.clip(ndimage.gaussian_filter(image, 1.2) + noise, 0, 1).astype(np.float32)
    if variant == "low contrast":
        return (0.35 + 0.4 * image ** 1.8).astype(np.float32)
    return image


def grid_chains(labeler, aset, index, variant):
    """{(zoom, shift in rows): chain corners in original pixels} over the whole grid; the labels'
    corners in pixels; the first stage's flag on the standard view."""
    radiograph = xray_data.read_radiograph(aset.image_path(index))
    keys = [(s, t) for s in SCALES for t in SHIFTS]
    vote_grid = LevelVote(SCALES, tuple(t / labeler.shape[0] for t in SHIFTS))
    views = vote_grid.views(labeler.shape)  # identity first, then the grid without it, in order
    order = [(1.0, 0)] + [k for k in keys if k != (1.0, 0)]
    images, matrices = xray_data.prepare_inputs(radiograph, labeler.shape, views=views)
    images = [stressed(image, variant, index) for image in images]
    decoded = labeler.decode_inputs(images)
    chains = {key: xray_data.apply(m, d.corners) for key, d, m in zip(order, decoded, matrices)}
    truth = aset.landmarks[index] * [radiograph.width, radiograph.height]
    return chains, truth, bool(decoded[0].uncertain_ends())


def table(labeler, aset, indices):
    """{(view set, variant): rows (shifted, vote disagrees, first-stage rule flags)}."""
    rows = {}
    for variant in VARIANTS:
        for index in indices:
            chains, truth, rule = grid_chains(labeler, aset, index, variant)
            for name, (scales, shifts) in VIEW_SETS.items():
                keys = [(1.0, 0)] + [(s, t) for s in scales for t in shifts if (s, t) != (1.0, 0)]
                keep, _, agreed = vote([chains[k] for k in keys])
                shifted = level_shift(chains[keys[keep]], truth) != 0
                rows.setdefault((name, variant), []).append((shifted, not agreed, rule))
    return {key: np.array(value, bool) for key, value in rows.items()}


def report(rows, title):
    print(f"\n{title}")
    for name in VIEW_SETS:
        total = sum(int(rows[(name, v)][:, 0].sum()) for v in VARIANTS)
        print(f"{name} (shifted over the three variants: {total})")
        for variant in VARIANTS:
            r = rows[(name, variant)]
            shifted, by_vote, either = r[:, 0], r[:, 1], r[:, 1] | r[:, 2]
            print(f"  {variant:15}: shifted {shifted.sum():2d}/{len(r)} | vote flags {by_vote.mean():4.0%}, misses "
                  f"{np.sum(shifted & ~by_vote)} | vote or rule flags {either.mean():4.0%}, misses "
                  f"{np.sum(shifted & ~either)} | rule alone flags {r[:, 2].mean():4.0%}, misses "
                  f"{np.sum(shifted & ~r[:, 2])}")


def choose(rows):
    def views(name):
        return len(VIEW_SETS[name][0]) * len(VIEW_SETS[name][1])
    best = min(VIEW_SETS, key=lambda n: (sum(rows[(n, v)][:, 0].sum() for v in VARIANTS), views(n)))
    stacked = np.concatenate([rows[(best, v)] for v in VARIANTS])
    shifted = stacked[:, 0]
    flags = {"vote": stacked[:, 1], "vote or rule": stacked[:, 1] | stacked[:, 2]}
    flag = min(flags, key=lambda f: (np.sum(shifted & ~flags[f]), flags[f].mean()))
    print(f"\nchosen on the choosing images: {best}; flag: {flag}")


def arguments(description):
    """(arguments, the AASCE set with its label chains put in order, training names, validation
    names): what the level benchmarks share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model", nargs="?", default="xray-compact")
    parser.add_argument("--val", action="store_true", help="also print the validation split (not used)")
    args = parser.parse_args()
    aset = aasce.load_aasce(data_dir=data_root() / "xray-aasce", repair=True)
    return (args, aset, *aasce.split_names(aset.names))


def main():
    args, aset, train, val = arguments(__doc__.splitlines()[0])
    labeler = xray_label.XrayLabeler.load(args.model)
    labeler.refiner, labeler.level_vote = None, None
    choosing = [i for i in aasce.choosing_images(aset, train) if aset.names[i] not in aset.broken]
    rows = table(labeler, aset, choosing)
    report(rows, f"{len(choosing)} choosing images (training split; broken label chains left out)")
    choose(rows)
    if args.val:
        report(table(labeler, aset, aset.indices_of(val)), f"{len(val)} validation images (shown, not used)")


if __name__ == "__main__":
    main()
