"""The training cache: conditions computed once per patient, slices ready to stream.

Per patient the cache keeps, for the slices where dose is possible, the normalised CT,
the normalised dose and one PSDM per ROI (float16). Masks are not stored: a PSDM is
positive exactly inside its ROI, so every mask channel is recovered as psdm > 0, and
augmentation that warps the PSDMs keeps masks and distances consistent for free.

A pack is the OpenKBP data made small enough to travel (about 0.3 MB a patient, xz):
oriented CT (8 HU steps) and dose (0.1 Gy steps) of the slices where dose is possible,
and every mask as one bit of a uint16 volume. The steps are far below what the network
resolves (8 HU is 0.006 of its CT range) and what the scores measure (0.05 Gy at most). `prepare` builds the same cache from a pack
as from the CSV folders, so a machine without the archives (a lent GPU) can train.
"""
from __future__ import annotations

import json
import lzma
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import openkbp
from .conditions import STACK_ROIS, slice_stack
from .config import POSSIBLE_DOSE, ModelConfig
from .errors import DoseDiffError
from .volume import Volume, atomic_write

CACHE_VERSION = 1
CACHE_ROIS = STACK_ROIS
PACK_CT_STEP_HU = 8.0
PACK_DOSE_STEP_GY = 0.1


def prepare_patient(p: openkbp.OpenKBPPatient, out_dir: Path, cfg: ModelConfig) -> dict:
    """Cache one OpenKBP patient; returns its index entry."""
    if p.dose is None:
        raise DoseDiffError(f"{p.pid} has no dose.csv; training needs the clinical dose.",
                            "Prepare only the train and validation splits, which have doses.")
    masks = dict(p.masks)
    masks[POSSIBLE_DOSE] = p.possible_dose
    return cache_case(p.pid, p.ct, masks, p.dose, out_dir, cfg)


def cache_case(pid: str, ct: Volume, masks: dict[str, Volume], dose: Volume, out_dir: Path, cfg: ModelConfig) -> dict:
    """Cache one case on the model's grid (masks include the possible-dose mask); returns its index entry."""
    stack = slice_stack(ct, masks, cfg)
    sl = stack.slices
    arrays = {"psdm": stack.psdm.astype(np.float16), "ct": stack.ct.astype(np.float16),
              "dose": cfg.norm.dose(dose.array[sl]).astype(np.float16)}
    for kind, arr in arrays.items():  # a killed run never leaves a truncated array behind
        atomic_write(out_dir / f"{pid}_{kind}.npy", lambda f, a=arr: np.save(f, a), overwrite=True)
    return {"pid": pid, "slices": [int(s) for s in sl], "n_slices_total": int(ct.array.shape[0]),
            "spacing": list(ct.spacing), "origin": [float(v) for v in ct.origin],
            "rois": sorted(r for r in masks if r != POSSIBLE_DOSE)}


def _cached(cache: Path, pid: str) -> bool:
    return all((cache / f"{pid}_{kind}.npy").is_file() for kind in ("ct", "psdm", "dose"))


def check_cache(cache: Path, split: str | None = "train", cfg: ModelConfig | None = None) -> dict:
    """The cache's index, refused with one clear message when the cache is missing, of
    another version or settings, or missing files (so training never starts on it)."""
    index_path = Path(cache) / "index.json"
    if not index_path.is_file():
        raise DoseDiffError(f"{cache} is not a training cache (no index.json).",
                            "Build one with dosediff prepare --split train=FOLDER --cache DIR.")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DoseDiffError(f"The cache index {index_path} is damaged ({exc}).",
                            "Delete the cache folder and run dosediff prepare again.") from None
    if not isinstance(index, dict) or index.get("version") != CACHE_VERSION:
        found = index.get("version") if isinstance(index, dict) else None
        raise DoseDiffError(f"The cache {cache} has version {found!r}, this DoseDiff reads version {CACHE_VERSION}.",
                            "Run dosediff prepare into a new cache folder.")
    if index.get("rois") != list(CACHE_ROIS) or index.get("norm") != (cfg or ModelConfig()).to_dict()["norm"] \
            or not isinstance(index.get("splits"), dict):
        raise DoseDiffError(f"The cache {cache} was built with other ROIs or normalisation.",
                            "Run dosediff prepare into a new cache folder.")
    if split is None:  # prepare fills the gaps itself
        return index
    entries = index["splits"].get(split)
    if not entries:
        raise DoseDiffError(f"The cache {cache} has no {split!r} patients.",
                            f"Run dosediff prepare with --split {split}=FOLDER.")
    for e in (e for entries in index["splits"].values() for e in entries):
        if not _cached(Path(cache), str(e.get("pid"))):
            raise DoseDiffError(f"The cache {cache} misses the arrays of {e.get('pid')}.",
                                "Run dosediff prepare again on the same folder (it fills the gaps).")
    return index


def _pack_bits(p: openkbp.OpenKBPPatient) -> np.ndarray:
    bits = np.zeros(p.possible_dose.array.shape, np.uint16)
    for i, roi in enumerate(CACHE_ROIS):
        m = p.possible_dose if roi == POSSIBLE_DOSE else p.masks.get(roi)
        if m is not None:
            bits |= (m.array != 0).astype(np.uint16) << i
    return bits


def pack_openkbp(split_dirs: dict[str, Path], out: Path, limits: dict[str, int] | None = None,
                 progress: Callable[[str], None] | None = None, overwrite: bool = False) -> Path:
    """Write the patients of each split (at most limits[split] of them) into one pack file."""
    def writer(path: Path) -> None:
        with lzma.open(path, "wb", preset=9) as fh:
            for split, folder in split_dirs.items():
                for pt in openkbp.patient_folders(folder)[:(limits or {}).get(split)]:
                    p = openkbp.read_patient(pt, with_dose=True)
                    if p.dose is None:
                        raise ValueError(f"{pt} has no dose.csv; a pack is for training")
                    sl = np.flatnonzero(p.possible_dose.array.reshape(len(p.possible_dose.array), -1).any(1))
                    meta = {"split": split, "pid": p.pid, "spacing": list(p.ct.spacing), "slices": sl.tolist(),
                            "shape": list(p.ct.array.shape), "rois": sorted(p.masks),
                            "ct_step_hu": PACK_CT_STEP_HU, "dose_step_gy": PACK_DOSE_STEP_GY}
                    np.save(fh, np.frombuffer(json.dumps(meta).encode(), np.uint8))
                    np.save(fh, np.round(p.ct.array[sl] / PACK_CT_STEP_HU).astype(np.int16))
                    np.save(fh, np.round(p.dose.array[sl] / PACK_DOSE_STEP_GY).clip(0, 65535).astype(np.uint16))
                    np.save(fh, _pack_bits(p))
                    if progress:
                        progress(f"{split}/{p.pid}")
    return atomic_write(out, writer, overwrite)


def read_pack(path: Path) -> Iterator[tuple[str, openkbp.OpenKBPPatient]]:
    """The patients of a pack, as `openkbp.read_patient` would give them on their slices."""
    with lzma.open(path, "rb") as fh:
        while True:
            try:
                meta = json.loads(np.load(fh, allow_pickle=False).tobytes())
            except EOFError:
                return
            ct_s, dose_s, bits = (np.load(fh, allow_pickle=False) for _ in range(3))
            shape, sl, spacing = tuple(meta["shape"]), np.asarray(meta["slices"], int), tuple(meta["spacing"])
            ct = np.full(shape, -openkbp.CT_OFFSET, np.float32)
            ct[sl] = ct_s * meta["ct_step_hu"]
            dose = np.zeros(shape, np.float32)
            dose[sl] = dose_s * meta["dose_step_gy"]
            vol = lambda a: Volume(a, spacing)  # noqa: E731
            masks = {r: vol(((bits >> i) & 1).astype(np.uint8)) for i, r in enumerate(CACHE_ROIS)
                     if r in meta["rois"]}
            pdm = vol(((bits >> CACHE_ROIS.index(POSSIBLE_DOSE)) & 1).astype(np.uint8))
            yield meta["split"], openkbp.OpenKBPPatient(meta["pid"], vol(ct), masks, pdm, vol(dose))


def _prepare_one(job: tuple[str, object, Path, dict]) -> tuple[str, dict]:
    split, source, out_dir, cfg_dict = job
    p = openkbp.read_patient(source, with_dose=True) if isinstance(source, Path) else source
    return split, prepare_patient(p, out_dir, ModelConfig.from_dict(cfg_dict))


def new_index(cfg: ModelConfig) -> dict:
    return {"version": CACHE_VERSION, "rois": list(CACHE_ROIS), "norm": cfg.to_dict()["norm"], "splits": {}}


def write_index(index: dict, out_dir: Path) -> None:
    text = json.dumps(index)
    atomic_write(Path(out_dir) / "index.json", lambda f: f.write_text(text), overwrite=True)


def add_to_index(index: dict, split: str, entry: dict, out_dir: Path) -> None:
    """Record a cached case (replacing an older entry of it) and save the index at once."""
    entries = [e for e in index["splits"].get(split, []) if e["pid"] != entry["pid"]]
    index["splits"][split] = sorted(entries + [entry], key=lambda e: (_pid_number(e["pid"]), e["pid"]))
    write_index(index, out_dir)


def prepare(split_dirs: dict[str, Path], out_dir: Path, cfg: ModelConfig,
            progress: Callable[[str], None] | None = None, pack: Path | None = None, workers: int = 1) -> Path:
    """Cache every patient of every split (or of a pack); cached patients are kept (resumable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "index.json"
    index = check_cache(out_dir, None, cfg) if index_path.exists() else new_index(cfg)
    done = {(split, e["pid"]) for split, entries in index["splits"].items() for e in entries
            if _cached(out_dir, e["pid"])}
    if pack is not None:
        sources = ((split, p) for split, p in read_pack(pack) if (split, p.pid) not in done)
    else:
        sources = ((split, pt) for split, folder in split_dirs.items()
                   for pt in openkbp.patient_folders(folder) if (split, pt.name) not in done)
    jobs = ((split, src, out_dir, cfg.to_dict()) for split, src in sources)
    with get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
        for split, entry in pool.imap_unordered(_prepare_one, jobs):
            add_to_index(index, split, entry, out_dir)
            if progress:
                progress(f"{split}/{entry['pid']}")
    return index_path


def _pid_number(pid: str) -> int:
    tail = pid.split("_")[-1]
    return int(tail) if tail.isdigit() else 0


class _Serial:
    """The one-process stand-in for a Pool (no start-up cost, easy to debug)."""

    def __enter__(self) -> "_Serial":
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def imap_unordered(fn, jobs):
        return map(fn, jobs)


def describe_cache(index: dict, init_card: dict | None = None) -> tuple[str, dict]:
    """What a model trained on this cache was trained on, for its card: counts, sites and
    prescriptions, never a patient identifier (cache keys of DICOM cases are anonymous)."""
    from .modelcard import DEFAULT_TRAINING_DATA

    entries = [e for es in index["splits"].values() for e in es]
    dicom = [e for e in entries if e.get("source") == "dicom"]
    data = {"openkbp_patients": len(entries) - len(dicom), "dicom_patients": len(dicom),
            "validation_patients": len(index["splits"].get("validation", [])),
            "sites": sorted({e.get("site", "unknown") for e in dicom}),
            "prescriptions_gy": sorted({tuple(e.get("prescriptions_gy") or ()) for e in dicom}, reverse=True),
            "scaled_to_model_levels": any(abs(float(e.get("scale", 1.0)) - 1.0) > 1e-6 for e in dicom)}
    data["prescriptions_gy"] = [list(p) for p in data["prescriptions_gy"]]
    if not dicom:
        text = DEFAULT_TRAINING_DATA
    else:
        levels = "; ".join("/".join(f"{g:g}" for g in p) + " Gy" if p else "by name" for p in data["prescriptions_gy"])
        text = (f"{len(dicom)} DICOM plans of the clinic that trained it (sites: {', '.join(data['sites'])}; "
                f"prescriptions: {levels}"
                + ("; doses scaled onto the model's 70/63/56 Gy levels" if data["scaled_to_model_levels"] else "")
                + ")" + (f" and {data['openkbp_patients']} OpenKBP patients" if data["openkbp_patients"] else "")
                + ".")
    init_data = (init_card or {}).get("training_data")
    if init_data and init_data != text:
        text += f" Fine-tuned from {init_card.get('name', 'a model')}, trained on: {init_data}"
    return text, data
