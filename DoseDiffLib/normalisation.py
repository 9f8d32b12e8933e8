"""Plan normalisation: each predicted dose scaled so that the mean dose in its primary
(highest) target is the level the training plans were normalised to.

A planner normalises every plan, and OpenKBP's training plans show it: of the primary
target's dose statistics its mean varies least from plan to plan (README, "Plan
normalisation"). A network that predicts slice by slice sets that level only as the sum of
its slices' errors: on the validation patients the predicted mean in PTV70 did not correlate
with the plan's. Scaling the whole predicted dose to the training plans' level, as the
planning system would scale the plan, removes that error and keeps the network's shape.
The level comes from the training split alone (`training_level`), so a model trained on a
clinic's plans follows that clinic's normalisation.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .config import TARGETS, ModelConfig
from .errors import DoseDiffError

# a raw prediction this far from the level is reported: the scaling then does real work
WARN_FRACTION = 0.05


def primary_target(cfg: ModelConfig) -> str:
    """The model's highest-level target (PTV70 for OpenKBP models)."""
    return max((n for n, _ in cfg.conditions.ptv_weights), key=lambda n: TARGETS[n])


def target_means(plans: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Mean dose (Gy) in the primary target of each plan from (dose, target mask) pairs; NaN
    for a plan without the target."""
    return np.array([float(dose[mask].mean()) if mask.any() else np.nan for dose, mask in plans])


def training_level(means: np.ndarray) -> float:
    """Median over training plans of the mean dose (Gy, model levels) in the primary target
    (`target_means`). Plans without the target are skipped."""
    means = np.asarray(means, np.float64)
    if not np.isfinite(means).any():
        raise DoseDiffError("No training plan contains the model's primary target, so there is no level to "
                            "normalise predictions to.",
                            "Check the cache's structures, or train with --set normalise=False.")
    return float(np.median(means[np.isfinite(means)]))


def plan_factors(means: np.ndarray, level: float) -> np.ndarray:
    """The factor that puts each plan at the level (1 for a plan without the target): training on
    plans scaled so removes the level's plan-to-plan spread, which no input predicts."""
    means = np.asarray(means, np.float64)
    return np.where(np.isfinite(means), level / np.where(np.isfinite(means), means, 1.0), 1.0)


def require_target(target: np.ndarray) -> None:
    """Refuse, before any sampling, a primary target that vanished on the model grid."""
    if not target.any():
        raise DoseDiffError("The primary target is empty on the model grid, so the dose cannot be normalised.",
                            "Check the target's contour (it may be smaller than a model voxel), or predict with "
                            "--no-normalise.")


def scale_to_level(gy: np.ndarray, target: np.ndarray, level_gy: float) -> tuple[np.ndarray, list[float]]:
    """Doses (samples, z, y, x) each scaled so their mean in `target` is `level_gy`; the factors."""
    require_target(target)
    means = gy[:, target].mean(axis=1, dtype=np.float64)
    if not (means > 0).all():
        raise DoseDiffError("The predicted dose in the primary target is zero, so it cannot be normalised.",
                            "Check the CT and the structures; --no-normalise shows the raw prediction.")
    factors = level_gy / means
    return (gy * factors[:, None, None, None].astype(gy.dtype)), [float(f) for f in factors]
