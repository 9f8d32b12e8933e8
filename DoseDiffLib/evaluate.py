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
from .errors import DoseDiffError
from .volume import Volume, atomic_write, check_output_folder, make_folder, safe_name

REPORT_FILES = ("metrics.json", "patients.csv", "roi_metrics.csv")


@dataclass
class PatientEvaluation:
    pid: str
    scores: dict            # scalar figures
    dvh_errors: dict        # (roi, metric) -> |ref - pred|
    roi_table: list[dict]   # one row per (roi, metric): reference, prediction, difference


def roi_metrics(dose: np.ndarray, masks: Mapping[str, np.ndarray], voxel_mm3: float) -> dict[tuple[str, str], float]:
    """The per-ROI table: metrics.DOSE_METRICS for every ROI (the same function, and so the
    same names, as the DVH score), plus V95%Rx for targets and V20/V30/V50 Gy for organs."""
    out: dict[tuple[str, str], float] = {}
    for roi, m in masks.items():
        if roi not in TARGETS and roi not in OARS:
            continue
        d = dose[m.astype(bool)]
        if d.size == 0:
            continue
        out.update({(roi, k): v for k, v in M.roi_dose_metrics(d, voxel_mm3).items()})
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


def check_dose(dose: np.ndarray, what: str) -> None:
    """NaN, infinite or negative doses mean nothing, and the scores would count them anyway."""
    bad = int((~np.isfinite(dose)).sum())
    if bad:
        raise DoseDiffError(f"{what} has {bad} NaN or infinite voxels.", "Check the file: a dose is finite everywhere.")
    negative = int((dose < 0).sum())
    if negative:
        raise DoseDiffError(f"{what} has {negative} negative voxels (down to {float(dose.min()):.3g} Gy).",
                            "A dose cannot be negative: check the file's scaling and offset.")


def write_report(evals: list[PatientEvaluation], out_dir: Path, overwrite: bool = False) -> dict:
    make_folder(out_dir)
    overall = summarise(evals)
    undefined_as_null = {e.pid: {k: (v if np.isfinite(v) else None) for k, v in e.scores.items()} for e in evals}
    report = {"overall": overall, "patients": undefined_as_null}  # strict JSON: an undefined HI is null
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


def _openkbp_pairs(root: Path, predictions: Path) -> list[tuple[Path, Path]]:
    """(patient folder, prediction file) for every patient, all checked before any scoring."""
    from . import openkbp

    folders = [root] if (root / "ct.csv").exists() else openkbp.patient_folders(root)
    if not folders:
        raise DoseDiffError(f"{root} holds no OpenKBP patients.", "Point --openkbp to a pt_N folder or a split folder.")
    if not predictions.exists():
        raise DoseDiffError(f"Predictions {predictions} not found.", "Give the folder of pt_N.csv files (or one file).")
    if not predictions.is_dir() and len(folders) > 1:
        raise DoseDiffError(f"{predictions} is one file but {root} holds {len(folders)} patients.",
                            "Give the folder of pt_N.csv predictions.")
    pairs = [(f, predictions / f"{f.name}.csv" if predictions.is_dir() else predictions) for f in folders]
    missing = [p.name for _, p in pairs if not p.is_file()]
    if missing:
        raise DoseDiffError(f"{len(missing)} prediction(s) missing in {predictions}: {', '.join(missing[:5])}"
                            f"{'...' if len(missing) > 5 else ''}.", "Predict them first, or evaluate those you have.")
    no_dose = [f.name for f, _ in pairs if not (f / "dose.csv").is_file()]
    if no_dose:
        raise DoseDiffError(f"{len(no_dose)} reference patient(s) without dose.csv: {', '.join(no_dose[:5])}.",
                            "Evaluate against a split with clinical doses (train or validation).")
    return pairs


def evaluate_openkbp(root: Path, predictions: Path, out_dir: Path, gamma: bool = True, plots: bool = True,
                     overwrite: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate pt_N.csv predictions against every OpenKBP patient under root.

    Inputs and outputs are all checked before the first patient is scored.
    """
    from . import openkbp
    from .plots import dvh_comparison

    pairs = _openkbp_pairs(Path(root), Path(predictions))
    pngs = tuple(f"dvh_{safe_name(f.name)}.png" for f, _ in pairs) if plots else ()
    check_output_folder(out_dir, REPORT_FILES + pngs, overwrite)
    evals = []
    make_folder(out_dir)
    for folder, pred_file in pairs:
        p = openkbp.read_patient(folder)
        pred = openkbp.read_dose_csv(pred_file)
        check_dose(pred, f"Prediction {pred_file}")
        check_dose(p.dose.array, f"Reference dose of {folder}")
        masks = {k: v.array for k, v in p.masks.items()}
        e = evaluate_patient(p.pid, p.dose.array, pred, masks, p.possible_dose.array, p.ct.spacing, gamma)
        evals.append(e)
        if plots:
            dvh_comparison(p.dose.array, pred, masks, out_dir / f"dvh_{safe_name(folder.name)}.png",
                           f"{p.pid}: plan (solid) vs DoseDiff (dashed), dose score {e.scores['dose_score']:.2f} Gy",
                           overwrite=overwrite)
        if progress:
            progress(p.pid)
    return write_report(evals, out_dir, overwrite)


def _same_case(pred: Volume, headers, prediction: Path) -> None:
    """A predicted RTDOSE must belong to the patient and frame of reference of the plan it is compared with."""
    for key, what in (("PatientID", "patient"), ("FrameOfReferenceUID", "frame of reference")):
        mine, theirs = str(headers[0].get(key, "")), pred.meta.get(key, "")
        if mine and theirs and mine != theirs:
            raise DoseDiffError(f"Prediction {prediction} is for another {what} ({theirs!r}) than the DICOM "
                                f"folder ({mine!r}).", "Compare the prediction made for this patient's CT.")


def _covered(pred: Volume, grid, body: np.ndarray, prediction: Path) -> np.ndarray:
    """The prediction on the CT grid; refused if it misses part of the body (scored as 0 Gy otherwise)."""
    from .volume import resample

    if pred.grid.close_to(grid):
        return pred.array
    inside = resample(pred.with_array(np.ones(pred.array.shape, np.float32)), grid, "nearest", default=0.0).array
    missed = float(body.astype(bool)[inside == 0].sum()) / max(float(body.astype(bool).sum()), 1.0)
    if missed > 0.01:
        raise DoseDiffError(f"Prediction {prediction} covers only {100 * (1 - missed):.0f}% of the body on the CT.",
                            "Give a prediction on this CT's grid (or one that covers the whole patient).")
    return resample(pred, grid, "linear", default=0.0).array


def evaluate_dicom(folder: Path, prediction: Path, out_dir: Path, series_uid: str | None = None,
                   mapping: Mapping[str, str | None] | None = None, gamma: bool = True,
                   overwrite: bool = False) -> dict:
    """Evaluate a predicted dose (NRRD/NIfTI/MHA or RTDOSE) against the plan RTDOSE in a DICOM folder."""
    from .config import ModelConfig
    from .dicomrt import read_dicom, read_rtdose
    from .plots import dvh_comparison
    from .predict import body_from_ct
    from .rois import BODY, match_rois
    from .volume import read_volume

    check_output_folder(out_dir, REPORT_FILES, overwrite)
    case = read_dicom(folder, series_uid)
    if case.reference_dose is None:
        raise DoseDiffError(f"{folder} holds no RTDOSE of the clinical plan to compare with.",
                            "Export the plan dose together with the CT and structures.")
    pred = read_rtdose(prediction) if prediction.suffix.lower() == ".dcm" else read_volume(prediction)
    _same_case(pred, case.ct_datasets, prediction)
    rois = list(ModelConfig().conditions.rois) + [BODY]
    matched = match_rois(case.structures.keys(), rois, mapping)
    masks = {roi: case.structures[name].array for roi, name in matched.items() if roi != BODY}
    body = case.structures[matched[BODY]].array if BODY in matched else body_from_ct(case.ct)
    pred_on_ct = _covered(pred, case.ct.grid, body, prediction)
    check_dose(pred_on_ct, f"Prediction {prediction}")
    check_dose(case.reference_dose.array, f"The plan dose in {folder}")
    pid = str(getattr(case.ct_datasets[0], "PatientID", "") or folder.name)
    png = f"dvh_{safe_name(pid, 'patient')}.png"  # the PatientID is data, never a path
    check_output_folder(out_dir, (png,), overwrite)
    e = evaluate_patient(pid, case.reference_dose.array, pred_on_ct, masks, body, case.ct.spacing, gamma)
    make_folder(out_dir)
    dvh_comparison(case.reference_dose.array, pred_on_ct, masks, out_dir / png,
                   f"{pid}: plan (solid) vs prediction (dashed)", overwrite=overwrite)
    return write_report([e], out_dir, overwrite)
