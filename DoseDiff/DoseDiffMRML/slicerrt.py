"""Every call DoseDiff makes into SlicerRT, in one place (SlicerRT is optional).

Each call here is checked by Testing/test_slicer_rt_contract.py against SlicerRT's
headers in ../shared/reference/slicerrt (the method exists with that many arguments).
Without SlicerRT, has_slicerrt() is False and the module offers prediction and the
library's RTDOSE writer only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import slicer

# vtkSlicerRtCommon::DICOMRTIMPORT_* attribute names (the values are set in vtkSlicerRtCommon.cxx)
DOSE_ATTRIBUTE = "DicomRtImport.DoseVolume"
DOSE_UNIT_NAME = "DicomRtImport.DoseUnitName"
DOSE_UNIT_VALUE = "DicomRtImport.DoseUnitValue"

ISODOSE_LEVELS_GY = (20, 30, 40, 50, 56, 63, 70)


def has_slicerrt() -> bool:
    """SlicerRT adds its logic classes to the slicer namespace and its modules to slicer.modules."""
    return (hasattr(slicer, "vtkSlicerIsodoseModuleLogic") and hasattr(slicer, "vtkMRMLDoseVolumeHistogramNode")
            and hasattr(getattr(slicer, "modules", None), "isodose"))


def dose_color_table(scene):
    """SlicerRT's dose colour table (created once per scene)."""
    return slicer.vtkSlicerIsodoseModuleLogic.CreateDefaultDoseColorTable(scene)


def create_isodose(dose_node, levels_gy=ISODOSE_LEVELS_GY):
    """Isodose surfaces at the given levels; every level gets a colour (SetNumberOfIsodoseLevels fills them)."""
    scene = dose_node.GetScene()
    logic = slicer.modules.isodose.logic()
    color_table = logic.SetupColorTableNodeForDoseVolumeNode(dose_node)
    iso = scene.AddNewNodeByClass("vtkMRMLIsodoseNode", scene.GenerateUniqueName("DoseDiff isodose"))
    iso.SetAndObserveDoseVolumeNode(dose_node)
    if color_table is not None:
        iso.SetAndObserveColorTableNode(color_table)
    logic.SetNumberOfIsodoseLevels(iso, len(levels_gy))
    table = iso.GetColorTableNode()
    for i, level in enumerate(levels_gy):
        table.SetColorName(i, str(level))  # SlicerRT reads the levels from the colour names
    if not logic.CreateIsodoseSurfaces(iso):
        raise RuntimeError("SlicerRT could not create the isodose surfaces.")
    return iso


@dataclass
class DvhResult:
    chart: object
    curves: int
    notes: list[str] = field(default_factory=list)


def dvh_chart(dose_nodes, segmentation_node, segment_ids: list[str], skipped_names: list[str]) -> DvhResult:
    """One chart with a curve per segment and per dose, from the per-segment DVH tables ComputeDvh makes.

    ComputeDvh fails as a whole on an empty segment, so the caller passes only segments with
    voxels on the dose grid and the names it left out; a dose whose DVH fails is noted, not raised.
    """
    scene = segmentation_node.GetScene()
    logic = slicer.modules.dosevolumehistogram.logic()
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName("DoseDiff DVH"))
    notes = [f"No DVH for empty segment {name!r}." for name in skipped_names]
    curves = 0
    for dose in dose_nodes:
        dvh = scene.AddNewNodeByClass("vtkMRMLDoseVolumeHistogramNode", scene.GenerateUniqueName("DoseDiff DVH"))
        dvh.SetAndObserveDoseVolumeNode(dose)
        dvh.SetAndObserveSegmentationNode(segmentation_node)
        dvh.SetSelectedSegmentIDs(list(segment_ids))
        error = logic.ComputeDvh(dvh)
        metrics = dvh.GetMetricsTableNode()
        if error or metrics is None:
            notes.append(f"DVH of {dose.GetName()} failed: {error or 'no metrics table'}.")
            continue
        for sid in segment_ids:
            table = metrics.GetNodeReference(dvh.AssembleDvhNodeReference(sid))
            if table is not None and logic.AddDvhToChart(chart, table) is not None:
                curves += 1
    return DvhResult(chart, curves, notes)


def gamma_pass_rate(predicted_node, plan_node, dose_percent: float = 3.0, dta_mm: float = 3.0):
    """Gamma pass rate (%) through SlicerRT's Dose Comparison (needs Plastimatch in SlicerRT)."""
    scene = predicted_node.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLDoseComparisonNode", scene.GenerateUniqueName("DoseDiff gamma"))
    node.SetAndObserveReferenceDoseVolumeNode(plan_node)
    node.SetAndObserveCompareDoseVolumeNode(predicted_node)
    node.SetDtaDistanceToleranceMm(dta_mm)
    node.SetDoseDifferenceTolerancePercent(dose_percent)
    gamma = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName("DoseDiff gamma"))
    node.SetAndObserveGammaVolumeNode(gamma)
    error = slicer.modules.dosecomparison.logic().ComputeGammaDoseDifference(node)
    if error:
        raise RuntimeError(f"SlicerRT gamma failed: {error}")
    return node.GetPassFractionPercent()


def export_rt_study(sh_items: list[int], folder: str, patient_name: str, patient_id: str) -> str:
    """SlicerRT's DICOM RT exporter: a new CT series and RTDOSE in a new frame of reference.

    Used only when the CT has no DICOM source; returns SlicerRT's error message ("" on success).
    """
    from DicomRtImportExportPlugin import DicomRtImportExportPluginClass

    exporter = DicomRtImportExportPluginClass()
    exportables = []
    for item in sh_items:
        exportables += exporter.examineForExport(item)
    for e in exportables:
        e.directory = folder
        e.setTag("PatientName", patient_name)
        e.setTag("PatientID", patient_id)
    return exporter.export(exportables)
