"""The module's .ui bound to its parameter node by Slicer's own parameterNodeWrapper.

Slicer's GUI connectors (../shared/reference) decide which Python type each widget class
accepts; a wrong annotation makes Widget.setup() raise before the panel appears. Here the
.ui is built from stand-in widgets of the classes it names and bound exactly as
connectGui binds it, on real MRML (slicer-core).
"""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import slicer_standins as standins  # noqa: E402

if standins.reference_missing_reason():
    pytest.skip(standins.reference_missing_reason(), allow_module_level=True)
slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core MRML not available", allow_module_level=True)


@pytest.fixture()
def module(monkeypatch):
    """DoseDiff/DoseDiff.py imported over Slicer's reference code, with a fresh scene as slicer.mrmlScene."""
    standins.install(monkeypatch)
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.delitem(sys.modules, "DoseDiff", raising=False)
    import DoseDiff

    monkeypatch.delitem(sys.modules, "DoseDiff")
    return DoseDiff, scene


def ui_defaults(xml, name):
    """What the .ui itself says about a widget: Qt's spin box range defaults unless set."""
    elem = next(w for w in xml.iter("widget") if w.get("name") == name)
    props = {p.get("name"): standins._ui_value(p) for p in elem.findall("property")}
    items = [standins._ui_value(i.find("property")) for i in elem.findall("item")]
    return {"minimum": props.get("minimum", 0), "maximum": props.get("maximum", 99), "items": items}


def bind(module):
    DoseDiff, scene = module
    root, widgets, xml = standins.build_ui()
    for w in widgets.values():
        if isinstance(w, standins.qMRMLNodeComboBox):
            w.setMRMLScene(scene)
    node = DoseDiff.DoseDiffParameterNode(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
    tag = node.connectGui(root)
    return node, tag, widgets, xml


def test_every_parameter_widget_binds(module):
    node, tag, widgets, _ = bind(module)
    named = {w.property("SlicerParameterName") for w in widgets.values() if w.property("SlicerParameterName")}
    assert named and set(node._parameterGUIs[tag]) == named


def test_spin_box_ranges_and_combo_box_choices_from_the_ui_survive(module):
    before = {n: ui_defaults(standins.build_ui()[2], n) for n in ("stepsSpinBox", "samplesSpinBox", "seedSpinBox",
                                                                  "deviceComboBox", "modelComboBox")}
    _, _, widgets, _ = bind(module)
    for name in ("stepsSpinBox", "samplesSpinBox", "seedSpinBox"):
        w = widgets[name]
        assert (w.minimum, w.maximum) == (before[name]["minimum"], before[name]["maximum"]), name
    for name in ("deviceComboBox", "modelComboBox"):
        w = widgets[name]
        assert [w.itemText(i) for i in range(w.count())] == before[name]["items"], name


def test_values_flow_both_ways(module):
    node, _, widgets, _ = bind(module)
    widgets["samplesSpinBox"].value = 4
    assert node.samples == 4
    widgets["deviceComboBox"].currentIndex = [widgets["deviceComboBox"].itemText(i)
                                              for i in range(widgets["deviceComboBox"].count())].index("cpu")
    assert node.device == "cpu"
    widgets["modelPathLineEdit"].currentPath = "/models/mine.json"
    assert node.modelCard == pathlib.Path("/models/mine.json")
    node.steps = 12
    assert widgets["stepsSpinBox"].value == 12
    node.roiMapping = '{"PTV70": "ptv_high"}'
    assert widgets["roiMappingEdit"].text == '{"PTV70": "ptv_high"}'


def test_output_selectors_start_empty_even_with_a_ct_in_the_scene(module):
    DoseDiff, scene = module
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    node, _, widgets, _ = bind(module)
    assert widgets["inputVolumeSelector"].currentNode() is ct
    for name, param in (("outputDoseSelector", "outputDose"), ("planDoseSelector", "planDose")):
        assert widgets[name].noneEnabled, name
        assert widgets[name].currentNode() is None and getattr(node, param) is None, name


def test_the_scene_stores_the_model_name_not_a_path(module):
    node, _, widgets, _ = bind(module)
    stored = node.parameterNode.GetParameter("model")
    assert stored and "/" not in stored and "\\" not in stored
    assert node.parameterNode.GetParameter("modelCard") in ("", ".")
