"""Training on the prepared cache: the paper's recipe, resumable, single or multi-process.

AdamW, learning rate x0.1 at 70 % of the steps, gradient clipping at 1.0, an EMA of the
weights (what is validated and exported), bf16 autocast on CUDA, augmentation applied
to all channels at once, periodic validation by OpenKBP dose and DVH score on a fixed
validation subset, a checkpoint every few hundred steps, a JSON-lines log and a PNG of the
curves. Under torchrun every process trains on its own slices and DDP keeps the
weights in sync; only rank 0 validates and writes.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import POSSIBLE_DOSE, ModelConfig
from .diffusion import Diffusion
from .errors import DoseDiffError
from .metrics import dose_score, dvh_errors, dvh_metrics, dvh_score
from .mmfnet import MMFNet
from .modelcard import save_model
from .plots import save_figure
from .prepare import CACHE_ROIS, conditions_from_psdm


@dataclass
class TrainConfig:
    preset: str = "tiny"
    prediction: str = "epsilon"
    steps: int = 20000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-4
    decay_at: float = 0.7
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    aug_p: float = 0.8
    max_rotation_deg: float = 15.0
    zoom: float = 0.1
    shift: float = 0.1
    val_every: int = 1000
    val_patients: int = 4
    val_steps: int = 8
    checkpoint_every: int = 200
    seed: int = 0
    threads: int = 0
    loss: str = "mse"              # mse | l1 (l1: median, what OpenKBP's MAE-type score rewards)
    outside_weight: float = 1.0    # weight of pixels outside the possible-dose mask
    init: str = ""                 # model card whose weights start a new run (warm start)
    timestep_spacing: str = "leading"  # of the sampler the model ships with (and is validated by)
    last_step_fraction: float = 0.0    # slices trained at t = T-1, the one-step sampler's only step


class SliceCache:
    """Memory-mapped slices of one split of the cache."""

    def __init__(self, cache: Path, split: str) -> None:
        index = json.loads((cache / "index.json").read_text())
        if index["rois"] != list(CACHE_ROIS):
            raise ValueError("cache ROI list differs from this version")
        self.entries = index["splits"][split]
        self.arrays = [{k: np.load(cache / f"{e['pid']}_{k}.npy", mmap_mode="r") for k in ("ct", "psdm", "dose")}
                       for e in self.entries]
        self.items = np.array([(p, s) for p, e in enumerate(self.entries) for s in range(len(e["slices"]))])

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ct, ps, dose = [], [], []
        for p, s in self.items[idx]:
            a = self.arrays[p]
            ct.append(a["ct"][s])
            ps.append(a["psdm"][s])
            dose.append(a["dose"][s])
        f = lambda x: torch.from_numpy(np.stack(x).astype(np.float32))  # noqa: E731
        return f(ct)[:, None], f(ps), f(dose)[:, None]


def augment(ct: torch.Tensor, ps: torch.Tensor, dose: torch.Tensor, cfg: TrainConfig,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random in-plane flip/rotation/zoom/shift per slice, the same for every channel.

    A left-right flip also swaps the parotid channels, so 'left' stays anatomical; a
    zoom by s multiplies the PSDMs by s, since every distance in the image grows by s.
    """
    b = ct.shape[0]
    apply = torch.rand(b, generator=g) < cfg.aug_p
    flip = (torch.rand(b, generator=g) < 0.5) & apply
    ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(cfg.max_rotation_deg) * apply
    zoom = 1 + (torch.rand(b, generator=g) * 2 - 1) * cfg.zoom * apply
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * cfg.shift * 2 * apply[:, None]
    sx = torch.where(flip, -1.0, 1.0)
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.stack([torch.stack([cos * sx, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sx, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(ct.shape), align_corners=False)
    warp = lambda x, mode: F.grid_sample(x, grid, mode="bilinear", padding_mode=mode, align_corners=False)  # noqa: E731
    ct = warp(ct + 1, "zeros") - 1          # pads with air (-1)
    dose = warp(dose + 1, "zeros") - 1      # pads with 0 Gy (-1)
    ps = warp(ps, "border") * zoom[:, None, None, None]
    if flip.any():
        r, l = CACHE_ROIS.index("RightParotid"), CACHE_ROIS.index("LeftParotid")
        swapped = ps[flip].clone()
        swapped[:, [r, l]] = swapped[:, [l, r]]
        ps[flip] = swapped
    return ct, ps, dose


def _warm_start(model: MMFNet, ema: MMFNet, mcfg: ModelConfig, card: Path) -> None:
    """Start from a trained model of the same configuration (e.g. to fine-tune with another loss)."""
    from .modelcard import load_model

    trained, cfg, _ = load_model(card, "cpu")
    if cfg.weights_dict() != mcfg.weights_dict():
        raise ValueError(f"{card} has another model configuration than this run; warm start needs the same one")
    state = {k: v.float() for k, v in trained.state_dict().items()}
    model.load_state_dict(state)
    ema.load_state_dict(state)


# run logistics a resumed run may change; every other setting is the recipe and must match
RESUME_MAY_CHANGE = ("steps", "threads", "val_every", "checkpoint_every", "val_patients")


def _check_resume(saved: dict, tcfg: TrainConfig, mcfg: ModelConfig, ckpt: Path) -> None:
    """A checkpoint resumes only the run that wrote it: same model configuration, same recipe."""
    defaults = asdict(TrainConfig())
    old = saved.get("train_config", {})
    differ = [f"{k} {old.get(k, defaults[k])!r} -> {v!r}" for k, v in asdict(tcfg).items()
              if k not in RESUME_MAY_CHANGE and old.get(k, defaults[k]) != v]
    if ModelConfig.from_dict(json.loads(saved.get("model_config", "{}"))) != mcfg:
        differ.append("model configuration")
    if differ:
        raise DoseDiffError(f"{ckpt} was written by a run with other settings ({'; '.join(differ)}).",
                            "Resume with the same --set values, or start a new run folder.")


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def validate(model: torch.nn.Module, mcfg: ModelConfig, cache: SliceCache, n_patients: int, steps: int,
             device: torch.device, batch: int = 32) -> dict:
    """Dose and DVH score on the first n cached validation patients (active slices)."""
    diffusion = Diffusion(mcfg.diffusion)
    model.eval()
    scores, errs = [], []
    for p in range(min(n_patients, len(cache.entries))):
        a, e = cache.arrays[p], cache.entries[p]
        ct = torch.from_numpy(np.asarray(a["ct"], np.float32))[:, None]
        ps = torch.from_numpy(np.asarray(a["psdm"], np.float32))
        ref = mcfg.norm.gy(np.asarray(a["dose"], np.float32))
        pred = np.empty_like(ref)
        g = torch.Generator().manual_seed(p)
        for b0 in range(0, ct.shape[0], batch):
            c = ct[b0:b0 + batch].to(device)
            cond = conditions_from_psdm(ps[b0:b0 + batch], mcfg).to(device)
            x = diffusion.ddim_sample(lambda x, t: model(x, t, c, cond), (c.shape[0], 1) + c.shape[2:],
                                      steps=steps, generator=g, device=device)
            pred[b0:b0 + batch] = mcfg.norm.gy(x[:, 0].float().cpu().numpy())
        inside = (ps.numpy() > 0)
        pdm = inside[:, CACHE_ROIS.index("possible_dose_mask")]
        pred *= pdm
        masks = {r: inside[:, i] for i, r in enumerate(CACHE_ROIS)}
        vox = float(np.prod(e["spacing"]))
        scores.append(dose_score(ref, pred, pdm))
        errs.append(dvh_errors(dvh_metrics(ref, masks, vox), dvh_metrics(pred, masks, vox)))
    model.train()
    return {"dose_score": float(np.mean(scores)), "dvh_score": dvh_score(errs), "patients": len(scores)}


def plot_curves(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "dose_score" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    if tr:
        steps = np.array([r["step"] for r in tr])
        loss = np.array([r["loss"] for r in tr])
        k = max(1, len(loss) // 50)
        a1.plot(steps, loss, alpha=0.3, lw=0.5)
        a1.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), lw=1.5)
        a1.set_yscale("log")
    a1.set(xlabel="step", ylabel="training loss", title="Loss")
    if va:
        a2.plot([r["step"] for r in va], [r["dose_score"] for r in va], "o-", label="dose score")
        a2.plot([r["step"] for r in va], [r["dvh_score"] for r in va], "s-", label="DVH score")
        a2.legend()
    a2.set(xlabel="step", ylabel="Gy", title="Validation subset")
    fig.tight_layout()
    save_figure(fig, png, 100, overwrite=True)  # the one safe writer: never through a link


def train(cache: Path, run_dir: Path, tcfg: TrainConfig, device: torch.device,
          stop: Callable[[], bool] | None = None) -> Path:
    """Train (or resume from run_dir/checkpoint.pt); returns the best model card path."""
    rank, world = _dist_info()
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    base = ModelConfig.preset(tcfg.preset)
    mcfg = ModelConfig(net=base.net, conditions=base.conditions, norm=base.norm,
                       diffusion=type(base.diffusion)(prediction=tcfg.prediction, timestep_spacing=tcfg.timestep_spacing,
                                                      default_steps=tcfg.val_steps),
                       grid=base.grid)
    torch.manual_seed(tcfg.seed)
    # channels-last convolutions run twice as fast on CPU (oneDNN) and suit CUDA tensor cores
    model = MMFNet(mcfg.net).to(device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < tcfg.decay_at * tcfg.steps else 0.1)
    g = torch.Generator().manual_seed(tcfg.seed * 1000 + rank)
    state = {"step": 0, "best": float("inf"), "seconds": 0.0}
    ckpt = run_dir / "checkpoint.pt"
    if tcfg.init and not ckpt.exists():
        _warm_start(model, ema, mcfg, Path(tcfg.init))
    if ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        _check_resume(saved, tcfg, mcfg, ckpt)
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        g.set_state(saved["rng"][rank] if rank < len(saved["rng"]) else saved["rng"][0])
        state = saved["state"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    data = SliceCache(cache, "train")
    val = SliceCache(cache, "validation") if rank == 0 and tcfg.val_every else None
    diffusion = Diffusion(mcfg.diffusion)
    log_path = run_dir / "log.jsonl"
    best_card = run_dir / "best.json"
    t_start = time.time() - state["seconds"]
    model.train()

    def save_checkpoint() -> None:
        rngs = [g.get_state()]
        if world > 1:
            gathered = [torch.empty_like(rngs[0]) for _ in range(world)]
            dist.all_gather(gathered, rngs[0])
            rngs = gathered
            # a cheap proof that DDP keeps every replica identical
            total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).cpu()
            sums = [torch.zeros_like(total) for _ in range(world)]
            dist.all_gather(sums, total)
            if rank == 0:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps({"step": state["step"], "replica_param_sums": [float(x) for x in sums]}) + "\n")
        if rank != 0:
            return
        state["seconds"] = time.time() - t_start
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "rng": rngs, "state": state,
                    "train_config": asdict(tcfg), "model_config": json.dumps(mcfg.to_dict())}, tmp)
        os.replace(tmp, ckpt)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    while state["step"] < tcfg.steps:
        idx = torch.randint(0, len(data), (tcfg.batch_size,), generator=g).numpy()
        ct, ps, dose = data.batch(idx)
        ct, ps, dose = augment(ct, ps, dose, tcfg, g)
        ct, dose = ct.to(device), dose.to(device)
        cond = conditions_from_psdm(ps, mcfg).to(device, memory_format=torch.channels_last)
        inside = (ps[:, CACHE_ROIS.index(POSSIBLE_DOSE)] > 0)[:, None].to(device)
        weight = torch.where(inside, 1.0, tcfg.outside_weight)
        with autocast:
            loss = diffusion.loss(lambda x, t: net(x, t, ct, cond), dose, generator=g, kind=tcfg.loss, weight=weight,
                                  last_step_fraction=tcfg.last_step_fraction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        if not torch.isfinite(gnorm):  # gradients are all-reduced: every process stops here together
            raise DoseDiffError(f"Training diverged at step {state['step'] + 1}: loss {loss.item():.3g}, gradients "
                                f"not finite; {ckpt.name} keeps the last good checkpoint, no model was exported.",
                                f"Start a new run folder with a lower lr (now {tcfg.lr:g}), or check the cache.")
        opt.step()
        sched.step()
        with torch.no_grad():  # warm-up: early on the average must not be dominated by the initialisation
            decay = min(tcfg.ema_decay, (1 + state["step"]) / (10 + state["step"]))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)
        state["step"] += 1
        step = state["step"]
        if rank == 0 and (step % 20 == 0 or step == 1):
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"step": step, "loss": loss.item(), "grad_norm": gnorm.item(),
                                     "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t_start, 1),
                                     "slices_per_s": round(step * tcfg.batch_size * world / max(time.time() - t_start, 1e-6), 2)}) + "\n")
        done = step == tcfg.steps or (stop is not None and stop())
        if val is not None and (step % tcfg.val_every == 0 or done):
            v = validate(ema, mcfg, val, tcfg.val_patients, tcfg.val_steps, device)
            v.update(step=step, seconds=round(time.time() - t_start, 1))
            with open(log_path, "a") as fh:
                fh.write(json.dumps(v) + "\n")
            if v["dose_score"] < state["best"]:
                state["best"] = v["dose_score"]
                info = {"training": {"recipe": asdict(tcfg), "step": step,
                                     "wall_clock_s": round(time.time() - t_start),
                                     "selection": f"EMA weights, best dose score on {v['patients']} validation patients"},
                        "validation_subset": v}
                save_model(ema, mcfg, best_card, info, half=True, overwrite=True)
            plot_curves(log_path, run_dir / "curves.png")
        if done or step % tcfg.checkpoint_every == 0:
            save_checkpoint()
        if done:
            break
    return best_card
