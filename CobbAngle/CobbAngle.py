"""CobbAngle: vertebral corners (T1-L5) and Cobb angles on an AP spine radiograph.

The second module of the VertebralLabeling extension, a thin GUI like the first one.  The
landmark model, the Cobb method and the writers are ``VertebralLabelingLib`` (no Slicer code,
shared with ``vertebral-labeling xray``); every MRML conversion is in
``VertebralLabelingSlicerLib.xray_adapter``.  Both are imported lazily, inside methods, so that
Slicer lists the module even before ONNX Runtime is installed.  What this module does like
VertebralLabeling (parameter node, Apply, edit guard, export, self-test runner) is
``VertebralLabelingSlicerLib.module_base``; this file is what is special to Cobb angles.
"""

import os
import sys

import qt
import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper

# The shared packages live in the VertebralLabeling module folder (installed side by side in an
# extension build; siblings in the source tree).
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
for _folder in (_MODULE_DIR, os.path.join(os.path.dirname(_MODULE_DIR), "VertebralLabeling")):
    if os.path.isdir(_folder) and _folder not in sys.path:
        sys.path.insert(0, _folder)

# Imported after the sys.path set-up above; it imports only Slicer packages at its top.
from VertebralLabelingSlicerLib.module_base import (  # noqa: E402
    SpineModule,
    SpineModuleLogic,
    SpineModuleTest,
    SpineModuleWidget,
    setupTable,
)

ANGLE_COLUMNS = ("Curve", "Angle (deg)", "End vertebrae", "Region")


#
# CobbAngle
#
class CobbAngle(SpineModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        SpineModule.__init__(self, parent)
        self.parent.title = "Cobb Angle (AP X-ray)"
        self.parent.helpText = """
Finds the four corners of each vertebra T1 to L5 (68 points, AASCE 2019 convention) on a frontal
(AP) spine radiograph and computes the three Cobb angles with their end vertebrae.<br>
Pick the radiograph and press <b>Apply</b>.  The end vertebrae of each curve are drawn as lines.
Drag any corner: the angles and lines update at once, without running the model again.<br>
<b>Manual mode</b>: when the model fails, create a template spine and drag its corners onto
the vertebrae, or click the 68 corners one after the other; the angles follow.<br>
Exports: corners as .mrk.json or CSV, angles as JSON.
"""
        self.parent.acknowledgementText = """
Cobb angles follow the AASCE 2019 challenge reference method.  Landmark data: Wu et al.,
"Automatic landmark estimation for adolescent idiopathic scoliosis assessment using BoostNet",
MICCAI 2017 (SpineWeb dataset 16).  Network design after Yi et al., "Vertebra-focused landmark
detection for scoliosis assessment", ISBI 2020.
"""


#
# CobbAngleParameterNode
#
@parameterNodeWrapper
class CobbAngleParameterNode:
    """The panel's state, saved with the scene.

    inputVolume - the AP radiograph.
    outputMarkups - point list with the 68 corners (None: a new one is created).
    modelName - bundled model name (Resources/Models/NAME.onnx, run on ONNX Runtime) or a path
        to a .onnx file (or a .keras file, which needs TensorFlow in Slicer's Python).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputMarkups: vtkMRMLMarkupsFiducialNode
    modelName: str = "xray-compact"


#
# CobbAngleWidget
#
class CobbAngleWidget(SpineModuleWidget):
    """The panel: pick a radiograph, Apply (or place corners by hand), read and export angles."""

    windowTitle = "Cobb Angle"
    applyToolTip = "Find the corners and angles"
    missingInputToolTip = "Select a radiograph"
    pointsName = "corners"
    exports = {"exportMarkupsButton": ("Markups JSON (*.mrk.json)", ".mrk.json", "markups"),
               "exportCsvButton": ("CSV (*.csv)", "_corners.csv", "csv"),
               "exportAnglesButton": ("JSON (*.json)", "_cobb.json", "angles")}

    def createLogic(self):
        return CobbAngleLogic()

    def setupPanel(self) -> None:
        setupTable(self.ui.anglesTable, ANGLE_COLUMNS)
        self.ui.manualTemplateButton.connect("clicked(bool)", self.onManualTemplate)
        self.ui.manualPlaceButton.connect("clicked(bool)", self.onManualPlace)

    def updatePanel(self, hasInput, hasPoints) -> None:
        """Manual mode needs the radiograph; the angle export needs angles."""
        self.ui.manualTemplateButton.enabled = hasInput
        self.ui.exportAnglesButton.enabled = hasPoints and self.logic.lastCobb is not None

    def onOutputChanged(self, node) -> None:
        """Follow the selected point list live (angles, lines) without running the model."""
        if node is not None and node.GetNumberOfControlPoints():
            self.logic.startLive(self._parameterNode.inputVolume if self._parameterNode else None,
                                 node, self.onAnglesChanged)
        else:
            self.logic.stopLive()
            self.onAnglesChanged(None, "")

    # -- model ---------------------------------------------------------------------------------
    def showResult(self, volumeNode, markupsNode) -> None:
        """Follow the new corners live (angles table, Cobb lines) and show the radiograph."""
        self.logic.startLive(volumeNode, markupsNode, self.onAnglesChanged)
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)

    # -- manual mode ---------------------------------------------------------------------------
    def onManualTemplate(self) -> None:
        self._manual(template=True)

    def onManualPlace(self) -> None:
        self._manual(template=False)

    def _manual(self, template) -> None:
        from VertebralLabelingLib.errors import VertebralLabelingError

        params = self._parameterNode
        try:
            node = self.logic.manualNode(params.inputVolume, template)
        except VertebralLabelingError as error:
            slicer.util.errorDisplay(str(error), windowTitle=self.windowTitle)
            return
        params.outputMarkups = node
        self.logic.startLive(params.inputVolume, node, self.onAnglesChanged)
        if not template:  # start placing T1-TL, then the next unplaced point, and so on
            slicer.modules.markups.logic().SetActiveList(node)
            interaction = slicer.app.applicationLogic().GetInteractionNode()
            interaction.SetPlaceModePersistence(1)
            interaction.SetCurrentInteractionMode(interaction.Place)
        self.ui.statusLabel.text = ("Drag the corners onto the vertebrae." if template else
                                    "Click T1-TL, T1-TR, T1-BL, T1-BR, T2-TL, ... on the image.")

    # -- angles table --------------------------------------------------------------------------
    def onAnglesChanged(self, cobb, message) -> None:
        """Called by the live observer after every corner change."""
        from VertebralLabelingLib.xray.export import ANGLE_COLUMNS as CURVES
        from VertebralLabelingLib.xray.export import curve_region

        table = self.ui.anglesTable
        table.setRowCount(3)
        for row in range(3):
            if cobb is None:
                cells = (CURVES[row], "", "", "")
            else:
                upper, lower = cobb.end_vertebrae[row]
                cells = (CURVES[row], f"{cobb.angles_deg[row]:.1f}", f"{upper} - {lower}",
                         curve_region(upper, lower))
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        if message and cobb is None:
            self.ui.statusLabel.text = message
        self._updateState()


#
# CobbAngleLogic
#
class CobbAngleLogic(SpineModuleLogic):
    """Radiograph node in, 68-point list and Cobb lines out (usable from scripts).

    ``labelerFactory(modelName)`` returns an object with ``label(radiograph, progress)`` giving
    an ``XrayResult``; the default loads a bundled model with ``XrayLabeler.load``.  Tests
    inject a fake one.
    """

    parameterNodeClass = CobbAngleParameterNode
    defaultModelName = "xray-compact"

    def __init__(self, labelerFactory=None) -> None:
        SpineModuleLogic.__init__(self, labelerFactory)
        self.live = None

    @property
    def lastCobb(self):
        return self.live.last if self.live is not None else None

    def loadLabeler(self, modelName):
        from VertebralLabelingLib.xray.label import XrayLabeler

        return XrayLabeler.load(modelName)

    def releaseScene(self) -> None:
        self.stopLive()

    def process(self, volumeNode, markupsNode=None, progress=None, overwriteEdits=False):
        """Label ``volumeNode``; write the 68 corners into ``markupsNode`` (or a new list).

        Raises UserEditsWouldBeLost before running the network when ``markupsNode`` holds hand
        corrections and ``overwriteEdits`` is False.
        """
        from VertebralLabelingSlicerLib import xray_adapter

        self.refuseToOverwriteEdits(
            markupsNode, overwriteEdits, xray_adapter.node_has_user_edits,
            'The corners in "{name}" were edited by hand; labeling again would replace them.')
        radiograph = xray_adapter.radiograph_from_node(volumeNode)
        result = self.label(radiograph, progress=progress)
        self.stopLive()
        return xray_adapter.update_landmarks_node(volumeNode.GetScene(), result.points, result.confidence,
                                                  volumeNode, markupsNode, overwrite_edits=overwriteEdits,
                                                  slice_z=radiograph.slice_z, level_review=result.level_review)

    def manualNode(self, volumeNode, template=True):
        from VertebralLabelingSlicerLib import xray_adapter

        scene = volumeNode.GetScene() if volumeNode is not None else slicer.mrmlScene
        return xray_adapter.manual_landmarks_node(scene, volumeNode, template)

    def startLive(self, volumeNode, markupsNode, callback=None):
        """Recompute the angles and redraw the Cobb lines whenever a corner changes."""
        from VertebralLabelingSlicerLib import xray_adapter

        self.stopLive()
        self.live = xray_adapter.LiveCobb(markupsNode.GetScene(), markupsNode, volumeNode, callback)
        return self.live

    def stopLive(self):
        if self.live is not None:
            self.live.remove()
            self.live = None

    def summary(self) -> str:
        result = self.lastResult
        if result is None:
            return ""
        angles = ", ".join(f"{a:.1f}" for a in result.cobb.angles_deg)
        return " ".join([f"68 corners in {result.seconds:.1f} s; Cobb angles {angles} deg"] + list(result.warnings))

    @staticmethod
    def export(markupsNode, path, kind, volumeNode=None) -> None:
        """Write the node's current corners (markups / csv) or angles (JSON) with the core writers."""
        from VertebralLabelingLib.xray import export as xray_export
        from VertebralLabelingSlicerLib import xray_adapter

        points = xray_adapter.points_from_node(markupsNode)
        confidence = xray_adapter.confidence_from_node(markupsNode)
        geometry = xray_adapter.geometry_from_node(volumeNode) if volumeNode is not None else None
        z = geometry.slice_z if geometry is not None else 0.0
        if kind == "markups":
            xray_export.write_markups_json(points, path, confidence, z)
        elif kind == "csv":
            pixels = geometry.physical_to_pixel(points) if geometry is not None else None
            xray_export.write_csv(points, path, pixels, confidence, z)
        elif kind == "angles":
            xray_export.write_angles_json(xray_adapter.cobb_from_node(markupsNode, volumeNode), path,
                                          {"points": markupsNode.GetName()})
        else:
            raise ValueError(f"unknown export kind {kind}")


#
# CobbAngleTest
#
class CobbAngleTest(SpineModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest) and in pytest; ``runTest`` (the base's)
    skips the bundled-model test without ONNX Runtime."""

    fakeModelTests = ("test_LiveUpdateWithFakeModel",)
    bundledModelTests = ("test_BundledModelRuns",)

    def test_BundledModelRuns(self):
        """The bundled .onnx model loads on ONNX Runtime with its refiner and gives its heads at 1/4 size."""
        import numpy as np

        from VertebralLabelingLib.xray.label import XrayLabeler

        self.delayDisplay("Running the bundled X-ray model")
        labeler = CobbAngleLogic().labeler()
        self.assertIsInstance(labeler, XrayLabeler)
        height, width = labeler.shape
        heat, offsets, level, anchors = labeler._network(np.zeros((1, height, width, 1), np.float32))
        self.assertEqual(heat.shape, (1, height // 4, width // 4, 1))
        self.assertEqual(offsets.shape, (1, height // 4, width // 4, 8))
        self.assertEqual(anchors.shape, (1, height // 4, width // 4, 2))
        self.assertIsNotNone(labeler.refiner)
        self.delayDisplay("Bundled model passed")

    def test_LiveUpdateWithFakeModel(self):
        """A fake labeler gives a straight spine (0 deg); tilting one vertebra updates the angles."""
        import numpy as np

        from VertebralLabelingLib.xray.data import Radiograph
        from VertebralLabelingLib.xray.label import XrayResult, cobb_from_physical
        from VertebralLabelingSlicerLib import xray_adapter

        radiograph = Radiograph(np.random.default_rng(0).random((600, 240)).astype(np.float32), (0.5, 0.5))
        volumeNode = xray_adapter.add_radiograph_node(slicer.mrmlScene, radiograph, "synthetic")
        points = xray_adapter.template_points(radiograph)

        class FakeLabeler:
            def label(self, radiograph, progress=None):
                return XrayResult(radiograph.physical_to_pixel(points), points, np.ones(17),
                                  cobb_from_physical(points, radiograph), radiograph)

        logic = CobbAngleLogic(labelerFactory=lambda name: FakeLabeler())
        node = logic.process(volumeNode)
        live = logic.startLive(volumeNode, node)
        self.assertAlmostEqual(max(live.last.angles_deg), 0.0, places=3)
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(4 * 8 + 1, position)  # T9-TR up by 5 mm
        node.SetNthControlPointPositionWorld(4 * 8 + 1, position[0], position[1] + 5.0, position[2])
        self.assertGreater(max(live.last.angles_deg), 5.0)
        logic.stopLive()
        self.delayDisplay("Test passed")
