"""OpenKBP patients in the challenge's sparse CSV layout, as oriented volumes.

OpenKBP arrays are (y, x, -z) in LPS terms: axis 0 runs anterior -> posterior, axis 1
right -> left, axis 2 superior -> inferior. We flip axis 2 and move it first, giving the
(z, y, x) LPS arrays every other module uses. `voxel_dimensions.csv` lists the spacing
in the file's axis order (y, x, z).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import POSSIBLE_DOSE, ROIS
from .errors import DoseDiffError
from .volume import Volume, atomic_write

SHAPE = (128, 128, 128)
CT_OFFSET = 1024.0


@dataclass
class OpenKBPPatient:
    pid: str
    ct: Volume               # HU
    masks: dict[str, Volume]  # present ROIs only, uint8
    possible_dose: Volume
    dose: Volume | None      # Gy, the clinical plan


def from_openkbp_axes(arr: np.ndarray) -> np.ndarray:
    """(y, x, -z) file order -> (z, y, x)."""
    return np.ascontiguousarray(np.transpose(arr[:, :, ::-1], (2, 0, 1)))


def to_openkbp_axes(arr: np.ndarray) -> np.ndarray:
    """(z, y, x) -> (y, x, -z) file order."""
    return np.ascontiguousarray(np.transpose(arr, (1, 2, 0))[:, :, ::-1])


def _read_sparse(path: Path, with_values: bool) -> np.ndarray:
    try:
        data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2,
                          usecols=(0, 1) if with_values else (0,), dtype=np.float64)
    except (ValueError, OSError) as exc:
        raise DoseDiffError(f"Cannot parse OpenKBP file {path}: {str(exc).rstrip('.')}.",
                            "Check that it is an unmodified OpenKBP CSV (header ',data').") from None
    flat = np.zeros(int(np.prod(SHAPE)), np.float32)
    if data.size:
        idx = data[:, 0].astype(np.int64)
        if idx.min() < 0 or idx.max() >= flat.size:
            raise DoseDiffError(f"{path} indexes voxels outside the 128^3 OpenKBP grid.",
                                "The file is not in OpenKBP format.")
        flat[idx] = data[:, 1] if with_values else 1.0
    return flat.reshape(SHAPE)


def read_spacing(folder: Path) -> tuple[float, float, float]:
    f = folder / "voxel_dimensions.csv"
    if not f.exists():
        raise DoseDiffError(f"{folder} has no voxel_dimensions.csv.",
                            "Point to an OpenKBP patient folder (pt_N).")
    try:
        values = np.loadtxt(f, ndmin=1).astype(float)
    except ValueError as exc:
        raise DoseDiffError(f"Cannot parse {f}: {exc}.", "It must hold three voxel sizes in mm (y x z).") from None
    if values.shape != (3,) or not (np.isfinite(values) & (values > 0)).all():
        raise DoseDiffError(f"{f} must hold three positive voxel sizes in mm, not {values.tolist()}.",
                            "Restore the file from the OpenKBP data.")
    sy, sx, sz = values
    return (float(sx), float(sy), float(sz))


def read_patient(folder: str | os.PathLike, with_dose: bool = True) -> OpenKBPPatient:
    folder = Path(folder)
    if not folder.is_dir():
        raise DoseDiffError(f"OpenKBP patient folder {folder} not found.", "Check the path and its spelling.")
    if not (folder / "ct.csv").exists():
        raise DoseDiffError(f"{folder} has no ct.csv.", "Point to an OpenKBP patient folder (pt_N).")
    spacing = read_spacing(folder)

    def vol(arr: np.ndarray, dtype) -> Volume:
        return Volume(from_openkbp_axes(arr).astype(dtype), spacing)

    ct = vol(np.clip(_read_sparse(folder / "ct.csv", True), 0, 4095) - CT_OFFSET, np.float32)
    masks = {r: vol(_read_sparse(folder / f"{r}.csv", False), np.uint8)
             for r in ROIS if (folder / f"{r}.csv").exists()}
    pdm_file = folder / f"{POSSIBLE_DOSE}.csv"
    if not pdm_file.exists():
        raise DoseDiffError(f"{folder} has no {POSSIBLE_DOSE}.csv.", "The patient folder is incomplete.")
    pdm = vol(_read_sparse(pdm_file, False), np.uint8)
    dose = None
    if with_dose and (folder / "dose.csv").exists():
        dose = vol(_read_sparse(folder / "dose.csv", True), np.float32)
    return OpenKBPPatient(folder.name, ct, masks, pdm, dose)


def read_dose_csv(path: str | os.PathLike) -> np.ndarray:
    """A dose in OpenKBP's sparse CSV (a prediction or dose.csv), as (z, y, x) Gy."""
    return from_openkbp_axes(_read_sparse(Path(path), True))


def write_dose_csv(dose: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a dose on the OpenKBP grid as the challenge's sparse submission CSV."""
    if dose.array.shape != SHAPE:
        raise DoseDiffError(f"OpenKBP dose CSVs hold a 128^3 grid, got {dose.array.shape}.",
                            "Write NRRD for doses on other grids.")
    flat = to_openkbp_axes(dose.array).ravel()
    nz = np.flatnonzero(flat)

    def writer(p: Path) -> None:
        with open(p, "w") as fh:
            fh.write(",data\n")
            np.savetxt(fh, np.column_stack([nz, flat[nz]]), fmt=["%d", "%.6g"], delimiter=",")

    return atomic_write(path, writer, overwrite)


def patient_folders(root: str | os.PathLike) -> list[Path]:
    """Patient folders under root, in numeric order (pt_2 before pt_10)."""
    root = Path(root)
    if not root.is_dir():
        raise DoseDiffError(f"OpenKBP folder {root} not found.", "Give a pt_N folder or a split folder of them.")
    found = [p for p in root.iterdir() if p.is_dir() and (p / "ct.csv").exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else 0)
