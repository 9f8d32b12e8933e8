"""A clinic's DICOM RT exports as cases: found, read and put on the model's grid.

A cohort folder holds one sub-folder per patient, or DICOM files of many patients side
by side (grouped here by study and frame of reference), or both. Every case is read by
the same DICOM reader and prepared by the same `predict.prepare_case` as a single
prediction, so training, QA and prediction see a patient identically. Cases carry an
anonymous key derived from their UIDs (never a name, ID or folder name), which is what
caches and model cards hold.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from pydicom.dataset import Dataset

from .config import POSSIBLE_DOSE, TARGETS, ModelConfig
from .dicomrt import CT_IMAGE, RT_STRUCT, DicomCase, read_dicom_files, scan_dicom
from .errors import DoseDiffError
from .predict import ModelInputs, prepare_case
from .prescription import PrescriptionMap
from .volume import Volume, atomic_write, resample


@dataclass
class CohortCase:
    """The files of one patient's plan in a cohort folder."""

    key: str                               # anonymous: from the CT's study and frame of reference UIDs
    where: str                             # sub-folder (or folder + study number), for the local report only
    files: list[tuple[Path, Dataset]]


@dataclass
class PreparedCase:
    """A case on the model's grid with its plan dose (if any) as the model sees it (scaled)."""

    case: DicomCase
    inputs: ModelInputs
    prescription: PrescriptionMap | None
    dose: Volume | None                    # Gy x prescription scale, model grid, zero outside the body
    warnings: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.prescription.scale if self.prescription else 1.0


def _frame(ds: Dataset) -> str:
    if "FrameOfReferenceUID" in ds:
        return str(ds.FrameOfReferenceUID)
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        if "FrameOfReferenceUID" in ref:
            return str(ref.FrameOfReferenceUID)
    return ""


def case_key(files: list[tuple[Path, Dataset]]) -> str:
    """dcm_ + 10 hex digits of the CT's study and frame of reference UIDs (stable, not identifying)."""
    ct = [ds for _, ds in files if ds.SOPClassUID == CT_IMAGE]
    ref = ct[0] if ct else files[0][1]
    text = f"{ref.get('StudyInstanceUID', '')}|{_frame(ref)}"
    return "dcm_" + hashlib.sha256(text.encode()).hexdigest()[:10]


def find_cases(root: str | Path) -> tuple[list[CohortCase], list[str]]:
    """Cases of a cohort folder, in a stable order: each sub-folder one case, loose files by study/frame."""
    root = Path(root)
    if not root.is_dir():
        raise DoseDiffError(f"Cohort folder {root} not found.", "Give the folder holding the DICOM exports.")
    files, warnings = scan_dicom(root)
    if not files:
        raise DoseDiffError(f"No DICOM files under {root}.", "Give the folder holding the DICOM exports.")
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for f, ds in files:
        rel = f.relative_to(root)
        if len(rel.parts) > 1:
            groups.setdefault(rel.parts[0], []).append((f, ds))
        else:
            groups.setdefault("", []).append((f, ds))
    cases = [CohortCase(case_key(fs), name, fs) for name, fs in sorted(groups.items()) if name]
    cases += _by_study(groups.get("", []))
    keys = [c.key for c in cases]
    for c in cases:
        if keys.count(c.key) > 1:
            raise DoseDiffError(f"The same CT (study and frame of reference) appears in several places: "
                                f"{', '.join(d.where for d in cases if d.key == c.key)}.",
                                "Keep one copy of each patient's export in the cohort folder.")
    return cases, warnings


def _by_study(loose: list[tuple[Path, Dataset]]) -> list[CohortCase]:
    """Loose files grouped by study, then by frame of reference when a study holds several CTs."""
    studies: dict[str, list[tuple[Path, Dataset]]] = {}
    for f, ds in loose:
        studies.setdefault(str(ds.get("StudyInstanceUID", "")), []).append((f, ds))
    out = []
    for n, (_, fs) in enumerate(sorted(studies.items()), start=1):
        frames = sorted({_frame(ds) for _, ds in fs if ds.SOPClassUID == CT_IMAGE})
        if len(frames) <= 1:
            out.append(CohortCase(case_key(fs), f"study {n} of the loose files", fs))
            continue
        for m, frame in enumerate(frames, start=1):
            part = [(f, ds) for f, ds in fs if _frame(ds) == frame]
            out.append(CohortCase(case_key(part), f"study {n}, frame of reference {m} of the loose files", part))
    return out


def read_cohort_case(case: CohortCase, need_dose: bool = True) -> DicomCase:
    """Read one case; a case without structures (or without the plan's dose) raises DoseDiffError."""
    dicom = read_dicom_files(case.files, case.where)
    if not any(ds.SOPClassUID == RT_STRUCT for _, ds in case.files) or not dicom.structures:
        raise DoseDiffError("no RTSTRUCT.", "Export the structure set with the CT.")
    if need_dose and dicom.reference_dose is None:
        raise DoseDiffError("no RTDOSE (the plan's dose is needed).", "Export the plan dose with the CT.")
    return dicom


def prepare_cohort_case(case: CohortCase, cfg: ModelConfig, prescriptions: Mapping[str, float] | None = None,
                        mapping: Mapping[str, str | None] | None = None, need_dose: bool = True) -> PreparedCase:
    """Read one case and put it on the model's grid, with the plan's dose for training."""
    dicom = read_cohort_case(case, need_dose)
    given = {k: v for k, v in (prescriptions or {}).items() if k in dicom.structures}
    inputs = prepare_case(dicom.ct, dicom.structures, cfg, mapping, given, dicom.prescriptions)
    dose = None
    if dicom.reference_dose is not None:
        body = inputs.masks[POSSIBLE_DOSE].array
        on_grid = resample(dicom.reference_dose, inputs.ct.grid, "linear", default=0.0)
        dose = on_grid.with_array((np.clip(on_grid.array, 0, None) * inputs.scale * (body > 0)).astype(np.float32))
    return PreparedCase(dicom, inputs, inputs.prescription, dose, dicom.warnings + inputs.warnings)


def _levels_gy(prepared: PreparedCase) -> list[float]:
    """The plan's target levels: from its prescriptions, or the model's own for targets matched by name."""
    if prepared.prescription:
        return sorted(set(prepared.prescription.levels.values()), reverse=True)
    return sorted({TARGETS[roi] for roi in prepared.inputs.matched if roi in TARGETS}, reverse=True)


def site_of(case: DicomCase) -> str:
    """The body part the CT says it shows (DICOM BodyPartExamined), or 'unknown'."""
    part = str(case.ct_datasets[0].get("BodyPartExamined", "") or "").strip()
    return part.upper() or "unknown"


def _rtstruct_names(case: CohortCase) -> set[str]:
    return {str(r.ROIName) for _, ds in case.files if ds.SOPClassUID == RT_STRUCT
            for r in ds.get("StructureSetROISequence", [])}


def check_prescriptions(cases: list[CohortCase], prescriptions: Mapping[str, float]) -> None:
    """A --prescription whose structure no case has is a typo; found before any case is read."""
    names = set().union(*(_rtstruct_names(c) for c in cases)) if cases else set()
    unknown = [n for n in prescriptions if n not in names]
    if unknown:
        raise DoseDiffError(f"--prescription names {', '.join(map(repr, unknown))}, which no structure set of the "
                            "cohort holds.", f"Structure names found: {', '.join(sorted(names)) or 'none'}.")


def _is_validation(key: str, fraction: float) -> bool:
    """A fixed draw per patient from its key: the split never depends on the order of reading."""
    return int(key[4:], 16) / 16 ** 10 < fraction


def cache_cohort(root: str | Path, cache: Path, cfg: ModelConfig, prescriptions: Mapping[str, float] | None = None,
                 mapping: Mapping[str, str | None] | None = None, validation_fraction: float = 0.2,
                 progress=None, found: tuple[list[CohortCase], list[str]] | None = None) -> list[dict]:
    """Cache every usable case of a cohort into the training cache (train/validation by patient);
    returns one report row per case, used or skipped, with the reason. Cached cases are kept.

    found: find_cases(root) when the caller has already checked it (no second scan)."""
    from .prepare import add_to_index, cache_case, check_cache, new_index

    cases, scan_warnings = found or find_cases(root)
    check_prescriptions(cases, prescriptions or {})
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    index = check_cache(cache, None, cfg) if (cache / "index.json").exists() else new_index(cfg)
    cached = {e["pid"]: split for split, entries in index["splits"].items() for e in entries}
    rows: list[dict] = []
    for case in cases:
        row = {"case": case.key, "where": case.where, "status": "", "split": "", "reason": "", "targets": "",
               "scale": "", "site": "", "organs": "", "warnings": ""}
        if case.key in cached:
            row.update(status="used", split=cached[case.key], reason="cached earlier")
            rows.append(row)
            continue
        try:
            prepared = prepare_cohort_case(case, cfg, prescriptions, mapping, need_dose=True)
        except DoseDiffError as exc:
            row.update(status="skipped", reason=f"{exc.problem} {exc.fix}".strip())
            rows.append(row)
            if progress:
                progress(case.key)
            continue
        split = "validation" if _is_validation(case.key, validation_fraction) else "train"
        masks = dict(prepared.inputs.masks)
        entry = cache_case(case.key, prepared.inputs.ct, masks, prepared.dose, cache, cfg)
        entry.update(source="dicom", site=site_of(prepared.case), scale=prepared.scale,
                     prescriptions_gy=_levels_gy(prepared))
        add_to_index(index, split, entry, cache)
        row.update(status="used", split=split,
                   targets=prepared.prescription.describe() if prepared.prescription else "by name",
                   scale=f"{prepared.scale:.4g}", site=entry["site"],
                   organs=" ".join(r for r in entry["rois"] if r not in TARGETS),
                   warnings=" | ".join(prepared.warnings))
        rows.append(row)
        if progress:
            progress(case.key)
    moved = _ensure_both_splits(index, validation_fraction, cache)
    for row in rows:
        if row["case"] in moved:
            row["split"] = moved[row["case"]]
    if scan_warnings:
        rows.append({"case": "", "where": str(root), "status": "note", "reason": " | ".join(scan_warnings)})
    write_rows(rows, cache / "cohort_report.csv")
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    """A CSV of report rows (columns from the first row), written whole or not at all."""
    import csv

    def writer(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["case"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, writer, overwrite=True)


def _ensure_both_splits(index: dict, fraction: float, cache: Path) -> dict[str, str]:
    """With a fraction asked for and two or more DICOM cases, at least one validates (the one of
    lowest draw) and at least one trains (the one of highest draw); returns {case: new split}."""
    from .prepare import write_index

    dicom = [(s, e) for s, es in index["splits"].items() for e in es if e.get("source") == "dicom"]
    if fraction <= 0 or len(dicom) < 2:
        return {}
    draw = lambda se: int(se[1]["pid"][4:], 16)  # noqa: E731
    moved = {}
    for wanted, pick in (("validation", min), ("train", max)):
        if not any(s == wanted for s, _ in dicom):
            split, entry = pick(dicom, key=draw)
            index["splits"][split].remove(entry)
            index["splits"].setdefault(wanted, []).append(entry)
            moved[entry["pid"]] = wanted
            dicom = [(wanted if e is entry else s, e) for s, e in dicom]
    if moved:
        write_index(index, cache)
    return moved
