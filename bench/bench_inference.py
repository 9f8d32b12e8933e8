"""Inference figures: seconds per volume, slice-steps per second, FLOPs, achieved FLOP/s
against a matmul peak measured in the same run, peak memory, scaling with slices, and a
clinical 512 x 512 x 200 grid.

    python bench/bench_inference.py [--model CARD] [--presets tiny small] [--clinical] [--openkbp PT_FOLDER]

With --openkbp it also times the whole `dosediff predict` process (imports, model load,
CSV reading, prediction, writing) on that patient for each sampler, in fp32 and at
--precision auto (bf16 where the CPU has it natively), side by side in one run.

Prints figures; asserts nothing. On CUDA it also runs the paper preset at batch 64.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from DoseDiffLib.config import ModelConfig
from DoseDiffLib.mmfnet import MMFNet, TwoStage
from DoseDiffLib.modelcard import load_model
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.job import Case, Sampling, run_prediction
from DoseDiffLib.runtime import batch_size_for, choose_device, native_bf16_cpu, network_dtype, precision_name


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
        model.cpu()(x, torch.tensor([500]), torch.randn(1, cfg.ct_channels, s, s), torch.randn(1, cfg.cond_channels, s, s))
    return float(counter.get_total_flops())


def cpu_flags() -> str:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    shown = [k for k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16") if caps.get(k)]
    return f"CPU {caps.get('cpu_name', '?')}: {', '.join(shown) or 'no AVX2'}; native bf16: {native_bf16_cpu()}"


def network_rate(model: MMFNet, device: torch.device, batch: int, repeats: int = 3,
                 dtype: torch.dtype = torch.float32) -> float:
    """Slice-steps per second of the bare network at this batch size, autocast to `dtype`."""
    cfg = model.cfg
    s = cfg.image_size
    model.to(device, memory_format=torch.channels_last)  # as predict.sample_dose runs it
    cond = torch.randn(batch, cfg.cond_channels, s, s, device=device).to(memory_format=torch.channels_last)
    args = (torch.randn(batch, 1, s, s, device=device), torch.full((batch,), 500, device=device),
            torch.randn(batch, cfg.ct_channels, s, s, device=device), cond)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), amp:
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


# the sampler of the speed bars: the default read-out (with the card's mirror averaging and z
# smoothing, as the bundled model sets them), and the authors' 8 steps with one unmirrored sample
SAMPLERS = {"regression as the card sets it": ["--sampler", "regression"],
            "ddim, 8 steps, 1 sample": ["--sampler", "ddim", "--samples", "1", "--no-flip"],
            "ddim as shipped (4 samples, mirrored)": ["--sampler", "ddim"]}


def sampler_kwargs(argv: list[str]) -> dict:
    kw = {"sampler": argv[1]}
    if "--samples" in argv:
        kw["samples"] = int(argv[argv.index("--samples") + 1])
    if "--no-flip" in argv:
        kw["flip"] = False
    return kw


def time_volume(model, cfg, device, n_slices: int, sampler: dict, shape_yx=(128, 128), spacing=(3.906, 3.906, 2.5)):
    ct, masks = phantom_volume(n_slices, shape_yx, spacing)
    t0 = time.perf_counter()
    pred, _ = run_prediction(Case(ct, masks), (model, cfg, {}), sampling=Sampling(**sampler, seed=0, device=device))
    total = time.perf_counter() - t0
    return total, pred.info


def time_process(card: str, patient: Path, device: str, argv: list[str]) -> float:
    """Wall time of a whole `dosediff predict` process, as a user runs it."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "DoseDiffLib.cli", "predict", "--openkbp", str(patient), "--out",
               str(Path(d) / "dose.csv"), "--model", card, "--seed", "0", "--device", device] + argv
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model card; default: random weights of each preset")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clinical", action="store_true", help="also a 512 x 512 x 200 CT at 0.98 x 0.98 x 3 mm")
    ap.add_argument("--openkbp", type=Path, help="an OpenKBP patient folder: time whole predict processes")
    ap.add_argument("--slices", nargs="+", type=int, default=[32, 64, 128])
    args = ap.parse_args()
    device = choose_device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    print(cpu_flags())
    auto = precision_name(network_dtype(device))
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
        batch = batch_size_for(cfg.net, device)
        if isinstance(model, MMFNet):
            nets = [(name, model)]
        elif isinstance(model, TwoStage):
            nets = [(f"{name}: stage 1", model.stage1), (f"{name}: refiner", model.net)]
        else:
            nets = [(f"{name}: network {i + 1}", net) for i, net in enumerate([model.net, *model.partners])]
        for label, net in nets:  # a refiner pair or an ensemble runs every network on every slice
            flops = flops_per_slice_step(net)
            net.to(device)
            rate = network_rate(net, device, batch)
            print(f"\n[{label}] {flops / 1e9:.2f} GFLOP per slice-step; batch {batch}: {rate:.1f} slice-steps/s, "
                  f"{rate * flops / 1e9:.0f} GFLOP/s = {100 * rate * flops / peak:.0f} % of the fp32 matmul peak")
            if device.type != "mps":
                bf_batch = batch_size_for(cfg.net, device, dtype=torch.bfloat16)
                for b in sorted({batch, bf_batch}):
                    bf = network_rate(net, device, b, dtype=torch.bfloat16)
                    print(f"  bf16 autocast, batch {b}: {bf:.1f} slice-steps/s, {bf / rate:.2f} x fp32 at batch {batch}")
        model.to(device)
        for label, argv in SAMPLERS.items():
            for n in args.slices:
                total, info = time_volume(model, cfg, device, n, sampler_kwargs(argv))
                print(f"  {n:3d} slices ({info['slices_predicted']} with dose possible), {label}, "
                      f"{info['precision']}: {total:6.1f} s "
                      f"(conditions {info['seconds_conditions']:.1f} s, sampling {info['seconds_sampling']:.1f} s), "
                      f"peak RSS {peak_rss_mb():.0f} MB")
            if args.clinical:
                total, info = time_volume(model, cfg, device, 200, sampler_kwargs(argv), shape_yx=(512, 512),
                                          spacing=(0.98, 0.98, 3.0))
                print(f"  clinical 512 x 512 x 200, {label}: {total:6.1f} s, peak RSS {peak_rss_mb():.0f} MB")
    if args.openkbp and args.model:
        print(f"\nwhole `dosediff predict` process on {args.openkbp.name} (imports, model, CSV in and out):")
        for label, argv in SAMPLERS.items():
            fp32 = time_process(args.model, args.openkbp, args.device, argv + ["--precision", "fp32"])
            line = f"  {label}: fp32 {fp32:.1f} s"
            if auto != "fp32":
                fast = time_process(args.model, args.openkbp, args.device, argv + ["--precision", "auto"])
                line += f"; auto ({auto}) {fast:.1f} s, {fp32 / fast:.2f} x faster"
            print(line)


if __name__ == "__main__":
    main()
