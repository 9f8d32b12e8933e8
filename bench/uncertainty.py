"""Is the diffusion sampler's spread a calibrated uncertainty? Coverage on validation patients.

For each patient: S independent samples of the model's DDIM sampler (each mirrored as the
sampler says), their voxel mean and SD, and
- coverage: the share of voxels in the possible-dose mask with clinical dose > 5 Gy whose
  clinical dose lies within mean +- 1.96 SD (95 % if the spread were calibrated);
- DVH bands: per ROI metric (D99/D95/D1 of targets, mean and D0.1cc of organs) the
  sample mean +- 1.96 SD of the metric; the share of cells whose clinical value is inside;
- the streak figure, mean |dose(z+1) - dose(z)| in the mask, predicted vs clinical.

    python bench/uncertainty.py --model CARD --openkbp data/validation-pats [--patients 6] [--samples 4]

Prints figures and writes JSON with --json; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from DoseDiffLib import openkbp
from DoseDiffLib.conditions import slice_stack
from DoseDiffLib.config import POSSIBLE_DOSE
from DoseDiffLib.metrics import dvh_metrics, slice_streak
from DoseDiffLib.modelcard import load_model
from DoseDiffLib.predict import dose_rows, prepare_openkbp, resolve_sampler, sample_dose, samples_in_gy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--openkbp", type=Path, required=True, help="split folder with clinical doses")
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model, cfg, _ = load_model(args.model)
    name, smp = resolve_sampler(cfg, args.sampler, samples=args.samples)
    rows_out, inside_all, cells_in, cells = [], 0, 0, 0
    evaluated = 0
    for folder in openkbp.patient_folders(args.openkbp)[:args.patients]:
        t0 = time.perf_counter()
        p = openkbp.read_patient(folder, with_dose=True)
        inputs = prepare_openkbp(p, cfg)
        stack = slice_stack(inputs.ct, inputs.masks, cfg)
        rows = dose_rows(stack, cfg, inputs.ct.spacing[2])
        x = np.full((smp.samples,) + p.ct.array.shape, -1.0, np.float32)
        x[:, stack.slices[rows]] = sample_dose(model, cfg, stack, rows, smp, seed=0)
        pdm = inputs.masks[POSSIBLE_DOSE].array.astype(bool)
        gy, _ = samples_in_gy(x, inputs, cfg, smp, stack.slices[rows])  # as dosediff predict does
        mean, sd = gy.mean(0), gy.std(0, ddof=1)
        ref = p.dose.array
        sel = pdm & (ref > 5.0)
        inside = np.abs(ref - mean)[sel] <= 1.96 * sd[sel]
        inside_all += int(inside.sum())
        evaluated += int(sel.sum())
        vox = float(np.prod(p.ct.spacing))
        masks = {r: m.array for r, m in p.masks.items()}
        per_sample = [dvh_metrics(g, masks, vox) for g in gy]
        clinical = dvh_metrics(ref, masks, vox)
        band_hits = 0
        for key, value in clinical.items():
            vals = np.array([s[key] for s in per_sample])
            band_hits += abs(value - vals.mean()) <= 1.96 * vals.std(ddof=1)
        cells_in += band_hits
        cells += len(clinical)
        row = {"patient": p.pid, "coverage_voxels": float(inside.mean()), "mean_sd_gy": float(sd[sel].mean()),
               "mae_gy": float(np.abs(ref - mean)[sel].mean()), "dvh_band_coverage": band_hits / len(clinical),
               "streak_pred_gy": slice_streak(mean, pdm), "streak_clinical_gy": slice_streak(ref, pdm),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    summary = {"sampler": name, "settings": asdict(smp), "patients": len(rows_out),
               "voxel_coverage_95": inside_all / max(evaluated, 1),
               "dvh_band_coverage_95": cells_in / max(cells, 1),
               "mean_sd_gy": float(np.mean([r["mean_sd_gy"] for r in rows_out])),
               "mae_gy_dose_gt_5": float(np.mean([r["mae_gy"] for r in rows_out])),
               "streak_pred_gy": float(np.mean([r["streak_pred_gy"] for r in rows_out])),
               "streak_clinical_gy": float(np.mean([r["streak_clinical_gy"] for r in rows_out])),
               "per_patient": rows_out}
    print(f"\n{name} sampler, {smp.samples} samples: {100 * summary['voxel_coverage_95']:.1f} % of voxels "
          f"(> 5 Gy) inside mean +- 1.96 SD (95 % if calibrated); mean SD {summary['mean_sd_gy']:.2f} Gy vs "
          f"mean error {summary['mae_gy_dose_gt_5']:.2f} Gy; DVH bands hold {100 * summary['dvh_band_coverage_95']:.0f} % "
          f"of clinical values; streak {summary['streak_pred_gy']:.2f} Gy predicted vs "
          f"{summary['streak_clinical_gy']:.2f} Gy clinical")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
