"""Volumes with their geometry, and the files they come from and go to.

Every array in DoseDiff travels inside a `Volume`: the voxels in (z, y, x) order, as
SimpleITK and Slicer's arrayFromVolume give them, plus spacing, origin and direction in
LPS millimetres (x, y, z order). Nothing downstream guesses geometry.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from .errors import DoseDiffError


class _OnFirstUse:
    """SimpleITK, imported when an image is first read, written or resampled: training from
    a prepared cache needs none of it (the GPU machine's image does not ship it)."""

    def __getattr__(self, name: str):
        import SimpleITK

        return getattr(SimpleITK, name)


sitk = _OnFirstUse()

log = logging.getLogger(__name__)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
VOLUME_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".nii.gz", ".nii", ".mha", ".mhd")


@dataclass(frozen=True)
class Grid:
    """A voxel lattice: shape (z, y, x), spacing/origin (x, y, z) mm, direction row-major 3x3."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY

    def matrix(self) -> np.ndarray:
        """4x4 index (i, j, k) -> LPS mm."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def physical(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.atleast_2d(np.asarray(ijk, float))
        m = self.matrix()
        return ijk @ m[:3, :3].T + m[:3, 3]

    def close_to(self, other: "Grid", tol_mm: float = 1e-3) -> bool:
        if self.shape != other.shape:
            return False
        corners = np.array([[0, 0, 0], [s - 1 for s in self.shape[::-1]]], float)
        return bool(np.abs(self.physical(corners) - other.physical(corners)).max() <= tol_mm
                    and np.allclose(self.direction, other.direction, atol=1e-5))

    def is_axis_aligned(self) -> bool:
        d = np.abs(np.asarray(self.direction).reshape(3, 3))
        return bool(np.allclose(np.sort(d, axis=0)[:2], 0, atol=1e-6))

    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise DoseDiffError(f"Expected a 3-D volume, got an array of shape {self.array.shape}.",
                                "Give a single 3-D image (one time point, one component).")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in self.direction)
        check_geometry(self.spacing, self.origin, self.direction)

    @property
    def grid(self) -> Grid:
        return Grid(tuple(int(s) for s in self.array.shape), self.spacing, self.origin, self.direction)

    @classmethod
    def on_grid(cls, array: np.ndarray, grid: Grid) -> "Volume":
        if tuple(array.shape) != grid.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {grid.shape}")
        return cls(array, grid.spacing, grid.origin, grid.direction)

    def with_array(self, array: np.ndarray) -> "Volume":
        return Volume.on_grid(array, self.grid)

    def to_sitk(self) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image) -> "Volume":
        return cls(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def check_geometry(spacing: tuple[float, ...], origin: tuple[float, ...], direction: tuple[float, ...]) -> None:
    """Refuse geometry that would place every voxel wrongly: zero, negative or NaN spacing,
    a NaN origin, or a direction matrix that is not a rotation (flattened or sheared axes)."""
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise DoseDiffError(f"Voxel spacing {spacing} mm is not three positive numbers.",
                            "Fix the image header (spacing / pixdim) or re-export the image.")
    if not all(math.isfinite(v) for v in (*origin, *direction)):
        raise DoseDiffError(f"The image origin {origin} or direction has non-finite values.",
                            "Fix the image header or re-export the image.")
    d = np.asarray(direction, float).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise DoseDiffError("The image direction cosines are not orthonormal (sheared or degenerate axes).",
                            "Re-export the image; a gantry-tilted CT must be resampled to an axial grid first.")


MAX_VOXELS = 1 << 30  # 4 GiB as float32: far beyond any planning CT, and still fits in memory


def _sitk_read(path: Path) -> sitk.Image:
    if not path.exists():
        raise DoseDiffError(f"File not found: {path}.", "Check the path and its spelling.")
    if path.is_dir():
        raise DoseDiffError(f"{path} is a folder, not an image file.", "Give the image file (NRRD, NIfTI or MHA).")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if int(np.prod([int(v) for v in reader.GetSize()], dtype=np.float64)) > MAX_VOXELS:
            raise DoseDiffError(f"{path} claims {reader.GetSize()} voxels, more than any planning image.",
                                "The header is damaged; re-export the image.")
        return reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "unknown reader error"
        if "spacing" in str(exc).lower():
            raise DoseDiffError(f"{path} has a zero or invalid voxel spacing ({first}).",
                                "Fix the image header (spacing / pixdim) or re-export the image.") from None
        raise DoseDiffError(
            f"Cannot read {path}: the file is unreadable or truncated ({first}).",
            "Re-export the image as NRRD, NIfTI or MHA and check the copy finished.") from None


def _nifti_nonfinite(path: Path) -> int:
    """NaN/Inf voxels in a float NIfTI file, counted in the raw data.

    ITK's NIfTI reader turns them into 0, so the image it returns looks clean.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(540)
            for endian in "<>":
                size = struct.unpack(endian + "i", head[:4])[0]
                if size == 348:
                    code = struct.unpack(endian + "h", head[70:72])[0]
                    offset = int(struct.unpack(endian + "f", head[108:112])[0])
                    break
                if size == 540:
                    code = struct.unpack(endian + "h", head[12:14])[0]
                    offset = int(struct.unpack(endian + "q", head[168:176])[0])
                    break
            else:
                return 0
            dtype = {16: "f4", 64: "f8"}.get(code)
            if dtype is None:
                return 0
            fh.seek(offset)
            kind, bad = np.dtype(endian + dtype), 0
            while chunk := fh.read(kind.itemsize << 22):  # 4 M voxels at a time: no second copy of a large CT
                usable = len(chunk) - len(chunk) % kind.itemsize
                bad += int((~np.isfinite(np.frombuffer(chunk[:usable], kind))).sum())
    except (OSError, EOFError, struct.error, ValueError, zlib.error):
        return 0  # unreadable files are reported by the image reader itself
    return bad


def read_volume(path: str | os.PathLike, reorient: bool = True) -> Volume:
    """Read an NRRD, NIfTI or MHA image, reoriented to an axial LPS grid unless reorient=False.

    NaN or infinite voxels are refused: they would reach the network or a score unnoticed.
    """
    path = Path(path)
    img = _sitk_read(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise DoseDiffError(f"{path} is not a scalar 3-D image (dimension {img.GetDimension()}, "
                            f"{img.GetNumberOfComponentsPerPixel()} components).",
                            "Give a single-component 3-D volume.")
    vol = Volume.from_sitk(img)
    bad = int((~np.isfinite(vol.array)).sum()) if vol.array.dtype.kind == "f" else 0
    if path.name.endswith((".nii", ".nii.gz")):
        bad = max(bad, _nifti_nonfinite(path))
    if bad:
        raise DoseDiffError(f"{path} has {bad} NaN or infinite voxels.",
                            "Re-export the image; fill padding with a real value (-1000 HU for air, 0 Gy for dose).")
    return to_axial(vol) if reorient else vol


def to_axial(vol: Volume, is_label: bool = False) -> Volume:
    """Return the volume on an LPS axis-aligned grid (z = slice axis).

    A flipped or permuted axis is reordered exactly (no interpolation); an oblique
    direction is resampled onto the axial grid that covers the same box, with a warning.
    """
    grid = vol.grid
    if np.allclose(grid.direction, IDENTITY, atol=1e-6):
        return vol
    if grid.is_axis_aligned():
        out = Volume.from_sitk(sitk.DICOMOrient(vol.to_sitk(), "LPS"))
        out.meta = dict(vol.meta)
        return out
    log.warning("Oblique image direction %s: resampling to an axial grid.",
                np.round(grid.direction, 3).tolist())
    shape_xyz = np.array(grid.shape[::-1])
    corners = np.array([[i, j, k] for i in (0, shape_xyz[0] - 1) for j in (0, shape_xyz[1] - 1)
                        for k in (0, shape_xyz[2] - 1)], float)
    pts = grid.physical(corners)
    lo, hi = pts.min(0), pts.max(0)
    spacing = np.full(3, min(grid.spacing[:2]))
    spacing[2] = grid.spacing[2]
    size = np.maximum(np.ceil((hi - lo) / spacing).astype(int) + 1, 1)
    target = Grid(tuple(int(s) for s in size[::-1]), tuple(spacing), tuple(lo), IDENTITY)
    out = resample(vol, target, "nearest" if is_label else "linear",
                   default=0 if is_label else float(np.min(vol.array)))
    out.meta = dict(vol.meta)
    return out


_INTERP = {"nearest": "sitkNearestNeighbor", "linear": "sitkLinear", "bspline": "sitkBSpline"}


def resample(vol: Volume, grid: Grid, kind: str = "linear", default: float = 0.0) -> Volume:
    """Resample onto another grid; `kind` is nearest, linear or bspline."""
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in grid.shape[::-1]])
    f.SetOutputSpacing(grid.spacing)
    f.SetOutputOrigin(grid.origin)
    f.SetOutputDirection(grid.direction)
    f.SetInterpolator(getattr(sitk, _INTERP[kind]))
    f.SetDefaultPixelValue(float(default))
    src = vol.to_sitk()
    if kind != "nearest" and vol.array.dtype.kind in "biu":
        src = sitk.Cast(src, sitk.sitkFloat32)
    return Volume.from_sitk(f.Execute(src))


def resample_mask(mask: Volume, grid: Grid) -> Volume:
    """Resample a binary mask by linear interpolation of its indicator at 0.5.

    Nearest neighbour drops thin structures when the target grid is coarser; the
    half-way threshold keeps the resampled volume unbiased.
    """
    frac = resample(mask.with_array(mask.array.astype(np.float32)), grid, "linear")
    return frac.with_array((frac.array >= 0.5).astype(np.uint8))


# --- writing: every file DoseDiff writes goes through atomic_write -------------------

_TMP_TAG = ".dosediff-tmp"
_CREATED: list[list[Path]] = []  # one list per all_or_nothing block, innermost last


def safe_name(text: str, fallback: str = "unnamed") -> str:
    """A file name part made from input data (a PatientID, a ROI name): no folders, no
    '..', no hidden files, nothing a shell or another OS would trip on."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._-")[:64]
    return name or fallback


def check_output(path: str | os.PathLike, overwrite: bool = False, suffixes: tuple[str, ...] = (),
                 what: str = "Output") -> Path:
    """Refuse, before any work, an output that could not be written or would destroy a file."""
    path = Path(path)
    if suffixes and not path.name.lower().endswith(suffixes):
        raise DoseDiffError(f"{what} {path} has an unsupported file type.", f"Use one of: {', '.join(suffixes)}.")
    if path.is_symlink():
        raise DoseDiffError(f"{what} {path} is a symbolic link; DoseDiff never writes through links.",
                            "Give the real path, or remove the link.")
    if path.is_dir():
        raise DoseDiffError(f"{what} {path} is a folder.", "Give a file name inside it.")
    if path.exists() and not overwrite:
        raise DoseDiffError(f"{what} {path} already exists.", "Choose another output path or pass --overwrite.")
    _check_folder_writable(path.parent, create=False)
    return path


def check_output_folder(folder: str | os.PathLike, names: tuple[str, ...] = (), overwrite: bool = False) -> Path:
    """A folder that will receive `names`: it (or its nearest existing parent) must be a
    writable folder, and none of the names may exist there unless overwrite is given."""
    folder = Path(folder)
    _check_folder_writable(folder, create=True)
    if folder.is_dir():
        for n in names:
            check_output(folder / n, overwrite)
    return folder


def _check_folder_writable(folder: Path, create: bool) -> None:
    probe = folder
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        if not create:
            raise DoseDiffError(f"Output folder {folder} does not exist.", "Create it first, or fix the path.")
        probe = probe.parent
    if not probe.is_dir():
        raise DoseDiffError(f"{probe} is not a folder, so {folder} cannot hold outputs.", "Fix the output path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DoseDiffError(f"Output folder {probe} is not writable.", "Choose a folder you can write to.")


def make_folder(folder: str | os.PathLike) -> Path:
    """mkdir -p that remembers the levels it created, so a failed command removes them."""
    folder = Path(folder)
    _check_folder_writable(folder, create=True)
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    if _CREATED:
        _CREATED[-1].extend(reversed(missing))
    return folder


@contextlib.contextmanager
def all_or_nothing(keep_files: bool = False) -> Iterator[None]:
    """Remove again every file and folder created inside the block if the block fails
    (an error, Ctrl-C or SIGTERM): a failed command leaves no half report behind.

    keep_files: for resumable work (cohort prediction, cache, training), whose finished
    files are kept; only the folders it created and left empty are removed.
    """
    created: list[Path] = []
    _CREATED.append(created)
    try:
        yield
    except BaseException:
        for p in reversed(created):
            if keep_files and not p.is_dir():
                continue
            try:
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass  # a folder the user filled meanwhile stays
        raise
    finally:
        _CREATED.pop()


_TMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+" + re.escape(_TMP_TAG))


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporaries in `folder` left by processes that were killed (SIGKILL cannot be caught)."""
    for f in folder.iterdir():
        m = _TMP_NAME.match(f.name)
        if m and not _alive(int(m.group(1))):
            f.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], object], overwrite: bool = False) -> Path:
    """Call writer(tmp_path) then rename onto `path`, so a crash never leaves half a file.

    The temporary sits beside the target as .<name>.<pid>.<random>.dosediff-tmp<suffix>:
    it is removed on any error, Ctrl-C or SIGTERM, and one left by a killed process is
    removed by the next write into the same folder. Links are never written through.
    """
    path = check_output(path, overwrite)
    is_new = not os.path.lexists(path)
    _remove_stale_temporaries(path.parent)
    suffix = next((s for s in VOLUME_SUFFIXES if path.name.endswith(s)), path.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_TAG + suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if is_new and _CREATED:
        _CREATED[-1].append(path)
    return path


def write_volume(vol: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    img = vol.to_sitk()
    return atomic_write(path, lambda p: sitk.WriteImage(img, str(p), useCompression=True), overwrite)


# --- structures -------------------------------------------------------------------

def read_structures(path: str | os.PathLike) -> dict[str, Volume]:
    """Read a Slicer .seg.nrrd or a folder of per-ROI mask images into binary masks."""
    path = Path(path)
    if path.is_dir():
        masks = read_mask_folder(path)
    elif path.name.endswith((".seg.nrrd", ".nrrd")):
        masks = read_segmentation(path)
    else:
        masks = {_stem(path): _binary(read_volume(path))}
    if not masks:
        raise DoseDiffError(f"No structures found in {path}.",
                            "Give a .seg.nrrd or a folder with one mask image per ROI.")
    return masks


def _stem(path: Path) -> str:
    name = path.name
    for s in VOLUME_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return path.stem


def _binary(vol: Volume) -> Volume:
    return vol.with_array((vol.array != 0).astype(np.uint8))


def read_mask_folder(folder: Path) -> dict[str, Volume]:
    masks = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name.endswith(VOLUME_SUFFIXES) and not f.name.startswith("."):
            masks[_stem(f)] = _binary(read_volume(f))
    return masks


def read_segmentation(path: Path) -> dict[str, Volume]:
    """Read a Slicer segmentation (.seg.nrrd), keeping segment names.

    Handles shared-labelmap layers (Segment<i>_Layer / _LabelValue) and the older
    one-segment-per-layer files without label values.
    """
    img = _sitk_read(path)
    try:
        keys = set(img.GetMetaDataKeys())
        meta = {k: img.GetMetaData(k) for k in keys}
    except (TypeError, UnicodeError, RuntimeError):
        raise DoseDiffError(f"The header of {path} holds unreadable (non-text) fields.",
                            "Re-save the segmentation from Slicer.") from None
    if img.GetDimension() not in (3, 4):
        raise DoseDiffError(f"{path} is a {img.GetDimension()}-D image, not a 3-D segmentation.",
                            "Give a Slicer .seg.nrrd or a 3-D labelmap.")
    n_comp = img.GetNumberOfComponentsPerPixel()
    if img.GetDimension() == 4:
        arr4 = sitk.GetArrayFromImage(img)  # (layer, z, y, x)
        base = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
        layers = [arr4[i] for i in range(arr4.shape[0])]
    elif n_comp > 1:
        arr = sitk.GetArrayFromImage(img)  # (z, y, x, c)
        base = sitk.VectorIndexSelectionCast(img, 0)
        layers = [arr[..., i] for i in range(n_comp)]
    else:
        base = img
        layers = [sitk.GetArrayFromImage(img)]
    geometry = Volume.from_sitk(base)
    indices = sorted({int(m.group(1)) for k in keys if (m := re.match(r"Segment(\d+)_Name$", k))})
    masks: dict[str, Volume] = {}
    if not indices:  # a plain labelmap NRRD: one mask per label value
        for value in np.unique(layers[0]):
            if value != 0:
                masks[f"label_{int(value)}"] = geometry.with_array((layers[0] == value).astype(np.uint8))
    for i in indices:
        name = meta[f"Segment{i}_Name"]
        try:
            layer = int(meta.get(f"Segment{i}_Layer", i if len(layers) > 1 else 0))
            label = int(meta.get(f"Segment{i}_LabelValue", 1))
        except ValueError:
            raise DoseDiffError(f"Segment {name!r} in {path} has a layer or label value that is not a number.",
                                "Re-save the segmentation from Slicer.") from None
        if not 0 <= layer < len(layers):
            raise DoseDiffError(f"Segment {name!r} in {path} points to layer {layer}, "
                                f"but the file has {len(layers)}.", "Re-save the segmentation from Slicer.")
        masks[name] = geometry.with_array((layers[layer] == label).astype(np.uint8))
    return {k: to_axial(v, is_label=True) for k, v in masks.items()}


def write_segmentation(masks: Mapping[str, Volume], path: str | os.PathLike,
                       overwrite: bool = False) -> Path:
    """Write masks as a Slicer .seg.nrrd, one layer per segment (overlaps allowed)."""
    names = list(masks)
    if not names:
        raise DoseDiffError("No segments to write.")
    grid = masks[names[0]].grid
    for n in names:
        if masks[n].grid != grid:
            raise ValueError(f"segment {n} is on another grid")
    stack = np.stack([(masks[n].array != 0).astype(np.uint8) for n in names], axis=-1)
    img = sitk.GetImageFromArray(stack, isVector=True)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    colours = [(0.9, 0.3, 0.2), (0.2, 0.6, 0.9), (0.3, 0.8, 0.3), (0.9, 0.8, 0.2), (0.7, 0.4, 0.8)]
    for i, n in enumerate(names):
        c = colours[i % len(colours)]
        img.SetMetaData(f"Segment{i}_ID", f"Segment_{i + 1}")
        img.SetMetaData(f"Segment{i}_Name", n)
        img.SetMetaData(f"Segment{i}_Layer", str(i))
        img.SetMetaData(f"Segment{i}_LabelValue", "1")
        img.SetMetaData(f"Segment{i}_Color", " ".join(f"{v:.3f}" for v in c))
        img.SetMetaData(f"Segment{i}_Extent", " ".join(
            f"0 {s - 1}" for s in grid.shape[::-1]))
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    return atomic_write(path, lambda p: sitk.WriteImage(img, str(p), useCompression=True), overwrite)
