"""Model cards: the JSON beside every weights file, and the only way weights are loaded.

The card holds the full configuration (network, ordered condition channels,
normalisation, schedule, grid), what the model was trained on, what it scored on
validation, and the SHA-256 of the weights. Weights are safetensors: no pickle is ever
loaded. Any disagreement between card and weights is an error, never a silent wrong
prediction.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import ModelConfig
from .errors import DoseDiffError
from .mmfnet import MMFNet, count_parameters
from .volume import atomic_write

CARD_FORMAT = 1
INTENDED_USE = (
    "Research and planning guidance only. DoseDiff predicts an achievable dose "
    "distribution; it is not a treatment planning system dose calculation and must not "
    "be used to deliver or approve treatment.")
DEFAULT_TRAINING_DATA = (
    "OpenKBP (Babier et al. 2021): head and neck cancer, 9-field coplanar 6 MV IMRT, "
    "prescriptions 70/63/56 Gy in 35 fractions. Predictions for other sites, techniques "
    "(VMAT, protons), beam energies or prescriptions are outside the training range.")


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model: MMFNet, cfg: ModelConfig, card_path: str | os.PathLike,
               info: dict[str, Any] | None = None, half: bool = True, overwrite: bool = False) -> Path:
    """Write <name>.safetensors and its card <name>.json."""
    card_path = Path(card_path)
    if card_path.suffix != ".json":
        raise ValueError("the card path must end in .json")
    weights_path = card_path.with_suffix(".safetensors")
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    atomic_write(weights_path, lambda p: save_file(tensors, str(p)), overwrite)
    card = {
        "format": CARD_FORMAT,
        "name": card_path.stem,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": f"DoseDiff {__version__}",
        "intended_use": INTENDED_USE,
        "training_data": DEFAULT_TRAINING_DATA,
        "config": cfg.to_dict(),
        "ct_channels": cfg.conditions.ct_channel_names(),
        "condition_channels": cfg.conditions.channel_names(),
        "parameters": count_parameters(model),
        "weights": {"file": weights_path.name, "sha256": sha256(weights_path),
                    "dtype": str(dtype).replace("torch.", "")},
    }
    card.update(info or {})
    text = json.dumps(card, indent=2) + "\n"
    atomic_write(card_path, lambda p: p.write_text(text), overwrite)
    return card_path


def read_card(card_path: str | os.PathLike) -> dict[str, Any]:
    card_path = Path(card_path)
    if card_path.suffix == ".safetensors":
        card_path = card_path.with_suffix(".json")
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise DoseDiffError(f"Model card {card_path} not found.",
                            "Give the .json card that sits beside the .safetensors weights.") from None
    except json.JSONDecodeError as exc:
        raise DoseDiffError(f"Model card {card_path} is not valid JSON ({exc}).",
                            "Restore the card from the model's distribution.") from None
    for key in ("config", "weights"):
        if key not in card:
            raise DoseDiffError(f"Model card {card_path} has no {key!r} entry.",
                                "Use a card written by DoseDiff's training.")
    card["_path"] = str(card_path)
    return card


def load_model(card_path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[MMFNet, ModelConfig, dict[str, Any]]:
    """Build the network from its card and load verified weights."""
    card = read_card(card_path)
    cfg = ModelConfig.from_dict(card["config"])
    if (cfg.net.cond_channels, cfg.net.ct_channels) != (cfg.conditions.n_channels,
                                                        len(cfg.conditions.ct_channel_names())):
        raise DoseDiffError(
            f"Model card {card['_path']} is inconsistent: the network takes {cfg.net.ct_channels} CT and "
            f"{cfg.net.cond_channels} condition channels but its input description has "
            f"{len(cfg.conditions.ct_channel_names())} and {cfg.conditions.n_channels}.",
            "The card was edited or written by another version; use the card shipped with the weights.")
    weights = Path(card["_path"]).parent / card["weights"]["file"]
    if not weights.exists():
        raise DoseDiffError(f"Weights {weights} named by the card are missing.",
                            "Put the .safetensors file beside its card.")
    digest = sha256(weights)
    if digest != card["weights"]["sha256"]:
        raise DoseDiffError(f"Weights {weights} fail the checksum in their card "
                            f"(sha256 {digest[:12]}..., card says {card['weights']['sha256'][:12]}...).",
                            "The file is corrupt or belongs to another card; re-install the model.")
    state = load_file(str(weights))
    model = MMFNet(cfg.net)
    expected = model.state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    extra = [k for k in state if k not in expected]
    if wrong or extra:
        first = (wrong or extra)[0]
        got = tuple(state[first].shape) if first in state else "missing"
        raise DoseDiffError(
            f"Weights {weights} do not match the network in their card: {len(wrong)} tensors differ, "
            f"{len(extra)} unexpected (first: {first}, card expects "
            f"{tuple(expected[first].shape) if first in expected else 'none'}, file has {got}).",
            "Use the card that was written with these weights.")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.to(device=device, dtype=dtype).eval()
    return model, cfg, card


def update_card(card_path: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Merge measured figures into a card (the weights and their checksum are untouched)."""
    card = read_card(card_path)
    path = Path(card.pop("_path"))
    card.update(info)
    text = json.dumps(card, indent=2) + "\n"
    return atomic_write(path, lambda p: p.write_text(text), overwrite=True)
