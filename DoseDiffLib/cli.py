"""The `dosediff` command line: thin argument parsing over the library."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

from .config import MAX_Z_SMOOTHING_MM, PRECISIONS
from .errors import Cancelled, DoseDiffError
from .registry import default_model, model_argument
from .volume import all_or_nothing, atomic_write, check_output, check_output_folder, make_folder

if TYPE_CHECKING:  # the heavy modules are imported by the commands that need them
    from .config import ModelConfig
    from .train import TrainConfig

DEFAULT_MODEL = default_model()  # a registered name; --model resolves names and card paths


class _ProgressBar:
    """A tqdm bar on stderr, started by the first step (warnings printed before it stay above it)."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int, _message: str) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=1, desc=self.desc, unit="step", dynamic_ncols=True, file=sys.stderr)
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi], refused with the range otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value
    return parse


SEED = _int_in(0, 2 ** 32 - 1)
STEPS = _int_in(1, 10000)
SAMPLES = _int_in(1, 256)
BATCH = _int_in(1, 4096)
# single-file formats only: a detached header (.nhdr, .mhd) would name the temporary data file
DOSE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")


def _add_sampler(p) -> None:
    from .config import SAMPLERS

    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="regression (one call per view, fastest) or ddim (the paper's 8 steps, 4 samples, mirrored); "
                        "default: the one the model card was validated with")
    p.add_argument("--steps", type=STEPS, default=None, help="DDIM steps (overrides the sampler's)")
    p.add_argument("--samples", type=SAMPLES, default=None, help="samples averaged (overrides the sampler's)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also predict the mirrored patient and average (overrides the sampler's and the model card's)")
    p.add_argument("--z-smoothing", type=float, default=None, metavar="MM",
                   help="Gaussian SD along z applied outside the targets to the slice-by-slice prediction "
                        "(0 turns it off); default: the model card's")
    p.add_argument("--normalise", action=argparse.BooleanOptionalAction, default=None,
                   help="scale the dose so its primary target's mean is the level the training plans were "
                        "normalised to (README, 'Plan normalisation'); default: the model card's")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="the network's arithmetic: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), "
                        "fp32 or bf16")


def _sampling(args, seed: int | None, device) -> "Sampling":
    from .job import Sampling

    return Sampling(args.sampler, args.steps, args.samples, args.flip, seed, device,
                    getattr(args, "batch_size", None), args.z_smoothing, args.precision, args.normalise)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict a dose volume")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ct", type=Path, help="CT image (NRRD, NIfTI, MHA) in HU")
    src.add_argument("--dicom", type=Path, help="DICOM folder: CT series + RTSTRUCT (+ the plan's RTDOSE)")
    src.add_argument("--openkbp", type=Path, help="OpenKBP patient folder (pt_N), or a split folder of them (then --out is a folder)")
    p.add_argument("--structures", type=Path, help=".seg.nrrd or folder of per-ROI masks (with --ct)")
    p.add_argument("--mapping", type=Path, help='JSON {"model ROI": "structure name"} overriding name matching')
    _add_prescription(p)
    p.add_argument("--out", type=Path, help="dose output (.nrrd/.nii.gz/.mha, or .csv with --openkbp)")
    p.add_argument("--out-dicom", type=Path, help="folder for the predicted RTDOSE (with --dicom)")
    p.add_argument("--series-uid", help="CT series to use when the DICOM folder holds several")
    p.add_argument("--std-out", type=Path, help="also write the per-voxel standard deviation (needs --samples > 1; "
                   "refused unless the model card shows it calibrated, or --uncalibrated-std)")
    p.add_argument("--uncalibrated-std", action="store_true",
                   help="write --std-out even though the card does not show the spread calibrated (research only)")
    p.add_argument("--model", type=model_argument, default=DEFAULT_MODEL,
                   help=f"registered model name or model card (.json); default {DEFAULT_MODEL}")
    _add_sampler(p)
    p.add_argument("--seed", type=SEED, default=None, help="random seed 0..2^32-1 (default: random, reported)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--batch-size", type=BATCH, default=None, help="slices per network call (default: fits memory)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _add_prescription(p) -> None:
    p.add_argument("--prescription", action="append", default=[], metavar="NAME=GY", type=_prescription,
                   help="a target structure's prescribed dose (repeatable); default: the RTPLAN's, else the "
                        "dose in the name (PTV_66). Doses are scaled onto the model's levels and back")


def _prescription(text: str) -> tuple[str, float]:
    from .prescription import parse_prescriptions

    try:
        return next(iter(parse_prescriptions([text]).items()))
    except DoseDiffError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=GY with a dose between 0 and 150 Gy") from None


def _exists(path: Path | None, what: str, folder: bool = False) -> None:
    """An input named on the command line, checked before anything is loaded."""
    if path is None:
        return
    if not path.exists():
        raise DoseDiffError(f"File not found: {path} (the {what}).", "Check the path and its spelling.")
    if folder and not path.is_dir():
        raise DoseDiffError(f"{what} {path} is a file, not a folder.", "Give the folder.")


def _distinct(paths: dict[str, Path | None], inputs: dict[str, Path | None]) -> None:
    """No two outputs on one file, and no output on an input (--std-out = --out wrote the SD as the dose)."""
    seen: dict[Path, str] = {os.path.realpath(p): n for n, p in inputs.items() if p is not None}
    for name, p in paths.items():
        if p is None:
            continue
        real = os.path.realpath(p)
        if real in seen:
            raise DoseDiffError(f"{name} {p} is the same file as {seen[real]}.", f"Give {name} its own path.")
        seen[real] = name


def _check_predict(args: argparse.Namespace) -> None:
    """Every argument and output of predict, before the model or any image is loaded."""
    if args.out is None and args.out_dicom is None:
        raise DoseDiffError("No output given.", "Add --out dose.nrrd (or --out-dicom DIR with --dicom).")
    if args.out_dicom is not None and args.dicom is None:
        raise DoseDiffError("--out-dicom needs a --dicom input (the RTDOSE refers to its CT).", "Use --out instead.")
    if args.structures is not None and args.ct is None:
        raise DoseDiffError("--structures is used only with --ct (DICOM and OpenKBP inputs bring their own).",
                            "Drop --structures, or give the CT as --ct.")
    if args.mapping is not None and args.openkbp is not None:
        raise DoseDiffError("--mapping is not used with --openkbp (its ROI names are fixed).", "Drop --mapping.")
    if args.series_uid is not None and args.dicom is None:
        raise DoseDiffError("--series-uid is used only with --dicom.", "Drop --series-uid.")
    if args.prescription and args.openkbp is not None:
        raise DoseDiffError("--prescription is not used with --openkbp (its targets are 70/63/56 Gy).",
                            "Drop --prescription.")
    if args.ct is not None and args.structures is None:
        raise DoseDiffError("--ct needs --structures.", "Give a .seg.nrrd or a folder of masks.")
    if args.std_out is not None and args.samples is not None and args.samples < 2:
        raise DoseDiffError("--std-out needs at least two samples.", "Use --sampler ddim or add --samples 4.")
    _exists(args.ct, "CT")
    _exists(args.structures, "structures")
    _exists(args.mapping, "mapping file")
    _exists(args.dicom, "DICOM folder", folder=True)
    _exists(args.openkbp, "OpenKBP folder", folder=True)
    out_types = DOSE_SUFFIXES + ((".csv",) if args.openkbp is not None else ())
    if args.out is not None:
        check_output(args.out, args.overwrite, out_types, "--out")
    if args.std_out is not None:
        check_output(args.std_out, args.overwrite, DOSE_SUFFIXES, "--std-out")
    if args.out_dicom is not None:
        check_output_folder(args.out_dicom)
        if args.out_dicom.is_dir() and not args.overwrite \
                and any(p.name.startswith("RTDOSE") for p in args.out_dicom.iterdir()):
            raise DoseDiffError(f"{args.out_dicom} already holds an RTDOSE.", "Choose another folder or pass --overwrite.")
    _distinct({"--out": args.out, "--std-out": args.std_out},
              {"--ct": args.ct, "--structures": args.structures, "--mapping": args.mapping, "--model": args.model})


def _print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    from .job import Outputs, read_case, run_prediction
    from .modelcard import load_model
    from .predict import resolve_sampler
    from .rois import read_mapping
    from .runtime import choose_device

    if args.openkbp and not (args.openkbp / "ct.csv").exists():
        return _predict_openkbp_cohort(args)
    _check_predict(args)
    mapping = read_mapping(args.mapping) if args.mapping else None
    device = choose_device(args.device)
    loaded = load_model(args.model, device)
    sampling = _sampling(args, args.seed, device)
    _, sampler = resolve_sampler(loaded[1], **sampling.choice())  # refuses steps beyond the schedule
    if args.std_out and sampler.samples < 2:
        raise DoseDiffError("--std-out needs at least two samples.", "Use --sampler ddim or add --samples 4.")
    if args.std_out:
        from .modelcard import uncalibrated_spread

        measured = uncalibrated_spread(loaded[2])
        if measured and not args.uncalibrated_std:
            raise DoseDiffError(f"The spread of model {loaded[2]['name']} is not a calibrated uncertainty ({measured}).",
                                "Drop --std-out, or add --uncalibrated-std to write it for research.")
        if measured:
            print(f"warning: the SD written to --std-out is not a calibrated uncertainty ({measured}).",
                  file=sys.stderr)
    case = read_case(args.ct, args.structures, args.dicom, args.series_uid, args.openkbp)
    outputs = Outputs(tuple(p for p in (args.out,) if p is not None), args.std_out, args.out_dicom, args.overwrite)
    bar = _ProgressBar("Predicting dose")
    try:
        pred, written = run_prediction(case, loaded, outputs, sampling, mapping, progress=bar,
                                       on_warnings=_print_warnings, prescriptions=dict(args.prescription))
    finally:
        bar.close()
    if "rtdose" in written:
        print(f"wrote {written['rtdose']}", file=sys.stderr)
    info = {k: v for k, v in pred.info.items() if k != "warnings"}
    print(json.dumps({"output": str(args.out or args.out_dicom), "model": loaded[2]["name"], **info}, indent=1))
    return 0


def _predict_openkbp_cohort(args: argparse.Namespace) -> int:
    """Every pt_N under a split folder -> OUT/pt_N.csv; existing files are kept (resumable)."""
    from tqdm import tqdm

    from . import openkbp
    from .job import predict_openkbp_split
    from .modelcard import load_model
    from .predict import resolve_sampler
    from .runtime import choose_device

    if args.out is None:
        raise DoseDiffError("A split folder needs --out FOLDER for the pt_N.csv files.", "Add --out preds/.")
    for flag, value in (("--structures", args.structures), ("--mapping", args.mapping), ("--std-out", args.std_out),
                        ("--out-dicom", args.out_dicom), ("--series-uid", args.series_uid),
                        ("--prescription", args.prescription or None)):
        if value is not None:
            raise DoseDiffError(f"{flag} is not used with --openkbp.", f"Drop {flag}.")
    folders = openkbp.patient_folders(args.openkbp)
    if not folders:
        raise DoseDiffError(f"{args.openkbp} holds no OpenKBP patients.", "Point to a pt_N folder or a split folder.")
    check_output_folder(args.out)
    device = choose_device(args.device)
    loaded = load_model(args.model, device)
    sampling = _sampling(args, args.seed, device)
    resolve_sampler(loaded[1], **sampling.choice())  # refuses steps beyond the schedule
    bar = tqdm(total=len(folders), desc="Patients", unit="patient")
    try:
        predict_openkbp_split(folders, args.out, loaded, sampling, args.overwrite, progress=lambda _f: bar.update())
    finally:
        bar.close()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .evaluate import evaluate_openkbp

    timings: dict = {}
    if args.update_card is not None:  # a bad card or timings file is refused before the evaluation, not after
        from .modelcard import read_card

        read_card(args.update_card)
        from .job import read_timings

        timings = read_timings(args.predictions / "timings.json") if args.predictions else {}
    if args.dicom is not None:
        from .evaluate import evaluate_dicom
        from .rois import read_mapping

        if args.openkbp is not None or args.predictions is not None or args.update_card is not None:
            raise DoseDiffError("--dicom is evaluated on its own (with --prediction).",
                                "Drop --openkbp, --predictions and --update-card.")
        if args.prediction is None:
            raise DoseDiffError("--dicom needs --prediction (a dose image or RTDOSE file).", "Add --prediction FILE.")
        _exists(args.dicom, "DICOM folder", folder=True)
        _exists(args.prediction, "prediction")
        _exists(args.mapping, "mapping file")
        mapping = read_mapping(args.mapping) if args.mapping else None
        overall = evaluate_dicom(args.dicom, args.prediction, args.out, args.series_uid, mapping,
                                 gamma=not args.no_gamma, overwrite=args.overwrite)
        print(json.dumps({k: v for k, v in overall.items() if k != "dvh_error_per_roi"}, indent=1))
        return 0
    if args.openkbp is None or args.predictions is None:
        raise DoseDiffError("evaluate needs --openkbp and --predictions, or --dicom and --prediction.",
                            "See dosediff evaluate --help.")
    for flag, value in (("--prediction", args.prediction), ("--mapping", args.mapping),
                        ("--series-uid", args.series_uid)):
        if value is not None:
            raise DoseDiffError(f"{flag} is used only with --dicom.", f"Drop {flag}.")
    bars = []  # started with the first patient: a refusal before it prints nothing but its line

    def progress(_pid: str) -> None:
        if not bars:
            bars.append(tqdm(desc="Evaluating", unit="patient"))
        bars[0].update()
    try:
        overall = evaluate_openkbp(args.openkbp, args.predictions, args.out, gamma=not args.no_gamma,
                                   plots=not args.no_plots, overwrite=args.overwrite, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    brief = {k: v for k, v in overall.items() if k != "dvh_error_per_roi"}
    print(json.dumps(brief, indent=1))
    if args.update_card:
        from .modelcard import update_card

        measured = {"validation": {
            "data": f"OpenKBP {args.openkbp.name} ({overall['patients']} patients)", **brief,
            "dvh_error_per_roi": overall["dvh_error_per_roi"],
            "seconds_per_volume": _timing_summary(timings) if timings else None}}
        update_card(args.update_card, measured)
        print(f"updated {args.update_card}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on an embedded case: phantom (default) or one OpenKBP patient."""
    from .evaluate import evaluate_patient, plan_summary
    from .job import Case, Outputs, read_case, run_prediction
    from .modelcard import load_model
    from .phantom import head_and_neck
    from .plots import dose_overlay, dvh_comparison
    from .predict import resolve_sampler
    from .runtime import choose_device
    from .volume import write_segmentation, write_volume

    out = args.out
    _exists(args.openkbp, "OpenKBP patient folder", folder=True)
    inputs_written = (f"{args.openkbp.name}.csv",) if args.openkbp else ("ct.nrrd", "structures.seg.nrrd")
    names = ("dose.nrrd", "dvh.png", "dose_overlay.png") + inputs_written
    check_output_folder(out, names, args.overwrite)  # nothing of the user's is replaced without --overwrite
    device = choose_device(args.device)
    loaded = load_model(args.model, device)
    card = loaded[2]
    sampling = _sampling(args, args.seed, device)
    resolve_sampler(loaded[1], **sampling.choice())  # refuses steps beyond the schedule
    if args.openkbp:
        case = read_case(openkbp_patient=args.openkbp, with_dose=True)
        patient = case.patient
        title = f"OpenKBP {patient.pid}"
    else:
        case = Case(*head_and_neck())
        title = "synthetic head-and-neck phantom"
    ct, masks = case.ct, case.structures
    reference = patient.dose if args.openkbp else None
    doses = (out / "dose.nrrd",) + ((out / f"{patient.pid}.csv",) if args.openkbp else ())
    bar = _ProgressBar("Predicting dose")
    make_folder(out)
    try:
        pred, _ = run_prediction(case, loaded, Outputs(doses, overwrite=args.overwrite), sampling,
                                 progress=bar, on_warnings=_print_warnings)
    finally:
        bar.close()
    if not args.openkbp:
        write_volume(ct, out / "ct.nrrd", overwrite=args.overwrite)
        write_segmentation(masks, out / "structures.seg.nrrd", overwrite=args.overwrite)
    roi_masks = {k: v.array for k, v in masks.items() if k != "BODY"}
    ref_arr = reference.array if reference is not None else None
    dvh_comparison(ref_arr, pred.dose.array, roi_masks, out / "dvh.png", f"DVH, {title}", overwrite=args.overwrite)
    dose_overlay(ct.array, pred.dose.array, roi_masks, ct.spacing, out / "dose_overlay.png",
                 f"DoseDiff predicted dose, {title} (research and planning guidance only)", overwrite=args.overwrite)
    print(f"DoseDiff {card['name']} on the {title}: {pred.info['slices_predicted']} slices, "
          f"{pred.info['seconds_sampling']:.1f} s sampling ({pred.info['steps']} DDIM step{'s' if pred.info['steps'] != 1 else ''}) on {pred.info['device']}, "
          f"{pred.info['precision']} "
          f"(seed {pred.info['seed']})")
    print("Research and planning guidance only: not a treatment planning system dose calculation.")
    for line in plan_summary(pred.dose.array, roi_masks, ct.grid.voxel_volume_mm3()):
        print("  " + line)
    if reference is not None:
        e = evaluate_patient(patient.pid, reference.array, pred.dose.array, roi_masks,
                             patient.possible_dose.array, ct.spacing, gamma=False)
        print(f"  against the clinical plan: dose score {e.scores['dose_score']:.2f} Gy, "
              f"DVH score {e.scores['dvh_score']:.2f} Gy, MAE in body {e.scores['mae_body']:.2f} Gy")
    print(f"wrote {', '.join(str(out / n) for n in names)}")
    return 0


def _timing_summary(timings: dict) -> dict:
    """Mean and maximum seconds per volume, with the settings they were measured under."""
    rows = list(timings.values())
    secs = [r["seconds"] for r in rows]
    return {"mean": round(sum(secs) / len(secs), 1), "max": max(secs),
            "mean_slices_predicted": round(sum(r["slices"] for r in rows) / len(rows), 1),
            **{k: rows[0].get(k) for k in ("device", "threads", "sampler", "steps", "samples", "flip",
                                            "z_smoothing_mm", "target_mean_gy")}}


def cmd_init_model(args: argparse.Namespace) -> int:
    import torch

    from .config import ModelConfig
    from .mmfnet import MMFNet
    from .modelcard import save_model

    check_output(args.out, args.overwrite, (".json",), "--out")
    check_output(args.out.with_suffix(".safetensors"), args.overwrite, (), "Weights file")
    torch.manual_seed(args.seed)
    cfg = ModelConfig.preset(args.preset)
    model = MMFNet(cfg.net)
    save_model(model, cfg, args.out, {"training": {"status": "untrained: random initialisation"}},
               half=not args.fp32, overwrite=args.overwrite)
    print(f"wrote {args.out} and {args.out.with_suffix('.safetensors')}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .modelcard import save_ensemble

    check_output(args.out, args.overwrite, (".json",), "--out")
    check_output(args.out.with_suffix(".safetensors"), args.overwrite, (), "Weights file")
    save_ensemble(args.model, args.partner, args.out, overwrite=args.overwrite)
    shares = ", ".join(f"{w:g}" for _, w in args.partner)
    print(f"wrote {args.out} and {args.out.with_suffix('.safetensors')}: {args.model.name} keeps "
          f"{1 - sum(w for _, w in args.partner):g}, partners {shares}. Measure it before use: "
          f"dosediff evaluate --update-card {args.out}")
    return 0


def _partner(text: str) -> tuple[Path, float]:
    name, sep, share = text.rpartition("=")
    try:
        value = float(share)
    except ValueError:
        value = float("nan")
    if not sep or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not CARD=SHARE with a share between 0 and 1")
    return model_argument(name), value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the usage block and exits by itself)."""

    def error(self, message: str) -> NoReturn:
        raise DoseDiffError(f"{self.prog}: {message}.", f"See {self.prog} --help.")


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = _Parser(
        prog="dosediff",
        description="DoseDiff dose prediction. For research and planning guidance only: not a treatment "
                    "planning system dose calculation.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    p = sub.add_parser("init-model", help="write a randomly initialised model and its card")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="paper | small | tiny | test")
    p.add_argument("--out", type=Path, required=True, help="card path (.json)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("ensemble", help="one model card for networks whose doses are averaged by shares")
    p.add_argument("--model", type=model_argument, required=True,
                   help="the first network (registered name or card): it keeps 1 - the partners' shares, and a "
                        "warm start from the ensemble continues it")
    p.add_argument("--partner", action="append", required=True, type=_partner, metavar="CARD=SHARE",
                   help="another network's card and the share of its dose (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="the ensemble's card (.json); its weights go beside it")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("demo", help="the main job on an embedded phantom (or --openkbp pt_N) with the bundled model")
    p.add_argument("--out", type=Path, default=Path("dosediff-demo"))
    p.add_argument("--openkbp", type=Path, help="run on this OpenKBP patient instead, and score it")
    p.add_argument("--model", type=model_argument, default=DEFAULT_MODEL)
    _add_sampler(p)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("evaluate", help="OpenKBP dose/DVH scores and more against the clinical plans")
    p.add_argument("--openkbp", type=Path, help="split folder (or one pt_N) with reference doses")
    p.add_argument("--predictions", type=Path, help="folder of pt_N.csv predictions (or one file)")
    p.add_argument("--dicom", type=Path, help="DICOM folder with the clinical plan's RTDOSE as reference")
    p.add_argument("--prediction", type=Path, help="with --dicom: predicted dose (image or RTDOSE .dcm)")
    p.add_argument("--series-uid", help="CT series when the DICOM folder holds several")
    p.add_argument("--mapping", type=Path, help="ROI mapping JSON for local structure names")
    p.add_argument("--out", type=Path, required=True, help="report folder (metrics.json, CSVs, DVH plots)")
    p.add_argument("--no-gamma", action="store_true", help="skip gamma pass rates (the slowest part)")
    p.add_argument("--update-card", type=Path, help="write the measured OpenKBP figures into this model card")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("prepare", help="cache OpenKBP patients or a clinic's DICOM plans for training")
    p.add_argument("--split", action="append", help="NAME=FOLDER of pt_N folders (repeatable)")
    p.add_argument("--pack", type=Path, help="a pack written by `dosediff pack` instead of folders")
    p.add_argument("--dicom-cohort", type=Path,
                   help="folder of DICOM exports (CT + RTSTRUCT + RTDOSE per patient: one sub-folder each, "
                        "or mixed files grouped by study)")
    _add_prescription(p)
    p.add_argument("--mapping", type=Path, help='with --dicom-cohort: JSON {"model ROI": "structure name"}')
    p.add_argument("--validation-fraction", type=float, default=0.2,
                   help="with --dicom-cohort: share of patients (drawn per patient) kept for validation")
    p.add_argument("--cache", type=Path, required=True, help="cache folder")
    p.add_argument("--workers", type=int, default=1, help="processes (one patient each)")
    p = sub.add_parser("qa", help="plan QA: flag organs of finished plans that get more dose than predicted")
    p.add_argument("--dicom-cohort", type=Path, required=True, help="folder of DICOM exports with the plans' RTDOSE")
    p.add_argument("--out", type=Path, required=True, help="report folder: qa.csv, qa.json, summary.html, dvh/")
    p.add_argument("--model", type=model_argument, default=DEFAULT_MODEL)
    _add_prescription(p)
    p.add_argument("--mapping", type=Path, help='JSON {"model ROI": "structure name"} overriding name matching')
    p.add_argument("--threshold-gy", type=float, default=3.0, help="flag when plan - prediction exceeds this ...")
    p.add_argument("--threshold-percent", type=float, default=10.0, help="... and this per cent of the prediction")
    _add_sampler(p)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("pack", help="OpenKBP patients in one small file, to train where the archives are not")
    p.add_argument("--split", action="append", required=True,
                   help="NAME=FOLDER[:N] of pt_N folders, the first N patients only (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="pack file (.xz)")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("train", help="train on a prepared cache (resumes from RUN/checkpoint.pt)")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True, help="run folder: checkpoint, log, curves, best model")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="training setting, e.g. steps=20000")
    return parser


def cmd_prepare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import openkbp
    from .config import ModelConfig
    from .prepare import prepare

    if args.dicom_cohort is not None:
        return _prepare_dicom_cohort(args)
    if args.prescription or args.mapping is not None:
        raise DoseDiffError("--prescription and --mapping are for --dicom-cohort (OpenKBP names and doses are fixed).",
                            "Drop them, or prepare a --dicom-cohort.")
    if bool(args.split) == bool(args.pack):
        raise DoseDiffError("Give either --split NAME=FOLDER (repeatable), --pack FILE or --dicom-cohort DIR.",
                            "E.g. --split train=data/train-pats --split validation=data/validation-pats.")
    splits: dict[str, Path] = {}
    for name, (folder, count) in _splits(args.split or []).items():
        if count is not None:
            raise DoseDiffError(f"--split {name}={folder}:{count}: a patient count is for dosediff pack.",
                                "Prepare whole split folders.")
        if not openkbp.patient_folders(folder):
            raise DoseDiffError(f"--split {name}: {folder} holds no OpenKBP patients (pt_N folders with ct.csv).",
                                "Point to a split folder such as data/train-pats.")
        splits[name] = folder
    if args.pack is not None and not args.pack.is_file():
        raise DoseDiffError(f"The pack {args.pack} does not exist.", "Write one with dosediff pack.")
    no_dose = [p.name for f in splits.values() for p in openkbp.patient_folders(f) if not (p / "dose.csv").is_file()]
    if no_dose:
        raise DoseDiffError(f"{len(no_dose)} patient(s) have no dose.csv ({', '.join(no_dose[:3])}); training "
                            "needs the clinical dose.", "Prepare only the train and validation splits.")
    if args.workers < 1:
        raise DoseDiffError(f"--workers {args.workers} is not a number of processes.", "Give 1 or more.")
    make_folder(args.cache)
    bar = tqdm(desc="Caching patients", unit="patient")
    try:
        prepare(splits, args.cache, ModelConfig(), progress=lambda _m: bar.update(), pack=args.pack,
                workers=args.workers)
    finally:
        bar.close()
    return 0


def _prepare_dicom_cohort(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .cohort import cache_cohort, check_prescriptions, find_cases
    from .config import ModelConfig
    from .rois import read_mapping

    if args.split or args.pack:
        raise DoseDiffError("--dicom-cohort is prepared on its own.", "Run dosediff prepare once per source.")
    if not 0 <= args.validation_fraction < 1:
        raise DoseDiffError(f"--validation-fraction {args.validation_fraction} is not a share in [0, 1).",
                            "Give e.g. 0.2.")
    _exists(args.dicom_cohort, "DICOM cohort folder", folder=True)
    _exists(args.mapping, "mapping file")
    mapping = read_mapping(args.mapping) if args.mapping else None
    found = find_cases(args.dicom_cohort)  # scanned once, and a typo refused before the progress bar opens
    check_prescriptions(found[0], dict(args.prescription))
    make_folder(args.cache)  # recorded, so a failed run removes the folder it created
    bar = tqdm(desc="Caching DICOM cases", unit="case", total=len(found[0]))
    try:
        rows = cache_cohort(args.dicom_cohort, args.cache, ModelConfig(), dict(args.prescription), mapping,
                            args.validation_fraction, progress=lambda _k: bar.update(), found=found)
    finally:
        bar.close()
    for r in rows:
        if r["status"] == "skipped":
            print(f"skipped {r['case']} ({r['where']}): {r['reason']}", file=sys.stderr)
    used = sum(r["status"] == "used" for r in rows)
    print(f"{used} case(s) in the cache, {sum(r['status'] == 'skipped' for r in rows)} skipped; "
          f"per-case report: {args.cache / 'cohort_report.csv'}", file=sys.stderr)
    if not used:
        raise DoseDiffError(f"No case of {args.dicom_cohort} could be used.",
                            f"Read the reasons in {args.cache / 'cohort_report.csv'}.")
    return 0


def cmd_qa(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .cohort import check_prescriptions, find_cases
    from .qa import QA_FILES, Thresholds, qa_cohort
    from .rois import read_mapping
    from .runtime import choose_device

    _exists(args.dicom_cohort, "DICOM cohort folder", folder=True)
    _exists(args.mapping, "mapping file")
    thresholds = Thresholds(args.threshold_gy, args.threshold_percent)
    thresholds.check()
    mapping = read_mapping(args.mapping) if args.mapping else None
    check_output_folder(args.out, QA_FILES, args.overwrite)  # before the scan
    found = find_cases(args.dicom_cohort)
    check_prescriptions(found[0], dict(args.prescription))  # before the progress bar opens
    bar = tqdm(desc="Plans checked", unit="plan", total=len(found[0]))
    try:
        summary = qa_cohort(args.dicom_cohort, args.out, args.model, thresholds, dict(args.prescription), mapping,
                            _sampling(args, args.seed, choose_device(args.device)), args.overwrite,
                            progress=lambda _k: bar.update(), found=found)
    finally:
        bar.close()
    for c in summary["cases"]:
        if c["status"] == "skipped":
            print(f"skipped {c['case']} ({c['where']}): {c['note']}", file=sys.stderr)
    for r in summary["flagged_organs"]:
        print(f"{r['case']} {r['organ']} ({r['structure']}): {r['metric']} plan {r['plan_gy']:.1f} Gy, "
              f"predicted {r['predicted_gy']:.1f} Gy (+{r['excess_gy']:.1f} Gy)")
    print(f"{len(summary['flagged_organs'])} flagged organ(s); report: {args.out / 'summary.html'}", file=sys.stderr)
    return 0


def _splits(items: list[str]) -> dict[str, tuple[Path, int | None]]:
    """NAME=FOLDER[:N] arguments."""
    out: dict[str, tuple[Path, int | None]] = {}
    for item in items:
        name, _, rest = item.partition("=")
        folder, _, count = rest.partition(":")
        if not name or not folder or (count and not count.isdigit()):
            raise DoseDiffError(f"--split {item!r} is not NAME=FOLDER or NAME=FOLDER:N.",
                                "Write e.g. --split train=data/train-pats.")
        if name in out:
            raise DoseDiffError(f"--split {name} is given twice.", "Give each split once.")
        out[name] = (Path(folder), int(count) if count else None)
    return out


def cmd_pack(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import openkbp
    from .prepare import pack_openkbp

    splits = _splits(args.split)
    for name, (folder, _) in splits.items():
        if not openkbp.patient_folders(folder):
            raise DoseDiffError(f"--split {name}: {folder} holds no OpenKBP patients (pt_N folders with ct.csv).",
                                "Point to a split folder such as data/train-pats.")
    check_output(args.out, args.overwrite, (".xz",), "Pack")
    bar = tqdm(desc="Packing patients", unit="patient")
    try:
        out = pack_openkbp({k: f for k, (f, _) in splits.items()}, args.out,
                           {k: n for k, (_, n) in splits.items() if n}, progress=lambda _m: bar.update(),
                           overwrite=args.overwrite)
    finally:
        bar.close()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


# Settings whose legal range is known here; any other number must merely be finite and,
# if whole, not negative. (lo, hi, lo_open, hi_open) for numbers; a tuple of names for words.
_TRAIN_LIMITS: dict[str, tuple] = {
    "steps": (1, None), "batch_size": (1, None), "val_patients": (1, None), "checkpoint_every": (1, None),
    "context": (0, 8), "beam_mu": (0, 0.1), "dvh_weight": (0, None), "gradient_weight": (0, None),
    "max_seconds": (0, None), "lr": (0, None, True),
    "weight_decay": (0, None), "decay_at": (0, 1), "middle_blocks": (0, 16), "z_smoothing_mm": (0, MAX_Z_SMOOTHING_MM),
    "grad_clip": (0, None, True), "ema_decay": (0, 1, False, True), "aug_p": (0, 1), "zoom": (0, 1, False, True),
    "shift": (0, 1), "max_rotation_deg": (0, 180), "rotation_step_deg": (0, 180), "outside_weight": (0, None),
    "last_step_fraction": (0, 1),
    "stage1_jitter": (0, 1), "swa_every": (0, None), "swa_start": (0, None),
    "patient_every": (0, None), "patient_dvh_weight": (0, None),
    "prediction": ("epsilon", "x0", "v"), "loss": ("mse", "l1"), "sampler": ("regression", "ddim"),
    "precision": PRECISIONS,
}


def _setting(key: str, text: str, default: object) -> object:
    """One --set value, parsed as the type of its default and checked against its range."""
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value = text.lower() in ("true", "1", "yes")
        else:
            value = kind(text)
    except ValueError:
        raise DoseDiffError(f"--set {key}={text!r} is not a valid {kind.__name__}.",
                            f"Give a {kind.__name__} such as {key}={default!r}.") from None
    limits = _TRAIN_LIMITS.get(key)
    if isinstance(value, str):
        if key == "preset":
            from .config import PRESETS

            limits = tuple(PRESETS)
        if limits and value not in limits:
            raise DoseDiffError(f"--set {key}={value!r} is not one of {', '.join(limits)}.", "Use one of them.")
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise DoseDiffError(f"--set {key}={text} is not a finite number.", f"Give a number such as {default!r}.")
    lo, hi, lo_open, hi_open = (tuple(limits) + (False, False))[:4] if limits else (0, None, False, False)
    if (value < lo or (lo_open and value == lo)) or (hi is not None and (value > hi or (hi_open and value == hi))):
        span = f"{'(' if lo_open else '['}{lo}, {'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}"
        raise DoseDiffError(f"--set {key}={text} is outside {span}.", f"Give a value in {span}.")
    return value


def _train_settings(items: list[str]) -> "TrainConfig":
    from .train import MODEL_SETTINGS, TrainConfig

    defaults = {**MODEL_SETTINGS, **TrainConfig().recipe()}
    known = list(defaults)
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise DoseDiffError(f"--set {item!r} is not KEY=VALUE.", "Write e.g. --set steps=20000.")
        if key not in known:
            raise DoseDiffError(f"Unknown training setting {key!r}.", f"Known: {', '.join(known)}.")
        overrides[key] = _setting(key, text.strip(), defaults[key])
    from .registry import resolve

    if overrides.get("stage1"):  # a refiner starts as its first stage unless told otherwise
        overrides["stage1"] = str(resolve(overrides["stage1"]))
        overrides.setdefault("init", overrides["stage1"])
    if overrides.get("init"):
        from .modelcard import read_card

        overrides["init"] = str(resolve(overrides["init"]))  # a registered name or a card path
        card = read_card(overrides["init"])
        overrides = {**_inherited_settings(card, known), **overrides}
    return TrainConfig.from_settings(**overrides)


# What a warm start keeps from its model's recipe unless set: the network and its inputs, the
# objective it was trained with (fine-tuning continues them), and the read-out it was validated
# with (sampler, mirrored patient, z filter, plan normalisation), so the new card is read out and validated
# alike (the normalisation level itself is recomputed from the new run's training plans).
INHERITED = ("preset", "prediction", "sampler", "context", "beams", "beam_mu", "beam_oars", "middle_blocks", "loss",
             "outside_weight", "last_step_fraction", "dvh_weight", "gradient_weight", "patient_every",
             "patient_dvh_weight", "flip", "z_smoothing_mm", "normalise", "normalise_targets", "mirror_flag",
             "independent_flip")


def _inherited_settings(card: dict, known: list[str]) -> dict:
    """The init card's recipe values for INHERITED; the card's configuration where it has no recipe."""
    recipe = (card.get("training") or {}).get("recipe") or {}
    out = {k: recipe[k] for k in INHERITED if k in recipe and k in known}
    cfg = card.get("config") or {}
    net, diffusion, conditions = cfg.get("net") or {}, cfg.get("diffusion") or {}, cfg.get("conditions") or {}
    out.setdefault("prediction", diffusion.get("prediction", "epsilon"))
    out.setdefault("sampler", diffusion.get("sampler", "ddim"))
    out.setdefault("context", int(conditions.get("context", 0)))
    out.setdefault("beams", bool(conditions.get("beam_targets")))
    out.setdefault("beam_mu", float(conditions.get("beam_mu_per_mm", 0.0)))
    out.setdefault("beam_oars", bool(conditions.get("beam_oars")))
    out.setdefault("mirror_flag", bool(conditions.get("mirror_flag", False)))
    out.setdefault("middle_blocks", int(net.get("middle_blocks", 0)))
    out.setdefault("flip", bool(diffusion.get("flip", False)))
    out.setdefault("z_smoothing_mm", float(diffusion.get("z_smoothing_mm", 0.0)))
    out.setdefault("normalise", float(diffusion.get("target_mean_gy", 0.0)) > 0)
    return {k: v for k, v in out.items() if k in known}


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import is_main_process, process_group
    from .prepare import check_cache
    from .runtime import choose_device
    from .train import train

    tcfg = _train_settings(args.set or [])
    check_cache(args.cache)
    make_folder(args.run)
    with process_group(choose_device(args.device)) as device:
        card = train(args.cache, args.run, tcfg, device)
    if not is_main_process():  # only rank 0 validates and exports
        return 0
    if not card.exists() and tcfg.val_every == 0:
        print(f"no validation (val_every=0), so no best model: the weights are in {args.run / 'checkpoint.pt'}")
        return 0
    if not card.exists():
        raise DoseDiffError(f"Training ended without a best model: {card} was never written (no validation "
                            "produced a finite score).", "Check the run's log.jsonl.")
    print(f"best model: {card}")
    return 0


COMMANDS = {"predict": cmd_predict, "init-model": cmd_init_model, "prepare": cmd_prepare, "pack": cmd_pack, "qa": cmd_qa,
            "train": cmd_train, "ensemble": cmd_ensemble,
            "evaluate": cmd_evaluate, "demo": cmd_demo}
# these write one result each: a failure removes what they had written (cohort prediction,
# prepare and train are resumable: they keep their finished files, only empty folders go)
ALL_OR_NOTHING = ("init-model", "ensemble", "evaluate", "demo")


def _writes_one_result(args: argparse.Namespace) -> bool:
    if args.command == "predict":
        return args.openkbp is None or (args.openkbp / "ct.csv").exists()
    return args.command in ALL_OR_NOTHING


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _crash_report(exc: BaseException) -> str:
    """Write the full trace of an unexpected error to a file; returns where (or why not)."""
    import tempfile
    import time
    import traceback

    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    path = Path(tempfile.gettempdir()) / f"dosediff-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        atomic_write(path, lambda p: p.write_text(f"dosediff {' '.join(sys.argv[1:])}\n\n{trace}"))
    except (OSError, DoseDiffError) as err:
        return f"the trace could not be saved ({err})"
    return f"full trace in {path}"


def _on_sigterm(_signum, _frame) -> None:
    raise KeyboardInterrupt("terminated")


def main(argv: list[str] | None = None) -> int:
    """Every failure ends in one line on stderr and exit code 2."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except DoseDiffError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s: %(message)s")
    handler = None
    if threading.current_thread() is threading.main_thread():  # killed runs clean up like Ctrl-C
        handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with all_or_nothing(keep_files=not _writes_one_result(args)):
            return COMMANDS[args.command](args)
    except DoseDiffError as exc:
        message = str(exc)
    except (KeyboardInterrupt, Cancelled):
        message = ("Interrupted; the files this run had started were removed (finished work of a cohort "
                   "prediction, prepare or train is kept).")
    except MemoryError:
        message = "Out of memory. Fix: pass a smaller --batch-size, or use a machine with more memory."
    except OSError as exc:  # the machine's doing (permissions, a full disk, a vanished file), not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        message = (f"Cannot access {where}{exc.strerror or exc}. Fix: check the path, its permissions and the "
                   "free disk space.")
    except ImportError as exc:
        message = (f"A required package is missing ({exc}). Fix: install DoseDiff with its dependencies "
                   "(pip install -e . or make install).")
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, the trace in a file
        if type(exc).__name__ == "OutOfMemoryError":
            message = f"The GPU ran out of memory ({_one_line(exc)[:120]}). Fix: pass a smaller --batch-size."
        else:
            message = (f"Unexpected {type(exc).__name__}: {_one_line(exc)[:200]} (a bug in DoseDiff; "
                       f"{_crash_report(exc)}; please report it).")
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
