"""Core figures on this machine: PSDM time on a clinical grid, parameter counts, and
seconds per slice per DDIM step of each preset.

    python bench/bench_core.py [--presets paper small tiny] [--batch 4] [--skip-psdm]

Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import time

import torch

from DoseDiffLib.config import ModelConfig
from DoseDiffLib.mmfnet import MMFNet, count_parameters
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.psdm import psdm


def bench_psdm() -> None:
    ct, masks = head_and_neck(shape=(200, 512, 512), spacing=(0.98, 0.98, 3.0))
    names = list(masks)[:10]
    t0 = time.perf_counter()
    for n in names:
        psdm(masks[n])
    dt = time.perf_counter() - t0
    print(f"PSDM, 512 x 512 x 200 at 0.98 x 0.98 x 3 mm, {len(names)} ROIs: {dt:.1f} s "
          f"({dt / len(names):.2f} s per ROI)")
    ct128, masks128 = head_and_neck(shape=(128, 128, 128), spacing=(3.906, 3.906, 2.5))
    t0 = time.perf_counter()
    for n in list(masks128)[:10]:
        psdm(masks128[n])
    print(f"PSDM, 128^3 model grid, 10 ROIs: {time.perf_counter() - t0:.2f} s")


def bench_preset(name: str, batch: int, repeats: int) -> None:
    cfg = ModelConfig.preset(name).net
    model = MMFNet(cfg).eval().to(memory_format=torch.channels_last)  # as prediction runs it
    s = cfg.image_size
    x, ct = torch.randn(batch, 1, s, s), torch.randn(batch, cfg.ct_channels, s, s)
    cond = torch.randn(batch, cfg.cond_channels, s, s).to(memory_format=torch.channels_last)
    t = torch.full((batch,), 500)
    with torch.inference_mode():
        model(x, t, ct, cond)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x, t, ct, cond)
        dt = (time.perf_counter() - t0) / repeats / batch
    print(f"{name:6s} {count_parameters(model) / 1e6:8.2f} M parameters  {dt * 1000:8.1f} ms per slice-step "
          f"(batch {batch})  -> {dt * 8 * 128:6.1f} s per 128-slice volume at 8 steps")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["paper", "small", "tiny"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-psdm", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_psdm:
        bench_psdm()
    for name in args.presets:
        bench_preset(name, args.batch if name != "paper" else 1, args.repeats)


if __name__ == "__main__":
    main()
