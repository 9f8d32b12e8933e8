"""Static checks of the Slicer extension: packaging lists, .ui names, parameter node fields."""
import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "DoseDiff"


def cmake_list(path: Path, variable: str) -> set[str]:
    text = path.read_text()
    m = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert m, f"{variable} not found in {path}"
    return {w.replace("${MODULE_NAME}", "DoseDiff") for w in m.group(1).split()}


def test_every_module_script_and_resource_is_listed():
    scripts = cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert on_disk == scripts
    resources = cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    files = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert files == resources


def test_every_library_script_is_listed():
    listed = cmake_list(REPO / "DoseDiffLib" / "CMakeLists.txt", "DOSEDIFFLIB_PYTHON_SCRIPTS")
    on_disk = {p.name for p in (REPO / "DoseDiffLib").glob("*.py")}
    assert on_disk == listed


def ui_widgets():
    root = ET.parse(MODULE / "Resources" / "UI" / "DoseDiff.ui").getroot()
    names, params = set(), {}
    for w in root.iter("widget"):
        names.add(w.get("name"))
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                params[w.get("name")] = prop.find("string").text
    return names, params


def module_ast():
    return ast.parse((MODULE / "DoseDiff.py").read_text())


def test_widget_names_used_exist_in_the_ui():
    names, _ = ui_widgets()
    used = {n.attr for n in ast.walk(module_ast()) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"
            and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    assert used and used <= names, used - names


def test_parameter_names_match_parameter_node_fields():
    _, params = ui_widgets()
    cls = next(n for n in ast.walk(module_ast()) if isinstance(n, ast.ClassDef) and n.name == "DoseDiffParameterNode")
    fields = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}
    assert set(params.values()) <= fields, set(params.values()) - fields
    assert len(set(params.values())) == len(params)  # one widget per field


def test_module_follows_the_template_and_imports_torch_lazily():
    tree = module_ast()
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"DoseDiff", "DoseDiffWidget", "DoseDiffLogic", "DoseDiffTest", "DoseDiffParameterNode"} <= classes
    top_imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                   for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    assert "torch" not in top_imports and "DoseDiffLib" not in top_imports


def test_extension_description_files_agree():
    cmake = (REPO / "CMakeLists.txt").read_text()
    s4ext = dict(line.split(" ", 1) for line in (REPO / "DoseDiff.s4ext").read_text().splitlines()
                 if line and not line.startswith("#"))
    index = json.loads((REPO / "DoseDiff.json").read_text())
    assert 'set(EXTENSION_CATEGORY "Radiotherapy")' in cmake and s4ext["category"] == index["category"] == "Radiotherapy"
    depends = re.search(r'set\(EXTENSION_DEPENDS "(.*?)"\)', cmake).group(1).split()
    # SlicerRT is optional everywhere: not an extension dependency, and reached only through slicerrt.py
    assert depends == s4ext["depends"].split() == index["build_dependencies"] == ["PyTorch"]
    assert (MODULE / "DoseDiff.py").read_text().count("parent.dependencies = []") == 1
    callers = [p.name for p in MODULE.rglob("*.py") if re.search(r"slicer\.modules\.(isodose|dosevolumehistogram|"
                                                                  r"dosecomparison|dicomrtimportexport)", p.read_text())]
    assert callers == ["slicerrt.py"]
    assert s4ext["scmurl"] == index["scm_url"]
    assert "add_subdirectory(DoseDiff)" in cmake and "add_subdirectory(DoseDiffLib)" in cmake
    assert (REPO / "LICENSE").exists()
    from PIL import Image

    for icon in (REPO / "Resources" / "Icons" / "DoseDiff.png", MODULE / "Resources" / "Icons" / "DoseDiff.png"):
        assert Image.open(icon).size == (128, 128)


def test_icon_and_screenshot_urls_point_at_files_in_the_repository():
    cmake = (REPO / "CMakeLists.txt").read_text()
    s4ext = (REPO / "DoseDiff.s4ext").read_text()
    urls = re.findall(r'set\(EXTENSION_(?:ICONURL|SCREENSHOTURLS) "(.*?)"\)', cmake)
    urls += re.findall(r"^(?:iconurl|screenshoturls) (\S+)", s4ext, re.M)
    assert len(urls) == 4
    for url in urls:
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url
    assert "library-rendering" in urls[1]  # named for what it is until a real screenshot exists


def test_minimum_slicer_version_is_stated_alike():
    module = (MODULE / "DoseDiff.py").read_text()
    version = re.search(r'MIN_SLICER = "(.*?)"', module).group(1)
    assert f"Minimum Slicer: {version}" in (REPO / "CMakeLists.txt").read_text()
    assert f"Slicer {version}" in (REPO / "README.md").read_text()
