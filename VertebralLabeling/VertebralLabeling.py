"""VertebralLabeling: label the cervical intervertebral discs (C2-C3 ... C7-T1) of an MRI.

The Slicer module is a thin GUI.  The labeling itself is ``VertebralLabelingLib`` (no Slicer
code, shared with the command line) and every MRML conversion is in
``VertebralLabelingSlicerLib.mrml_adapter``.  Both are imported lazily, inside methods, so that
Slicer can list the module (and show its help) even before ONNX Runtime is installed.
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

# Slicer puts scripted module folders on sys.path; make sure ours is there too when the file is
# loaded some other way (module reload, tests), so the bundled packages import.
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

SLICE_MODE_AUTOMATIC, SLICE_MODE_YELLOW = 0, 1
RESULT_COLUMNS = ("Disc", "Confidence", "Review")


#
# VertebralLabeling
#
class VertebralLabeling(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Vertebral Labeling"
        self.parent.categories = ["Spine"]
        self.parent.dependencies = ["Markups"]
        self.parent.contributors = ["VertebralLabeling contributors"]
        self.parent.helpText = """
Places one labeled point on each cervical intervertebral disc (C2-C3 to C7-T1, posterior tip of
the disc on the midsagittal plane) of a T2-weighted MRI volume.<br>
Pick the volume and press <b>Apply</b>.  Each point's description gives its confidence; points
flagged for review are drawn in the review colour (orange) and listed in the table.  Drag points
to correct them: the exports (.mrk.json, CSV, disc-label NIfTI) contain your corrections.
Labeling again asks before replacing points you have edited.<br>
The midsagittal plane is found automatically, or taken from the current Yellow (sagittal) slice.<br>
<b>Study review</b>: open a folder written by <code>vertebral-labeling batch</code>, step through
the subjects (Previous / Next), drag the points that are wrong and press <b>Save correction</b>.
Corrections are saved as <code>*_desc-corrected_discs.mrk.json</code> beside the predictions and
win afterwards (study table, <code>import-corrections</code>, retraining).
"""
        self.parent.acknowledgementText = """
The optional <i>romero2018</i> model reproduces the per-disc convolutional regressor design of
Romero F.P., David J.-P., Cohen-Adad J., "Vertebral labeling on MRI using deep learning
techniques", NeuroInformatics 2018, Montreal (doi:10.13140/RG.2.2.33723.92962); the default <i>compact</i> model is a heatmap network that shares one
backbone between the six discs.  Disc values follow the Spinal Cord Toolbox / spine-generic
convention (3 = C2-C3 ... 8 = C7-T1).
"""


#
# VertebralLabelingParameterNode
#
@parameterNodeWrapper
class VertebralLabelingParameterNode:
    """The panel's state, saved with the scene.

    inputVolume - the MRI volume to label.
    outputMarkups - point list that receives the discs (None: a new one is created).
    useCurrentSlice - use the Yellow slice as midsagittal plane instead of searching for it.
    modelName - bundled model name (Resources/Models/NAME.onnx, run on ONNX Runtime) or a path
        to a .onnx file (or a .keras file, which needs TensorFlow in Slicer's Python).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputMarkups: vtkMRMLMarkupsFiducialNode
    useCurrentSlice: bool = False
    modelName: str = "compact"


#
# VertebralLabelingWidget
#
class VertebralLabelingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: pick a volume, Apply, review the table, export."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._tableDiscNames = []  # disc name of each results-table row

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VertebralLabeling.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = VertebralLabelingLogic()

        self.ui.resultsTable.setColumnCount(len(RESULT_COLUMNS))
        self.ui.resultsTable.setHorizontalHeaderLabels(list(RESULT_COLUMNS))
        self.ui.resultsTable.horizontalHeader().setStretchLastSection(True)
        self.ui.resultsTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.resultsTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.progressBar.setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.sliceModeComboBox.connect("currentIndexChanged(int)", self.onSliceModeChanged)
        self.ui.outputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.resultsTable.connect("cellClicked(int,int)", self.onResultClicked)
        self.ui.exportJsonButton.connect("clicked(bool)", self.onExportJson)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.exportNiftiButton.connect("clicked(bool)", self.onExportNifti)
        self.ui.studyDirectoryButton.connect("directoryChanged(QString)", self.onStudyDirectory)
        self.ui.studySubjectComboBox.connect("currentIndexChanged(int)", self.onStudySubject)
        self.ui.studyPreviousButton.connect("clicked(bool)", self.onStudyPrevious)
        self.ui.studyNextButton.connect("clicked(bool)", self.onStudyNext)
        self.ui.studySaveButton.connect("clicked(bool)", self.onStudySave)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)

    def onSceneStartClose(self, caller, event) -> None:
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
        """Connect the selectors (SlicerParameterName in the .ui) to the parameter node."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
            self._updateState()

    def _updateState(self, caller=None, event=None) -> None:
        """Slice-mode combo and button states follow the parameter node."""
        if not self._parameterNode:
            return
        mode = SLICE_MODE_YELLOW if self._parameterNode.useCurrentSlice else SLICE_MODE_AUTOMATIC
        if self.ui.sliceModeComboBox.currentIndex != mode:
            self.ui.sliceModeComboBox.currentIndex = mode
        hasInput = bool(self._parameterNode.inputVolume)
        self.ui.applyButton.enabled = hasInput
        self.ui.applyButton.toolTip = "Label the discs" if hasInput else "Select an input volume"
        hasPoints = bool(self._parameterNode.outputMarkups
                         and self._parameterNode.outputMarkups.GetNumberOfControlPoints())
        for button in (self.ui.exportJsonButton, self.ui.exportCsvButton, self.ui.exportNiftiButton):
            button.enabled = hasPoints
        self.ui.exportNiftiButton.enabled = hasPoints and hasInput

    def onSliceModeChanged(self, index) -> None:
        if self._parameterNode:
            self._parameterNode.useCurrentSlice = index == SLICE_MODE_YELLOW

    def onOutputChanged(self, node) -> None:
        # The selector's node, not the parameter node's: this slot may run before the
        # parameter node wrapper has stored the new selection.
        self.updateResultsTable(node)

    # -- labeling ------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        """Label the discs; asks before replacing edited points, shows errors without traceback."""
        from VertebralLabelingLib.errors import VertebralLabelingError
        from VertebralLabelingSlicerLib.mrml_adapter import UserEditsWouldBeLost

        try:
            if not self.logic.ensureRuntime(self.askInstallRuntime, busy=self.installing):
                self.ui.statusLabel.text = "ONNX Runtime is not installed: nothing was labeled."
                return
        except Exception as error:  # pip failed (offline, no wheel for this Python, ...)
            logging.exception("Installing ONNX Runtime failed")
            slicer.util.errorDisplay(f"Installing ONNX Runtime failed: {error}\n"
                                     "See the Python console for pip's output.", windowTitle="Vertebral Labeling")
            return
        params = self._parameterNode
        self.ui.applyButton.enabled = False
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        try:
            sliceR = self.yellowSliceR() if params.useCurrentSlice else None
            self.logic.modelName = params.modelName or "compact"
            try:
                node = self.logic.process(params.inputVolume, params.outputMarkups, sliceR,
                                          progress=self.onProgress)
            except UserEditsWouldBeLost as edited:
                if slicer.util.confirmYesNoDisplay(
                        f"{edited}\n\nReplace your edited points?\n"
                        "(No: the new result goes into a new point list.)",
                        windowTitle="Vertebral Labeling"):
                    node = self.logic.process(params.inputVolume, params.outputMarkups, sliceR,
                                              progress=self.onProgress, overwriteEdits=True)
                else:
                    node = self.logic.process(params.inputVolume, None, sliceR,
                                              progress=self.onProgress)
            params.outputMarkups = node
            self.updateResultsTable(node)
            self.showResult(params.inputVolume, node)
            self.ui.statusLabel.text = self.logic.summary()
        except VertebralLabelingError as error:
            self.ui.statusLabel.text = "Failed: " + str(error)
            slicer.util.errorDisplay(str(error), windowTitle="Vertebral Labeling")
        except Exception as error:  # a bug: keep the details in the log / details box
            logging.exception("Vertebral labeling failed")
            slicer.util.errorDisplay(f"Labeling failed unexpectedly: {error}",
                                     windowTitle="Vertebral Labeling")
        finally:
            self.ui.progressBar.setVisible(False)
            self._updateState()

    def askInstallRuntime(self, requirements) -> bool:
        return slicer.util.confirmOkCancelDisplay(
            "Vertebral Labeling runs its model on ONNX Runtime, which is not installed in Slicer's Python yet.\n\n"
            f"Install {', '.join(requirements)} now? (one download of about 80 MB)", windowTitle="Vertebral Labeling")

    def installing(self, message):
        """Shown while pip runs: a status line and a wait cursor (the download takes a while)."""
        self.ui.statusLabel.text = message
        slicer.app.processEvents()
        return slicer.util.WaitCursor()

    def onProgress(self, fraction, message) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    def yellowSliceR(self) -> float:
        """R (mm) of the Yellow slice; the core labels the sagittal plane at this R."""
        from VertebralLabelingLib.errors import InputError

        sliceNode = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeYellow")
        if sliceNode is None:
            raise InputError("There is no Yellow slice view in this layout.")
        sliceToRAS = sliceNode.GetSliceToRAS()
        # Sagittal = the slice normal (third column) along R.  Read from the matrix, not from
        # the deprecated orientation-name getter: a slightly tilted sagittal reformat counts too.
        if abs(sliceToRAS.GetElement(0, 2)) < 0.95:
            raise InputError("The Yellow view is not sagittal; set it to Sagittal or choose "
                             "'Automatic'.")
        return float(sliceToRAS.GetElement(0, 3))

    def showResult(self, volumeNode, markupsNode) -> None:
        """Show the volume and centre every slice view on the middle disc."""
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        count = markupsNode.GetNumberOfControlPoints()
        if count:
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(
                markupsNode.GetID(), count // 2, True)

    # -- results table -------------------------------------------------------------------------
    def updateResultsTable(self, node=None) -> None:
        """One row per disc of the output point list: name, confidence, review reason."""
        from VertebralLabelingSlicerLib.mrml_adapter import discs_from_node

        if node is None and self._parameterNode:
            node = self._parameterNode.outputMarkups
        discs = discs_from_node(node) if node else []
        self._tableDiscNames = [disc.name for disc in discs]
        table = self.ui.resultsTable
        table.setRowCount(len(discs))
        for row, disc in enumerate(discs):
            # NaN confidence: a point a person placed (e.g. a saved study correction)
            confidence = f"{disc.confidence:.2f}" if disc.confidence == disc.confidence else "by hand"
            cells = (disc.name, confidence, disc.reason if disc.flagged else "")
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                if disc.flagged:
                    item.setForeground(qt.QBrush(qt.QColor(230, 120, 0)))
                table.setItem(row, column, item)
        table.resizeColumnsToContents()
        self._updateState()

    def onResultClicked(self, row, column) -> None:
        """Jump the slice views to the clicked disc."""
        node = self.ui.outputSelector.currentNode()
        if not node or row >= len(self._tableDiscNames):
            return
        index = node.GetControlPointIndexByLabel(self._tableDiscNames[row])
        if index >= 0:
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(node.GetID(), index, True)

    # -- exports -------------------------------------------------------------------------------
    def onExportJson(self) -> None:
        self._export("Markups JSON (*.mrk.json)", ".mrk.json", "json")

    def onExportCsv(self) -> None:
        self._export("CSV (*.csv)", ".csv", "csv")

    def onExportNifti(self) -> None:
        self._export("Disc labels NIfTI (*.nii.gz)", "_labels-disc.nii.gz", "nifti")

    def _export(self, fileFilter, suffix, kind) -> None:
        """Write the points as they are now (with the user's corrections) with the core writers."""
        from VertebralLabelingLib.errors import VertebralLabelingError

        params = self._parameterNode
        node = params.outputMarkups
        baseName = params.inputVolume.GetName() if params.inputVolume else node.GetName()
        default = os.path.join(qt.QDir.homePath(), baseName + suffix)
        path = qt.QFileDialog.getSaveFileName(self.parent, "Export discs", default, fileFilter)
        if not path:
            return
        try:
            self.logic.export(node, path, kind, params.inputVolume)
            self.ui.statusLabel.text = f"Saved {path}"
        except (VertebralLabelingError, OSError) as error:
            slicer.util.errorDisplay(f"Could not save {path}: {error}",
                                     windowTitle="Vertebral Labeling")

    # -- study review (a BIDS derivative written by `vertebral-labeling batch`) ---------------
    def onStudyDirectory(self, path) -> None:
        """List the study's images and load the first one."""
        from VertebralLabelingLib.errors import VertebralLabelingError

        if not self.askToSaveStudyEdits():
            return
        try:
            keys = self.logic.openStudy(path)
        except VertebralLabelingError as error:
            self.ui.studyStatusLabel.text = str(error)
            self._fillStudyCombo([])
            return
        self._fillStudyCombo(keys)
        self.onStudySubject(0)

    def _fillStudyCombo(self, keys) -> None:
        combo = self.ui.studySubjectComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for key in keys:
            combo.addItem(key)
        combo.blockSignals(wasBlocked)
        self._updateStudyButtons()

    def onStudyPrevious(self) -> None:
        self.onStudyStep(-1)

    def onStudyNext(self) -> None:
        self.onStudyStep(1)

    def onStudyStep(self, step) -> None:
        combo = self.ui.studySubjectComboBox
        index = combo.currentIndex + step
        if 0 <= index < combo.count:
            combo.currentIndex = index  # -> onStudySubject

    def onStudySubject(self, index) -> None:
        """Load the image and its points (the saved correction if any) of study entry ``index``."""
        from VertebralLabelingLib.errors import VertebralLabelingError

        if index < 0 or index == self.logic.studyIndex:
            return
        if not self.askToSaveStudyEdits():
            combo = self.ui.studySubjectComboBox
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = self.logic.studyIndex
            combo.blockSignals(wasBlocked)
            return
        try:
            volumeNode, markupsNode, source = self.logic.loadStudyItem(index)
        except VertebralLabelingError as error:
            self.ui.studyStatusLabel.text = f"Cannot load: {error}"
            return
        self._parameterNode.inputVolume = volumeNode
        self._parameterNode.outputMarkups = markupsNode
        self.updateResultsTable(markupsNode)
        self.showResult(volumeNode, markupsNode)
        self.ui.studyStatusLabel.text = self.logic.studyItemText()
        if self.ui.studySubjectComboBox.currentIndex != index:
            self.ui.studySubjectComboBox.currentIndex = index
        self._updateStudyButtons()

    def onStudySave(self) -> None:
        from VertebralLabelingLib.errors import VertebralLabelingError

        try:
            path = self.logic.saveStudyCorrection()
        except (VertebralLabelingError, OSError) as error:
            slicer.util.errorDisplay(f"Could not save the correction: {error}",
                                     windowTitle="Vertebral Labeling")
            return
        self.ui.studyStatusLabel.text = f"Saved {path}"

    def askToSaveStudyEdits(self) -> bool:
        """Before leaving a subject with unsaved corrections: save, discard, or stay (False)."""
        if not self.logic.studyHasUnsavedEdits():
            return True
        answer = qt.QMessageBox.question(
            slicer.util.mainWindow(), "Vertebral Labeling",
            "You moved points of this subject. Save them as its correction before moving on?",
            qt.QMessageBox.Save | qt.QMessageBox.Discard | qt.QMessageBox.Cancel)
        if answer == qt.QMessageBox.Cancel:
            return False
        if answer == qt.QMessageBox.Save:
            self.onStudySave()
        return True

    def _updateStudyButtons(self) -> None:
        count, index = self.ui.studySubjectComboBox.count, self.logic.studyIndex
        self.ui.studyPreviousButton.enabled = index > 0
        self.ui.studyNextButton.enabled = 0 <= index < count - 1
        self.ui.studySaveButton.enabled = index >= 0


#
# VertebralLabelingLogic
#
class VertebralLabelingLogic(ScriptedLoadableModuleLogic):
    """Labeling without the GUI: volume node in, point list out (usable from scripts).

    ``labelerFactory(modelName)`` returns an object with ``label(volume, slice_r_mm, progress)``;
    the default loads a bundled model with ``DiscLabeler.load``.  Tests inject a fake one.
    """

    def __init__(self, labelerFactory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.labelerFactory = labelerFactory
        self.modelName = "compact"
        self._labelers = {}
        self.lastResult = None
        self.studyDir = None
        self.studyEntries = []
        self.studyIndex = -1
        self._studyNodes = []

    def getParameterNode(self):
        return VertebralLabelingParameterNode(super().getParameterNode())

    def ensureRuntime(self, confirm, busy=None) -> bool:
        """Install ONNX Runtime on first use (never at import), if ``confirm(requirements)`` agrees.

        The list is the extension's Resources/requirements.txt (onnxruntime only: the bundled
        models are .onnx files, TensorFlow is never installed into Slicer); Slicer's numpy stays
        pinned (see ``VertebralLabelingSlicerLib.dependencies``).  An injected labeler needs nothing.
        """
        if self.labelerFactory is not None:
            return True
        from VertebralLabelingSlicerLib.dependencies import ensure_runtime

        return ensure_runtime(confirm, slicer.app.temporaryPath, slicer.util.pip_install, tag="VertebralLabeling",
                              busy=busy)

    def labeler(self):
        """The labeler for ``self.modelName``, loaded once (loading a model takes seconds)."""
        if self.modelName not in self._labelers:
            factory = self.labelerFactory
            if factory is None:
                from VertebralLabelingLib.labeling import DiscLabeler

                factory = DiscLabeler.load
            self._labelers[self.modelName] = factory(self.modelName)
        return self._labelers[self.modelName]

    def process(self, volumeNode, markupsNode=None, sliceR=None, progress=None,
                overwriteEdits=False):
        """Label ``volumeNode``; write the discs into ``markupsNode`` (or a new point list).

        Raises UserEditsWouldBeLost *before* running the network when ``markupsNode`` holds
        user corrections and ``overwriteEdits`` is False, so asking the user costs nothing.
        """
        from VertebralLabelingSlicerLib import mrml_adapter

        if markupsNode is not None and not overwriteEdits and \
                mrml_adapter.node_has_user_edits(markupsNode):
            raise mrml_adapter.UserEditsWouldBeLost(
                f'The points in "{markupsNode.GetName()}" were moved, added, removed or renamed '
                "since they were labeled; labeling again would replace them.")
        volume = mrml_adapter.volume_from_node(volumeNode)
        result = self.labeler().label(volume, slice_r_mm=sliceR, progress=progress)
        self.lastResult = result
        for warning in result.warnings:
            logging.warning(warning)
        return mrml_adapter.update_markups_node(volumeNode.GetScene(), result.discs, volumeNode,
                                                markupsNode, overwrite_edits=overwriteEdits)

    def summary(self) -> str:
        """One status line about the last run."""
        result = self.lastResult
        if result is None:
            return ""
        flagged = [disc.name for disc in result.discs if disc.flagged]
        text = f"{len(result.discs)} discs labeled in {result.seconds:.1f} s"
        text += f"; review: {', '.join(flagged)}" if flagged else "; none flagged"
        return " ".join([text] + list(result.warnings))

    # -- study review ----------------------------------------------------------------------
    def openStudy(self, derivDir) -> list:
        """Read a batch derivative folder; returns the keys of its images (nothing loaded yet)."""
        from VertebralLabelingLib.study import study_entries

        entries = study_entries(derivDir)
        self.closeStudyItem()
        self.studyDir, self.studyEntries, self.studyIndex = derivDir, entries, -1
        return [item.key for item, _ in entries]

    def loadStudyItem(self, index, scene=None):
        """Replace the current study subject's nodes by entry ``index``'s volume and points."""
        from VertebralLabelingSlicerLib import mrml_adapter

        item = self.studyEntries[index][0]
        scene = scene or slicer.mrmlScene
        self.closeStudyItem(scene)
        volumeNode, markupsNode, source = mrml_adapter.load_study_item(scene, item, self.studyDir)
        self._studyNodes = [volumeNode, markupsNode]
        self.studyIndex = index
        return volumeNode, markupsNode, source

    def closeStudyItem(self, scene=None) -> None:
        scene = scene or slicer.mrmlScene
        for node in self._studyNodes:
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
        self._studyNodes = []

    def studyHasUnsavedEdits(self) -> bool:
        from VertebralLabelingSlicerLib import mrml_adapter

        if len(self._studyNodes) < 2 or self._studyNodes[1].GetScene() is None:
            return False
        return mrml_adapter.node_has_user_edits(self._studyNodes[1])

    def saveStudyCorrection(self):
        """Save the current subject's points as its human correction; returns the file path."""
        from VertebralLabelingLib.errors import InputError
        from VertebralLabelingSlicerLib import mrml_adapter

        if self.studyIndex < 0 or len(self._studyNodes) < 2:
            raise InputError("Open a study folder and a subject first.")
        item = self.studyEntries[self.studyIndex][0]
        return mrml_adapter.save_study_correction(self._studyNodes[1], item, self.studyDir)

    def studyItemText(self) -> str:
        if self.studyIndex < 0:
            return ""
        item, record = self.studyEntries[self.studyIndex]
        source = self._studyNodes[1].GetAttribute("VertebralLabeling.studySource") if self._studyNodes else ""
        flagged = [d["name"] for d in record.get("discs") or [] if d.get("flagged")]
        text = f"{item.key} ({self.studyIndex + 1}/{len(self.studyEntries)}): {source} points"
        return text + (f"; flagged: {', '.join(flagged)}" if flagged else "")

    @staticmethod
    def export(markupsNode, path, kind, volumeNode=None) -> None:
        """Write the node's current points with the core writers (json, csv or nifti)."""
        from VertebralLabelingLib import export
        from VertebralLabelingSlicerLib import mrml_adapter

        discs = mrml_adapter.discs_from_node(markupsNode)
        if kind == "json":
            export.write_markups_json(discs, path)
        elif kind == "csv":
            export.write_csv(discs, path)
        elif kind == "nifti":
            export.write_disc_label_nifti(discs, mrml_adapter.volume_from_node(volumeNode), path)
        else:
            raise ValueError(f"unknown export kind {kind}")


#
# VertebralLabelingTest
#
class VertebralLabelingTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest): the whole flow on a synthetic spine."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """The fake-model test always runs; the real-model tests need ONNX Runtime, which the
        module installs on first Apply: without it they are skipped with a message, not failed
        (a fresh Slicer with nothing installed passes)."""
        from VertebralLabelingSlicerLib.dependencies import missing_requirements

        self.setUp()
        self.test_EditsAreProtected()
        missing = missing_requirements()
        if missing:
            message = (f"Skipped the tests that run the bundled model: {', '.join(missing)} not "
                       "installed (press Apply once to install it).")
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_VertebralLabeling1()
        self.setUp()
        self.test_StudyReview()

    def _phantomNode(self):
        from VertebralLabelingLib.phantom import make_phantom
        from VertebralLabelingSlicerLib import mrml_adapter

        volume, truth = make_phantom(seed=0)
        return mrml_adapter.add_volume_node(slicer.mrmlScene, volume, "phantom"), truth

    def test_VertebralLabeling1(self):
        """The bundled model labels the phantom: 6 points, right labels, within 15 mm."""
        from VertebralLabelingLib import DISC_NAMES, DISC_VALUES

        self.delayDisplay("Labeling a phantom with the bundled model")
        volumeNode, truth = self._phantomNode()
        logic = VertebralLabelingLogic()
        node = logic.process(volumeNode)
        self.assertEqual(node.GetNumberOfControlPoints(), 6)
        for index, (value, name) in enumerate(zip(DISC_VALUES, DISC_NAMES)):
            self.assertEqual(node.GetNthControlPointLabel(index), name)
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(index, position)
            error = sum((p - t) ** 2 for p, t in zip(position, truth[value])) ** 0.5
            self.assertLess(error, 15.0, f"{name} is {error:.1f} mm from the truth")
            self.assertEqual(node.GetNthControlPointAssociatedNodeID(index), volumeNode.GetID())
        self.delayDisplay("Test passed")

    def test_EditsAreProtected(self):
        """With a fake labeler (no model needed): edits are detected and never lost silently."""
        import numpy as np
        from VertebralLabelingLib import DISC_NAMES, DISC_VALUES
        from VertebralLabelingLib.labeling import DiscPoint
        from VertebralLabelingSlicerLib.mrml_adapter import UserEditsWouldBeLost

        volumeNode, truth = self._phantomNode()

        class FakeResult:
            warnings, seconds = [], 0.0

            def __init__(self):
                self.discs = [DiscPoint(v, n, np.array(truth[v]), 0.9)
                              for v, n in zip(DISC_VALUES, DISC_NAMES)]

        class FakeLabeler:
            def label(self, volume, slice_r_mm=None, progress=None):
                return FakeResult()

        logic = VertebralLabelingLogic(labelerFactory=lambda name: FakeLabeler())
        node = logic.process(volumeNode)
        node.SetNthControlPointPositionWorld(0, 0.0, 0.0, 0.0)
        with self.assertRaises(UserEditsWouldBeLost):
            logic.process(volumeNode, node)
        self.assertEqual(logic.process(volumeNode, node, overwriteEdits=True).GetID(), node.GetID())
        self.delayDisplay("Edit protection passed")

    def test_StudyReview(self):
        """Study panel logic: batch two phantoms, open the derivative, correct one, save it."""
        import tempfile
        from pathlib import Path

        from VertebralLabelingLib.phantom import make_phantom
        from VertebralLabelingLib.study import run_batch
        from VertebralLabelingLib.volume import write_image_atomic

        self.delayDisplay("Study review on a two-phantom study")
        root = Path(tempfile.mkdtemp(prefix="VertebralLabelingStudy"))
        for seed in (0, 1):
            volume, _ = make_phantom(seed=seed)
            write_image_atomic(volume.to_sitk(),
                               root / "bids" / f"sub-p{seed}" / "anat" / f"sub-p{seed}_T2w.nii.gz")
        run_batch(root / "bids", root / "deriv")
        logic = VertebralLabelingLogic()
        self.assertEqual(logic.openStudy(str(root / "deriv")), ["sub-p0_T2w", "sub-p1_T2w"])
        volumeNode, markupsNode, source = logic.loadStudyItem(1)
        self.assertEqual(source, "predicted")
        self.assertEqual(markupsNode.GetNumberOfControlPoints(), 6)
        self.assertFalse(logic.studyHasUnsavedEdits())
        markupsNode.SetNthControlPointPositionWorld(0, 1.0, 2.0, 3.0)
        self.assertTrue(logic.studyHasUnsavedEdits())
        path = logic.saveStudyCorrection()
        self.assertTrue(str(path).endswith("sub-p1_T2w_desc-corrected_discs.mrk.json"))
        self.assertFalse(logic.studyHasUnsavedEdits())
        logic.loadStudyItem(0)
        self.assertIsNone(volumeNode.GetScene())  # the previous subject's nodes are removed
        _, markupsNode, source = logic.loadStudyItem(1)
        self.assertEqual(source, "corrected")
        position = [0.0, 0.0, 0.0]
        markupsNode.GetNthControlPointPositionWorld(0, position)
        self.assertLess(sum((p - q) ** 2 for p, q in zip(position, (1.0, 2.0, 3.0))), 1e-6)
        self.delayDisplay("Study review passed")
