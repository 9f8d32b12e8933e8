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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import DiffusionConfig, ModelConfig
from .errors import DoseDiffError
from .mmfnet import Ensemble, MMFNet, TwoStage, count_parameters
from .volume import atomic_write

CARD_FORMAT = 1
INTENDED_USE = (
    "Research and planning guidance only. DoseDiff predicts an achievable dose "
    "distribution; it is not a treatment planning system dose calculation and must not "
    "be used to deliver or approve treatment.")
DEFAULT_TRAINING_DATA = (
    "OpenKBP (Babier et al. 2021): head and neck cancer, 9-field coplanar 6 MV IMRT, "
    "prescriptions 70/63/56 Gy in 35 fractions. Predictions for other sites, techniques "
    "(VMAT, protons), beam energies or prescriptions are outside the training range. A plan "
    "prescribed at other levels is predicted with its targets placed on 70/63/56 Gy and the dose "
    "scaled back by the ratio of the top levels: a linear approximation, not validated on such plans.")


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_sha256(config: dict[str, Any]) -> str:
    """Checksum of the card's configuration as stored, less the sampler settings.

    Everything here changes what the weights mean (dose scale, prediction type, schedule,
    channel order, network); the sampler settings may be tuned after training. Taken
    over the stored dict, not a re-parsed ModelConfig, so fields added to the code later
    (with defaults) do not invalidate older cards.
    """
    from .config import DiffusionConfig

    meaning = dict(config)
    if isinstance(meaning.get("diffusion"), dict):
        meaning["diffusion"] = {k: v for k, v in meaning["diffusion"].items()
                                if k not in DiffusionConfig.SAMPLER_SETTINGS}
    text = json.dumps(meaning, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


Network = MMFNet | TwoStage | Ensemble


def save_model(model: Network, cfg: ModelConfig, card_path: str | os.PathLike,
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
    config = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, exactly as the card stores them
    card = {
        "format": CARD_FORMAT,
        "name": card_path.stem,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": f"DoseDiff {__version__}",
        "intended_use": INTENDED_USE,
        "training_data": DEFAULT_TRAINING_DATA,
        "config": config,
        "ct_channels": cfg.conditions.ct_channel_names(),
        "condition_channels": cfg.conditions.channel_names(),
        "parameters": count_parameters(model),
        "weights": {"file": weights_path.name, "sha256": sha256(weights_path),
                    "dtype": str(dtype).replace("torch.", ""), "config_sha256": config_sha256(config)},
    }
    card.update(info or {})
    text = json.dumps(card, indent=2) + "\n"
    atomic_write(card_path, lambda p: p.write_text(text), overwrite)
    return card_path


def read_card(card_path: str | os.PathLike) -> dict[str, Any]:
    """The card as a dict, refused with one clear message when it is not a DoseDiff card."""
    card_path = Path(card_path)
    if card_path.suffix == ".safetensors":
        card_path = card_path.with_suffix(".json")
    if card_path.suffix != ".json" and not card_path.is_dir():
        raise DoseDiffError(f"Model {card_path} is not a model card.",
                            "Give the .json card that sits beside the .safetensors weights.")
    if card_path.is_dir():
        inside = sorted(p.name for p in card_path.glob("*.json"))
        raise DoseDiffError(f"Model {card_path} is a folder, not a model card.",
                            f"Give the .json card inside it ({', '.join(inside) or 'none found'}).")
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise DoseDiffError(f"Model card {card_path} not found.",
                            "Give the .json card that sits beside the .safetensors weights.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise DoseDiffError(f"Model card {card_path} is not a readable JSON file ({exc}).",
                            "Restore the card from the model's distribution.") from None
    if not isinstance(card, dict):
        raise DoseDiffError(f"Model card {card_path} is not a JSON object.", "Use a card written by DoseDiff.")
    for key in ("config", "weights"):
        if not isinstance(card.get(key), dict):
            raise DoseDiffError(f"Model card {card_path} has no {key!r} entry.",
                                "Use a card written by DoseDiff's training.")
    if not isinstance(card["weights"].get("file"), str) or not isinstance(card["weights"].get("sha256"), str):
        raise DoseDiffError(f"Model card {card_path} does not name its weights file and checksum.",
                            "Use the card shipped with the weights.")
    card["_path"] = str(card_path)
    return card


def _check_config_checksum(card: dict[str, Any]) -> None:
    """Refuse a configuration edited after the weights were trained (checked last, so that
    an edit with a more specific symptom gets that message)."""
    stored = card["weights"].get("config_sha256")
    if stored is not None and stored != config_sha256(card["config"]):
        raise DoseDiffError(
            f"Model card {card['_path']} was edited: its configuration (dose scale, prediction type, "
            "schedule, channel order or network) no longer matches the one the weights were trained with.",
            "Restore the card shipped with the weights; only the sampler settings "
            f"({', '.join(DiffusionConfig.SAMPLER_SETTINGS)}) may be changed.")


def card_config(card: dict[str, Any]) -> ModelConfig:
    """The configuration, refused when it cannot describe a network."""
    try:
        cfg = ModelConfig.from_dict(card["config"])
        cfg.conditions.channel_names()
    except (TypeError, ValueError, AttributeError) as exc:
        raise DoseDiffError(f"Model card {card['_path']} holds an invalid configuration ({exc}).",
                            "Use the card shipped with the weights.") from None
    for c in (cfg, *([cfg.stage1] if cfg.stage1 is not None else []), *cfg.partners):
        if (c.net.cond_channels, c.net.ct_channels) != (c.conditions.n_channels, len(c.conditions.ct_channel_names())):
            raise DoseDiffError(
                f"Model card {card['_path']} is inconsistent: the network takes {c.net.ct_channels} CT and "
                f"{c.net.cond_channels} condition channels but its input description has "
                f"{len(c.conditions.ct_channel_names())} and {c.conditions.n_channels}.",
                "The card was edited or written by another version; use the card shipped with the weights.")
    return cfg


def build_network(cfg: ModelConfig) -> Network:
    """The untrained module a configuration describes: one network, a refiner pair or an ensemble."""
    if cfg.stage1 is not None:
        return TwoStage(MMFNet(cfg.stage1.net), MMFNet(cfg.net))
    if cfg.partners:
        return Ensemble(MMFNet(cfg.net), [MMFNet(p.net) for p in cfg.partners])
    return MMFNet(cfg.net)


def load_model(card_path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[Network, ModelConfig, dict[str, Any]]:
    """Build the network (a TwoStage pair for a refiner's card, an Ensemble for an ensemble's)
    and load verified weights."""
    card = read_card(card_path)
    cfg = card_config(card)
    weights = Path(card["_path"]).parent / card["weights"]["file"]
    if not weights.is_file():
        raise DoseDiffError(f"Weights {weights} named by the card are missing.",
                            "Put the .safetensors file beside its card.")
    digest = sha256(weights)
    if digest != card["weights"]["sha256"]:
        raise DoseDiffError(f"Weights {weights} fail the checksum in their card "
                            f"(sha256 {digest[:12]}..., card says {card['weights']['sha256'][:12]}...).",
                            "The file is corrupt or belongs to another card; re-install the model.")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise DoseDiffError(f"Weights {weights} are not a valid safetensors file ({type(exc).__name__}: "
                            f"{str(exc)[:120]}).", "Re-install the model (the .safetensors and its card).") from None
    try:
        model = build_network(cfg)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as exc:
        raise DoseDiffError(f"Model card {card['_path']} describes a network that cannot be built ({exc}).",
                            "Use the card shipped with the weights.") from None
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
    _check_config_checksum(card)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.to(device=device, dtype=dtype).eval()
    return model, cfg, card


def save_ensemble(first: str | os.PathLike, partners: list[tuple[str | os.PathLike, float]],
                  card_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """One card and one weights file for networks whose doses are averaged: `first` keeps
    1 - the partners' shares. The card keeps `first`'s training record (a warm start from the
    ensemble continues `first`); its validation is the ensemble's own, still to be measured."""
    loaded = [load_model(first)] + [load_model(p) for p, _ in partners]
    for (_, cfg, card) in loaded:
        if cfg.stage1 is not None or cfg.partners:
            raise DoseDiffError(f"Model {card['_path']} is a refiner or an ensemble itself.",
                                "Give the cards of single networks.")
    (net, cfg, card), rest = loaded[0], loaded[1:]
    shares = tuple(float(w) for _, w in partners)
    read_out = {k: getattr(cfg.diffusion, k) for k in ("sampler", "flip", "z_smoothing_mm", "target_mean_gy")}
    try:  # partners are read out with the ensemble's sampler; their own settings would mislead
        ens = replace(cfg, partners=tuple(replace(c, diffusion=replace(c.diffusion, **read_out)) for _, c, _ in rest),
                      diffusion=replace(cfg.diffusion, partner_weights=shares))
    except ValueError as exc:
        raise DoseDiffError(f"These models cannot form an ensemble: {exc}.",
                            "Combine networks trained on the same targets, structures, dose scale and grid.") from None
    members = [{"card": Path(c["_path"]).name, "share": round(w, 6), "weights_sha256": c["weights"]["sha256"],
                **({"validation": {k: c["validation"].get(k) for k in ("dose_score", "dvh_score", "patients")}}
                   if c.get("validation") else {})}
               for (_, _, c), w in zip(loaded, (1 - sum(shares),) + shares)]
    info = {"training_data": card.get("training_data", DEFAULT_TRAINING_DATA), "training": card.get("training", {}),
            "ensemble": {"networks": members,
                         "note": "each network's read-out (network units, before the z filter) weighted by its "
                                 "share; the validation below is the ensemble's own"}}
    half = all(c["weights"].get("dtype") == "float16" for _, _, c in loaded)  # exact copies of the weights
    return save_model(Ensemble(net, [m for m, _, _ in rest]), ens, card_path, info, half, overwrite)


def uncalibrated_spread(card: dict[str, Any]) -> str | None:
    """None when validation showed the sampler's spread calibrated; else what was measured, for
    the message that withholds an SD map (an uncalibrated SD reads as an error bar it is not)."""
    u = (card.get("validation") or {}).get("uncertainty") or {}
    if u.get("calibrated") is True:
        return None
    if "voxels_inside_mean_pm_1.96sd" not in u:
        return "its card records no coverage measured on validation"
    return (f"on validation {u['voxels_inside_mean_pm_1.96sd']:.0%} of clinical-dose voxels lie inside the "
            f"mean +- 1.96 SD, nominal {u.get('nominal', 0.95):.0%}")


def update_card(card_path: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Merge measured figures into a card (the weights and their checksum are untouched)."""
    card = read_card(card_path)
    path = Path(card.pop("_path"))
    card.update(info)
    text = json.dumps(card, indent=2) + "\n"
    return atomic_write(path, lambda p: p.write_text(text), overwrite=True)
