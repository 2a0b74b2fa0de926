"""The study loop end to end on the real subjects, with no manual file juggling:

batch -> QC marks -> a correction saved -> import-corrections -> train --labels --qc -> batch again.
"""

import csv
import json

import numpy as np
import pytest

from study_common import SUBJECTS, batch, person_correction, run_cli
from VertebralLabelingLib import DISC_NAME_BY_VALUE
from VertebralLabelingLib.errors import InputError
from VertebralLabelingLib.io.files import label_is_human, sha256_file, write_json
from VertebralLabelingLib.mri.labeling import DiscPoint
from VertebralLabelingLib.mri.training.dataset import load_bids_subjects, read_disc_labels
from VertebralLabelingLib.study.corrections import corrected_path, is_human_corrected, save_corrected


def rows(deriv):
    with open(deriv / "discs.csv") as handle:
        return list(csv.DictReader(handle))


def truth(mri_bids, sub):
    return read_disc_labels(mri_bids / "derivatives" / "labels" / sub / "anat" /
                            f"{sub}_T2w_label-discs_dlabel.nii.gz")


@pytest.mark.slow
def test_label_correct_import_retrain_label_again(tmp_path, mri_bids):
    deriv = tmp_path / "derivatives" / "vertebral-labeling"
    assert batch(mri_bids, deriv) == 0
    first_version = rows(deriv)[0]["model_version"]

    # QC: the reviewer passes errsm18 and fails the small crop and errsm22 (as the page saves it).
    write_json(deriv / "qc" / "qc.json", {"format": "vertebral-labeling-qc", "version": 1, "marks": {
        "sub-errsm18_T2w": {"status": "pass"}, "sub-sctcrop_T2w": {"status": "fail"},
        "sub-errsm22_T2w": {"status": "fail"}}})

    # Correction: the crop's points moved to where the discs really are (points of discs outside
    # the crop deleted), saved as the Slicer study panel does.
    crop = deriv / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w_discs.mrk.json"
    gt = truth(mri_bids, "sub-sctcrop")
    corrected = save_corrected([DiscPoint(v, DISC_NAME_BY_VALUE[v], p, 1.0) for v, p in sorted(gt.items())],
                               corrected_path(crop), source_image=mri_bids / "sub-sctcrop")
    assert corrected.name == "sub-sctcrop_T2w_desc-corrected_discs.mrk.json" and is_human_corrected(corrected)
    assert not is_human_corrected(crop)
    corrected_hash = sha256_file(corrected)

    # Import: corrected markups -> SCT disc labels in the derivatives/labels layout.
    labels = tmp_path / "labels"
    assert run_cli("import-corrections", "--deriv", deriv, "--out", labels) == 0
    written = sorted(p.relative_to(labels).as_posix() for p in labels.rglob("*.nii.gz"))
    assert written == ["sub-sctcrop/anat/sub-sctcrop_T2w_label-discs_dlabel.nii.gz"]  # not errsm22 (fail)
    label_file = labels / written[0]
    assert label_is_human(label_file)
    assert json.loads((labels / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    back = read_disc_labels(label_file)
    assert sorted(back) == sorted(gt)
    for value, point in gt.items():  # nearest voxel of the image grid
        assert np.linalg.norm(back[value] - point) < 1.0
    # --accept-pass also imports the prediction the reviewer passed.
    accepted = tmp_path / "labels-accepted"
    assert run_cli("import-corrections", "--deriv", deriv, "--out", accepted, "--accept-pass") == 0
    assert sorted(p.parent.parent.name for p in accepted.rglob("*.nii.gz")) == ["sub-errsm18", "sub-sctcrop"]

    # Train reads that output directly; the correction overrides the older label, and the image
    # that failed QC without a correction (errsm22) is left out.
    own_labels = mri_bids / "derivatives" / "labels"
    subjects = load_bids_subjects(mri_bids, labels=[own_labels, labels], qc=deriv / "qc" / "qc.json")
    by_name = {s.name: s for s in subjects}
    assert sorted(by_name) == ["sub-errsm18", "sub-errsm20", "sub-sctcrop"]
    assert by_name["sub-sctcrop"].label_path == label_file
    models = tmp_path / "models"
    assert run_cli("train", "--bids", mri_bids, "--labels", own_labels, labels, "--qc", deriv / "qc" / "qc.json",
                   "--out", models, "--name", "retrained", "--steps", "10", "--batch-size", "2",
                   "--phantoms", "0", "--pam50", "") == 0
    meta = json.loads((models / "retrained.json").read_text())
    assert meta["training"]["steps_done"] == 10
    assert sorted(meta["training"]["subjects"]) == ["sub-errsm18", "sub-errsm20", "sub-sctcrop"]
    assert meta["training"]["labels"] == [str(own_labels), str(labels)]

    # Label again with the retrained model: every image is redone (the model changed), the
    # correction is untouched and still wins in the study table.
    summary = tmp_path / "again.json"
    assert run_cli("batch", "--bids", mri_bids, "--out", deriv, "--model", models / "retrained.keras",
                   "--summary-json", summary) in (0, 1)
    again = json.loads(summary.read_text())
    assert again["labeled"] == 4 and again["skipped_done"] == 0
    assert sha256_file(corrected) == corrected_hash
    table = rows(deriv)
    assert {r["model_version"] for r in table} != {first_version}
    assert all(r["model_version"].startswith("retrained-") for r in table)
    crop_rows = [r for r in table if r["subject"] == "sub-sctcrop"]
    assert {r["source"] for r in crop_rows} == {"corrected"} and len(crop_rows) == len(gt)
    for r in crop_rows:
        value = int(r["value"])
        assert np.linalg.norm([float(r[c]) for c in "RAS"] - gt[value]) < 0.01
    assert {r["source"] for r in table if r["subject"] != "sub-sctcrop"} == {"model"}
    assert {r["subject"]: r["qc"] for r in table} == {"sub-errsm18": "pass", "sub-errsm20": "",
                                                      "sub-errsm22": "fail", "sub-sctcrop": "fail"}
    page = (deriv / "qc" / "index.html").read_text()
    assert "corrected" in page and all(s in page for s in SUBJECTS)


def test_import_refuses_to_replace_labels_it_did_not_write(tmp_path, mri_bids):
    deriv = tmp_path / "deriv"
    assert batch(mri_bids, deriv, "--subjects", "sub-sctcrop") == 0
    with pytest.raises(InputError, match="No corrected markups"):
        from VertebralLabelingLib.study.corrections import import_corrections

        import_corrections(deriv, tmp_path / "labels")
    markups = deriv / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w_discs.mrk.json"
    image = mri_bids / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w.nii.gz"
    correction = person_correction(markups, image)  # discs outside the small crop removed
    assert correction
    save_corrected(correction, corrected_path(markups))
    manual = tmp_path / "labels" / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w_label-discs_dlabel.nii.gz"
    manual.parent.mkdir(parents=True)
    manual.write_bytes(b"a manual label")
    assert run_cli("import-corrections", "--deriv", deriv, "--out", tmp_path / "labels") == 2
    assert manual.read_bytes() == b"a manual label"
    assert run_cli("import-corrections", "--deriv", deriv, "--out", tmp_path / "labels", "--overwrite") == 0
    assert sorted(read_disc_labels(manual)) == sorted(d.value for d in correction)
    # Re-importing over its own output needs no flag.
    assert run_cli("import-corrections", "--deriv", deriv, "--out", tmp_path / "labels") == 0


def test_edited_prediction_file_counts_as_a_correction(tmp_path, mri_bids):
    deriv = tmp_path / "deriv"
    assert batch(mri_bids, deriv, "--subjects", "sub-errsm20") == 0
    markups = deriv / "sub-errsm20" / "anat" / "sub-errsm20_T2w_discs.mrk.json"
    data = json.loads(markups.read_text())
    data["markups"][0]["controlPoints"][0]["position"][2] += 3.0
    markups.write_text(json.dumps(data))
    assert run_cli("import-corrections", "--deriv", deriv, "--out", tmp_path / "labels") == 0
    (label,) = (tmp_path / "labels").rglob("*.nii.gz")
    assert label_is_human(label)
    assert json.loads(label.with_name(label.name.replace(".nii.gz", ".json")).read_text())["Source"] == \
        "human-corrected"


def test_train_study_options_are_checked(tmp_path, mri_bids, capsys):
    assert run_cli("train", "--bids", mri_bids, "--out", tmp_path, "--subjects", "nobody") == 2
    assert "sub-nobody" in capsys.readouterr().err
    assert run_cli("train", "--bids", mri_bids, "--out", tmp_path, "--labels", tmp_path / "none") == 2
    assert "Labels folder not found" in capsys.readouterr().err
    assert run_cli("train", "--bids", mri_bids, "--out", tmp_path, "--qc", tmp_path / "qc.json") == 2
    assert "QC file not found" in capsys.readouterr().err
    empty = tmp_path / "empty-labels"
    empty.mkdir()
    assert run_cli("train", "--bids", mri_bids, "--out", tmp_path, "--labels", empty) == 2
    assert "No labeled T2w images" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.keras"))


def test_default_places_need_no_paths(tmp_path, mri_bids):
    """Derivative at BIDS/derivatives/vertebral-labeling: import-corrections finds the dataset and
    writes BIDS/derivatives/labels, which train reads by default."""
    import os

    bids = tmp_path / "bids"
    (bids / "sub-sctcrop" / "anat").mkdir(parents=True)
    os.symlink(mri_bids / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w.nii.gz",
               bids / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w.nii.gz")
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    assert run_cli("batch", "--bids", bids, "--model", "compact") == 0
    deriv = bids / "derivatives" / "vertebral-labeling"
    markups = deriv / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w_discs.mrk.json"
    save_corrected(person_correction(markups, mri_bids / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w.nii.gz"),
                   corrected_path(markups))
    assert run_cli("import-corrections", "--deriv", deriv) == 0
    label = bids / "derivatives" / "labels" / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w_label-discs_dlabel.nii.gz"
    assert label_is_human(label)
    (subject,) = load_bids_subjects(bids)  # the default labels folder
    assert subject.label_path == label
