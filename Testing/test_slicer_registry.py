"""One model registry for the CLI, the module, a wheel install and the installed extension."""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from DoseDiffLib import registry
from DoseDiffLib.cli import build_parser
from DoseDiffLib.errors import DoseDiffError

REPO = Path(__file__).resolve().parents[1]


def test_default_model_resolves_to_the_bundled_card():
    card = registry.resolve(registry.default_model())
    assert card.is_file() and card.parent.parent == REPO / "Resources"
    assert registry.default_model() in registry.model_names()


def test_cli_model_defaults_to_the_registry_and_accepts_names_and_paths(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["predict", "--ct", "ct.nrrd", "--out", "d.nrrd"])
    assert args.model == registry.resolve(registry.default_model())
    card = tmp_path / "mine.json"
    card.write_text("{}")
    assert parser.parse_args(["predict", "--ct", "c", "--out", "d", "--model", str(card)]).model == card
    with pytest.raises(DoseDiffError, match="neither a registered model"):   # one line, never a traceback
        parser.parse_args(["predict", "--ct", "c", "--out", "d", "--model", "no-such-model"])


def test_unknown_name_says_which_names_exist():
    with pytest.raises(DoseDiffError, match=registry.default_model()):
        registry.resolve("no-such-model")


def _resolve_in(site: Path) -> str:
    code = "from DoseDiffLib import registry; print(registry.resolve(registry.default_model()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=site, env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _copy_library(dest: Path) -> None:
    shutil.copytree(REPO / "DoseDiffLib", dest / "DoseDiffLib", ignore=shutil.ignore_patterns("__pycache__", "*.txt"))


def test_wheel_layout_from_pyproject_finds_the_bundled_model(tmp_path):
    """Lay the package out as pyproject.toml's package-dir/package-data put it in a wheel."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "DoseDiffLib.Resources" in cfg["packages"]
    source = REPO / cfg["package-dir"]["DoseDiffLib.Resources"]
    _copy_library(tmp_path)
    for pattern in cfg["package-data"]["DoseDiffLib.Resources"]:
        for f in source.glob(pattern):
            target = tmp_path / "DoseDiffLib" / "Resources" / f.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    found = Path(_resolve_in(tmp_path))
    assert found == tmp_path / "DoseDiffLib" / "Resources" / "Models" / "dosediff-openkbp.json"


def test_extension_layout_from_cmake_finds_the_bundled_model(tmp_path):
    """The installed extension: <lib>/DoseDiffLib beside <lib>/Resources/{Models.json, Models/} (CMakeLists.txt)."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "Resources/Models.json" in cmake and "QTSCRIPTEDMODULES_LIB_DIR}/Resources/Models" in cmake
    _copy_library(tmp_path)
    (tmp_path / "Resources" / "Models").mkdir(parents=True)
    shutil.copy(REPO / "Resources" / "Models.json", tmp_path / "Resources")
    for f in (REPO / "Resources" / "Models").iterdir():
        shutil.copy(f, tmp_path / "Resources" / "Models")
    assert Path(_resolve_in(tmp_path)) == tmp_path / "Resources" / "Models" / "dosediff-openkbp.json"


def test_the_module_offers_registry_models_first_and_survives_a_broken_registry(monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO / "DoseDiff"))
    from DoseDiffMRML.logic import CUSTOM_MODEL, model_choices

    assert model_choices() == [registry.default_model()] + [n for n in registry.model_names()
                                                            if n != registry.default_model()] + [CUSTOM_MODEL]
    broken = tmp_path / "Models.json"
    broken.write_text("{not json")
    monkeypatch.setenv("DOSEDIFF_MODELS", str(broken))
    assert model_choices() == [CUSTOM_MODEL]


def test_the_registry_file_follows_its_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import json

    schema = json.loads((REPO / "Resources" / "Models.schema.json").read_text())
    jsonschema.validate(json.loads((REPO / "Resources" / "Models.json").read_text()), schema)
