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
from .conditions import STACK_ROIS, slice_stack
from .config import POSSIBLE_DOSE, ModelConfig

CACHE_VERSION = 1
CACHE_ROIS = STACK_ROIS


def prepare_patient(folder: Path, out_dir: Path, cfg: ModelConfig) -> dict:
    """Cache one patient; returns its index entry."""
    p = openkbp.read_patient(folder, with_dose=True)
    if p.dose is None:
        raise ValueError(f"{folder} has no dose.csv; training needs the clinical dose")
    masks = dict(p.masks)
    masks[POSSIBLE_DOSE] = p.possible_dose
    stack = slice_stack(p.ct, masks, cfg)
    sl = stack.slices
    np.save(out_dir / f"{p.pid}_psdm.npy", stack.psdm.astype(np.float16))
    np.save(out_dir / f"{p.pid}_ct.npy", stack.ct.astype(np.float16))
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
