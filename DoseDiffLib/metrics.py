"""Dose comparison metrics, following the official OpenKBP definitions exactly.

Dose score: sum over all voxels of |reference - prediction| / voxels in the possible-
dose mask (dose outside the mask is penalised). DVH metrics are numpy percentiles
(linear interpolation) of the dose inside the reference ROI: targets D99, D95, D1;
organs D0.1cc and mean. The DVH score pools the absolute differences of every
(patient, ROI, metric) cell that exists.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from .config import OARS, TARGETS

TARGET_METRICS = ("D_99", "D_95", "D_1")
OAR_METRICS = ("D_0.1_cc", "mean")


def dose_score(reference: np.ndarray, prediction: np.ndarray, possible_dose: np.ndarray) -> float:
    n = int(np.count_nonzero(possible_dose))
    if n == 0:
        raise ValueError("empty possible-dose mask")
    return float(np.abs(reference.astype(np.float64) - prediction).sum() / n)


def dvh_metrics(dose: np.ndarray, masks: Mapping[str, np.ndarray], voxel_volume_mm3: float,
                targets: Iterable[str] = tuple(TARGETS), oars: Iterable[str] = OARS) -> dict[tuple[str, str], float]:
    """{(roi, metric): Gy} for every ROI present (non-empty) in masks."""
    out: dict[tuple[str, str], float] = {}
    n_tenth_cc = max(1.0, float(np.round(100.0 / voxel_volume_mm3)))
    for roi in oars:
        m = masks.get(roi)
        if m is None or not m.any():
            continue
        d = dose[m.astype(bool)]
        out[(roi, "D_0.1_cc")] = float(np.percentile(d, 100.0 - n_tenth_cc / d.size * 100.0))
        out[(roi, "mean")] = float(d.mean())
    for roi in targets:
        m = masks.get(roi)
        if m is None or not m.any():
            continue
        d = dose[m.astype(bool)]
        out[(roi, "D_99")] = float(np.percentile(d, 1))
        out[(roi, "D_95")] = float(np.percentile(d, 5))
        out[(roi, "D_1")] = float(np.percentile(d, 99))
    return out


def dvh_errors(reference: Mapping, prediction: Mapping) -> dict[tuple[str, str], float]:
    return {k: abs(reference[k] - prediction[k]) for k in reference}


def dvh_score(errors_per_patient: Iterable[Mapping]) -> float:
    cells = [e for errs in errors_per_patient for e in errs.values()]
    return float(np.mean(cells)) if cells else float("nan")
