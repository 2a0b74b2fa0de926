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
