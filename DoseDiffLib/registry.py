"""The model registry: one list of named models that the CLI, the Slicer module and the worker read.

Models are named in `Resources/Models.json` (card paths relative to that file). The
registry is found beside the package in a source checkout or an installed Slicer
extension (`<lib>/DoseDiffLib` next to `<lib>/Resources`), and inside the package in a
wheel (`DoseDiffLib/Resources`). Scenes and commands store the model's name, so moving or
upgrading an installation does not break them.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DoseDiffError

REGISTRY_NAME = "Models.json"
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ModelEntry:
    name: str
    card: Path
    title: str
    description: str


def registry_path() -> Path:
    """Models.json: $DOSEDIFF_MODELS if set, else inside the package (wheel), else beside it (checkout, Slicer)."""
    env = os.environ.get("DOSEDIFF_MODELS")
    candidates = [Path(env)] if env else [_HERE / "Resources" / REGISTRY_NAME, _HERE.parent / "Resources" / REGISTRY_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise DoseDiffError(f"The model registry {REGISTRY_NAME} was not found (looked at "
                        f"{', '.join(str(p) for p in candidates)}).",
                        "Reinstall DoseDiff, or set DOSEDIFF_MODELS to a Models.json.")


def _read() -> tuple[str, list[ModelEntry]]:
    path = registry_path()
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = [ModelEntry(m["name"], (path.parent / m["card"]).resolve(), m.get("title", m["name"]),
                          m.get("description", "")) for m in data["models"]]
    names = [e.name for e in entries]
    if len(set(names)) != len(names) or data["default"] not in names:
        raise DoseDiffError(f"{path} lists a model twice or a default that is not listed.", "Fix the registry file.")
    return data["default"], entries


def list_models() -> list[ModelEntry]:
    return _read()[1]


def default_model() -> str:
    return _read()[0]


def model_names() -> list[str]:
    return [e.name for e in list_models()]


def resolve(name_or_card: str | os.PathLike) -> Path:
    """A registered model's card, or the given card path when it is a file."""
    text = str(name_or_card)
    for entry in list_models():
        if entry.name == text:
            if not entry.card.is_file():
                raise DoseDiffError(f"Model {text!r} is registered but its card {entry.card} is missing.",
                                    "Reinstall DoseDiff (the bundled model ships with it).")
            return entry.card
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists() or path.suffix or os.sep in text:  # a path: load_model says what is wrong with it
        return path
    raise DoseDiffError(f"{text!r} is neither a registered model ({', '.join(model_names())}) nor a model card file.",
                        "Give one of those names or the path of a model card (.json).")


def model_argument(value: str) -> Path:
    """argparse type for --model: a registered name or a card path."""
    try:
        return resolve(value)
    except DoseDiffError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
