"""Training losses on the dose itself, beside the diffusion objective.

OpenKBP's DVH score compares, per ROI, dose quantiles (D99, D95, D1 of the targets) and
the mean and near-maximum dose of the organs. All of them are functions of the sorted
doses inside the ROI, so an L1 between the sorted predicted and sorted clinical doses of
each ROI bounds every one of those errors (the mean error included) and is
differentiable through the sort. On a slice that bound is loose: the score takes its
quantiles over the whole patient, where a few slices' edges decide D99 and a few voxels
D0.1cc, so `dvh_metric_l1` scores a whole patient's stack by the score's own cells.

Two thirds of the bundled model's absolute error lies where the plan gives 5-45 Gy: beam
paths and fall-off, which a voxel L1 learns as a blur. `gradient_l1` compares the in-plane
dose gradients, so a fall-off predicted too shallow costs along its whole width.
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


def dvh_metric_l1(pred: torch.Tensor, ref: torch.Tensor, rois: torch.Tensor, is_target: torch.Tensor,
                  hottest: int) -> torch.Tensor:
    """Mean over the OpenKBP DVH score's cells of |predicted - clinical| for one patient.

    pred, ref (N, 1, H, W): a whole patient's slices; rois (N, R, H, W) boolean; is_target
    (R,) boolean: D99, D95, D1 for targets, D0.1cc (the `hottest` voxels' percentile, as
    metrics.roi_dose_metrics takes it) and the mean for organs. Percentiles interpolate
    linearly, as numpy's do, so the gradient reaches the one or two voxels each cell reads.
    Empty ROIs have no cells; with none at all the loss is 0 (still a graph node).
    """
    cells = []
    for r in range(rois.shape[1]):
        m = rois[:, r:r + 1]
        n = int(m.sum())
        if n == 0:
            continue
        p, c = pred[m], ref[m]
        if bool(is_target[r]):
            q = torch.tensor([0.01, 0.05, 0.99], dtype=p.dtype, device=p.device)
            cells.append((torch.quantile(p, q) - torch.quantile(c, q)).abs())
        else:
            q = torch.tensor([1.0 - min(hottest, n) / n], dtype=p.dtype, device=p.device)
            cells.append((torch.quantile(p, q) - torch.quantile(c, q)).abs())
            cells.append((p.mean() - c.mean()).abs()[None])
    if not cells:
        return pred.sum() * 0.0
    return torch.cat(cells).mean()


def gradient_l1(pred: torch.Tensor, ref: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the forward differences of predicted and clinical dose along x and y.

    pred, ref (B, 1, H, W) on one grid (every cached slice shares OpenKBP's pixel size, so
    differences per pixel are gradients up to one constant); inside (B, 1, H, W) boolean: a
    difference counts where both of its pixels are inside. With none inside, 0 (a graph node).
    """
    terms, count = [], 0
    for dim in (-1, -2):
        n = pred.shape[dim] - 1
        both = inside.narrow(dim, 0, n) & inside.narrow(dim, 1, n)
        diff = (pred.diff(dim=dim) - ref.diff(dim=dim)).abs()
        terms.append((diff * both).sum())
        count += int(both.sum())
    if count == 0:
        return pred.sum() * 0.0
    return (terms[0] + terms[1]) / count
