"""How the scene logic routes to SlicerRT (slicer-core; SlicerRT's side replaced by recorders)."""
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core MRML not available", allow_module_level=True)
from slicer import util  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slicer_logic import converter_rules, make_scene  # noqa: E402,F401 (autouse fixture)

from DoseDiffMRML import logic as mrml  # noqa: E402
from DoseDiffLib.errors import DoseDiffError  # noqa: E402


def dose_like(ct, value: float = 10.0):
    return mrml.add_volume_node(ct, np.full(util.arrayFromVolume(ct).shape, value, np.float32), "dose",
                                {mrml.DOSE_ATTRIBUTE: "1"})


def study_with(scene, ct, attributes: dict[str, str]) -> int:
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, ct)
    for k, v in attributes.items():
        sh.SetItemAttribute(study, k, v)
    return study


def test_an_existing_study_dose_unit_is_left_alone_and_said():
    scene, ct, *_ = make_scene()
    study = study_with(scene, ct, {mrml.DOSE_UNIT_NAME: "CGY", mrml.DOSE_UNIT_VALUE: "0.01"})
    note = mrml.DoseDiffMRMLLogic._place_in_study(dose_like(ct), ct)
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemAttribute(study, mrml.DOSE_UNIT_VALUE) == "0.01"
    assert sh.GetItemAttribute(study, mrml.DOSE_UNIT_NAME) == "CGY" and "left as it is" in note


def test_a_study_without_a_dose_unit_gets_gray():
    scene, ct, *_ = make_scene()
    study = study_with(scene, ct, {})
    assert mrml.DoseDiffMRMLLogic._place_in_study(dose_like(ct), ct) == ""
    assert scene.GetSubjectHierarchyNode().GetItemAttribute(study, mrml.DOSE_UNIT_VALUE) == "1.0"


def test_dvh_skips_empty_segments_by_name(monkeypatch):
    scene, ct, seg, *_ = make_scene()
    seg.GetSegmentation().AddEmptySegment("", "Empty ring")
    monkeypatch.setattr(mrml, "has_slicerrt", lambda: True)
    seen = {}
    monkeypatch.setattr(mrml.slicerrt, "dvh_chart", lambda doses, s, ids, skipped: seen.update(ids=ids, skipped=skipped))
    mrml.DoseDiffMRMLLogic().dvh_chart([dose_like(ct)], seg)
    names = [seg.GetSegmentation().GetSegment(i).GetName() for i in seen["ids"]]
    assert seen["skipped"] == ["Empty ring"] and "Empty ring" not in names and len(names) >= 3


def test_rtdose_of_a_dicom_ct_uses_the_library_writer(monkeypatch, tmp_path):
    scene, ct, *_ = make_scene()
    headers = [object()]
    monkeypatch.setattr(mrml.DoseDiffMRMLLogic, "ct_dicom_headers", lambda self, node: headers)
    calls = []
    import DoseDiffLib.dicomrt as dicomrt
    monkeypatch.setattr(dicomrt, "write_rtdose", lambda dose, h, out, *a: calls.append(h) or Path(out) / "RTDOSE.dcm")
    monkeypatch.setattr(mrml.slicerrt, "export_rt_study", lambda *a, **k: pytest.fail("SlicerRT exporter used"))
    monkeypatch.setattr(mrml, "has_slicerrt", lambda: True)
    written, message = mrml.DoseDiffMRMLLogic().export_rtdose(dose_like(ct), ct, str(tmp_path))
    assert calls == [headers] and "CT's study" in message


def test_rtdose_of_a_non_dicom_ct_uses_slicerrt_with_patient_tags_or_refuses(monkeypatch, tmp_path):
    scene, ct, *_ = make_scene()
    dose = dose_like(ct)
    monkeypatch.setattr(mrml, "has_slicerrt", lambda: False)
    with pytest.raises(DoseDiffError, match="not loaded from DICOM"):
        mrml.DoseDiffMRMLLogic().export_rtdose(dose, ct, str(tmp_path))
    monkeypatch.setattr(mrml, "has_slicerrt", lambda: True)
    seen = {}
    monkeypatch.setattr(mrml.slicerrt, "export_rt_study", lambda items, folder, **tags: seen.update(tags) or "")
    written, message = mrml.DoseDiffMRMLLogic().export_rtdose(dose, ct, str(tmp_path))
    assert seen == {"patient_name": "DoseDiff^CT", "patient_id": "DOSEDIFF-CT"}
    assert "new frame of reference" in message and "DoseDiff^CT" in message
