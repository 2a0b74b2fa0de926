"""What the two Slicer modules (VertebralLabeling, CobbAngle) do alike, written once.

Both panels follow Slicer's scripted-module template (Widget, Logic, Test over a parameter node)
and do the same things around their model: wire the parameter node to the .ui, install ONNX
Runtime on the first Apply, show progress, refuse to overwrite hand-edited points without
asking, export through a file dialog, keep loaded models, and run their self-tests with or
without the runtime.  Those live here; each module file subclasses these classes and keeps only
what is special about it (its parameters, its widgets, what ``process`` writes into the scene).

The module files import this at their top, so its top-level imports are Slicer's own packages
only: the core (numpy, SimpleITK, ONNX Runtime) is imported inside methods, so Slicer lists the
modules and shows their help before ONNX Runtime is installed.  Both .ui files must have the
widgets used here (applyButton, outputSelector, progressBar, statusLabel; a static test checks).
"""

import logging
import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def setupTable(table, columns) -> None:
    """A read-only results table with these column headers, last column stretched."""
    table.setColumnCount(len(columns))
    table.setHorizontalHeaderLabels(list(columns))
    table.horizontalHeader().setStretchLastSection(True)
    table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)


class SpineModule(ScriptedLoadableModule):
    """Registration both modules share: the Spine category, the Markups dependency, credits.
    Subclasses set the title, help and acknowledgement text."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.categories = ["Spine"]
        self.parent.dependencies = ["Markups"]
        self.parent.contributors = ["VertebralLabeling contributors"]


class SpineModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel skeleton: parameter node wiring, Apply, progress, export.

    Subclasses set ``windowTitle`` and the Apply tool tip, and override ``createLogic``,
    ``setupPanel`` (their own widgets), ``updatePanel`` (their own enabled states) and
    ``showResult`` (what to do with the new point list).
    """

    #: Title of every message box.
    windowTitle = ""
    applyToolTip = ""
    missingInputToolTip = "Select an input volume"
    #: What the points are called in the "replace your edited ..." question.
    pointsName = "points"
    #: Export buttons of the .ui: widget name -> (file filter, default suffix, ``logic.export`` kind).
    #: They are enabled while the output point list has points.
    exports = {}

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.createLogic()
        self.ui.progressBar.setVisible(False)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.outputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        for name, export in self.exports.items():
            getattr(self.ui, name).connect("clicked()", self._exporter(*export))
        self.setupPanel()
        self.initializeParameterNode()

    def createLogic(self):
        """The module's Logic (a ``SpineModuleLogic``)."""
        raise NotImplementedError

    def setupPanel(self) -> None:
        """The module's own widgets and connections."""

    def updatePanel(self, hasInput: bool, hasPoints: bool) -> None:
        """The module's own widget states; called whenever the parameter node changes."""

    def onOutputChanged(self, node) -> None:
        """The output point list was changed in the selector."""

    def showResult(self, volumeNode, markupsNode) -> None:
        """Show the new points (called after Apply)."""

    # -- parameter node ----------------------------------------------------------------------
    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.logic.releaseScene()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.releaseScene()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Take the module's parameter node; preselect the first volume if none is chosen."""
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
        """Button states follow the parameter node: Apply needs an input, exports need points."""
        if not self._parameterNode:
            return
        hasInput = bool(self._parameterNode.inputVolume)
        self.ui.applyButton.enabled = hasInput
        self.ui.applyButton.toolTip = self.applyToolTip if hasInput else self.missingInputToolTip
        markups = self._parameterNode.outputMarkups
        hasPoints = bool(markups and markups.GetNumberOfControlPoints())
        for name in self.exports:
            getattr(self.ui, name).enabled = hasPoints
        self.updatePanel(hasInput, hasPoints)

    # -- Apply -------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        """Run the model; asks before replacing edited points, shows errors without traceback."""
        from VertebralLabelingLib.errors import VertebralLabelingError

        if not self._runtimeReady():
            return
        params = self._parameterNode
        self._showProgress(True)
        try:
            self.logic.modelName = params.modelName or self.logic.defaultModelName
            node = self._processKeepingEdits(params, self.processArguments(params))
            params.outputMarkups = node
            self.showResult(params.inputVolume, node)
            self.ui.statusLabel.text = self.logic.summary()
        except VertebralLabelingError as error:
            self.ui.statusLabel.text = "Failed: " + str(error)
            slicer.util.errorDisplay(str(error), windowTitle=self.windowTitle)
        except Exception as error:  # a bug: keep the details in the log
            logging.exception("%s failed", self.windowTitle)
            slicer.util.errorDisplay(f"Labeling failed unexpectedly: {error}", windowTitle=self.windowTitle)
        finally:
            self._showProgress(False)

    def processArguments(self, params) -> dict:
        """Extra keyword arguments of the module's ``logic.process`` (read before it runs)."""
        return {}

    def _processKeepingEdits(self, params, arguments):
        """Never replace hand-edited points silently: ask, and write a new point list on No."""
        from VertebralLabelingSlicerLib.nodes import UserEditsWouldBeLost

        def process(markupsNode, overwriteEdits=False):
            return self.logic.process(params.inputVolume, markupsNode, progress=self.onProgress,
                                      overwriteEdits=overwriteEdits, **arguments)

        try:
            return process(params.outputMarkups)
        except UserEditsWouldBeLost as edited:
            if slicer.util.confirmYesNoDisplay(
                    f"{edited}\n\nReplace your edited {self.pointsName}?\n"
                    "(No: the new result goes into a new point list.)", windowTitle=self.windowTitle):
                return process(params.outputMarkups, overwriteEdits=True)
            return process(None)

    def _runtimeReady(self) -> bool:
        """ONNX Runtime is importable, installed now if the user agrees; False: do not run."""
        try:
            if self.logic.ensureRuntime(self.askInstallRuntime, busy=self.installing):
                return True
            self.ui.statusLabel.text = "ONNX Runtime is not installed: nothing was labeled."
        except Exception as error:  # pip failed (offline, no wheel for this Python, ...)
            logging.exception("Installing ONNX Runtime failed")
            slicer.util.errorDisplay(f"Installing ONNX Runtime failed: {error}\n"
                                     "See the Python console for pip's output.", windowTitle=self.windowTitle)
        return False

    def askInstallRuntime(self, requirements) -> bool:
        return slicer.util.confirmOkCancelDisplay(
            f"{self.windowTitle} runs its model on ONNX Runtime, which is not installed in Slicer's Python yet."
            f"\n\nInstall {', '.join(requirements)} now? (one download of about 80 MB)",
            windowTitle=self.windowTitle)

    def installing(self, message):
        """Shown while pip runs: a status line and a wait cursor (the download takes a while)."""
        self.ui.statusLabel.text = message
        slicer.app.processEvents()
        return slicer.util.WaitCursor()

    def _showProgress(self, running: bool) -> None:
        """While the model runs: progress bar shown, Apply disabled (no second run meanwhile)."""
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        if running:
            self.ui.applyButton.enabled = False
        else:
            self._updateState()

    def onProgress(self, fraction, message) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    # -- exports -----------------------------------------------------------------------------
    def _exporter(self, fileFilter, suffix, kind):
        """The slot of one export button."""
        return lambda: self._export(fileFilter, suffix, kind)

    def _export(self, fileFilter, suffix, kind) -> None:
        """Ask for a file (default: the input's name + suffix) and write the points as they are
        now, with the user's corrections, through ``logic.export``."""
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
            slicer.util.errorDisplay(f"Could not save {path}: {error}", windowTitle=self.windowTitle)


class SpineModuleLogic(ScriptedLoadableModuleLogic):
    """Model in, point list out, without the GUI (usable from scripts and tests).

    ``labelerFactory(modelName)`` returns an object with the core labeler's ``label`` method;
    the default, ``loadLabeler``, loads a bundled model.  Tests inject a fake one.  Subclasses set
    ``parameterNodeClass`` and ``defaultModelName`` and write ``process``, ``summary``, ``export``.
    """

    parameterNodeClass = None
    defaultModelName = ""

    def __init__(self, labelerFactory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.labelerFactory = labelerFactory
        self.modelName = self.defaultModelName
        self._labelers = {}
        self.lastResult = None

    def getParameterNode(self):
        return self.parameterNodeClass(super().getParameterNode())

    def releaseScene(self) -> None:
        """Stop observing nodes of the scene (it is closing, or the panel is cleaned up)."""

    def ensureRuntime(self, confirm, busy=None) -> bool:
        """Install ONNX Runtime on first use (never at import), if ``confirm(requirements)`` agrees.

        The list is the extension's Resources/requirements.txt (onnxruntime only: the bundled
        models are .onnx files, TensorFlow is never installed into Slicer); Slicer's numpy stays
        pinned (see ``VertebralLabelingSlicerLib.dependencies``).  An injected labeler needs nothing.
        """
        if self.labelerFactory is not None:
            return True
        from VertebralLabelingSlicerLib.dependencies import ensure_runtime

        return ensure_runtime(confirm, slicer.app.temporaryPath, slicer.util.pip_install,
                              tag=type(self).__name__, busy=busy)

    def loadLabeler(self, modelName):
        """The core labeler of a bundled model name or model path."""
        raise NotImplementedError

    def labeler(self):
        """The labeler for ``self.modelName``, loaded once (loading a model takes seconds)."""
        if self.modelName not in self._labelers:
            factory = self.labelerFactory or self.loadLabeler
            self._labelers[self.modelName] = factory(self.modelName)
        return self._labelers[self.modelName]

    def label(self, image, **options):
        """Run the labeler; keep the result for ``summary`` and log its warnings."""
        result = self.labeler().label(image, **options)
        self.lastResult = result
        for warning in result.warnings:
            logging.warning(warning)
        return result

    @staticmethod
    def refuseToOverwriteEdits(markupsNode, overwriteEdits, hasUserEdits, message) -> None:
        """Raise ``UserEditsWouldBeLost`` (``message``, ``{name}`` standing for the node's name)
        when ``markupsNode`` holds hand edits (the adapter's ``hasUserEdits`` says) and
        ``overwriteEdits`` is False.  Called before the network runs: asking costs nothing."""
        from VertebralLabelingSlicerLib.nodes import UserEditsWouldBeLost

        if markupsNode is not None and not overwriteEdits and hasUserEdits(markupsNode):
            raise UserEditsWouldBeLost(message.format(name=markupsNode.GetName()))


class SpineModuleTest(ScriptedLoadableModuleTest):
    """Self-test runner (Reload and Test, ctest, pytest): the fake-model tests always run; the
    bundled-model tests need ONNX Runtime, which the module installs on first Apply, so without
    it they are skipped with a message, not failed (a fresh Slicer with nothing installed passes).
    """

    #: Test method names that use an injected fake labeler.
    fakeModelTests = ()
    #: Test method names that run a bundled model.
    bundledModelTests = ()

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from VertebralLabelingSlicerLib.dependencies import missing_requirements

        self._runEach(self.fakeModelTests)
        missing = missing_requirements()
        if missing:
            message = (f"Skipped the tests that run the bundled model: {', '.join(missing)} not "
                       "installed (press Apply once to install it).")
            logging.warning(message)
            self.delayDisplay(message)
            return
        self._runEach(self.bundledModelTests)

    def _runEach(self, names) -> None:
        for name in names:
            self.setUp()
            getattr(self, name)()
