"""The training cache: conditions computed once per patient, slices ready to stream.

Per patient the cache keeps, for the slices where dose is possible, the normalised CT,
the normalised dose and one PSDM per ROI (float16). Masks are not stored: a PSDM is
positive exactly inside its ROI, so every mask channel is recovered as psdm > 0, and
augmentation that warps the PSDMs keeps masks and distances consistent for free.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import openkbp
from .conditions import active_slices
from .config import POSSIBLE_DOSE, ModelConfig
from .errors import DoseDiffError
from .psdm import psdm
from .volume import atomic_write

CACHE_VERSION = 1
CACHE_ROIS = openkbp.ROIS + (POSSIBLE_DOSE,)


def prepare_patient(folder: Path, out_dir: Path, cfg: ModelConfig) -> dict:
    """Cache one patient; returns its index entry."""
    p = openkbp.read_patient(folder, with_dose=True)
    if p.dose is None:
        raise DoseDiffError(f"{folder} has no dose.csv; training needs the clinical dose.",
                            "Prepare only the train and validation splits, which have doses.")
    masks = dict(p.masks)
    masks[POSSIBLE_DOSE] = p.possible_dose
    sl = active_slices(p.possible_dose.array)
    ps = np.zeros((len(sl), len(CACHE_ROIS)) + p.ct.array.shape[1:], np.float16)
    for i, roi in enumerate(CACHE_ROIS):
        if roi in masks and masks[roi].array.any():
            ps[:, i] = psdm(masks[roi]).array[sl]
    arrays = {"psdm": ps, "ct": cfg.norm.ct(p.ct.array[sl]).astype(np.float16),
              "dose": cfg.norm.dose(p.dose.array[sl]).astype(np.float16)}
    for kind, arr in arrays.items():  # a killed run never leaves a truncated array behind
        atomic_write(out_dir / f"{p.pid}_{kind}.npy", lambda f, a=arr: np.save(f, a), overwrite=True)
    return {"pid": p.pid, "slices": [int(s) for s in sl], "n_slices_total": int(p.ct.array.shape[0]),
            "spacing": list(p.ct.spacing), "rois": sorted(p.masks)}


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
        raise DoseDiffError(f"The cache {cache} has version {found}, this DoseDiff reads version {CACHE_VERSION}.",
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


def prepare(split_dirs: dict[str, Path], out_dir: Path, cfg: ModelConfig,
            progress: Callable[[str], None] | None = None) -> Path:
    """Cache every patient of every split; already cached patients are kept (resumable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "index.json"
    index = check_cache(out_dir, None, cfg) if index_path.exists() else {"version": CACHE_VERSION,
                                                                         "rois": list(CACHE_ROIS),
                                                                         "norm": cfg.to_dict()["norm"],
                                                                         "splits": {}}
    for split, folder in split_dirs.items():
        entries = {e["pid"]: e for e in index["splits"].get(split, [])}
        for pt in openkbp.patient_folders(folder):
            if pt.name in entries and _cached(out_dir, pt.name):
                continue
            entries[pt.name] = prepare_patient(pt, out_dir, cfg)
            index["splits"][split] = list(entries.values())
            text = json.dumps(index)
            atomic_write(index_path, lambda f: f.write_text(text), overwrite=True)
            if progress:
                progress(f"{split}/{pt.name}")
    return index_path


def conditions_from_psdm(ps: torch.Tensor, cfg: ModelConfig,
                         rois: tuple[str, ...] = CACHE_ROIS) -> torch.Tensor:
    """Rebuild the ordered condition channels (B, C, H, W) from cached PSDMs (B, R, H, W)."""
    pos = {r: i for i, r in enumerate(rois)}
    c = cfg.conditions
    inside = (ps > 0).to(ps.dtype)
    chans = [sum(w * inside[:, pos[n]] for n, w in c.ptv_weights)]
    chans += [inside[:, pos[m]] for m in c.masks]
    chans += [ps[:, pos[p]] for p in c.psdms]
    return torch.stack(chans, dim=1)
