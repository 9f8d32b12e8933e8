"""Every SlicerRT call in DoseDiff/DoseDiffMRML/slicerrt.py exists in SlicerRT with that many arguments.

The adapter runs against recording stand-ins (no SlicerRT here); each recorded call on a
SlicerRT class is then looked up in ../shared/reference/slicerrt: a declaration in the
class's header (or a vtkSet/Get/BooleanMacro), or a method of the Python export plugin.
"""
import ast
import re
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_standins as standins  # noqa: E402

if not standins.SLICERRT.is_dir():
    pytest.skip(f"SlicerRT reference sources not found at {standins.SLICERRT}", allow_module_level=True)
slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(standins.REPO / "DoseDiff"))
from DoseDiffMRML import slicerrt  # noqa: E402

PLUGIN = standins.SLICERRT / "DicomRtImportExport" / "DicomRtImportExportPlugin.py"
# Slicer core methods SlicerRT's nodes inherit from vtkMRMLNode (no SlicerRT header declares them)
INHERITED = {"GetScene", "GetName", "GetID"}
# Calls the adapter makes on Slicer core classes: not SlicerRT, not in the reference; listed so a new one is noticed
CORE_CALLS = {("vtkMRMLScene", "AddNewNodeByClass"), ("vtkMRMLScene", "GenerateUniqueName"),
              ("vtkMRMLColorTableNode", "SetColorName"), ("vtkMRMLTableNode", "GetNodeReference"),
              ("vtkMRMLScalarVolumeNode", "GetScene"), ("vtkMRMLScalarVolumeNode", "GetName"),
              ("vtkMRMLSegmentationNode", "GetScene"), ("qSlicerDICOMExportable", "setTag")}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []


def probe_factory(rec: Recorder):
    returns = {
        "AddNewNodeByClass": lambda cls, *a: Probe(cls),
        "GenerateUniqueName": lambda name: name,
        "SetupColorTableNodeForDoseVolumeNode": lambda *a: Probe("vtkMRMLColorTableNode"),
        "GetColorTableNode": lambda *a: Probe("vtkMRMLColorTableNode"),
        "CreateDefaultDoseColorTable": lambda *a: Probe("vtkMRMLColorTableNode"),
        "CreateIsodoseSurfaces": lambda *a: True,
        "ComputeDvh": lambda *a: "",
        "GetMetricsTableNode": lambda *a: Probe("vtkMRMLTableNode"),
        "AssembleDvhNodeReference": lambda sid: f"DVH_{sid}",
        "GetNodeReference": lambda *a: Probe("vtkMRMLTableNode"),
        "AddDvhToChart": lambda *a: Probe("vtkMRMLPlotSeriesNode"),
        "ComputeGammaDoseDifference": lambda *a: "",
        "GetPassFractionPercent": lambda *a: 98.5,
        "GetName": lambda *a: "dose",
        "examineForExport": lambda *a: [Probe("qSlicerDICOMExportable")],
        "export": lambda *a: "",
    }

    class Probe:
        def __init__(self, cls: str) -> None:
            self.__dict__["_cls"] = cls

        def __getattr__(self, name: str):
            if name.startswith("_"):
                raise AttributeError(name)

            def call(*args):
                rec.calls.append((self._cls, name, len(args)))
                if name == "GetScene":
                    return Probe("vtkMRMLScene")
                return returns.get(name, lambda *a: None)(*args)
            return call

    return Probe


@pytest.fixture()
def recorded(monkeypatch):
    rec = Recorder()
    Probe = probe_factory(rec)
    logics = {"isodose": "vtkSlicerIsodoseModuleLogic", "dosevolumehistogram": "vtkSlicerDoseVolumeHistogramModuleLogic",
              "dosecomparison": "vtkSlicerDoseComparisonModuleLogic"}
    modules = types.SimpleNamespace(**{k: types.SimpleNamespace(logic=lambda c=c: Probe(c)) for k, c in logics.items()})
    monkeypatch.setattr(slicer, "modules", modules, raising=False)
    monkeypatch.setattr(slicer, "vtkSlicerIsodoseModuleLogic", Probe("vtkSlicerIsodoseModuleLogic"), raising=False)
    plugin = types.ModuleType("DicomRtImportExportPlugin")
    plugin.DicomRtImportExportPluginClass = lambda: Probe("DicomRtImportExportPluginClass")
    monkeypatch.setitem(sys.modules, "DicomRtImportExportPlugin", plugin)

    dose, plan = Probe("vtkMRMLScalarVolumeNode"), Probe("vtkMRMLScalarVolumeNode")
    seg = Probe("vtkMRMLSegmentationNode")
    slicerrt.dose_color_table(Probe("vtkMRMLScene"))
    iso = slicerrt.create_isodose(dose, (10, 20, 30, 40, 50, 60, 70))
    dvh = slicerrt.dvh_chart([plan, dose], seg, ["s1", "s2"], ["Empty"])
    gamma = slicerrt.gamma_pass_rate(dose, plan)
    error = slicerrt.export_rt_study([1, 2], "/out", "DoseDiff^CT", "DOSEDIFF-CT")
    return rec.calls, iso, dvh, gamma, error


def _split_params(text: str) -> list[str]:
    params, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "<(" and 1 or 0
        depth -= ch in ">)" and 1 or 0
        if ch == "," and depth == 0:
            params.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip() and cur.strip() != "void":
        params.append(cur)
    return params


def header_methods(cls: str) -> dict[str, tuple[int, int, str]]:
    """name -> (min args, max args, 'file:line') from a SlicerRT header, macros included."""
    found = list(standins.SLICERRT.rglob(f"{cls}.h"))
    if not found:
        return {}
    out: dict[str, tuple[int, int, str]] = {}
    rel = found[0].relative_to(standins.REFERENCE)
    for n, line in enumerate(found[0].read_text(errors="replace").splitlines(), 1):
        m = re.match(r"\s*vtk(Set|Get)(String)?Macro\((\w+)", line)
        if m:
            out.setdefault(m.group(1) + m.group(3), (1, 1, f"{rel}:{n}") if m.group(1) == "Set" else (0, 0, f"{rel}:{n}"))
            continue
        m = re.match(r"\s*vtkBooleanMacro\((\w+)", line)
        if m:
            for suffix in ("On", "Off"):
                out.setdefault(m.group(1) + suffix, (0, 0, f"{rel}:{n}"))
            continue
        m = re.match(r"\s*(?:static\s+|virtual\s+)?[\w:<>*&\s]+?[\s*&](\w+)\(([^)]*)\)", line)
        if m and not line.strip().startswith(("//", "/*", "*")):
            params = _split_params(m.group(2))
            out.setdefault(m.group(1), (sum("=" not in p for p in params), len(params), f"{rel}:{n}"))
    return out


def plugin_methods() -> dict[str, tuple[int, int, str]]:
    tree = ast.parse(PLUGIN.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DicomRtImportExportPluginClass")
    rel = PLUGIN.relative_to(standins.REFERENCE)
    return {f.name: (len(f.args.args) - 1 - len(f.args.defaults), len(f.args.args) - 1, f"{rel}:{f.lineno}")
            for f in cls.body if isinstance(f, ast.FunctionDef)}


def reference_for(cls: str) -> dict[str, tuple[int, int, str]]:
    return plugin_methods() if cls == "DicomRtImportExportPluginClass" else header_methods(cls)


def test_the_adapter_makes_the_expected_calls_and_returns_their_results(recorded):
    calls, iso, dvh, gamma, error = recorded
    assert ("vtkSlicerIsodoseModuleLogic", "SetNumberOfIsodoseLevels", 2) in calls
    assert ("vtkMRMLColorTableNode", "SetNumberOfColors", 1) not in calls  # never bypass SlicerRT's colour fill
    assert sum(c[1] == "SetColorName" for c in calls) == 7
    assert dvh.curves == 4 and dvh.notes == ["No DVH for empty segment 'Empty'."]  # 2 doses x 2 segments
    assert gamma == 98.5 and error == ""


def test_every_slicerrt_call_exists_with_that_many_arguments(recorded):
    calls = recorded[0]
    slicerrt_classes = {c for c, _, _ in calls if reference_for(c)}
    assert {"vtkSlicerIsodoseModuleLogic", "vtkMRMLIsodoseNode", "vtkSlicerDoseVolumeHistogramModuleLogic",
            "vtkMRMLDoseVolumeHistogramNode", "vtkMRMLDoseComparisonNode", "vtkSlicerDoseComparisonModuleLogic",
            "DicomRtImportExportPluginClass"} <= slicerrt_classes
    problems = []
    for cls, method, nargs in sorted(set(calls)):
        ref = reference_for(cls)
        if not ref:
            if (cls, method) not in CORE_CALLS:
                problems.append(f"{cls}.{method}: a Slicer core call not listed in CORE_CALLS")
            continue
        if method in INHERITED:
            continue
        if method not in ref:
            problems.append(f"{cls}.{method} is not declared in SlicerRT")
        elif not ref[method][0] <= nargs <= ref[method][1]:
            problems.append(f"{cls}.{method} called with {nargs} arguments; {ref[method][2]} takes "
                            f"{ref[method][0]}..{ref[method][1]}")
    assert not problems, "\n".join(problems)


def test_exportable_tags_are_set_the_way_slicerrts_plugin_sets_them():
    text = PLUGIN.read_text()
    assert re.search(r"exportable\.setTag\('\w+', '[^']*'\)", text)
    assert "def examineForExport(self,subjectHierarchyItemID)" in text


def test_the_header_parser_reads_what_it_must(recorded):
    """The parser is what the contract rests on: known declarations, counts and macros."""
    iso = header_methods("vtkSlicerIsodoseModuleLogic")
    assert iso["SetNumberOfIsodoseLevels"][:2] == (2, 2) and iso["CreateDefaultDoseColorTable"][:2] == (1, 1)
    dvh = header_methods("vtkSlicerDoseVolumeHistogramModuleLogic")
    assert dvh["ExportDvhToCsv"][:2] == (2, 3)
    node = header_methods("vtkMRMLDoseComparisonNode")
    assert node["SetDtaDistanceToleranceMm"][:2] == (1, 1) and node["GetPassFractionPercent"][:2] == (0, 0)
    assert "SetNumberOfColors" not in iso
