"""The AASCE training split's held-out parts: the choosing images (``aasce.training_indices``)
and patient folds (``aasce.fold_names``), and the training options that use them."""

from pathlib import Path

import numpy as np
import pytest

from VertebralLabelingLib import cli
from VertebralLabelingLib.errors import InputError
from VertebralLabelingLib.xray import aasce


def test_training_indices_leave_out_exactly_the_choosing_images():
    names = [f"p{i}-{i} A AP.jpg" for i in range(120)]
    aset = aasce.AasceSet(Path("."), names, np.zeros((120, 68, 2)), None)
    train = names[:100]
    held = aasce.choosing_images(aset, train, count=80)
    kept = aasce.training_indices(aset, train, hold_out_choosing=True)
    assert len(held) == 80 and len(kept) == 20 and not set(kept) & set(held)
    assert set(kept) | set(held) == set(range(100))
    assert aasce.training_indices(aset, train, hold_out_choosing=False) == list(range(100))


def test_patient_folds_cover_the_training_split_once_and_never_split_a_patient():
    names = [f"sunhl-1th-0{p % 9}-Jan-2017-{p} {v} AP.jpg" for p in range(60) for v in "AB"[: 1 + p % 2]]
    held_all = []
    for fold in range(4):
        fit, held = aasce.fold_names(names, 4, fold)
        assert set(fit) | set(held) == set(names) and not set(fit) & set(held)
        assert not {aasce.patient_key(n) for n in fit} & {aasce.patient_key(n) for n in held}
        assert len({aasce.patient_key(n) for n in held}) == 15  # 60 patients dealt to 4 folds
        held_all += held
    assert sorted(held_all) == sorted(names)  # every image is held out exactly once
    with pytest.raises(InputError, match="fold"):
        aasce.fold_names(names, 4, 4)



@pytest.mark.parametrize("extra, message", [(["--fold", "1"], "at least 2 folds"),
                                            (["--folds", "1"], "at least 2 folds"),
                                            (["--folds", "3", "--fold", "3"], "at least 2 folds"),
                                            (["--folds", "3", "--hold-out-choosing"], "give one of them")])
def test_train_refuses_fold_options_it_would_ignore(tmp_path, capsys, extra, message):
    assert cli.main(["xray", "train", "--out", str(tmp_path / "m")] + extra) != 0
    assert message in capsys.readouterr().err and not (tmp_path / "m").exists()


def _chain(top=100.0):
    from test_xray_core import spine_points

    return spine_points(centre_x=150, top=top, pitch=32).reshape(17, 4, 2)


def test_a_chain_whose_top_vertebra_is_stored_last_is_put_in_order():
    """18 AASCE chains store their top vertebra last ("L5" above "T1"): repaired, it is T1 and
    every other vertebra moves down one name; a chain with a vertebra elsewhere cannot be."""
    ordered = _chain()
    assert aasce.order_status(ordered) == "ok" and aasce.repair_order(ordered) is not None
    rotated = np.concatenate([ordered[1:], ordered[:1]])  # as stored: T2..L5 named T1..L4, T1 named L5
    assert aasce.order_status(rotated) == "rotated"
    np.testing.assert_allclose(aasce.repair_order(rotated), ordered)
    np.testing.assert_allclose(aasce.repair_order(rotated.reshape(-1, 2)), ordered.reshape(-1, 2))
    broken = ordered.copy()
    broken[16] = ordered[8] + [0, 5]  # "L5" stored in the middle of the chain
    assert aasce.order_status(broken) == "broken" and aasce.repair_order(broken) is None


def test_load_aasce_repairs_or_names_chains_out_of_order_and_trainers_leave_the_broken_out(tmp_path):
    from test_xray_train_smoke import synthetic_aasce

    synthetic_aasce(tmp_path / "aasce", n=8)
    stored = aasce.load_aasce(data_dir=tmp_path / "aasce")
    table = np.loadtxt(tmp_path / "aasce" / "labels" / "landmarks.csv", delimiter=",")
    chains = np.stack([table[:, :68], table[:, 68:]], axis=2).reshape(8, 17, 4, 2)
    chains[0] = np.concatenate([chains[0, 1:], chains[0, :1]])  # rotated
    chains[1, 16] = chains[1, 8]  # broken
    flat = chains.reshape(8, 68, 2)
    np.savetxt(tmp_path / "aasce" / "labels" / "landmarks.csv", np.hstack([flat[..., 0], flat[..., 1]]),
               delimiter=",")
    repaired = aasce.load_aasce(data_dir=tmp_path / "aasce", repair=True)
    np.testing.assert_allclose(repaired.landmarks[0], stored.landmarks[0], atol=1e-9)
    assert repaired.broken == (repaired.names[1],) and aasce.load_aasce(data_dir=tmp_path / "aasce").broken == ()
    kept = aasce.training_indices(repaired, repaired.names, hold_out_choosing=False)
    assert 1 not in kept and len(kept) == 7


def test_evaluation_also_scores_against_the_chain_put_in_order():
    from VertebralLabelingLib.xray import evaluate
    from VertebralLabelingLib.xray.data import Radiograph

    class Result:
        def __init__(self, points):
            self.points_px = points
            self.cobb = evaluate.cobb_angles(points, image_height=800)

    ordered = _chain().reshape(-1, 2)
    rotated = np.concatenate([ordered[4:], ordered[:4]])
    radiograph = Radiograph(np.zeros((800, 300), np.float32))
    assert evaluate._against_repaired_labels(Result(ordered), ordered, None, radiograph) == {}
    extra = evaluate._against_repaired_labels(Result(ordered), rotated, None, radiograph)
    assert extra["label_order"] == "rotated" and extra["level_shift_repaired"] == 0
    assert extra["smape_repaired"] == 0.0
    assert evaluate.level_shift(ordered, rotated) != 0  # against the stored order it looks shifted
