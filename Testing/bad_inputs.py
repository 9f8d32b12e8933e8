"""Builders for the bad-input catalogue: small but complete cases in every input format.

Each builder writes a valid case; the catalogue then breaks one thing at a time, so a
refusal can only come from that one thing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from DoseDiffLib import openkbp
from DoseDiffLib.dicomrt import read_dicom, write_rtdose
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.volume import Volume, write_segmentation, write_volume
from dicom_synth import square, write_ct, write_rtstruct


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones included) with a digest of its content or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def image_case(root: Path) -> tuple[Path, Path]:
    """A small phantom CT (NRRD) and its structures (.seg.nrrd)."""
    ct, masks = head_and_neck(shape=(24, 64, 64), spacing=(3.2, 3.2, 3.0))
    write_volume(ct, root / "ct.nrrd")
    write_segmentation(masks, root / "s.seg.nrrd")
    return root / "ct.nrrd", root / "s.seg.nrrd"


def copy_card(card: Path, folder: Path) -> Path:
    """A private copy of a model card and its weights, free to be damaged."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(card, folder / card.name)
    shutil.copy(card.with_suffix(".safetensors"), folder / card.with_suffix(".safetensors").name)
    return folder / card.name


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _write_sparse(path: Path, arr_zyx: np.ndarray) -> None:
    flat = openkbp.to_openkbp_axes(arr_zyx).ravel()
    nz = np.flatnonzero(flat)
    with open(path, "w") as fh:
        fh.write(",data\n")
        np.savetxt(fh, np.column_stack([nz, flat[nz]]), fmt=["%d", "%.6g"], delimiter=",")


def openkbp_patient(folder: Path, with_dose: bool = True) -> Path:
    """A synthetic OpenKBP patient: a box of soft tissue with a PTV70 in it, 70 Gy inside."""
    folder.mkdir(parents=True)
    body = np.zeros(openkbp.SHAPE, np.float32)
    body[40:90, 30:100, 30:100] = 1
    ptv = np.zeros_like(body)
    ptv[55:70, 55:75, 55:75] = 1
    _write_sparse(folder / "ct.csv", body * 1024.0)
    _write_sparse(folder / "possible_dose_mask.csv", body)
    _write_sparse(folder / "PTV70.csv", ptv)
    if with_dose:
        _write_sparse(folder / "dose.csv", body * 20.0 + ptv * 50.0)
    (folder / "voxel_dimensions.csv").write_text("3.906\n3.906\n2.5\n")
    return folder


def openkbp_prediction(patient: Path, out: Path, change=None) -> Path:
    """The reference dose written back as a prediction, optionally altered."""
    dose = openkbp.read_patient(patient).dose.array.copy()
    if change is not None:
        change(dose)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_sparse(out, dose)
    return out


def dicom_case(folder: Path) -> Path:
    """CT series, RTSTRUCT (BODY, PTV70) and the plan's RTDOSE of one synthetic patient."""
    hu = np.full((12, 40, 40), -1000.0)
    hu[:, 8:32, 8:32] = 20.0
    hu[:, 18:22, 18:22] = 700.0
    study, frame, zs = write_ct(folder, hu, "HFS")
    cx, cy = -60.0 + 2.0 * 20, -80.0 + 1.5 * 20  # column spacing 2.0 mm along x, row spacing 1.5 mm along y
    rois = {"BODY": [square(cx, cy, z, 22.0) for z in zs], "PTV70": [square(cx, cy, z, 8.0) for z in zs[3:9]]}
    write_rtstruct(folder, study, frame, rois)
    case = read_dicom(folder)
    z, y, x = np.indices(case.ct.array.shape)
    dose = 70.0 * np.exp(-((x - 20) ** 2 + (y - 20) ** 2 + (z - 6) ** 2) / 80.0)
    write_rtdose(case.ct.with_array(dose.astype(np.float32)), case.ct_datasets, folder, "plan")
    return folder


def dicom_prediction(folder: Path, out: Path, scale: float = 0.9) -> Path:
    """A dose image on the DICOM case's CT grid: the plan dose scaled."""
    case = read_dicom(folder)
    write_volume(case.ct.with_array((case.reference_dose.array * scale).astype(np.float32)), out)
    return out


def nrrd_with_header(path: Path, header: str, data: np.ndarray) -> Path:
    """A hand-written NRRD, for headers SimpleITK would refuse to write."""
    path.write_bytes(header.encode() + b"\n" + data.astype("<f4").tobytes())
    return path


def volume_like(ct: Path, out: Path, change) -> Path:
    from DoseDiffLib.volume import read_volume

    vol = read_volume(ct)
    arr = vol.array.astype(np.float32).copy()
    arr = change(arr)
    write_volume(Volume(arr, vol.spacing, vol.origin, vol.direction), out)
    return out
