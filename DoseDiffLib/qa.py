"""Knowledge-based plan QA: organs of finished plans that get clearly more dose than predicted.

The prediction stands for what plans like it usually achieve; an organ whose plan dose
exceeds it by more than both thresholds (Gy and per cent of the prediction) is flagged
as one that could perhaps be spared. A flag is a question for the planner, not a
verdict: the model can be wrong, most of all outside its training range (see its card).

Per organ: mean dose, D0.1cc (near-maximum) and D2cc, the last only for organs of at
least 4 cc (in a smaller organ the hottest 2 cc is most of it, and says little).
"""
from __future__ import annotations

import datetime as _dt
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from .config import OARS
from .errors import DoseDiffError

if TYPE_CHECKING:
    from .job import Sampling

QA_FILES = ("qa.csv", "qa.json", "summary.html")
D2CC_MIN_VOLUME_CC = 4.0
PER_CENT_FLOOR_GY = 1.0   # per cent excesses are taken of at least this dose (no 300 % of 0.2 Gy)


@dataclass(frozen=True)
class Thresholds:
    gy: float = 3.0          # plan - prediction above this ...
    percent: float = 10.0    # ... and above this per cent of the prediction flags the metric

    def check(self) -> None:
        if not (np.isfinite(self.gy) and self.gy >= 0 and np.isfinite(self.percent) and self.percent >= 0):
            raise DoseDiffError(f"QA thresholds must be non-negative numbers, not {self.gy} Gy / {self.percent} %.",
                                "Give e.g. --threshold-gy 3 --threshold-percent 10.")


def _near_max(d: np.ndarray, cc: float, voxel_mm3: float) -> float:
    """Minimum dose of the hottest `cc` (the OpenKBP D0.1cc rule: a percentile over voxel counts)."""
    n = max(1.0, float(np.round(cc * 1000.0 / voxel_mm3)))
    return float(np.percentile(d, max(0.0, 100.0 - n / d.size * 100.0)))


def organ_metrics(dose: np.ndarray, mask: np.ndarray, voxel_mm3: float) -> dict[str, float]:
    d = dose[mask.astype(bool)]
    if d.size == 0:
        return {}
    out = {"Dmean": float(d.mean()), "D0.1cc": _near_max(d, 0.1, voxel_mm3)}
    if d.size * voxel_mm3 / 1000.0 >= D2CC_MIN_VOLUME_CC:
        out["D2cc"] = _near_max(d, 2.0, voxel_mm3)
    return out


def compare_plan(case: str, plan: np.ndarray, predicted: np.ndarray, organs: Mapping[str, tuple[str, np.ndarray]],
                 voxel_mm3: float, thresholds: Thresholds = Thresholds()) -> list[dict]:
    """One row per (organ, metric): plan, prediction, excess and whether it is flagged.

    organs: model ROI -> (the plan's structure name, mask), all on the doses' grid.
    """
    rows = []
    for roi, (name, mask) in organs.items():
        p, q = organ_metrics(plan, mask, voxel_mm3), organ_metrics(predicted, mask, voxel_mm3)
        for metric in p:
            excess = p[metric] - q[metric]
            pct = 100.0 * excess / max(q[metric], PER_CENT_FLOOR_GY)
            rows.append({"case": case, "organ": roi, "structure": name, "metric": metric,
                         "plan_gy": round(p[metric], 3), "predicted_gy": round(q[metric], 3),
                         "excess_gy": round(excess, 3), "excess_percent": round(pct, 1),
                         "flagged": bool(excess > thresholds.gy and pct > thresholds.percent)})
    return rows


def flagged_organs(rows: list[dict]) -> list[dict]:
    """One entry per flagged organ of a case, its largest flagged excess first; sorted by that excess."""
    worst: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["flagged"]:
            key = (r["case"], r["organ"])
            if key not in worst or r["excess_gy"] > worst[key]["excess_gy"]:
                worst[key] = r
    return sorted(worst.values(), key=lambda r: -r["excess_gy"])


def dvh_pictures(rows: list[dict], plan: np.ndarray, predicted: np.ndarray,
                 organs: Mapping[str, tuple[str, np.ndarray]], out_dir: Path, label: str = "") -> dict:
    """The DVH pair of each flagged organ as dvh/[LABEL_]ORGAN.png; {(case, organ): path in out_dir}."""
    from .plots import dvh_comparison
    from .volume import make_folder

    pngs = {}
    for r in flagged_organs(rows):
        name = f"dvh/{label}_{r['organ']}.png" if label else f"dvh/{r['organ']}.png"
        make_folder(Path(out_dir) / "dvh")
        dvh_comparison(plan, predicted, {r["organ"]: organs[r["organ"]][1]}, Path(out_dir) / name,
                       title=f"{label} {r['organ']}".strip() + ": plan (solid) vs prediction (dashed)", overwrite=True)
        pngs[(r["case"], r["organ"])] = name
    return pngs


def write_report(rows: list[dict], cases: list[dict], out_dir: Path, info: Mapping, dvh_pngs: Mapping[tuple[str, str], str],
                 thresholds: Thresholds) -> dict:
    """qa.csv (every organ metric), qa.json (the same and the cases) and summary.html (flagged organs)."""
    from .cohort import write_rows
    from .volume import atomic_write

    out_dir = Path(out_dir)
    ordered = sorted(rows, key=lambda r: (not r["flagged"], -r["excess_gy"]))
    write_rows(ordered, out_dir / "qa.csv")
    flagged = flagged_organs(rows)
    summary = {"created": _dt.datetime.now().isoformat(timespec="seconds"), **info,
               "thresholds": {"gy": thresholds.gy, "percent": thresholds.percent},
               "cases": cases, "flagged_organs": flagged, "rows": ordered}
    text = json.dumps(summary, indent=1)
    atomic_write(out_dir / "qa.json", lambda p: p.write_text(text), overwrite=True)
    page = _html(flagged, rows, cases, info, dvh_pngs, thresholds)
    atomic_write(out_dir / "summary.html", lambda p: p.write_text(page, encoding="utf-8"), overwrite=True)
    return summary


def _html(flagged: list[dict], rows: list[dict], cases: list[dict], info: Mapping,
          dvh_pngs: Mapping[tuple[str, str], str], thresholds: Thresholds) -> str:
    e = html.escape
    by_organ: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_organ.setdefault((r["case"], r["organ"]), {})[r["metric"]] = r

    def cell(case: str, organ: str, metric: str) -> str:
        r = by_organ[(case, organ)].get(metric)
        if r is None:
            return "<td>-</td>"
        style = ' style="background:#fdd"' if r["flagged"] else ""
        return f"<td{style}>{r['plan_gy']:.1f} / {r['predicted_gy']:.1f}</td>"

    lines = ["<!doctype html><html><head><meta charset='utf-8'><title>DoseDiff plan QA</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}td,th{border:1px solid #bbb;padding:3px 8px}"
             "table{border-collapse:collapse}</style></head><body>",
             "<h1>DoseDiff plan QA</h1>",
             "<p><b>Research and planning guidance only.</b> A flag says the plan gives this organ clearly more "
             "dose than plans like it usually achieve, according to the model; it is a question for the "
             "planner, not a verdict, and not a treatment planning system dose calculation.</p>",
             f"<p>Model: {e(str(info.get('model', '')))}; trained on: {e(str(info.get('training_data', '')))}</p>",
             f"<p>Flagged when plan - prediction &gt; {thresholds.gy:g} Gy and &gt; {thresholds.percent:g} % of "
             f"the prediction. Cases: {sum(c['status'] == 'checked' for c in cases)} checked, "
             f"{sum(c['status'] == 'skipped' for c in cases)} skipped.</p>",
             f"<h2>Flagged organs ({len(flagged)})</h2>"]
    if flagged:
        lines.append("<table><tr><th>case</th><th>organ (structure)</th><th>largest excess</th>"
                     "<th>Dmean plan / pred. (Gy)</th><th>D0.1cc</th><th>D2cc</th><th>DVH: plan solid, "
                     "prediction dashed</th></tr>")
        for r in flagged:
            png = dvh_pngs.get((r["case"], r["organ"]))
            img = f"<img src='{e(png)}' width='360'>" if png else ""
            lines.append(f"<tr><td>{e(r['case'])}</td><td>{e(r['organ'])} ({e(r['structure'])})</td>"
                         f"<td>{r['metric']}: +{r['excess_gy']:.1f} Gy ({r['excess_percent']:+.0f} %)</td>"
                         + "".join(cell(r["case"], r["organ"], m) for m in ("Dmean", "D0.1cc", "D2cc"))
                         + f"<td>{img}</td></tr>")
        lines.append("</table>")
    else:
        lines.append("<p>No organ exceeds its prediction by both thresholds.</p>")
    lines.append("<h2>Cases</h2><table><tr><th>case</th><th>status</th><th>note</th></tr>")
    for c in cases:
        lines.append(f"<tr><td>{e(c['case'])}</td><td>{e(c['status'])}</td><td>{e(c.get('note', ''))}</td></tr>")
    lines.append("</table><p>Every organ metric is in qa.csv.</p></body></html>\n")
    return "\n".join(lines)


def qa_cohort(root: Path, out_dir: Path, model_ref, thresholds: Thresholds = Thresholds(),
              prescriptions: Mapping[str, float] | None = None, mapping: Mapping[str, str | None] | None = None,
              sampling: "Sampling | None" = None, overwrite: bool = False, progress=None, found=None) -> dict:
    """Predict every plan of a DICOM cohort and compare organ doses; writes the report into out_dir.

    Each plan is predicted by job.run_prediction, as `dosediff predict --dicom` would.
    found: find_cases(root) when the caller has already checked it (no second scan)."""
    from .cohort import check_prescriptions, find_cases, read_cohort_case
    from .job import Case, Sampling, run_prediction
    from .modelcard import load_model
    from .predict import resolve_sampler
    from .volume import check_output_folder, make_folder

    sampling = sampling or Sampling(seed=0)
    thresholds.check()
    check_output_folder(out_dir, QA_FILES, overwrite)
    cases, _ = found or find_cases(root)
    check_prescriptions(cases, prescriptions or {})
    loaded = load_model(model_ref, sampling.device)
    resolve_sampler(loaded[1], **sampling.choice())  # refuses impossible sampler settings before any case
    make_folder(out_dir)
    rows: list[dict] = []
    report_cases: list[dict] = []
    pngs: dict[tuple[str, str], str] = {}
    for case in cases:
        warnings: list[str] = []
        try:
            dicom = read_cohort_case(case, need_dose=True)
            given = {k: v for k, v in (prescriptions or {}).items() if k in dicom.structures}
            pred, _ = run_prediction(Case(dicom.ct, dicom.structures, case.where, dicom=dicom,
                                          warnings=list(dicom.warnings)),
                                     loaded, sampling=sampling, mapping=mapping, on_warnings=warnings.extend,
                                     prescriptions=given)
        except DoseDiffError as exc:
            report_cases.append({"case": case.key, "where": case.where, "status": "skipped",
                                 "note": f"{exc.problem} {exc.fix}".strip()})
            continue
        predicted = pred.dose.array  # at the plan's own prescription (run_prediction scales back)
        plan = dicom.reference_dose.array
        organs = {roi: (name, dicom.structures[name].array) for roi, name in pred.info["matched_rois"].items()
                  if roi in OARS and name in dicom.structures}
        case_rows = compare_plan(case.key, plan, predicted, organs, dicom.ct.grid.voxel_volume_mm3(), thresholds)
        rows += case_rows
        pngs.update(dvh_pictures(case_rows, plan, predicted, organs, out_dir, label=case.key))
        report_cases.append({"case": case.key, "where": case.where, "status": "checked",
                             "note": pred.info["prescription"], "warnings": warnings})
        if progress:
            progress(case.key)
    info = {"model": loaded[2]["name"], "training_data": loaded[2].get("training_data", ""),
            "sampler": pred.info["sampler"] if rows else "", "seed": sampling.seed}
    return write_report(rows, report_cases, out_dir, info, pngs, thresholds)
