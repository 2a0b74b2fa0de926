"""Make the README's QC picture: the demo's synthetic spine and a held-out real subject, side by side.

Left: the demo input (``vertebral-labeling phantom --synthetic``, a spine from the training
generator, seed 0) labeled by the shipped ``compact`` model. Right: real subject
sub-errsm20 labeled by the leave-one-subject-out fold model that never saw it.

Usage: python benchmark/make_screenshot.py [--out Resources/Screenshot.png]
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "VertebralLabeling"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from PIL import Image  # noqa: E402

from VertebralLabelingLib.io.files import data_root  # noqa: E402
from VertebralLabelingLib.io.models import models_dir  # noqa: E402
from VertebralLabelingLib.mri.export import qc_image  # noqa: E402
from VertebralLabelingLib.mri.labeling import DiscLabeler  # noqa: E402
from VertebralLabelingLib.mri.synthetic_samples import synthetic_volume  # noqa: E402
from VertebralLabelingLib.mri.training.dataset import find_bids_pairs  # noqa: E402
from VertebralLabelingLib.mri.volume import load_volume  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "Resources" / "Screenshot.png"))
    parser.add_argument("--subject", default="sub-errsm20")
    args = parser.parse_args()
    phantom, _ = synthetic_volume(seed=0)
    left = qc_image(DiscLabeler.load("compact").label(phantom))
    image = next(img for sub, img, _ in find_bids_pairs(data_root() / "mri" / "bids")
                 if sub == args.subject)
    fold = DiscLabeler.load(models_dir() / "loso" / f"compact-loso-{args.subject}.onnx")
    right = qc_image(fold.label(load_volume(image)))
    height = max(left.height, right.height)
    canvas = Image.new("RGB", (left.width + right.width + 8, height))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 8, 0))
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out} ({canvas.width}x{canvas.height})")


if __name__ == "__main__":
    main()
