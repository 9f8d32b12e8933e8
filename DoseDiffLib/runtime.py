"""Where the network runs: device choice and a batch size that fits in memory."""
from __future__ import annotations

import os

import torch

from .config import NetConfig
from .errors import DoseDiffError


def choose_device(name: str = "auto") -> torch.device:
    """auto picks CUDA, then Apple MPS, then CPU; an explicit choice must be available."""
    name = (name or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if name in ("gpu", "cuda") or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DoseDiffError("CUDA was requested but PyTorch sees no CUDA GPU.",
                                "Use --device cpu, or install a CUDA build of PyTorch that matches the driver.")
        return torch.device("cuda" if name == "gpu" else name)
    if name == "mps":
        if not has_mps:
            raise DoseDiffError("Apple MPS was requested but is not available.", "Use --device cpu.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DoseDiffError(f"Unknown device {name!r}.", "Use auto, cpu, cuda or mps.")


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        rec = getattr(torch.mps, "recommended_max_memory", None)
        return int(rec()) if rec else 4 << 30
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def activation_bytes_per_slice(net: NetConfig, bytes_per_value: int = 4) -> int:
    """Upper estimate of inference memory per slice: skips of one stream plus the
    working tensors of three encoders and the decoder at the widest level."""
    side = net.image_size
    total = 0
    for level, mult in enumerate(net.channel_mult):
        px = (side // 2 ** level) ** 2
        ch = net.base_channels * mult
        total += px * ch * (net.enc_blocks + 1) * 4  # skips + 3 encoder streams
        total += px * ch * 6                          # decoder block working set (cat + convs)
    return total * bytes_per_value


def batch_size_for(net: NetConfig, device: torch.device, cap: int | None = None,
                   bytes_per_value: int = 4) -> int:
    """Slices per network call: half the free memory, at most 64 (GPU) or 4 (CPU).

    On CPU larger batches only spill the caches: tiny/small presets ran fastest at 4
    slices per call (bench/bench_inference.py, 2 cores).
    """
    per = activation_bytes_per_slice(net, bytes_per_value)
    fit = max(1, int(available_memory_bytes(device) * 0.5 // per))
    limit = cap or (64 if device.type in ("cuda", "mps") else 4)
    return max(1, min(fit, limit))
