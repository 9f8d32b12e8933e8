"""Which Python packages the prediction child needs, checked without importing them.

Importing torch inside Slicer's own process would load CUDA libraries at the first
click and lock their files against PyTorchUtils' reinstall; the version is read from the
installed package metadata instead, and only the child process imports torch.
"""
from __future__ import annotations

import importlib.metadata
import re

MIN_TORCH = "2.1"  # pyproject.toml: torch>=2.1
PYTHON_PACKAGES = {"safetensors": "safetensors", "tqdm": "tqdm", "scipy": "scipy", "SimpleITK": "SimpleITK",
                   "pydicom": "pydicom", "matplotlib": "matplotlib"}  # distribution -> import name


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_problem(version: str | None, minimum: str = MIN_TORCH) -> str:
    """What is wrong with the installed PyTorch, or "" when it is recent enough."""
    if version is None:
        return "PyTorch is not installed."
    if _version_tuple(version) < _version_tuple(minimum):
        return f"PyTorch {version} is installed; DoseDiff needs {minimum} or newer."
    return ""


def missing_packages() -> list[str]:
    """Distributions the child needs that are not installed."""
    return [dist for dist in PYTHON_PACKAGES if installed_version(dist) is None]
