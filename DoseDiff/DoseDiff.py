"""DoseDiff: predict a radiotherapy dose distribution inside 3D Slicer.

Module (metadata), Widget (binds the .ui to the parameter node and polls the prediction
process), Logic (dependencies and parameter node; the scene work is in DoseDiffMRML so it
is testable without the application) and Test. Research and planning guidance only: not
a treatment planning system dose calculation. Nothing heavy (torch, SimpleITK) is
imported when Slicer starts: prediction runs in a child process.
"""
import logging
import pathlib
import sys
from typing import Annotated

MIN_SLICER = "5.10"  # first Slicer on Python 3.12; DoseDiffLib and the parameter-node code need 3.10+
MIN_PYTHON = (3, 10)
if sys.version_info < MIN_PYTHON:
    raise ImportError(f"DoseDiff needs 3D Slicer {MIN_SLICER} or newer (Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+); "
                      f"this Slicer runs Python {sys.version_info[0]}.{sys.version_info[1]}. Install a newer Slicer.")

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from DoseDiffMRML import dependencies
from DoseDiffMRML.logic import CUSTOM_MODEL, DoseDiffMRMLLogic, has_slicerrt, model_choices

DISCLAIMER = ("For research and planning guidance only. DoseDiff predicts a dose typical of the plans it was "
              "trained on (OpenKBP: head and neck, 9-field IMRT, 70/63/56 Gy); it is not a treatment planning "
              "system dose calculation.")
MODEL_CHOICES = model_choices()
DEVICES = ["auto", "cpu", "cuda", "mps"]
MODEL_DEFAULT_SAMPLER = "model default"
SAMPLERS = [MODEL_DEFAULT_SAMPLER, "regression", "ddim"]  # DoseDiffLib.config.SAMPLERS, without importing torch
POLL_MS = 200


class DoseDiff(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DoseDiff")
        self.parent.categories = [_("Radiotherapy")]
        # SlicerRT is optional (isodose, DVH, gamma); PyTorch comes with the extension and is used only on "Predict"
        self.parent.dependencies = []
        self.parent.contributors = ["DoseDiff developers"]
        self.parent.helpText = _(
            "Predicts the dose distribution from a planning CT and its targets and organs at risk with a "
            "distance-aware diffusion model (Zhang et al., IEEE TMI 2024). ") + DISCLAIMER
        self.parent.acknowledgementText = _(
            "Trained on OpenKBP (Babier et al., Med. Phys. 2021). Uses SlicerRT for isodose, DVH and gamma.")


@parameterNodeWrapper
class DoseDiffParameterNode:
    """The module's state in the scene. The model is stored by its registry name, never as a path."""
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    planDose: slicer.vtkMRMLScalarVolumeNode
    outputDose: slicer.vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice(MODEL_CHOICES)] = MODEL_CHOICES[0]
    modelCard: pathlib.Path  # only read when model is CUSTOM_MODEL
    roiMapping: str = "{}"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    sampler: Annotated[str, Choice(SAMPLERS)] = MODEL_DEFAULT_SAMPLER
    steps: Annotated[int, WithinRange(0, 1000)] = 0  # 0: the model card's validated setting
    samples: Annotated[int, WithinRange(0, 32)] = 0  # 0: the model card's validated setting
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    uncertainty: bool = False


def chosen_model(p: DoseDiffParameterNode) -> str:
    """What the child process resolves: a registry name, or the custom card's path."""
    card = str(p.modelCard)
    if p.model != CUSTOM_MODEL:
        return p.model
    return card if card not in ("", ".") else ""


class DoseDiffWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DoseDiff.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DoseDiffLogic()
        self.ui.disclaimerLabel.text = DISCLAIMER
        self.ui.slicerRTLabel.text = ("SlicerRT found: isodose, DVH chart and gamma available." if has_slicerrt()
                                      else "SlicerRT not installed: prediction and RTDOSE export of DICOM CTs work; "
                                           "isodose lines, DVH chart and gamma need SlicerRT (Extensions Manager).")
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._poll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.qaButton.connect("clicked(bool)", self.onQaButton)
        self.ui.suggestMappingButton.connect("clicked(bool)", self.onSuggestMapping)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stop(_("Stopped: the module was closed."))
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """A running prediction belongs to the closing scene: stop it before its nodes go."""
        self._stop(_("Cancelled: the scene was closed."))
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and first.GetAttribute("DicomRtImport.DoseVolume") != "1":
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._run is not None
        ready = bool(p and p.inputVolume and p.segmentation and chosen_model(p))
        self.ui.applyButton.enabled = ready or running
        self.ui.applyButton.text = _("Cancel") if running else _("Predict dose")
        self.ui.modelPathLineEdit.enabled = bool(p and p.model == CUSTOM_MODEL)
        self.ui.compareButton.enabled = bool(p and p.outputDose and p.planDose and p.segmentation) and not running
        self.ui.exportButton.enabled = bool(p and p.outputDose and p.inputVolume) and not running
        self.ui.qaButton.enabled = self.ui.compareButton.enabled

    def _mapping(self):
        import json

        return json.loads(self._parameterNode.roiMapping or "{}") or None

    def onSuggestMapping(self) -> None:
        import json

        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segment names could not be matched."), waitCursor=True):
            if p.segmentation and chosen_model(p):
                p.roiMapping = json.dumps(self.logic.mrml.suggest_mapping(p.segmentation, chosen_model(p)))

    def onApplyButton(self) -> None:
        if self._run is not None:
            self._run.process.cancel()  # the next poll reports it and cleans up
            return
        problem = self.logic.ensureDependencies()
        if problem:
            self.ui.statusLabel.text = problem
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The prediction could not start."), waitCursor=True):
            self._run = self.logic.mrml.start_prediction(
                p.inputVolume, p.segmentation, chosen_model(p), self._mapping(), p.device, p.steps or None,
                p.samples or None, p.seed, p.uncertainty,
                None if p.sampler == MODEL_DEFAULT_SAMPLER else p.sampler)
            self.ui.progressBar.maximum = 0  # busy until the first step is reported
            self.ui.statusLabel.text = _("Starting the prediction process...")
            self._timer.start()
        self._checkCanApply()

    def _poll(self) -> None:
        """Runs on the QTimer: reads the child's progress lines; Slicer never blocks on the child."""
        if self._run is None:
            self._timer.stop()
            return
        for event in self._run.process.poll():
            if event.kind == "progress":
                self.ui.progressBar.maximum = event.data["total"]
                self.ui.progressBar.value = event.data["done"]
                self.ui.statusLabel.text = event.data["message"]
            elif event.kind == "result":
                self._loadResult(event.data)
                return
            elif event.kind == "error":
                self._finish(_("Prediction failed; the scene is unchanged.\n") + event.data["problem"]
                             + (f"\n{event.data['fix']}" if event.data.get("fix") else ""))
                return
            elif event.kind == "cancelled":
                self._finish(_("Cancelled; the scene is unchanged."))
                return

    def _loadResult(self, result: dict) -> None:
        p = self._parameterNode
        run, self._run = self._run, None
        self._timer.stop()
        try:
            loaded = self.logic.mrml.load_result(run, result)
        except Exception as exc:
            logging.exception("DoseDiff: loading the result failed")
            self._finish(_("Loading the predicted dose failed: ") + str(exc))
            return
        p.outputDose = loaded.dose_node
        slicer.util.setSliceViewerLayers(background=run.ct_node, foreground=loaded.dose_node, foregroundOpacity=0.5)
        notes = list(loaded.info.get("warnings", []))
        try:
            self.logic.mrml.create_isodose(loaded.dose_node)
        except Exception as exc:  # isodose is a display aid; the dose is loaded
            notes.append(f"Isodose surfaces failed: {exc}")
        self._finish(f"Done in {loaded.info['seconds_sampling']:.0f} s (seed {loaded.info['seed']}, "
                     f"{loaded.info['precision']})."
                     + ("\n" + "\n".join(notes) if notes else ""))

    def _finish(self, message: str) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._run is not None:
            self._run.close()
            self._run = None
        self.ui.progressBar.maximum = 100
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = message
        self._checkCanApply()

    def _stop(self, message: str) -> None:
        if self._run is not None:
            self._finish(message)

    def onCompareButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Comparison failed."), waitCursor=True):
            table, scores = self.logic.mrml.compare(p.outputDose, p.planDose, p.segmentation, self._mapping())
            lines = [f"Dose score {scores['dose_score']:.2f} Gy, DVH score {scores['dvh_score']:.2f} Gy"]
            chart = None
            try:
                dvh = self.logic.mrml.dvh_chart([p.planDose, p.outputDose], p.segmentation)
                if dvh is not None:
                    chart = dvh.chart if dvh.curves else None
                    lines += dvh.notes
            except Exception as exc:  # the DVH chart is one view; gamma still runs
                logging.exception("DoseDiff: DVH chart failed")
                lines.append(f"DVH chart failed: {exc}")
            try:
                gamma = self.logic.mrml.gamma(p.outputDose, p.planDose)
                if gamma is not None:
                    lines[0] += f", gamma 3%/3mm {gamma:.1f} %"
            except Exception as exc:
                lines.append(f"Gamma failed: {exc}")
            self._showComparison(table, chart)
            self.ui.statusLabel.text = "\n".join(lines)

    @staticmethod
    def _showComparison(table, chart) -> None:
        """A layout with the table and, when there is one, the DVH plot."""
        layout = (slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView if chart is not None
                  else slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.layoutManager().setLayout(layout)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        if chart is not None:
            selection.SetActivePlotChartID(chart.GetID())
            slicer.app.applicationLogic().PropagatePlotChartSelection()

    def onQaButton(self) -> None:
        p = self._parameterNode
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the plan QA report"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Plan QA failed."), waitCursor=True):
            table, summary = self.logic.mrml.plan_qa(p.outputDose, p.planDose, p.segmentation, folder,
                                                     self._mapping())
            flagged = summary["flagged_organs"]
            lines = [f"Plan QA: {len(flagged)} organ(s) get more dose than predicted "
                     f"(> {summary['thresholds']['gy']:g} Gy and > {summary['thresholds']['percent']:g} %)."]
            lines += [f"{r['organ']} ({r['structure']}): {r['metric']} plan {r['plan_gy']:.1f} Gy, "
                      f"predicted {r['predicted_gy']:.1f} Gy" for r in flagged[:5]]
            lines.append(f"Report: {pathlib.Path(folder) / 'summary.html'}")
            self._showComparison(table, None)
            self.ui.statusLabel.text = "\n".join(lines)

    def onExportButton(self) -> None:
        p = self._parameterNode
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the RTDOSE"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("RTDOSE export failed."), waitCursor=True):
            written, message = self.logic.mrml.export_rtdose(p.outputDose, p.inputVolume, folder)
            self.ui.statusLabel.text = f"{message}\nWrote {written}"


class DoseDiffLogic(ScriptedLoadableModuleLogic):
    """The module's logic: parameter node, dependencies, and the scene work of DoseDiffMRML."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.mrml = DoseDiffMRMLLogic()

    def getParameterNode(self):
        return DoseDiffParameterNode(super().getParameterNode())

    def ensureDependencies(self) -> str:
        """PyTorch through the PyTorch extension, the rest through pip; "" when ready, else what is wrong."""
        problem = dependencies.torch_problem(dependencies.installed_version("torch"))
        if problem:
            try:
                import PyTorchUtils
            except ImportError:
                return problem + " Install the PyTorch extension from the Extensions Manager and restart Slicer."
            if not slicer.util.confirmOkCancelDisplay(f"{problem} Install PyTorch now (several hundred MB)?"):
                return problem
            try:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=f">={dependencies.MIN_TORCH}")
            except Exception as exc:  # shown in the panel; Slicer carries on
                logging.exception("DoseDiff: PyTorch installation failed")
                return f"PyTorch could not be installed: {exc}"
            if torch is None:
                return "PyTorch was not installed; see the Python console."
            problem = dependencies.torch_problem(dependencies.installed_version("torch"))
            if problem:
                return problem + " Restart Slicer after the installation."
        missing = dependencies.missing_packages()
        if missing:
            ensure = getattr(getattr(slicer, "packaging", None), "pip_ensure", None)  # Slicer >= 5.11 asks itself
            if ensure is None and not slicer.util.confirmOkCancelDisplay(f"DoseDiff needs {', '.join(missing)}. "
                                                                         "Install now?"):
                return f"Missing Python packages: {', '.join(missing)}."
            try:
                ensure(missing, requester="DoseDiff") if ensure else slicer.util.pip_install(missing)
            except Exception as exc:
                return f"Installing {', '.join(missing)} failed: {exc}"
            still = dependencies.missing_packages()
            if still:
                return f"Missing Python packages: {', '.join(still)}."
        return ""


class DoseDiffTest(ScriptedLoadableModuleTest):
    """The whole flow inside a real Slicer, on a synthetic case with a random model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_predict_compare_export()

    def test_predict_compare_export(self):
        import os
        import tempfile

        import numpy as np
        import torch

        from DoseDiffLib.config import ModelConfig
        from DoseDiffLib.mmfnet import MMFNet
        from DoseDiffLib.modelcard import save_model
        from DoseDiffLib.phantom import head_and_neck
        from DoseDiffLib.volume import write_segmentation, write_volume

        self.delayDisplay("Building a synthetic case and a random model")
        tmp = tempfile.mkdtemp()
        ct, masks = head_and_neck(shape=(24, 64, 64), spacing=(3.2, 3.2, 3.0))
        write_volume(ct, os.path.join(tmp, "ct.nrrd"))
        write_segmentation(masks, os.path.join(tmp, "s.seg.nrrd"))
        torch.manual_seed(0)
        cfg = ModelConfig.preset("test")
        card = save_model(MMFNet(cfg.net), cfg, os.path.join(tmp, "m.json"))
        ctNode = slicer.util.loadVolume(os.path.join(tmp, "ct.nrrd"))
        segNode = slicer.util.loadSegmentation(os.path.join(tmp, "s.seg.nrrd"))
        logic = DoseDiffLogic()
        result = logic.mrml.predict(ctNode, segNode, str(card), steps=2, seed=1)
        dose = slicer.util.arrayFromVolume(result.dose_node)
        self.assertEqual(dose.shape, slicer.util.arrayFromVolume(ctNode).shape)
        self.assertGreater(float(dose.max()), 0.0)
        self.assertEqual(float(dose[np.asarray(slicer.util.arrayFromVolume(ctNode)) < -900].max()), 0.0)
        plan = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, result.dose_node, "plan")
        table, scores = logic.mrml.compare(result.dose_node, plan, segNode)
        self.assertAlmostEqual(scores["dose_score"], 0.0, places=5)
        self.delayDisplay("Test passed")
