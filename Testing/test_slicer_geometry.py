"""Geometry in the scene (slicer-core): parent transforms, the user's segmentation, oblique CTs."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core MRML not available", allow_module_level=True)
import vtk  # noqa: E402
from slicer import util  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slicer_logic import converter_rules, make_scene  # noqa: E402,F401 (autouse fixture)

from DoseDiffMRML.logic import DoseDiffMRMLLogic, segment_masks  # noqa: E402


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_dose_and_sd_follow_the_cts_parent_transform(test_card):
    scene, ct, seg, *_ = make_scene()
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "couch shift")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 12.5)
    transform.SetMatrixTransformToParent(m)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    res = DoseDiffMRMLLogic().predict(ct, seg, str(test_card), steps=1, samples=2, seed=0, with_std=True,
                                      uncalibrated_std=True)
    assert res.std_node is not None and res.std_node.GetName().endswith("DoseDiff sample SD (uncalibrated)")
    for node in (res.dose_node, res.std_node):
        assert node.GetTransformNodeID() == transform.GetID()
        np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(ct))


def test_an_uncalibrated_sd_is_refused_before_the_worker_starts(test_card, monkeypatch):
    """As the CLI: no SD volume from a card that does not show its spread calibrated, unless asked."""
    import DoseDiffMRML.logic as logic_module

    from DoseDiffLib.errors import DoseDiffError

    monkeypatch.setattr(logic_module, "ChildProcess", lambda *a, **k: pytest.fail("the worker started"))
    scene, ct, seg, *_ = make_scene()
    with pytest.raises(DoseDiffError, match="not a calibrated uncertainty.*no coverage measured"):
        DoseDiffMRMLLogic().predict(ct, seg, str(test_card), steps=1, samples=2, seed=0, with_std=True)


def test_mask_export_leaves_a_closed_surface_segmentation_as_it_was():
    scene, ct, seg, *_ = make_scene()
    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    segmentation = seg.GetSegmentation()
    assert segmentation.CreateRepresentation(surface)
    segmentation.SetSourceRepresentationName(surface)
    segmentation.RemoveRepresentation(labelmap)
    assert not segmentation.ContainsRepresentation(labelmap)
    masks = segment_masks(seg, ct)
    assert masks and all(m.array.any() for m in masks.values())
    assert not segmentation.ContainsRepresentation(labelmap)
    assert segmentation.GetSourceRepresentationName() == surface


def test_an_oblique_ct_gets_its_dose_on_its_own_grid_and_nothing_outside_the_body(test_card):
    a = math.radians(12.0)
    rotated = ((-math.cos(a), -math.sin(a), 0.0), (-math.sin(a), math.cos(a), 0.0), (0.0, 0.0, -1.0))
    scene, ct, seg, *_ = make_scene(directions=rotated)
    res = DoseDiffMRMLLogic().predict(ct, seg, str(test_card), steps=1, seed=0)
    np.testing.assert_allclose(ijk_to_ras(res.dose_node), ijk_to_ras(ct))
    dose = util.arrayFromVolume(res.dose_node)
    body = segment_masks(seg, ct)["BODY"].array
    assert dose.shape == body.shape and dose.max() > 0
    assert float(dose[body == 0].max()) == 0.0


def test_a_segmentation_under_its_own_transform_is_exported_where_it_is_shown():
    """Slicer's export applies the segmentation's parent transform: masks follow what the user sees."""
    scene, ct, seg, *_ = make_scene()
    before = segment_masks(seg, ct)["Mandible"].array
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(2, 3, 30.0)  # 30 mm superior = 10 slices of 3 mm (this CT's k axis points inferior)
    shift.SetMatrixTransformToParent(m)
    seg.SetAndObserveTransformNodeID(shift.GetID())
    after = segment_masks(seg, ct)["Mandible"].array
    assert after.sum() == before.sum()
    assert np.argwhere(after)[:, 0].mean() == pytest.approx(np.argwhere(before)[:, 0].mean() - 10)
