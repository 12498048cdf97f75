"""TSKD: task-specific knowledge distillation for segmentation in 3D Slicer.

Label a few slices, train a small student network from a LoRA-fine-tuned foundation model
(teacher) and a diffusion-synthesised transfer set, then segment new scans with the student.

This file holds the Slicer classes only (module, parameter node, widget, logic, test). The work is
done by plain classes in ``TSKDSlicerLib`` (tested without Slicer) and by the ``TSKDLib`` backend:
training and quick updates run as a separate process (``python -m TSKDLib train ... --progress-json``),
interactive segmentation runs in Slicer's own process (``TSKDSlicerLib.inprocess``, onnxruntime),
also as the Segment Editor effect "TSKD" (``SegmentEditorTSKD/SegmentEditorEffect.py``).

Python console API (see the README, "3D Slicer module")::

    logic = slicer.util.getModuleLogic("TSKDSlicer")
    job = logic.train(volumeNode, segmentationNode, ["Segment_1"], preset="fast")
    job.wait()                      # or job.cancel(); job.resume()
    seg = logic.segment(volumeNode, job.modelDir)
    logic.segmentSlice(volumeNode, job.modelDir, index=40, segmentationNode=labels)  # in-process
    logic.segmentRange(volumeNode, job.modelDir, 30, 60, segmentationNode=labels)
    logic.suggestSlices(volumeNode, job.modelDir, count=5, segmentationNode=labels)
    logic.quickUpdate(volumeNode, labels, job.modelDir)   # new model version from your corrections
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

    def translate(context, text):
        return text

from TSKDSlicerLib import cases, compat, install, jobs, labels, models, mrml_io, sampledata, selection, training

SETTINGS_PREFIX = "TSKD/"
#: segmentation node attribute: the slices of a whole-scan prediction most likely to need a correction
CHECK_SLICES_ATTRIBUTE = "TSKD.CheckSlices"
#: segmentation attribute: the factor the volume's intensities were scaled by to match the model's
#: training scans (``tskd segment``'s ``intensity_factor``); absent when not scaled
INTENSITY_FACTOR_ATTRIBUTE = "TSKD.IntensityFactor"


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------

class TSKDSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TSKD")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TSKD contributors (TSKD project)"]
        self.parent.helpText = _(
            "Label a few slices, train a small student network distilled from a foundation model "
            "(task-specific knowledge distillation, arXiv 2503.06976), then segment new scans. "
            "Needs Slicer 5.10 or later. See the section \"3D Slicer module\" of the README of TSKD.")
        self.parent.acknowledgementText = _(
            "Method: Liang et al., task-specific knowledge distillation from vision foundation "
            "models for medical image segmentation (arXiv 2503.06976).")
        # Stop background jobs when Slicer quits (SIGTERM: the runs stay resumable). The launcher
        # also stops a job by itself if Slicer dies without quitting cleanly.
        if hasattr(slicer, "app") and slicer.app is not None:
            slicer.app.connect("aboutToQuit()", lambda: jobs.JOBS.cancel_all(timeout=10))
            # Sample Data > TSKD: the bundled abdominal CT (offline, from the module's resources)
            moduleDir = os.path.dirname(os.path.abspath(__file__))
            slicer.app.connect("startupCompleted()", lambda: sampledata.register(moduleDir))
            # Segment Editor effect "TSKD" (only when the Segment Editor exists in this Slicer)
            slicer.app.connect("startupCompleted()", lambda: registerSegmentEditorEffect(moduleDir))


def registerSegmentEditorEffect(moduleDir: str) -> bool:
    """Register the scripted Segment Editor effect "TSKD" (``SegmentEditorTSKD/SegmentEditorEffect.py``).
    Returns False (and does nothing) where the Segment Editor effects are not available."""
    try:
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
    except ImportError:
        return False
    if not hasattr(slicer, "qSlicerSegmentEditorEffectFactory"):
        return False
    try:
        if "TSKD" in [e.name for e in slicer.qSlicerSegmentEditorEffectFactory.instance().registeredEffects()]:
            return True
    except AttributeError:  # older factory API: registering twice is harmless
        pass
    path = os.path.join(moduleDir, "SegmentEditorTSKD", "SegmentEditorEffect.py")
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(path.replace("\\", "/"))
    instance.self().register()
    return True


# ---------------------------------------------------------------------------------------------
# Parameter node
# ---------------------------------------------------------------------------------------------

@parameterNodeWrapper
class TSKDSlicerParameterNode:
    """GUI state saved with the scene.

    inputVolume, labelSegmentation - the volume and its partial segmentation.
    backgroundSlices - all-background slices that count as labelled ("3,8-9", axial file index).
    preset, device - training preset and device.
    foundationModel, checkpointPath, loraRank, numSynthetic, studentType - advanced overrides
        (default/empty/0 = the preset's value).
    retrainMode - how "Retrain" works.
    modelDir - the model package used for segmenting.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    labelSegmentation: vtkMRMLSegmentationNode
    backgroundSlices: str = ""
    preset: Annotated[str, Choice(list(jobs.PRESETS))] = "fast"
    device: Annotated[str, Choice(list(jobs.DEVICES))] = "auto"
    foundationModel: Annotated[str, Choice(list(training.FOUNDATION_MODELS))] = "default"
    checkpointPath: str = ""
    loraRank: Annotated[int, WithinRange(0, 256)] = 0
    numSynthetic: Annotated[int, WithinRange(0, 100000)] = 0
    studentType: str = ""
    retrainMode: Annotated[str, Choice(list(training.RETRAIN_MODES))] = "rerun pipeline"
    modelDir: str = ""


# ---------------------------------------------------------------------------------------------
# Training job handle (console API)
# ---------------------------------------------------------------------------------------------

class TrainingJob:
    """A running ``tskd train`` as seen from Slicer: poll timer, callbacks, wait/cancel/resume.

    Attributes: ``state`` (:class:`TSKDSlicerLib.jobs.JobState`), ``runDir``, ``modelDir`` (set
    when done and copied into the model library), ``job`` (the :class:`BackendJob`).
    Callbacks (``onUpdate(job)``, ``onLog(line)``, ``onFinished(job)``) run on the main thread.
    """

    POLL_MS = 250
    _active: set = set()  # keeps jobs (and their timers) alive when the caller drops its reference

    def __init__(self, logic, backendJob: jobs.BackendJob, runDir: str, name: str):
        self.logic = logic
        self.job = backendJob
        self.runDir = runDir
        self.name = name
        self.modelDir: str | None = None
        self.onUpdate = None
        self.onLog = None
        self.onFinished = None
        backendJob.on_event = lambda event, job: self.onUpdate and self.onUpdate(self)
        backendJob.on_log = lambda line, job: self.onLog and self.onLog(line)
        backendJob.on_finished = lambda job: self._finished()
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._poll)

    @property
    def state(self) -> jobs.JobState:
        return self.job.state

    def start(self):
        self.job.start()
        jobs.JOBS.add(self.job)
        TrainingJob._active.add(self)
        self._timer.start()
        return self

    def _poll(self):
        if not self.job.poll():
            self._timer.stop()

    def _finished(self):
        self._timer.stop()
        TrainingJob._active.discard(self)
        if self.state.status == jobs.DONE:
            package = self.state.model_dir or os.path.join(self.runDir, "model")
            try:
                self.modelDir = self.logic.modelLibrary().add(package, name=self.name).path
            except models.ModelLibraryError as exc:
                self.state.error = str(exc)
                logging.error(f"TSKD: training finished but the model could not be added: {exc}")
        if self.onFinished:
            self.onFinished(self)

    def isRunning(self) -> bool:
        return self.job.is_running()

    def wait(self, timeout: float | None = None) -> str:
        """Block (keeping Slicer's GUI alive) until the job ends; returns the final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.job.is_running():
            self._poll()
            slicer.app.processEvents()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training still running after {timeout} s")
            time.sleep(0.05)
        return self.state.status

    def cancel(self, block: bool = False):
        """Stop the process tree; the run dir stays resumable (``resume()``).

        Returns at once (SIGTERM now, SIGKILL 30 s later if needed, from the poll timer);
        ``block=True`` waits until the job ended (console use)."""
        self.job.cancel(timeout=30, block=False)
        if block:
            self.wait(timeout=60)

    def resume(self):
        """Run the same command again: the backend continues the run where it stopped."""
        self.job.restart()
        jobs.JOBS.add(self.job)
        TrainingJob._active.add(self)
        self._timer.start()
        return self


# ---------------------------------------------------------------------------------------------
# Widget
# ---------------------------------------------------------------------------------------------

class TSKDSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI over :class:`TSKDSlicerLogic` (behaviour lives in TSKDSlicerLib)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._trainingJob: TrainingJob | None = None
        self._cases: list = []  # (volumeNode, segmentationNode, segmentIds, backgroundSlices)
        self._selection = selection.SegmentSelection()
        self._busy = ""  # non-empty while an install or a segmentation runs (buttons disabled)
        self._sliceUndo: list = []  # (segmentationNode, volumeNode, backup) of "segment this slice"
        self.ui = None

    # -- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = compat.runtime_problem(f"{slicer.app.majorVersion}.{slicer.app.minorVersion}")
        if problem:  # Slicer 5.8 (Python 3.9): say so instead of failing later inside pip
            label = qt.QLabel(problem)
            label.wordWrap = True
            label.setStyleSheet("color: #b00; font-weight: bold")
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            logging.error(problem)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TSKDSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TSKDSlicerLogic()

        self.ui.modelsTableWidget.setHorizontalHeaderLabels(
            [_("Name"), _("Classes"), _("Val. Dice"), _("Created"), _("Size")])
        self.ui.modelsTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.casesTableWidget.setHorizontalHeaderLabels([_("Volume"), _("Labels"), _("Segments")])
        self.ui.casesTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.runsFolderLabel.text = self.logic.runsDir
        self.ui.pythonLineEdit.text = self.logic.externalPython or ""
        self.ui.cancelButton.enabled = False
        self.ui.resumeButton.enabled = False

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # The segment list follows the parameter node (see _onParameterNodeModified), never the
        # selectors' currentNodeChanged: Qt emits that before the parameter node is updated.
        self.ui.refreshLabelsButton.connect("clicked()", lambda: self.updateSegmentList(force=True))
        self.ui.segmentsListWidget.connect("itemChanged(QListWidgetItem*)", lambda item: self._onSegmentChecked())
        self.ui.backgroundSlicesLineEdit.connect("editingFinished()", self.updateLabelledSummary)
        self.ui.markBackgroundSliceButton.connect("clicked()", self.onMarkBackgroundSlice)
        self.ui.addCaseButton.connect("clicked()", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked()", self.onRemoveCase)
        self.ui.checkpointBrowseButton.connect("clicked()", self.onBrowseCheckpoint)
        self.ui.pythonBrowseButton.connect("clicked()", self.onBrowsePython)
        self.ui.pythonLineEdit.connect("editingFinished()", self.onPythonChanged)
        self.ui.trainButton.connect("clicked()", self.onTrain)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.resumeButton.connect("clicked()", self.onResume)
        self.ui.loadModelButton.connect("clicked()", self.onUseModel)
        self.ui.renameModelButton.connect("clicked()", self.onRenameModel)
        self.ui.deleteModelButton.connect("clicked()", self.onDeleteModel)
        self.ui.exportModelButton.connect("clicked()", self.onExportModel)
        self.ui.importModelButton.connect("clicked()", self.onImportModel)
        self.ui.refreshModelsButton.connect("clicked()", self.refreshModels)
        self.ui.segmentButton.connect("clicked()", self.onSegment)
        self.ui.segmentSliceButton.connect("clicked()", self.onSegmentSlice)
        self.ui.editSegmentsButton.connect("clicked()", self.onEditSegments)
        self.ui.retrainButton.connect("clicked()", self.onRetrain)
        # Buttons added in code (no .ui change needed): undo of "segment this slice", runs folder.
        self.undoSliceButton = qt.QPushButton(_("Undo slice"))
        self.undoSliceButton.toolTip = _("Put the last slice segmented with 'Segment this slice' back as it was.")
        self.undoSliceButton.enabled = False
        self.ui.segmentSliceButton.parentWidget().layout().addWidget(self.undoSliceButton)
        self.undoSliceButton.connect("clicked()", self.onUndoSlice)
        self.runsFolderButton = qt.QPushButton(_("Runs folder..."))
        self.runsFolderButton.toolTip = _("Where training runs (image copies, checkpoints) are kept. "
                                          "The model library does not move.")
        self.deleteRunButton = qt.QPushButton(_("Delete runs..."))
        self.deleteRunButton.toolTip = _("Delete old training runs to free disk space. Trained models stay in the library.")
        self.ui.resumeButton.parentWidget().layout().addWidget(self.runsFolderButton)
        self.ui.resumeButton.parentWidget().layout().addWidget(self.deleteRunButton)
        self.runsFolderButton.connect("clicked()", self.onChangeRunsFolder)
        self.deleteRunButton.connect("clicked()", self.onDeleteRuns)

        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        """Module widget destroyed (Slicer quits): the running job is stopped by the module."""
        self.removeObservers()

    def enter(self) -> None:
        if self.ui is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        # The training job is not part of the scene: it keeps running (its inputs are on disk)
        # and its model lands in the model library. Only node references are dropped.
        self._sliceUndo = []
        if self.ui is None:
            return
        self._cases = []
        self._updateCasesTable()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.ui is not None and self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node:
                self._parameterNode.inputVolume = node
        if not self._parameterNode.labelSegmentation:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if node:
                self._parameterNode.labelSegmentation = node

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._updateButtons()
            self.updateSegmentList(force=True)
            self._updateCurrentModelLabel()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """The parameter node changed (its selectors were updated first): rebuild the segment
        list only when the volume/segmentation pair (or its segments) changed."""
        p = self._parameterNode
        if p and self._selection.needs_update(p.inputVolume, p.labelSegmentation):
            self.updateSegmentList()
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        if self.ui is None:
            return
        p = self._parameterNode
        running = bool(self._trainingJob and self._trainingJob.isRunning())
        busy = running or bool(self._busy)
        canTrain = bool(self._cases) or bool(p and p.inputVolume and p.labelSegmentation and self._checkedSegmentIds())
        self.ui.trainButton.enabled = canTrain and not busy
        self.ui.retrainButton.enabled = canTrain and not busy
        self.ui.cancelButton.enabled = running
        self.ui.resumeButton.enabled = bool(self._trainingJob) and not running and \
            self._trainingJob.state.status in (jobs.CANCELLED, jobs.FAILED)
        hasModel = bool(p and p.modelDir and os.path.isdir(p.modelDir))
        self.ui.segmentButton.enabled = hasModel and bool(p.inputVolume or self._checkedVolumes()) and not self._busy
        self.ui.segmentSliceButton.enabled = hasModel and bool(p.inputVolume) and not self._busy
        if hasattr(self, "undoSliceButton"):
            self.undoSliceButton.enabled = bool(self._sliceUndo) and not self._busy
            self.deleteRunButton.enabled = not self._busy

    # -- data and labels ----------------------------------------------------------------------
    def _checkedSegmentIds(self) -> list[str]:
        out = []
        for row in range(self.ui.segmentsListWidget.count):
            item = self.ui.segmentsListWidget.item(row)
            if item.checkState() == qt.Qt.Checked:
                out.append(item.data(qt.Qt.UserRole))
        p = self._parameterNode
        return selection.SegmentSelection.valid_ids(p.labelSegmentation if p else None, out)

    def _backgroundSlices(self) -> list[int]:
        try:
            return labels.parse_ranges(self.ui.backgroundSlicesLineEdit.text)
        except ValueError:
            return []

    def updateSegmentList(self, *args, force: bool = False) -> None:
        """List the segments of the *current* segmentation with their labelled slices (rows from
        :class:`TSKDSlicerLib.selection.SegmentSelection`; all checked by default)."""
        p = self._parameterNode
        widget = self.ui.segmentsListWidget
        volume = p.inputVolume if p else None
        segmentation = p.labelSegmentation if p else None
        if not force and not self._selection.needs_update(volume, segmentation):
            return
        counts = {}
        if volume and segmentation:
            try:
                counts = self.logic.labelledSliceCounts(volume, segmentation)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                self.ui.labelledSummaryLabel.text = _("Cannot read the labels: {error}").format(error=exc)
        widget.blockSignals(True)
        widget.clear()
        for row in self._selection.rows(volume, segmentation, counts):
            item = qt.QListWidgetItem(row.text)
            item.setData(qt.Qt.UserRole, row.segment_id)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if row.checked else qt.Qt.Unchecked)
            widget.addItem(item)
        widget.blockSignals(False)
        self.updateLabelledSummary()

    def _onSegmentChecked(self) -> None:
        p = self._parameterNode
        if p and p.labelSegmentation:
            widget = self.ui.segmentsListWidget
            allIds = [widget.item(r).data(qt.Qt.UserRole) for r in range(widget.count)]
            self._selection.remember_checks(p.labelSegmentation, self._checkedSegmentIds(), allIds)
        self.updateLabelledSummary()

    def updateLabelledSummary(self) -> None:
        p = self._parameterNode
        if not (p and p.inputVolume and p.labelSegmentation and self._checkedSegmentIds()):
            self.ui.labelledSummaryLabel.text = _("Labelled slices: select a volume, its labels and segments.")
            self._updateButtons()
            return
        try:
            slices = self.logic.labelledSlices(p.inputVolume, p.labelSegmentation, self._checkedSegmentIds(),
                                               self._backgroundSlices())
            kind = _("Checked prediction slices") if mrml_io.is_prediction(p.labelSegmentation) \
                else _("Labelled slices")
            self.ui.labelledSummaryLabel.text = f"{kind}: {len(slices)} - {labels.compress_ranges(slices) or '-'}"
        except Exception as exc:  # noqa: BLE001
            self.ui.labelledSummaryLabel.text = str(exc)
        self._updateButtons()

    def onMarkBackgroundSlice(self) -> None:
        p = self._parameterNode
        if not (p and p.inputVolume):
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot find the current slice."), waitCursor=True):
            axis, index = self.logic.currentSliceIndex(p.inputVolume)
            current = self._backgroundSlices()
            self.ui.backgroundSlicesLineEdit.text = labels.compress_ranges(current + [index])
            p.backgroundSlices = self.ui.backgroundSlicesLineEdit.text
            self.updateLabelledSummary()

    def onAddCase(self) -> None:
        p = self._parameterNode
        ids = self._checkedSegmentIds()
        if not (p and p.inputVolume and p.labelSegmentation and ids):
            slicer.util.warningDisplay(_("Select a volume, its partial labels and the segments first."))
            return
        self._cases.append((p.inputVolume, p.labelSegmentation, ids, self._backgroundSlices()))
        self._updateCasesTable()

    def onRemoveCase(self) -> None:
        row = self.ui.casesTableWidget.currentRow()
        if 0 <= row < len(self._cases):
            del self._cases[row]
            self._updateCasesTable()

    def _updateCasesTable(self) -> None:
        table = self.ui.casesTableWidget
        table.setRowCount(len(self._cases))
        for row, (vol, seg, ids, _bg) in enumerate(self._cases):
            names = mrml_io.segment_names(seg, ids) if seg else []
            for col, text in enumerate([vol.GetName(), seg.GetName(), ", ".join(names)]):
                table.setItem(row, col, qt.QTableWidgetItem(text))
        self._updateButtons()

    # -- training -----------------------------------------------------------------------------
    def _advanced(self) -> dict:
        p = self._parameterNode
        return {"foundation_model": p.foundationModel, "checkpoint": p.checkpointPath.strip(),
                "lora_rank": p.loraRank, "num_synthetic": p.numSynthetic, "student": p.studentType.strip()}

    def _currentCases(self):
        if self._cases:
            return list(self._cases)
        p = self._parameterNode
        return [(p.inputVolume, p.labelSegmentation, self._checkedSegmentIds(), self._backgroundSlices())]

    def onTrain(self, initStudent: str = "") -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            if not self.logic.ensureDependencies(training=True):
                return
            advanced = self._advanced()
            if initStudent:
                advanced["init_student"] = initStudent
            try:
                job = self.logic.trainCases(self._currentCases(), preset=p.preset, device=p.device, advanced=advanced)
            except cases.LabelPlaneWarning as warning:
                if not slicer.util.confirmOkCancelDisplay(
                        str(warning) + "\n\n" + _("Train anyway, counting every one of these slices as labelled?"),
                        windowTitle=_("TSKD: check the labels")):
                    return
                job = self.logic.trainCases(self._currentCases(), preset=p.preset, device=p.device,
                                            advanced=advanced, acceptLabelWarnings=True)
            self._attachJob(job)

    def _attachJob(self, job: TrainingJob) -> None:
        self._trainingJob = job
        job.onUpdate = self._onJobUpdate
        job.onLog = self._appendLog
        job.onFinished = self._onJobFinished
        self.ui.logTextEdit.clear()
        self._appendLog(_("Run folder: {dir}").format(dir=job.runDir))
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Training started.")
        self._updateButtons()

    def _appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def _onJobUpdate(self, job: TrainingJob) -> None:
        st = job.state
        self.ui.progressBar.value = int(round(100 * st.overall_fraction))
        self.ui.stageLabel.text = st.stage_label + (f" ({st.step}/{st.total})" if st.total else "")
        self.ui.etaLabel.text = _("{eta} for this stage").format(eta=jobs.format_duration(st.eta_s)) \
            if st.eta_s is not None else "-"
        self.ui.diceLabel.text = f"{st.val_dice:.3f}" if st.val_dice is not None else "-"
        if job.job.events and job.job.events[-1].get("event") == "log":
            self._appendLog(job.job.events[-1].get("message", ""))

    def _onJobFinished(self, job: TrainingJob) -> None:
        st = job.state
        if self.ui is None:
            return
        self.ui.statusLabel.text = st.summary()
        self._updateButtons()
        if st.status == jobs.DONE:
            self.ui.progressBar.value = 100
            self.refreshModels()
            if job.modelDir and self._parameterNode is not None:  # None: the scene was closed meanwhile
                self._parameterNode.modelDir = job.modelDir
                self._updateCurrentModelLabel()
            if st.warnings:  # e.g. the student does not reproduce its teacher: say so, never silently
                slicer.util.warningDisplay(
                    _("Training finished with warnings:") + "\n\n" + "\n".join(f"- {w}" for w in st.warnings),
                    windowTitle=_("TSKD"))
        elif st.status == jobs.FAILED:
            self._appendLog(st.error or "")
            slicer.util.errorDisplay(_("Training failed: {error}").format(error=st.error),
                                     detailedText="\n".join(list(job.job.log)[-50:]))

    def onCancel(self) -> None:
        if self._trainingJob and self._trainingJob.isRunning():
            self.ui.statusLabel.text = _("Stopping... (the run stays resumable)")
            self._trainingJob.cancel()  # returns at once; the poll timer finishes the job
        self._updateButtons()

    def onResume(self) -> None:
        if self._trainingJob and not self._trainingJob.isRunning():
            with slicer.util.tryWithErrorDisplay(_("Failed to resume."), waitCursor=True):
                self._trainingJob.resume()
                self._appendLog(_("Resuming the run in {dir}").format(dir=self._trainingJob.runDir))
                self.ui.statusLabel.text = _("Resumed.")
        self._updateButtons()

    def onRetrain(self) -> None:
        p = self._parameterNode
        if p.retrainMode == "fine-tune student" and p.modelDir:
            self.onTrain(initStudent=p.modelDir)
        else:
            self.onTrain()

    def onBrowseCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, _("Foundation model checkpoint"), "",
                                              "Checkpoints (*.pth *.pt *.ckpt *.safetensors);;All files (*)")
        if path:
            self._parameterNode.checkpointPath = path

    def onBrowsePython(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, _("Python executable with TSKD installed"))
        if path:
            self.ui.pythonLineEdit.text = path
            self.onPythonChanged()

    def onPythonChanged(self) -> None:
        self.logic.externalPython = self.ui.pythonLineEdit.text.strip()

    # -- models -------------------------------------------------------------------------------
    def _selectedModel(self):
        row = self.ui.modelsTableWidget.currentRow()
        if row < 0 or row >= len(self._models):
            slicer.util.warningDisplay(_("Select a model in the list first."))
            return None
        return self._models[row]

    def refreshModels(self) -> None:
        self._models = self.logic.modelLibrary().list()
        table = self.ui.modelsTableWidget
        table.setRowCount(len(self._models))
        for row, info in enumerate(self._models):
            for col, text in enumerate(info.row()):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(info.path)
                table.setItem(row, col, item)
        self._updateCurrentModelLabel()

    def _updateCurrentModelLabel(self) -> None:
        p = self._parameterNode
        if p and p.modelDir and os.path.isdir(p.modelDir):
            try:
                info = models.model_info(p.modelDir)
                self.ui.currentModelLabel.text = f"{info.name}: {', '.join(info.class_names)}"
            except models.ModelLibraryError as exc:
                self.ui.currentModelLabel.text = str(exc)
        else:
            self.ui.currentModelLabel.text = _("(choose one in Models)")
        self._updateButtons()

    def onUseModel(self) -> None:
        info = self._selectedModel()
        if info:
            self._parameterNode.modelDir = info.path
            self._updateCurrentModelLabel()

    def onRenameModel(self) -> None:
        info = self._selectedModel()
        if not info:
            return
        name = qt.QInputDialog.getText(None, _("Rename model"), _("New name:"), qt.QLineEdit.Normal, info.name)
        if name:
            with slicer.util.tryWithErrorDisplay(_("Rename failed.")):
                new = self.logic.modelLibrary().rename(info.path, name)
                if self._parameterNode.modelDir == info.path:
                    self._parameterNode.modelDir = new.path
        self.refreshModels()

    def onDeleteModel(self) -> None:
        info = self._selectedModel()
        if info and slicer.util.confirmYesNoDisplay(_("Delete model {name}?").format(name=info.name)):
            with slicer.util.tryWithErrorDisplay(_("Delete failed.")):
                self.logic.modelLibrary().delete(info.path)
                if self._parameterNode.modelDir == info.path:
                    self._parameterNode.modelDir = ""
        self.refreshModels()

    def onExportModel(self) -> None:
        info = self._selectedModel()
        if not info:
            return
        folder = qt.QFileDialog.getExistingDirectory(None, _("Export model package to folder"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
                dest = self.logic.modelLibrary().export(info.path, folder)
                slicer.util.infoDisplay(_("Model exported to {dest}").format(dest=dest))

    def onImportModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Model package folder (with model_card.json)"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Import failed."), waitCursor=True):
                self.logic.modelLibrary().add(folder)
        self.refreshModels()

    # -- segmenting ---------------------------------------------------------------------------
    def _checkedVolumes(self) -> list:
        return list(self.ui.segmentVolumesSelector.checkedNodes())

    def _setBusy(self, what: str) -> None:
        self._busy = what
        self._updateButtons()

    def onSegment(self) -> None:
        p = self._parameterNode
        volumes = self._checkedVolumes() or [p.inputVolume]
        dialog = None
        self._setBusy("segment")
        try:
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed.")):
                if not self.logic.ensureDependencies(training=False):
                    return
                dialog = slicer.util.createProgressDialog(
                    labelText=_("Segmenting {n} volume(s)...").format(n=len(volumes)), windowTitle=_("TSKD"), maximum=0)
                dialog.setCancelButtonText(_("Cancel"))
                start = time.monotonic()
                try:
                    results = self.logic.segment(volumes, p.modelDir, device=p.device, logCallback=self._appendLog,
                                                 cancelled=lambda: dialog.wasCanceled)
                except jobs.JobCancelled:
                    self.ui.segmentTimeLabel.text = _("Segmentation cancelled.")
                    return
                elapsed = time.monotonic() - start
                text = _("{n} volume(s) segmented in {t:.1f} s").format(n=len(results), t=elapsed)
                check = results[0].GetAttribute(CHECK_SLICES_ATTRIBUTE) if len(results) == 1 else None
                if check:
                    text += "; " + _("check first: slices {s}").format(s=check.replace(",", ", "))
                factor = results[0].GetAttribute(INTENSITY_FACTOR_ATTRIBUTE) if len(results) == 1 else None
                if factor:
                    text += "; " + _("intensities scaled x{f} to match the model's training scans").format(f=factor)
                self.ui.segmentTimeLabel.text = text
                if results:
                    slicer.util.setSliceViewerLayers(background=volumes[0])
                    # The prediction is a separate segmentation: the user's labels stay selected for
                    # training. To retrain on corrected slices, select the prediction as labels and
                    # list the slices you checked.
        finally:
            if dialog is not None:
                dialog.close()
            self._setBusy("")

    def onSegmentSlice(self) -> None:
        p = self._parameterNode
        self._setBusy("slice")
        try:
            with slicer.util.tryWithErrorDisplay(_("Slice segmentation failed."), waitCursor=True):
                if not self.logic.ensureDependencies(training=False):
                    return
                start = time.monotonic()
                seg, index = self.logic.segmentSlice(p.inputVolume, p.modelDir)
                self._sliceUndo = (self._sliceUndo + [(seg, p.inputVolume, index)])[-20:]
                self.ui.segmentTimeLabel.text = _("Slice {k} segmented in {t:.1f} s ('Undo slice' restores it)").format(
                    k=index, t=time.monotonic() - start)
        finally:
            self._setBusy("")

    def onUndoSlice(self) -> None:
        if not self._sliceUndo:
            return
        seg, volume, index = self._sliceUndo.pop()
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            if seg.GetScene() is None or volume.GetScene() is None:
                raise RuntimeError(_("The segmentation or the volume is no longer in the scene."))
            self.logic.undoLast(seg, volume)
            self.ui.segmentTimeLabel.text = _("Slice {k} restored.").format(k=index)
        self._updateButtons()

    # -- runs folder ------------------------------------------------------------------------------
    def onChangeRunsFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for training runs"), self.logic.runsDir)
        if folder:
            self.logic.runsDir = folder
            self.ui.runsFolderLabel.text = self.logic.runsDir

    def onDeleteRuns(self) -> None:
        runs = training.list_runs(self.logic.runsDir)
        if not runs:
            slicer.util.infoDisplay(_("No training run in {dir}.").format(dir=self.logic.runsDir))
            return
        items = [f"{r['name']}  ({models.format_size(models.dir_size(r['run_dir']))}"
                 f"{', finished' if r['finished'] else ''})" for r in runs]
        choice = qt.QInputDialog.getItem(None, _("Delete run"), _("Run to delete (its model stays in the library):"),
                                         items, 0, False)
        if not choice:
            return
        run = runs[items.index(choice)]
        if slicer.util.confirmYesNoDisplay(_("Delete run {name}?").format(name=run["name"])):
            with slicer.util.tryWithErrorDisplay(_("Delete failed."), waitCursor=True):
                running = [j.runDir for j in TrainingJob._active if j.isRunning()]
                freed = self.logic.deleteRun(run["run_dir"], running=running)
                slicer.util.infoDisplay(_("Deleted {name} ({size}).").format(name=run["name"],
                                                                             size=models.format_size(freed)))

    def onEditSegments(self) -> None:
        p = self._parameterNode
        editor = slicer.util.getModuleWidget("SegmentEditor")
        slicer.util.selectModule("SegmentEditor")
        if p.labelSegmentation:
            editor.editor.setSegmentationNode(p.labelSegmentation)
        if p.inputVolume:
            editor.editor.setSourceVolumeNode(p.inputVolume) if hasattr(editor.editor, "setSourceVolumeNode") \
                else editor.editor.setMasterVolumeNode(p.inputVolume)


# ---------------------------------------------------------------------------------------------
# Logic
# ---------------------------------------------------------------------------------------------

class TSKDSlicerLogic(ScriptedLoadableModuleLogic):
    """Console API of TSKD in Slicer. Training (and quick updates) run in a backend subprocess;
    interactive segmentation runs in Slicer's own process (onnxruntime).

    Main entry points: :meth:`train`, :meth:`segment`, :meth:`segmentSlice`, :meth:`segmentRange`,
    :meth:`segmentWholeVolume`, :meth:`suggestSlices`, :meth:`quickUpdate`, :meth:`correctedSlices`,
    :meth:`undoLast`, :meth:`modelLibrary`, :meth:`labelledSliceCounts`.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.moduleDir = os.path.dirname(os.path.abspath(__file__))

    def getParameterNode(self):
        return TSKDSlicerParameterNode(super().getParameterNode())

    # -- settings ----------------------------------------------------------------------------
    @property
    def dataDir(self) -> str:
        """Folder holding the model library ``models/`` (setting ``TSKD/DataDirectory``; default
        the settings folder, unchanged so existing libraries stay where they are)."""
        default = training.default_data_dir(os.path.dirname(slicer.app.slicerUserSettingsFilePath))
        path = slicer.util.settingsValue(SETTINGS_PREFIX + "DataDirectory", default)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def runsDir(self) -> str:
        """Folder of training runs (GBs: image copies, checkpoints). Setting ``TSKD/RunsDirectory``;
        default ``<Slicer cache folder>/TSKD/runs`` (not the roaming settings folder)."""
        default = training.default_runs_dir(slicer.app.cachePath)
        path = slicer.util.settingsValue(SETTINGS_PREFIX + "RunsDirectory", "") or default
        os.makedirs(path, exist_ok=True)
        return path

    @runsDir.setter
    def runsDir(self, path: str) -> None:
        qt.QSettings().setValue(SETTINGS_PREFIX + "RunsDirectory", path or "")

    def deleteRun(self, runDir: str, running=()) -> int:
        """Delete a run folder (never a model of the library); returns the bytes freed."""
        return training.delete_run(self.runsDir, runDir, running=running)

    @property
    def externalPython(self) -> str:
        """Python executable used to run the backend; empty = Slicer's own (PythonSlicer)."""
        return slicer.util.settingsValue(SETTINGS_PREFIX + "Python", "") or ""

    @externalPython.setter
    def externalPython(self, path: str) -> None:
        qt.QSettings().setValue(SETTINGS_PREFIX + "Python", path or "")

    def pythonExecutable(self) -> str:
        return self.externalPython or shutil.which("PythonSlicer") or sys.executable

    def backendEnvironment(self, device: str | None = None) -> dict:
        """Environment for backend processes: Slicer's startup environment (what PythonSlicer
        expects) plus ``PYTHONPATH`` to TSKDLib/TSKDSlicerLib. An external Python gets none of
        Slicer's Python variables (PYTHONHOME, PYTHONNOUSERSITE, PYTHONPATH...)."""
        external = bool(self.externalPython)
        return jobs.backend_env(slicer.util.startupEnvironment(), self.moduleDir, device, external_python=external)

    def modelLibrary(self) -> models.ModelLibrary:
        return models.ModelLibrary(os.path.join(self.dataDir, "models"))

    # -- dependencies ---------------------------------------------------------------------------
    def ensureDependencies(self, training: bool = True) -> bool:
        """Install what is missing (first use only). False if Slicer must restart first.

        Segment-only use installs ``requirements-segment.txt`` (ONNX Runtime, no torch); training
        installs torch>=2.3 through PyTorchUtils, then ``requirements.txt``, with the installed
        torch build pinned (:func:`TSKDSlicerLib.install.install_plan`). An external Python is
        checked (it starts, Python >= 3.10, torch>=2.3 for training) but never installed into.
        """
        problem = compat.runtime_problem(f"{slicer.app.majorVersion}.{slicer.app.minorVersion}")
        if problem:
            raise install.InstallError(problem)
        if self.externalPython:
            probe = jobs.probe_python(self.externalPython, self.backendEnvironment())
            problem = compat.external_python_problem(probe) or (
                install.torch_problem(probe.get("torch")) if training else None)
            if problem:
                raise install.InstallError(_("Your own Python cannot run TSKD: {problem}").format(problem=problem))
            return True
        resources = os.path.join(self.moduleDir, "Resources")
        try:
            if training:
                install.ensure_torch()
            mode = "train" if training else "segment"
            install.ensure_requirements(install.requirements_file(mode, resources),
                                        os.path.join(resources, "constraints.txt"), requester="TSKD",
                                        run_pip=self._runPip)
        except install.InstallError as exc:
            if exc.restart_required:
                if slicer.util.confirmYesNoDisplay(str(exc) + "\n\n" + _("Restart Slicer now?")):
                    slicer.util.restart()
                return False
            raise
        return True

    def _runPip(self, args) -> bool:
        """``PythonSlicer -m pip ARGS`` in a subprocess behind a progress dialog with Cancel (the GUI
        stays responsive); False when cancelled. Raises ``RuntimeError`` when pip fails."""
        python = shutil.which("PythonSlicer") or sys.executable
        job = jobs.BackendJob([python, "-m", "pip", *args], env=slicer.util.startupEnvironment())
        dialog = slicer.util.createProgressDialog(labelText=_("Installing Python packages (several minutes)..."),
                                                  windowTitle=_("TSKD"), maximum=0)
        dialog.setCancelButtonText(_("Cancel"))

        def onLog(line, j):
            logging.info("pip: " + line)
            dialog.labelText = line[-120:]

        job.on_log = onLog
        try:
            status = jobs.run_responsive(job, pump=slicer.app.processEvents, cancelled=lambda: dialog.wasCanceled)
        except jobs.JobCancelled:
            return False
        finally:
            dialog.close()
        if status != jobs.DONE:
            raise RuntimeError(_("pip failed: {error}").format(error="\n".join(list(job.log)[-15:])))
        return True

    # -- labels ---------------------------------------------------------------------------------
    def _labelArray(self, volumeNode, segmentationNode, segmentIds=None):
        seg = segmentationNode.GetSegmentation()
        ids = list(segmentIds) if segmentIds else [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]
        if not ids:
            return None, []
        return mrml_io.segments_to_label_array(segmentationNode, ids, volumeNode), ids

    #: Slice axis of training and slice counting (the backend's --axis; same rule on both sides).
    sliceOrientation = "acquisition"

    def sliceAxis(self, volumeNode, orientation: str | None = None) -> int:
        """numpy axis of ``arrayFromVolume`` holding ``orientation`` slices (default
        :attr:`sliceOrientation`: the volume's acquisition axis, as the backend slices it)."""
        dims = volumeNode.GetImageData().GetDimensions() if volumeNode.GetImageData() else None
        return labels.slice_axis_for(mrml_io.ijk_to_ras(volumeNode), orientation or self.sliceOrientation,
                                     size=dims, spacing=volumeNode.GetSpacing())

    def labelledSliceCounts(self, volumeNode, segmentationNode) -> dict:
        """``{segmentId: number of slices holding it}`` along :meth:`sliceAxis`, on the volume's grid."""
        array, ids = self._labelArray(volumeNode, segmentationNode)
        if array is None:
            return {}
        axis = self.sliceAxis(volumeNode)
        return {sid: len(labels.labelled_slices(array, axis, [n])) for n, sid in enumerate(ids, start=1)}

    def labelledSlices(self, volumeNode, segmentationNode, segmentIds, backgroundSlices=()) -> list[int]:
        """Slices (along :meth:`sliceAxis`) counted as labelled: any selected label, plus ``backgroundSlices``."""
        array, _ids = self._labelArray(volumeNode, segmentationNode, segmentIds)
        if array is None:
            return []
        return cases.case_labelled_slices(volumeNode, segmentationNode, segmentIds, backgroundSlices,
                                          self.sliceOrientation, array=array)

    def currentSliceIndex(self, volumeNode, viewName: str = "Red", orientation: str | None = None):
        """``(axis, index)`` of the slice shown in a slice view (``viewName`` if the layout has it,
        else its first slice view), on ``volumeNode``'s grid, through any parent transform."""
        layoutManager = slicer.app.layoutManager()
        viewName = mrml_io.choose_slice_view(list(layoutManager.sliceViewNames()), viewName)
        sliceNode = layoutManager.sliceWidget(viewName).mrmlSliceNode()
        m = sliceNode.GetSliceToRAS()
        ras = [m.GetElement(0, 3), m.GetElement(1, 3), m.GetElement(2, 3)]
        axis = self.sliceAxis(volumeNode, orientation)
        return axis, mrml_io.slice_index_at(volumeNode, ras, axis)

    # -- training -------------------------------------------------------------------------------
    def train(self, volumeNode, segmentationNode, segmentIds, preset: str = "fast", device: str = "auto",
              backgroundSlices=(), advanced: dict | None = None, runName: str | None = None) -> TrainingJob:
        """Start training a student on one volume; returns a :class:`TrainingJob` (running).

        ``volumeNode``/``segmentationNode`` may also be lists (one segmentation per volume).
        ``segmentIds``: the segments to learn (same names in every case). ``backgroundSlices``:
        axial slice indices with no label that count as labelled. ``advanced``: see
        :class:`TSKDSlicerLib.training.AdvancedSettings`. ``job.wait()`` blocks, ``job.cancel()``
        stops, ``job.resume()`` continues, ``job.modelDir`` is the model after success.
        """
        vols = volumeNode if isinstance(volumeNode, (list, tuple)) else [volumeNode]
        segs = segmentationNode if isinstance(segmentationNode, (list, tuple)) else [segmentationNode] * len(vols)
        cases = []
        for vol, seg in zip(vols, segs):
            ids = segmentIds
            if seg is not segs[0]:  # map by name onto the other segmentations
                names = mrml_io.segment_names(segs[0], segmentIds)
                ids = [seg.GetSegmentation().GetSegmentIdBySegmentName(n) for n in names]
            cases.append((vol, seg, list(ids), list(backgroundSlices)))
        return self.trainCases(cases, preset=preset, device=device, advanced=advanced, runName=runName)

    def trainCases(self, trainingCases, preset="fast", device="auto", advanced=None, runName=None,
                   acceptLabelWarnings: bool = False) -> TrainingJob:
        """Export each ``(volume, segmentation, segmentIds, slices)`` case and start ``tskd train``
        in the background (:func:`TSKDSlicerLib.cases.prepare_training_request`: labels drawn in
        another plane or with 3D tools raise ``LabelPlaneWarning`` unless
        ``acceptLabelWarnings``; a prediction counts only on its checked ``slices``)."""
        if not trainingCases:
            raise ValueError(_("No training case."))
        firstNames = mrml_io.segment_names(trainingCases[0][1], trainingCases[0][2])
        name = runName or training.new_run_name("_".join(firstNames[:3]))
        runDir = os.path.join(self.runsDir, name)
        try:
            request = cases.prepare_training_request(trainingCases, runDir, preset=preset, device=device,
                                                     advanced=advanced, orientation=self.sliceOrientation,
                                                     accept_label_warnings=acceptLabelWarnings)
        except Exception:
            shutil.rmtree(runDir, ignore_errors=True)  # nothing started: no half-written run left
            raise
        argv = jobs.launcher_prefix(self.pythonExecutable()) + request.args()
        logging.info("TSKD: " + " ".join(argv))
        backend = jobs.BackendJob(argv, env=self.backendEnvironment(device), cwd=runDir)
        return TrainingJob(self, backend, runDir, name).start()

    def resumeRun(self, runDir: str) -> TrainingJob:
        """Resume a cancelled/failed run folder (also after a Slicer restart)."""
        request = training.TrainRequest.read(runDir)
        argv = jobs.launcher_prefix(self.pythonExecutable()) + request.args()
        backend = jobs.BackendJob(argv, env=self.backendEnvironment(request.device), cwd=runDir)
        return TrainingJob(self, backend, runDir, os.path.basename(runDir)).start()

    # -- segmenting -----------------------------------------------------------------------------
    def _runBackend(self, args, device=None, logCallback=None, cancelled=None) -> jobs.BackendJob:
        """Run a short backend command while keeping the GUI alive; raises on failure and
        ``jobs.JobCancelled`` when ``cancelled()`` turned true."""
        job = jobs.BackendJob(jobs.launcher_prefix(self.pythonExecutable()) + args,
                              env=self.backendEnvironment(device),
                              on_log=(lambda line, j: logCallback(line)) if logCallback else None)
        job.start()
        jobs.JOBS.add(job)
        status = jobs.run_responsive(job, pump=slicer.app.processEvents, cancelled=cancelled)
        if status != jobs.DONE:
            raise RuntimeError(job.state.error or _("The backend failed."))
        return job

    def segment(self, volumeNode, modelDir: str, device: str | None = None, logCallback=None, cancelled=None):
        """Segment volume(s) with a model package; returns the new segmentation node (a list of
        nodes if ``volumeNode`` is a list). Segment names/colours come from the model card; each
        result is in its volume's geometry and subject-hierarchy study. Each node's attribute
        ``TSKD.CheckSlices`` lists the slices most likely to need a correction, most likely first
        (``tskd segment``'s ``check_slices``: the model's slice axis, the volume's own slice numbers);
        ``TSKD.IntensityFactor``, when set, the factor the volume's intensities were scaled by to
        match the model's training scans (``tskd segment``'s ``intensity_factor``)."""
        card = models.read_card(modelDir)
        classes = mrml_io.classes_from_card(card)
        vols = volumeNode if isinstance(volumeNode, (list, tuple)) else [volumeNode]
        results = []
        with tempfile.TemporaryDirectory(prefix="tskd-seg-") as tmp:
            inputs, outputs = [], []
            for n, vol in enumerate(vols):
                inputs.append(mrml_io.write_volume(vol, os.path.join(tmp, f"in_{n:03d}.nrrd")))
            outDir = os.path.join(tmp, "out")
            os.makedirs(outDir)
            if len(vols) == 1:
                outputs = [os.path.join(outDir, "in_000.nii.gz")]
                job = self._runBackend(jobs.segment_args(modelDir, inputs, outputs[0], device), device, logCallback,
                                       cancelled)
            else:
                job = self._runBackend(jobs.segment_args(modelDir, inputs, outDir, device), device, logCallback,
                                       cancelled)
                outputs = [self._findOutput(outDir, f"in_{n:03d}") for n in range(len(vols))]
            for vol, path in zip(vols, outputs):
                seg = mrml_io.import_labelmap_file(path, vol, classes,
                                                   name=f"{vol.GetName()} {card.get('name', 'TSKD')}")
                seg.CreateDefaultDisplayNodes()
                mrml_io.mark_prediction(seg, vol, card.get("name", ""))  # never the user's labels
                check = job.state.check_slices.get(os.path.normpath(path))
                if check:  # the slices most likely wrong (the model's slice axis, file numbering)
                    seg.SetAttribute(CHECK_SLICES_ATTRIBUTE, ",".join(map(str, check)))
                factor = job.state.intensity_factors.get(os.path.normpath(path), 1.0)
                if factor != 1.0:  # segmented a second time with the intensities scaled
                    seg.SetAttribute(INTENSITY_FACTOR_ATTRIBUTE, f"{factor:.2f}")
                results.append(seg)
        return results if isinstance(volumeNode, (list, tuple)) else results[0]

    @staticmethod
    def _findOutput(outDir: str, stem: str) -> str:
        for name in sorted(os.listdir(outDir)):
            if name.startswith(stem) and name.endswith((".nii.gz", ".nrrd")):
                return os.path.join(outDir, name)
        raise RuntimeError(_("The backend wrote no result for {stem} in {dir}.").format(stem=stem, dir=outDir))

    # -- in-process interactive segmentation (Segment Editor effect "TSKD") ---------------------
    @property
    def interactive(self):
        """The session's :class:`TSKDSlicerLib.inprocess.InteractiveSegmenter`: one onnxruntime
        session per model (checksum verified once), undo states and correction tracking. The
        backend process is only used for training and quick updates."""
        seg = getattr(TSKDSlicerLogic, "_interactive", None)
        if seg is None:
            from TSKDSlicerLib import inprocess, interactive

            interactive.ensure_backend_importable(self.moduleDir)
            cache = interactive.ModelSessionCache(library=self.modelLibrary())
            seg = inprocess.InteractiveSegmenter(cache, warn=lambda text: slicer.util.warningDisplay(text)
                                                 if slicer.app and not slicer.app.testingEnabled() else logging.warning(text))
            TSKDSlicerLogic._interactive = seg
        return seg

    def _targetSegmentation(self, volumeNode, modelDir, segmentationNode):
        if segmentationNode is not None:
            return segmentationNode
        card = models.read_card(modelDir)
        name = f"{volumeNode.GetName()} {card.get('name', 'TSKD')}"
        return mrml_io.prediction_segmentation(slicer.mrmlScene, volumeNode, name, card.get("name", ""))

    def segmentSlice(self, volumeNode, modelDir: str, index: int | None = None, segmentationNode=None,
                     device: str | None = None, returnUndo: bool = False, segmentIds=None, masking=None,
                     visibleIds=None):
        """Segment one slice in Slicer's own process (no file, no subprocess).

        ``index``: slice index along the model's slice axis (None: the slice shown in the Red view,
        or the layout's first slice view). ``segmentationNode``: default this model's prediction
        segmentation of the volume (created). Only ``segmentIds`` (default: the segments named like
        the model's classes) are written, under ``masking``
        (:class:`TSKDSlicerLib.interactive.Masking`; default: everywhere, overwrite all). An undo
        state is saved first (:meth:`undoLast`). Returns ``(segmentationNode, index)``
        (``returnUndo``: plus the undo label). ``device`` is ignored (onnxruntime picks CUDA when
        installed). Raises :class:`TSKDSlicerLib.interactive.InteractiveError` for refused input."""
        seg = self._targetSegmentation(volumeNode, modelDir, segmentationNode)
        if index is None:
            orientation = models.read_card(modelDir).get("slice_axis", "acquisition")
            _axis, index = self.currentSliceIndex(volumeNode, orientation=orientation)
        self.interactive.segment(volumeNode, seg, modelDir, [index], segmentIds=segmentIds, masking=masking,
                                 visibleIds=visibleIds)
        return (seg, index, f"TSKD slice {index}") if returnUndo else (seg, index)

    def segmentRange(self, volumeNode, modelDir: str, first: int | None = None, last: int | None = None,
                     segmentationNode=None, segmentIds=None, masking=None, protect: bool = True,
                     progress=None, cancelled=None, visibleIds=None, cleanup=None) -> dict:
        """Segment slices ``first..last`` (model slice axis) in-process, in chunks.

        ``first``/``last`` None: the extent between the first and last slice labelled in the
        target segments. ``protect``: slices the user labelled or corrected are left as they are.
        ``progress(done, total)``, ``cancelled()``: see
        :meth:`TSKDSlicerLib.inprocess.InteractiveSegmenter.segment`, as is ``cleanup`` (a
        ``TSKDLib.deploy.inference.Cleanup`` applied in 3D to the range; default none). One undo
        state. Returns its report (``slices`` written, ``skipped``, ``warnings``)."""
        from TSKDSlicerLib import interactive

        seg = self._targetSegmentation(volumeNode, modelDir, segmentationNode)
        pred = self.interactive.predictor(volumeNode, modelDir)
        if first is None or last is None:
            mapping, _created = self.interactive.targetSegments(seg, modelDir, segmentIds, create=False)
            labelled = self.interactive.labelledSlices(seg, volumeNode, list(mapping), pred.axis)
            lo, hi = interactive.range_between_labelled(labelled, pred.num_slices)
            first = lo if first is None else first
            last = hi if last is None else last
        if last < first:
            first, last = last, first
        return self.interactive.segment(volumeNode, seg, modelDir, range(int(first), int(last) + 1),
                                        segmentIds=segmentIds, masking=masking, protect=protect,
                                        progress=progress, cancelled=cancelled, visibleIds=visibleIds,
                                        cleanup=cleanup)

    def segmentWholeVolume(self, volumeNode, modelDir: str, segmentationNode=None, segmentIds=None, masking=None,
                           protect: bool = True, progress=None, cancelled=None, visibleIds=None,
                           cleanup: bool = True) -> dict:
        """Every slice of the volume in-process (``progress``/``cancelled`` as in
        :meth:`segmentRange`); user-labelled and corrected slices are kept when ``protect``.

        ``cleanup``: the 3D clean-up ``tskd segment`` applies by default (islands under 50 mm^3,
        enclosed holes, the model card's one-object classes:
        ``TSKDLib.deploy.inference.Cleanup.segment_default``), so the labels equal ``tskd
        segment``'s; every slice is predicted before anything is written (a Cancel writes
        nothing). False: the model's raw labels, written chunk by chunk."""
        pred = self.interactive.predictor(volumeNode, modelDir)  # also puts TSKDLib on sys.path
        from TSKDLib.deploy.inference import Cleanup

        pkg = self.interactive.package(modelDir)
        clean = Cleanup.for_package(pkg) if cleanup else None
        return self.segmentRange(volumeNode, modelDir, 0, pred.num_slices - 1, segmentationNode, segmentIds,
                                 masking, protect, progress, cancelled, visibleIds, cleanup=clean)

    def undoLast(self, segmentationNode, volumeNode) -> str | None:
        """Undo the last in-process write into ``segmentationNode``; returns what was undone."""
        return self.interactive.undo(segmentationNode, volumeNode)

    def correctedSlices(self, volumeNode, segmentationNode, modelDir: str | None = None) -> list[int]:
        """Slices the model wrote and the user has edited since (compared with the prediction)."""
        return self.interactive.correctedSlices(segmentationNode, volumeNode, modelDir)

    def trainingSlices(self, volumeNode, segmentationNode, modelDir: str | None = None, segmentIds=None) -> list[int]:
        """Slices retraining uses: labelled by the user, or predicted and corrected; never an
        uncorrected prediction."""
        return self.interactive.trainingSlices(segmentationNode, volumeNode, modelDir, segmentIds)

    def suggestSlices(self, volumeNode, modelDir: str, count: int = 5, segmentationNode=None,
                      moveView: bool = True, viewName: str = "Red") -> list[tuple[int, float]]:
        """"Label next": the ``count`` unlabelled slices where the student is least sure (the area in
        mm^2 it expects to have wrong there, the score ``tskd segment`` ranks its slices to check
        by), best first, as ``[(slice, mm^2)]``. Labelled
        slices (user-labelled, corrected, or holding any label of ``segmentationNode``) and their
        neighbours are skipped. ``moveView``: the slice view ``viewName`` jumps to the first one."""
        labelled: list[int] = []
        pred = self.interactive.predictor(volumeNode, modelDir)
        if segmentationNode is not None:
            seg = segmentationNode.GetSegmentation()
            ids = [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]
            tracker = self.interactive.tracker(segmentationNode, volumeNode)
            self.interactive.correctedSlices(segmentationNode, volumeNode, modelDir)
            holding = set(self.interactive.labelledSlices(segmentationNode, volumeNode, ids, pred.axis))
            # an uncorrected prediction is not a label: those slices may be suggested
            labelled = sorted((holding - set(tracker.predicted_slices)) | set(tracker.training_slices()))
        picks = self.interactive.suggest(volumeNode, modelDir, count, labelled)
        if moveView and picks and slicer.app is not None:
            self.showSlice(volumeNode, pred.axis, picks[0][0], viewName)
        return picks

    def showSlice(self, volumeNode, axis: int, index: int, viewName: str = "Red") -> None:
        """Move a slice view (``viewName`` if the layout has it) to slice ``index`` of the volume."""
        layoutManager = slicer.app.layoutManager()
        viewName = mrml_io.choose_slice_view(list(layoutManager.sliceViewNames()), viewName)
        sliceNode = layoutManager.sliceWidget(viewName).mrmlSliceNode()
        sliceNode.JumpSliceByOffsetting(*mrml_io.slice_center_ras(volumeNode, axis, index))

    def _runOf(self, modelDir: str) -> str | None:
        """The training run of a library model: the card's ``training.run_dir``, else the run folder
        named like the model in the runs folder (None when neither exists)."""
        card = models.read_card(modelDir)
        for path in ((card.get("training") or {}).get("run_dir"),
                     os.path.join(self.runsDir, str(card.get("name") or "").split(" (updated)")[0])):
            if path and os.path.isfile(os.path.join(path, "prepare", "slices.pt")):
                return path
        return None

    def quickUpdate(self, volumeNode, segmentationNode, modelDir: str, segmentIds=None, slices=None,
                    device: str = "auto", logCallback=None, cancelled=None) -> dict:
        """"Quick update": fine-tune the current student alone on its transfer set plus the
        corrected and user-labelled slices of this volume (the teacher's cached outputs are
        reused; nothing is re-fine-tuned), in a backend process (``tskd update``). Every class of
        the model needs its segment (a training slice is complete: all classes on it).

        ``slices``: default :meth:`trainingSlices`. The new student is added to the model library
        as a new version (``<name> vN``; the previous one stays and can be selected again).
        Returns ``{"model_dir", "name", "dice_before", "dice_after", "slices", "seconds", "review",
        "painted_before", "painted_after"}`` (Dice per class on the given slices, before and after;
        painted: pixels per class on those of the slices that hold none of it, see
        :func:`TSKDLib.distillation.update.corrected_slice_scores`; ``review``: per class whose
        segmentation of this volume's other slices changed most, up to three slice numbers to
        check, see :func:`TSKDLib.distillation.update.changes_elsewhere`). Raises ``RuntimeError`` with the
        backend's message on failure, :class:`TSKDSlicerLib.interactive.InteractiveError` when
        there is no slice to learn from."""
        from TSKDSlicerLib import interactive

        mapping, _created = self.interactive.targetSegments(segmentationNode, modelDir, segmentIds, create=False)
        pkg = self.interactive.package(modelDir)
        missing = [name for k, name in enumerate(pkg.class_map.names, start=1) if k not in mapping.values()]
        if missing:  # a training slice is complete: a class without its segment would become background
            raise interactive.InteractiveError(_(
                "Quick update needs a segment for every class of the model; {seg!r} has none for {missing}. "
                "Add (or rename) these segments, or use the whole pipeline.").format(
                    seg=segmentationNode.GetName(), missing=missing))
        if slices is None:
            slices = self.trainingSlices(volumeNode, segmentationNode, modelDir, list(mapping))
        slices = sorted(set(int(s) for s in slices))
        if not slices:
            raise interactive.InteractiveError(_("No corrected or labelled slice yet: correct a predicted slice "
                                                 "(or draw one) before a quick update."))
        from TSKDSlicerLib import inprocess

        tmp = tempfile.mkdtemp(prefix="tskd-update-")
        try:
            inputs = inprocess.quick_update_inputs(volumeNode, segmentationNode, mapping, pkg.class_map.names,
                                                   slices, tmp)
            outDir = os.path.join(tmp, "model")
            report = os.path.join(tmp, "update.json")
            axisName = pkg.slice_axis
            args = ["update", modelDir, "--image", inputs["image"], "--labels", inputs["labels"],
                    "--class-map", inputs["class_map"], "--slices", inputs["slices"], "--axis", axisName,
                    "--out", outDir, "--report", report, "--device", device, "--progress-json"]
            runDir = self._runOf(modelDir)
            if runDir:
                args += ["--run", runDir]
            start = time.monotonic()
            self._runBackend(args, device, logCallback, cancelled)
            with open(report, encoding="utf-8") as f:
                result = json.load(f)
            lib = self.modelLibrary()
            parent = modelDir if lib.contains(modelDir) else lib.add(modelDir).path
            info = lib.add_version(outDir, parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"model_dir": info.path, "name": info.name, "dice_before": result.get("dice_before"),
                "dice_after": result.get("dice_after"), "slices": slices,
                "seconds": time.monotonic() - start, "review": result.get("review") or {},
                "painted_before": result.get("painted_before") or {}, "painted_after": result.get("painted_after") or {}}


# ---------------------------------------------------------------------------------------------
# Test
# ---------------------------------------------------------------------------------------------

class TSKDSlicerTest(ScriptedLoadableModuleTest):
    """In-Slicer tests: widget, MRML glue and (opt-in) the full label -> train -> segment loop.

    The full loop needs torch and several minutes; it runs when ``TSKD_SLICER_FULL_TEST=1``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_version_check()
        self.setUp()
        self.test_segment_list_follows_selection()
        self.setUp()
        self.test_layout_without_red_view()
        self.setUp()
        self.test_sample_data()
        self.setUp()
        self.test_widget()
        self.setUp()
        self.test_export_import_roundtrip()
        self.setUp()
        self.test_segment_editor_effect()
        self.setUp()
        self.test_full_loop()

    def _dataPath(self, name):
        here = os.path.dirname(os.path.abspath(__file__))
        for root in (os.path.join(here, "..", "Testing", "Data", "totalseg"),
                     os.path.join(here, "Testing", "Data")):
            path = os.path.join(root, name)
            if os.path.exists(path):
                return path
        return None

    def _volumeAndLabels(self):
        import numpy as np
        ct, seg = self._dataPath("example_ct_sm.nii.gz"), self._dataPath("example_seg.nii.gz")
        if ct and seg:
            volume = slicer.util.loadVolume(ct)
            labelmap = slicer.util.loadLabelVolume(seg)
            arr = slicer.util.arrayFromVolume(labelmap)
            keep = np.zeros_like(arr)
            keep[[8, 14]] = np.where(arr[[8, 14]] == 5, 1, 0)  # liver on two slices
            slicer.util.updateVolumeFromArray(labelmap, keep)
        else:  # synthetic: a bright sphere
            z, y, x = np.mgrid[:24, :64, :64]
            sphere = ((z - 12) ** 2 + (y - 32) ** 2 + (x - 32) ** 2) < 100
            volume = slicer.util.addVolumeFromArray((sphere * 200 + 20).astype(np.int16), name="sphere")
            labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            labelmap.CopyOrientation(volume)
            keep = np.zeros_like(sphere, dtype=np.uint8)
            keep[[10, 14]] = sphere[[10, 14]]
            slicer.util.updateVolumeFromArray(labelmap, keep)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        slicer.mrmlScene.RemoveNode(labelmap)
        segmentation.GetSegmentation().GetNthSegment(0).SetName("liver")
        return volume, segmentation

    def test_widget(self):
        self.delayDisplay("Widget")
        slicer.util.selectModule("TSKDSlicer")
        widget = slicer.modules.TSKDSlicerWidget
        for name in ("inputVolumeSelector", "segmentationSelector", "segmentsListWidget", "trainButton",
                     "cancelButton", "progressBar", "logTextEdit", "modelsTableWidget", "segmentButton",
                     "segmentSliceButton", "presetComboBox", "deviceComboBox"):
            self.assertTrue(hasattr(widget.ui, name), name)
        self.assertEqual(widget.ui.presetComboBox.count, len(jobs.PRESETS))
        volume, segmentation = self._volumeAndLabels()
        widget._parameterNode.inputVolume = volume
        widget._parameterNode.labelSegmentation = segmentation
        widget.updateSegmentList()
        self.assertEqual(widget.ui.segmentsListWidget.count, 1)
        self.assertIn("2 labelled slices", widget.ui.segmentsListWidget.item(0).text())
        self.assertTrue(widget.ui.trainButton.enabled)

    def test_sample_data(self):
        """Issue 11 item 14: the bundled CT is registered with Sample Data and loads."""
        import SampleData
        sampledata.register(os.path.dirname(os.path.abspath(__file__)))
        volume = SampleData.downloadSample(sampledata.SAMPLE_NAME)
        self.assertIsNotNone(volume)
        self.assertEqual(volume.GetImageData().GetDimensions()[2] > 1, True)

    def test_version_check(self):
        """Issue 11 item 2: this Slicer passes the module's own start check."""
        self.assertIsNone(compat.runtime_problem(f"{slicer.app.majorVersion}.{slicer.app.minorVersion}"))
        self.assertIn("Slicer 5.10 or later", compat.runtime_problem("5.8.1", (3, 9, 10)))

    def test_segment_list_follows_selection(self):
        """Issue 11 item 6: choosing another segmentation in the selector lists *its* segments."""
        slicer.util.selectModule("TSKDSlicer")
        widget = slicer.modules.TSKDSlicerWidget
        volume, first = self._volumeAndLabels()
        second = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
        second.GetSegmentation().AddEmptySegment("", "spleen")
        second.GetSegmentation().AddEmptySegment("", "kidney")
        widget.ui.inputVolumeSelector.setCurrentNode(volume)
        widget.ui.segmentationSelector.setCurrentNode(first)
        slicer.app.processEvents()
        self.assertEqual(widget.ui.segmentsListWidget.count, 1)
        widget.ui.segmentationSelector.setCurrentNode(second)  # through the GUI, as a user does
        slicer.app.processEvents()
        names = [widget.ui.segmentsListWidget.item(r).text() for r in range(widget.ui.segmentsListWidget.count)]
        self.assertEqual(len(names), 2)
        self.assertTrue(names[0].startswith("spleen"), names)
        ids = widget._checkedSegmentIds()
        self.assertTrue(all(second.GetSegmentation().GetSegment(i) for i in ids))

    def test_layout_without_red_view(self):
        """Issue 11 item 13: a layout without a Red view uses another slice view."""
        import numpy as np
        lm = slicer.app.layoutManager()
        previous = lm.layout
        try:
            lm.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpYellowSliceView)
            slicer.app.processEvents()
            volume = slicer.util.addVolumeFromArray(np.zeros((5, 8, 8), np.int16), name="tiny")
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
            axis, index = TSKDSlicerLogic().currentSliceIndex(volume)
            self.assertTrue(0 <= index < 8)
        finally:
            lm.setLayout(previous)

    def test_export_import_roundtrip(self):
        import numpy as np
        self.delayDisplay("Export/import round trip")
        volume, segmentation = self._volumeAndLabels()
        sid = segmentation.GetSegmentation().GetNthSegmentID(0)
        with tempfile.TemporaryDirectory() as tmp:
            out = mrml_io.export_training_inputs(volume, segmentation, [sid], tmp)
            seg = mrml_io.import_labelmap_file(out["labels"], volume,
                                               [{"value": 1, "name": "liver", "color": (1, 0, 0)}])
        back = mrml_io.segments_to_label_array(seg, [seg.GetSegmentation().GetNthSegmentID(0)], volume)
        np.testing.assert_array_equal(back, out["array"])

    def test_segment_editor_effect(self):
        """Issue 13: the effect "TSKD" is registered and its options panel builds; with a model
        (``TSKD_TEST_MODEL_DIR``, a model package) "This slice" writes labels in-process and
        Ctrl+Z (the editor's undo) restores them."""
        self.delayDisplay("Segment Editor effect TSKD")
        self.assertTrue(registerSegmentEditorEffect(os.path.dirname(os.path.abspath(__file__))))
        names = [e.name for e in slicer.qSlicerSegmentEditorEffectFactory.instance().registeredEffects()]
        self.assertIn("TSKD", names)
        volume, segmentation = self._volumeAndLabels()
        slicer.util.selectModule("SegmentEditor")
        editorWidget = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editorWidget.setSegmentationNode(segmentation)
        editorWidget.setSourceVolumeNode(volume)
        editorWidget.setActiveEffectByName("TSKD")
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect)
        modelDir = os.environ.get("TSKD_TEST_MODEL_DIR")
        if not modelDir:
            self.delayDisplay("Effect actions skipped (set TSKD_TEST_MODEL_DIR to a model package with a 'liver' class)")
            editorWidget.setActiveEffectByName("")
            return
        import numpy as np
        sid = segmentation.GetSegmentation().GetNthSegmentID(0)
        before = mrml_io.segments_to_label_array(segmentation, [sid], volume)
        logic = TSKDSlicerLogic()
        info = logic.modelLibrary().add(modelDir, name="TSKD effect test")
        try:
            effect.self().refreshModels()
            effect.self().modelComboBox.currentIndex = [m.path for m in effect.self()._models].index(info.path)
            editorWidget.mrmlSegmentEditorNode().SetSelectedSegmentID(sid)
            logic.showSlice(volume, 0, 11)
            effect.self().onSlice()
            after = mrml_io.segments_to_label_array(segmentation, [sid], volume)
            self.assertFalse(np.array_equal(before, after))
            editorWidget.undo()
            np.testing.assert_array_equal(mrml_io.segments_to_label_array(segmentation, [sid], volume), before)
            effect.self().onLabelNext()
            self.assertIn("likely wrong", effect.self().statusLabel.text)
        finally:
            editorWidget.setActiveEffectByName("")
            logic.modelLibrary().delete(info.path)

    def test_full_loop(self):
        if os.environ.get("TSKD_SLICER_FULL_TEST") != "1":
            self.delayDisplay("Full loop skipped (set TSKD_SLICER_FULL_TEST=1)")
            return
        self.delayDisplay("Full loop: train (fast) -> segment -> segment slice")
        logic = TSKDSlicerLogic()
        volume, segmentation = self._volumeAndLabels()
        sid = segmentation.GetSegmentation().GetNthSegmentID(0)
        job = logic.train(volume, segmentation, [sid], preset="fast", device="auto")
        self.assertEqual(job.wait(timeout=3600), jobs.DONE, job.state.error)
        result = logic.segment(volume, job.modelDir)
        self.assertEqual(result.GetSegmentation().GetNthSegment(0).GetName(), "liver")
        check = [int(k) for k in result.GetAttribute(CHECK_SLICES_ATTRIBUTE).split(",")]
        self.assertTrue(1 <= len(check) <= 3 and all(0 <= k < volume.GetImageData().GetDimensions()[2] for k in check))
        picks = logic.suggestSlices(volume, job.modelDir, count=3, segmentationNode=segmentation)
        areas = [area for _slice, area in picks]
        self.assertTrue(len(picks) == 3 and areas == sorted(areas, reverse=True) and areas[-1] >= 0.0)
        logic.segmentSlice(volume, job.modelDir, index=8, segmentationNode=result)
        self.delayDisplay("Full loop passed")
