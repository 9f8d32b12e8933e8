"""A clinic's prescriptions mapped onto the dose levels a model was trained at.

An OpenKBP model knows three target levels (PTV70/63/56: 70, 63, 56 Gy). A plan with
other levels is predicted by scaling, the usual way knowledge-based planning moves a
model between prescriptions: factor = model's top level / plan's top level; every target
goes to the model level nearest its scaled dose; the network sees the plan as a 70 Gy
plan and its dose is divided by the factor. Training on a clinic's plans applies the
same factor to the clinical dose, so a fine-tuned model stays on the model's levels.

Scaling assumes the dose distribution's shape does not depend on the prescription (a
fair first approximation for the same technique and fractionation); every prediction
that was scaled says so, and a level outside the trained range is a warning with the
numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from .config import TARGETS
from .errors import DoseDiffError, warn
from .rois import normalise
from .volume import Volume

# Half the 7 Gy step between the OpenKBP levels: a scaled target farther than this from
# every trained level is not one of them.
LEVEL_TOLERANCE_GY = 3.5
_GY_IN_NAME = re.compile(r"^(?:ptv|ctv|gtv)[a-z]*?(\d+(?:\.\d+)?)(gy|cgy)?$")


@dataclass
class PrescriptionMap:
    """How a plan's targets reach the model: which structures make each model target, and the factor."""

    levels: dict[str, float]                  # plan structure -> prescribed Gy
    targets: dict[str, list[str]]             # model target -> plan structures
    scale: float                              # dose as the model sees it = plan dose * scale
    source: dict[str, str] = field(default_factory=dict)  # plan structure -> "given" | "RTPLAN" | "name"
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{s} {self.levels[s]:g} Gy -> {t}" for t, names in self.targets.items() for s in names]
        return "; ".join(parts) + (f"; doses scaled x{self.scale:.4g} into the model and back"
                                   if abs(self.scale - 1) > 1e-6 else "")


def parse_prescriptions(items: Iterable[str]) -> dict[str, float]:
    """NAME=GY pairs (the command line's --prescription) as a dict."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            gy = float(value)
        except ValueError:
            gy = float("nan")
        if not sep or not name or not np.isfinite(gy) or gy <= 0 or gy > 150:
            raise DoseDiffError(f"--prescription {item!r} is not NAME=GY with a dose between 0 and 150 Gy.",
                                "Write e.g. --prescription PTV_High=66 (the structure name, then its dose in Gy).")
        out[name] = gy
    return out


def level_in_name(name: str) -> float | None:
    """The dose a target's name states (PTV_66, PTV 70Gy, PTV7000cGy, PTVhigh_60), or None."""
    m = _GY_IN_NAME.match(normalise(name))
    if not m:
        return None
    gy = float(m.group(1))
    if m.group(2) == "cgy" or gy >= 1000:
        gy /= 100.0
    return gy if 10 <= gy <= 150 else None


def target_levels(structure_names: Iterable[str], given: Mapping[str, float] | None = None,
                  from_plan: Mapping[str, float] | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """Prescribed Gy per target structure: given on the command line, else the RTPLAN's, else the name's.

    Only PTVs count as targets; a CTV or GTV named with a dose is covered by its PTV.
    """
    names = list(structure_names)
    given, from_plan = dict(given or {}), dict(from_plan or {})
    for name in given:
        if name not in names:
            raise DoseDiffError(f"--prescription names {name!r}, which is not a structure of the plan.",
                                f"Structures: {', '.join(names) or 'none'}.")
    levels, source = {}, {}
    for name in names:
        if name in given:
            levels[name], source[name] = given[name], "given"
        elif name in from_plan and normalise(name).startswith("ptv"):
            levels[name], source[name] = from_plan[name], "RTPLAN"
        elif normalise(name).startswith("ptv") and level_in_name(name) is not None:
            levels[name], source[name] = level_in_name(name), "name"
    return levels, source


def map_prescriptions(levels: Mapping[str, float], source: Mapping[str, str] | None = None,
                      model_levels: Mapping[str, float] = TARGETS) -> PrescriptionMap:
    """Scale the plan's top level onto the model's and send every target to its nearest level."""
    if not levels:
        raise DoseDiffError("No target has a known prescription.",
                            "Give one with --prescription NAME=GY, export the RTPLAN, or name targets by dose "
                            "(PTV_70).")
    warnings: list[str] = []
    top_model = max(model_levels.values())
    top_plan = max(levels.values())
    scale = top_model / top_plan
    lo, hi = min(model_levels.values()), max(model_levels.values())
    targets: dict[str, list[str]] = {}
    for name, gy in sorted(levels.items(), key=lambda kv: -kv[1]):
        scaled = gy * scale
        model_roi = min(model_levels, key=lambda t: abs(model_levels[t] - scaled))
        gap = abs(model_levels[model_roi] - scaled)
        if gap > LEVEL_TOLERANCE_GY:
            warn(warnings, f"{name} ({gy:g} Gy, {scaled:.1f} Gy after scaling) is {gap:.1f} Gy from the nearest "
                           f"trained level ({model_roi}, {model_levels[model_roi]:g} Gy); it is treated as "
                           f"{model_roi}, so the dose around it is predicted for that level.")
        if not lo - 1e-6 <= gy <= hi + 1e-6:
            warn(warnings, f"{name} is prescribed {gy:g} Gy, outside the trained range {lo:g}-{hi:g} Gy; its "
                           f"dose is predicted by scaling a {top_model:g} Gy plan by {1 / scale:.3f}.")
        targets.setdefault(model_roi, []).append(name)
    return PrescriptionMap(dict(levels), targets, scale, dict(source or {}), warnings)


def model_structures(structures: Mapping[str, Volume], pm: PrescriptionMap,
                     mapping: Mapping[str, str | None] | None = None
                     ) -> tuple[dict[str, Volume], dict[str, str | None]]:
    """The structures with each model target made from its plan targets (united when several),
    and a mapping that names them, so the name matcher cannot take another structure instead."""
    out = {n: v for n, v in structures.items() if n not in pm.levels}
    mapping = {k: v for k, v in (mapping or {}).items() if k not in TARGETS}
    for roi in TARGETS:
        names = pm.targets.get(roi, [])
        if len(names) <= 1:
            mapping[roi] = names[0] if names else None
            out.update({n: structures[n] for n in names})
            continue
        first = structures[names[0]]
        union = np.zeros(first.array.shape, bool)
        for n in names:
            if structures[n].array.shape != first.array.shape:
                raise DoseDiffError(f"Targets {names[0]!r} and {n!r} lie on different grids.",
                                    "Export the structures on the CT grid.")
            union |= structures[n].array != 0
        key = f"{roi} (from {' + '.join(names)})"
        out[key] = first.with_array(union.astype(np.uint8))
        mapping[roi] = key
    return out, mapping
