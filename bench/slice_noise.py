"""How much slice-to-slice noise does a folder of OpenKBP predictions carry, against the plans?

For each patient, inside the possible-dose mask: the streak (mean |dose(z+1) - dose(z)|)
and the roughness (mean |dose(z) - mean of its two neighbours|) of the prediction and of
the clinical dose, and the prediction's MAE. A steady gradient along z adds to the streak
of both; noise between independently predicted slices shows in the roughness.

    python bench/slice_noise.py --openkbp data/validation-pats --predictions P

Prints per-patient rows and the means; asserts nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from DoseDiffLib import openkbp
from DoseDiffLib.metrics import mae_in, slice_roughness, slice_streak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--openkbp", type=Path, required=True, help="split folder with clinical doses")
    ap.add_argument("--predictions", type=Path, required=True, help="folder of pt_N.csv predictions")
    args = ap.parse_args()
    rows = []
    for folder in openkbp.patient_folders(args.openkbp):
        csv = args.predictions / f"{folder.name}.csv"
        if not csv.exists():
            continue
        p = openkbp.read_patient(folder, with_dose=True)
        pred = openkbp.read_dose_csv(csv)
        mask = p.possible_dose.array
        row = (slice_streak(pred, mask), slice_streak(p.dose.array, mask),
               slice_roughness(pred, mask), slice_roughness(p.dose.array, mask), mae_in(p.dose.array, pred, mask))
        rows.append(row)
        print(f"{folder.name}: streak {row[0]:.2f} / {row[1]:.2f} Gy, roughness {row[2]:.2f} / {row[3]:.2f} Gy "
              f"(predicted / clinical), MAE {row[4]:.2f} Gy", flush=True)
    if not rows:
        raise SystemExit(f"no predictions for the patients of {args.openkbp} in {args.predictions}")
    m = np.mean(rows, axis=0)
    print(f"{len(rows)} patients: streak {m[0]:.2f} Gy predicted, {m[1]:.2f} Gy clinical; "
          f"roughness {m[2]:.2f} Gy predicted, {m[3]:.2f} Gy clinical; MAE {m[4]:.2f} Gy")


if __name__ == "__main__":
    main()
