"""Static checks of the Slicer module, which cannot be imported outside Slicer.

The GUI half of the module (the Widget) needs ``qt`` and ``ctk``, which exist only inside Slicer,
so these tests read the source instead: every ``self.ui.<name>`` (the module's and the shared
module base's) exists in the .ui file, the module has the five classes Slicer's template has, the
core never imports Slicer, and CMake installs every Python file (a file missing there works from
the source tree but breaks the installed extension).  The Logic and the self-tests run for real
in test_slicer_modules.py.
"""

import ast
import fnmatch
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "VertebralLabeling"
MODULE_PY = MODULE_DIR / "VertebralLabeling.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "VertebralLabeling.ui"
MODULE_BASE = MODULE_DIR / "VertebralLabelingSlicerLib" / "module_base.py"
LIB_DIRS = ("VertebralLabelingLib", "VertebralLabelingSlicerLib")
SLICER_ONLY = re.compile(r"^(slicer|qt|ctk|mrml|vtkMRML)|^vtk.*MRML", re.IGNORECASE)


@pytest.fixture(scope="module")
def module_tree():
    return ast.parse(MODULE_PY.read_text(), filename=str(MODULE_PY))


@pytest.fixture(scope="module")
def ui_root():
    return ElementTree.parse(UI_FILE).getroot()


def ui_widgets(ui_root):
    return {w.get("name"): w for w in ui_root.iter("widget")}


def imported_modules(tree, top_level_only=False):
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")


def ui_attributes(tree):
    """Widget names a module file uses: ``self.ui.<name>`` and the keys of its ``exports``."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["exports"]:
            used |= {key.value for key in node.value.keys}
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Attribute) and owner.attr == "ui" and \
                isinstance(owner.value, ast.Name) and owner.value.id == "self":
            used.add(node.attr)
        elif isinstance(owner, ast.Name) and owner.id == "ui":
            used.add(node.attr)
    return used


@pytest.mark.parametrize("ui_file", [UI_FILE, REPO / "CobbAngle" / "Resources" / "UI" / "CobbAngle.ui"],
                         ids=lambda p: p.name)
def test_every_widget_the_module_base_uses_is_in_both_ui_files(ui_file):
    used = ui_attributes(ast.parse(MODULE_BASE.read_text()))
    assert {"applyButton", "outputSelector", "progressBar", "statusLabel"} <= used
    missing = used - set(ui_widgets(ElementTree.parse(ui_file).getroot()))
    assert not missing, f"used in module_base.py but not in {ui_file.name}: {sorted(missing)}"


def test_every_ui_attribute_is_a_widget_in_the_ui_file(module_tree, ui_root):
    used = ui_attributes(module_tree)
    assert {"exportJsonButton", "exportCsvButton", "exportNiftiButton"} <= used
    missing = used - set(ui_widgets(ui_root))
    assert not missing, f"used in VertebralLabeling.py but not in the .ui file: {sorted(missing)}"


def test_ui_has_the_required_widgets(ui_root):
    widgets = ui_widgets(ui_root)
    expected = {"inputSelector": "qMRMLNodeComboBox", "outputSelector": "qMRMLNodeComboBox",
                "sliceModeComboBox": "QComboBox", "applyButton": "QPushButton",
                "progressBar": "QProgressBar", "resultsTable": "QTableWidget",
                "statusLabel": "QLabel", "exportJsonButton": "QPushButton",
                "exportCsvButton": "QPushButton", "exportNiftiButton": "QPushButton"}
    for name, cls in expected.items():
        assert name in widgets and widgets[name].get("class") == cls, name

    def prop(widget, name):
        for p in widget.findall("property"):
            if p.get("name") == name:
                return p
        return None

    assert [s.text for s in prop(widgets["inputSelector"], "nodeTypes").iter("string")] == \
        ["vtkMRMLScalarVolumeNode"]
    output = widgets["outputSelector"]
    assert [s.text for s in prop(output, "nodeTypes").iter("string")] == ["vtkMRMLMarkupsFiducialNode"]
    for flag in ("addEnabled", "renameEnabled", "noneEnabled"):
        assert prop(output, flag).find("bool").text == "true", flag
    items = [i.find("property/string").text for i in widgets["sliceModeComboBox"].findall("item")]
    assert items == ["Automatic", "Current yellow slice"]


def test_every_mrml_widget_gets_the_scene(ui_root):
    top = ui_root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    receivers = {c.findtext("receiver") for c in ui_root.iter("connection")
                 if c.findtext("sender") == top.get("name")
                 and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {n for n, w in ui_widgets(ui_root).items() if w.get("class").startswith("qMRML")
                    and w is not top}
    assert mrml_widgets and mrml_widgets <= receivers


def test_parameter_names_in_ui_match_the_parameter_node(module_tree, ui_root):
    (cls,) = [n for n in module_tree.body if isinstance(n, ast.ClassDef)
              and n.name == "VertebralLabelingParameterNode"]
    fields = {s.target.id: ast.unparse(s.annotation) for s in cls.body if isinstance(s, ast.AnnAssign)}
    assert fields == {"inputVolume": "vtkMRMLScalarVolumeNode",
                      "outputMarkups": "vtkMRMLMarkupsFiducialNode",
                      "useCurrentSlice": "bool", "modelName": "str"}
    names = {p.findtext("string") for p in ui_root.iter("property")
             if p.get("name") == "SlicerParameterName"}
    assert names == {"inputVolume", "outputMarkups"} and names <= set(fields)


def test_module_defines_the_template_classes(module_tree):
    classes = {n.name: n for n in module_tree.body if isinstance(n, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in node.bases] for name, node in classes.items()}
    assert bases["VertebralLabeling"] == ["SpineModule"]
    assert bases["VertebralLabelingWidget"] == ["SpineModuleWidget"]
    assert bases["VertebralLabelingLogic"] == ["SpineModuleLogic"]
    assert bases["VertebralLabelingTest"] == ["SpineModuleTest"]
    decorators = [ast.unparse(d) for d in classes["VertebralLabelingParameterNode"].decorator_list]
    assert decorators == ["parameterNodeWrapper"]
    methods = {n.name: n for n in classes["VertebralLabelingLogic"].body if isinstance(n, ast.FunctionDef)}
    args = [a.arg for a in methods["process"].args.args]
    assert args == ["self", "volumeNode", "markupsNode", "sliceR", "progress", "overwriteEdits"]
    init_args = [a.arg for a in methods["__init__"].args.args]
    assert "labelerFactory" in init_args
    module_init = ast.unparse(classes["VertebralLabeling"])
    assert "Romero F.P." in module_init and "NeuroInformatics 2018" in module_init


def test_module_base_derives_from_slicers_template_classes():
    classes = {n.name: n for n in ast.parse(MODULE_BASE.read_text()).body if isinstance(n, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in node.bases] for name, node in classes.items()}
    assert bases == {"SpineModule": ["ScriptedLoadableModule"],
                     "SpineModuleWidget": ["ScriptedLoadableModuleWidget", "VTKObservationMixin"],
                     "SpineModuleLogic": ["ScriptedLoadableModuleLogic"],
                     "SpineModuleTest": ["ScriptedLoadableModuleTest"]}
    module_init = ast.unparse(classes["SpineModule"])
    assert "categories = ['Spine']" in module_init and "dependencies = ['Markups']" in module_init


@pytest.mark.parametrize("path", [MODULE_PY, REPO / "CobbAngle" / "CobbAngle.py", MODULE_BASE],
                         ids=lambda p: p.name)
def test_modules_import_only_slicer_things_at_top(path):
    """The core (numpy, SimpleITK, ONNX Runtime) is imported lazily so the modules load without
    it; the module base, imported at the top of both, follows the same rule."""
    allowed = {"logging", "os", "sys", "ctk", "qt", "vtk", "slicer", "VertebralLabelingSlicerLib.module_base"}
    top = set(imported_modules(ast.parse(path.read_text()), top_level_only=True))
    assert all(name in allowed or name.split(".")[0] in allowed for name in top), top


def test_requirements_file_is_onnxruntime_only_and_tensorflow_never_imported(module_tree):
    """What the Logic installs (test_slicer_modules.py runs it) is a version range of ONNX
    Runtime (and tqdm, the study batch's progress bar); TensorFlow is never installed into Slicer."""
    source = MODULE_PY.read_text()
    requirements, progress = [line.strip() for line in
                       (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()
                       if line.strip() and not line.startswith("#")]
    assert requirements.startswith("onnxruntime") and "==" not in requirements  # a range, not a pin
    assert progress.startswith("tqdm>=") and "==" not in progress
    assert "tensorflow" not in source.lower().replace("needs tensorflow in slicer", "").replace(
        "tensorflow is never installed", "")
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and "tensorflow" in ast.unparse(n)
                   for n in module_tree.body)


@pytest.mark.parametrize("module_py", [MODULE_PY, REPO / "CobbAngle" / "CobbAngle.py"], ids=lambda p: p.name)
def test_modules_avoid_deprecated_slicer_calls(module_py):
    assert "GetOrientationString" not in module_py.read_text()  # deprecated in Slicer 5


@pytest.mark.parametrize("path", sorted((MODULE_DIR / "VertebralLabelingLib").rglob("*.py")),
                         ids=lambda p: p.relative_to(MODULE_DIR / "VertebralLabelingLib").as_posix())
def test_core_never_imports_slicer(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [name for name in imported_modules(tree) if SLICER_ONLY.search(name.lstrip("."))]
    assert not bad, f"{path.name} imports Slicer-only modules: {bad}"


def test_adapter_uses_mrml_but_no_gui():
    path = MODULE_DIR / "VertebralLabelingSlicerLib" / "mrml_adapter.py"
    tree = ast.parse(path.read_text())
    names = set(imported_modules(tree))
    assert not any(n.split(".")[0] in ("qt", "ctk") or n.startswith("slicer.") for n in names), names
    gui = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
           and isinstance(n.value, ast.Name) and n.value.id == "slicer"
           and n.attr in ("util", "app", "modules", "mrmlScene")]
    assert not gui, f"the adapter must work headless (take the scene as an argument): {gui}"


def cmake_listed(path):
    text = path.read_text()
    return set(re.findall(r"[\w/${}.]+\.(?:py|png|ui|txt|html)\b", text)), text


def test_cmake_installs_every_python_file_and_resource():
    listed, text = cmake_listed(MODULE_DIR / "CMakeLists.txt")
    listed = {name.replace("${MODULE_NAME}", "VertebralLabeling") for name in listed}
    expected = {"VertebralLabeling.py"} | {
        p.relative_to(MODULE_DIR).as_posix() for folder in LIB_DIRS for p in (MODULE_DIR / folder).rglob("*.py")}
    assert expected - listed == set(), f"not in CMakeLists.txt: {sorted(expected - listed)}"
    for name in listed:
        assert (MODULE_DIR / name).exists(), f"CMakeLists.txt lists a missing file: {name}"
    templates = {f"VertebralLabelingLib/study/templates/{p.name}"
                 for p in (MODULE_DIR / "VertebralLabelingLib" / "study" / "templates").iterdir()}
    assert templates and templates <= listed, "the QC page template must be installed"
    for resource in ("Resources/Icons/VertebralLabeling.png", "Resources/UI/VertebralLabeling.ui",
                     "Resources/requirements.txt"):
        assert resource in listed
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    for pattern in ("Resources/Models/*.onnx", "Resources/Models/*.json", "Resources/Models/*.md"):
        assert pattern in text


def test_pip_package_includes_the_qc_template():
    """qc_report reads its page with importlib.resources: the wheel must carry the template."""
    from conftest import require_module

    tomllib = require_module("tomllib", "Python 3.11 or newer")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["VertebralLabelingLib.study"]
    lib = MODULE_DIR / "VertebralLabelingLib" / "study"
    templates = [p.relative_to(lib).as_posix() for p in (lib / "templates").iterdir()]
    assert templates and all(any(fnmatch.fnmatch(t, pattern) for pattern in patterns) for t in templates)


def test_top_level_cmake_is_an_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    for needle in ("cmake_minimum_required", "project(VertebralLabeling)", 'EXTENSION_CATEGORY "Spine"',
                   "EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                   "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", 'EXTENSION_DEPENDS "NA"',
                   "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "add_subdirectory(VertebralLabeling)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                   "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, needle


@pytest.mark.parametrize("path", ["VertebralLabeling/Resources/Icons/VertebralLabeling.png",
                                  "Resources/VertebralLabeling.png"])
def test_icons_are_small_128px_pngs(path):
    data = (REPO / path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)
    assert len(data) < 50_000


def test_study_panel_widgets_and_logic(module_tree, ui_root):
    """The study review panel: folder, subject list, previous/next, save correction; the Logic
    methods it calls exist (their MRML side is tested in test_study_mrml.py)."""
    widgets = ui_widgets(ui_root)
    expected = {"studyCollapsibleButton": "ctkCollapsibleButton",
                "studyDirectoryButton": "ctkDirectoryButton", "studySubjectComboBox": "QComboBox",
                "studyPreviousButton": "QPushButton", "studyNextButton": "QPushButton",
                "studySaveButton": "QPushButton", "studyStatusLabel": "QLabel"}
    for name, cls in expected.items():
        assert name in widgets and widgets[name].get("class") == cls, name
    custom = {c.findtext("class"): c.findtext("header") for c in ui_root.iter("customwidget")}
    assert custom.get("ctkDirectoryButton") == "ctkDirectoryButton.h"
    classes = {n.name: n for n in module_tree.body if isinstance(n, ast.ClassDef)}
    logic = {n.name for n in classes["VertebralLabelingLogic"].body if isinstance(n, ast.FunctionDef)}
    assert {"openStudy", "loadStudyItem", "closeStudyItem", "studyHasUnsavedEdits",
            "saveStudyCorrection"} <= logic
    widget = {n.name for n in classes["VertebralLabelingWidget"].body if isinstance(n, ast.FunctionDef)}
    assert {"onStudyDirectory", "onStudySubject", "onStudySave", "askToSaveStudyEdits"} <= widget
    tests = {n.name for n in classes["VertebralLabelingTest"].body if isinstance(n, ast.FunctionDef)}
    assert "test_StudyReview" in tests
