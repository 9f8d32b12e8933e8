"""Evaluation of predicted doses against the clinical plans, per patient and overall.

The OpenKBP dose and DVH scores come first (they are what the challenge and the paper
report); the per-ROI DVH table, image metrics inside the body, gamma pass rates and the
PTV homogeneity and conformity indices follow.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from . import metrics as M
from .config import OARS, TARGETS
from .volume import atomic_write


@dataclass
class PatientEvaluation:
    pid: str
    scores: dict            # scalar figures
    dvh_errors: dict        # (roi, metric) -> |ref - pred|
    roi_table: list[dict]   # one row per (roi, metric): reference, prediction, difference


def roi_metrics(dose: np.ndarray, masks: Mapping[str, np.ndarray], voxel_mm3: float) -> dict[tuple[str, str], float]:
    """The per-ROI table: D99, D95, D1, Dmean, D0.1cc for every ROI, plus V95%Rx for
    targets and V20/V30/V50 Gy for organs (OpenKBP percentile conventions)."""
    out: dict[tuple[str, str], float] = {}
    n_tenth_cc = max(1.0, float(np.round(100.0 / voxel_mm3)))
    for roi, m in masks.items():
        if roi not in TARGETS and roi not in OARS:
            continue
        d = dose[m.astype(bool)]
        if d.size == 0:
            continue
        out[(roi, "D99")] = float(np.percentile(d, 1))
        out[(roi, "D95")] = float(np.percentile(d, 5))
        out[(roi, "D1")] = float(np.percentile(d, 99))
        out[(roi, "Dmean")] = float(d.mean())
        out[(roi, "D0.1cc")] = float(np.percentile(d, 100.0 - n_tenth_cc / d.size * 100.0))
        if roi in TARGETS:
            out[(roi, "V95%Rx")] = M.volume_at_dose_percent(d, 0.95 * TARGETS[roi])
        else:
            for gy in (20, 30, 50):
                out[(roi, f"V{gy}Gy")] = M.volume_at_dose_percent(d, gy)
    return out


def plan_summary(dose: np.ndarray, masks: Mapping[str, np.ndarray], voxel_mm3: float) -> list[str]:
    """Short text summary: target D95 and coverage, organ mean and maximum (D0.1cc)."""
    tab = roi_metrics(dose, masks, voxel_mm3)
    lines = []
    for t in TARGETS:
        if (t, "D95") in tab:
            lines.append(f"{t:13s} D95 {tab[(t, 'D95')]:5.1f} Gy   V95%Rx {tab[(t, 'V95%Rx')]:5.1f} %   "
                         f"D1 {tab[(t, 'D1')]:5.1f} Gy")
    for o in OARS:
        if (o, "Dmean") in tab:
            lines.append(f"{o:13s} mean {tab[(o, 'Dmean')]:5.1f} Gy   max (D0.1cc) {tab[(o, 'D0.1cc')]:5.1f} Gy")
    return lines


def evaluate_patient(pid: str, reference: np.ndarray, prediction: np.ndarray, masks: Mapping[str, np.ndarray],
                     possible_dose: np.ndarray, spacing_xyz: tuple[float, float, float],
                     gamma: bool = True) -> PatientEvaluation:
    voxel = float(np.prod(spacing_xyz))
    ref_dvh = M.dvh_metrics(reference, masks, voxel)
    pred_dvh = M.dvh_metrics(prediction, masks, voxel)
    errs = M.dvh_errors(ref_dvh, pred_dvh)
    body = possible_dose.astype(bool)
    scores = {"dose_score": M.dose_score(reference, prediction, possible_dose),
              "dvh_score": M.dvh_score([errs]),
              "mae_body": M.mae_in(reference, prediction, body),
              "psnr_body": M.psnr_in(reference, prediction, body),
              "ssim_body": M.ssim_in(reference, prediction, body)}
    if gamma:
        sz = tuple(spacing_xyz[::-1])
        scores["gamma_3%3mm"] = M.gamma_pass_rate(reference, prediction, sz, 3, 3, 10)
        scores["gamma_2%2mm"] = M.gamma_pass_rate(reference, prediction, sz, 2, 2, 10)
    for t, rx in TARGETS.items():
        m = masks.get(t)
        if m is None or not m.any():
            continue
        m = m.astype(bool)
        scores[f"HI_{t}_reference"] = M.homogeneity_index(reference[m])
        scores[f"HI_{t}_prediction"] = M.homogeneity_index(prediction[m])
        scores[f"CI_{t}_reference"] = M.paddick_conformity(reference, m, rx)
        scores[f"CI_{t}_prediction"] = M.paddick_conformity(prediction, m, rx)
    ref_tab, pred_tab = roi_metrics(reference, masks, voxel), roi_metrics(prediction, masks, voxel)
    table = [{"patient": pid, "roi": roi, "metric": metric, "reference": ref_tab[(roi, metric)],
              "prediction": pred_tab[(roi, metric)], "difference": pred_tab[(roi, metric)] - ref_tab[(roi, metric)]}
             for roi, metric in ref_tab]
    return PatientEvaluation(pid, scores, errs, table)


def summarise(evals: list[PatientEvaluation]) -> dict:
    """Overall figures: mean dose score over patients, DVH score pooled over cells."""
    keys = sorted({k for e in evals for k in e.scores})
    overall = {"patients": len(evals),
               "dose_score": float(np.mean([e.scores["dose_score"] for e in evals])),
               "dvh_score": M.dvh_score([e.dvh_errors for e in evals])}
    for k in keys:
        if k in ("dose_score", "dvh_score"):
            continue
        vals = [e.scores[k] for e in evals if k in e.scores and np.isfinite(e.scores[k])]
        if vals:
            overall[f"mean_{k}"] = float(np.mean(vals))
    per_roi: dict[str, dict[str, float]] = {}
    for e in evals:
        for (roi, metric), err in e.dvh_errors.items():
            per_roi.setdefault(roi, {}).setdefault(metric, []).append(err)
    overall["dvh_error_per_roi"] = {roi: {m: float(np.mean(v)) for m, v in d.items()} for roi, d in per_roi.items()}
    return overall


def write_report(evals: list[PatientEvaluation], out_dir: Path, overwrite: bool = False) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    overall = summarise(evals)
    report = {"overall": overall, "patients": {e.pid: e.scores for e in evals}}
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(out_dir / "metrics.json", lambda p: p.write_text(text), overwrite)

    def write_csv(name: str, rows: list[dict]) -> None:
        def w(p: Path) -> None:
            with open(p, "w", newline="") as fh:
                cols = list(dict.fromkeys(k for r in rows for k in r))
                wr = csv.DictWriter(fh, fieldnames=cols)
                wr.writeheader()
                wr.writerows(rows)
        atomic_write(out_dir / name, w, overwrite)

    write_csv("patients.csv", [{"patient": e.pid, **e.scores} for e in evals])
    write_csv("roi_metrics.csv", [r for e in evals for r in e.roi_table])
    return overall


def evaluate_openkbp(root: Path, predictions: Path, out_dir: Path, gamma: bool = True, plots: bool = True,
                     overwrite: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate pt_N.csv predictions against every OpenKBP patient under root."""
    from . import openkbp
    from .plots import dvh_comparison

    evals = []
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = openkbp.patient_folders(root) if not (root / "ct.csv").exists() else [root]
    for folder in folders:
        pred_file = predictions / f"{folder.name}.csv" if predictions.is_dir() else predictions
        if not pred_file.exists():
            raise FileNotFoundError(f"no prediction {pred_file} for {folder.name}")
        p = openkbp.read_patient(folder)
        pred = openkbp.from_openkbp_axes(openkbp._read_sparse(pred_file, True))
        masks = {k: v.array for k, v in p.masks.items()}
        e = evaluate_patient(p.pid, p.dose.array, pred, masks, p.possible_dose.array, p.ct.spacing, gamma)
        evals.append(e)
        if plots:
            png = out_dir / f"dvh_{p.pid}.png"
            if overwrite or not png.exists():
                dvh_comparison(p.dose.array, pred, masks, png,
                               f"{p.pid}: plan (solid) vs DoseDiff (dashed), dose score {e.scores['dose_score']:.2f} Gy")
        if progress:
            progress(p.pid)
    return write_report(evals, out_dir, overwrite)


def evaluate_dicom(folder: Path, prediction: Path, out_dir: Path, series_uid: str | None = None,
                   mapping: Mapping[str, str | None] | None = None, gamma: bool = True,
                   overwrite: bool = False) -> dict:
    """Evaluate a predicted dose (NRRD/NIfTI/MHA or RTDOSE) against the plan RTDOSE in a DICOM folder."""
    from .config import ModelConfig
    from .dicomrt import read_dicom, read_rtdose
    from .errors import DoseDiffError
    from .plots import dvh_comparison
    from .predict import body_from_ct
    from .rois import BODY, match_rois
    from .volume import read_volume, resample

    case = read_dicom(folder, series_uid)
    if case.reference_dose is None:
        raise DoseDiffError(f"{folder} holds no RTDOSE of the clinical plan to compare with.",
                            "Export the plan dose together with the CT and structures.")
    pred = read_rtdose(prediction) if prediction.suffix.lower() == ".dcm" else read_volume(prediction)
    if not pred.grid.close_to(case.ct.grid):
        pred = resample(pred, case.ct.grid, "linear", default=0.0)
    rois = list(ModelConfig().conditions.rois) + [BODY]
    matched = match_rois(case.structures.keys(), rois, mapping)
    masks = {roi: case.structures[name].array for roi, name in matched.items() if roi != BODY}
    body = case.structures[matched[BODY]].array if BODY in matched else body_from_ct(case.ct)
    pid = str(getattr(case.ct_datasets[0], "PatientID", "") or folder.name)
    e = evaluate_patient(pid, case.reference_dose.array, pred.array, masks, body, case.ct.spacing, gamma)
    overall = write_report([e], out_dir, overwrite)
    png = out_dir / f"dvh_{pid}.png"
    dvh_comparison(case.reference_dose.array, pred.array, masks, png, f"{pid}: plan (solid) vs prediction (dashed)")
    return overall
