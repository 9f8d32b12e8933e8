"""The `dosediff` command line: thin argument parsing over the library."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import DoseDiffError
from .registry import default_model, model_argument

DEFAULT_MODEL = default_model()  # a registered name; --model resolves names and card paths


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=1, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(done: int, total: int, _message: str) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict a dose volume")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ct", type=Path, help="CT image (NRRD, NIfTI, MHA) in HU")
    src.add_argument("--dicom", type=Path, help="DICOM folder: CT series + RTSTRUCT (+ the plan's RTDOSE)")
    src.add_argument("--openkbp", type=Path, help="OpenKBP patient folder (pt_N), or a split folder of them (then --out is a folder)")
    p.add_argument("--structures", type=Path, help=".seg.nrrd or folder of per-ROI masks (with --ct)")
    p.add_argument("--mapping", type=Path, help='JSON {"model ROI": "structure name"} overriding name matching')
    p.add_argument("--out", type=Path, help="dose output (.nrrd/.nii.gz/.mha, or .csv with --openkbp)")
    p.add_argument("--out-dicom", type=Path, help="folder for the predicted RTDOSE (with --dicom)")
    p.add_argument("--series-uid", help="CT series to use when the DICOM folder holds several")
    p.add_argument("--std-out", type=Path, help="also write the per-voxel standard deviation (needs --samples > 1)")
    p.add_argument("--model", type=model_argument, default=DEFAULT_MODEL,
                   help=f"registered model name or model card (.json); default {DEFAULT_MODEL}")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model card's validated setting)")
    p.add_argument("--samples", type=int, default=1, help="samples averaged (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, reported)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--batch-size", type=int, default=None, help="slices per network call (default: fits memory)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _check_outputs(args) -> None:
    if args.out is None and args.out_dicom is None:
        raise DoseDiffError("No output given.", "Add --out dose.nrrd (or --out-dicom DIR with --dicom).")
    if args.out_dicom is not None and args.dicom is None:
        raise DoseDiffError("--out-dicom needs a --dicom input (the RTDOSE refers to its CT).", "Use --out instead.")
    if args.out_dicom is not None and args.out_dicom.is_dir() and not args.overwrite \
            and any(p.name.startswith("RTDOSE") for p in args.out_dicom.iterdir()):
        raise DoseDiffError(f"{args.out_dicom} already holds an RTDOSE.", "Choose another folder or pass --overwrite.")
    for path in (args.out, args.std_out):
        if path is not None and path.exists() and not args.overwrite:
            raise DoseDiffError(f"Output {path} already exists.", "Choose another path or pass --overwrite.")


def cmd_predict(args) -> int:
    from . import openkbp
    from .modelcard import load_model
    from .predict import prepare_case, prepare_openkbp, predict_case
    from .rois import read_mapping
    from .runtime import choose_device
    from .volume import read_structures, read_volume, write_volume

    if args.openkbp and not (args.openkbp / "ct.csv").exists():
        return _predict_openkbp_cohort(args)
    _check_outputs(args)
    if args.std_out and args.samples < 2:
        raise DoseDiffError("--std-out needs at least two samples.", "Add --samples 4 (or more).")
    device = choose_device(args.device)
    model, cfg, card = load_model(args.model, device)
    if args.openkbp:
        patient = openkbp.read_patient(args.openkbp, with_dose=False)
        inputs = prepare_openkbp(patient, cfg)
    elif args.dicom:
        from .dicomrt import read_dicom

        case = read_dicom(args.dicom, args.series_uid)
        for w in case.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if not case.structures:
            raise DoseDiffError(f"{args.dicom} has no RTSTRUCT.", "Export the structure set with the CT.")
        mapping = read_mapping(args.mapping) if args.mapping else None
        inputs = prepare_case(case.ct, case.structures, cfg, mapping)
    else:
        if args.structures is None:
            raise DoseDiffError("--ct needs --structures.", "Give a .seg.nrrd or a folder of masks.")
        mapping = read_mapping(args.mapping) if args.mapping else None
        inputs = prepare_case(read_volume(args.ct), read_structures(args.structures), cfg, mapping)
    for w in inputs.warnings:
        print(f"warning: {w}", file=sys.stderr)
    bar, update = _progress_bar("Predicting dose")
    try:
        pred = predict_case(inputs, model, cfg, steps=args.steps, samples=args.samples, seed=args.seed,
                            device=device, batch_size=args.batch_size, with_std=args.std_out is not None,
                            progress=update)
    finally:
        bar.close()
    if args.out_dicom is not None:
        from .dicomrt import write_rtdose

        written = write_rtdose(pred.dose, case.ct_datasets, args.out_dicom, card["name"], case.plan_uid, args.overwrite)
        print(f"wrote {written}", file=sys.stderr)
    if args.out is not None and args.openkbp and args.out.suffix == ".csv":
        openkbp.write_dose_csv(pred.dose, args.out, args.overwrite)
    elif args.out is not None:
        write_volume(pred.dose, args.out, args.overwrite)
    if args.std_out and pred.std is not None:
        write_volume(pred.std, args.std_out, args.overwrite)
    info = {k: v for k, v in pred.info.items() if k != "warnings"}
    print(json.dumps({"output": str(args.out or args.out_dicom), "model": card["name"], **info}, indent=1))
    return 0


def _predict_openkbp_cohort(args) -> int:
    """Every pt_N under a split folder -> OUT/pt_N.csv; existing files are kept (resumable)."""
    import time

    import torch
    from tqdm import tqdm

    from . import openkbp
    from .modelcard import load_model
    from .predict import predict_case, prepare_openkbp
    from .runtime import choose_device

    if args.out is None:
        raise DoseDiffError("A split folder needs --out FOLDER for the pt_N.csv files.", "Add --out preds/.")
    folders = openkbp.patient_folders(args.openkbp)
    if not folders:
        raise DoseDiffError(f"{args.openkbp} holds no OpenKBP patients.", "Point to a pt_N folder or a split folder.")
    args.out.mkdir(parents=True, exist_ok=True)
    device = choose_device(args.device)
    model, cfg, _ = load_model(args.model, device)
    timings_path = args.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for folder in tqdm(folders, desc="Patients", unit="patient"):
        out = args.out / f"{folder.name}.csv"
        if out.exists() and not args.overwrite:
            continue
        t0 = time.perf_counter()
        inputs = prepare_openkbp(openkbp.read_patient(folder, with_dose=False), cfg)
        seed = args.seed if args.seed is not None else 0
        pred = predict_case(inputs, model, cfg, steps=args.steps, samples=args.samples, seed=seed,
                            device=device, batch_size=args.batch_size)
        openkbp.write_dose_csv(pred.dose, out, args.overwrite)
        timings[folder.name] = {"seconds": round(time.perf_counter() - t0, 2), "device": str(device),
                                "threads": torch.get_num_threads(), "steps": pred.info["steps"], "samples": args.samples,
                                "slices": pred.info["slices_predicted"]}
        timings_path.write_text(json.dumps(timings, indent=1))
    return 0


def cmd_evaluate(args) -> int:
    from tqdm import tqdm

    from .evaluate import evaluate_openkbp

    if args.dicom is not None:
        from .evaluate import evaluate_dicom
        from .rois import read_mapping

        if args.prediction is None:
            raise DoseDiffError("--dicom needs --prediction (a dose image or RTDOSE file).", "Add --prediction FILE.")
        mapping = read_mapping(args.mapping) if args.mapping else None
        overall = evaluate_dicom(args.dicom, args.prediction, args.out, args.series_uid, mapping,
                                 gamma=not args.no_gamma, overwrite=args.overwrite)
        print(json.dumps({k: v for k, v in overall.items() if k != "dvh_error_per_roi"}, indent=1))
        return 0
    if args.openkbp is None or args.predictions is None:
        raise DoseDiffError("evaluate needs --openkbp and --predictions, or --dicom and --prediction.",
                            "See dosediff evaluate --help.")
    bar = tqdm(desc="Evaluating", unit="patient")
    overall = evaluate_openkbp(args.openkbp, args.predictions, args.out, gamma=not args.no_gamma,
                               plots=not args.no_plots, overwrite=args.overwrite, progress=lambda _p: bar.update())
    bar.close()
    brief = {k: v for k, v in overall.items() if k != "dvh_error_per_roi"}
    print(json.dumps(brief, indent=1))
    if args.update_card:
        from .modelcard import update_card

        timing_file = args.predictions / "timings.json"
        timings = json.loads(timing_file.read_text()) if timing_file.exists() else {}
        measured = {"validation": {
            "data": f"OpenKBP {args.openkbp.name} ({overall['patients']} patients)", **brief,
            "dvh_error_per_roi": overall["dvh_error_per_roi"],
            "seconds_per_volume": _timing_summary(timings) if timings else None}}
        update_card(args.update_card, measured)
        print(f"updated {args.update_card}")
    return 0


def cmd_demo(args) -> int:
    """The main job on an embedded case: phantom (default) or one OpenKBP patient."""
    from . import openkbp
    from .evaluate import evaluate_patient, plan_summary
    from .modelcard import load_model
    from .phantom import head_and_neck
    from .plots import dose_overlay, dvh_comparison
    from .predict import predict_case, prepare_case, prepare_openkbp
    from .runtime import choose_device
    from .volume import write_segmentation, write_volume

    out = args.out
    targets = [out / n for n in ("dose.nrrd", "dvh.png", "dose_overlay.png")]
    clash = [t for t in targets if t.exists()]
    if clash and not args.overwrite:
        raise DoseDiffError(f"{clash[0]} already exists.", "Choose another --out folder or pass --overwrite.")
    out.mkdir(parents=True, exist_ok=True)
    device = choose_device(args.device)
    model, cfg, card = load_model(args.model, device)
    reference = None
    if args.openkbp:
        patient = openkbp.read_patient(args.openkbp)
        inputs = prepare_openkbp(patient, cfg)
        ct, masks, reference = patient.ct, patient.masks, patient.dose
        title = f"OpenKBP {patient.pid}"
    else:
        ct, masks = head_and_neck()
        write_volume(ct, out / "ct.nrrd", overwrite=True)
        write_segmentation(masks, out / "structures.seg.nrrd", overwrite=True)
        inputs = prepare_case(ct, masks, cfg)
        title = "synthetic head-and-neck phantom"
    for w in inputs.warnings:
        print(f"warning: {w}", file=sys.stderr)
    bar, update = _progress_bar("Predicting dose")
    try:
        pred = predict_case(inputs, model, cfg, steps=args.steps, samples=1, seed=args.seed, device=device,
                            progress=update)
    finally:
        bar.close()
    write_volume(pred.dose, out / "dose.nrrd", overwrite=args.overwrite)
    roi_masks = {k: v.array for k, v in masks.items() if k != "BODY"}
    ref_arr = reference.array if reference is not None else None
    dvh_comparison(ref_arr, pred.dose.array, roi_masks, out / "dvh.png", f"DVH, {title}")
    dose_overlay(ct.array, pred.dose.array, roi_masks, ct.spacing, out / "dose_overlay.png",
                 f"DoseDiff predicted dose, {title} (research and planning guidance only)")
    print(f"DoseDiff {card['name']} on the {title}: {pred.info['slices_predicted']} slices, "
          f"{pred.info['seconds_sampling']:.1f} s sampling ({pred.info['steps']} DDIM step{'s' if pred.info['steps'] != 1 else ''}) on {pred.info['device']} "
          f"(seed {pred.info['seed']})")
    print("Research and planning guidance only: not a treatment planning system dose calculation.")
    for line in plan_summary(pred.dose.array, roi_masks, ct.grid.voxel_volume_mm3()):
        print("  " + line)
    if reference is not None:
        e = evaluate_patient(patient.pid, reference.array, pred.dose.array, roi_masks,
                             patient.possible_dose.array, ct.spacing, gamma=False)
        print(f"  against the clinical plan: dose score {e.scores['dose_score']:.2f} Gy, "
              f"DVH score {e.scores['dvh_score']:.2f} Gy, MAE in body {e.scores['mae_body']:.2f} Gy")
        openkbp.write_dose_csv(pred.dose, out / f"{patient.pid}.csv", overwrite=True)
    print(f"wrote {', '.join(str(t) for t in targets)}")
    return 0


def _timing_summary(timings: dict) -> dict:
    """Mean and maximum seconds per volume, with the settings they were measured under."""
    rows = list(timings.values())
    secs = [r["seconds"] for r in rows]
    return {"mean": round(sum(secs) / len(secs), 1), "max": max(secs),
            "mean_slices_predicted": round(sum(r["slices"] for r in rows) / len(rows), 1),
            **{k: rows[0][k] for k in ("device", "threads", "steps", "samples")}}


def cmd_init_model(args) -> int:
    import torch

    from .config import ModelConfig
    from .mmfnet import MMFNet
    from .modelcard import save_model

    torch.manual_seed(args.seed)
    cfg = ModelConfig.preset(args.preset)
    model = MMFNet(cfg.net)
    save_model(model, cfg, args.out, {"training": {"status": "untrained: random initialisation"}},
               half=not args.fp32, overwrite=args.overwrite)
    print(f"wrote {args.out} and {args.out.with_suffix('.safetensors')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dosediff",
        description="DoseDiff dose prediction. For research and planning guidance only: not a treatment "
                    "planning system dose calculation.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    p = sub.add_parser("init-model", help="write a randomly initialised model and its card")
    p.add_argument("--preset", default="tiny", help="paper | small | tiny | test")
    p.add_argument("--out", type=Path, required=True, help="card path (.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("demo", help="the main job on an embedded phantom (or --openkbp pt_N) with the bundled model")
    p.add_argument("--out", type=Path, default=Path("dosediff-demo"))
    p.add_argument("--openkbp", type=Path, help="run on this OpenKBP patient instead, and score it")
    p.add_argument("--model", type=model_argument, default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model card's)")
    p.add_argument("--seed", type=int, default=0)
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
    p = sub.add_parser("prepare", help="cache OpenKBP patients for training")
    p.add_argument("--split", action="append", required=True, help="NAME=FOLDER of pt_N folders (repeatable)")
    p.add_argument("--cache", type=Path, required=True, help="cache folder")
    p = sub.add_parser("train", help="train on a prepared cache (resumes from RUN/checkpoint.pt)")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True, help="run folder: checkpoint, log, curves, best model")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="training setting, e.g. steps=20000")
    return parser


def cmd_prepare(args) -> int:
    from tqdm import tqdm

    from .config import ModelConfig
    from .prepare import prepare

    splits = {}
    for item in args.split:
        name, _, folder = item.partition("=")
        if not folder:
            raise DoseDiffError(f"--split {item!r} is not NAME=FOLDER.", "Write e.g. --split train=data/train-pats.")
        splits[name] = Path(folder)
    bar = tqdm(desc="Caching patients", unit="patient")
    prepare(splits, args.cache, ModelConfig(), progress=lambda _m: bar.update())
    bar.close()
    return 0


def cmd_train(args) -> int:
    import dataclasses

    import torch
    import torch.distributed as dist

    from .runtime import choose_device
    from .train import TrainConfig, train

    overrides = {}
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key not in fields:
            raise DoseDiffError(f"Unknown training setting {key!r}.", f"Known: {', '.join(fields)}.")
        default = getattr(TrainConfig(), key)
        overrides[key] = type(default)(value)
    tcfg = TrainConfig(**overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = choose_device(args.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
    try:
        card = train(args.cache, args.run, tcfg, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    print(f"best model: {card}")
    return 0


COMMANDS = {"predict": cmd_predict, "init-model": cmd_init_model, "prepare": cmd_prepare, "train": cmd_train,
            "evaluate": cmd_evaluate, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except DoseDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
