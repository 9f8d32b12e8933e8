"""MRML nodes <-> DoseDiffLib: everything the module does to the scene, without Qt.

Runs inside Slicer and, for tests, on the pip package slicer-core. It never overwrites
a node: every prediction creates new nodes, and a failed or cancelled prediction
leaves the scene as it was.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import vtk

import slicer
from slicer import util

from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.volume import Volume

DOSE_ATTRIBUTE = "DicomRtImport.DoseVolume"
DOSE_UNIT_NAME = "DicomRtImport.DoseUnitName"
DOSE_UNIT_VALUE = "DicomRtImport.DoseUnitValue"
SOURCE_ATTRIBUTE = "DoseDiff.Prediction"
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


def has_slicerrt() -> bool:
    """SlicerRT adds these logic classes to the slicer namespace when installed."""
    return hasattr(slicer, "vtkSlicerIsodoseModuleLogic") and hasattr(slicer, "vtkMRMLDoseVolumeHistogramNode")


def volume_from_node(node) -> Volume:
    """A scalar volume node as a Volume in LPS (arrayFromVolume is (k, j, i) like ours)."""
    arr = np.array(util.arrayFromVolume(node), copy=True)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    dirs_ras = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    direction = RAS_FROM_LPS @ dirs_ras
    origin = RAS_FROM_LPS @ np.asarray(node.GetOrigin(), float)
    return Volume(arr, tuple(node.GetSpacing()), tuple(origin), tuple(direction.ravel()))


def segment_masks(segmentation_node, reference_node) -> dict[str, Volume]:
    """Every segment as a binary mask on the reference volume's geometry (Slicer resamples)."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    seg = segmentation_node.GetSegmentation()
    ref = volume_from_node(reference_node)
    out: dict[str, Volume] = {}
    scene = segmentation_node.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DoseDiff_temp__")
    try:
        for i in range(seg.GetNumberOfSegments()):
            sid = seg.GetNthSegmentID(i)
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, label, reference_node):
                raise DoseDiffError(f"Segment {seg.GetSegment(sid).GetName()!r} could not be exported.",
                                    "Check that it has a binary labelmap representation.")
            arr = (util.arrayFromVolume(label) != 0).astype(np.uint8)
            if arr.shape != ref.array.shape:
                raise DoseDiffError(f"Segment {seg.GetSegment(sid).GetName()!r} was exported on another grid.",
                                    "Update Slicer; the export must follow the CT geometry.")
            out[seg.GetSegment(sid).GetName()] = ref.with_array(arr)
    finally:  # the temporary labelmap and whatever display nodes it brought
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before:
                scene.RemoveNode(node)
    return out


def add_volume_node(scene, like_node, array: np.ndarray, name: str, attributes: dict[str, str]):
    """A new scalar volume with the geometry of like_node and a unique name."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.CopyOrientation(like_node)
    util.updateVolumeFromArray(node, np.ascontiguousarray(array.astype(np.float32)))
    for k, v in attributes.items():
        node.SetAttribute(k, v)
    return node


@dataclass
class PredictionResult:
    dose_node: object
    std_node: object | None
    info: dict


class DoseDiffMRMLLogic:
    """Predict, compare and export from MRML nodes. Heavy imports happen on first use."""

    def __init__(self) -> None:
        self._model = None
        self._model_key = None

    def load_model(self, card_path: str, device: str = "auto"):
        from DoseDiffLib.modelcard import load_model
        from DoseDiffLib.runtime import choose_device

        dev = choose_device(device)
        key = (str(card_path), str(dev))
        if self._model_key != key:
            self._model = load_model(card_path, dev)
            self._model_key = key
        return self._model, dev

    def suggest_mapping(self, segmentation_node, card_path: str) -> dict[str, str]:
        """Model ROI -> segment name, by the library's name matching."""
        from DoseDiffLib.modelcard import read_card
        from DoseDiffLib.config import ModelConfig
        from DoseDiffLib.rois import BODY, match_rois

        cfg = ModelConfig.from_dict(read_card(card_path)["config"])
        seg = segmentation_node.GetSegmentation()
        names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
        try:
            return match_rois(names, list(cfg.conditions.rois) + [BODY])
        except DoseDiffError:
            return {}

    def predict(self, ct_node, segmentation_node, card_path: str, mapping: dict[str, str | None] | None = None,
                device: str = "auto", steps: int | None = None, samples: int = 1, seed: int | None = 0,
                with_std: bool = False, progress: Callable[[int, int, str], "bool | None"] | None = None
                ) -> PredictionResult:
        """New dose (and optional uncertainty) nodes on the CT geometry; the scene is touched only at the end."""
        from DoseDiffLib.predict import predict_case, prepare_case

        if ct_node is None or segmentation_node is None:
            raise DoseDiffError("Select a CT volume and a segmentation.", "Choose both inputs first.")
        (model, cfg, card), dev = self.load_model(card_path, device)
        ct = volume_from_node(ct_node)
        masks = segment_masks(segmentation_node, ct_node)
        inputs = prepare_case(ct, masks, cfg, mapping)
        pred = predict_case(inputs, model, cfg, steps=steps, samples=samples, seed=seed, device=dev,
                            with_std=with_std and samples > 1, progress=progress)
        scene = ct_node.GetScene()
        info = dict(pred.info, model=card["name"], model_sha256=card["weights"]["sha256"])
        attrs = {DOSE_ATTRIBUTE: "1", DOSE_UNIT_NAME: "GY", DOSE_UNIT_VALUE: "1.0", SOURCE_ATTRIBUTE: json.dumps(info)}
        dose_node = add_volume_node(scene, ct_node, pred.dose.array, f"{ct_node.GetName()} DoseDiff dose", attrs)
        std_node = None
        if pred.std is not None:
            std_node = add_volume_node(scene, ct_node, pred.std.array, f"{ct_node.GetName()} DoseDiff dose SD",
                                       {SOURCE_ATTRIBUTE: json.dumps(info)})
        self._place_in_study(dose_node, ct_node)
        self.show_dose(dose_node, ct_node)
        return PredictionResult(dose_node, std_node, info)

    @staticmethod
    def _place_in_study(dose_node, ct_node) -> None:
        """Put the dose beside the CT in the subject hierarchy; SlicerRT reads the dose unit from the study."""
        scene = dose_node.GetScene()
        sh = scene.GetSubjectHierarchyNode() if hasattr(scene, "GetSubjectHierarchyNode") else None
        if sh is None:
            return
        ct_item = sh.GetItemByDataNode(ct_node)
        parent = sh.GetItemParent(ct_item) if ct_item else sh.GetSceneItemID()
        dose_item = sh.GetItemByDataNode(dose_node) or sh.CreateItem(parent, dose_node)
        sh.SetItemParent(dose_item, parent)
        study = sh.GetItemAncestorAtLevel(ct_item, "Study") if ct_item else 0
        if study:
            sh.SetItemAttribute(study, DOSE_UNIT_NAME, "GY")
            sh.SetItemAttribute(study, DOSE_UNIT_VALUE, "1.0")

    def show_dose(self, dose_node, ct_node) -> None:
        """Dose colour wash over the CT; SlicerRT's dose colour table and isodose when present."""
        dose_node.CreateDefaultDisplayNodes()
        display = dose_node.GetDisplayNode()
        scene = dose_node.GetScene()
        if has_slicerrt():
            table = slicer.vtkSlicerIsodoseModuleLogic.CreateDefaultDoseColorTable(scene)
        else:
            table = scene.GetFirstNodeByName("ColdToHotRainbow") or scene.GetFirstNodeByName("Rainbow")
        if display is not None and table is not None:
            display.SetAndObserveColorNodeID(table.GetID())
        if display is not None:
            display.SetAutoWindowLevel(False)
            top = float(util.arrayFromVolume(dose_node).max())
            display.SetWindowLevelMinMax(0.0, max(top, 1.0))
            display.SetLowerThreshold(0.05 * max(top, 1.0))
            display.ApplyThresholdOn()

    def create_isodose(self, dose_node, levels_gy=(20, 30, 40, 50, 56, 63, 70)):
        """Isodose surfaces through SlicerRT's Isodose module; None without SlicerRT."""
        if not has_slicerrt() or not hasattr(slicer, "modules"):
            return None
        scene = dose_node.GetScene()
        iso = scene.AddNewNodeByClass("vtkMRMLIsodoseNode", scene.GenerateUniqueName("DoseDiff isodose"))
        iso.SetAndObserveDoseVolumeNode(dose_node)
        logic = slicer.modules.isodose.logic()
        logic.SetupColorTableNodeForDoseVolumeNode(dose_node)
        color = iso.GetColorTableNode()
        if color is not None:
            color.SetNumberOfColors(len(levels_gy))
            for i, level in enumerate(levels_gy):
                color.SetColorName(i, str(level))
        logic.CreateIsodoseSurfaces(iso)
        return iso

    def compare(self, predicted_node, plan_node, segmentation_node, mapping: dict[str, str | None] | None = None,
                card_path: str | None = None):
        """A table node of DVH differences (plan vs prediction) per ROI, with OpenKBP scores."""
        from DoseDiffLib.config import ModelConfig
        from DoseDiffLib.evaluate import evaluate_patient
        from DoseDiffLib.rois import BODY, match_rois
        from DoseDiffLib.volume import resample

        pred = volume_from_node(predicted_node)
        plan = volume_from_node(plan_node)
        if not plan.grid.close_to(pred.grid):
            plan = resample(plan, pred.grid, "linear", default=0.0)
        masks = segment_masks(segmentation_node, predicted_node)
        rois = list(ModelConfig().conditions.rois) + [BODY]
        matched = match_rois(masks.keys(), rois, mapping)
        roi_masks = {r: masks[n].array for r, n in matched.items() if r != BODY}
        body = masks[matched[BODY]].array if BODY in matched else (pred.array > 0).astype(np.uint8)
        e = evaluate_patient(predicted_node.GetName(), plan.array, pred.array.astype(np.float32), roi_masks, body,
                             pred.spacing, gamma=False)
        scene = predicted_node.GetScene()
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("DoseDiff DVH comparison"))
        rows = [r for r in e.roi_table if r["metric"] in ("D99", "D95", "D1", "Dmean", "D0.1cc")]
        cols = {"ROI": [r["roi"] for r in rows], "Metric": [r["metric"] for r in rows],
                "Plan (Gy)": [r["reference"] for r in rows], "DoseDiff (Gy)": [r["prediction"] for r in rows],
                "Difference (Gy)": [r["difference"] for r in rows]}
        for name, values in cols.items():
            arr = vtk.vtkStringArray() if isinstance(values[0] if values else "", str) else vtk.vtkDoubleArray()
            arr.SetName(name)
            for v in values:
                arr.InsertNextValue(v if isinstance(v, str) else round(float(v), 3))
            table.AddColumn(arr)
        table.SetAttribute("DoseDiff.dose_score", f"{e.scores['dose_score']:.3f}")
        table.SetAttribute("DoseDiff.dvh_score", f"{e.scores['dvh_score']:.3f}")
        return table, e.scores

    def dvh_chart(self, dose_nodes, segmentation_node):
        """DVHs of several doses in one chart through SlicerRT; None without SlicerRT."""
        if not has_slicerrt() or not hasattr(slicer, "modules"):
            return None
        logic = slicer.modules.dosevolumehistogram.logic()
        scene = segmentation_node.GetScene()
        chart = None
        for dose in dose_nodes:
            dvh = scene.AddNewNodeByClass("vtkMRMLDoseVolumeHistogramNode")
            dvh.SetAndObserveDoseVolumeNode(dose)
            dvh.SetAndObserveSegmentationNode(segmentation_node)
            error = logic.ComputeDvh(dvh)
            if error:
                raise DoseDiffError(f"SlicerRT could not compute the DVH of {dose.GetName()}: {error}.",
                                    "Check that the segmentation overlaps the dose.")
            if chart is None:
                chart = dvh.GetChartNode()
            else:
                logic.AddDvhToChart(chart, dvh.GetMetricsTableNode())
        return chart

    def gamma(self, predicted_node, plan_node, dose_percent: float = 3.0, dta_mm: float = 3.0):
        """Gamma volume and pass rate through SlicerRT's Dose Comparison; None without it."""
        if not has_slicerrt() or not hasattr(slicer, "vtkMRMLDoseComparisonNode") or not hasattr(slicer, "modules"):
            return None
        scene = predicted_node.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLDoseComparisonNode")
        node.SetAndObserveReferenceDoseVolumeNode(plan_node)
        node.SetAndObserveCompareDoseVolumeNode(predicted_node)
        node.SetDtaDistanceToleranceMm(dta_mm)
        node.SetDoseDifferenceTolerancePercent(dose_percent)
        gamma = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName("DoseDiff gamma"))
        node.SetAndObserveGammaVolumeNode(gamma)
        error = slicer.modules.dosecomparison.logic().ComputeGammaDoseDifference(node)
        if error:
            raise DoseDiffError(f"SlicerRT gamma failed: {error}.", "Check that Plastimatch is part of SlicerRT.")
        return node.GetPassFractionPercent()

    def export_rtdose(self, dose_node, ct_node, out_dir: str, overwrite: bool = False) -> str:
        """RTDOSE through the library's writer, linked to the CT's DICOM study when Slicer has it."""
        import pydicom

        from DoseDiffLib.dicomrt import write_rtdose

        headers = []
        uids = (ct_node.GetAttribute("DICOM.instanceUIDs") or "").split()
        db = getattr(slicer, "dicomDatabase", None)
        if uids and db is not None:
            headers = [pydicom.dcmread(db.fileForInstance(u), stop_before_pixels=True) for u in uids]
        if not headers:
            raise DoseDiffError(f"The CT {ct_node.GetName()!r} was not loaded from DICOM, so an RTDOSE could not "
                                "refer to its patient, study and frame of reference.",
                                "Load the CT from the DICOM database, or save the dose as NRRD instead.")
        info = json.loads(dose_node.GetAttribute(SOURCE_ATTRIBUTE) or "{}")
        path = write_rtdose(volume_from_node(dose_node), headers, out_dir, info.get("model", ""), None, overwrite)
        return str(path)
