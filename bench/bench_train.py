"""Training throughput at each precision, side by side in one run: the bare network's
forward, backward and AdamW step on random slices, and, given a prepared cache, whole
training steps (slice gathering, augmentation, channels, losses) of a real run.

    python bench/bench_train.py [--model dosediff-openkbp] [--cache cache/openkbp] [--steps 30]
                                [--set KEY=VALUE ...]

--set takes the `dosediff train --set` settings of the run to time (the bundled model's
recipe by default). Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from DoseDiffLib.modelcard import load_model
from DoseDiffLib.registry import resolve
from DoseDiffLib.runtime import choose_device, network_dtype, precision_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import cpu_flags  # noqa: E402


def network_step_rate(net: torch.nn.Module, device: torch.device, batch: int, bf16: bool, steps: int) -> float:
    """Slices per second through forward, L1 backward and an AdamW step of the bare network."""
    cfg = net.cfg
    s = cfg.image_size
    net.train().requires_grad_(True).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(batch, 1, s, s, generator=g), torch.full((batch,), 999),
            torch.randn(batch, cfg.ct_channels, s, s, generator=g),
            torch.randn(batch, cfg.cond_channels, s, s, generator=g).contiguous(memory_format=torch.channels_last)]
    args = [a.to(device) for a in args]
    target = torch.randn(batch, 1, s, s, generator=g).to(device)

    def one() -> None:
        with torch.autocast(device.type if bf16 else "cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(*args)
        loss = (out.float() - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def loop_rate(cache: Path, card: Path, settings: list[str], device: torch.device, precision: str,
              steps: int) -> tuple[float, float]:
    """(slices per second, mean loss) of whole training steps warm-started from `card`."""
    from DoseDiffLib.cli import _train_settings
    from DoseDiffLib.train import TrainLoop

    tcfg = _train_settings([f"init={card}", "val_every=0", *settings, f"precision={precision}"])
    tcfg = replace(tcfg, steps=steps + 1)
    with tempfile.TemporaryDirectory() as tmp:
        loop = TrainLoop(cache, Path(tmp) / "run", tcfg, device)
        loop.step()  # warm-up: first-touch of the memory-mapped cache, oneDNN kernel choice
        t0, losses = time.perf_counter(), []
        for _ in range(steps):
            loss, _ = loop.step()
            losses.append(float(loss.detach()))
        rate = tcfg.batch_size * steps / (time.perf_counter() - t0)
    return rate, sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dosediff-openkbp", help="model card or registered name")
    ap.add_argument("--cache", type=Path, help="a `dosediff prepare` cache: also time whole training steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="training settings of the timed run (default: the model's own recipe, aug_p 0.3)")
    args = ap.parse_args()
    device = choose_device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    print(cpu_flags())
    card = resolve(args.model)
    model, cfg, _ = load_model(card, device)
    precisions = [False] if device.type == "mps" else [False, True]
    rates = {bf16: network_step_rate(model, device, args.batch, bf16, args.steps) for bf16 in precisions}
    print(f"\nnetwork forward + backward + AdamW, batch {args.batch}, {cfg.net.ct_channels} + "
          f"{cfg.net.cond_channels} input channels:")
    for bf16, rate in rates.items():
        print(f"  {'bf16 autocast' if bf16 else 'fp32'}: {rate:.1f} slices/s ({rate / rates[False]:.2f} x fp32)")
    if args.cache:
        # the objective and inputs come with init (cli.INHERITED); augmentation is not inherited
        settings = args.set or ["aug_p=0.3"]
        print(f"\nwhole training steps ({' '.join(settings)}), {args.steps} steps of {args.batch} slices:")
        base = None
        for precision in ["fp32"] + (["bf16"] if device.type != "mps" else []):
            rate, loss = loop_rate(args.cache, card, settings + [f"batch_size={args.batch}"], device, precision,
                                   args.steps)
            base = base or rate
            print(f"  {precision}: {rate:.1f} slices/s ({rate / base:.2f} x fp32), mean loss {loss:.4f}")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"`--set precision=auto` trains in {precision_name(network_dtype(device))} here")


if __name__ == "__main__":
    main()
