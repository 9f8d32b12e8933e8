"""Predicting a case, the one way: inputs -> prepared case -> dose -> output files.

`dosediff predict` (one case or an OpenKBP split), `dosediff demo`, the Slicer
module's background worker and the benchmarks all call `run_prediction`, so a fix to
reading, preparing, sampling or writing is made here once. Arguments are checked by
the callers (each knows its own flags); this module does the job.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import openkbp, predict
from .errors import DoseDiffError
from .volume import Volume, atomic_write, make_folder, read_structures, read_volume, write_volume

if TYPE_CHECKING:
    import torch

    from .config import ModelConfig
    from .dicomrt import DicomCase
    from .modelcard import Network

# what modelcard.load_model returns: the network(s), its configuration and its card
Loaded = tuple["Network", "ModelConfig", dict]


@dataclass
class Case:
    """A case as read, before the model grid: the CT as given and its structures."""

    ct: Volume
    structures: dict[str, Volume]
    source: str = ""                               # the path it was read from, for messages
    patient: openkbp.OpenKBPPatient | None = None  # OpenKBP: already on the model grid
    dicom: "DicomCase | None" = None               # DICOM: the CT headers an RTDOSE refers to
    warnings: list[str] = field(default_factory=list)


def read_case(ct: Path | None = None, structures: Path | None = None, dicom: Path | None = None,
              series_uid: str | None = None, openkbp_patient: Path | None = None,
              with_dose: bool = False) -> Case:
    """A case from an image and its structures, a DICOM folder or an OpenKBP patient folder."""
    if openkbp_patient is not None:
        p = openkbp.read_patient(openkbp_patient, with_dose=with_dose)
        return Case(p.ct, p.masks, str(openkbp_patient), patient=p)
    if dicom is not None:
        from .dicomrt import read_dicom

        d = read_dicom(dicom, series_uid)
        return Case(d.ct, d.structures, str(dicom), dicom=d, warnings=list(d.warnings))
    if ct is None or structures is None:
        raise DoseDiffError("A case needs a CT and its structures.", "Give both.")
    # the CT as given: the dose is written back on exactly its grid, oblique or not
    return Case(read_volume(ct, reorient=False), read_structures(structures), str(ct))


@dataclass(frozen=True)
class Sampling:
    """How to sample; None means the choice the model card was validated with."""

    sampler: str | None = None
    steps: int | None = None
    samples: int | None = None
    flip: bool | None = None
    seed: int | None = None            # None: random, reported in the result
    device: "torch.device | str" = "cpu"
    batch_size: int | None = None
    z_smoothing_mm: float | None = None
    precision: str = "auto"            # the network's: auto | fp32 | bf16 (runtime.network_dtype)
    normalise: bool | None = None      # plan normalisation to the card's level (normalisation.py)

    def choice(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "samples": self.samples, "flip": self.flip,
                "z_smoothing_mm": self.z_smoothing_mm, "normalise": self.normalise}


@dataclass(frozen=True)
class Outputs:
    """Where the prediction goes: dose files (by suffix), the SD, an RTDOSE folder."""

    doses: tuple[Path, ...] = ()
    std: Path | None = None
    rtdose_folder: Path | None = None
    overwrite: bool = False


def write_dose(dose: Volume, path: Path, overwrite: bool = False) -> Path:
    """A dose file: OpenKBP's sparse CSV for .csv, else an image (NRRD, NIfTI, MHA)."""
    if Path(path).suffix == ".csv":
        return openkbp.write_dose_csv(dose, path, overwrite)
    return write_volume(dose, path, overwrite)


def run_prediction(case: Case, loaded: Loaded, outputs: Outputs = Outputs(), sampling: Sampling = Sampling(),
                   mapping: Mapping[str, str | None] | None = None, progress: predict.Progress | None = None,
                   on_warnings: Callable[[list[str]], None] | None = None,
                   prescriptions: Mapping[str, float] | None = None) -> tuple[predict.Prediction, dict]:
    """Prepare, predict and write one case; returns the prediction and {output: path written}.

    prescriptions (NAME -> Gy, the user's) and a DICOM case's RTPLAN place the targets on the
    model's dose levels; the dose comes back at the plan's own levels.

    Warnings go to `on_warnings` as soon as they are known (reading, then preparing), so a
    user sees them before the sampling starts.
    """
    model, cfg, card = loaded
    tell = on_warnings or (lambda _w: None)
    tell(case.warnings)
    if case.dicom is not None and not case.structures:
        raise DoseDiffError(f"{case.source} has no RTSTRUCT.", "Export the structure set with the CT.")
    if case.patient is not None:
        inputs = predict.prepare_openkbp(case.patient, cfg)
    else:
        inputs = predict.prepare_case(case.ct, case.structures, cfg, mapping, prescriptions,
                                      case.dicom.prescriptions if case.dicom is not None else None)
    tell(inputs.warnings)
    pred = predict.predict_case(inputs, model, cfg, **sampling.choice(), seed=sampling.seed, device=sampling.device,
                                batch_size=sampling.batch_size, with_std=outputs.std is not None, progress=progress,
                                precision=sampling.precision)
    written: dict[str, Path] = {}
    if outputs.rtdose_folder is not None:
        from .dicomrt import write_rtdose

        if case.dicom is None:
            raise DoseDiffError("An RTDOSE needs a DICOM input (it refers to its CT).", "Write a dose image instead.")
        written["rtdose"] = write_rtdose(pred.dose, case.dicom.ct_datasets, outputs.rtdose_folder, card["name"],
                                         case.dicom.plan_uid, outputs.overwrite)
    for path in outputs.doses:
        written[str(path)] = write_dose(pred.dose, path, outputs.overwrite)
    if outputs.std is not None and pred.std is not None:
        written["std"] = write_volume(pred.std, outputs.std, outputs.overwrite)
    return pred, written


def predict_openkbp_split(folders: list[Path], out: Path, loaded: Loaded, sampling: Sampling,
                          overwrite: bool = False, progress: Callable[[Path], None] | None = None) -> None:
    """Every patient folder -> OUT/pt_N.csv, timed in OUT/timings.json; existing files are kept (resumable)."""
    import torch

    make_folder(out)
    timings_path = out / "timings.json"
    timings = read_timings(timings_path)
    if sampling.seed is None:  # a split is predicted reproducibly
        sampling = replace(sampling, seed=0)
    for folder in folders:
        if progress:
            progress(folder)
        target = out / f"{folder.name}.csv"
        if target.exists() and not overwrite:
            continue
        t0 = time.perf_counter()
        pred, _ = run_prediction(read_case(openkbp_patient=folder), loaded, Outputs((target,), overwrite=overwrite),
                                 sampling)
        timings[folder.name] = {"seconds": round(time.perf_counter() - t0, 2), "device": str(sampling.device),
                                "threads": torch.get_num_threads(), "precision": pred.info["precision"],
                                "sampler": pred.info["sampler"],
                                "steps": pred.info["steps"], "samples": pred.info["samples"],
                                "flip": pred.info["flip"], "z_smoothing_mm": pred.info["z_smoothing_mm"],
                                "target_mean_gy": pred.info["target_mean_gy"],
                                "slices": pred.info["slices_predicted"]}
        text = json.dumps(timings, indent=1)
        atomic_write(timings_path, lambda p: p.write_text(text), overwrite=True)


def read_timings(path: Path) -> dict:
    """The per-patient timings of a split's prediction ({} when there are none)."""
    if not path.is_file():
        return {}
    try:
        timings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        timings = None
    if not isinstance(timings, dict) or not all(isinstance(v, dict) and {"seconds", "slices"} <= set(v)
                                                for v in timings.values()):
        raise DoseDiffError(f"{path} is damaged.", "Delete it (the timings are measured again by predict).")
    return timings
