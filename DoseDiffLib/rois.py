"""Matching a clinic's structure names to the model's ROIs.

Clinics name the same organ many ways (Parotid_L, L Parotid, PAROTID LT; PTV_70,
PTV 70Gy, PTV7000). A silent mismatch feeds the network the wrong organ, so matching
is strict: normalised names and a fixed synonym list, never substrings, planning
helpers (PRV, ring, opt, "z" structures) never auto-matched, and any ambiguity is an
error that asks for a mapping file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .errors import DoseDiffError, warn

BODY = "BODY"

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "Brainstem": ("brainstem", "brainstm", "stembrain"),
    "SpinalCord": ("spinalcord", "cord", "cordspinal", "spinalcanal", "myelon"),
    "RightParotid": ("rightparotid", "parotidright", "parotidr", "rparotid", "parotidrt",
                     "rtparotid"),
    "LeftParotid": ("leftparotid", "parotidleft", "parotidl", "lparotid", "parotidlt",
                    "ltparotid"),
    "Esophagus": ("esophagus", "oesophagus", "esophag", "esoph", "oesoph"),
    "Larynx": ("larynx", "glotticlarynx", "larynxglottic"),
    "Mandible": ("mandible", "bonemandible", "mandiblebone", "jaw"),
    BODY: ("body", "external", "bodyexternal", "skin", "outline", "patient", "bodycontour"),
}
_HELPER = re.compile(r"prv|ring|opt|avoid|^z|plan|expand|\d+mm|minus|plus|shell|cropped|eval")
_PTV = re.compile(r"^ptv(\d+(?:\.\d+)?)(gy|cgy)?$")


def normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower().replace("_", "").replace(" ", ""))


def canonical_name(name: str, model_rois: Iterable[str]) -> str | None:
    """The model ROI a structure name stands for, or None."""
    model_rois = set(model_rois) | {BODY}
    n = normalise(name)
    m = _PTV.match(n)
    if m:
        value = float(m.group(1))
        if m.group(2) == "cgy" or value >= 1000:
            value /= 100.0
        cand = f"PTV{value:g}"
        return cand if cand in model_rois else None
    if _HELPER.search(n):
        return None
    for roi, words in _SYNONYMS.items():
        if roi in model_rois and n in words:
            return roi
    return None


def read_mapping(path: str | os.PathLike) -> dict[str, str | None]:
    """A JSON object {model ROI: structure name or null}; null ignores that ROI."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DoseDiffError(f"Cannot read ROI mapping file {path}: {exc}.",
                            'Write a JSON object such as {"PTV70": "PTV_High", "SpinalCord": "Cord"}.') from None
    if not isinstance(data, dict) or not all(isinstance(v, (str, type(None))) for v in data.values()):
        raise DoseDiffError(f"ROI mapping file {path} must map model ROI names to structure names.",
                            'Write a JSON object such as {"PTV70": "PTV_High"}.')
    return data


def match_rois(structure_names: Iterable[str], model_rois: Iterable[str],
               mapping: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """Map model ROI -> structure name. The user mapping wins over automatic matching."""
    names = list(structure_names)
    model_rois = list(model_rois)
    known = set(model_rois) | {BODY}
    mapping = dict(mapping or {})
    for roi, target in mapping.items():
        if roi not in known:
            raise DoseDiffError(f"Mapping names {roi!r}, which is not a model ROI.",
                                f"Use one of: {', '.join(sorted(known))}.")
        if target is not None and target not in names:
            raise DoseDiffError(f"Mapping sends {roi} to {target!r}, but there is no such structure.",
                                f"Available structures: {', '.join(names)}.")
    result: dict[str, str] = {r: t for r, t in mapping.items() if t is not None}
    taken = set(result.values())
    auto: dict[str, list[str]] = {}
    for n in names:
        if n in taken:
            continue
        roi = canonical_name(n, model_rois)
        if roi is not None and roi not in mapping:
            auto.setdefault(roi, []).append(n)
    for roi, cands in auto.items():
        if len(cands) > 1:
            raise DoseDiffError(f"Several structures could be {roi}: {', '.join(cands)}.",
                                f'Say which in a mapping file, e.g. {{"{roi}": "{cands[0]}"}}.')
        result[roi] = cands[0]
    return result


def unmatched_targets(structure_names: Iterable[str], matched: Mapping[str, str]) -> list[str]:
    """PTV-like structures that were not used: worth a warning (other dose levels)."""
    used = set(matched.values())
    return [n for n in structure_names if n not in used and normalise(n).startswith("ptv")]


def plausibility_warnings(ct_hu: np.ndarray, body: np.ndarray, masks: Mapping[str, np.ndarray],
                          targets: Iterable[str], warnings: list[str]) -> None:
    """Warn about structures that are valid but almost certainly not what was meant.

    Each of these passes every check and yet steers the prediction somewhere no plan
    would go: a BODY that is the image outline, a target in air or as large as the CT,
    an organ that is a copy of a target.
    """
    body = body.astype(bool)
    if body.mean() > 0.95:
        warn(warnings, f"The body contour fills {100 * body.mean():.0f}% of the image: it looks like the image "
                       "outline, not the patient, so dose is allowed in the air around the patient.")
    targets = [t for t in targets if t in masks]
    for t in targets:
        m = masks[t].astype(bool)
        if not m.any():
            continue
        if float(np.median(ct_hu[m])) < -500:
            warn(warnings, f"{t} lies mostly in air (median {float(np.median(ct_hu[m])):.0f} HU): check that the "
                           "structures belong to this CT and are not shifted.")
        if m.mean() > 0.5 or m.sum() > 0.9 * max(int(body.sum()), 1):
            warn(warnings, f"{t} fills {100 * m.mean():.0f}% of the CT: a target that large is not a clinical "
                           "target; check the structure (a filled bounding box, or the body renamed).")
        for organ, o in masks.items():
            if organ in targets or organ == BODY:
                continue
            o = o.astype(bool)
            overlap = 2.0 * float((m & o).sum()) / max(float(m.sum() + o.sum()), 1.0)
            if overlap > 0.98:
                warn(warnings, f"{organ} is identical to {t} (Dice {overlap:.2f}): one of them is a copy.")
