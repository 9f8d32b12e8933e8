"""Equal-budget ablation: regression vs x0 diffusion vs epsilon diffusion.

Each arm trains the same network, inputs, data order and number of steps from scratch,
then is scored on the first validation patients of the cache with the sampler(s) that
suit it, through the same validation path training uses (prediction's own sampler).

    python bench/ablation.py --cache cache/ --out runs/ablation [--steps 300] [--patients 5]

Prints a Markdown table; asserts nothing. Re-running skips arms whose checkpoint is done.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from DoseDiffLib.mmfnet import MMFNet
from DoseDiffLib.train import SliceCache, TrainConfig, train, validate

# arm -> (training settings, samplers it is scored with)
ARMS = {
    "regression (x0 at t = T-1 only, L1)": (dict(prediction="x0", loss="l1", last_step_fraction=1.0),
                                           ("regression",)),
    "x0 diffusion (t uniform, L1)": (dict(prediction="x0", loss="l1", last_step_fraction=0.0),
                                     ("regression", "ddim")),
    "epsilon diffusion (t uniform, MSE; the paper's)": (dict(prediction="epsilon", loss="mse", last_step_fraction=0.0),
                                                        ("ddim",)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--patients", type=int, default=5)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    device = torch.device("cpu")
    common = dict(preset=args.preset, steps=args.steps, batch_size=16, lr=5e-4, val_every=0, checkpoint_every=100,
                  context=2, beams=True, outside_weight=0.1, threads=args.threads)
    val = SliceCache(args.cache, "validation")
    rows = []
    for i, (arm, (settings, samplers)) in enumerate(ARMS.items()):
        tcfg = TrainConfig.from_settings(**common, **settings)
        run = args.out / f"arm{i}"
        t0 = time.perf_counter()
        train(args.cache, run, tcfg, device)
        seconds = torch.load(run / "checkpoint.pt", weights_only=True)["state"]["seconds"]
        mcfg = tcfg.model
        ema = MMFNet(mcfg.net)
        ema.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["ema"])
        for name in samplers:
            # one sample, no mirror: the samplers' own steps and spacing on an equal footing
            cfg = replace(mcfg, diffusion=replace(mcfg.diffusion, sampler=name))
            t1 = time.perf_counter()
            v = validate(copy.deepcopy(ema).eval(), cfg, val, args.patients, device, single=True)
            per_patient = (time.perf_counter() - t1) / v["patients"]
            rows.append((arm, name, v["dose_score"], v["dvh_score"], seconds, per_patient))
            print(f"{arm} / {name}: dose {v['dose_score']:.2f} Gy, DVH {v['dvh_score']:.2f} Gy "
                  f"({seconds:.0f} s training, {time.perf_counter() - t0:.0f} s with scoring)", flush=True)
    print(f"\n{args.steps} steps x 16 slices each, {args.preset} preset, {args.patients} validation patients, "
          "one sample, no mirroring\n")
    print("| arm | sampler | dose score (Gy) | DVH score (Gy) | training (s) | scoring (s/patient) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arm, name, d, h, s, p in rows:
        print(f"| {arm} | {name} | {d:.2f} | {h:.2f} | {s:.0f} | {p:.1f} |")


if __name__ == "__main__":
    main()
