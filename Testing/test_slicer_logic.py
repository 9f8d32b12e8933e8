"""The module's scene logic against real MRML nodes (pip package slicer-core)."""
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core MRML not available", allow_module_level=True)
import vtk  # noqa: E402
from slicer import util  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DoseDiff"))
from DoseDiffMRML.logic import DOSE_ATTRIBUTE, DoseDiffMRMLLogic, volume_from_node  # noqa: E402

from DoseDiffLib.errors import DoseDiffError  # noqa: E402
from DoseDiffLib.modelcard import load_model  # noqa: E402
from DoseDiffLib.phantom import head_and_neck  # noqa: E402
from DoseDiffLib.predict import predict_case, prepare_case  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def converter_rules():
    """Slicer's Segmentations module registers these at start-up; slicer-core has no start-up."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


# RAS directions with two flipped axes: LPS direction diag(1, -1, -1)
RAS_DIRECTIONS = ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0))


def make_scene(names=None, seg_on_other_grid=False, directions=RAS_DIRECTIONS):
    ct, masks = head_and_neck(shape=(24, 64, 64), spacing=(3.2, 3.2, 3.0))
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    node.SetSpacing(3.2, 3.2, 3.0)
    node.SetOrigin(100.0, -90.0, 40.0)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, directions[r][c])
    node.SetIJKToRASDirectionMatrix(m)
    util.updateVolumeFromArray(node, ct.array.astype(np.int16))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Structures")
    ref = node
    if seg_on_other_grid:
        ref = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fine")
        ref.CopyOrientation(node)
        ref.SetSpacing(1.6, 1.6, 3.0)
        ref.SetOrigin(*node.GetOrigin())
        util.updateVolumeFromArray(ref, np.zeros((24, 128, 128), np.int16))
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ref)
    for name, mask in masks.items():
        arr = mask.array
        if seg_on_other_grid:
            arr = np.repeat(np.repeat(arr, 2, axis=1), 2, axis=2)
        lab = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        lab.CopyOrientation(ref)
        util.updateVolumeFromArray(lab, arr.astype(np.uint8))
        sid = seg.GetSegmentation().AddEmptySegment("", (names or {}).get(name, name))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(sid)
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg, ids)
        scene.RemoveNode(lab)
    return scene, node, seg, ct, masks


def test_node_geometry_becomes_lps_volume():
    scene, node, *_ = make_scene()
    v = volume_from_node(node)
    assert np.allclose(np.asarray(v.direction).reshape(3, 3), np.diag([1.0, -1.0, -1.0]))
    assert v.origin == pytest.approx((-100.0, 90.0, 40.0))
    # voxel (i, j, k) = (1, 2, 3) in RAS from the node, in LPS from the volume
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ras = [sum(m.GetElement(r, c) * x for c, x in enumerate((1, 2, 3, 1))) for r in range(3)]
    lps = v.grid.physical([1, 2, 3])[0]
    assert lps == pytest.approx([-ras[0], -ras[1], ras[2]])


def test_predict_creates_a_dose_node_equal_to_the_library_prediction(test_card):
    scene, node, seg, *_ = make_scene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    ct_before = util.arrayFromVolume(node).copy()
    logic = DoseDiffMRMLLogic()
    res = logic.predict(node, seg, str(test_card), steps=2, seed=5)
    dose = res.dose_node
    assert dose.GetID() not in before and dose.GetAttribute(DOSE_ATTRIBUTE) == "1"
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    dose.GetIJKToRASMatrix(a)
    node.GetIJKToRASMatrix(b)
    assert all(a.GetElement(r, c) == pytest.approx(b.GetElement(r, c)) for r in range(4) for c in range(4))
    # the same arrays through the library, same seed
    model, cfg, _ = load_model(test_card)
    ct_vol = volume_from_node(node)
    from DoseDiffMRML.logic import segment_masks
    inputs = prepare_case(ct_vol, segment_masks(seg, node), cfg)
    ref = predict_case(inputs, model, cfg, steps=2, seed=5)
    np.testing.assert_allclose(util.arrayFromVolume(dose), ref.dose.array, atol=1e-2)  # other batch shapes: rounding
    np.testing.assert_array_equal(util.arrayFromVolume(node), ct_before)  # input untouched
    # a second run makes a new node, never overwrites
    again = logic.predict(node, seg, str(test_card), steps=2, seed=5).dose_node
    assert again.GetID() != dose.GetID() and again.GetName() != dose.GetName()


def test_mapping_other_grid_and_missing_target(test_card):
    names = {"PTV70": "PTV_High", "LeftParotid": "Parotid_L"}
    scene, node, seg, *_ = make_scene(names=names, seg_on_other_grid=True)
    logic = DoseDiffMRMLLogic()
    suggested = logic.suggest_mapping(seg, str(test_card))
    assert suggested["LeftParotid"] == "Parotid_L" and "PTV70" not in suggested
    n_before = scene.GetNumberOfNodes()
    with pytest.raises(DoseDiffError, match="requires PTV70"):  # PTV_High is not recognised by itself
        logic.predict(node, seg, str(test_card), steps=1)
    assert scene.GetNumberOfNodes() == n_before  # nothing added on failure
    res = logic.predict(node, seg, str(test_card), mapping={"PTV70": "PTV_High"}, steps=1, seed=0)
    assert res.info["matched_rois"]["PTV70"] == "PTV_High"
    assert util.arrayFromVolume(res.dose_node).shape == util.arrayFromVolume(node).shape


def test_compare_table(test_card):
    scene, node, seg, ct, masks = make_scene()
    logic = DoseDiffMRMLLogic()
    res = logic.predict(node, seg, str(test_card), steps=1, seed=0)
    plan = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Plan")
    plan.CopyOrientation(node)
    util.updateVolumeFromArray(plan, util.arrayFromVolume(res.dose_node).copy())
    table, scores = logic.compare(res.dose_node, plan, seg)
    assert scores["dose_score"] == pytest.approx(0.0, abs=1e-6)
    assert table.GetNumberOfRows() > 0 and table.GetTable().GetColumnByName("Difference (Gy)") is not None


def test_dose_joins_the_ct_study_with_its_unit(test_card):
    scene, node, seg, *_ = make_scene()
    sh = scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    sh.CreateItem(study, node)  # the application does this when a node is added
    res = DoseDiffMRMLLogic().predict(node, seg, str(test_card), steps=1, seed=0)
    assert sh.GetItemParent(sh.GetItemByDataNode(res.dose_node)) == study
    assert sh.GetItemAttribute(study, "DicomRtImport.DoseUnitName") == "GY"


def test_plan_qa_of_the_loaded_plan_flags_the_overdosed_organ(test_card, tmp_path):
    """The command line's QA report from the panel: a plan 12 Gy hotter in the cord is flagged there only."""
    import json

    scene, node, seg, ct, masks = make_scene(names={"SpinalCord": "Cord"})
    logic = DoseDiffMRMLLogic()
    res = logic.predict(node, seg, str(test_card), steps=1, seed=0)
    predicted = util.arrayFromVolume(res.dose_node).copy()
    plan = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Plan")
    plan.CopyOrientation(node)
    util.updateVolumeFromArray(plan, predicted + 12.0 * masks["SpinalCord"].array)  # the node's voxel order
    table, summary = logic.plan_qa(res.dose_node, plan, seg, str(tmp_path / "qa"), {"SpinalCord": "Cord"})
    assert [(r["organ"], r["structure"]) for r in summary["flagged_organs"]] == [("SpinalCord", "Cord")]
    assert summary["flagged_organs"][0]["excess_gy"] == pytest.approx(12.0, abs=0.01)
    assert table.GetNumberOfRows() == 1 and table.GetTable().GetColumnByName("Excess (Gy)").GetValue(0) == \
        pytest.approx(12.0, abs=0.01)
    assert json.loads((tmp_path / "qa" / "qa.json").read_text())["model"] == "test"
    assert (tmp_path / "qa" / "dvh" / "SpinalCord.png").is_file() and (tmp_path / "qa" / "summary.html").is_file()
    with pytest.raises(DoseDiffError, match="overwrite"):
        logic.plan_qa(res.dose_node, plan, seg, str(tmp_path / "qa"), {"SpinalCord": "Cord"})
