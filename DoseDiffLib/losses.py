"""Training losses on the dose itself, beside the diffusion objective.

OpenKBP's DVH score compares, per ROI, dose quantiles (D99, D95, D1 of the targets) and
the mean and near-maximum dose of the organs. All of them are functions of the sorted
doses inside the ROI, so an L1 between the sorted predicted and sorted clinical doses of
each ROI bounds every one of those errors (the mean error included) and is
differentiable through the sort.
"""
from __future__ import annotations

import torch

_PAD = 1e4  # sorts after every dose in network units ([-1, 1])


def sorted_dose_l1(pred: torch.Tensor, ref: torch.Tensor, rois: torch.Tensor, min_pixels: int = 4) -> torch.Tensor:
    """Mean over (slice, ROI) pairs of the L1 between sorted doses inside the ROI.

    pred, ref (B, 1, H, W); rois (B, R, H, W) boolean. Pairs with fewer than
    `min_pixels` pixels are left out; with none left the loss is 0 (still a graph node).
    """
    b, r = rois.shape[:2]
    m = rois.reshape(b, r, -1)
    n = m.sum(-1)                                                 # (B, R)
    def ordered(x: torch.Tensor) -> torch.Tensor:
        v = x.reshape(b, 1, -1).expand(b, r, -1)
        return torch.where(m, v, torch.full_like(v, _PAD)).sort(-1).values
    rank = torch.arange(m.shape[-1], device=m.device)
    valid = rank[None, None, :] < n[..., None]
    err = ((ordered(pred) - ordered(ref)).abs() * valid).sum(-1) / n.clamp_min(1)
    use = n >= min_pixels
    if not use.any():
        return pred.sum() * 0.0
    return err[use].mean()
