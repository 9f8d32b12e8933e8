"""The background runner: progress lines, result, cancel of the whole tree, crash and kill of the child.

Qt-free (the module polls it from a QTimer), so it is tested with plain child scripts and,
at the end, with the real DoseDiffLib.worker on slicer-core's MRML.
"""
import json
import os
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DoseDiff"))
from DoseDiffMRML.process import PREFIX, ChildProcess, describe_exit  # noqa: E402

from DoseDiffLib import worker  # noqa: E402


def child(tmp_path: Path, body: str) -> ChildProcess:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    proc = ChildProcess([sys.executable, str(script)], tmp_path / "child.log")
    proc.start()
    return proc


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def test_protocol_prefix_is_the_workers():
    assert PREFIX == worker.PREFIX


def test_progress_and_result_are_parsed_and_other_output_ignored(tmp_path):
    proc = child(tmp_path, f"""
        import json
        print("some library chatter")
        for i in range(3):
            print({PREFIX!r} + json.dumps({{"event": "progress", "done": i + 1, "total": 3, "message": "step"}}), flush=True)
        print({PREFIX!r} + json.dumps({{"event": "result", "dose": "d.nrrd", "std": None, "info": {{"seed": 1}}}}))
    """)
    events = proc.wait_events(20)
    assert [e.kind for e in events] == ["progress"] * 3 + ["result"]
    assert events[2].data == {"done": 3, "total": 3, "message": "step"}
    assert events[-1].data["info"] == {"seed": 1}


def test_cancel_kills_the_process_tree_within_two_seconds(tmp_path):
    proc = child(tmp_path, f"""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print({PREFIX!r} + '{{"event": "progress", "done": 0, "total": 1, "message": "pid ' + str(grandchild.pid) + '"}}',
              flush=True)
        time.sleep(60)
    """)
    events = []
    deadline = time.monotonic() + 20
    while not events and time.monotonic() < deadline:
        events = proc.poll()
        time.sleep(0.02)
    grandchild = int(events[0].data["message"].split()[1])
    pid = proc.pid
    t0 = time.monotonic()
    proc.cancel()
    tail = proc.wait_events(2)
    assert time.monotonic() - t0 < 2.0
    assert [e.kind for e in tail] == ["cancelled"]
    for p in (pid, grandchild):
        for _ in range(50):
            if not alive(p):
                break
            time.sleep(0.02)
        assert not alive(p), p


def test_a_crash_without_a_report_is_one_error_with_the_log_tail(tmp_path):
    proc = child(tmp_path, """
        raise RuntimeError("weights are corrupt")
    """)
    events = proc.wait_events(20)
    assert [e.kind for e in events] == ["error"]
    assert "exit code 1" in events[0].data["problem"] and "weights are corrupt" in events[0].data["fix"]


def test_a_killed_child_is_reported_as_possibly_out_of_memory(tmp_path):
    proc = child(tmp_path, """
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    events = proc.wait_events(20)
    assert [e.kind for e in events] == ["error"]
    assert "SIGKILL" in events[0].data["problem"] and "memory" in events[0].data["problem"]


def test_describe_exit_names_signals_and_codes():
    assert "exit code 3" in describe_exit(3)
    assert "SIGTERM" in describe_exit(-signal.SIGTERM)


def test_worker_reports_a_users_error_as_one_line(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": str(tmp_path / "missing.json"), "ct": "x", "structures": "y"}))
    assert worker.main([str(job)]) == 2
    lines = [json.loads(line[len(PREFIX):]) for line in capsys.readouterr().out.splitlines() if line.startswith(PREFIX)]
    assert lines[-1]["event"] == "error" and "missing.json" in lines[-1]["problem"]


def test_worker_reports_out_of_memory_plainly(tmp_path, capsys, monkeypatch):
    def boom(job):
        raise MemoryError()

    monkeypatch.setattr(worker, "run", boom)
    job = tmp_path / "job.json"
    job.write_text("{}")
    assert worker.main([str(job)]) == 3
    last = capsys.readouterr().out.splitlines()[-1]
    assert "out of memory" in json.loads(last[len(PREFIX):])["problem"]


slicer = pytest.importorskip("slicer")
if hasattr(slicer, "vtkMRMLScene"):
    from test_slicer_logic import converter_rules, make_scene  # noqa: E402,F401 (autouse fixture)


def dosediff_temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("DoseDiff-*")}


def test_cancelled_prediction_leaves_scene_and_temp_folder_clean(test_card):
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core MRML not available")
    from DoseDiffMRML.logic import DoseDiffMRMLLogic

    scene, node, seg, *_ = make_scene()
    n_nodes, temps = scene.GetNumberOfNodes(), dosediff_temp_dirs()
    run = DoseDiffMRMLLogic().start_prediction(node, seg, str(test_card), steps=50, samples=4)
    assert run.folder.is_dir() and (run.folder / "ct.nrrd").is_file()
    run.process.cancel()
    assert [e.kind for e in run.process.wait_events(5)][-1] == "cancelled"
    run.close()
    assert scene.GetNumberOfNodes() == n_nodes and dosediff_temp_dirs() == temps


def test_a_result_for_a_ct_removed_meanwhile_is_dropped_cleanly(test_card):
    """Closing the scene mid-run: the result must not land in the new scene, and the files go."""
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core MRML not available")
    from DoseDiffLib.errors import DoseDiffError
    from DoseDiffMRML.logic import DoseDiffMRMLLogic

    scene, node, seg, *_ = make_scene()
    logic = DoseDiffMRMLLogic()
    run = logic.start_prediction(node, seg, str(test_card), steps=1)
    result = next(e for e in run.process.wait_events(120) if e.kind == "result")
    scene.RemoveNode(node)
    n_nodes = scene.GetNumberOfNodes()
    with pytest.raises(DoseDiffError, match="removed"):
        logic.load_result(run, result.data)
    assert scene.GetNumberOfNodes() == n_nodes and not run.folder.exists()


def test_a_result_that_races_the_cancel_is_dropped(tmp_path):
    proc = child(tmp_path, f"""
        print({PREFIX!r} + '{{"event": "result", "dose": "d.nrrd", "std": null, "info": {{}}}}', flush=True)
    """)
    deadline = time.monotonic() + 20
    while proc._proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.cancel()  # the user clicked Cancel as the child finished
    assert [e.kind for e in proc.wait_events(5)] == ["cancelled"]
