"""Static checks of the CobbAngle Slicer module (its Widget needs qt/ctk, which exist only in
Slicer; the Logic and self-test run for real in test_slicer_modules.py): every ``self.ui.<name>``
and export button is a widget of the .ui file, the parameter node matches the
.ui's SlicerParameterName properties, the template classes exist, imports stay lazy, CMake
installs the module and the extension builds it, and the X-ray adapter has no GUI calls.
"""

import ast
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CobbAngle"
MODULE_PY = MODULE_DIR / "CobbAngle.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CobbAngle.ui"
ADAPTER = REPO / "VertebralLabeling" / "VertebralLabelingSlicerLib" / "xray_adapter.py"


@pytest.fixture(scope="module")
def tree():
    return ast.parse(MODULE_PY.read_text(), filename=str(MODULE_PY))


@pytest.fixture(scope="module")
def ui_root():
    return ElementTree.parse(UI_FILE).getroot()


def widgets(ui_root):
    return {w.get("name"): w for w in ui_root.iter("widget")}


def prop(widget, name):
    for p in widget.findall("property"):
        if p.get("name") == name:
            return p
    return None


def classes(tree):
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def test_every_ui_attribute_is_a_widget(tree, ui_root):
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"
            and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    (exports,) = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  and [ast.unparse(t) for t in n.targets] == ["exports"]]
    used |= {key.value for key in exports.keys}
    assert {"anglesTable", "manualTemplateButton", "exportAnglesButton"} <= used  # base: test_module_static
    missing = used - set(widgets(ui_root))
    assert not missing, f"used in CobbAngle.py but not in the .ui file: {sorted(missing)}"


def test_ui_has_the_panel_of_the_issue(ui_root):
    w = widgets(ui_root)
    expected = {"inputSelector": "qMRMLNodeComboBox", "outputSelector": "qMRMLNodeComboBox",
                "applyButton": "QPushButton", "progressBar": "QProgressBar",
                "anglesTable": "QTableWidget", "statusLabel": "QLabel",
                "manualTemplateButton": "QPushButton", "manualPlaceButton": "QPushButton",
                "exportMarkupsButton": "QPushButton", "exportCsvButton": "QPushButton",
                "exportAnglesButton": "QPushButton"}
    for name, cls in expected.items():
        assert name in w and w[name].get("class") == cls, name
    assert [s.text for s in prop(w["inputSelector"], "nodeTypes").iter("string")] == ["vtkMRMLScalarVolumeNode"]
    # Colour radiographs load as vector volumes, a child class of scalar volumes.
    assert prop(w["inputSelector"], "showChildNodeTypes").find("bool").text == "true"
    output = w["outputSelector"]
    assert [s.text for s in prop(output, "nodeTypes").iter("string")] == ["vtkMRMLMarkupsFiducialNode"]
    for flag in ("addEnabled", "renameEnabled", "noneEnabled"):
        assert prop(output, flag).find("bool").text == "true", flag
    assert prop(w["anglesTable"], "columnCount").find("number").text == "4"


def test_every_mrml_widget_gets_the_scene(ui_root):
    top = ui_root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "CobbAngle"
    receivers = {c.findtext("receiver") for c in ui_root.iter("connection")
                 if c.findtext("sender") == top.get("name")
                 and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {n for n, w in widgets(ui_root).items() if w.get("class").startswith("qMRML") and w is not top}
    assert mrml and mrml <= receivers


def test_parameter_node_matches_the_ui(tree, ui_root):
    cls = classes(tree)["CobbAngleParameterNode"]
    assert [ast.unparse(d) for d in cls.decorator_list] == ["parameterNodeWrapper"]
    fields = {s.target.id: ast.unparse(s.annotation) for s in cls.body if isinstance(s, ast.AnnAssign)}
    assert fields == {"inputVolume": "vtkMRMLScalarVolumeNode", "outputMarkups": "vtkMRMLMarkupsFiducialNode",
                      "modelName": "str"}
    names = {p.findtext("string") for p in ui_root.iter("property") if p.get("name") == "SlicerParameterName"}
    assert names == {"inputVolume", "outputMarkups"}


def test_template_classes_and_logic_api(tree):
    c = classes(tree)
    bases = {name: [ast.unparse(b) for b in node.bases] for name, node in c.items()}
    assert bases["CobbAngle"] == ["SpineModule"]
    assert bases["CobbAngleWidget"] == ["SpineModuleWidget"]
    assert bases["CobbAngleLogic"] == ["SpineModuleLogic"]
    assert bases["CobbAngleTest"] == ["SpineModuleTest"]
    methods = {n.name: n for n in c["CobbAngleLogic"].body if isinstance(n, ast.FunctionDef)}
    assert [a.arg for a in methods["process"].args.args] == ["self", "volumeNode", "markupsNode", "progress",
                                                            "overwriteEdits"]
    assert "labelerFactory" in [a.arg for a in methods["__init__"].args.args]
    for name in ("startLive", "stopLive", "manualNode", "export", "loadLabeler"):
        assert name in methods, name
    # The live observer is the adapter's; the widget gets its callback.
    assert "xray_adapter.LiveCobb" in ast.unparse(methods["startLive"])


def test_adapter_is_headless():
    tree = ast.parse(ADAPTER.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    assert not any(n.split(".")[0] in ("qt", "ctk", "slicer") for n in names), names
    gui = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
           and isinstance(n.value, ast.Name) and n.value.id == "slicer"]
    assert not gui


def test_cmake_builds_the_module():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"[\w/${}.]+\.(?:py|png|ui)\b", text))
    listed = {n.replace("${MODULE_NAME}", "CobbAngle") for n in listed}
    assert listed == {"CobbAngle.py", "Resources/Icons/CobbAngle.png", "Resources/UI/CobbAngle.ui"}
    for name in listed:
        assert (MODULE_DIR / name).exists(), name
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    top = (REPO / "CMakeLists.txt").read_text()
    assert "add_subdirectory(CobbAngle)" in top
    # The X-ray core files are installed by the VertebralLabeling module.
    core = (REPO / "VertebralLabeling" / "CMakeLists.txt").read_text()
    for path in sorted((REPO / "VertebralLabeling" / "VertebralLabelingLib" / "xray").glob("*.py")):
        assert f"VertebralLabelingLib/xray/{path.name}" in core, path.name
    assert "VertebralLabelingSlicerLib/xray_adapter.py" in core


def test_icon_is_a_small_128px_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "CobbAngle.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (128, 128)
    assert len(data) < 50_000
