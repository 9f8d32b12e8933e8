"""Network inputs: the one place where the CT and ROI masks become network channels.

Training (from the cache) and prediction (from a case on the model grid) both go
through `gather` then `assemble`, in the channel order of `ConditionConfig`, so the
two can never disagree (the authors' code shipped a 96-vs-128 channel mismatch).
Everything starts from a stack of PSDMs in `STACK_ROIS` order: a PSDM is positive
exactly inside its ROI, so masks, the PTV image and beam lines are all derived from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .config import POSSIBLE_DOSE, ROIS, ModelConfig
from .psdm import psdm
from .volume import Volume

STACK_ROIS: tuple[str, ...] = ROIS + (POSSIBLE_DOSE,)
# Left-right pairs: a mirrored patient has the other parotid on this side.
LR_PAIRS = (("RightParotid", "LeftParotid"),)


@dataclass
class SliceStack:
    """The slices where dose is possible, in network units: what `gather` reads from."""

    slices: np.ndarray   # (N,) indices into the case's Z axis
    ct: np.ndarray       # (N, H, W) normalised CT
    psdm: np.ndarray     # (N, R, H, W) PSDMs in STACK_ROIS order
    stage1: np.ndarray | None = None  # (N, H, W) a first stage's dose, for a refiner (ModelConfig.stage1)


def active_slices(possible_dose: np.ndarray) -> np.ndarray:
    """Indices of slices where dose is possible: the only ones worth predicting."""
    return np.flatnonzero(possible_dose.reshape(possible_dose.shape[0], -1).any(axis=1))


def psdm_stack(masks: Mapping[str, Volume], shape: tuple[int, int, int], dtype=np.float32) -> np.ndarray:
    """(Z, R, H, W) PSDMs of the ROIs in STACK_ROIS order; absent or empty ROIs are zero."""
    out = np.zeros((shape[0], len(STACK_ROIS)) + tuple(shape[1:]), dtype)
    for i, roi in enumerate(STACK_ROIS):
        if roi in masks and masks[roi].array.any():
            out[:, i] = psdm(masks[roi]).array
    return out


def slice_stack(ct_hu: Volume, masks: Mapping[str, Volume], cfg: ModelConfig) -> SliceStack:
    """A case on the model grid as the active-slice stack the network reads."""
    for name, m in masks.items():
        if m.grid != ct_hu.grid:
            raise ValueError(f"mask {name} is not on the CT grid")
    sl = active_slices(masks[POSSIBLE_DOSE].array)
    ps = psdm_stack(masks, ct_hu.array.shape)[sl]
    ct = cfg.norm.ct(ct_hu.array[sl].astype(np.float32)).astype(np.float32)
    return SliceStack(sl, ct, ps)


def neighbours(n: int, rows: np.ndarray, offsets: tuple[int, ...]) -> np.ndarray:
    """(B, len(offsets)) stack rows of each row's neighbours; the stack's ends repeat."""
    return np.clip(np.asarray(rows)[:, None] + np.asarray(offsets, int)[None, :], 0, n - 1)


def gather(ct: np.ndarray, ps: np.ndarray, rows: np.ndarray, cfg: ModelConfig,
           stage1: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw network material for some rows of a slice stack, as float32 tensors.

    Returns the CT with its context slices (B, 1 + 2k, H, W), for a refiner followed by
    the stage-1 dose of the same slices (B, 2 + 4k, H, W); the slice's PSDMs (B, R, H, W)
    and the targets' PSDMs on the context slices (B, 2k, T, H, W).
    """
    c = cfg.conditions
    rows = np.asarray(rows)
    nb = neighbours(len(ct), rows, c.context_offsets)
    t_idx = [STACK_ROIS.index(n) for n, _ in c.ptv_weights]
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    ct_ctx = np.concatenate([ct[rows][:, None], ct[nb]], axis=1) if nb.size else ct[rows][:, None]
    if c.stage1_dose:
        if stage1 is None:
            raise ValueError("this model refines a first stage's dose, and none was given")
        ct_ctx = np.concatenate([ct_ctx, stage1[rows][:, None], stage1[nb]], axis=1)
    ps_ctx = ps[nb][:, :, t_idx] if nb.size else np.zeros((len(rows), 0, len(t_idx)) + ct.shape[1:], np.float32)
    return f(ct_ctx), f(ps[rows]), f(ps_ctx)


def beam_directions(cfg: ModelConfig, batch: int) -> torch.Tensor:
    """(B, A, 2) unit (x, y) pixel directions of the beams in the patient's own frame."""
    a = torch.tensor([math.radians(d) for d in cfg.conditions.beam_angles_deg], dtype=torch.float32)
    return torch.stack([torch.sin(a), torch.cos(a)], -1).expand(batch, -1, -1)


def beam_lines(hits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W): the share of the beam lines through each pixel that cross target k.

    hits (B, A, K, H, W) from beam_hits. Parallel-beam approximation: pixels are binned,
    one pixel wide, by their coordinate across each beam; a line crosses the target if
    any target pixel of that slice shares its bin.
    """
    return hits.mean(1)


def beam_hits(targets: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """(B, A, K, H, W): 1 where the line of beam a through the pixel crosses target k.

    targets (B, K, H, W) boolean; directions (B, A, 2) unit (x, y) vectors in pixels.
    """
    b, k, h, w = targets.shape
    a = directions.shape[1]
    dev = targets.device
    directions = directions.to(dev)
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=dev) - (h - 1) / 2,
                          torch.arange(w, dtype=torch.float32, device=dev) - (w - 1) / 2, indexing="ij")
    across = directions[..., 1:2] * x.reshape(1, 1, -1) - directions[..., 0:1] * y.reshape(1, 1, -1)
    half = math.ceil(math.hypot(h, w) / 2) + 1
    idx = torch.round(across).long() + half                                  # (B, A, HW)
    idx = idx[:, :, None, :].expand(b, a, k, h * w)
    hit = torch.zeros(b, a, k, 2 * half + 1, device=dev)
    src = targets.reshape(b, 1, k, h * w).expand(b, a, k, h * w).float()
    hit.scatter_reduce_(3, idx, src, reduce="amax")
    return hit.gather(3, idx).reshape(b, a, k, h, w)


def beam_depths(density: torch.Tensor, directions: torch.Tensor, pixel_mm: float) -> torch.Tensor:
    """(B, A, H, W) water-equivalent depth (mm) of each pixel along each beam, from where it enters the image.

    density (B, H, W) relative to water; directions (B, A, 2) the beams' travel directions
    (x, y) in pixels. Each beam's view is resampled so that it travels down the rows, the
    density summed down them, and the sums resampled back.
    """
    b, h, w = density.shape
    a = directions.shape[1]
    dev = density.device
    d = directions.to(dev).reshape(b * a, 2)
    e = torch.stack([d[:, 1], -d[:, 0]], -1)                              # across the beam
    side = math.ceil(math.hypot(h, w)) + 2
    c = torch.arange(side, dtype=torch.float32, device=dev) + 0.5 - side / 2
    yr, xr = torch.meshgrid(c, c, indexing="ij")                          # the beam's view, centred pixels
    qx = xr[None] * e[:, 0, None, None] + yr[None] * d[:, 0, None, None]
    qy = xr[None] * e[:, 1, None, None] + yr[None] * d[:, 1, None, None]
    grid = torch.stack([2 * qx / w, 2 * qy / h], -1)                      # align_corners=False units
    src = density[:, None].expand(b, a, h, w).reshape(b * a, 1, h, w)
    view = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    depth = (view.cumsum(-2) - 0.5 * view) * pixel_mm                     # to the pixel's centre
    ys = torch.arange(h, dtype=torch.float32, device=dev) + 0.5 - h / 2
    xs = torch.arange(w, dtype=torch.float32, device=dev) + 0.5 - w / 2
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    u = x[None] * e[:, 0, None, None] + y[None] * e[:, 1, None, None]
    v = x[None] * d[:, 0, None, None] + y[None] * d[:, 1, None, None]
    back = torch.stack([2 * u / side, 2 * v / side], -1)
    return F.grid_sample(depth, back, mode="bilinear", padding_mode="border",
                         align_corners=False).reshape(b, a, h, w)


def attenuated_beams(hits: torch.Tensor, ct: torch.Tensor, directions: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(B, K, H, W): the mean over beams of exp(-mu * depth) on the lines that cross target k.

    hits (B, A, K, H, W) from beam_hits; ct (B, H, W) normalised. A first-order picture of
    each beam's dose: beams that cross the target, fading with the water-equivalent depth
    at which they reach the pixel (density from the CT's HU).
    """
    density = ((cfg.norm.hu(ct) + 1000.0) / 1000.0).clamp(0.0, 3.0)
    depth = beam_depths(density, directions, cfg.grid.spacing_mm)          # (B, A, H, W)
    fade = torch.exp(-cfg.conditions.beam_mu_per_mm * depth)
    return (hits * fade[:, :, None]).mean(1)


def beams_via(target_hits: torch.Tensor, oar_hits: torch.Tensor) -> torch.Tensor:
    """(B, O, H, W): the share of the beam lines through each pixel that cross any target and OAR o.

    target_hits (B, A, K, H, W) and oar_hits (B, A, O, H, W) from beam_hits.
    """
    return (target_hits.amax(2, keepdim=True) * oar_hits).mean(1)


def assemble(ct_ctx: torch.Tensor, ps: torch.Tensor, ps_ctx: torch.Tensor, cfg: ModelConfig,
             directions: torch.Tensor | None = None,
             mirrored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ordered network inputs (ct (B, Cct, H, W), conditions (B, C, H, W)).

    `directions` are the beams in the image frame; augmentation that rotates or mirrors
    the patient passes them rotated or mirrored with it (default: the patient's frame), and
    `mirrored` (B,) says which slices it mirrored (default: none).
    """
    c = cfg.conditions
    pos = {r: i for i, r in enumerate(STACK_ROIS)}
    inside = (ps > 0).to(ps.dtype)
    chans = [sum(w * inside[:, pos[n]] for n, w in c.ptv_weights)]
    chans += [inside[:, pos[m]] for m in c.masks]
    chans += [ps[:, pos[p]] for p in c.psdms]
    weights = torch.tensor([w for _, w in c.ptv_weights], dtype=ps.dtype, device=ps.device)
    for j in range(len(c.context_offsets)):
        chans.append(((ps_ctx[:, j] > 0).to(ps.dtype) * weights[:, None, None]).sum(1))
    if c.beam_targets:
        if directions is None:
            directions = beam_directions(cfg, ps.shape[0])
        targets = inside[:, [pos[t] for t in c.beam_targets]] > 0
        hits = beam_hits(targets, directions)                              # once, for every kind of beam channel
        chans += list(beam_lines(hits).unbind(1))
        if c.beam_mu_per_mm > 0:
            chans += list(attenuated_beams(hits, ct_ctx[:, 0], directions, cfg).unbind(1))
        if c.beam_oars:
            oars = inside[:, [pos[o] for o in c.beam_oars]] > 0
            chans += list(beams_via(hits, beam_hits(oars, directions)).unbind(1))
    if c.mirror_flag:
        flag = torch.zeros(ps.shape[0], dtype=ps.dtype, device=ps.device) if mirrored is None else mirrored
        chans.append(flag.to(ps.dtype).reshape(-1, 1, 1).expand(-1, *ps.shape[-2:]))
    return ct_ctx, torch.stack(chans, dim=1)


def mirror_channels(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """Channel permutations (ct, conditions) that go with a left-right mirror of the image."""
    def perm(names: list[str]) -> list[int]:
        swap = {}
        for r, l in LR_PAIRS:
            swap.update({r: l, l: r})
        def other(name: str) -> str:
            kind, _, roi = name.partition(":")
            return f"{kind}:{swap[roi]}" if roi in swap else name
        return [names.index(other(n)) for n in names]
    return perm(cfg.conditions.ct_channel_names()), perm(cfg.conditions.channel_names())


def mirror_view(ct: torch.Tensor, cond: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Assembled inputs of the left-right mirrored patient: flipped, paired channels swapped
    and the mirror flag (if the model has one) toggled, so mirroring twice is the identity."""
    perm_ct, perm_cond = mirror_channels(cfg)
    ct, cond = ct[:, perm_ct].flip(-1), cond[:, perm_cond].flip(-1)
    if cfg.conditions.mirror_flag:
        cond = cond.clone()
        cond[:, -1] = 1 - cond[:, -1]
    return ct, cond
