"""Gaussian diffusion: the linear schedule, the training loss and the DDIM sampler.

The maths never knows which network it drives: it calls `model_fn(x_t, t)` and reads
the output as epsilon, x0 or v according to the configuration. Noise is drawn on the
CPU from a seeded generator and moved to the device, so a seed gives the same dose on
CPU, CUDA and MPS up to floating-point differences.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .config import DiffusionConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Diffusion:
    def __init__(self, cfg: DiffusionConfig = DiffusionConfig()) -> None:
        if cfg.prediction not in ("epsilon", "x0", "v"):
            raise ValueError(f"unknown prediction target {cfg.prediction!r}")
        self.cfg = cfg
        self.T = cfg.timesteps
        self.betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)

    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar.to(like.device)[t.to(like.device)].to(like.dtype)
        return ab.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output."""
        if self.cfg.prediction == "epsilon":
            return noise
        if self.cfg.prediction == "x0":
            return x0
        ab = self._ab(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def split(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output -> (x0, epsilon) at step t."""
        ab = self._ab(t, x_t)
        if self.cfg.prediction == "epsilon":
            return (x_t - (1 - ab).sqrt() * out) / ab.sqrt(), out
        if self.cfg.prediction == "x0":
            return out, (x_t - ab.sqrt() * out) / (1 - ab).sqrt()
        x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * out
        return x0, (1 - ab).sqrt() * x_t + ab.sqrt() * out

    def loss(self, model_fn: ModelFn, x0: torch.Tensor, generator: torch.Generator | None = None,
             kind: str = "mse", weight: torch.Tensor | None = None, last_step_fraction: float = 0.0,
             with_x0: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Error of the network output against its target at a random step.

        `kind` "l1" makes x0-prediction estimate the conditional median, which is what a
        mean-absolute-error score (OpenKBP's) rewards; `weight` (broadcast to x0) lets
        pixels that no score looks at count less. The result is the weighted mean.
        `last_step_fraction` of the samples are drawn at t = T-1, the only step a one-step
        sampler uses; the rest uniformly, so every step of a longer sampler stays trained.
        `with_x0` also returns the network's estimate of x0, for losses on the dose itself.
        """
        if kind not in ("mse", "l1"):
            raise ValueError(f"unknown loss {kind!r}")
        b = x0.shape[0]
        t = torch.randint(0, self.T, (b,), generator=generator)
        t = torch.where(torch.rand(b, generator=generator) < last_step_fraction, self.T - 1, t).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t).float()
        diff = out - self.target(x0, t, noise).float()
        err = diff.abs() if kind == "l1" else diff ** 2
        if weight is None:
            loss = err.mean()
        else:
            weight = weight.expand_as(err)
            loss = (err * weight).sum() / weight.sum().clamp_min(1e-12)
        return (loss, self.split(out, x_t.float(), t)[0]) if with_x0 else loss

    def ddim_timesteps(self, steps: int, spacing: str = "leading") -> list[int]:
        """Highest first. Leading: 875, 750, ..., 0 for 8 of 1000; trailing: 999, 874, ..., 124."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be between 1 and {self.T}, got {steps}")
        if spacing == "trailing":
            return [round(self.T - i * self.T / steps) - 1 for i in range(steps)]
        if spacing != "leading":
            raise ValueError(f"unknown timestep spacing {spacing!r}")
        stride = self.T // steps
        return list(range(0, stride * steps, stride))[::-1]

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, shape: Sequence[int], steps: int = 8, eta: float = 0.0,
                    clamp: bool = True, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    x_T: torch.Tensor | None = None, spacing: str = "leading",
                    on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12) from pure noise to x0 in `steps` network calls."""
        ts = self.ddim_timesteps(steps, spacing)
        x = (x_T if x_T is not None else torch.randn(tuple(shape), generator=generator)).to(device, dtype)
        for i, t_int in enumerate(ts):
            t = torch.full((x.shape[0],), t_int, dtype=torch.long, device=device)
            x0, eps = self.split(model_fn(x, t), x, t)
            if clamp:
                x0 = x0.clamp(-1.0, 1.0)
                ab = self._ab(t, x)
                eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            ab_t = float(self.alpha_bar[t_int])
            ab_prev = float(self.alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
            x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator).to(device, dtype)
            if on_step is not None:
                on_step(i + 1, len(ts))
        return x
