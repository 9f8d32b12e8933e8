"""What Slicer does when it starts: import DoseDiff/DoseDiff.py. Nothing heavy, old Pythons refused clearly."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_standins as standins  # noqa: E402

if standins.reference_missing_reason():
    pytest.skip(standins.reference_missing_reason(), allow_module_level=True)
pytest.importorskip("slicer")

sys.path.insert(0, str(standins.REPO / "DoseDiff"))
from DoseDiffMRML import dependencies  # noqa: E402

HEAVY = ("torch", "SimpleITK", "scipy", "pydicom", "matplotlib", "DoseDiffLib.predict", "DoseDiffLib.volume")

IMPORT_MODULE = f"""
import json, sys
sys.path.insert(0, {str(standins.REPO / 'Testing')!r})
import pytest, slicer, slicer_standins
mp = pytest.MonkeyPatch()
slicer_standins.install(mp)
slicer.mrmlScene = slicer.vtkMRMLScene()
import DoseDiff
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def test_importing_the_module_loads_no_heavy_library():
    """In a fresh interpreter, as at Slicer start-up: torch and SimpleITK wait for the first prediction."""
    out = subprocess.run([sys.executable, "-c", IMPORT_MODULE], capture_output=True, text=True, timeout=120,
                         cwd=standins.REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_an_old_python_is_refused_with_the_minimum_slicer_version(monkeypatch):
    standins.install(monkeypatch)
    monkeypatch.setattr(sys, "version_info", (3, 9, 18, "final", 0))
    monkeypatch.delitem(sys.modules, "DoseDiff", raising=False)
    with pytest.raises(ImportError, match=r"3D Slicer 5\.10 or newer.*Python 3\.9"):
        import DoseDiff  # noqa: F401
    monkeypatch.delitem(sys.modules, "DoseDiff", raising=False)


@pytest.mark.parametrize("version, problem", [(None, "not installed"), ("1.13.1+cu117", "needs 2.1"),
                                              ("2.1.0", ""), ("2.13.0+cpu", "")])
def test_torch_version_check(version, problem):
    message = dependencies.torch_problem(version)
    assert (problem in message) if problem else message == ""


def test_torch_is_checked_without_importing_it():
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'DoseDiff');"
                          "from DoseDiffMRML import dependencies as d; d.torch_problem(d.installed_version('torch'));"
                          "d.missing_packages(); print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60, cwd=standins.REPO)
    assert out.stdout.strip() == "False", out.stderr[-1000:]
