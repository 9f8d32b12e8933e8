"""Network inputs for one patient on the model's grid: normalised CT and condition stack.

Training (`prepare`) and prediction build the inputs here and nowhere else, in the
channel order the model card lists, so the two can never disagree.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .config import ModelConfig
from .psdm import psdm
from .volume import Volume


def build_inputs(ct_hu: Volume, masks: Mapping[str, Volume], cfg: ModelConfig,
                 dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Return (ct (Z, H, W), conditions (Z, C, H, W)) in network units.

    `masks` maps model ROI names (and `possible_dose_mask`) to uint8 volumes on the CT
    grid; absent ROIs give zero masks and zero PSDMs, as the model was trained.
    """
    grid = ct_hu.grid
    for name, m in masks.items():
        if m.grid != grid:
            raise ValueError(f"mask {name} is not on the CT grid")
    c = cfg.conditions
    z, h, w = grid.shape
    cond = np.zeros((z, c.n_channels, h, w), dtype)
    for name, weight in c.ptv_weights:
        if name in masks:
            cond[:, 0] += weight * masks[name].array
    for i, name in enumerate(c.masks):
        if name in masks:
            cond[:, 1 + i] = masks[name].array
    base = 1 + len(c.masks)
    for i, name in enumerate(c.psdms):
        if name in masks and masks[name].array.any():
            cond[:, base + i] = psdm(masks[name]).array
    ct = cfg.norm.ct(ct_hu.array.astype(np.float32)).astype(dtype)
    return ct, cond


def active_slices(possible_dose: np.ndarray) -> np.ndarray:
    """Indices of slices where dose is possible: the only ones worth predicting."""
    return np.flatnonzero(possible_dose.reshape(possible_dose.shape[0], -1).any(axis=1))
