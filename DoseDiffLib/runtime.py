"""Where the network runs: device choice and a batch size that fits in memory."""
from __future__ import annotations

import os

import torch

from .config import PRECISIONS, NetConfig
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


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX): only then is
    bf16 faster than fp32 on it (bench/bench_inference.py measures both)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def network_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the network's matrix products run in (autocast; the sampler stays fp32).

    auto: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere (Apple MPS included).
    On validation bf16 moved the scores by under 0.002 Gy (model card, `validation.precision`).
    """
    if precision not in PRECISIONS:
        raise DoseDiffError(f"Unknown precision {precision!r}.", f"Choose one of: {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return torch.float32
    if device.type == "mps":
        if precision == "bf16":
            raise DoseDiffError("bf16 is not offered on Apple MPS.", "Use --precision fp32 or auto.")
        return torch.float32
    if precision == "bf16" or device.type == "cuda" or native_bf16_cpu():
        return torch.bfloat16
    return torch.float32


def precision_name(dtype: torch.dtype) -> str:
    """The --precision name of a network dtype, as predictions report it."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


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
                   bytes_per_value: int = 4, dtype: torch.dtype = torch.float32) -> int:
    """Slices per network call: half the free memory, at most 64 (GPU) or, on CPU, 4 in
    fp32 and 16 in bf16.

    On CPU larger fp32 batches only spill the caches: tiny/small presets ran fastest at 4
    slices per call (bench/bench_inference.py, 2 cores). bf16 halves the bytes and its
    convolutions gained from 16 slices (47 against 34-41 slice-steps/s at 4, bundled model).
    """
    per = activation_bytes_per_slice(net, bytes_per_value)
    fit = max(1, int(available_memory_bytes(device) * 0.5 // per))
    cpu_limit = 16 if dtype == torch.bfloat16 else 4
    limit = cap or (64 if device.type in ("cuda", "mps") else cpu_limit)
    return max(1, min(fit, limit))
