"""DoseDiff: predict a radiotherapy dose distribution inside 3D Slicer.

Module (metadata), Widget (binds the .ui to the parameter node), Logic (scene work,
delegated to DoseDiffMRML so it is testable without the application) and Test.
Research and planning guidance only: not a treatment planning system dose calculation.
"""
import json
import logging
import os

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from DoseDiffMRML.logic import DoseDiffMRMLLogic, has_slicerrt

DISCLAIMER = ("For research and planning guidance only. DoseDiff predicts a dose typical of the plans it was "
              "trained on (OpenKBP: head and neck, 9-field IMRT, 70/63/56 Gy); it is not a treatment planning "
              "system dose calculation.")
PYTHON_PACKAGES = ("safetensors", "tqdm", "matplotlib", "scipy", "SimpleITK", "pydicom")


class DoseDiff(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DoseDiff")
        self.parent.categories = [_("Radiotherapy")]
        self.parent.dependencies = []  # SlicerRT is used when present
        self.parent.contributors = ["DoseDiff developers"]
        self.parent.helpText = _(
            "Predicts the dose distribution from a planning CT and its targets and organs at risk with a "
            "distance-aware diffusion model (Zhang et al., IEEE TMI 2024). ") + DISCLAIMER
        self.parent.acknowledgementText = _(
            "Trained on OpenKBP (Babier et al., Med. Phys. 2021). Uses SlicerRT for isodose, DVH and gamma.")


def model_path_default() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "Resources", "Models", "dosediff-openkbp.json"),
                      os.path.join(here, "..", "Resources", "Models", "dosediff-openkbp.json")):
        if os.path.exists(candidate):
            return os.path.normpath(candidate)
    return ""


@parameterNodeWrapper
class DoseDiffParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    planDose: slicer.vtkMRMLScalarVolumeNode
    outputDose: slicer.vtkMRMLScalarVolumeNode
    modelPath: str = ""
    roiMapping: str = "{}"
    device: str = "auto"
    steps: int = 0          # 0: the model card's validated setting
    samples: int = 1
    seed: int = 0
    uncertainty: bool = False


class DoseDiffWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancel = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DoseDiff.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DoseDiffLogic()
        self.ui.disclaimerLabel.text = DISCLAIMER
        self.ui.slicerRTLabel.text = ("SlicerRT found: isodose, DVH chart and gamma available." if has_slicerrt()
                                      else "SlicerRT not installed: prediction works; isodose lines, DVH chart "
                                           "and gamma need SlicerRT (Extensions Manager).")
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.suggestMappingButton.connect("clicked(bool)", self.onSuggestMapping)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.modelPath:
            self._parameterNode.modelPath = model_path_default()
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
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
        ready = bool(p and p.inputVolume and p.segmentation and p.modelPath)
        self.ui.applyButton.enabled = ready or self._running
        self.ui.applyButton.text = _("Cancel") if self._running else _("Predict dose")
        self.ui.compareButton.enabled = bool(p and p.outputDose and p.planDose and p.segmentation)
        self.ui.exportButton.enabled = bool(p and p.outputDose and p.inputVolume)

    def onSuggestMapping(self) -> None:
        p = self._parameterNode
        if p.segmentation and p.modelPath:
            p.roiMapping = json.dumps(self.logic.mrml.suggest_mapping(p.segmentation, p.modelPath), indent=1)

    def _progress(self, done: int, total: int, message: str):
        self.ui.progressBar.maximum = total
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # keeps Slicer responsive between network calls
        return not self._cancel

    def onApplyButton(self) -> None:
        if self._running:
            self._cancel = True
            return
        if not self.logic.ensureDependencies():
            return
        p = self._parameterNode
        self._running, self._cancel = True, False
        self._checkCanApply()
        try:
            mapping = json.loads(p.roiMapping or "{}") or None
            result = self.logic.mrml.predict(p.inputVolume, p.segmentation, p.modelPath, mapping, p.device,
                                             p.steps or None, p.samples, p.seed, p.uncertainty, self._progress)
            p.outputDose = result.dose_node
            slicer.util.setSliceViewerLayers(background=p.inputVolume, foreground=result.dose_node,
                                             foregroundOpacity=0.5)
            self.logic.mrml.create_isodose(result.dose_node)
            warnings = "\n".join(result.info.get("warnings", []))
            self.ui.statusLabel.text = (f"Done in {result.info['seconds_sampling']:.0f} s (seed {result.info['seed']})."
                                        + (f"\n{warnings}" if warnings else ""))
        except Exception as exc:  # shown to the user; the scene is unchanged
            from DoseDiffLib.errors import Cancelled

            if isinstance(exc, Cancelled):
                self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
            else:
                logging.exception("DoseDiff prediction failed")
                slicer.util.errorDisplay(str(exc), windowTitle="DoseDiff")
        finally:
            self._running = False
            self._checkCanApply()

    def onCompareButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Comparison failed."), waitCursor=True):
            mapping = json.loads(p.roiMapping or "{}") or None
            table, scores = self.logic.mrml.compare(p.outputDose, p.planDose, p.segmentation, mapping)
            self.logic.mrml.dvh_chart([p.planDose, p.outputDose], p.segmentation)
            gamma = self.logic.mrml.gamma(p.outputDose, p.planDose)
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
            self.ui.statusLabel.text = (f"Dose score {scores['dose_score']:.2f} Gy, DVH score {scores['dvh_score']:.2f} Gy"
                                        + (f", gamma 3%/3mm {gamma:.1f} %" if gamma is not None else ""))

    def onExportButton(self) -> None:
        p = self._parameterNode
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the RTDOSE"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("RTDOSE export failed."), waitCursor=True):
            path = self.logic.exportRTDose(p.outputDose, p.inputVolume, folder)
            self.ui.statusLabel.text = f"Wrote {path}"


class DoseDiffLogic(ScriptedLoadableModuleLogic):
    """The module's logic: parameter node, dependencies, and the scene work of DoseDiffMRML."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.mrml = DoseDiffMRMLLogic()

    def getParameterNode(self):
        return DoseDiffParameterNode(super().getParameterNode())

    def ensureDependencies(self) -> bool:
        """PyTorch through the PyTorch extension (with confirmation), the rest through pip."""
        try:
            import torch  # noqa: F401
        except ImportError:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("DoseDiff needs PyTorch: install the PyTorch extension from the "
                                         "Extensions Manager, restart Slicer and try again.")
                return False
            if not slicer.util.confirmOkCancelDisplay("DoseDiff needs PyTorch, which is not installed yet. "
                                                      "Install it now (several hundred MB)?"):
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                slicer.util.errorDisplay("PyTorch could not be installed; see the Python console.")
                return False
        missing = []
        for name in PYTHON_PACKAGES:
            try:
                __import__(name)
            except ImportError:
                missing.append(name)
        if missing:
            if not slicer.util.confirmOkCancelDisplay(f"DoseDiff needs {', '.join(missing)}. Install now?"):
                return False
            ensure = getattr(getattr(slicer, "packaging", None), "pip_ensure", None)
            for name in missing:
                ensure([name]) if ensure else slicer.util.pip_install(name)
        return True

    def exportRTDose(self, doseNode, ctNode, folder: str) -> str:
        """SlicerRT's DICOM RT exporter when installed, else the library's RTDOSE writer."""
        if has_slicerrt():
            try:
                from DicomRtImportExportPlugin import DicomRtImportExportPluginClass
            except ImportError:
                DicomRtImportExportPluginClass = None
            if DicomRtImportExportPluginClass is not None:
                sh = slicer.mrmlScene.GetSubjectHierarchyNode()
                exporter = DicomRtImportExportPluginClass()
                exportables = []
                for node in (ctNode, doseNode):
                    exportables += exporter.examineForExport(sh.GetItemByDataNode(node))
                for e in exportables:
                    e.directory = folder
                error = exporter.export(exportables)
                if error:
                    raise RuntimeError(error)
                return folder
        return self.mrml.export_rtdose(doseNode, ctNode, folder)


class DoseDiffTest(ScriptedLoadableModuleTest):
    """The whole flow inside a real Slicer, on a synthetic case with a random model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_predict_compare_export()

    def test_predict_compare_export(self):
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
