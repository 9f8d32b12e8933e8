"""Training on the prepared cache: the paper's recipe, resumable, single or multi-process.

AdamW, learning rate x0.1 at 70 % of the steps, gradient clipping at 1.0, an EMA of the
weights or, if asked, their uniform average over the run (SWA; what is validated and
exported), bf16 autocast on CUDA and on CPUs with native bf16, augmentation applied to all
channels at once, periodic validation by OpenKBP dose and DVH score on a fixed validation
subset, a checkpoint every few hundred steps, a JSON-lines log and a PNG of the curves. Under
torchrun every process trains on its own slices and DDP keeps the weights in sync; only rank 0
validates and writes.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .conditions import LR_PAIRS, SliceStack, assemble, beam_directions, gather
from .config import OARS, POSSIBLE_DOSE, PRESETS, TARGETS, ConditionConfig, ModelConfig
from .diffusion import Diffusion
from .errors import DoseDiffError
from .losses import dvh_metric_l1, gradient_l1, sorted_dose_l1
from .evaluate import evaluate_patient
from .metrics import dvh_score
from .mmfnet import Ensemble, MMFNet, TwoStage
from .modelcard import read_card, save_model
from .normalisation import plan_factors, primary_target, target_means, training_level
from .plots import save_figure
from .predict import dose_rows, resolve_sampler, sample_dose, stage1_dose
from .prepare import CACHE_ROIS, describe_cache
from .runtime import network_dtype


# The model settings a run may name (--set preset=small, context=2, ...): shorthands for
# the ModelConfig it trains, also the flat keys of every recipe a card or checkpoint keeps.
MODEL_SETTINGS: dict[str, object] = {"preset": "tiny", "prediction": "epsilon", "sampler": "ddim", "context": 0,
                                     "beams": False, "beam_mu": 0.0, "beam_oars": False,
                                     "middle_blocks": 0, "flip": False, "z_smoothing_mm": 0.0, "mirror_flag": False}


def model_from_settings(preset: str = "tiny", prediction: str = "epsilon", sampler: str = "ddim",
                        context: int = 0, beams: bool = False, beam_mu: float = 0.0,
                        beam_oars: bool = False, middle_blocks: int = 0, flip: bool = False,
                        z_smoothing_mm: float = 0.0, mirror_flag: bool = False) -> ModelConfig:
    """The one place the shorthands become a model configuration (every other setting of it,
    such as an added condition channel, is given as a ModelConfig)."""
    base = ModelConfig.preset(preset)
    base = replace(base, net=replace(base.net, middle_blocks=int(middle_blocks)))
    targets = tuple(n for n, _ in base.conditions.ptv_weights) if beams else ()
    if beam_mu and not beams:
        raise DoseDiffError(f"beam_mu={beam_mu} fades the beam-line channels, but there are none.",
                            "Add --set beams=True.")
    if beam_oars and not beams:
        raise DoseDiffError("beam_oars=True counts beam lines through the targets, but there are none.",
                            "Add --set beams=True.")
    cfg = base.with_conditions(ConditionConfig(context=context, beam_targets=targets, beam_mu_per_mm=float(beam_mu),
                                               beam_oars=OARS if beam_oars else (), mirror_flag=bool(mirror_flag)))
    return replace(cfg, diffusion=replace(cfg.diffusion, prediction=prediction, sampler=sampler, flip=bool(flip),
                                          z_smoothing_mm=float(z_smoothing_mm)))


def model_settings(cfg: ModelConfig) -> dict[str, object]:
    """The shorthands' view of a model configuration ("custom" for a network of no preset)."""
    preset = next((name for name, net in PRESETS.items()
                   if replace(net, cond_channels=cfg.net.cond_channels, ct_channels=cfg.net.ct_channels,
                              middle_blocks=cfg.net.middle_blocks) == cfg.net),
                  "custom")
    return {"preset": preset, "prediction": cfg.diffusion.prediction, "sampler": cfg.diffusion.sampler,
            "context": cfg.conditions.context, "beams": bool(cfg.conditions.beam_targets),
            "beam_mu": cfg.conditions.beam_mu_per_mm, "beam_oars": bool(cfg.conditions.beam_oars),
            "middle_blocks": cfg.net.middle_blocks, "flip": cfg.diffusion.flip,
            "z_smoothing_mm": cfg.diffusion.z_smoothing_mm, "mirror_flag": cfg.conditions.mirror_flag}


@dataclass
class TrainConfig:
    """A training run: the model it trains and the recipe it trains it by."""

    model: ModelConfig = field(default_factory=model_from_settings)
    steps: int = 20000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-4
    decay_at: float = 0.7
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    aug_p: float = 0.8
    independent_flip: bool = False  # each slice mirrored with p = 1/2, augmented otherwise or not (else: aug_p / 2)
    max_rotation_deg: float = 15.0
    rotation_step_deg: float = 0.0  # > 0: augmented slices also turn by a random multiple of this (40: OpenKBP's beams)
    zoom: float = 0.1
    shift: float = 0.1
    val_every: int = 1000
    val_patients: int = 4
    checkpoint_every: int = 200
    seed: int = 0
    threads: int = 0
    precision: str = "auto"        # auto | fp32 | bf16: the network's autocast dtype (runtime.network_dtype)
    loss: str = "mse"              # mse | l1 (l1: median, what OpenKBP's MAE-type score rewards)
    outside_weight: float = 1.0    # weight of pixels outside the possible-dose mask
    init: str = ""                 # model card whose weights start a new run (warm start)
    last_step_fraction: float = 0.0    # slices trained at t = T-1, the one-step sampler's only step
    dvh_weight: float = 0.0        # weight of the per-ROI sorted-dose L1 on the x0 estimate
    gradient_weight: float = 0.0   # weight of the L1 between in-plane dose gradients (losses.gradient_l1) on x0
    patient_every: int = 0         # > 0: every this many steps, one step on a whole training patient (patient_step)
    patient_dvh_weight: float = 1.0    # that step's weight of the DVH score's own cells (losses.dvh_metric_l1)
    max_seconds: float = 0.0       # stop (validated, checkpointed) after this much training time; 0 = no limit
    stage1: str = ""               # model card: train a refiner that reads its dose (predict-and-refine)
    stage1_jitter: float = 0.0     # refiner: mean SD of the smooth log-scale field its stage-1 dose is multiplied by
    swa_every: int = 0             # > 0: every this many steps from swa_start the weights join a uniform average
    swa_start: int = 0             # (stochastic weight averaging), validated and exported instead of the EMA
    normalise: bool = False        # the card normalises predictions to its training plans' level (normalisation.py)
    normalise_targets: bool = False    # and each training plan is scaled to that level before the losses see it

    @classmethod
    def from_settings(cls, **settings: object) -> "TrainConfig":
        """A run from flat settings: --set values, or a recipe a card or checkpoint kept."""
        shorthands = {k: settings.pop(k) for k in list(settings) if k in MODEL_SETTINGS}
        model = model_from_settings(**shorthands)
        if settings.get("stage1"):
            from .modelcard import card_config

            first = card_config(read_card(settings["stage1"]))
            if first.stage1 is not None or first.partners or (first.norm, first.grid) != (model.norm, model.grid):
                raise DoseDiffError(f"{settings['stage1']} cannot be a first stage: it is itself a refiner or an "
                                    "ensemble, or it scales dose or places its grid otherwise than this run's model.",
                                    "Give a single model's card with the same dose scale and grid.")
            model = model.with_stage1(first)
        if settings.get("patient_every") and model.diffusion.prediction == "epsilon":
            raise DoseDiffError("patient_every trains the one-step read-out at t = T-1, where an epsilon-predicting "
                                "network's dose estimate divides by almost zero.",
                                "Use it with --set prediction=x0 (or v), or drop patient_every.")
        step = float(settings.get("rotation_step_deg") or 0)
        if step and abs(360 / step - round(360 / step)) > 1e-6:
            raise DoseDiffError(f"rotation_step_deg {step:g} does not divide 360 degrees, so its turns would favour "
                                "some directions.", "Use a divisor of 360 (40 maps the 9 OpenKBP beams onto "
                                "themselves), or 0 for none.")
        if settings.get("normalise_targets") and not settings.get("normalise"):
            raise DoseDiffError("normalise_targets scales the training plans to the level that normalise reads "
                                "predictions out at, and this run does not normalise.",
                                "Add --set normalise=True, or drop normalise_targets.")
        if settings.get("stage1_jitter") and not settings.get("stage1"):
            raise DoseDiffError("stage1_jitter perturbs a first stage's dose, and this run has no first stage.",
                                "Add --set stage1=CARD, or drop stage1_jitter.")
        return cls(model=model, **settings)

    def recipe(self) -> dict[str, object]:
        """The flat settings (model shorthands first), as cards and checkpoints keep them."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return {**model_settings(self.model), **own}


class SliceCache:
    """Memory-mapped slices of one split of the cache (and a first stage's dose on them, for a refiner)."""

    def __init__(self, cache: Path, split: str, stage1: Path | None = None) -> None:
        index = json.loads((cache / "index.json").read_text())
        if index["rois"] != list(CACHE_ROIS):
            raise ValueError("cache ROI list differs from this version")
        self.entries = index["splits"][split]
        self.arrays = [{k: np.load(cache / f"{e['pid']}_{k}.npy", mmap_mode="r") for k in ("ct", "psdm", "dose")}
                       for e in self.entries]
        self.items = np.array([(p, s) for p, e in enumerate(self.entries) for s in range(len(e["slices"]))])
        self.stage1 = [np.load(stage1 / f"{e['pid']}.npy", mmap_mode="r") if stage1 else None for e in self.entries]

    def __len__(self) -> int:
        return len(self.items)

    def stack(self, p: int) -> SliceStack:
        a, e = self.arrays[p], self.entries[p]
        return SliceStack(np.asarray(e["slices"]), a["ct"], a["psdm"], self.stage1[p])

    def batch(self, idx: np.ndarray, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
        """(ct with context, PSDMs, target PSDMs on context slices, dose) for these items."""
        parts = [gather(self.arrays[p]["ct"], self.arrays[p]["psdm"], np.array([s]), cfg, self.stage1[p])
                 + (torch.from_numpy(np.asarray(self.arrays[p]["dose"][s:s + 1], np.float32))[:, None],)
                 for p, s in self.items[idx]]
        return tuple(torch.cat(x) for x in zip(*parts))


def primary_target_doses(cache: SliceCache, cfg: ModelConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(clinical dose in Gy, primary-target mask) of each cached patient, for normalisation.target_means."""
    i = CACHE_ROIS.index(primary_target(cfg))
    for a in cache.arrays:
        yield cfg.norm.gy(np.asarray(a["dose"], np.float32)), np.asarray(a["psdm"][:, i]) > 0


def augment(ct: torch.Tensor, ps: torch.Tensor, dose: torch.Tensor, cfg: TrainConfig, g: torch.Generator,
            ps_ctx: torch.Tensor | None = None,
            beams: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """One random in-plane flip/rotation/zoom/shift per slice, the same for every channel.

    A left-right flip also swaps the parotid channels, so 'left' stays anatomical; a
    zoom by s multiplies the PSDMs by s, since every distance in the image grows by s.
    The beams (B, A, 2) turn with the patient: returned in the augmented image's frame,
    with which slices were mirrored (B,) for a mirror-flag channel.
    A turn by a multiple of rotation_step_deg = 40 maps the 9 equispaced OpenKBP beams onto
    themselves, so the turned slice is a plan of the same beam set (C3D's augmentation).
    """
    b = ct.shape[0]
    apply = torch.rand(b, generator=g) < cfg.aug_p
    flip = torch.rand(b, generator=g) < 0.5   # the same draws either way, so earlier recipes repeat exactly
    flip = flip if cfg.independent_flip else flip & apply
    ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(cfg.max_rotation_deg) * apply
    if cfg.rotation_step_deg:   # drawn only when set, so earlier recipes draw the same augmentations
        turns = torch.randint(0, round(360 / cfg.rotation_step_deg), (b,), generator=g)
        ang = ang + turns * math.radians(cfg.rotation_step_deg) * apply
    zoom = 1 + (torch.rand(b, generator=g) * 2 - 1) * cfg.zoom * apply
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * cfg.shift * 2 * apply[:, None]
    sx = torch.where(flip, -1.0, 1.0)
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.stack([torch.stack([cos * sx, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sx, cos, shift[:, 1]], 1)], 1)
    theta, zoom, flip = theta.to(ct.device), zoom.to(ct.device), flip.to(ct.device)
    grid = F.affine_grid(theta, list(ct.shape), align_corners=False)
    warp = lambda x, mode: F.grid_sample(x, grid, mode="bilinear", padding_mode=mode, align_corners=False)  # noqa: E731
    ct = warp(ct + 1, "zeros") - 1          # pads with air (-1)
    dose = warp(dose + 1, "zeros") - 1      # pads with 0 Gy (-1)
    ps = warp(ps, "border") * zoom[:, None, None, None]
    if flip.any():
        swapped = ps[flip].clone()
        for right, left in LR_PAIRS:
            r, l = CACHE_ROIS.index(right), CACHE_ROIS.index(left)
            swapped[:, [r, l]] = swapped[:, [l, r]]
        ps[flip] = swapped
    if ps_ctx is None:
        return ct, ps, dose
    shape = ps_ctx.shape
    ps_ctx = warp(ps_ctx.reshape(b, -1, *shape[-2:]), "border").reshape(shape) if shape[1] else ps_ctx
    # the image at output x shows the patient at theta x, so a beam direction d of the
    # patient appears along theta^-1 d in the augmented image
    inv = torch.linalg.inv(theta[:, :, :2])
    beams = torch.einsum("bij,baj->bai", inv, beams.to(inv.device))
    beams = beams / beams.norm(dim=-1, keepdim=True)
    return ct, ps, dose, ps_ctx, beams, flip


def jitter_stage1(ct: torch.Tensor, first: int, amount: float, g: torch.Generator) -> torch.Tensor:
    """Multiply the stage-1 dose channels (from `first` on) by a smooth random field per slice.

    A refiner trains on its first stage's doses of the training patients, which fit better
    than that stage's doses of unseen patients will; scaled by exp(field), a field drawn
    on a 4 x 4 grid (SD uniform in [0, 2 amount] per slice) and spread bicubically over the
    slice, the dose looks wrong the way an unseen patient's does (smoothly, by some per cent),
    and the refiner learns to check it against the CT and the structures. Every context
    slice of a sample gets the same field; 0 Gy stays 0 Gy.
    """
    if amount <= 0:
        return ct
    b, _, h, w = ct.shape
    sd = torch.rand(b, 1, 1, 1, generator=g) * 2 * amount
    field = F.interpolate(torch.randn(b, 1, 4, 4, generator=g) * sd, size=(h, w), mode="bicubic",
                          align_corners=False).to(ct.device, ct.dtype)
    return torch.cat([ct[:, :first], (ct[:, first:] + 1) * torch.exp(field) - 1], 1)


def portable_recipe(tcfg: TrainConfig) -> dict:
    """The recipe as a card keeps it: the warm start and the first stage named by their card's
    name and weights' checksum, not by a path of the machine that trained it."""
    recipe = tcfg.recipe()
    for key in ("init", "stage1"):
        if recipe[key]:
            card = read_card(recipe[key])
            recipe[key] = {"name": card.get("name", Path(recipe[key]).stem), "weights_sha256": card["weights"]["sha256"]}
    return recipe


def stage1_cache(cache: Path, folder: Path, model: MMFNet, cfg: ModelConfig, device: torch.device) -> Path:
    """A first stage's dose on every cached slice (network units, fp16), computed once per run:
    a refiner trains on what prediction will give it. Finished patients are kept on resume."""
    from tqdm import tqdm

    folder.mkdir(exist_ok=True)
    todo = [(data, p) for data in (SliceCache(cache, "train"), SliceCache(cache, "validation"))
            for p, e in enumerate(data.entries) if not (folder / f"{e['pid']}.npy").exists()]
    for data, p in tqdm(todo, desc="Stage-1 dose", unit="patient", disable=not todo):
        stack, pid = data.stack(p), data.entries[p]["pid"]
        dose = stage1_dose(model, cfg, stack, np.arange(len(stack.slices)), (), 0, device, None, None)
        tmp = folder / f"{pid}.{os.getpid()}.tmp.npy"   # processes of one run may race to the same patient
        np.save(tmp, dose.astype(np.float16))
        os.replace(tmp, folder / f"{pid}.npy")
    return folder


INPUT_CONVS = ("enc_ct.0.0", "enc_cond.0.0")  # the first convolution of the CT and condition encoders


def _warm_start(model: MMFNet, ema: MMFNet, mcfg: ModelConfig, card: Path) -> None:
    """Start from a trained model: the same configuration, or the same one grown.

    It may grow by appended input channels, which get zero weights in the first
    convolution, and by residual blocks after the bottleneck (`middle_blocks`), whose last
    convolution starts at zero, so each adds nothing: the network computes exactly what the
    trained one did until training gives the new parts a use; the CPU hours already spent
    are kept.
    """
    from .modelcard import load_model

    trained, cfg, _ = load_model(card, "cpu")
    if isinstance(trained, TwoStage):  # continue a refiner: only its second network trains
        if cfg.stage1 != mcfg.stage1:
            raise ValueError(f"{card} refines another first stage than this run's")
        trained = trained.net
    if isinstance(trained, Ensemble):  # an ensemble's card keeps its first network's training record
        trained, cfg = trained.net, cfg.alone()
    old, new = cfg.weights_dict(), mcfg.weights_dict()
    for d in (old, new):
        d.pop("conditions")
        d.pop("stage1", None)
        d["net"].pop("ct_channels")
        d["net"].pop("cond_channels")
        d["net"].pop("middle_blocks")
    oc, nc = cfg.conditions, mcfg.conditions
    same_prefix = (nc.channel_names()[:oc.n_channels] == oc.channel_names()
                   and nc.ct_channel_names()[:len(oc.ct_channel_names())] == oc.ct_channel_names()
                   and (oc.ptv_weights, oc.masks, oc.psdms) == (nc.ptv_weights, nc.masks, nc.psdms))
    if old != new or not same_prefix or cfg.net.middle_blocks > mcfg.net.middle_blocks:
        raise ValueError(f"{card} has another model configuration than this run; warm start needs the same one "
                         "or the same one with input channels or middle blocks appended")
    target = model.state_dict()
    # the configurations agree but for the added middle blocks: only theirs keep this network's start
    state = {**target, **{k: v.float() for k, v in trained.state_dict().items()}}
    for name in INPUT_CONVS:
        w = state[f"{name}.weight"]
        grown = torch.zeros_like(target[f"{name}.weight"])
        grown[:, :w.shape[1]] = w
        state[f"{name}.weight"] = grown
    model.load_state_dict(state)
    ema.load_state_dict(state)


# run logistics a resumed run may change; every other setting is the recipe and must match
RESUME_MAY_CHANGE = ("steps", "threads", "val_every", "checkpoint_every", "val_patients", "max_seconds", "precision")


def _check_resume(saved: dict, tcfg: TrainConfig, ckpt: Path) -> None:
    """A checkpoint resumes only the run that wrote it: same model configuration, same recipe."""
    defaults = TrainConfig().recipe()
    old = saved.get("train_config", {})
    differ = [f"{k} {old.get(k, defaults[k])!r} -> {v!r}" for k, v in tcfg.recipe().items()
              if k not in RESUME_MAY_CHANGE and old.get(k, defaults[k]) != v]
    if ModelConfig.from_dict(json.loads(saved.get("model_config", "{}"))) != tcfg.model:
        differ.append("model configuration")
    if differ:
        raise DoseDiffError(f"{ckpt} was written by a run with other settings ({'; '.join(differ)}).",
                            "Resume with the same --set values, or start a new run folder.")


@torch.no_grad()
def validate(model: torch.nn.Module, mcfg: ModelConfig, cache: SliceCache, n_patients: int,
             device: torch.device, seed: int = 0, single: bool = False) -> dict:
    """Dose and DVH score on the first n cached validation patients: prediction's own sampler,
    scored by evaluate_patient as `dosediff evaluate` scores (so the curve is the product's score).

    `single`: one sample of the model's sampler, unmirrored (cheaper, for comparisons).
    """
    _, sampler = resolve_sampler(mcfg, samples=1 if single else None, flip=False if single else None)
    model.eval()
    evals = []
    for p in range(min(n_patients, len(cache.entries))):
        stack, e = cache.stack(p), cache.entries[p]
        inside = np.asarray(stack.psdm, np.float32) > 0
        ref = mcfg.norm.gy(np.asarray(cache.arrays[p]["dose"], np.float32))
        rows = dose_rows(stack, mcfg, e["spacing"][2])
        x = np.full(ref.shape, -1.0, np.float32)
        x[rows] = sample_dose(model, mcfg, stack, rows, sampler, seed=seed, device=device).mean(0)
        pdm = inside[:, CACHE_ROIS.index(POSSIBLE_DOSE)]
        masks = {r: inside[:, i] for i, r in enumerate(CACHE_ROIS)}
        evals.append(evaluate_patient(e["pid"], ref, mcfg.norm.gy(x) * pdm, masks, pdm, tuple(e["spacing"]),
                                      gamma=False))
    model.train()
    return {"dose_score": float(np.mean([ev.scores["dose_score"] for ev in evals])),
            "dvh_score": dvh_score([ev.dvh_errors for ev in evals]), "patients": len(evals)}


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


def _training_data(cache: Path, init: str | None) -> tuple[str, dict]:
    """The card's account of the data (prepare.describe_cache), with the warm start's own."""
    index = json.loads((cache / "index.json").read_text())
    init_card = read_card(init) if init and Path(init).is_file() else None
    return describe_cache(index, init_card)


def backward_in_chunks(estimate: Callable[[slice], torch.Tensor], n: int, chunk: int,
                       loss_of: Callable[[torch.Tensor], torch.Tensor],
                       no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """Accumulate the gradient of loss_of(estimate of all n samples) one chunk of samples at a time.

    The loss depends on the weights only through the estimate, so the chain rule splits it:
    the estimate without a graph, the loss's gradient g with respect to it, then each chunk's
    estimate again with its graph and the backward of sum(estimate * g). Memory stays that
    of one chunk; the price is a second forward pass. Under DDP (`no_sync` given) only the
    last chunk's backward all-reduces. Returns the loss, detached.
    """
    parts = [slice(i, i + chunk) for i in range(0, n, chunk)]
    with torch.no_grad():
        whole = torch.cat([estimate(c) for c in parts]).requires_grad_()
    loss = loss_of(whole)
    (grad,) = torch.autograd.grad(loss, whole)
    for i, c in enumerate(parts):
        last = i == len(parts) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            (estimate(c) * grad[c]).sum().backward()
    return loss.detach()


class TrainLoop:
    """One training run, as guided-diffusion's TrainLoop: set-up (or resume), then steps,
    each followed by the EMA update, and validation (exporting the best model) and
    checkpoints when due."""

    def __init__(self, cache: Path, run_dir: Path, tcfg: TrainConfig, device: torch.device,
                 stop: Callable[[], bool] | None = None) -> None:
        self.tcfg, self.mcfg, self.device, self.stop = tcfg, tcfg.model, device, stop
        self.rank, self.world = distributed.rank_and_world()
        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(tcfg.seed)
        # channels-last convolutions run twice as fast on CPU (oneDNN) and suit CUDA tensor cores
        self.model = MMFNet(self.mcfg.net).to(device, memory_format=torch.channels_last)
        self.dtype = network_dtype(device, tcfg.precision)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.swa = copy.deepcopy(self.ema) if tcfg.swa_every else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        # with a time budget the decay comes at decay_at of the budget, else of the steps
        self.decayed = False
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.1 if self.decayed or s >= tcfg.decay_at * tcfg.steps else 1.0)
        self.g = torch.Generator().manual_seed(tcfg.seed * 1000 + self.rank)
        self.state = {"step": 0, "best": float("inf"), "seconds": 0.0, "swa_n": 0}
        self.ckpt = run_dir / "checkpoint.pt"
        if tcfg.init and not self.ckpt.exists():
            _warm_start(self.model, self.ema, self.mcfg, Path(tcfg.init))
        if self.ckpt.exists():
            self.resume()
        self.net = distributed.wrap(self.model, device)
        self.stage1, doses = None, None
        if self.mcfg.stage1 is not None:
            from .modelcard import load_model

            self.stage1, first, _ = load_model(tcfg.stage1, device)
            if first != self.mcfg.stage1:
                raise DoseDiffError(f"The stage-1 card {tcfg.stage1} changed since this run began.",
                                    "Give the card the run started with, or start a new run folder.")
            doses = stage1_cache(cache, run_dir / "stage1", self.stage1, first, device)
        self.data = SliceCache(cache, "train", doses)
        # what the card is read out with: the run's model, normalised to its own training plans if asked
        self.card_cfg = self.mcfg
        self.dose_factors = np.ones(len(self.data.entries))   # per training patient, normalise_targets
        if tcfg.normalise:
            means = target_means(primary_target_doses(self.data, self.mcfg))
            level = round(training_level(means), 3)
            self.card_cfg = replace(self.mcfg, diffusion=replace(self.mcfg.diffusion, target_mean_gy=level))
            if tcfg.normalise_targets:
                self.dose_factors = plan_factors(means, level)
        self.training_data = _training_data(cache, tcfg.init)
        self.val = SliceCache(cache, "validation", doses) if self.rank == 0 and tcfg.val_every else None
        self.diffusion = Diffusion(self.mcfg.diffusion)
        self.run_dir, self.log_path, self.best_card = run_dir, run_dir / "log.jsonl", run_dir / "best.json"
        self.t_start = time.time() - self.state["seconds"]
        self.model.train()

    def autocast(self) -> torch.autocast:
        """The network's products in bf16 where the recipe's precision picks it; weights, optimiser
        and losses stay fp32. On a CPU with native bf16 (AMX) whole steps ran 1.5 times as fast
        as in fp32 (bench/bench_train.py)."""
        bf16 = self.dtype == torch.bfloat16
        return torch.autocast(self.device.type if bf16 else "cpu", dtype=torch.bfloat16, enabled=bf16)

    def resume(self) -> None:
        """Continue from the checkpoint, refused when it was written with other settings."""
        saved = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        _check_resume(saved, self.tcfg, self.ckpt)
        self.model.load_state_dict(saved["model"])
        self.ema.load_state_dict(saved["ema"])
        if self.swa is not None:
            self.swa.load_state_dict(saved["swa"])
        self.opt.load_state_dict(saved["opt"])
        self.sched.load_state_dict(saved["sched"])
        self.g.set_state(saved["rng"][self.rank] if self.rank < len(saved["rng"]) else saved["rng"][0])
        self.state = {"swa_n": 0, **saved["state"]}

    def seconds(self) -> float:
        return time.time() - self.t_start

    def inputs(self, ct: torch.Tensor, ps: torch.Tensor, ps_ctx: torch.Tensor,
               dose: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Augmented slices as the network reads them: (ct, conditions, PSDMs, dose, voxel weight of the loss)."""
        tcfg, mcfg, g = self.tcfg, self.mcfg, self.g
        ct, ps, dose, ps_ctx, beams, flip = augment(ct, ps, dose, tcfg, g, ps_ctx, beam_directions(mcfg, len(ct)))
        if mcfg.stage1 is not None:
            ct = jitter_stage1(ct, 1 + len(mcfg.conditions.context_offsets), tcfg.stage1_jitter, g)
        ct, cond = assemble(ct, ps, ps_ctx, mcfg, beams, flip)
        inside = (ps[:, CACHE_ROIS.index(POSSIBLE_DOSE)] > 0)[:, None]
        weight = torch.where(inside, 1.0, tcfg.outside_weight)
        return (ct.contiguous(memory_format=torch.channels_last), cond.contiguous(memory_format=torch.channels_last),
                ps, dose, weight)

    def scaled(self, dose: torch.Tensor, patients: np.ndarray) -> torch.Tensor:
        """Doses (network units) of these training patients' slices scaled by their dose_factors."""
        if not self.tcfg.normalise_targets:
            return dose
        f = torch.as_tensor(self.dose_factors[patients], dtype=dose.dtype, device=dose.device)
        return ((dose + 1) * f.reshape(-1, *[1] * (dose.ndim - 1)) - 1).clamp(max=1.0)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on a random batch; returns (loss, gradient norm)."""
        tcfg, mcfg, device, g = self.tcfg, self.mcfg, self.device, self.g
        idx = torch.randint(0, len(self.data), (tcfg.batch_size,), generator=g).numpy()
        # augmentation and channels on the training device: on a GPU the CPU only gathers slices
        ct, ps, ps_ctx, dose = (x.to(device, non_blocking=True) for x in self.data.batch(idx, mcfg))
        dose = self.scaled(dose, self.data.items[idx][:, 0])
        ct, cond, ps, dose, weight = self.inputs(ct, ps, ps_ctx, dose)
        with self.autocast():
            loss, x0 = self.diffusion.loss(lambda x, t: self.net(x, t, ct, cond), dose, generator=g, kind=tcfg.loss,
                                           weight=weight, last_step_fraction=tcfg.last_step_fraction, with_x0=True)
            if tcfg.dvh_weight:
                rois = ps[:, [CACHE_ROIS.index(r) for r in mcfg.conditions.rois]] > 0
                loss = loss + tcfg.dvh_weight * sorted_dose_l1(x0.float(), dose.float(), rois)
            if tcfg.gradient_weight:
                inside = (ps[:, CACHE_ROIS.index(POSSIBLE_DOSE)] > 0)[:, None]
                loss = loss + tcfg.gradient_weight * gradient_l1(x0.float(), dose.float(), inside)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        if not torch.isfinite(gnorm):  # gradients are all-reduced: every process stops here together
            raise DoseDiffError(f"Training diverged at step {self.state['step'] + 1}: loss {loss.item():.3g}, "
                                f"gradients not finite; {self.ckpt.name} keeps the last good checkpoint, no model "
                                "was exported.", f"Start a new run folder with a lower lr (now {tcfg.lr:g}), "
                                "or check the cache.")
        self.opt.step()
        self.sched.step()
        return loss, gnorm

    def patient_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on every cached slice of one random training patient, at t = T-1
        (the default sampler's only step): the voxel loss plus `patient_dvh_weight` x the DVH
        score's own cells over the whole patient (dvh_metric_l1), which no batch of random
        slices can see; memory stays that of one batch (backward_in_chunks)."""
        tcfg, mcfg, device, g = self.tcfg, self.mcfg, self.device, self.g
        p = int(torch.randint(0, len(self.data.entries), (1,), generator=g))
        arrays, entry = self.data.arrays[p], self.data.entries[p]
        rows = np.arange(len(entry["slices"]))
        ct, ps, ps_ctx = gather(arrays["ct"], arrays["psdm"], rows, mcfg, self.data.stage1[p])
        dose = self.scaled(torch.from_numpy(np.asarray(arrays["dose"], np.float32))[:, None], np.full(len(rows), p))
        ct, ps, ps_ctx, dose = (x.to(device) for x in (ct, ps, ps_ctx, dose))
        # each slice turns on its own, dose and ROIs with it, so every ROI's dose distribution stays its own
        ct, cond, ps, dose, weight = self.inputs(ct, ps, ps_ctx, dose)
        t = torch.full((len(rows),), self.diffusion.T - 1, device=device)
        x_t = self.diffusion.q_sample(dose, t, torch.randn(dose.shape, generator=g).to(device))

        def estimate(c: slice) -> torch.Tensor:
            with self.autocast():
                out = self.net(x_t[c], t[c], ct[c], cond[c])
            return self.diffusion.split(out.float(), x_t[c], t[c])[0]

        names = mcfg.conditions.rois
        rois = ps[:, [CACHE_ROIS.index(r) for r in names]] > 0
        is_target = torch.tensor([r in TARGETS for r in names])
        hottest = max(1, round(100.0 / float(np.prod(entry["spacing"]))))

        def loss_of(x0: torch.Tensor) -> torch.Tensor:
            err = (x0 - dose).abs() if tcfg.loss == "l1" else (x0 - dose) ** 2
            voxels = (err * weight).sum() / weight.sum().clamp_min(1e-12)
            return voxels + tcfg.patient_dvh_weight * dvh_metric_l1(x0, dose, rois, is_target, hottest)

        self.opt.zero_grad(set_to_none=True)
        loss = backward_in_chunks(estimate, len(rows), tcfg.batch_size, loss_of, getattr(self.net, "no_sync", None))
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        if not torch.isfinite(gnorm):
            raise DoseDiffError(f"Training diverged at step {self.state['step'] + 1} (a whole-patient step): loss "
                                f"{loss:.3g}, gradients not finite; {self.ckpt.name} keeps the last good "
                                "checkpoint, no model was exported.",
                                f"Start a new run folder with a lower lr (now {tcfg.lr:g}), or check the cache.")
        self.opt.step()
        self.sched.step()
        return loss, gnorm

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the EMA towards the weights; early on the average must not be dominated by the initialisation."""
        decay = min(self.tcfg.ema_decay, (1 + self.state["step"]) / (10 + self.state["step"]))
        for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
            pe.lerp_(pm, 1 - decay)
        for be, bm in zip(self.ema.buffers(), self.model.buffers()):
            be.copy_(bm)

    @torch.no_grad()
    def update_swa(self) -> None:
        """Fold the weights into their uniform average when due. An average over a long
        stretch of steps at a constant learning rate lands nearer the middle of the basin than
        the EMA's last thousand steps (Izmailov et al. 2018); GroupNorm has no running
        statistics to recompute for it."""
        step, every = self.state["step"], self.tcfg.swa_every
        if self.swa is None or step < self.tcfg.swa_start or step % every:
            return
        n = self.state["swa_n"] = self.state["swa_n"] + 1
        for ps, pm in zip(self.swa.parameters(), self.model.parameters()):
            ps.lerp_(pm, 1.0 / n)
        for bs, bm in zip(self.swa.buffers(), self.model.buffers()):
            bs.copy_(bm)

    def exported(self) -> tuple[torch.nn.Module, str]:
        """The weights validated and exported: the SWA average once it holds any, else the EMA."""
        if self.swa is not None and self.state["swa_n"]:
            return self.swa, (f"uniform average of the weights at {self.state['swa_n']} steps (every "
                              f"{self.tcfg.swa_every} from step {self.tcfg.swa_start})")
        return self.ema, "EMA weights"

    def log(self, row: dict) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def validate(self) -> None:
        """Score the exported weights on the validation subset; a better dose score exports the best model."""
        step = self.state["step"]
        weights, what = self.exported()
        v = validate(weights, self.mcfg, self.val, self.tcfg.val_patients, self.device)
        v.update(step=step, seconds=round(self.seconds(), 1))
        self.log(v)
        if v["dose_score"] < self.state["best"]:
            self.state["best"] = v["dose_score"]
            curve = [{k: r[k] for k in ("step", "dose_score", "dvh_score")}
                     for r in map(json.loads, self.log_path.read_text().splitlines()) if "dose_score" in r]
            text, data = self.training_data
            info = {"training_data": text,
                    "training": {"recipe": portable_recipe(self.tcfg), "data": data, "step": step,
                                 "wall_clock_s": round(self.seconds()),
                                 "selection": f"{what}, best dose score on {v['patients']} validation patients",
                                 "learning_curve": curve},
                    "validation_subset": v}
            model = weights if self.stage1 is None else TwoStage(self.stage1, weights)
            save_model(model, self.card_cfg, self.best_card, info, half=True, overwrite=True)
        plot_curves(self.log_path, self.run_dir / "curves.png")

    def save_checkpoint(self) -> None:
        """Weights, EMA, optimiser, schedule, every process's random state and the settings."""
        rngs = distributed.gather(self.g.get_state())
        if self.world > 1:  # a cheap proof that DDP keeps every replica identical
            total = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().reshape(1).cpu()
            sums = distributed.gather(total)
            if self.rank == 0:
                self.log({"step": self.state["step"], "replica_param_sums": [float(x) for x in sums]})
        if self.rank != 0:
            return
        self.state["seconds"] = self.seconds()
        tmp = self.ckpt.with_suffix(".tmp")
        swa = {"swa": self.swa.state_dict()} if self.swa is not None else {}
        torch.save({"model": self.model.state_dict(), "ema": self.ema.state_dict(), **swa, "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(), "rng": rngs, "state": self.state,
                    "train_config": self.tcfg.recipe(), "model_config": json.dumps(self.mcfg.to_dict())}, tmp)
        os.replace(tmp, self.ckpt)

    def run(self) -> Path:
        """Train to tcfg.steps (or the time budget, or stop()); returns the best model card's path."""
        tcfg = self.tcfg
        while self.state["step"] < tcfg.steps:
            whole = tcfg.patient_every > 0 and (self.state["step"] + 1) % tcfg.patient_every == 0
            loss, gnorm = self.patient_step() if whole else self.step()
            self.update_ema()
            self.state["step"] += 1
            self.update_swa()
            step = self.state["step"]
            if self.rank == 0 and (step % 20 == 0 or step == 1):
                self.log({"step": step, "loss": loss.item(), "grad_norm": gnorm.item(),
                          "lr": self.sched.get_last_lr()[0], "seconds": round(self.seconds(), 1),
                          "slices_per_s": round(step * tcfg.batch_size * self.world / max(self.seconds(), 1e-6), 2)})
            out_of_time = tcfg.max_seconds > 0 and self.seconds() > tcfg.max_seconds
            self.decayed = tcfg.max_seconds > 0 and self.seconds() > tcfg.decay_at * tcfg.max_seconds
            done = step == tcfg.steps or out_of_time or (self.stop is not None and self.stop())
            if self.val is not None and (step % tcfg.val_every == 0 or done):
                self.validate()
            if done or step % tcfg.checkpoint_every == 0:
                self.save_checkpoint()
            if done:
                break
        return self.best_card


def train(cache: Path, run_dir: Path, tcfg: TrainConfig, device: torch.device,
          stop: Callable[[], bool] | None = None) -> Path:
    """Train (or resume from run_dir/checkpoint.pt); returns the best model card path."""
    loop = TrainLoop(cache, run_dir, tcfg, device, stop)
    try:
        return loop.run()
    finally:
        # The loop sits in reference cycles (its LR schedule's lambda), so without a collection its
        # DDP wrapper outlives the process group; gloo then aborts the process at exit.
        del loop
        gc.collect()
