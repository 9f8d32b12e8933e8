"""A child Python process that reports progress lines; Qt-free so it is tested without Slicer.

The widget polls `poll()` from a QTimer: Slicer's event loop never waits on the child.
`cancel()` kills the child's whole process group (a new session on POSIX, `taskkill /T`
on Windows), so worker threads or helpers it started die with it.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "DOSEDIFF "  # DoseDiffLib.worker.PREFIX; repeated so this file imports nothing heavy


@dataclass
class Event:
    """progress (done, total, message), result (dose, std, info) or error (problem, fix)."""
    kind: str
    data: dict = field(default_factory=dict)


def describe_exit(returncode: int) -> str:
    """Why a child ended without reporting, in words a user can act on."""
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = " The system may have run out of memory." if sig == getattr(signal, "SIGKILL", 9) else ""
        return f"The prediction process was killed ({name}).{hint}"
    return f"The prediction process stopped unexpectedly (exit code {returncode})."


class ChildProcess:
    """One child process: start, poll its protocol lines, cancel it with its process tree."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = Path(log_path)
        self.env = env
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._finished = False
        self._reported = False
        self.cancelled = False

    def start(self) -> None:
        self._log = open(self.log_path, "w", encoding="utf-8")
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        self._proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                      env=self.env, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def finished(self) -> bool:
        return self._finished

    def poll(self) -> list[Event]:
        """Events since the last call; the last one of a run is always a result or an error."""
        events: list[Event] = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._finished = True
                break
            if line.startswith(PREFIX):
                try:
                    payload = json.loads(line[len(PREFIX):])
                except json.JSONDecodeError:
                    continue
                kind = payload.pop("event", "")
                if kind in ("result", "error"):
                    self._reported = True
                events.append(Event(kind, payload))
        if self._finished and self._proc is not None:
            code = self._proc.wait()
            self._log.close()
            if self.cancelled:  # a result that raced the cancel is dropped: the user asked for no change
                events = [e for e in events if e.kind == "progress"] + [Event("cancelled")]
            elif not self._reported:
                events.append(Event("error", {"problem": describe_exit(code), "fix": self.log_tail()}))
            elif code != 0 and not any(e.kind == "error" for e in events):
                events = [e for e in events if e.kind != "result"]
                events.append(Event("error", {"problem": describe_exit(code), "fix": self.log_tail()}))
            self._reported = True
            self._proc = None
        return events

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def cancel(self, timeout: float = 2.0) -> None:
        """Kill the child and everything it started; returns once it is gone (or after timeout)."""
        proc = self._proc
        if proc is None or proc.poll() is not None and self._finished:
            return
        self.cancelled = True
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, timeout=timeout)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            proc.kill()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def wait_events(self, timeout: float) -> list[Event]:
        """Poll until finished or timeout (for scripts and tests; the GUI polls from a timer)."""
        events: list[Event] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            events += self.poll()
            if self._proc is None:
                break
            time.sleep(0.02)
        return events


def python_executable() -> str:
    """Slicer's own interpreter for children (PythonSlicer), else the current one."""
    import shutil

    exe_dir = Path(sys.executable).parent
    for name in ("PythonSlicer.exe", "PythonSlicer"):
        candidate = exe_dir / name
        if candidate.exists():
            return str(candidate)
    return shutil.which("PythonSlicer") or sys.executable


def child_environment(library_parent: Path) -> dict[str, str]:
    """The current environment with the folder holding DoseDiffLib first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(library_parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env
