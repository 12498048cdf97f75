"""Segment Editor effect "TSKD": the trained student segments slices in Slicer's own process.

Registered by the TSKD module at start-up (``TSKDSlicer.registerSegmentEditorEffect``). This file
is the thin Qt part only: every rule (which slices, masking, undo states, "follow" debouncing,
protected slices, corrections, "label next") lives in plain classes of
``TSKDSlicerLib.interactive`` / ``TSKDSlicerLib.inprocess``, tested without Slicer, and runs through
the module logic's console API (``logic.segmentSlice``, ``segmentRange``, ``suggestSlices``,
``quickUpdate``). The file name and the class name ``SegmentEditorEffect`` follow Slicer's
scripted-effect convention.
"""

import logging
import math
import os

import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

try:
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover
    def _(text):
        return text

SLICE_VIEWS = ("Red", "Yellow", "Green")


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """TSKD student: this slice, a slice range, the whole volume, "follow" and "label next"."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "TSKD"  # not translated: found by name
        scriptedEffect.title = _("TSKD")
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._models = []
        self._follow = None
        self._followTimer = None
        self._observations = []

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "Resources", "Icons", "TSKDSlicer.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return _("<html>Segment with a TSKD student trained on your slices (TSKD module). "
                 "<b>This slice</b> segments the slice shown in the Red view; <b>Range</b> the slices "
                 "from-to (empty: between the first and last labelled slice); <b>Whole volume</b> every "
                 "slice, with the 3D clean-up of tskd segment. Only the selected segment is written (or every segment named like a model class), "
                 "under the masking settings below; Ctrl+Z undoes. Slices you labelled or corrected are "
                 "never overwritten by Range, Whole volume or <b>Follow</b> (segments each slice you scroll "
                 "to). <b>Label next</b> jumps to the slice where the student is least sure. "
                 "<b>Quick update</b> retrains the student on your corrections (new model version).</html>")

    # -- options panel ------------------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.modelComboBox = qt.QComboBox()
        self.modelComboBox.toolTip = _("Student from the TSKD model library.")
        refresh = qt.QPushButton(_("Refresh"))
        row = qt.QHBoxLayout()
        row.addWidget(self.modelComboBox, 1)
        row.addWidget(refresh)
        self.scriptedEffect.addLabeledOptionsWidget(_("Model:"), row)

        self.allClassesCheckBox = qt.QCheckBox(_("all segments named like the model's classes"))
        self.allClassesCheckBox.toolTip = _("Unticked: only the selected segment is written.")
        self.scriptedEffect.addLabeledOptionsWidget(_("Write:"), self.allClassesCheckBox)

        self.sliceButton = qt.QPushButton(_("This slice"))
        self.sliceButton.toolTip = _("Segment the slice shown in the Red view (the first slice view without one).")
        self.volumeButton = qt.QPushButton(_("Whole volume"))
        row = qt.QHBoxLayout()
        row.addWidget(self.sliceButton)
        row.addWidget(self.volumeButton)
        self.scriptedEffect.addOptionsWidget(row)

        self.fromSpinBox = qt.QSpinBox()
        self.toSpinBox = qt.QSpinBox()
        for box in (self.fromSpinBox, self.toSpinBox):
            box.minimum, box.maximum = -1, 100000
            box.specialValueText = _("labelled")
            box.value = -1
        self.rangeButton = qt.QPushButton(_("Segment range"))
        self.rangeButton.toolTip = _("Slices from-to; 'labelled': the first/last slice holding a label.")
        row = qt.QHBoxLayout()
        row.addWidget(qt.QLabel(_("from")))
        row.addWidget(self.fromSpinBox)
        row.addWidget(qt.QLabel(_("to")))
        row.addWidget(self.toSpinBox)
        row.addWidget(self.rangeButton)
        self.scriptedEffect.addLabeledOptionsWidget(_("Range:"), row)

        self.followCheckBox = qt.QCheckBox(_("Follow: segment each slice I scroll to (Red/Yellow/Green views "
                                             "showing the model's slice plane)"))
        self.scriptedEffect.addOptionsWidget(self.followCheckBox)

        self.nextButton = qt.QPushButton(_("Label next"))
        self.nextButton.toolTip = _("Jump to the unlabelled slice where the student expects to be wrong over the "
                                    "largest area (the ranking of tskd segment's slices to check).")
        self.updateButton = qt.QPushButton(_("Quick update"))
        self.updateButton.toolTip = _("Fine-tune the student on your corrected and labelled slices (a new model "
                                      "version; the previous one stays in the library).")
        row = qt.QHBoxLayout()
        row.addWidget(self.nextButton)
        row.addWidget(self.updateButton)
        self.scriptedEffect.addOptionsWidget(row)

        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        refresh.connect("clicked()", self.refreshModels)
        self.sliceButton.connect("clicked()", self.onSlice)
        self.rangeButton.connect("clicked()", self.onRange)
        self.volumeButton.connect("clicked()", self.onVolume)
        self.followCheckBox.connect("toggled(bool)", self.onFollowToggled)
        self.nextButton.connect("clicked()", self.onLabelNext)
        self.updateButton.connect("clicked()", self.onQuickUpdate)
        self.modelComboBox.connect("currentIndexChanged(int)", lambda i: self.updateMRMLFromGUI())
        self.refreshModels()

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("ModelDir", "")
        self.scriptedEffect.setParameterDefault("AllClasses", 0)

    def updateGUIFromMRML(self):
        model = self.scriptedEffect.parameter("ModelDir") if self.scriptedEffect.parameterDefined("ModelDir") else ""
        paths = [m.path for m in self._models]
        if model in paths:
            was = self.modelComboBox.blockSignals(True)
            self.modelComboBox.currentIndex = paths.index(model)
            self.modelComboBox.blockSignals(was)
        was = self.allClassesCheckBox.blockSignals(True)
        self.allClassesCheckBox.checked = self.scriptedEffect.integerParameter("AllClasses") != 0
        self.allClassesCheckBox.blockSignals(was)
        self._updateCorrections()

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("ModelDir", self._modelDir() or "")
        self.scriptedEffect.setParameter("AllClasses", 1 if self.allClassesCheckBox.checked else 0)

    def deactivate(self):
        self.followCheckBox.checked = False

    def cleanup(self):
        self._stopFollow()

    # -- helpers --------------------------------------------------------------------------------
    @property
    def logic(self):
        return slicer.util.getModuleLogic("TSKDSlicer")

    def refreshModels(self):
        self._models = [m for m in self.logic.modelLibrary().list() if not m.broken]
        was = self.modelComboBox.blockSignals(True)
        self.modelComboBox.clear()
        for m in self._models:
            self.modelComboBox.addItem(f"{m.name} ({', '.join(m.class_names)})")
        self.modelComboBox.blockSignals(was)
        self.updateGUIFromMRML()

    def _modelDir(self):
        i = self.modelComboBox.currentIndex
        return self._models[i].path if 0 <= i < len(self._models) else None

    def _nodes(self):
        p = self.scriptedEffect.parameterSetNode()
        volume = p.GetSourceVolumeNode() if hasattr(p, "GetSourceVolumeNode") else p.GetMasterVolumeNode()
        return p, volume, p.GetSegmentationNode()

    def _context(self):
        """(volume, segmentation, model, segmentIds, masking, visible); raises with a clear text."""
        from TSKDSlicerLib import inprocess

        p, volume, seg = self._nodes()
        model = self._modelDir()
        if not model:
            raise RuntimeError(_("Choose a model (train one in the TSKD module, or import a package there)."))
        if volume is None or seg is None:
            raise RuntimeError(_("Select a segmentation and a source volume."))
        ids = None if self.allClassesCheckBox.checked else [p.GetSelectedSegmentID()]
        if ids == [None] or ids == [""]:
            raise RuntimeError(_("Select a segment."))
        return (volume, seg, model, ids, inprocess.masking_from_editor_node(p),
                inprocess.visible_segment_ids(seg))

    def _run(self, what, fn):
        with slicer.util.tryWithErrorDisplay(_("TSKD: {what} failed.").format(what=what), waitCursor=True):
            if not self.logic.ensureDependencies(training=False):
                return None
            self.scriptedEffect.saveStateForUndo()  # Ctrl+Z restores the labels before this write
            result = fn(*self._context())
            self._updateCorrections()
            return result
        return None

    def _report(self, report, what):
        text = _("{what}: {n} slice(s) written").format(what=what, n=len(report["slices"]))
        if report.get("skipped"):
            text += _("; {n} labelled/corrected slice(s) kept").format(n=len(report["skipped"]))
        for w in report.get("warnings") or []:
            text += "\n" + w
        self.statusLabel.text = text

    # -- actions ----------------------------------------------------------------------------------
    def onSlice(self):
        def go(volume, seg, model, ids, masking, visible):
            seg_, index = self.logic.segmentSlice(volume, model, segmentationNode=seg, segmentIds=ids, masking=masking,
                                                  visibleIds=visible)
            self.statusLabel.text = _("Slice {k} segmented.").format(k=index)

        self._run(_("this slice"), go)

    def onRange(self):
        first = self.fromSpinBox.value if self.fromSpinBox.value >= 0 else None
        last = self.toSpinBox.value if self.toSpinBox.value >= 0 else None

        def go(volume, seg, model, ids, masking, visible):
            self._report(self._withProgress(lambda progress, cancelled: self.logic.segmentRange(
                volume, model, first, last, segmentationNode=seg, segmentIds=ids, masking=masking,
                progress=progress, cancelled=cancelled, visibleIds=visible)), _("Range"))

        self._run(_("range"), go)

    def onVolume(self):
        def go(volume, seg, model, ids, masking, visible):
            self._report(self._withProgress(lambda progress, cancelled: self.logic.segmentWholeVolume(
                volume, model, segmentationNode=seg, segmentIds=ids, masking=masking,
                progress=progress, cancelled=cancelled, visibleIds=visible)), _("Whole volume"))

        self._run(_("whole volume"), go)

    def _withProgress(self, fn):
        from TSKDSlicerLib.interactive import Cancelled

        dialog = slicer.util.createProgressDialog(labelText=_("TSKD: segmenting..."), windowTitle=_("TSKD"),
                                                  maximum=100)
        dialog.setCancelButtonText(_("Cancel"))

        def progress(done, total):
            dialog.value = int(100 * done / max(total, 1))
            slicer.app.processEvents()

        try:
            return fn(progress, lambda: dialog.wasCanceled)
        except Cancelled as exc:
            text = (_("Cancelled: the slices done so far were kept (Ctrl+Z removes them).") if exc.kept
                    else _("Cancelled before anything was written: the segmentation is unchanged."))
            return {"slices": [], "skipped": [], "warnings": [text]}
        finally:
            dialog.close()

    def onLabelNext(self):
        with slicer.util.tryWithErrorDisplay(_("TSKD: label next failed."), waitCursor=True):
            volume, seg, model, ids, masking, visible = self._context()
            picks = self.logic.suggestSlices(volume, model, count=5, segmentationNode=seg, moveView=True)
            self.statusLabel.text = _("Label next: slice {first}, about {area} mm\u00b2 likely wrong (then {rest}).").format(
                first=picks[0][0], area=f"{picks[0][1]:.0f}", rest=", ".join(str(s) for s, _e in picks[1:])
            ) if picks else _("No slice left.")

    def onQuickUpdate(self):
        with slicer.util.tryWithErrorDisplay(_("TSKD: quick update failed."), waitCursor=True):
            volume, seg, model, ids, masking, visible = self._context()
            dialog = slicer.util.createProgressDialog(labelText=_("TSKD: quick update (fine-tuning the student)..."),
                                                      windowTitle=_("TSKD"), maximum=0)
            dialog.setCancelButtonText(_("Cancel"))
            try:
                result = self.logic.quickUpdate(volume, seg, model, segmentIds=None if self.allClassesCheckBox.checked
                                                else ids, cancelled=lambda: dialog.wasCanceled)
            finally:
                dialog.close()
            self.refreshModels()
            paths = [m.path for m in self._models]
            if result["model_dir"] in paths:
                self.modelComboBox.currentIndex = paths.index(result["model_dir"])
            text = _("New model {name}: Dice on your {n} slice(s) {before} -> {after}.").format(
                name=result["name"], n=len(result["slices"]), before=_fmt(result["dice_before"]),
                after=_fmt(result["dice_after"]))
            erased = {k: (v, (result.get("painted_after") or {}).get(k)) for k, v in
                      (result.get("painted_before") or {}).items() if v}
            if erased:
                text += " " + _("Pixels painted where you drew none of the segment: {what}.").format(
                    what="; ".join(f"{k} {b} -> {a}" for k, (b, a) in erased.items()))
            review = result.get("review") or {}
            if review:
                text += " " + _("It changed other slices most here, review them: {where}.").format(
                    where="; ".join(f"{name} {', '.join(str(s) for s in sl)}" for name, sl in review.items()))
            self.statusLabel.text = text

    def _updateCorrections(self):
        try:
            p, volume, seg = self._nodes()
            model = self._modelDir()
            if volume is None or seg is None or not model:
                return
            corrected = self.logic.correctedSlices(volume, seg, model)
            tracker = self.logic.interactive.tracker(seg, volume)
            self.updateButton.text = _("Quick update ({n} corrected)").format(n=len(corrected))
            self.updateButton.toolTip = _("Training slices: {slices}").format(
                slices=", ".join(str(s) for s in tracker.training_slices()) or "-")
        except Exception as exc:  # noqa: BLE001 - a status label must never break the editor
            logging.debug("TSKD corrections: %s", exc)

    # -- follow ------------------------------------------------------------------------------------
    def onFollowToggled(self, on):
        if on:
            self._startFollow()
        else:
            self._stopFollow()

    def _startFollow(self):
        from TSKDSlicerLib.interactive import FollowController

        p, volume, seg = self._nodes()
        if volume is None or seg is None:
            self.followCheckBox.checked = False
            return
        tracker = self.logic.interactive.tracker(seg, volume)
        self._follow = FollowController(tracker.protected, delay_s=0.3)
        self._follow.enabled = True
        lm = slicer.app.layoutManager()
        for name in SLICE_VIEWS:
            widget = lm.sliceWidget(name)
            if widget is None:
                continue
            node = widget.mrmlSliceNode()
            tag = node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event, n=name: self._onSliceMoved(n))
            self._observations.append((node, tag))
        self._followTimer = qt.QTimer()
        self._followTimer.setInterval(100)
        self._followTimer.connect("timeout()", self._onFollowTick)
        self._followTimer.start()

    def _stopFollow(self):
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        if self._followTimer is not None:
            self._followTimer.stop()
            self._followTimer = None
        self._follow = None

    def _onSliceMoved(self, viewName):
        if self._follow is None:
            return
        p, volume, seg = self._nodes()
        model = self._modelDir()
        if volume is None or not model:
            return
        try:
            from TSKDSlicerLib import mrml_io

            orientation = self.logic.interactive.package(model).slice_axis
            axis = self.logic.sliceAxis(volume, orientation)
            sliceNode = slicer.app.layoutManager().sliceWidget(viewName).mrmlSliceNode()
            if not mrml_io.view_shows_axis(volume, sliceNode.GetSliceToRAS(), axis):
                return  # this view shows another plane than the model's slices
            _axis, index = self.logic.currentSliceIndex(volume, viewName, orientation)
        except Exception:  # noqa: BLE001 - the view shows no slice of this volume
            return
        self._follow.shown(viewName, index)

    def _onFollowTick(self):
        if self._follow is None:
            return
        due = self._follow.due()
        if not due:
            return

        def go(volume, seg, model, ids, masking, visible):
            from TSKDSlicerLib import interactive

            try:
                report = self.logic.interactive.segment(volume, seg, model, due, segmentIds=ids, masking=masking,
                                                        visibleIds=visible, protect=True)
                self._report(report, _("Follow"))
            except interactive.InteractiveError as exc:
                self.followCheckBox.checked = False
                raise exc

        self._run(_("follow"), go)


def _fmt(dice):
    if isinstance(dice, dict):
        return ", ".join(f"{k} {v:.3f}" for k, v in dice.items()
                         if isinstance(v, (int, float)) and not math.isnan(v)) or "-"
    return "-" if dice is None else f"{dice:.3f}"
