"""MRML nodes <-> DoseDiffLib: everything the module does to the scene, without Qt.

Runs inside Slicer and, for tests, on the pip package slicer-core. Prediction runs in a
child process (DoseDiffLib.worker) fed from a temporary folder; the scene is touched only
when a result is loaded, so a cancelled or failed prediction leaves it as it was. Heavy
libraries (torch, SimpleITK) are imported on first use, never when Slicer starts.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import vtk

import slicer
from slicer import util

from DoseDiffLib.errors import Cancelled, DoseDiffError

from . import slicerrt
from .process import ChildProcess, child_environment, python_executable
from .slicerrt import DOSE_ATTRIBUTE, DOSE_UNIT_NAME, DOSE_UNIT_VALUE, has_slicerrt

if TYPE_CHECKING:
    from DoseDiffLib.volume import Volume

__all__ = ["DOSE_ATTRIBUTE", "DoseDiffMRMLLogic", "PredictionRun", "has_slicerrt", "segment_masks", "volume_from_node"]

SOURCE_ATTRIBUTE = "DoseDiff.Prediction"
CUSTOM_MODEL = "custom model card"


def model_choices() -> list[str]:
    """The registry's model names (default first) and the custom-card choice, for the model combo box."""
    from DoseDiffLib.registry import default_model, model_names

    try:
        names = model_names()
        first = default_model()
    except (DoseDiffError, OSError, ValueError, KeyError):  # a broken registry must not stop Slicer loading us
        return [CUSTOM_MODEL]
    return [first] + [n for n in names if n != first] + [CUSTOM_MODEL]
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


def volume_from_node(node) -> "Volume":
    """A scalar volume node as a Volume in LPS (arrayFromVolume is (k, j, i) like ours)."""
    from DoseDiffLib.volume import Volume

    arr = np.array(util.arrayFromVolume(node), copy=True)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    dirs_ras = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    direction = RAS_FROM_LPS @ dirs_ras
    origin = RAS_FROM_LPS @ np.asarray(node.GetOrigin(), float)
    return Volume(arr, tuple(node.GetSpacing()), tuple(origin), tuple(direction.ravel()))


def segment_masks(segmentation_node, reference_node) -> dict[str, "Volume"]:
    """Every segment as a binary mask on the reference volume's geometry (Slicer resamples).

    Exporting converts closed surfaces to a binary labelmap inside the user's segmentation;
    that representation is removed again when it was not there before.
    """
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    seg = segmentation_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    had_labelmap = bool(seg.ContainsRepresentation(labelmap_name))
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
    finally:  # the temporary labelmap, whatever display nodes it brought, and a converted representation
        for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
            if node.GetID() not in before:
                scene.RemoveNode(node)
        if not had_labelmap and seg.ContainsRepresentation(labelmap_name):
            seg.RemoveRepresentation(labelmap_name)
    return out


def add_volume_node(like_node, array: np.ndarray, name: str, attributes: dict[str, str]):
    """A new scalar volume with the geometry and parent transform of like_node, and a unique name."""
    scene = like_node.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.CopyOrientation(like_node)
    util.updateVolumeFromArray(node, np.ascontiguousarray(array.astype(np.float32)))
    node.SetAndObserveTransformNodeID(like_node.GetTransformNodeID())
    for k, v in attributes.items():
        node.SetAttribute(k, v)
    return node


@dataclass
class PredictionResult:
    dose_node: object
    std_node: object | None
    info: dict


@dataclass
class PredictionRun:
    """A prediction in progress: its child process, its temporary folder and the CT it belongs to."""
    process: ChildProcess
    folder: Path
    ct_node: object
    ct_shape: tuple
    std_name: str = "DoseDiff dose SD"   # "... (uncalibrated)" when the card does not show it calibrated

    def close(self) -> None:
        """Stop the child if it still runs and remove the temporary files."""
        self.process.cancel()
        shutil.rmtree(self.folder, ignore_errors=True)


class DoseDiffMRMLLogic:
    """Predict, compare and export from MRML nodes."""

    def suggest_mapping(self, segmentation_node, model: str) -> dict[str, str]:
        """Model ROI -> segment name, by the library's name matching."""
        from DoseDiffLib.config import ModelConfig
        from DoseDiffLib.modelcard import read_card
        from DoseDiffLib.registry import resolve
        from DoseDiffLib.rois import BODY, match_rois

        cfg = ModelConfig.from_dict(read_card(resolve(model))["config"])
        seg = segmentation_node.GetSegmentation()
        names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
        try:
            return match_rois(names, list(cfg.conditions.rois) + [BODY])
        except DoseDiffError:
            return {}

    def start_prediction(self, ct_node, segmentation_node, model: str, mapping: dict[str, str | None] | None = None,
                         device: str = "auto", steps: int | None = None, samples: int | None = None, seed: int | None = 0,
                         with_std: bool = False, sampler: str | None = None,
                         uncalibrated_std: bool = False) -> PredictionRun:
        """Write the CT and masks to a temporary folder and start DoseDiffLib.worker on them.

        with_std: also an SD volume, refused (as by the CLI) unless the model card shows the
        spread calibrated on validation or uncalibrated_std accepts it for research."""
        import DoseDiffLib
        from DoseDiffLib.modelcard import read_card, uncalibrated_spread
        from DoseDiffLib.registry import resolve
        from DoseDiffLib.volume import write_volume

        if ct_node is None or segmentation_node is None:
            raise DoseDiffError("Select a CT volume and a segmentation.", "Choose both inputs first.")
        card = resolve(model)
        measured = uncalibrated_spread(read_card(card)) if with_std else None
        if measured and not uncalibrated_std:
            raise DoseDiffError(f"The model's sample spread is not a calibrated uncertainty ({measured}).",
                                "Predict without the SD, or pass uncalibrated_std=True for research.")
        folder = Path(tempfile.mkdtemp(prefix="DoseDiff-"))
        try:
            ct = volume_from_node(ct_node)
            write_volume(ct, folder / "ct.nrrd")
            masks = segment_masks(segmentation_node, ct_node)
            (folder / "masks").mkdir()
            for i, mask in enumerate(masks.values()):  # NRRD per mask: the worker reads them on the CT's grid
                write_volume(mask, folder / "masks" / f"mask_{i:03d}.nrrd")
            (folder / "masks" / "names.json").write_text(json.dumps(list(masks)), encoding="utf-8")
            job = {"ct": str(folder / "ct.nrrd"), "structures": str(folder / "masks"),
                   "model": str(card), "mapping": mapping or None, "device": device, "steps": steps,
                   "samples": samples, "sampler": sampler, "seed": seed, "with_std": with_std,
                   "dose": str(folder / "dose.nrrd"), "std": str(folder / "dose_sd.nrrd")}
            (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
            library_parent = Path(DoseDiffLib.__file__).resolve().parent.parent
            process = ChildProcess([python_executable(), "-m", "DoseDiffLib.worker", str(folder / "job.json")],
                                   folder / "worker.log", child_environment(library_parent))
            process.start()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return PredictionRun(process, folder, ct_node, ct.array.shape,
                             "DoseDiff sample SD (uncalibrated)" if measured else "DoseDiff dose SD")

    def load_result(self, run: PredictionRun, result: dict) -> PredictionResult:
        """New dose (and SD) nodes on the CT's grid and under its transform; then the temporary files go."""
        from DoseDiffLib.worker import read_on_own_grid

        try:
            ct_node = run.ct_node
            if ct_node.GetScene() is None:
                raise DoseDiffError("The CT was removed from the scene during the prediction.", "Run it again.")
            dose = read_on_own_grid(result["dose"]).array
            std = read_on_own_grid(result["std"]).array if result.get("std") else None
            if dose.shape != tuple(run.ct_shape) or tuple(util.arrayFromVolume(ct_node).shape) != dose.shape:
                raise DoseDiffError("The predicted dose does not match the CT's grid.", "Run the prediction again.")
            info = result["info"]
            attrs = {DOSE_ATTRIBUTE: "1", SOURCE_ATTRIBUTE: json.dumps(info)}
            dose_node = add_volume_node(ct_node, dose, f"{ct_node.GetName()} DoseDiff dose", attrs)
            std_node = None
            if std is not None:
                std_node = add_volume_node(ct_node, std, f"{ct_node.GetName()} {run.std_name}",
                                           {SOURCE_ATTRIBUTE: json.dumps(info)})
            note = self._place_in_study(dose_node, ct_node)
            if note:
                info.setdefault("warnings", []).append(note)
            self.show_dose(dose_node)
            return PredictionResult(dose_node, std_node, info)
        finally:
            run.close()

    def predict(self, ct_node, segmentation_node, model: str, mapping: dict[str, str | None] | None = None,
                device: str = "auto", steps: int | None = None, samples: int | None = None, seed: int | None = 0,
                with_std: bool = False, progress: Callable[[int, int, str], "bool | None"] | None = None,
                timeout_s: float = 3600.0, sampler: str | None = None,
                uncalibrated_std: bool = False) -> PredictionResult:
        """The same child process, waited for: for scripts, the module's self-test and tests."""
        import time

        run = self.start_prediction(ct_node, segmentation_node, model, mapping, device, steps, samples, seed, with_std,
                                    sampler, uncalibrated_std)
        try:
            end = time.monotonic() + timeout_s
            while time.monotonic() < end:
                for event in run.process.poll():
                    if event.kind == "progress" and progress is not None:
                        if progress(event.data["done"], event.data["total"], event.data["message"]) is False:
                            run.process.cancel()
                    elif event.kind == "result":
                        return self.load_result(run, event.data)
                    elif event.kind == "error":
                        raise DoseDiffError(event.data["problem"], event.data.get("fix", ""))
                    elif event.kind == "cancelled":
                        raise Cancelled("prediction cancelled")
                time.sleep(0.05)
            raise DoseDiffError(f"The prediction took longer than {timeout_s:.0f} s.", "Use the GPU or fewer samples.")
        finally:
            run.close()

    @staticmethod
    def _place_in_study(dose_node, ct_node) -> str:
        """The dose beside the CT in the subject hierarchy; the study's dose unit only if it has none yet."""
        scene = dose_node.GetScene()
        sh = scene.GetSubjectHierarchyNode() if hasattr(scene, "GetSubjectHierarchyNode") else None
        if sh is None:
            return ""
        ct_item = sh.GetItemByDataNode(ct_node)
        parent = sh.GetItemParent(ct_item) if ct_item else sh.GetSceneItemID()
        dose_item = sh.GetItemByDataNode(dose_node) or sh.CreateItem(parent, dose_node)
        sh.SetItemParent(dose_item, parent)
        study = sh.GetItemAncestorAtLevel(ct_item, "Study") if ct_item else 0
        if not study:
            return ""
        if not sh.HasItemAttribute(study, DOSE_UNIT_VALUE):
            sh.SetItemAttribute(study, DOSE_UNIT_NAME, "GY")
            sh.SetItemAttribute(study, DOSE_UNIT_VALUE, "1.0")
            return ""
        unit = sh.GetItemAttribute(study, DOSE_UNIT_NAME) or "?"
        value = sh.GetItemAttribute(study, DOSE_UNIT_VALUE)
        if (unit.upper(), value) != ("GY", "1.0"):
            return (f"The study's dose unit ({unit}, scale {value}) was left as it is; SlicerRT reads the "
                    "DoseDiff dose (in Gy) with that unit.")
        return ""

    def show_dose(self, dose_node) -> None:
        """Dose colour wash; SlicerRT's dose colour table when present."""
        dose_node.CreateDefaultDisplayNodes()
        display = dose_node.GetDisplayNode()
        scene = dose_node.GetScene()
        if has_slicerrt():
            table = slicerrt.dose_color_table(scene)
        else:
            table = scene.GetFirstNodeByName("ColdToHotRainbow") or scene.GetFirstNodeByName("Rainbow")
        if display is None:
            return
        if table is not None:
            display.SetAndObserveColorNodeID(table.GetID())
        top = max(float(util.arrayFromVolume(dose_node).max()), 1.0)
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, top)
        display.SetLowerThreshold(0.05 * top)
        display.ApplyThresholdOn()

    def create_isodose(self, dose_node):
        """Isodose surfaces through SlicerRT; None without it."""
        return slicerrt.create_isodose(dose_node) if has_slicerrt() else None

    def compare(self, predicted_node, plan_node, segmentation_node, mapping: dict[str, str | None] | None = None):
        """A table node of DVH differences (plan vs prediction) per ROI, OpenKBP scores, and the masks used."""
        from DoseDiffLib.config import ModelConfig
        from DoseDiffLib.evaluate import evaluate_patient
        from DoseDiffLib.metrics import DOSE_METRICS
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
        rows = [r for r in e.roi_table if r["metric"] in DOSE_METRICS]
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

    def plan_qa(self, predicted_node, plan_node, segmentation_node, out_dir: str,
                mapping: dict[str, str | None] | None = None, threshold_gy: float = 3.0,
                threshold_percent: float = 10.0, overwrite: bool = False):
        """The command line's plan QA report for the loaded plan: report files in out_dir and a
        table node of the flagged organs (largest excess first)."""
        from DoseDiffLib.config import OARS, ModelConfig
        from DoseDiffLib.qa import QA_FILES, Thresholds, compare_plan, dvh_pictures, write_report
        from DoseDiffLib.rois import match_rois
        from DoseDiffLib.volume import check_output_folder, make_folder, resample

        thresholds = Thresholds(threshold_gy, threshold_percent)
        thresholds.check()
        out = check_output_folder(out_dir, QA_FILES, overwrite)
        pred = volume_from_node(predicted_node)
        plan = volume_from_node(plan_node)
        if not plan.grid.close_to(pred.grid):
            plan = resample(plan, pred.grid, "linear", default=0.0)
        masks = segment_masks(segmentation_node, predicted_node)
        matched = match_rois(masks.keys(), ModelConfig().conditions.rois, mapping)  # the panel's mapping names targets too
        organs = {r: (n, masks[n].array) for r, n in matched.items() if r in OARS and masks[n].array.any()}
        case = predicted_node.GetName()
        rows = compare_plan(case, plan.array.astype(np.float32), pred.array.astype(np.float32), organs,
                            pred.grid.voxel_volume_mm3(), thresholds)
        make_folder(out)
        pngs = dvh_pictures(rows, plan.array, pred.array, organs, out)
        source = json.loads(predicted_node.GetAttribute(SOURCE_ATTRIBUTE) or "{}")
        info = {"model": source.get("model", "not a DoseDiff prediction"), "plan": plan_node.GetName()}
        summary = write_report(rows, [{"case": case, "status": "checked", "note": "the plan loaded in Slicer"}],
                               out, info, pngs, thresholds)
        scene = predicted_node.GetScene()
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("DoseDiff plan QA"))
        flagged = summary["flagged_organs"]
        cols = {"Organ": [r["organ"] for r in flagged], "Structure": [r["structure"] for r in flagged],
                "Metric": [r["metric"] for r in flagged], "Plan (Gy)": [r["plan_gy"] for r in flagged],
                "DoseDiff (Gy)": [r["predicted_gy"] for r in flagged], "Excess (Gy)": [r["excess_gy"] for r in flagged],
                "Excess (%)": [r["excess_percent"] for r in flagged]}
        for name, values in cols.items():
            arr = vtk.vtkStringArray() if name in ("Organ", "Structure", "Metric") else vtk.vtkDoubleArray()
            arr.SetName(name)
            for v in values:
                arr.InsertNextValue(v if isinstance(v, str) else float(v))
            table.AddColumn(arr)
        return table, summary

    def dvh_chart(self, dose_nodes, segmentation_node) -> "slicerrt.DvhResult | None":
        """DVH curves of several doses in one SlicerRT chart, empty segments skipped; None without SlicerRT."""
        if not has_slicerrt():
            return None
        seg = segmentation_node.GetSegmentation()
        masks = segment_masks(segmentation_node, dose_nodes[0])
        ids, skipped = [], []
        for i in range(seg.GetNumberOfSegments()):
            name = seg.GetNthSegment(i).GetName()
            if masks[name].array.any():
                ids.append(seg.GetNthSegmentID(i))
            else:
                skipped.append(name)
        return slicerrt.dvh_chart(dose_nodes, segmentation_node, ids, skipped)

    def gamma(self, predicted_node, plan_node, dose_percent: float = 3.0, dta_mm: float = 3.0):
        """Gamma pass rate (%) through SlicerRT's Dose Comparison; None without it."""
        if not has_slicerrt() or not hasattr(slicer, "vtkMRMLDoseComparisonNode"):
            return None
        return slicerrt.gamma_pass_rate(predicted_node, plan_node, dose_percent, dta_mm)

    def ct_dicom_headers(self, ct_node) -> list:
        """The CT's DICOM headers from Slicer's database; empty when the CT did not come from DICOM."""
        uids = (ct_node.GetAttribute("DICOM.instanceUIDs") or "").split()
        db = getattr(slicer, "dicomDatabase", None)
        if not uids or db is None:
            return []
        import pydicom

        files = [db.fileForInstance(u) for u in uids]
        return [pydicom.dcmread(f, stop_before_pixels=True) for f in files if f]

    def export_rtdose(self, dose_node, ct_node, out_dir: str, overwrite: bool = False) -> tuple[str, str]:
        """RTDOSE: the library writer in the CT's own study when it came from DICOM, else SlicerRT's exporter.

        Returns (what was written, a sentence for the panel).
        """
        headers = self.ct_dicom_headers(ct_node)
        if headers:
            from DoseDiffLib.dicomrt import write_rtdose

            info = json.loads(dose_node.GetAttribute(SOURCE_ATTRIBUTE) or "{}")
            path = write_rtdose(volume_from_node(dose_node), headers, out_dir, info.get("model", ""), None, overwrite)
            return str(path), "RTDOSE written in the CT's study and frame of reference, referencing its images."
        if not has_slicerrt():
            raise DoseDiffError(f"The CT {ct_node.GetName()!r} was not loaded from DICOM, so an RTDOSE cannot refer "
                                "to its patient, study and frame of reference.",
                                "Load the CT from the DICOM database, install SlicerRT, or save the dose as NRRD.")
        sh = dose_node.GetScene().GetSubjectHierarchyNode()
        name = ct_node.GetName()
        error = slicerrt.export_rt_study([sh.GetItemByDataNode(ct_node), sh.GetItemByDataNode(dose_node)], out_dir,
                                         patient_name=f"DoseDiff^{name}", patient_id=f"DOSEDIFF-{name}")
        if error:
            raise DoseDiffError(f"SlicerRT's DICOM RT export failed: {error}", "See the Python log.")
        return out_dir, ("The CT was not from DICOM: SlicerRT wrote a new CT series and the RTDOSE in a new frame "
                         f"of reference, patient 'DoseDiff^{name}'. Import both together.")
