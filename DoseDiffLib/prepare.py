"""The training cache: conditions computed once per patient, slices ready to stream.

Per patient the cache keeps, for the slices where dose is possible, the normalised CT,
the normalised dose and one PSDM per ROI (float16). Masks are not stored: a PSDM is
positive exactly inside its ROI, so every mask channel is recovered as psdm > 0, and
augmentation that warps the PSDMs keeps masks and distances consistent for free.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import openkbp
from .conditions import active_slices
from .config import POSSIBLE_DOSE, ModelConfig
from .psdm import psdm

CACHE_VERSION = 1
CACHE_ROIS = openkbp.ROIS + (POSSIBLE_DOSE,)


def prepare_patient(folder: Path, out_dir: Path, cfg: ModelConfig) -> dict:
    """Cache one patient; returns its index entry."""
    p = openkbp.read_patient(folder, with_dose=True)
    if p.dose is None:
        raise ValueError(f"{folder} has no dose.csv; training needs the clinical dose")
    masks = dict(p.masks)
    masks[POSSIBLE_DOSE] = p.possible_dose
    sl = active_slices(p.possible_dose.array)
    ps = np.zeros((len(sl), len(CACHE_ROIS)) + p.ct.array.shape[1:], np.float16)
    for i, roi in enumerate(CACHE_ROIS):
        if roi in masks and masks[roi].array.any():
            ps[:, i] = psdm(masks[roi]).array[sl]
    np.save(out_dir / f"{p.pid}_psdm.npy", ps)
    np.save(out_dir / f"{p.pid}_ct.npy", cfg.norm.ct(p.ct.array[sl]).astype(np.float16))
    np.save(out_dir / f"{p.pid}_dose.npy", cfg.norm.dose(p.dose.array[sl]).astype(np.float16))
    return {"pid": p.pid, "slices": [int(s) for s in sl], "n_slices_total": int(p.ct.array.shape[0]),
            "spacing": list(p.ct.spacing), "rois": sorted(p.masks)}


def prepare(split_dirs: dict[str, Path], out_dir: Path, cfg: ModelConfig,
            progress: Callable[[str], None] | None = None) -> Path:
    """Cache every patient of every split; already cached patients are kept (resumable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"version": CACHE_VERSION,
                                                                            "rois": list(CACHE_ROIS),
                                                                            "norm": cfg.to_dict()["norm"],
                                                                            "splits": {}}
    if index.get("norm") != cfg.to_dict()["norm"] or index.get("rois") != list(CACHE_ROIS):
        raise ValueError(f"cache {out_dir} was built with other settings; use a new folder")
    for split, folder in split_dirs.items():
        entries = {e["pid"]: e for e in index["splits"].get(split, [])}
        for pt in openkbp.patient_folders(folder):
            if pt.name in entries:
                continue
            entries[pt.name] = prepare_patient(pt, out_dir, cfg)
            index["splits"][split] = list(entries.values())
            tmp = index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_path)
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
