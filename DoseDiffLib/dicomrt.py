"""DICOM RT in and out: CT series, RTSTRUCT, RTDOSE.

Reading orders CT slices by ImagePositionPatient projected on the slice normal (never
by SliceLocation or file name), rasterises every contour of a slice at once with the
even-odd rule (holes stay holes) on a supersampled in-plane grid, and resamples a
reference RTDOSE onto the CT grid. Writing produces a plan-summed physical RTDOSE in
Gy on the CT grid that keeps the CT's patient, study and frame of reference.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from . import __version__
from .errors import DoseDiffError, warn
from .volume import Volume, atomic_write, make_folder, resample


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
SERIES_DESCRIPTION = "DoseDiff prediction - research only, not a TPS dose"
DECODERS_HINT = ("pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (JPEG, JPEG 2000) "
                 "or python-gdcm (all compressed syntaxes)")


@dataclass
class DicomCase:
    ct: Volume
    structures: dict[str, Volume]
    reference_dose: Volume | None
    ct_datasets: list[Dataset]          # headers, in slice order
    plan_uid: str | None = None
    warnings: list[str] = field(default_factory=list)
    prescriptions: dict[str, float] = field(default_factory=dict)  # structure name -> Gy, from the RTPLAN
    where: str = ""                      # the folder (or folder and study) it was read from


@contextlib.contextmanager
def _damaged(path: Path | str, what: str) -> Iterator[None]:
    """A malformed header surfaces as any Python error deep in the reading (a missing
    attribute, a value of the wrong length or type); each becomes one message naming the file."""
    try:
        yield
    except DoseDiffError:
        raise
    except (AttributeError, KeyError, IndexError, ValueError, TypeError, OverflowError, ZeroDivisionError,
            np.linalg.LinAlgError) as exc:
        raise DoseDiffError(f"{what} {path} has a missing or malformed attribute "
                            f"({type(exc).__name__}: {str(exc)[:120]}).",
                            "Export it again from the planning system.") from None


def _numbers(ds: Dataset, keyword: str, count: int | None, path: Path) -> np.ndarray:
    """A numeric (multi-)value as floats, refused when missing, of the wrong length or not finite."""
    value = ds.get(keyword)
    try:
        items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        arr = np.asarray([float(v) for v in items], float)
    except (TypeError, ValueError):
        arr = np.full(0, np.nan)
    if value is None or arr.size == 0 or (count is not None and arr.size != count) or not np.isfinite(arr).all():
        raise DoseDiffError(f"{path}: {keyword} is missing or malformed ({str(value)[:60]!r}).",
                            "Export the file again from the planning system.")
    return arr


def _orientation(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column direction cosines and the slice normal, checked to be a rotation."""
    iop = _numbers(ds, "ImageOrientationPatient", 6, path)
    row, col = iop[:3], iop[3:]
    if not (np.isclose(np.linalg.norm(row), 1, atol=1e-3) and np.isclose(np.linalg.norm(col), 1, atol=1e-3)
            and abs(np.dot(row, col)) < 1e-3):
        raise DoseDiffError(f"{path}: ImageOrientationPatient {iop.tolist()} is not two perpendicular unit vectors.",
                            "Export the file again from the planning system.")
    return row, col, np.cross(row, col)


def _spacing(ds: Dataset, path: Path) -> tuple[float, float]:
    """PixelSpacing as (between rows, between columns), both positive."""
    row_sp, col_sp = _numbers(ds, "PixelSpacing", 2, path)
    if row_sp <= 0 or col_sp <= 0:
        raise DoseDiffError(f"{path}: PixelSpacing {[float(row_sp), float(col_sp)]} is not positive.",
                            "Export the file again from the planning system.")
    return float(row_sp), float(col_sp)


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _read(path: Path, headers_only: bool) -> Dataset | None:
    """A dataset, None for a non-DICOM file; malformed DICOM becomes one clear error.

    Every element is decoded here, so a damaged value fails now, with the file's name,
    rather than later wherever it is first used.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=headers_only)
        for _ in ds.iterall():
            pass
        return ds
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many types on malformed files
        raise DoseDiffError(f"{path} is a damaged DICOM file ({type(exc).__name__}: {str(exc)[:120]}).",
                            "Remove it from the folder or export it again.") from None
    try:  # older exports omit the preamble; accept them only if they parse as a SOP instance
        with _quiet_pydicom():  # a text file forced through the parser warns about VRs: not news
            ds = pydicom.dcmread(path, stop_before_pixels=headers_only, force=True)
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            return None
    except Exception:
        return None
    try:
        for _ in ds.iterall():
            pass
    except Exception as exc:
        raise DoseDiffError(f"{path} is a damaged DICOM file ({type(exc).__name__}: {str(exc)[:120]}).",
                            "Remove it from the folder or export it again.") from None
    return ds


def _scan(folder: Path, warnings: list[str]) -> list[tuple[Path, Dataset]]:
    if not folder.is_dir():
        raise DoseDiffError(f"DICOM folder {folder} not found.", "Give the folder exported from the planning system.")
    found, skipped = [], 0
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with open(f, "rb") as fh:
                has_preamble = fh.read(132)[128:] == b"DICM"
        except OSError as exc:
            raise DoseDiffError(f"Cannot read {f} ({exc.strerror}).", "Check the file's permissions.") from None
        ds = _read(f, headers_only=True)
        if ds is None or not isinstance(ds.get("SOPClassUID"), str):
            if has_preamble:  # claims to be DICOM but is cut short or broken
                raise DoseDiffError(f"{f} is a damaged DICOM file (truncated or without a SOP class).",
                                    "Remove it from the folder or export it again.")
            skipped += 1
            continue
        found.append((f, ds))
    if skipped:
        warn(warnings, f"{skipped} non-DICOM file(s) in {folder} ignored.")
    return found


def _pixels(path: Path) -> np.ndarray:
    """The pixel array; a damaged file is told apart from a missing decoder."""
    full = _read(path, headers_only=False)
    if full is None or "PixelData" not in full:
        raise DoseDiffError(f"{path} has no pixel data.", "Export the file again; check the copy finished.")
    syntax = full.file_meta.get("TransferSyntaxUID")
    try:
        return full.pixel_array
    except Exception as exc:
        if syntax is None or not getattr(syntax, "is_compressed", False):
            frames = int(full.get("NumberOfFrames", 1) or 1)
            expected = int(full.get("Rows", 0)) * int(full.get("Columns", 0)) * frames * \
                int(full.get("BitsAllocated", 0)) // 8 * int(full.get("SamplesPerPixel", 1))
            raise DoseDiffError(f"The pixel data of {path} is truncated or does not match its header (expected "
                                f"{expected} bytes, found {len(full.PixelData)}).",
                                "Export the file again; check the copy finished.") from None
        raise DoseDiffError(f"Cannot decode the pixel data of {path} (transfer syntax {syntax.name}): "
                            f"{str(exc)[:100]}.",
                            f"Install a decoder: {DECODERS_HINT}; or export uncompressed.") from None


def _ct_volume(files: list[tuple[Path, Dataset]], warnings: list[str]) -> tuple[Volume, list[Dataset]]:
    first_path, first = files[0]
    row, col, n = _orientation(first, first_path)
    ipp = {}
    for path, ds in files:
        if not np.allclose(np.concatenate(_orientation(ds, path)[:2]), np.concatenate([row, col]), atol=1e-4):
            raise DoseDiffError("The CT series mixes slice orientations.", "Export a single, consistent CT series.")
        if (ds.get("Rows"), ds.get("Columns")) != (first.get("Rows"), first.get("Columns")):
            raise DoseDiffError(f"CT slices differ in size ({path} is {ds.get('Rows')} x {ds.get('Columns')}, "
                                f"{first_path} {first.get('Rows')} x {first.get('Columns')}).",
                                "Export a single, consistent CT series.")
        ipp[path] = _numbers(ds, "ImagePositionPatient", 3, path)
    pos = np.array([np.dot(ipp[path], n) for path, _ in files])
    order = np.argsort(pos, kind="stable")
    files = [files[i] for i in order]
    pos = pos[order]
    if len(files) < 2:
        raise DoseDiffError("The CT series has fewer than two slices.", "Export the whole planning CT.")
    _refuse_gantry_tilt(np.array([ipp[path] for path, _ in files]), n)
    gaps = np.diff(pos)
    if (gaps < 1e-3).any():
        raise DoseDiffError("Two CT slices share one position (duplicate or mixed series).",
                            "Export a single CT series without duplicates.")
    step = float(np.median(gaps))
    if (gaps > 1.5 * step).any():
        where = float(pos[int(np.argmax(gaps))])
        raise DoseDiffError(f"The CT series has a missing slice: a {gaps.max():.2f} mm gap after position "
                            f"{where:.2f} mm where slices are {step:.2f} mm apart.",
                            "Export the complete series (every slice) from the planning system.")
    arrays = []
    for path, ds in files:
        a = _pixels(path).astype(np.float32)
        arrays.append(a * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0)))
    arr = np.stack(arrays)
    row_spacing, col_spacing = _spacing(first, first_path)  # between rows (y), between columns (x)
    direction = np.stack([row, col, n], axis=1)  # columns: i, j, k axes
    origin = ipp[files[0][0]]
    vol = Volume(arr, (col_spacing, row_spacing, step), tuple(origin), tuple(direction.ravel()))
    if gaps.max() - gaps.min() > 0.01 * step:
        warn(warnings, f"CT slice spacing varies ({gaps.min():.2f}-{gaps.max():.2f} mm); resampled to {step:.2f} mm.")
        vol = _uniform_slices(arr, pos, vol)
    return vol, [ds for _, ds in files]


def _refuse_gantry_tilt(positions: np.ndarray, normal: np.ndarray) -> None:
    """Slices that step sideways as well as along the normal come from a tilted gantry:
    stacking them as a box would shear the anatomy by the offset (tens of mm)."""
    steps = positions - positions[0]
    sideways = steps - np.outer(steps @ normal, normal)
    shift = float(np.linalg.norm(sideways, axis=1).max())
    if shift > 0.1:
        along = float(abs(steps[-1] @ normal)) or 1.0
        angle = np.degrees(np.arctan2(float(np.linalg.norm(sideways[-1])), along))
        raise DoseDiffError(f"The CT was acquired with a gantry tilt of {angle:.1f} degrees: slices are "
                            f"offset sideways by up to {shift:.1f} mm, so the volume would be sheared.",
                            "Resample the series to an axial grid first (Slicer's DICOM import with acquisition "
                            "geometry regularization, then save as NRRD and use --ct).")


def _uniform_slices(arr: np.ndarray, pos: np.ndarray, vol: Volume) -> Volume:
    step = vol.spacing[2]
    n = int(round((pos[-1] - pos[0]) / step)) + 1
    target = pos[0] + step * np.arange(n)
    idx = np.clip(np.searchsorted(pos, target) - 1, 0, len(pos) - 2)
    w = ((target - pos[idx]) / (pos[idx + 1] - pos[idx]))[:, None, None]
    out = (1 - w) * arr[idx] + w * arr[idx + 1]
    return Volume(out.astype(np.float32), vol.spacing, vol.origin, vol.direction)


def _rasterise_slice(polys: list[np.ndarray], shape_yx: tuple[int, int], supersample: int = 3) -> np.ndarray:
    """Even-odd fill of all polygons of one slice (continuous index coordinates i, j).

    Each voxel is sampled on a supersample^2 sub-grid; it is inside when at least half
    of its samples are, which keeps small structures and their area within a fraction
    of a voxel.
    """
    from matplotlib.path import Path as MplPath

    ny, nx = shape_yx
    allp = np.concatenate(polys)
    i0, j0 = max(int(np.floor(allp[:, 0].min())) - 1, 0), max(int(np.floor(allp[:, 1].min())) - 1, 0)
    i1, j1 = min(int(np.ceil(allp[:, 0].max())) + 2, nx), min(int(np.ceil(allp[:, 1].max())) + 2, ny)
    out = np.zeros(shape_yx, np.uint8)
    if i1 <= i0 or j1 <= j0:
        return out
    s = supersample
    sub = (np.arange(s) + 0.5) / s - 0.5
    ii = (np.arange(i0, i1)[:, None] + sub[None, :]).ravel()
    jj = (np.arange(j0, j1)[:, None] + sub[None, :]).ravel()
    gi, gj = np.meshgrid(ii, jj)
    pts = np.column_stack([gi.ravel(), gj.ravel()])
    inside = np.zeros(len(pts), bool)
    for p in polys:
        inside ^= MplPath(p).contains_points(pts)
    frac = inside.reshape(j1 - j0, s, i1 - i0, s).mean(axis=(1, 3))
    out[j0:j1, i0:i1] = frac >= 0.5
    return out


def rtstruct_contours(ds: Dataset, warnings: list[str] | None = None) -> dict[str, list[np.ndarray]]:
    """ROI name -> closed planar contours, each an (N, 3) array of LPS mm.

    Contour data that is not x, y, z triples of finite numbers is refused (it would be
    read as other points); contours of fewer than three points enclose nothing and are
    dropped with a warning.
    """
    names = {int(r.ROINumber): str(r.ROIName) for r in getattr(ds, "StructureSetROISequence", [])}
    contours = {int(c.ReferencedROINumber): c for c in getattr(ds, "ROIContourSequence", [])}
    out: dict[str, list[np.ndarray]] = {}
    for number, name in names.items():
        item = contours.get(number)
        polys, dropped = [], 0
        for c in getattr(item, "ContourSequence", None) or []:
            if str(getattr(c, "ContourGeometricType", "CLOSED_PLANAR")) not in ("CLOSED_PLANAR", "CLOSEDPLANAR"):
                continue
            data = c.get("ContourData")
            values = np.asarray(list(data) if isinstance(data, (list, MultiValue)) else [data] if data else [], float)
            if values.size % 3 or not np.isfinite(values).all():
                raise DoseDiffError(f"ROI {name!r} has a malformed contour ({values.size} values, not x, y, z "
                                    "triples of finite numbers).", "Export the structure set again.")
            if values.size < 9:
                dropped += 1
                continue
            polys.append(values.reshape(-1, 3))
        if dropped and warnings is not None:
            warn(warnings, f"ROI {name!r}: {dropped} contour(s) of fewer than three points dropped.")
        out[name] = polys
    return out


def _structures(ds: Dataset, ct: Volume, warnings: list[str]) -> dict[str, Volume]:
    grid = ct.grid
    inv = np.linalg.inv(grid.matrix())
    out = {}
    nz, ny, nx = grid.shape
    for name, polys in rtstruct_contours(ds, warnings).items():
        if not polys:
            warn(warnings, f"ROI {name!r} has no contours; it is left empty.")
            out[name] = Volume.on_grid(np.zeros(grid.shape, np.uint8), grid)
            continue
        by_slice: dict[int, list[np.ndarray]] = {}
        outside = 0
        for pts in polys:
            ijk = (np.column_stack([pts, np.ones(len(pts))]) @ inv.T)[:, :3]
            k = int(np.round(ijk[:, 2].mean()))
            if k < 0 or k >= nz:
                outside += 1
                continue
            by_slice.setdefault(k, []).append(ijk[:, :2])
        mask = np.zeros(grid.shape, np.uint8)
        for k, ps in by_slice.items():
            mask[k] = _rasterise_slice(ps, (ny, nx))
        if outside:
            if not by_slice:
                raise DoseDiffError(f"ROI {name!r} lies entirely outside the CT ({outside} contours).",
                                    "Check that the RTSTRUCT belongs to this CT series.")
            warn(warnings, f"ROI {name!r}: {outside} contour(s) outside the CT slices were dropped.")
        out[name] = Volume.on_grid(mask, grid)
    return out


def _dose_volume(path: Path, ds: Dataset) -> Volume:
    units = str(getattr(ds, "DoseUnits", "")).upper()
    if units != "GY":
        raise DoseDiffError(f"RTDOSE {path.name} is in {units or 'unknown'} units, not Gy (relative doses "
                            "cannot be compared).", "Export the plan dose in absolute Gy.")
    if "DoseGridScaling" not in ds or not str(ds.DoseGridScaling).strip():
        raise DoseDiffError(f"RTDOSE {path.name} has no DoseGridScaling.", "Export it again from the planning system.")
    scaling = float(_numbers(ds, "DoseGridScaling", 1, path)[0])
    arr = _pixels(path).astype(np.float64) * scaling
    if arr.ndim == 2:
        arr = arr[None]
    row, col, n = _orientation(ds, path)
    ipp = _numbers(ds, "ImagePositionPatient", 3, path)
    offsets = _numbers(ds, "GridFrameOffsetVector", None, path) if "GridFrameOffsetVector" in ds else np.zeros(1)
    if len(offsets) != arr.shape[0]:
        raise DoseDiffError(f"RTDOSE {path.name} has {arr.shape[0]} frames but {len(offsets)} frame offsets.",
                            "Export the dose again.")
    if len(offsets) > 1 and abs(offsets[0]) > 1e-3:
        if abs(offsets[0] - np.dot(ipp, n)) > 1e-2:
            raise DoseDiffError(f"RTDOSE {path.name}: GridFrameOffsetVector starts at {offsets[0]} mm, neither 0 "
                                "(relative) nor the first frame's position (absolute).", "Export the dose again.")
        offsets = offsets - offsets[0]  # absolute form -> relative
    if len(offsets) > 1:
        if offsets[1] < offsets[0]:
            arr, offsets = arr[::-1], offsets[::-1]
            ipp = ipp + offsets[0] * n
            offsets = offsets - offsets[0]
        step = float(np.median(np.diff(offsets)))
        if np.abs(np.diff(offsets) - step).max() > 0.01 * abs(step):
            raise DoseDiffError(f"RTDOSE {path.name} has non-uniform frame spacing.", "Export it on a regular grid.")
    else:
        step = 1.0
    if abs(step) < 1e-6:
        raise DoseDiffError(f"RTDOSE {path.name}: its frames share one position.", "Export the dose again.")
    row_sp, col_sp = _spacing(ds, path)
    direction = np.stack([row, col, n], axis=1)
    vol = Volume(arr.astype(np.float32), (col_sp, row_sp, abs(step)), tuple(ipp), tuple(direction.ravel()))
    vol.meta = {k: str(ds.get(k, "")) for k in ("PatientID", "FrameOfReferenceUID", "StudyInstanceUID")}
    return vol


def scan_dicom(folder: str | os.PathLike) -> tuple[list[tuple[Path, Dataset]], list[str]]:
    """Every DICOM file under folder (headers only), and the warnings of the scan."""
    warnings: list[str] = []
    return _scan(Path(folder), warnings), warnings


def read_dicom(folder: str | os.PathLike, series_uid: str | None = None) -> DicomCase:
    """CT series, structures of its RTSTRUCT and (if present) the plan's RTDOSE."""
    files, warnings = scan_dicom(folder)
    return read_dicom_files(files, str(folder), series_uid, warnings)


def read_dicom_files(files: list[tuple[Path, Dataset]], where: str, series_uid: str | None = None,
                     warnings: list[str] | None = None) -> DicomCase:
    """One patient's CT series, RTSTRUCT, RTDOSE and RTPLAN among already scanned files."""
    warnings = [] if warnings is None else warnings
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for f, ds in files:
        if ds.SOPClassUID == CT_IMAGE:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if not series:
        raise DoseDiffError(f"No CT images in {where}.", "Give the folder exported with the planning CT.")
    if series_uid is None and len(series) > 1:
        listing = "; ".join(f"{uid} ({len(v)} slices, {getattr(v[0][1], 'SeriesDescription', '')!s})"
                            for uid, v in series.items())
        raise DoseDiffError(f"{where} holds {len(series)} CT series: {listing}.",
                            "Pick one with --series-uid UID.")
    uid = series_uid or next(iter(series))
    if uid not in series:
        raise DoseDiffError(f"No CT series {uid} in {where}.", f"Known series: {', '.join(series)}.")
    with _damaged(where, "The CT series in"):
        ct, headers = _ct_volume(series[uid], warnings)
    for_uid = str(headers[0].get("FrameOfReferenceUID", ""))
    patient = str(headers[0].get("PatientID", ""))
    structs = [(f, ds) for f, ds in files if ds.SOPClassUID == RT_STRUCT]
    doses = [(f, ds) for f, ds in files if ds.SOPClassUID == RT_DOSE]
    plans = [ds for _, ds in files if ds.SOPClassUID == RT_PLAN]
    structures: dict[str, Volume] = {}
    roi_names: dict[int, str] = {}
    if structs:
        if len(structs) > 1:
            warn(warnings, f"{len(structs)} RTSTRUCTs found; using {structs[0][0].name}.")
        f, _ = structs[0]
        ds = _read(f, headers_only=False)
        _same_patient(ds, patient, f, "RTSTRUCT")
        ref_for = {str(r.get("FrameOfReferenceUID", "")) for r in ds.get("ReferencedFrameOfReferenceSequence", [])}
        ref_for |= {str(r.ReferencedFrameOfReferenceUID) for r in ds.get("StructureSetROISequence", [])
                    if "ReferencedFrameOfReferenceUID" in r}
        ref_for.discard("")
        if ref_for and for_uid not in ref_for:
            raise DoseDiffError(f"RTSTRUCT {f.name} is in another frame of reference ({', '.join(ref_for)}) than "
                                f"the CT ({for_uid}).", "Export the structures drawn on this CT.")
        with _damaged(f, "RTSTRUCT"):
            structures = _structures(ds, ct, warnings)
            roi_names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    else:
        warn(warnings, "No RTSTRUCT found.")
    reference = None
    plan_uid = str(plans[0].SOPInstanceUID) if plans else None
    if doses:
        doses.sort(key=lambda fd: str(fd[1].get("DoseSummationType", "")).upper() != "PLAN")
        f, ds = doses[0]
        if len(doses) > 1:
            warn(warnings, f"{len(doses)} RTDOSE files found; using {f.name} "
                           f"({ds.get('DoseSummationType', 'unknown')} summation) as the plan dose.")
        _same_patient(ds, patient, f, "RTDOSE")
        if str(ds.get("FrameOfReferenceUID", "")) != for_uid:
            raise DoseDiffError(f"RTDOSE {f.name} is in another frame of reference than the CT.",
                                "Export the plan dose computed on this CT.")
        with _damaged(f, "RTDOSE"):
            dose = _dose_volume(f, ds)
        reference = resample(dose, ct.grid, "linear", default=0.0)
        if plan_uid is None and "ReferencedRTPlanSequence" in ds:
            plan_uid = str(ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID)
    prescriptions = _prescriptions(plans[0], roi_names, warnings) if plans else {}
    if len(plans) > 1:
        warn(warnings, f"{len(plans)} RTPLANs found; prescriptions read from the first.")
    return DicomCase(ct, structures, reference, headers, plan_uid, warnings, prescriptions, where)


def _prescriptions(plan: Dataset, roi_names: dict[int, str], warnings: list[str]) -> dict[str, float]:
    """Structure name -> prescribed dose (Gy) of each target dose reference of the plan.

    Only TARGET dose references with a TargetPrescriptionDose and a ReferencedROINumber
    that the structure set names are used; others (points, organ constraints) are not
    prescriptions of a structure.
    """
    out: dict[str, float] = {}
    for ref in plan.get("DoseReferenceSequence", []):
        if str(ref.get("DoseReferenceStructureType", "")).upper() not in ("VOLUME", "SITE") \
                or str(ref.get("DoseReferenceType", "")).upper() != "TARGET":
            continue
        gy, number = ref.get("TargetPrescriptionDose"), ref.get("ReferencedROINumber")
        if gy is None or number is None:
            continue
        name = roi_names.get(int(number))
        if name is None:
            warn(warnings, f"The RTPLAN prescribes {float(gy):g} Gy to ROI number {number}, which the structure "
                           "set does not name; that prescription is not used.")
            continue
        out[name] = max(out.get(name, 0.0), float(gy))
    return out


def _same_patient(ds: Dataset, patient: str, path: Path, what: str) -> None:
    """Objects of another patient are refused: comparing or contouring across patients is never meant."""
    other = str(ds.get("PatientID", ""))
    if patient and other and other != patient:
        raise DoseDiffError(f"{what} {path.name} belongs to patient {other!r}, the CT to {patient!r}.",
                            "Put only one patient's files in the folder.")


def _copy(src: Dataset, dst: Dataset, keywords: tuple[str, ...]) -> None:
    for k in keywords:
        if k in src:
            setattr(dst, k, getattr(src, k))


def rtdose_dataset(dose: Volume, ct_headers: list[Dataset], model_name: str = "", plan_uid: str | None = None) -> Dataset:
    """An RT Dose object: physical dose in Gy, plan summation, on the dose volume's grid."""
    ref = ct_headers[0]
    d = np.clip(np.nan_to_num(dose.array.astype(np.float64), nan=0.0), 0.0, None)  # never wrap negatives
    direction = np.asarray(dose.direction).reshape(3, 3)
    row, col, axis = direction[:, 0], direction[:, 1], direction[:, 2]
    normal = np.cross(row, col)
    origin = np.asarray(dose.origin, float)
    if np.dot(axis, normal) < 0:  # frames must advance along row x column
        d = d[::-1]
        origin = origin + axis * dose.spacing[2] * (d.shape[0] - 1)
    dmax = float(d.max())
    # 16 bits: dmax / 65535 is about 1 mGy at 70 Gy, and dciodvfy (the validator the
    # project must pass) cannot parse 32-bit RTDOSE pixel data at all.
    scaling = dmax / 65535.0 if dmax > 0 else 1.0
    pixels = np.minimum(np.round(d / scaling), 65535).astype(np.uint16)
    now = _dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = RT_DOSE
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Modality = "RTDOSE"
    ds.Manufacturer = "DoseDiff"
    ds.ManufacturerModelName = (model_name or "DoseDiff")[:64]
    ds.SoftwareVersions = f"DoseDiff {__version__}"
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9001
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, k, getattr(ref, k, ""))
    _copy(ref, ds, ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                    "AccessionNumber", "StudyDescription", "FrameOfReferenceUID"))
    for k in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if k not in ds:
            setattr(ds, k, "")
    ds.PositionReferenceIndicator = getattr(ref, "PositionReferenceIndicator", "")
    ds.ImagePositionPatient = [f"{v:.6g}" for v in origin]
    ds.ImageOrientationPatient = [f"{v:.8g}" for v in np.concatenate([row, col])]
    ds.PixelSpacing = [f"{dose.spacing[1]:.6g}", f"{dose.spacing[0]:.6g}"]  # row spacing (y), column spacing (x)
    ds.SliceThickness = f"{dose.spacing[2]:.6g}"
    ds.GridFrameOffsetVector = [f"{dose.spacing[2] * k:.6g}" for k in range(d.shape[0])]
    ds.FrameIncrementPointer = pydicom.tag.Tag("GridFrameOffsetVector")
    ds.NumberOfFrames = d.shape[0]
    ds.Rows, ds.Columns = int(d.shape[1]), int(d.shape[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseComment = "DoseDiff prediction: research only, not a TPS dose"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = f"{scaling:.10g}"
    # PLAN summation requires a plan reference: the clinical plan when the export has
    # one, else a new UID standing for the hypothetical plan this prediction describes.
    item = Dataset()
    item.ReferencedSOPClassUID = RT_PLAN
    item.ReferencedSOPInstanceUID = plan_uid or generate_uid()
    ds.ReferencedRTPlanSequence = Sequence([item])
    refs = []
    for h in ct_headers:
        item = Dataset()
        item.ReferencedSOPClassUID = h.SOPClassUID
        item.ReferencedSOPInstanceUID = h.SOPInstanceUID
        refs.append(item)
    ds.ReferencedImageSequence = Sequence(refs)
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_DOSE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write_rtdose(dose: Volume, ct_headers: list[Dataset], out_dir: str | os.PathLike, model_name: str = "",
                 plan_uid: str | None = None, overwrite: bool = False) -> Path:
    """Write RTDOSE into out_dir, refusing to replace an RTDOSE already there unless asked."""
    out_dir = make_folder(out_dir)
    existing = [p for p in out_dir.iterdir() if p.is_file() and p.name.startswith("RTDOSE")]
    if existing and not overwrite:
        raise DoseDiffError(f"{out_dir} already holds an RTDOSE ({existing[0].name}).",
                            "Choose another output folder or pass --overwrite.")
    ds = rtdose_dataset(dose, ct_headers, model_name, plan_uid)
    path = out_dir / f"RTDOSE_{ds.SOPInstanceUID}.dcm"
    atomic_write(path, lambda p: ds.save_as(p, enforce_file_format=True), overwrite)
    return path


def read_rtdose(path: str | os.PathLike) -> Volume:
    """One RTDOSE file as a dose volume in Gy on its own grid."""
    path = Path(path)
    if not path.is_file():
        raise DoseDiffError(f"RTDOSE file {path} not found.", "Check the path and its spelling.")
    ds = _read(path, headers_only=False)
    if ds is None or ds.get("SOPClassUID") != RT_DOSE:
        raise DoseDiffError(f"{path} is not an RTDOSE file.", "Give the RTDOSE (.dcm) or a dose image.")
    with _damaged(path, "RTDOSE"):
        return _dose_volume(path, ds)
