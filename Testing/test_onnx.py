"""Inference on ONNX Runtime: every shipped model has its .onnx, which gives the Keras outputs on
real inputs and the same labels end to end; the export keeps open input sizes and reads the
output channels from the model; ``label`` runs with TensorFlow unimportable; bad .onnx files
are clear errors.

Tolerance: max |ONNX Runtime - Keras| <= 1e-4 on every network output (measured 4e-7 .. 2e-6,
float32 with different kernels); end to end, disc positions within 0.01 mm and confidences
within 1e-3, the same flags; X-ray corners within 0.01 px.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, require_module, require_path
from VertebralLabelingLib.errors import ModelError
from VertebralLabelingLib.io import models as model_lib
from VertebralLabelingLib.io.files import data_root
from VertebralLabelingLib.mri import networks

TOLERANCE = 1e-4
MODELS = model_lib.models_dir()
SHIPPED_JSON = sorted(p for p in MODELS.rglob("*.json"))
WITH_KERAS = [p for p in SHIPPED_JSON if p.with_suffix(".keras").exists()]


def _ids(paths):
    return [str(p.relative_to(MODELS).with_suffix("")) for p in paths]


def test_the_shipped_models_are_all_there():
    names = set(_ids(SHIPPED_JSON))
    assert {"compact", "xray-compact", "xray-refine"} <= names and sum(n.startswith("loso/") for n in names) == 3


@pytest.mark.parametrize("meta_path", SHIPPED_JSON, ids=_ids(SHIPPED_JSON))
def test_every_shipped_model_has_its_onnx_recorded(meta_path):
    onnx_path = meta_path.with_suffix(".onnx")
    assert onnx_path.exists(), f"{onnx_path.name} missing: run vertebral-labeling export-onnx"
    record = json.loads(meta_path.read_text())["onnx"]
    assert record["file"] == onnx_path.name
    assert record["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest(), \
        "the .onnx changed after its export was recorded"
    if meta_path.with_suffix(".keras").exists():
        assert record["keras_sha256"] == hashlib.sha256(meta_path.with_suffix(".keras").read_bytes()).hexdigest(), \
            "the .keras was retrained without re-exporting the .onnx"
    # batch, height and width stay open (whole padded slices of any size), one channel in; the
    # X-ray refiner and end classifier take fixed-size crops
    meta = json.loads(meta_path.read_text())
    if meta.get("task") in ("xray-vertebra-refiner", "xray-end-vertebrae"):
        assert record["input_shape"] == [None, *meta["input_shape"], 1]
    else:
        assert record["input_shape"][:3] == [None, None, None] and record["input_shape"][3] == 1
    assert record["check_max_abs_diff"] <= TOLERANCE
    assert {"keras", "tensorflow", "tf2onnx", "onnx"} <= set(record["versions"])


def test_bundled_names_resolve_to_onnx():
    assert model_lib.resolve_model_path("compact").suffix == ".onnx"
    assert model_lib.resolve_model_path("xray-compact").suffix == ".onnx"
    assert model_lib.resolve_model_path("some/path.keras").suffix == ".keras"


# -- ONNX Runtime == Keras on real inputs ------------------------------------------------------
class Recorder:
    """Wraps a Network and keeps every batch it was given (the real inputs of a labeling)."""

    def __init__(self, network):
        self.network, self.batches = network, []

    def run(self, batch):
        self.batches.append(np.array(batch))
        return self.network.run(batch)


def _mri_volumes():
    from VertebralLabelingLib.mri.volume import load_volume

    bids = require_path(data_root() / "mri" / "bids")
    images = sorted(bids.glob("sub-*/anat/*_T2w.nii.gz"))
    assert len(images) >= 4
    return [load_volume(p) for p in images]


def _pairs(kind, meta_path):
    require_module("tensorflow", "the Keras side of the equivalence test")
    if kind == "mri":
        from VertebralLabelingLib.mri.labeling import DiscLabeler as Labeler
    else:
        from VertebralLabelingLib.xray.label import XrayLabeler as Labeler
    onnx = Labeler.load(meta_path.with_suffix(".onnx"))
    keras = Labeler.load(meta_path.with_suffix(".keras"))
    assert type(onnx.model).__name__ == "OnnxNetwork" and type(keras.model).__name__ == "KerasNetwork"
    return onnx, keras


def _kind(meta_path):
    return "xray" if json.loads(meta_path.read_text()).get("task") == "xray-vertebral-corners" else "mri"


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("meta_path", WITH_KERAS, ids=_ids(WITH_KERAS))
def test_onnx_runtime_equals_keras_on_real_inputs(meta_path):
    onnx, keras = _pairs(_kind(meta_path), meta_path)
    recorder = onnx.model = Recorder(onnx.model)
    if _kind(meta_path) == "mri":
        inputs = _mri_volumes()
        results = [(onnx.label(v), keras.label(v)) for v in inputs]
        for a, b in results:
            assert [d.name for d in a.discs] == [d.name for d in b.discs]
            np.testing.assert_allclose([d.ras for d in a.discs], [d.ras for d in b.discs], atol=0.01)
            np.testing.assert_allclose([d.confidence for d in a.discs], [d.confidence for d in b.discs], atol=1e-3)
            assert [d.flagged for d in a.discs] == [d.flagged for d in b.discs]
    else:
        from VertebralLabelingLib.xray import aasce
        from VertebralLabelingLib.xray import data as xray_data

        aset = aasce.load_aasce(data_dir=require_path(data_root() / "xray-aasce"))
        _, val = aasce.split_names(aset.names)
        for index in aset.indices_of(val[:3]):
            radiograph = xray_data.read_radiograph(aset.image_path(index))
            a, b = onnx.label(radiograph), keras.label(radiograph)
            np.testing.assert_allclose(a.points_px, b.points_px, atol=0.01)
            np.testing.assert_allclose(a.cobb.angles_deg, b.cobb.angles_deg, atol=0.01)
    assert len(recorder.batches) >= 3
    worst = 0.0
    for batch in recorder.batches:
        for x, y in zip(recorder.network.run(batch), keras.model.run(batch)):
            assert x.shape == y.shape
            worst = max(worst, float(np.abs(x - y).max()))
    print(f"\n{meta_path.stem}: max |onnx - keras| {worst:.2g} over {len(recorder.batches)} real inputs "
          f"of shapes {sorted({b.shape for b in recorder.batches})}")
    assert worst <= TOLERANCE


@pytest.mark.realdata
def test_loso_folds_onnx_label_the_subjects_like_the_default_model_expects():
    """The fold models ship as .onnx only (size): each labels a real subject with six discs."""
    from VertebralLabelingLib.mri.labeling import DiscLabeler

    volume = _mri_volumes()[0]
    for path in sorted((MODELS / "loso").glob("*.onnx")):
        result = DiscLabeler.load(path).label(volume)
        assert result.spine_found and len(result.discs) == 6


# -- the export ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eight_channel_export(tmp_path_factory):
    """An (untrained) compact net with 8 output channels: nothing may assume six discs."""
    require_module("tensorflow", "the export")
    require_module("tf2onnx", "the export")
    from VertebralLabelingLib.io.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("export")
    model = networks.build_compact(n_discs=8)
    model_lib.save(model, {"architecture": "compact", "name": "eight"}, out, "eight")
    return export_onnx(out / "eight.keras"), model


def test_export_keeps_open_sizes_and_the_models_channel_count(eight_channel_export):
    path, model = eight_channel_export
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["onnx"]["outputs"][0]["shape"] == [None, None, None, 8]
    network = model_lib.OnnxNetwork.load(path, meta)
    assert network.output_channels == [8]
    rng = np.random.default_rng(1)
    for shape in ((3, 256, 192, 1), (1, 384, 128, 1)):  # different slice sizes, one session
        x = rng.normal(size=shape).astype(np.float32)
        (y,) = network.run(x)
        assert y.shape == (shape[0], shape[1] // 2, shape[2] // 2, 8)
        assert np.abs(y - np.asarray(model(x, training=False))).max() <= TOLERANCE


def test_export_refuses_non_keras_files(tmp_path):
    require_module("tensorflow", "the export")
    from VertebralLabelingLib.io.onnx_export import export_onnx

    with pytest.raises(ModelError, match="not a .keras"):
        export_onnx(MODELS / "compact.onnx")


def test_export_command_reports_bad_files_with_exit_2(tmp_path, capsys):
    from VertebralLabelingLib.cli import main

    assert main(["export-onnx", str(tmp_path / "missing.keras")]) == 2
    assert capsys.readouterr().err.startswith("error: Model file not found")
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    (tmp_path / "bad.json").write_text("{}")
    assert main(["export-onnx", str(tmp_path / "bad.keras")]) == 2
    assert "corrupt" in capsys.readouterr().err and not (tmp_path / "bad.onnx").exists()


# -- bad files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"\x08\x01garbage" * 50], ids=["empty", "garbage"])
def test_corrupt_onnx_is_a_model_error(tmp_path, content, capsys):
    from VertebralLabelingLib.cli import main
    from VertebralLabelingLib.io.images import write_image_atomic
    from VertebralLabelingLib.mri.labeling import DiscLabeler
    from VertebralLabelingLib.mri.phantom import make_phantom

    (tmp_path / "bad.onnx").write_bytes(content)
    (tmp_path / "bad.json").write_text((MODELS / "compact.json").read_text())
    with pytest.raises(ModelError, match="corrupt or not an ONNX model"):
        DiscLabeler.load(tmp_path / "bad.onnx")
    volume, _ = make_phantom(seed=0)
    write_image_atomic(volume.to_sitk(), tmp_path / "p.nii.gz")
    code = main(["label", str(tmp_path / "p.nii.gz"), "-o", str(tmp_path / "o.mrk.json"),
                 "--model", str(tmp_path / "bad.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "bad.onnx" in err
    assert not (tmp_path / "o.mrk.json").exists()


def test_an_mri_onnx_is_not_an_xray_model(tmp_path):
    from VertebralLabelingLib.xray.label import XrayLabeler

    with pytest.raises(ModelError, match="not an X-ray landmark model"):
        XrayLabeler.load(MODELS / "compact.onnx")


# -- no TensorFlow on the inference path ---------------------------------------------------------
BLOCKER = '''
import sys
class _Blocked:
    """Import hook: any import of the blocked packages fails, as in an install without them."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked by the test (inference must not need it)")
        return None
sys.meta_path.insert(0, _Blocked())
'''


def _run_without_tensorflow(tmp_path, args, blocked=("tensorflow", "keras", "tf2onnx")):
    blocker_dir = tmp_path / "blocker"
    blocker_dir.mkdir(exist_ok=True)
    (blocker_dir / "sitecustomize.py").write_text(f"BLOCKED = {tuple(blocked)!r}\n" + BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker_dir), str(REPO / "VertebralLabeling")]))
    code = ("import sys; from VertebralLabelingLib.cli import main; rc = main(sys.argv[1:]); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.realdata
def test_the_blocker_really_blocks_tensorflow(tmp_path):
    """The same call with a .keras model must fail: proof that the blocker works, and that a
    missing TensorFlow is one clear error line."""
    image = require_path(data_root() / "mri" / "bids" / "sub-errsm18" / "anat" / "sub-errsm18_T2w.nii.gz")
    proc = _run_without_tensorflow(tmp_path, ["label", image, "-o", tmp_path / "o.mrk.json",
                                              "--model", MODELS / "compact.keras"])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "blocked by the test" in proc.stderr


@pytest.mark.realdata
def test_label_runs_without_tensorflow(tmp_path):
    image = require_path(data_root() / "mri" / "bids" / "sub-errsm18" / "anat" / "sub-errsm18_T2w.nii.gz")
    proc = _run_without_tensorflow(tmp_path, ["label", image, "-o", tmp_path / "o.mrk.json",
                                              "--qc", tmp_path / "qc.png"])
    assert proc.returncode == 0, proc.stderr
    assert "C7-T1" in proc.stdout and (tmp_path / "o.mrk.json").exists() and (tmp_path / "qc.png").exists()


@pytest.mark.realdata
def test_batch_and_xray_label_run_without_tensorflow(tmp_path):
    bids = tmp_path / "bids"
    src = require_path(data_root() / "mri" / "bids" / "sub-errsm20" / "anat" / "sub-errsm20_T2w.nii.gz")
    (bids / "sub-a" / "anat").mkdir(parents=True)
    (bids / "sub-a" / "anat" / "sub-a_T2w.nii.gz").symlink_to(src)
    proc = _run_without_tensorflow(tmp_path, ["batch", "--bids", bids, "--out", tmp_path / "deriv"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "deriv" / "sub-a" / "anat" / "sub-a_T2w_discs.json").read_text())["status"] == "ok"
    from VertebralLabelingLib.xray import aasce

    aset = aasce.load_aasce(data_dir=require_path(data_root() / "xray-aasce"))
    proc = _run_without_tensorflow(tmp_path, ["xray", "label", aset.image_path(0), "-o", tmp_path / "x.mrk.json"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.mrk.json").exists()


@pytest.mark.realdata
def test_without_onnxruntime_label_says_what_to_install(tmp_path):
    image = require_path(data_root() / "mri" / "bids" / "sub-errsm18" / "anat" / "sub-errsm18_T2w.nii.gz")
    proc = _run_without_tensorflow(tmp_path, ["label", image, "-o", tmp_path / "o.mrk.json"],
                                   blocked=("tensorflow", "keras", "onnxruntime"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert "pip install onnxruntime" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.mrk.json").exists()


def _concat_onnx(path, channels_in, channels_out):
    """A tiny ONNX model (B, H, W, channels_in) -> (B, H, W, channels_out): the input repeated."""
    import onnx
    from onnx import TensorProto, helper

    copies = channels_out // channels_in
    node = helper.make_node("Concat", ["midsagittal"] * copies, ["heatmaps"], axis=3)
    graph = helper.make_graph(
        [node], "shapes",
        [helper.make_tensor_value_info("midsagittal", TensorProto.FLOAT, ["B", "H", "W", channels_in])],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["B", "H", "W", channels_out])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    path.with_suffix(".json").write_text(json.dumps({"architecture": "compact"}))
    return path


def test_disc_model_shapes_are_checked_for_onnx_too(tmp_path):
    """The shape check of a disc model reads the .onnx session's shapes: six heatmaps or more
    (the extra any-disc and dens-tip channels) pass; fewer channels, or a 3-channel input, not."""
    require_module("onnx")
    network, _ = networks.load(_concat_onnx(tmp_path / "eight.onnx", 1, 8))
    assert network.output_channels == [8] and network.input_shapes == [(None, None, None, 1)]
    networks.load(_concat_onnx(tmp_path / "six.onnx", 1, 6))
    for name, c_in, c_out in (("three-out", 1, 3), ("three-in", 3, 6)):
        with pytest.raises(ModelError, match="not a VertebralLabeling disc model"):
            networks.load(_concat_onnx(tmp_path / f"{name}.onnx", c_in, c_out))
