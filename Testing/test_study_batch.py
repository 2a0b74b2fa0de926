"""`vertebral-labeling batch` on the real BIDS subjects: layout, table, resume, edits, failures,
workers, shards and the SLURM array script."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO
from study_common import SUBJECTS, batch, fold_model, run_cli
from VertebralLabelingLib import DISC_NAMES
from VertebralLabelingLib.errors import InputError
from VertebralLabelingLib.io.files import read_json
from VertebralLabelingLib.mri.export import read_markups_json
from VertebralLabelingLib.mri.training.dataset import read_disc_labels
from VertebralLabelingLib.study.bids import find_items
from VertebralLabelingLib.study.plan import parse_shard, shard_from_env
from VertebralLabelingLib.study.table import TABLE_COLUMNS


def anat(deriv, sub):
    return deriv / sub / "anat"


def table(deriv):
    with open(deriv / "discs.csv") as handle:
        return list(csv.DictReader(handle))


def mtimes(deriv):
    return {p: p.stat().st_mtime_ns for p in deriv.rglob("sub-*/anat/*") if p.is_file()}


@pytest.fixture(scope="module")
def study(tmp_path_factory, mri_bids):
    deriv = tmp_path_factory.mktemp("study") / "derivatives" / "vertebral-labeling"
    summary = deriv.parent / "summary.json"
    assert batch(mri_bids, deriv, "--summary-json", summary) == 0
    return deriv, json.loads(summary.read_text())


def test_batch_writes_a_bids_derivative(study, mri_bids):
    deriv, summary = study
    assert summary["labeled"] == 4 and summary["failed"] == 0 and summary["volumes_per_second"] > 0
    description = json.loads((deriv / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "vertebral-labeling"
    for sub in SUBJECTS:
        stem = f"{sub}_T2w"
        folder = anat(deriv, sub)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{stem}_label-discs_dlabel.nii.gz", f"{stem}_discs.mrk.json", f"{stem}_qc.png",
             f"{stem}_discs.json"])
        labels = sitk.ReadImage(str(folder / f"{stem}_label-discs_dlabel.nii.gz"))
        image = sitk.ReadImage(str(mri_bids / sub / "anat" / f"{stem}.nii.gz"))
        assert labels.GetSize() == image.GetSize()
        np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-4)
        assert [p[0] for p in read_markups_json(folder / f"{stem}_discs.mrk.json")] == list(DISC_NAMES)
        assert (folder / f"{stem}_qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        record = json.loads((folder / f"{stem}_discs.json").read_text())
        assert record["status"] == "ok" and record["image"] == f"{sub}/anat/{stem}.nii.gz"
    # The fold model never saw errsm18: its discs still land near the manual labels.
    truth = read_disc_labels(mri_bids / "derivatives" / "labels" / "sub-errsm18" / "anat" /
                             "sub-errsm18_T2w_label-discs_dlabel.nii.gz")
    rows = [r for r in table(deriv) if r["subject"] == "sub-errsm18"]
    errors = [np.linalg.norm(np.array([float(r[c]) for c in "RAS"]) - truth[int(r["value"])])
              for r in rows if int(r["value"]) in truth]
    assert len(errors) >= 5 and np.median(errors) < 6.0, errors


def test_study_table_has_one_row_per_disc(study):
    deriv, _ = study
    rows = table(deriv)
    assert tuple(rows[0].keys()) == TABLE_COLUMNS
    assert len(rows) == 4 * 6
    assert {r["subject"] for r in rows} == set(SUBJECTS)
    assert all(r["source"] == "model" and r["status"] == "ok" for r in rows)
    assert len({r["model_version"] for r in rows}) == 1
    assert rows[0]["model_version"].startswith("compact-loso-sub-errsm18-")
    for r in rows:
        assert 0.0 <= float(r["confidence"]) <= 1.0 and r["flagged"] in ("0", "1")
    # The small crop shows few discs: some of its discs are flagged, and the reason is given.
    crop = [r for r in rows if r["subject"] == "sub-sctcrop"]
    assert any(r["flagged"] == "1" and r["reason"] for r in crop)
    log = (deriv / "batch.log").read_text()
    assert "4 labeled, 0 failed" in log


def test_rerun_skips_done_images_and_never_overwrites_hand_edits(study, tmp_path, mri_bids):
    deriv = tmp_path / "deriv"
    shutil.copytree(study[0], deriv)
    before = mtimes(deriv)
    assert batch(mri_bids, deriv, "--summary-json", tmp_path / "s1.json") == 0
    s1 = json.loads((tmp_path / "s1.json").read_text())
    assert s1["skipped_done"] == 4 and s1["labeled"] == 0
    assert mtimes(deriv) == before  # nothing rewritten

    # A person fixes a point in the prediction file itself.
    edited = anat(deriv, "sub-errsm20") / "sub-errsm20_T2w_discs.mrk.json"
    data = json.loads(edited.read_text())
    data["markups"][0]["controlPoints"][2]["position"][2] += 5.0
    edited.write_text(json.dumps(data))
    hand = edited.read_bytes()
    assert batch(mri_bids, deriv, "--overwrite", "--summary-json", tmp_path / "s2.json") == 0
    s2 = json.loads((tmp_path / "s2.json").read_text())
    assert s2["labeled"] == 3 and s2["skipped_edited"] == 1
    assert edited.read_bytes() == hand
    assert "edited by hand" in (deriv / "batch.log").read_text()
    assert batch(mri_bids, deriv, "--overwrite", "--overwrite-corrected", "--subjects", "errsm20") == 0
    assert edited.read_bytes() != hand

    # Files not written by a batch run (no record) are not replaced without --overwrite.
    record = anat(deriv, "sub-errsm22") / "sub-errsm22_T2w_discs.json"
    record.unlink()
    assert batch(mri_bids, deriv, "--subjects", "sub-errsm22", "--summary-json", tmp_path / "s3.json") == 0
    assert json.loads((tmp_path / "s3.json").read_text())["skipped_exists"] == 1


def test_one_failure_is_reported_and_does_not_stop_the_others(tmp_path, mri_bids):
    bids = tmp_path / "bids"
    for sub in ("sub-sctcrop", "sub-errsm20"):
        (bids / sub / "anat").mkdir(parents=True)
        os.symlink(mri_bids / sub / "anat" / f"{sub}_T2w.nii.gz", bids / sub / "anat" / f"{sub}_T2w.nii.gz")
    (bids / "sub-broken" / "anat").mkdir(parents=True)
    (bids / "sub-broken" / "anat" / "sub-broken_T2w.nii.gz").write_bytes(b"not an image")
    deriv = tmp_path / "deriv"
    assert batch(bids, deriv, "--summary-json", tmp_path / "s.json") == 1  # some image failed
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["labeled"] == 2 and summary["failed"] == 1
    rows = table(deriv)
    broken = [r for r in rows if r["subject"] == "sub-broken"]
    assert len(broken) == 1 and broken[0]["status"] == "failed" and "Cannot read" in broken[0]["error"]
    assert len([r for r in rows if r["status"] == "ok"]) == 12
    assert "sub-broken_T2w FAILED" in (deriv / "batch.log").read_text()
    assert not (anat(deriv, "sub-broken") / "sub-broken_T2w_discs.mrk.json").exists()
    # A re-run retries only the failed image (after it is fixed).
    (bids / "sub-broken" / "anat" / "sub-broken_T2w.nii.gz").unlink()
    os.symlink(mri_bids / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w.nii.gz",
               bids / "sub-broken" / "anat" / "sub-broken_T2w.nii.gz")
    assert batch(bids, deriv, "--summary-json", tmp_path / "s2.json") == 0
    again = json.loads((tmp_path / "s2.json").read_text())
    assert again["labeled"] == 1 and again["skipped_done"] == 2


def test_two_workers_give_the_same_points(study, tmp_path, mri_bids):
    deriv = tmp_path / "deriv"
    subjects = ("sub-errsm20", "sub-sctcrop")
    assert batch(mri_bids, deriv, "--workers", "2", "--subjects", *subjects,
                 "--summary-json", tmp_path / "s.json") == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["workers"] == 2 and summary["labeled"] == 2
    pids = {json.loads((anat(deriv, s) / f"{s}_T2w_discs.json").read_text())["pid"] for s in subjects}
    assert os.getpid() not in pids  # labeled in worker processes
    one = {(r["subject"], r["disc"]): r for r in table(study[0])}
    for r in table(deriv):
        ref = one[(r["subject"], r["disc"])]
        for c in "RAS":
            assert abs(float(r[c]) - float(ref[c])) < 0.05


def test_threads_in_one_process_give_the_points_of_one_at_a_time(study, tmp_path, mri_bids):
    """The default batch labels several images at once in threads of this process, sharing one
    model; one image at a time (--threads 1) must give the same discs."""
    deriv, summary = study
    pids = {json.loads((anat(deriv, s) / f"{s}_T2w_discs.json").read_text())["pid"] for s in SUBJECTS}
    assert pids == {os.getpid()} and summary["workers"] == 1
    serial = tmp_path / "serial"
    assert batch(mri_bids, serial, "--threads", "1") == 0
    for s in SUBJECTS:
        threaded = json.loads((anat(deriv, s) / f"{s}_T2w_discs.json").read_text())["discs"]
        one = json.loads((anat(serial, s) / f"{s}_T2w_discs.json").read_text())["discs"]
        assert [d["name"] for d in threaded] == [d["name"] for d in one]
        for a, b in zip(threaded, one):
            assert np.allclose(a["ras"], b["ras"], atol=1e-3) and abs(a["confidence"] - b["confidence"]) < 1e-3
            assert a["flagged"] == b["flagged"]
    assert batch(mri_bids, tmp_path / "bad", "--threads", "0") == 2


def test_stopping_the_threaded_batch_drops_the_queued_images(tmp_path, mri_bids):
    """Ctrl-C (the consumer stops): the running image finishes, the queued ones are not labeled."""
    from VertebralLabelingLib.study import workers as study_lib

    items = find_items(mri_bids)
    study_lib.init_worker(fold_model(), 1)
    records = study_lib.label_in_threads(items, tmp_path, "v", mri_bids, threads=1)
    first = next(records)
    records.close()
    written = list(tmp_path.rglob("*_discs.json"))
    assert first["status"] == "ok" and 1 <= len(written) <= 2 < len(items)


def test_subjects_and_shards_partition_the_study(mri_bids):
    everyone = [i.key for i in find_items(mri_bids)]
    assert everyone == [f"{s}_T2w" for s in SUBJECTS]
    parts = [[i.key for i in find_items(mri_bids, shard=(k, 3))] for k in range(3)]
    assert sorted(sum(parts, [])) == everyone and all(parts)
    assert [i.key for i in find_items(mri_bids, subjects=["errsm22", "sub-sctcrop"])] == \
        ["sub-errsm22_T2w", "sub-sctcrop_T2w"]
    with pytest.raises(InputError, match="sub-nobody"):
        find_items(mri_bids, subjects=["nobody"])
    with pytest.raises(InputError, match="No \\*_T1w"):
        find_items(mri_bids, contrast="T1w")
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "a/b", "-1/3", "1"):
        with pytest.raises(InputError):
            parse_shard(bad)
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                           "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)


def test_bad_batch_arguments_are_one_line_errors(tmp_path, mri_bids, capsys):
    assert run_cli("batch", "--bids", tmp_path / "nope", "--out", tmp_path / "d") == 2
    assert "BIDS folder not found" in capsys.readouterr().err
    assert run_cli("batch", "--bids", mri_bids, "--out", tmp_path / "d", "--shard", "3/2") == 2
    assert "--shard" in capsys.readouterr().err
    assert run_cli("batch", "--bids", mri_bids, "--out", tmp_path / "d", "--shard", "slurm") == 2
    assert "SLURM_ARRAY_TASK_ID" in capsys.readouterr().err
    assert run_cli("batch", "--bids", mri_bids, "--out", tmp_path / "d", "--model",
                   tmp_path / "missing.keras") == 2
    assert "Model file not found" in capsys.readouterr().err


def test_slurm_array_script_labels_disjoint_shards(tmp_path, mri_bids):
    """The SLURM array script, with the environment SLURM gives each array task."""
    deriv = tmp_path / "deriv"
    script = REPO / "scripts" / "slurm" / "batch_array.sbatch"
    env = dict(os.environ, VERTEBRAL_LABELING=f"{sys.executable} -m VertebralLabelingLib.cli",
               SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="0", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=str(REPO / "VertebralLabeling"))
    for task in ("0", "1"):
        done = subprocess.run(["bash", str(script), str(mri_bids), str(deriv), "--model", str(fold_model()),
                               "--subjects", "sub-errsm20", "sub-sctcrop"],
                              env=dict(env, SLURM_ARRAY_TASK_ID=task), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "1 to label" in done.stderr
    records = {s: read_json(anat(deriv, s) / f"{s}_T2w_discs.json") for s in ("sub-errsm20", "sub-sctcrop")}
    assert all(r["status"] == "ok" for r in records.values())
    assert len({r["pid"] for r in records.values()}) == 2  # one per array task
    assert not (deriv / "qc" / "index.html").exists()  # tasks skip the report...
    assert run_cli("study-report", "--bids", mri_bids, "--out", deriv) == 0  # ...built once at the end
    assert (deriv / "qc" / "index.html").exists()
    assert {r["subject"] for r in table(deriv)} == {"sub-errsm20", "sub-sctcrop"}


def test_progress_bar_shows_rate_and_eta():
    import io

    from VertebralLabelingLib.study.batch import progress_bar

    stream = io.StringIO()  # not a terminal: one line per update
    with progress_bar(4, stream) as bar:
        bar.start_t -= 10.0  # started 10 s ago
        bar.set_postfix_str("sub-a ok", refresh=False)
        bar.update()
    first, line = stream.getvalue().splitlines()
    assert "0/4" in first and "ETA ?" in first
    assert line.startswith("[#######") and " 1/4  0.10vol/s elapsed 00:10 ETA 00:30" in line
    assert line.endswith("sub-a ok") and "\r" not in stream.getvalue()


def test_sessions_and_read_only_dataset(tmp_path, mri_bids, capsys):
    bids = tmp_path / "bids"
    for ses in ("ses-01", "ses-02"):
        folder = bids / "sub-long" / ses / "anat"
        folder.mkdir(parents=True)
        os.symlink(mri_bids / "sub-sctcrop" / "anat" / "sub-sctcrop_T2w.nii.gz",
                   folder / f"sub-long_{ses}_T2w.nii.gz")
    deriv = tmp_path / "deriv"
    assert batch(bids, deriv) == 0
    for ses in ("ses-01", "ses-02"):
        assert (deriv / "sub-long" / ses / "anat" / f"sub-long_{ses}_T2w_discs.mrk.json").exists()
        assert (deriv / "sub-long" / ses / "anat" / f"sub-long_{ses}_T2w_label-discs_dlabel.nii.gz").exists()
    assert {(r["subject"], r["session"]) for r in table(deriv)} == {("sub-long", "ses-01"), ("sub-long", "ses-02")}
    # Deleting an output makes a re-run redo that image only.
    (deriv / "sub-long" / "ses-02" / "anat" / "sub-long_ses-02_T2w_qc.png").unlink()
    assert batch(bids, deriv, "--summary-json", tmp_path / "s.json") == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["labeled"] == 1 and s["skipped_done"] == 1
    # A changed image is redone (its content hash differs), the other one is not.
    image = bids / "sub-long" / "ses-01" / "anat" / "sub-long_ses-01_T2w.nii.gz"
    image.unlink()
    os.symlink(mri_bids / "sub-errsm20" / "anat" / "sub-errsm20_T2w.nii.gz", image)
    assert batch(bids, deriv, "--summary-json", tmp_path / "s2.json") == 0
    s2 = json.loads((tmp_path / "s2.json").read_text())
    assert s2["labeled"] == 1 and s2["skipped_done"] == 1
    # A dataset where the default derivative folder cannot be made (read-only, or, as here, a
    # file in the way): one error line pointing to --out, not a traceback.
    (bids / "derivatives").write_text("not a folder")
    capsys.readouterr()
    assert run_cli("batch", "--bids", bids, "--model", fold_model()) == 2
    assert "pass --out" in capsys.readouterr().err
