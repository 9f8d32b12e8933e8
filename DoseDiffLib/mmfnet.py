"""MMFNet: the multi-encoder multi-scale fusion network that predicts the noise.

Three encoders of the same shape read the noisy dose, the CT and the condition stack.
After every encoder stage the dose stream becomes dose + CT + conditions at that scale,
and that sum is also the skip connection. At the bottleneck the fusionFormer lets the
CT (query) and conditions (key) decide how the dose features (value) are mixed across
the slice. The decoder is a guided-diffusion UNet decoder. Every residual block takes
the timestep through adaptive group norm (scale and shift).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import NetConfig


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose bf16 CPU path in training reads channels-first memory: PyTorch's
    channels-last bf16 kernel took 2-5 times as long there as a transpose and the channels-first
    kernel, most of all backwards (bench/bench_train.py). Prediction (no gradient) keeps the
    channels-last kernel: there the transposes cost what they saved. Same parameters, same result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and torch.is_grad_enabled() and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def group_norm(channels: int) -> GroupNorm:
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return GroupNorm(groups, channels)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = group_norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, hh * ww).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d)
        out = out.transpose(-1, -2).reshape(b, c, -1)
        return x + self.proj(out).reshape(b, c, hh, ww)


class Down(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """Layers that run in order, each given the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


class InputConv(nn.Conv2d):
    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def build_encoder(cfg: NetConfig, in_channels: int, emb_dim: int) -> tuple[nn.ModuleList, list[int]]:
    """Encoder stages and the channel count after each (the skip widths)."""
    ch = cfg.base_channels * cfg.channel_mult[0]
    stages = nn.ModuleList([Stage([InputConv(in_channels, ch, 3, padding=1)])])
    widths = [ch]
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.enc_blocks):
            layers: list[nn.Module] = [ResBlock(ch, cfg.base_channels * mult, emb_dim, cfg.dropout)]
            ch = cfg.base_channels * mult
            if level in cfg.attention_levels:
                layers.append(SelfAttention(ch, cfg.num_heads))
            stages.append(Stage(layers))
            widths.append(ch)
        if level != len(cfg.channel_mult) - 1:
            stages.append(Stage([Down(ch)]))
            widths.append(ch)
    return stages, widths


class FusionFormer(nn.Module):
    """Cross-stream attention over the grid x grid patches of the bottleneck."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        channels = cfg.base_channels * cfg.channel_mult[-1]
        self.side = cfg.image_size // 2 ** (len(cfg.channel_mult) - 1)
        self.grid = cfg.fusion_grid
        if self.side % self.grid:
            raise ValueError(f"bottleneck {self.side} px is not divisible into {self.grid} patches")
        self.patch = self.side // self.grid
        patch_dim = channels * self.patch * self.patch
        dim, dh = cfg.fusion_dim, cfg.fusion_head_dim

        def embed() -> nn.Sequential:
            return nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))

        self.embed_q, self.embed_k, self.embed_v = embed(), embed(), embed()
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dh, bias=False)
        self.to_k = nn.Linear(dim, dh, bias=False)
        self.to_v = nn.Linear(dim, dh, bias=False)
        self.to_out = nn.Linear(dh, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, cfg.fusion_mlp), nn.GELU(),
                                 nn.Linear(cfg.fusion_mlp, dim))
        self.unembed = nn.Linear(dim, patch_dim)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        g, p = self.grid, self.patch
        x = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # b, gy, gx, py, px, c
        return x.reshape(b, g * g, p * p * c)

    def _image(self, t: torch.Tensor, channels: int) -> torch.Tensor:
        b = t.shape[0]
        g, p = self.grid, self.patch
        x = t.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, channels, g * p, g * p)

    def forward(self, ct: torch.Tensor, cond: torch.Tensor, dose: torch.Tensor) -> torch.Tensor:
        q = self.norm(self.embed_q(self._tokens(ct)) + self.pos)
        k = self.norm(self.embed_k(self._tokens(cond)) + self.pos)
        v = self.norm(self.embed_v(self._tokens(dose)) + self.pos)
        att = F.scaled_dot_product_attention(self.to_q(q)[:, None], self.to_k(k)[:, None],
                                             self.to_v(v)[:, None])[:, 0]
        x = self.to_out(att) + v
        x = self.mlp(x) + x
        return self._image(self.unembed(x), dose.shape[1])


class MMFNet(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        emb_dim = 4 * cfg.base_channels
        self.time_embed = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.enc_dose, widths = build_encoder(cfg, cfg.out_channels, emb_dim)
        self.enc_ct, _ = build_encoder(cfg, cfg.ct_channels, emb_dim)
        self.enc_cond, _ = build_encoder(cfg, cfg.cond_channels, emb_dim)
        self.fusion = FusionFormer(cfg)
        ch = widths[-1]
        self.middle = Stage([ResBlock(ch, ch, emb_dim, cfg.dropout), SelfAttention(ch, cfg.num_heads),
                             ResBlock(ch, ch, emb_dim, cfg.dropout)]
                            + [ResBlock(ch, ch, emb_dim, cfg.dropout) for _ in range(cfg.middle_blocks)])
        self.decoder = nn.ModuleList()
        skips = list(widths)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.enc_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), cfg.base_channels * mult, emb_dim,
                                                    cfg.dropout)]
                ch = cfg.base_channels * mult
                if level in cfg.attention_levels:
                    layers.append(SelfAttention(ch, cfg.num_heads))
                if level and i == cfg.enc_blocks:
                    layers.append(Up(ch))
                self.decoder.append(Stage(layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def encode(self, x: torch.Tensor, ct: torch.Tensor, cond: torch.Tensor,
               emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        h = x
        for f_dose, f_ct, f_cond in zip(self.enc_dose, self.enc_ct, self.enc_cond):
            ct = f_ct(ct, emb)
            cond = f_cond(cond, emb)
            h = f_dose(h, emb) + ct + cond
            skips.append(h)
        return h + self.fusion(ct, cond, h), skips

    def forward(self, x: torch.Tensor, t: torch.Tensor, ct: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: noisy dose (B,1,H,W); t: integer steps (B,); ct (B,1,H,W); cond (B,C,H,W)."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels))
        h, skips = self.encode(x, ct, cond, emb)
        h = self.middle(h, emb)
        for stage in self.decoder:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class TwoStage(nn.Module):
    """A predict-and-refine pair: `stage1`'s dose is an input of `net`, which gives the output.

    Kept as one module so that one weights file and one checksum hold both networks and
    neither can be paired with a stranger. Prediction runs `stage1` first (predict.sample_dose).
    """

    def __init__(self, stage1: MMFNet, net: MMFNet) -> None:
        super().__init__()
        self.stage1, self.net = stage1, net

    def forward(self, x: torch.Tensor, t: torch.Tensor, ct: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, ct, cond)


class Ensemble(nn.Module):
    """Networks read out on the same inputs and averaged by their shares (predict.sample_dose).

    One module, one weights file and one checksum, like TwoStage. It has no forward of its
    own: each network takes its own input channels (ModelConfig.partners).
    """

    def __init__(self, net: MMFNet, partners: list[MMFNet]) -> None:
        super().__init__()
        self.net, self.partners = net, nn.ModuleList(partners)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
