"""The command line on good and bad inputs: clear one-line errors, exit 2, nothing half-written."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from VertebralLabelingLib import DISC_NAMES
from VertebralLabelingLib.cli import main
from VertebralLabelingLib.io.models import models_dir
from VertebralLabelingLib.mri.phantom import make_phantom


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(image, path):
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    volume, discs = make_phantom(seed=0)
    path = tmp_path_factory.mktemp("phantom") / "phantom.nii.gz"
    sitk.WriteImage(volume.to_sitk(), str(path))
    return path, discs


def test_label_writes_all_outputs(tmp_path, phantom_file, capsys):
    path, discs = phantom_file
    out = tmp_path / "p.mrk.json"
    code, stdout, _ = run(["label", path, "-o", out, "--csv", tmp_path / "p.csv",
                           "--dlabel", tmp_path / "p.nii.gz", "--qc", tmp_path / "p.png"], capsys)
    assert code == 0, stdout
    data = json.loads(out.read_text())
    points = data["markups"][0]["controlPoints"]
    assert [p["label"] for p in points] == list(DISC_NAMES)
    assert data["markups"][0]["coordinateSystem"] == "LPS"
    assert all("confidence=" in p["description"] for p in points)
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].startswith("disc,value,R,A,S,confidence,flagged") and len(rows) == 7
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz")))
    assert sorted(np.unique(labels))[1:] == [3, 4, 5, 6, 7, 8]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_to_overwrite_without_flag(tmp_path, phantom_file, capsys):
    path, _ = phantom_file
    out = tmp_path / "edited.mrk.json"
    out.write_text("user corrections")
    code, _, err = run(["label", path, "-o", out], capsys)
    assert code == 2 and "--overwrite" in err
    assert out.read_text() == "user corrections"
    code, _, _ = run(["label", path, "-o", out, "--overwrite"], capsys)
    assert code == 0 and out.read_text() != "user corrections"


@pytest.mark.parametrize("case,message", [
    ("2d", "2D"), ("4d", "4D"), ("zeros", "empty"), ("nan", "NaN"), ("text", "Cannot read"),
    ("missing", "No such file"), ("rgb", "components"),
])
def test_bad_images_give_clear_errors(tmp_path, capsys, case, message):
    if case == "2d":
        path = write(sitk.Image(64, 64, sitk.sitkFloat32) + 1.0, tmp_path / "a.nrrd")
    elif case == "4d":
        vol = sitk.Image(20, 20, 20, sitk.sitkFloat32)
        path = write(sitk.JoinSeries([vol, vol]), tmp_path / "a.nii.gz")
    elif case == "zeros":
        path = write(sitk.Image(40, 40, 40, sitk.sitkFloat32), tmp_path / "a.nii.gz")
    elif case == "nan":
        path = write(sitk.GetImageFromArray(np.full((30, 30, 30), np.nan, np.float32)), tmp_path / "a.nrrd")
    elif case == "text":
        path = tmp_path / "a.nii.gz"
        path.write_text("not an image")
    elif case == "rgb":
        path = write(sitk.Image([30, 30, 30], sitk.sitkVectorFloat32, 3), tmp_path / "a.nrrd")
    else:
        path = tmp_path / "nothing.nii.gz"
    out = tmp_path / "out.mrk.json"
    code, _, err = run(["label", path, "-o", out], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_corrupt_model_file(tmp_path, phantom_file, capsys):
    path, _ = phantom_file
    (tmp_path / "broken.keras").write_bytes(b"\x00garbage" * 100)
    shutil.copy(models_dir() / "compact.json", tmp_path / "broken.json")
    code, _, err = run(["label", path, "-o", tmp_path / "o.mrk.json", "--model", tmp_path / "broken.keras"], capsys)
    assert code == 2 and "corrupt" in err


def test_model_without_metadata(tmp_path, phantom_file, capsys):
    path, _ = phantom_file
    shutil.copy(models_dir() / "compact.keras", tmp_path / "lonely.keras")
    code, _, err = run(["label", path, "-o", tmp_path / "o.mrk.json", "--model", tmp_path / "lonely.keras"], capsys)
    assert code == 2 and "metadata" in err


def test_slice_outside_volume(tmp_path, phantom_file, capsys):
    path, _ = phantom_file
    code, _, err = run(["label", path, "-o", tmp_path / "o.mrk.json", "--slice", "500"], capsys)
    assert code == 2 and "outside the volume" in err


def test_non_spine_volume_is_flagged_not_crashed(labeler):
    from VertebralLabelingLib.mri.volume import Volume

    rng = np.random.default_rng(1)
    from scipy import ndimage

    blobs = ndimage.gaussian_filter(rng.normal(size=(60, 120, 120)), 4).astype(np.float32)
    matrix = np.eye(4)
    result = labeler.label(Volume(blobs, matrix, "noise"))
    assert not result.spine_found
    assert all(d.flagged for d in result.discs)
    assert result.warnings
