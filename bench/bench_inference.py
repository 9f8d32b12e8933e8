"""Inference figures: seconds per volume, slice-steps per second, FLOPs, achieved FLOP/s
against a matmul peak measured in the same run, peak memory, scaling with slices, and a
clinical 512 x 512 x 200 grid.

    python bench/bench_inference.py [--model CARD] [--presets tiny small] [--clinical]

Prints figures; asserts nothing. On CUDA it also runs the paper preset at batch 64.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from DoseDiffLib.config import ModelConfig
from DoseDiffLib.mmfnet import MMFNet
from DoseDiffLib.modelcard import load_model
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.predict import predict_case, prepare_case
from DoseDiffLib.runtime import batch_size_for, choose_device


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    dtype = torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def flops_per_slice_step(model: MMFNet) -> float:
    cfg = model.cfg
    s = cfg.image_size
    x = torch.randn(1, 1, s, s)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.cpu()(x, torch.tensor([500]), torch.randn(1, 1, s, s), torch.randn(1, cfg.cond_channels, s, s))
    return float(counter.get_total_flops())


def network_rate(model: MMFNet, device: torch.device, batch: int, repeats: int = 3) -> float:
    """Slice-steps per second of the bare network at this batch size."""
    cfg = model.cfg
    s = cfg.image_size
    model.to(device, memory_format=torch.channels_last)  # as predict.sample_dose runs it
    cond = torch.randn(batch, cfg.cond_channels, s, s, device=device).to(memory_format=torch.channels_last)
    args = (torch.randn(batch, 1, s, s, device=device), torch.full((batch,), 500, device=device),
            torch.randn(batch, 1, s, s, device=device), cond)
    with torch.inference_mode():
        model(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - t0)


def phantom_volume(n_slices: int, shape_yx=(128, 128), spacing=(3.906, 3.906, 2.5)):
    return head_and_neck(shape=(n_slices,) + shape_yx, spacing=spacing)


def time_volume(model, cfg, device, n_slices: int, steps: int, shape_yx=(128, 128), spacing=(3.906, 3.906, 2.5)):
    ct, masks = phantom_volume(n_slices, shape_yx, spacing)
    t0 = time.perf_counter()
    inputs = prepare_case(ct, masks, cfg)
    pred = predict_case(inputs, model, cfg, steps=steps, seed=0, device=device)
    total = time.perf_counter() - t0
    return total, pred.info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model card; default: random weights of each preset")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clinical", action="store_true", help="also a 512 x 512 x 200 CT at 0.98 x 0.98 x 3 mm")
    args = ap.parse_args()
    device = choose_device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    peak = matmul_peak(device)
    print(f"fp32 matmul peak (2048^2): {peak / 1e9:.0f} GFLOP/s")
    runs = []
    if args.model:
        model, cfg, card = load_model(args.model, device)
        runs.append((card["name"], model, cfg))
    else:
        for name in args.presets:
            cfg = ModelConfig.preset(name)
            runs.append((name, MMFNet(cfg.net).eval(), cfg))
    if device.type == "cuda" and not args.model:
        cfg = ModelConfig.preset("paper")
        runs.append(("paper", MMFNet(cfg.net).eval(), cfg))
    for name, model, cfg in runs:
        flops = flops_per_slice_step(model)
        model.to(device)
        batch = batch_size_for(cfg.net, device)
        rate = network_rate(model, device, batch)
        print(f"\n[{name}] {flops / 1e9:.2f} GFLOP per slice-step; batch {batch}: {rate:.1f} slice-steps/s, "
              f"{rate * flops / 1e9:.0f} GFLOP/s = {100 * rate * flops / peak:.0f} % of the matmul peak")
        # the paper's 8 steps, and the model's validated default where that differs
        for steps in dict.fromkeys((8, cfg.diffusion.default_steps)):
            for n in (32, 64, 128):
                total, info = time_volume(model, cfg, device, n, steps)
                print(f"  {n:3d} slices ({info['slices_predicted']} with dose possible), {steps} steps: {total:6.1f} s "
                      f"(conditions {info['seconds_conditions']:.1f} s, sampling {info['seconds_sampling']:.1f} s), "
                      f"peak RSS {peak_rss_mb():.0f} MB")
            if args.clinical:
                total, info = time_volume(model, cfg, device, 200, steps, shape_yx=(512, 512), spacing=(0.98, 0.98, 3.0))
                print(f"  clinical 512 x 512 x 200, {steps} steps: {total:6.1f} s, peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
