"""CobbAngle: vertebral corners (T1-L5) and Cobb angles on an AP spine radiograph.

The second module of the VertebralLabeling extension, a thin GUI like the first one.  The
landmark model, the Cobb method and the writers are ``VertebralLabelingLib`` (no Slicer code,
shared with ``vertebral-labeling xray``); every MRML conversion is in
``VertebralLabelingSlicerLib.xray_adapter``.  Both are imported lazily, inside methods, so that
Slicer lists the module even before ONNX Runtime is installed.
"""

import logging
import os
import sys

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The shared packages live in the VertebralLabeling module folder (installed side by side in an
# extension build; siblings in the source tree).
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
for _folder in (_MODULE_DIR, os.path.join(os.path.dirname(_MODULE_DIR), "VertebralLabeling")):
    if os.path.isdir(_folder) and _folder not in sys.path:
        sys.path.insert(0, _folder)

ANGLE_COLUMNS = ("Curve", "Angle (deg)", "End vertebrae", "Region")


#
# CobbAngle
#
class CobbAngle(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Cobb Angle (AP X-ray)"
        self.parent.categories = ['Spine']
        self.parent.dependencies = ["Markups"]
        self.parent.contributors = ["VertebralLabeling contributors"]
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
class CobbAngleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: pick a radiograph, Apply (or place corners by hand), read and export angles."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CobbAngle.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CobbAngleLogic()

        self.ui.anglesTable.setColumnCount(len(ANGLE_COLUMNS))
        self.ui.anglesTable.setHorizontalHeaderLabels(list(ANGLE_COLUMNS))
        self.ui.anglesTable.horizontalHeader().setStretchLastSection(True)
        self.ui.anglesTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.progressBar.setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.outputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.manualTemplateButton.connect("clicked(bool)", self.onManualTemplate)
        self.ui.manualPlaceButton.connect("clicked(bool)", self.onManualPlace)
        self.ui.exportMarkupsButton.connect("clicked(bool)", self.onExportMarkups)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.exportAnglesButton.connect("clicked(bool)", self.onExportAngles)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.logic.stopLive()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.stopLive()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
            self._updateState()

    def _updateState(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        hasInput = bool(self._parameterNode.inputVolume)
        self.ui.applyButton.enabled = hasInput
        self.ui.applyButton.toolTip = "Find the corners and angles" if hasInput else "Select a radiograph"
        self.ui.manualTemplateButton.enabled = hasInput
        hasPoints = bool(self._parameterNode.outputMarkups
                         and self._parameterNode.outputMarkups.GetNumberOfControlPoints())
        self.ui.exportMarkupsButton.enabled = hasPoints
        self.ui.exportCsvButton.enabled = hasPoints
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
    def onApplyButton(self) -> None:
        from VertebralLabelingLib.errors import VertebralLabelingError
        from VertebralLabelingSlicerLib.xray_adapter import UserEditsWouldBeLost

        try:
            if not self.logic.ensureRuntime(self.askInstallRuntime, busy=self.installing):
                self.ui.statusLabel.text = "ONNX Runtime is not installed: nothing was labeled."
                return
        except Exception as error:  # pip failed (offline, no wheel for this Python, ...)
            logging.exception("Installing ONNX Runtime failed")
            slicer.util.errorDisplay(f"Installing ONNX Runtime failed: {error}\n"
                                     "See the Python console for pip's output.", windowTitle="Cobb Angle")
            return
        params = self._parameterNode
        self.ui.applyButton.enabled = False
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        try:
            self.logic.modelName = params.modelName or "xray-compact"
            try:
                node = self.logic.process(params.inputVolume, params.outputMarkups, progress=self.onProgress)
            except UserEditsWouldBeLost as edited:
                if slicer.util.confirmYesNoDisplay(
                        f"{edited}\n\nReplace your edited corners?\n"
                        "(No: the new result goes into a new point list.)", windowTitle="Cobb Angle"):
                    node = self.logic.process(params.inputVolume, params.outputMarkups,
                                              progress=self.onProgress, overwriteEdits=True)
                else:
                    node = self.logic.process(params.inputVolume, None, progress=self.onProgress)
            params.outputMarkups = node
            self.logic.startLive(params.inputVolume, node, self.onAnglesChanged)
            slicer.util.setSliceViewerLayers(background=params.inputVolume, fit=True)
            self.ui.statusLabel.text = self.logic.summary()
        except VertebralLabelingError as error:
            self.ui.statusLabel.text = "Failed: " + str(error)
            slicer.util.errorDisplay(str(error), windowTitle="Cobb Angle")
        except Exception as error:  # a bug: keep the details in the log
            logging.exception("Cobb angle labeling failed")
            slicer.util.errorDisplay(f"Labeling failed unexpectedly: {error}", windowTitle="Cobb Angle")
        finally:
            self.ui.progressBar.setVisible(False)
            self._updateState()

    def askInstallRuntime(self, requirements) -> bool:
        return slicer.util.confirmOkCancelDisplay(
            "The X-ray landmark model runs its model on ONNX Runtime, which is not installed in Slicer's Python yet.\n\n"
            f"Install {', '.join(requirements)} now? (one download of about 80 MB)", windowTitle="Cobb Angle")

    def installing(self, message):
        """Shown while pip runs: a status line and a wait cursor (the download takes a while)."""
        self.ui.statusLabel.text = message
        slicer.app.processEvents()
        return slicer.util.WaitCursor()

    def onProgress(self, fraction, message) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

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
            slicer.util.errorDisplay(str(error), windowTitle="Cobb Angle")
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
        from VertebralLabelingLib.xray_export import ANGLE_COLUMNS as CURVES, curve_region

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

    # -- exports -------------------------------------------------------------------------------
    def onExportMarkups(self) -> None:
        self._export("Markups JSON (*.mrk.json)", ".mrk.json", "markups")

    def onExportCsv(self) -> None:
        self._export("CSV (*.csv)", "_corners.csv", "csv")

    def onExportAngles(self) -> None:
        self._export("JSON (*.json)", "_cobb.json", "angles")

    def _export(self, fileFilter, suffix, kind) -> None:
        from VertebralLabelingLib.errors import VertebralLabelingError

        params = self._parameterNode
        node = params.outputMarkups
        baseName = params.inputVolume.GetName() if params.inputVolume else node.GetName()
        default = os.path.join(qt.QDir.homePath(), baseName + suffix)
        path = qt.QFileDialog.getSaveFileName(self.parent, "Export", default, fileFilter)
        if not path:
            return
        try:
            self.logic.export(node, path, kind, params.inputVolume)
            self.ui.statusLabel.text = f"Saved {path}"
        except (VertebralLabelingError, OSError) as error:
            slicer.util.errorDisplay(f"Could not save {path}: {error}", windowTitle="Cobb Angle")


#
# CobbAngleLogic
#
class CobbAngleLogic(ScriptedLoadableModuleLogic):
    """Radiograph node in, 68-point list and Cobb lines out (usable from scripts).

    ``labelerFactory(modelName)`` returns an object with ``label(radiograph, progress)`` giving
    an ``XrayResult``; the default loads a bundled model with ``XrayLabeler.load``.  Tests
    inject a fake one.
    """

    def __init__(self, labelerFactory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.labelerFactory = labelerFactory
        self.modelName = "xray-compact"
        self._labelers = {}
        self.lastResult = None
        self.live = None

    def getParameterNode(self):
        return CobbAngleParameterNode(super().getParameterNode())

    @property
    def lastCobb(self):
        return self.live.last if self.live is not None else None

    def ensureRuntime(self, confirm, busy=None) -> bool:
        """Install ONNX Runtime on first use (never at import), if ``confirm(requirements)`` agrees.

        The list is the extension's Resources/requirements.txt (onnxruntime only: the bundled
        models are .onnx files, TensorFlow is never installed into Slicer); Slicer's numpy stays
        pinned (see ``VertebralLabelingSlicerLib.dependencies``).  An injected labeler needs nothing.
        """
        if self.labelerFactory is not None:
            return True
        from VertebralLabelingSlicerLib.dependencies import ensure_runtime

        return ensure_runtime(confirm, slicer.app.temporaryPath, slicer.util.pip_install, tag="CobbAngle",
                              busy=busy)

    def labeler(self):
        if self.modelName not in self._labelers:
            factory = self.labelerFactory
            if factory is None:
                from VertebralLabelingLib.xray_label import XrayLabeler

                factory = XrayLabeler.load
            self._labelers[self.modelName] = factory(self.modelName)
        return self._labelers[self.modelName]

    def process(self, volumeNode, markupsNode=None, progress=None, overwriteEdits=False):
        """Label ``volumeNode``; write the 68 corners into ``markupsNode`` (or a new list).

        Raises UserEditsWouldBeLost before running the network when ``markupsNode`` holds hand
        corrections and ``overwriteEdits`` is False.
        """
        from VertebralLabelingSlicerLib import xray_adapter

        if markupsNode is not None and not overwriteEdits and xray_adapter.node_has_user_edits(markupsNode):
            raise xray_adapter.UserEditsWouldBeLost(
                f'The corners in "{markupsNode.GetName()}" were edited by hand; labeling again '
                "would replace them.")
        radiograph = xray_adapter.radiograph_from_node(volumeNode)
        result = self.labeler().label(radiograph, progress=progress)
        self.lastResult = result
        for warning in result.warnings:
            logging.warning(warning)
        self.stopLive()
        return xray_adapter.update_landmarks_node(volumeNode.GetScene(), result.points, result.confidence,
                                                  volumeNode, markupsNode, overwrite_edits=overwriteEdits,
                                                  slice_z=radiograph.slice_z)

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
        from VertebralLabelingLib import xray_export
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
class CobbAngleTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """The fake-model test always runs; the bundled-model test needs ONNX Runtime, which the
        module installs on first Apply: without it that test is skipped with a message, not
        failed (a fresh Slicer with nothing installed passes)."""
        from VertebralLabelingSlicerLib.dependencies import missing_requirements

        self.setUp()
        self.test_LiveUpdateWithFakeModel()
        missing = missing_requirements()
        if missing:
            message = (f"Skipped the bundled-model test: {', '.join(missing)} not installed "
                       "(press Apply once to install it).")
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_BundledModelRuns()

    def test_BundledModelRuns(self):
        """The bundled .onnx model loads on ONNX Runtime and gives its two heads at 1/4 size."""
        import numpy as np
        from VertebralLabelingLib.xray_label import XrayLabeler

        self.delayDisplay("Running the bundled X-ray model")
        labeler = CobbAngleLogic().labeler()
        self.assertIsInstance(labeler, XrayLabeler)
        height, width = labeler.shape
        heat, offsets = labeler._network(np.zeros((1, height, width, 1), np.float32))
        self.assertEqual(heat.shape, (1, height // 4, width // 4, 1))
        self.assertEqual(offsets.shape, (1, height // 4, width // 4, 8))
        self.delayDisplay("Bundled model passed")

    def test_LiveUpdateWithFakeModel(self):
        """A fake labeler gives a straight spine (0 deg); tilting one vertebra updates the angles."""
        import numpy as np
        from VertebralLabelingLib.xray_data import Radiograph
        from VertebralLabelingLib.xray_label import XrayResult, cobb_from_physical
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
