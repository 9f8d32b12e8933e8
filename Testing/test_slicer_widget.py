"""The panel's prediction flow: DoseDiffWidget over the .ui's stand-in widgets, real worker, real MRML.

Slicer's application (layouts, the QTimer's event loop) is absent, so the test plays the
timer: it calls the widget's poll slot as the QTimer would, and checks what the user sees.
"""
import contextlib
import sys
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_standins as standins  # noqa: E402

if standins.reference_missing_reason():
    pytest.skip(standins.reference_missing_reason(), allow_module_level=True)
slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core MRML not available", allow_module_level=True)
from test_slicer_logic import converter_rules, make_scene  # noqa: E402,F401 (autouse fixture)


class Timer:
    """The QTimer's part: started and stopped by the widget; the test calls the slot."""
    active = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


@pytest.fixture()
def panel(monkeypatch, test_card):
    standins.install(monkeypatch)
    scene, ct, seg, *_ = make_scene(names={"PTV70": "PTV_High"})
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext())
    shown = []
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **k: shown.append(k))
    monkeypatch.delitem(sys.modules, "DoseDiff", raising=False)
    import DoseDiff

    monkeypatch.delitem(sys.modules, "DoseDiff")
    _, widgets, _ = standins.build_ui()
    for w in widgets.values():
        if isinstance(w, standins.qMRMLNodeComboBox):
            w.setMRMLScene(scene)
    widget = DoseDiff.DoseDiffWidget.__new__(DoseDiff.DoseDiffWidget)
    DoseDiff.VTKObservationMixin.__init__(widget)
    widget.ui, widget._timer, widget._run = types.SimpleNamespace(**widgets), Timer(), None
    widget._parameterNode = widget._parameterNodeGuiTag = None
    widget.logic = DoseDiff.DoseDiffLogic()
    monkeypatch.setattr(widget.logic, "ensureDependencies", lambda: "")
    widget.setParameterNode(widget.logic.getParameterNode())
    p = widget._parameterNode
    p.inputVolume, p.segmentation = ct, seg
    p.model, p.modelCard, p.steps, p.seed = DoseDiff.CUSTOM_MODEL, Path(test_card), 1, 3
    p.roiMapping = '{"PTV70": "PTV_High"}'
    return widget, scene, shown


def run_timer(widget, timeout: float = 120.0) -> list[tuple[int, int]]:
    """Call the poll slot until the widget stops its timer; returns the progress bar's states."""
    seen, end = [], time.monotonic() + timeout
    while widget._timer.active and time.monotonic() < end:
        widget._poll()
        seen.append((widget.ui.progressBar.value, widget.ui.progressBar.maximum))
        time.sleep(0.05)
    assert not widget._timer.active
    return seen


def test_predict_shows_progress_then_the_dose(panel):
    widget, scene, shown = panel
    n = scene.GetNumberOfNodes()
    widget._parameterNode.steps = 4  # several DDIM steps, so the bar moves between polls
    widget.onApplyButton()
    assert widget._timer.active and widget.ui.applyButton.text == "Cancel"
    folder = widget._run.folder
    seen = run_timer(widget)
    p = widget._parameterNode
    assert p.outputDose is not None and p.outputDose.GetName().endswith("DoseDiff dose")
    assert any(total > 0 and 0 < done <= total for done, total in seen)  # DDIM steps reached the bar
    assert widget.ui.statusLabel.text.startswith("Done") and widget.ui.applyButton.text == "Predict dose"
    assert shown and shown[-1]["foreground"] is p.outputDose
    assert scene.GetNumberOfNodes() > n and not folder.exists()


def test_cancel_leaves_the_scene_and_disk_as_they_were(panel):
    widget, scene, _ = panel
    n = scene.GetNumberOfNodes()
    widget._parameterNode.samples = 8  # long enough to still be running
    widget.onApplyButton()
    folder = widget._run.folder
    t0 = time.monotonic()
    widget.onApplyButton()  # the button reads "Cancel" now
    run_timer(widget, timeout=5)
    assert time.monotonic() - t0 < 2.5
    assert widget.ui.statusLabel.text.startswith("Cancelled") and widget._parameterNode.outputDose is None
    assert scene.GetNumberOfNodes() == n and not folder.exists()


def test_closing_the_scene_mid_run_stops_the_prediction(panel):
    widget, scene, _ = panel
    widget.onApplyButton()
    run = widget._run
    widget.onSceneStartClose(None, None)
    assert widget._run is None and not widget._timer.active and not run.folder.exists()
    assert "scene was closed" in widget.ui.statusLabel.text


def test_a_failure_in_the_child_is_one_message_and_no_node(panel):
    widget, scene, _ = panel
    widget._parameterNode.roiMapping = "{}"  # PTV_High is not recognised as PTV70 by itself
    n = scene.GetNumberOfNodes()
    widget.onApplyButton()
    run_timer(widget)
    status = widget.ui.statusLabel.text
    assert status.startswith("Prediction failed; the scene is unchanged.") and "PTV70" in status
    assert scene.GetNumberOfNodes() == n and widget._parameterNode.outputDose is None


def test_the_plan_qa_button_writes_the_report_and_names_the_flagged_organ(panel, monkeypatch, tmp_path):
    import numpy as np
    from slicer import util

    widget, scene, _ = panel
    widget.onApplyButton()
    run_timer(widget)
    p = widget._parameterNode
    assert not widget.ui.qaButton.enabled  # no plan dose yet
    cord = scene.GetFirstNodeByName("Structures").GetSegmentation().GetSegmentIdBySegmentName("SpinalCord")
    assert cord
    from DoseDiffMRML.logic import segment_masks

    mask = segment_masks(p.segmentation, p.outputDose)["SpinalCord"].array
    plan = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Plan")
    plan.CopyOrientation(p.outputDose)
    util.updateVolumeFromArray(plan, util.arrayFromVolume(p.outputDose) + 12.0 * mask.astype(np.float32))
    p.planDose = plan
    assert widget.ui.qaButton.enabled
    qt = sys.modules["qt"]
    monkeypatch.setattr(qt, "QFileDialog", types.SimpleNamespace(getExistingDirectory=lambda *a: str(tmp_path)),
                        raising=False)
    shown = []
    monkeypatch.setattr(widget, "_showComparison", lambda table, chart: shown.append(table))
    widget.onQaButton()
    assert widget.ui.statusLabel.text.startswith("Plan QA: 1 organ(s)")
    assert "SpinalCord (SpinalCord)" in widget.ui.statusLabel.text
    assert (tmp_path / "summary.html").is_file() and shown[0].GetNumberOfRows() == 1
