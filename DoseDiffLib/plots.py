"""Pictures a physicist would rather look at: DVH comparisons and dose overlays."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .config import TARGETS
from .volume import atomic_write

COLOURS = {"PTV70": "#d62728", "PTV63": "#ff7f0e", "PTV56": "#e7ba52", "Brainstem": "#9467bd",
           "SpinalCord": "#1f77b4", "RightParotid": "#2ca02c", "LeftParotid": "#98df8a",
           "Esophagus": "#8c564b", "Larynx": "#e377c2", "Mandible": "#7f7f7f"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cumulative_dvh(dose_in_roi: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Per cent of the ROI receiving at least each bin dose."""
    d = np.sort(dose_in_roi)
    return 100.0 * (d.size - np.searchsorted(d, bins, side="left")) / max(d.size, 1)


def save_figure(fig, path: str | Path, dpi: int, overwrite: bool) -> Path:
    """Through the one safe writer: never through a link, never half a PNG."""
    plt = _plt()
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"), overwrite)
    finally:
        plt.close(fig)


def dvh_comparison(reference: np.ndarray | None, prediction: np.ndarray, masks: Mapping[str, np.ndarray],
                   path: str | Path, title: str = "", overwrite: bool = False) -> Path:
    """Solid: reference (clinical plan); dashed: prediction."""
    plt = _plt()
    top = max(float(prediction.max()), float(reference.max()) if reference is not None else 0.0, 1.0)
    bins = np.linspace(0, top * 1.05, 400)
    fig, ax = plt.subplots(figsize=(8, 5))
    for roi, m in masks.items():
        m = m.astype(bool)
        if not m.any():
            continue
        c = COLOURS.get(roi)
        if reference is not None:
            ax.plot(bins, cumulative_dvh(reference[m], bins), color=c, lw=1.6, label=f"{roi}")
        ax.plot(bins, cumulative_dvh(prediction[m], bins), color=c, lw=1.6, ls="--",
                label=None if reference is not None else roi)
    ax.set(xlabel="Dose (Gy)", ylabel="Volume (%)", ylim=(0, 101), xlim=(0, bins[-1]),
           title=title or ("DVH: plan (solid) vs DoseDiff (dashed)" if reference is not None else "DVH: DoseDiff"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.text(0.01, 0.01, "DoseDiff prediction: research and planning guidance only, not a TPS dose calculation.",
             fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path, 110, overwrite)


def dose_overlay(ct_hu: np.ndarray, dose: np.ndarray, masks: Mapping[str, np.ndarray],
                 spacing_xyz: tuple[float, float, float], path: str | Path, title: str = "",
                 overwrite: bool = False) -> Path:
    """Axial, coronal and sagittal planes through the highest target, dose in colour wash."""
    plt = _plt()
    inside = np.argwhere((ct_hu > -500) | (dose > 0))
    if inside.size:  # crop to the patient with a small margin
        lo = np.maximum(inside.min(0) - 3, 0)
        hi = inside.max(0) + 4
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        ct_hu, dose = ct_hu[crop], dose[crop]
        masks = {n: m[crop] for n, m in masks.items()}
    target = next((masks[t] for t in TARGETS if t in masks and masks[t].any()), None)
    centre = np.argwhere(target).mean(0).round().astype(int) if target is not None else \
        np.array(np.unravel_index(np.argmax(dose), dose.shape))
    k, j, i = centre
    sx, sy, sz = spacing_xyz
    views = [("Axial", ct_hu[k], dose[k], {n: m[k] for n, m in masks.items()}, sy / sx),
             ("Coronal", ct_hu[:, j][::-1], dose[:, j][::-1], {n: m[:, j][::-1] for n, m in masks.items()}, sz / sx),
             ("Sagittal", ct_hu[:, :, i][::-1], dose[:, :, i][::-1], {n: m[:, :, i][::-1] for n, m in masks.items()},
              sz / sy)]
    vmax = max(float(dose.max()), 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(14, 5))
    for ax, (name, c, d, ms, aspect) in zip(axes, views):
        ax.imshow(c, cmap="gray", vmin=-200, vmax=300, aspect=aspect)
        im = ax.imshow(np.ma.masked_less(d, 0.05 * vmax), cmap="jet", alpha=0.45, vmin=0, vmax=vmax, aspect=aspect)
        for roi, m in ms.items():
            if m.any():
                ax.contour(m, levels=[0.5], colors=[COLOURS.get(roi, "w")], linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(im, ax=axes, fraction=0.015, label="Dose (Gy)")
    fig.suptitle(title or "DoseDiff predicted dose (research and planning guidance only)")
    return save_figure(fig, path, 100, overwrite)
