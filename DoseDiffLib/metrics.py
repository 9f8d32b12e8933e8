"""Dose comparison metrics, following the official OpenKBP definitions exactly.

Dose score: sum over all voxels of |reference - prediction| / voxels in the possible-
dose mask (dose outside the mask is penalised). DVH metrics are numpy percentiles
(linear interpolation) of the dose inside the reference ROI: targets D99, D95, D1;
organs D0.1cc and Dmean (one naming, DOSE_METRICS, here and in every table). The DVH score pools the absolute differences of every
(patient, ROI, metric) cell that exists.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from .config import OARS, PEAK_DOSE_GY, TARGETS


def dose_score(reference: np.ndarray, prediction: np.ndarray, possible_dose: np.ndarray) -> float:
    n = int(np.count_nonzero(possible_dose))
    if n == 0:
        raise ValueError("empty possible-dose mask")
    return float(np.abs(reference.astype(np.float64) - prediction).sum() / n)


# One naming for every per-ROI dose figure, in the order tables list them. The OpenKBP
# DVH score counts the first three for targets and the last two for organs.
DOSE_METRICS = ("D99", "D95", "D1", "Dmean", "D0.1cc")
SCORED_TARGET_METRICS = ("D99", "D95", "D1")
SCORED_OAR_METRICS = ("D0.1cc", "Dmean")


def roi_dose_metrics(dose_in_roi: np.ndarray, voxel_volume_mm3: float) -> dict[str, float]:
    """DOSE_METRICS of one non-empty ROI: numpy percentiles (linear interpolation), and
    D0.1cc as OpenKBP takes it (the hottest round(100 mm3 / voxel) voxels, at least one)."""
    d = dose_in_roi
    n_tenth_cc = max(1.0, float(np.round(100.0 / voxel_volume_mm3)))
    values = (float(np.percentile(d, 1)), float(np.percentile(d, 5)), float(np.percentile(d, 99)),
              float(d.mean()), float(np.percentile(d, 100.0 - n_tenth_cc / d.size * 100.0)))
    return dict(zip(DOSE_METRICS, values))


def dvh_metrics(dose: np.ndarray, masks: Mapping[str, np.ndarray], voxel_volume_mm3: float,
                targets: Iterable[str] = tuple(TARGETS), oars: Iterable[str] = OARS) -> dict[tuple[str, str], float]:
    """{(roi, metric): Gy}: the cells the OpenKBP DVH score counts, for every ROI present (non-empty)."""
    out: dict[tuple[str, str], float] = {}
    for rois, scored in ((oars, SCORED_OAR_METRICS), (targets, SCORED_TARGET_METRICS)):
        for roi in rois:
            m = masks.get(roi)
            if m is None or not m.any():
                continue
            values = roi_dose_metrics(dose[m.astype(bool)], voxel_volume_mm3)
            out.update({(roi, k): values[k] for k in scored})
    return out


def dvh_errors(reference: Mapping, prediction: Mapping) -> dict[tuple[str, str], float]:
    return {k: abs(reference[k] - prediction[k]) for k in reference}


def dvh_score(errors_per_patient: Iterable[Mapping]) -> float:
    cells = [e for errs in errors_per_patient for e in errs.values()]
    return float(np.mean(cells)) if cells else float("nan")


# --- beyond OpenKBP: the paper's image metrics and clinical indices ---------------

def slice_streak(dose: np.ndarray, mask: np.ndarray) -> float:
    """Mean |dose(z+1) - dose(z)| over voxel pairs inside the mask on both slices (Gy).

    Slice-by-slice prediction shows as steps between neighbouring slices; compared with
    the same figure of the clinical plan it measures how much of that is artefact.
    """
    both = mask[1:].astype(bool) & mask[:-1].astype(bool)
    if not both.any():
        return 0.0
    return float(np.abs(np.diff(dose.astype(np.float64), axis=0))[both].mean())


def slice_roughness(dose: np.ndarray, mask: np.ndarray) -> float:
    """Mean |dose(z) - (dose(z-1) + dose(z+1)) / 2| over voxels inside the mask on all three
    slices (Gy).

    A dose gradient along z is physics and raises `slice_streak` alike in plan and
    prediction; noise between independently predicted slices shows here, where a steady
    gradient cancels.
    """
    m = mask.astype(bool)
    inside = m[1:-1] & m[:-2] & m[2:]
    if not inside.any():
        return 0.0
    d = dose.astype(np.float64)
    return float(np.abs(d[1:-1] - 0.5 * (d[:-2] + d[2:]))[inside].mean())


def mae_in(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray) -> float:
    m = mask.astype(bool)
    return float(np.abs(reference[m] - prediction[m]).mean())


def psnr_in(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray, peak: float = PEAK_DOSE_GY) -> float:
    m = mask.astype(bool)
    mse = float(((reference[m] - prediction[m]) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def ssim_in(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray, peak: float = PEAK_DOSE_GY,
            sigma: float = 1.5) -> float:
    """Mean 2-D SSIM (Gaussian window, Wang et al. 2004) over the mask, slice by slice."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    x, y = reference.astype(np.float64), prediction.astype(np.float64)
    f = lambda a: gaussian_filter(a, sigma=(0, sigma, sigma))  # noqa: E731  in-plane window
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[mask.astype(bool)].mean())


def dose_at_volume_percent(dose_in_roi: np.ndarray, percent: float) -> float:
    """D_x%: the minimum dose received by the hottest x % of the ROI."""
    return float(np.percentile(dose_in_roi, 100.0 - percent))


def volume_at_dose_percent(dose_in_roi: np.ndarray, gy: float) -> float:
    """V_xGy: per cent of the ROI receiving at least x Gy."""
    return float(100.0 * np.count_nonzero(dose_in_roi >= gy) / dose_in_roi.size)


def homogeneity_index(dose_in_ptv: np.ndarray) -> float:
    """ICRU 83: (D2% - D98%) / D50%; NaN (undefined, left out of means) when half the PTV gets no dose."""
    d50 = dose_at_volume_percent(dose_in_ptv, 50)
    if d50 <= 0:
        return float("nan")
    return (dose_at_volume_percent(dose_in_ptv, 2) - dose_at_volume_percent(dose_in_ptv, 98)) / d50


def paddick_conformity(dose: np.ndarray, ptv: np.ndarray, prescription_gy: float) -> float:
    """TV_PIV^2 / (TV * PIV), with PIV the volume receiving the prescription dose."""
    piv = dose >= prescription_gy
    tv = ptv.astype(bool)
    n_tv, n_piv = np.count_nonzero(tv), np.count_nonzero(piv)
    if n_tv == 0 or n_piv == 0:
        return 0.0
    return float(np.count_nonzero(tv & piv) ** 2 / (n_tv * n_piv))


def gamma_pass_rate(reference: np.ndarray, evaluated: np.ndarray, spacing_zyx: tuple[float, float, float],
                    dose_percent: float = 3.0, dta_mm: float = 3.0, cutoff_percent: float = 10.0,
                    interp_fraction: int = 10) -> float:
    """Global 3-D gamma pass rate: per cent of reference points above the cutoff with gamma <= 1.

    A point passes when some evaluated point within the DTA sphere satisfies
    dr^2/DTA^2 + dD^2/dDose^2 <= 1, so only shifts inside the sphere matter. Shifts on a
    lattice of step DTA/interp_fraction are tried nearest first, each only on the points
    that have not passed yet, with the evaluated dose linearly interpolated.
    """
    from scipy.ndimage import map_coordinates

    ref = reference.astype(np.float64)
    ev = evaluated.astype(np.float64)
    dmax = float(ref.max())
    if dmax <= 0:
        return float("nan")
    dd = dose_percent / 100.0 * dmax
    points = ref >= cutoff_percent / 100.0 * dmax
    idx = np.argwhere(points).astype(np.float64)
    r = ref[points]
    remaining = ((ev[points] - r) / dd) ** 2 > 1.0
    k = np.arange(-interp_fraction, interp_fraction + 1) * (dta_mm / interp_fraction)
    offs = np.stack(np.meshgrid(k, k, k, indexing="ij"), -1).reshape(-1, 3)
    r2 = (offs ** 2).sum(1) / dta_mm ** 2
    keep = (r2 > 0) & (r2 <= 1.0)
    order = np.argsort(r2[keep], kind="stable")
    for off, d2 in zip(offs[keep][order], r2[keep][order]):
        sel = np.flatnonzero(remaining)
        if sel.size == 0:
            break
        coords = (idx[sel] + off / np.asarray(spacing_zyx)).T
        val = map_coordinates(ev, coords, order=1, mode="nearest")
        remaining[sel[d2 + ((val - r[sel]) / dd) ** 2 <= 1.0]] = False
    return float(100.0 * (1.0 - remaining.mean())) if remaining.size else float("nan")
