"""VertebralLabeling: label the cervical intervertebral discs (C2-C3 ... C7-T1) of an MRI.

The Slicer module is a thin GUI.  The labeling itself is ``VertebralLabelingLib`` (no Slicer
code, shared with the command line) and every MRML conversion is in
``VertebralLabelingSlicerLib.mrml_adapter``.  Both are imported lazily, inside methods, so that
Slicer can list the module (and show its help) even before ONNX Runtime is installed.  What this
module does like CobbAngle (parameter node, Apply, edit guard, export, self-test runner) is
``VertebralLabelingSlicerLib.module_base``; this file is what is special to disc labeling.
"""

import os
import sys

import qt
import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper

# Slicer puts scripted module folders on sys.path; make sure ours is there too when the file is
# loaded some other way (module reload, tests), so the bundled packages import.
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

# What both modules do alike (parameter node, Apply, edit guard, export, self-test runner).
# Imported after the sys.path set-up above; it imports only Slicer packages at its top.
from VertebralLabelingSlicerLib.module_base import (  # noqa: E402
    SpineModule,
    SpineModuleLogic,
    SpineModuleTest,
    SpineModuleWidget,
    setupTable,
)

SLICE_MODE_AUTOMATIC, SLICE_MODE_YELLOW = 0, 1
RESULT_COLUMNS = ("Disc", "Confidence", "Review")


#
# VertebralLabeling
#
class VertebralLabeling(SpineModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        SpineModule.__init__(self, parent)
        self.parent.title = "Vertebral Labeling"
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
techniques", NeuroInformatics 2018, Montreal (doi:10.13140/RG.2.2.33723.92962); the default
<i>compact</i> model is a heatmap network that shares one backbone between the six discs.  Disc
values follow the Spinal Cord Toolbox / spine-generic convention (3 = C2-C3 ... 8 = C7-T1).
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
class VertebralLabelingWidget(SpineModuleWidget):
    """The panel: pick a volume, Apply, review the table, export; the study review panel."""

    windowTitle = "Vertebral Labeling"
    applyToolTip = "Label the discs"
    exports = {"exportJsonButton": ("Markups JSON (*.mrk.json)", ".mrk.json", "json"),
               "exportCsvButton": ("CSV (*.csv)", ".csv", "csv"),
               "exportNiftiButton": ("Disc labels NIfTI (*.nii.gz)", "_labels-disc.nii.gz", "nifti")}

    def __init__(self, parent=None) -> None:
        SpineModuleWidget.__init__(self, parent)
        self._tableDiscNames = []  # disc name of each results-table row

    def createLogic(self):
        return VertebralLabelingLogic()

    def setupPanel(self) -> None:
        setupTable(self.ui.resultsTable, RESULT_COLUMNS)
        self.ui.resultsTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.sliceModeComboBox.connect("currentIndexChanged(int)", self.onSliceModeChanged)
        self.ui.resultsTable.connect("cellClicked(int,int)", self.onResultClicked)
        self.ui.studyDirectoryButton.connect("directoryChanged(QString)", self.onStudyDirectory)
        self.ui.studySubjectComboBox.connect("currentIndexChanged(int)", self.onStudySubject)
        self.ui.studyPreviousButton.connect("clicked(bool)", self.onStudyPrevious)
        self.ui.studyNextButton.connect("clicked(bool)", self.onStudyNext)
        self.ui.studySaveButton.connect("clicked(bool)", self.onStudySave)

    def updatePanel(self, hasInput, hasPoints) -> None:
        """Slice-mode combo follows the parameter node; the NIfTI export needs the volume too."""
        mode = SLICE_MODE_YELLOW if self._parameterNode.useCurrentSlice else SLICE_MODE_AUTOMATIC
        if self.ui.sliceModeComboBox.currentIndex != mode:
            self.ui.sliceModeComboBox.currentIndex = mode
        self.ui.exportNiftiButton.enabled = hasPoints and hasInput

    def onSliceModeChanged(self, index) -> None:
        if self._parameterNode:
            self._parameterNode.useCurrentSlice = index == SLICE_MODE_YELLOW

    def onOutputChanged(self, node) -> None:
        # The selector's node, not the parameter node's: this slot may run before the
        # parameter node wrapper has stored the new selection.
        self.updateResultsTable(node)

    # -- labeling ------------------------------------------------------------------------------
    def processArguments(self, params) -> dict:
        """The midsagittal plane: the Yellow slice's R, or None to search for it."""
        return {"sliceR": self.yellowSliceR() if params.useCurrentSlice else None}

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
        """Fill the table, show the volume and centre every slice view on the middle disc."""
        self.updateResultsTable(markupsNode)
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
                                     windowTitle=self.windowTitle)
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
class VertebralLabelingLogic(SpineModuleLogic):
    """Labeling without the GUI: volume node in, point list out (usable from scripts).

    ``labelerFactory(modelName)`` returns an object with ``label(volume, slice_r_mm, progress)``;
    the default loads a bundled model with ``DiscLabeler.load``.  Tests inject a fake one.
    """

    parameterNodeClass = VertebralLabelingParameterNode
    defaultModelName = "compact"

    def __init__(self, labelerFactory=None) -> None:
        SpineModuleLogic.__init__(self, labelerFactory)
        self.studyDir = None
        self.studyEntries = []
        self.studyIndex = -1
        self._studyNodes = []

    def loadLabeler(self, modelName):
        from VertebralLabelingLib.mri.labeling import DiscLabeler

        return DiscLabeler.load(modelName)

    def process(self, volumeNode, markupsNode=None, sliceR=None, progress=None,
                overwriteEdits=False):
        """Label ``volumeNode``; write the discs into ``markupsNode`` (or a new point list).

        Raises UserEditsWouldBeLost *before* running the network when ``markupsNode`` holds
        user corrections and ``overwriteEdits`` is False, so asking the user costs nothing.
        """
        from VertebralLabelingSlicerLib import mrml_adapter

        self.refuseToOverwriteEdits(
            markupsNode, overwriteEdits, mrml_adapter.node_has_user_edits,
            'The points in "{name}" were moved, added, removed or renamed since they were labeled; '
            "labeling again would replace them.")
        volume = mrml_adapter.volume_from_node(volumeNode)
        result = self.label(volume, slice_r_mm=sliceR, progress=progress)
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
        from VertebralLabelingLib.study.table import study_entries

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
        from VertebralLabelingLib.mri import export
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
class VertebralLabelingTest(SpineModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest) and in pytest: the whole flow on a
    synthetic spine.  ``runTest`` (the base's) skips the bundled-model tests without ONNX Runtime."""

    fakeModelTests = ("test_EditsAreProtected",)
    bundledModelTests = ("test_VertebralLabeling1", "test_StudyReview")

    def _phantomNode(self):
        from VertebralLabelingLib.mri.phantom import make_phantom
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
        from VertebralLabelingLib.mri.labeling import DiscPoint
        from VertebralLabelingSlicerLib.nodes import UserEditsWouldBeLost

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

        from VertebralLabelingLib.io.images import write_image_atomic
        from VertebralLabelingLib.mri.phantom import make_phantom
        from VertebralLabelingLib.study.batch import run_batch

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
