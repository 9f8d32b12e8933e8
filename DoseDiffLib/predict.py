"""From a CT and its structures to a dose volume on the CT grid.

inputs (CT + structures, checked) -> model grid (cropped to the body, in-plane
resampled to the model's spacing) -> conditions -> DDIM, slice batches -> dose in Gy
-> the card's slice-noise filter along z and plan normalisation -> back on the CT grid,
zero outside the body.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import numpy as np
import torch
from scipy import ndimage

from .conditions import STACK_ROIS, SliceStack, assemble, gather, mirror_view, neighbours, slice_stack
from .config import (BODY_THRESHOLD_HU, HU_MIN_SPAN, HU_NORMALISED_LIMIT, HU_UNRESCALED_MAX, POSSIBLE_DOSE,
                     MAX_Z_SMOOTHING_MM, SAMPLERS, TARGET_SLAB_MARGIN_MM, TARGETS, ModelConfig,
                     SamplerConfig)
from .diffusion import Diffusion
from .errors import Cancelled, DoseDiffError, warn
from .mmfnet import Ensemble, MMFNet, TwoStage
from .normalisation import WARN_FRACTION, primary_target, require_target, scale_to_level
from .openkbp import OpenKBPPatient
from .prescription import PrescriptionMap, map_prescriptions, model_structures, target_levels
from .rois import BODY, match_rois, plausibility_warnings, unmatched_targets
from .runtime import batch_size_for, network_dtype, precision_name
from .volume import IDENTITY, Grid, Volume, resample, resample_mask, to_axial


# progress(done, total, message) -> False to cancel
Progress = Callable[[int, int, str], "bool | None"]


@dataclass
class ModelInputs:
    """One case on the model's grid, and what is needed to return to the CT grid."""

    ct: Volume                       # HU, model grid
    masks: dict[str, Volume]         # model ROI names + possible_dose_mask, model grid
    ct_grid: Grid                    # the CT reoriented to axial LPS
    body_on_ct: np.ndarray           # where dose may be non-zero, on ct_grid
    resampled: bool
    matched: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    output_grid: Grid | None = None  # the CT as given, when its orientation differed
    body_on_output: np.ndarray | None = None  # the body on output_grid, so no dose leaves it there
    prescription: PrescriptionMap | None = None  # the plan's targets on the model's levels, and the factor

    @property
    def scale(self) -> float:
        """Dose as the model sees it = plan dose x scale (1 when the plan is on the model's levels)."""
        return self.prescription.scale if self.prescription else 1.0


@dataclass
class Prediction:
    dose: Volume                     # Gy on the CT grid
    std: Volume | None               # per-voxel standard deviation over samples, Gy
    info: dict


def check_ct(ct: Volume) -> None:
    """Refuse CTs that would silently give a wrong dose."""
    a = ct.array
    if not np.isfinite(a).all():
        n = int((~np.isfinite(a)).sum())
        raise DoseDiffError(f"The CT has {n} NaN or infinite voxels.",
                            "Re-export the CT; fill missing voxels with -1000 HU (air) if they are padding.")
    if a.shape[0] < 2:
        raise DoseDiffError(f"The CT has {a.shape[0]} slice; a dose needs the patient's 3-D anatomy.",
                            "Give the whole planning CT.")
    lo, hi = float(a.min()), float(a.max())
    if hi <= HU_NORMALISED_LIMIT and lo >= -HU_NORMALISED_LIMIT and hi > lo:  # before the constant test: a [0, 1] image spans less than 50
        raise DoseDiffError(f"The CT looks normalised ({lo:g} to {hi:g}), not in HU.",
                            "Give the original CT in Hounsfield units.")
    if hi - lo < HU_MIN_SPAN:
        raise DoseDiffError(f"The CT is nearly constant ({lo:g} to {hi:g}).", "Check that this is the planning CT.")
    if lo >= -HU_NORMALISED_LIMIT and hi > HU_UNRESCALED_MAX:
        raise DoseDiffError(
            f"The CT is not in Hounsfield units: values run from {lo:g} to {hi:g}, with no air near -1000 "
            "(typical of stored values without the DICOM rescale, or of HU+1024 data).",
            "Apply the rescale slope/intercept (usually -1024) when exporting the CT, or subtract 1024.")


def body_from_ct(ct: Volume, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Body contour by thresholding: the largest connected component, holes filled per slice."""
    fg = ct.array > threshold_hu
    fg = ndimage.binary_opening(fg, iterations=1)
    lab, n = ndimage.label(fg)
    if n == 0:
        raise DoseDiffError(f"No body found in the CT above {threshold_hu:g} HU.",
                            "Give a BODY/External structure.")
    sizes = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
    body = lab == (1 + int(np.argmax(sizes)))
    for k in range(body.shape[0]):
        if body[k].any():
            body[k] = ndimage.binary_fill_holes(body[k])
    return body.astype(np.uint8)


def _structures_on_ct(ct: Volume, structures: Mapping[str, Volume], warnings: list[str]) -> dict[str, Volume]:
    out = {}
    for name, mask in structures.items():
        mask = to_axial(mask, is_label=True)
        if mask.grid.close_to(ct.grid):
            out[name] = Volume.on_grid((mask.array != 0).astype(np.uint8), ct.grid)
            continue
        before = float((mask.array != 0).sum()) * mask.grid.voxel_volume_mm3()
        on_ct = resample_mask(mask, ct.grid)
        after = float(on_ct.array.sum()) * ct.grid.voxel_volume_mm3()
        if before > 0 and after == 0:
            raise DoseDiffError(f"Structure {name!r} lies entirely outside the CT.",
                                "Check that the structures belong to this CT (same patient, same frame of reference).")
        warn(warnings, f"Structure {name!r} was on another grid; resampled to the CT grid "
                        f"({before / 1000:.1f} -> {after / 1000:.1f} cm3).")
        if before > 0 and after < 0.95 * before:
            warn(warnings, f"Structure {name!r} extends beyond the CT: {100 * (1 - after / before):.0f}% "
                            "of its volume is outside the image.")
        out[name] = on_ct
    return out


def _select_rois(masks: Mapping[str, Volume], cfg: ModelConfig, mapping: Mapping[str, str | None] | None,
                 warnings: list[str]) -> tuple[dict[str, Volume], dict[str, str]]:
    """Match names, then refuse missing targets and warn about missing organs."""
    wanted = list(cfg.conditions.rois)
    matched = match_rois(masks.keys(), wanted, mapping)
    for n in unmatched_targets(masks.keys(), matched):
        warn(warnings, f"Structure {n!r} looks like a target but matches none of the model's "
                        f"targets ({', '.join(t for t, _ in cfg.conditions.ptv_weights)}); it is ignored. "
                        "Map it in a mapping file only if its prescription really corresponds.")
    chosen: dict[str, Volume] = {}
    for roi, name in matched.items():
        if not masks[name].array.any():
            warn(warnings, f"Structure {name!r} ({roi}) is empty; treated as absent.")
            continue
        chosen[roi] = masks[name]
    targets = [t for t, _ in cfg.conditions.ptv_weights]
    if not any(t in chosen for t in targets):
        raise DoseDiffError(
            f"No target found: none of the structures ({', '.join(masks) or 'none'}) is a non-empty "
            f"{'/'.join(targets)}.",
            'Name the targets PTV70/PTV63/PTV56 (e.g. "PTV_70", "PTV 70Gy") or give a mapping file '
            '{"PTV70": "<your name>"}.')
    for roi in cfg.conditions.required:
        if roi not in chosen:
            raise DoseDiffError(f"The model requires {roi}, which is missing or empty.",
                                f'Add the structure or map it: {{"{roi}": "<your name>"}}.')
    for roi in wanted:
        if roi not in chosen and roi not in cfg.conditions.required:
            warn(warnings, f"{roi} not found; its channels are zero (the model was trained with absent organs "
                            "this way, but the dose near it is then unconstrained).")
    return chosen, matched


def model_grid(ct: Volume, body: np.ndarray, cfg: ModelConfig, warnings: list[str]) -> Grid:
    """An axial grid of image_size^2 pixels centred on the body, at the model's spacing."""
    n = cfg.net.image_size
    sx, sy = ct.spacing[:2]
    if ct.grid.shape[1:] == (n, n) and np.allclose(ct.direction, IDENTITY, atol=1e-6) and abs(sx - sy) < 1e-3 \
            and cfg.grid.min_spacing_mm <= sx <= cfg.grid.max_spacing_mm:
        return ct.grid  # already a grid like the training data's (OpenKBP as DICOM): no interpolation
    k, j, i = np.nonzero(body)
    pts = ct.grid.physical(np.array([[i.min(), j.min(), 0], [i.max(), j.max(), 0]], float))
    lo, hi = pts.min(0), pts.max(0)
    extent = float((hi - lo)[:2].max()) + 2 * max(ct.spacing[:2])
    s = max(cfg.grid.spacing_mm, extent / (n - 4))
    if s > cfg.grid.max_spacing_mm:
        warn(warnings, f"The body is {extent / 10:.0f} cm wide: the model grid is coarsened to {s:.2f} mm, "
                        f"outside the training range ({cfg.grid.min_spacing_mm}-{cfg.grid.max_spacing_mm} mm).")
    centre = (lo + hi) / 2
    origin = (centre[0] - (n - 1) / 2 * s, centre[1] - (n - 1) / 2 * s, ct.origin[2])
    return Grid((ct.grid.shape[0], n, n), (s, s, ct.spacing[2]), origin, IDENTITY)


def _targets_by_prescription(structures: Mapping[str, Volume], mapping: Mapping[str, str | None] | None,
                             prescriptions: Mapping[str, float] | None, plan_levels: Mapping[str, float] | None,
                             warnings: list[str]):
    """Targets placed on the model's levels from their prescriptions (given, the RTPLAN's, or in
    their names), unless the mapping file places them itself or the names are the model's own
    levels (PTV70/63/56: a missing PTV70 is then a missing structure, not a 63 Gy plan)."""
    mapped_targets = [k for k in (mapping or {}) if k in TARGETS]
    if mapped_targets and prescriptions:
        raise DoseDiffError(f"Both a mapping of {', '.join(mapped_targets)} and --prescription are given.",
                            "Map targets by prescription (--prescription NAME=GY) or by the mapping file, not both.")
    if mapped_targets:
        return dict(structures), mapping, None
    levels, source = target_levels(structures, prescriptions, plan_levels)
    if not levels or (set(source.values()) == {"name"} and set(levels.values()) <= set(TARGETS.values())):
        return dict(structures), mapping, None  # named on the model's own levels: matched by name, as trained
    pm = map_prescriptions(levels, source)
    warnings += pm.warnings
    structures, mapping = model_structures(structures, pm, mapping)
    return structures, mapping, pm


def prepare_case(ct: Volume, structures: Mapping[str, Volume], cfg: ModelConfig,
                 mapping: Mapping[str, str | None] | None = None, prescriptions: Mapping[str, float] | None = None,
                 plan_levels: Mapping[str, float] | None = None) -> ModelInputs:
    """Check a clinical CT and structures and put them on the model's grid.

    prescriptions (NAME -> Gy, from the user) and plan_levels (from the RTPLAN) place the
    targets on the model's dose levels; the prediction is scaled back (prescription.py).
    """
    warnings: list[str] = []
    given_ct, given = ct, ct.grid
    ct = to_axial(ct)
    check_ct(ct)
    structures, mapping, pm = _targets_by_prescription(structures, mapping, prescriptions, plan_levels, warnings)
    on_ct = _structures_on_ct(ct, structures, warnings)
    chosen, matched = _select_rois(on_ct, cfg, mapping, warnings)
    body_name = match_rois(on_ct.keys(), [BODY], {k: v for k, v in (mapping or {}).items() if k == BODY}).get(BODY)
    if body_name and on_ct[body_name].array.any():
        body = on_ct[body_name].array.astype(np.uint8)
        matched[BODY] = body_name
    else:
        body = body_from_ct(ct)
        warn(warnings, f"No BODY/External structure: body contour thresholded from the CT at {BODY_THRESHOLD_HU:g} HU.")
    plausibility_warnings(ct.array, body, {r: m.array for r, m in chosen.items()},
                          [t for t, _ in cfg.conditions.ptv_weights], warnings)
    for roi, m in chosen.items():
        if (m.array & ~body.astype(bool)).sum() > 0.05 * m.array.sum():
            warn(warnings, f"{roi} lies partly outside the body contour; dose there is set to zero.")
    grid = model_grid(ct, body, cfg, warnings)
    ct_m = resample(ct, grid, "linear", default=-1024.0)
    masks_m = {roi: resample_mask(m, grid) for roi, m in chosen.items()}
    masks_m[POSSIBLE_DOSE] = resample_mask(ct.with_array(body), grid)
    if given == ct.grid:
        return ModelInputs(ct_m, masks_m, ct.grid, body, True, matched, warnings, prescription=pm)
    return ModelInputs(ct_m, masks_m, ct.grid, body, True, matched, warnings, given,
                       _body_on(given, given_ct, structures.get(body_name) if BODY in matched else None), pm)


def _body_on(grid: Grid, ct: Volume, body: Volume | None) -> np.ndarray:
    """The body on the CT's own (oblique) grid: the structure where given, else thresholded.

    Resampling the dose from the axial grid reaches past the body there, so the dose is
    masked again on this grid (exact where the structure already lies on it, as in Slicer).
    """
    if body is None:
        return body_from_ct(ct)
    return body.array if body.grid.close_to(grid) else resample_mask(body, grid).array


def prepare_openkbp(patient: OpenKBPPatient, cfg: ModelConfig) -> ModelInputs:
    """OpenKBP patients already lie on the model's grid; no resampling."""
    if patient.ct.array.shape[1:] != (cfg.net.image_size,) * 2:
        raise DoseDiffError(f"The model takes {cfg.net.image_size} px slices; OpenKBP slices are 128 px.",
                            "Use a model trained on OpenKBP-sized slices.")
    warnings: list[str] = []
    check_ct(patient.ct)
    chosen, matched = _select_rois(patient.masks, cfg, None, warnings)
    masks = dict(chosen)
    masks[POSSIBLE_DOSE] = patient.possible_dose
    return ModelInputs(patient.ct, masks, patient.ct.grid, patient.possible_dose.array, False, matched, warnings)


def _network(model: MMFNet, device: torch.device, dtype: torch.dtype, x, t, ct, cond) -> torch.Tensor:
    """One network call, autocast to `dtype` unless fp32 (the sampler's arithmetic stays fp32)."""
    if dtype != torch.float32:
        with torch.autocast(device.type, dtype=dtype):
            return model(x, t, ct, cond).float()
    return model(x, t, ct, cond)


def stage1_dose(model: MMFNet, first: ModelConfig, stack: SliceStack, rows: np.ndarray, offsets: tuple[int, ...],
                seed: int, device: torch.device | str, batch_size: int | None,
                progress: Progress | None, precision: str = "auto") -> np.ndarray:
    """(N, H, W) a first stage's dose, by its own card's sampler, on the rows given and their
    neighbours at `offsets`; -1 (0 Gy) elsewhere and wherever no dose is possible, as in training."""
    need = np.unique(np.concatenate([rows, neighbours(len(stack.slices), rows, offsets).ravel()]))
    _, smp = resolve_sampler(first)
    report = None if progress is None else (lambda i, n, msg: progress(i, n, f"Stage 1: {msg}"))
    out = np.full(stack.ct.shape, -1.0, np.float32)
    out[need] = sample_dose(model, first, stack, need, smp, seed, device, batch_size, report,
                            precision).mean(0)
    return np.where(stack.psdm[:, STACK_ROIS.index(POSSIBLE_DOSE)] > 0, out, -1.0).astype(np.float32)


def sample_dose(model: MMFNet | TwoStage | Ensemble, cfg: ModelConfig, stack: SliceStack, rows: np.ndarray,
                sampler: SamplerConfig, seed: int = 0, device: torch.device | str = "cpu",
                batch_size: int | None = None, progress: Progress | None = None,
                precision: str = "auto") -> np.ndarray:
    """DDIM samples for some rows of a slice stack, in network units, shape (samples, B, H, W).

    Each sample's noise is drawn for the whole volume at once from seed + sample index,
    so a slice's result depends neither on the batch size nor on which other slices run.
    `sampler.flip` averages each sample with the sample of the left-right mirrored
    patient (the parotid channels swapped with it), run from the mirrored noise. A
    refiner's stack gets its first stage's dose first, unless it already has one (training),
    and its output has the card's share (stage1_weight) of that dose averaged in. An
    ensemble's is its networks' outputs weighted by their shares. `precision` is the
    network's (runtime.network_dtype).
    """
    rows = np.asarray(rows, np.int64)
    if cfg.partners:
        return _ensemble_dose(model, cfg, stack, rows, sampler, seed, device, batch_size, progress, precision)
    if cfg.stage1 is not None and stack.stage1 is None:
        if not isinstance(model, TwoStage):
            raise ValueError("a refiner needs its first stage (a TwoStage model) or a stack with its dose")
        stack = replace(stack, stage1=stage1_dose(model.stage1, cfg.stage1, stack, rows, cfg.conditions.context_offsets,
                                                  seed, device, batch_size, progress, precision))
    device = torch.device(device)
    amp = network_dtype(device, precision)
    diffusion = Diffusion(cfg.diffusion)
    n, h, w = stack.ct.shape
    batch = batch_size or batch_size_for(cfg.net, device, dtype=amp)
    out = np.full((sampler.samples, len(rows), h, w), -1.0, np.float32)
    views = 2 if sampler.flip else 1
    total, done = sampler.samples * views * -(-len(rows) // batch) * sampler.steps, 0

    def tick(_i: int, _n: int) -> None:
        nonlocal done
        done += 1
        if progress is not None and progress(done, total, f"DDIM step {done}/{total}") is False:
            raise Cancelled("prediction cancelled")

    param_dtype = next(model.parameters()).dtype
    model.to(memory_format=torch.channels_last)  # 2x faster convolutions on CPU, same numbers
    z_noise = int(stack.slices.max()) + 1 if len(stack.slices) else 0
    with torch.inference_mode():
        for s in range(sampler.samples):
            g = torch.Generator().manual_seed(int(seed) + s)
            noise = torch.randn((z_noise, 1, h, w), generator=g)[torch.from_numpy(stack.slices[rows])]
            for b0 in range(0, len(rows), batch):
                ct_t, cond_t = assemble(*gather(stack.ct, stack.psdm, rows[b0:b0 + batch], cfg, stack.stage1), cfg)
                acc = None
                for view in range(views):
                    c, k, x_T = ct_t, cond_t, noise[b0:b0 + batch]
                    if view:
                        (c, k), x_T = mirror_view(c, k, cfg), x_T.flip(-1)
                    c = c.to(device, param_dtype, memory_format=torch.channels_last)
                    k = k.to(device, param_dtype, memory_format=torch.channels_last)
                    x = diffusion.ddim_sample(lambda x, t: _network(model, device, amp, x, t, c, k), x_T.shape,
                                              steps=sampler.steps, eta=sampler.eta, generator=g, device=device,
                                              dtype=param_dtype, x_T=x_T, spacing=sampler.spacing,
                                              on_step=tick)[:, 0].float().cpu()
                    x = x.flip(-1) if view else x
                    acc = x if acc is None else acc + x
                out[s, b0:b0 + batch] = (acc / views).numpy()
    w = cfg.diffusion.stage1_weight
    if w:  # two predictors whose errors differ: their average is closer than either (README, refine)
        out = (1 - w) * out + w * stack.stage1[rows][None]
    return out


def _ensemble_dose(model: Ensemble, cfg: ModelConfig, stack: SliceStack, rows: np.ndarray, sampler: SamplerConfig,
                   seed: int, device: torch.device | str, batch_size: int | None,
                   progress: Progress | None, precision: str) -> np.ndarray:
    """Each network from the same noise, on its own input channels; shares average them in
    network units, so the z filter and the Gy conversion see one dose, as for one network."""
    if not isinstance(model, Ensemble):
        raise ValueError("an ensemble's configuration needs its networks (an Ensemble model)")
    shares = (1.0 - sum(cfg.diffusion.partner_weights),) + tuple(cfg.diffusion.partner_weights)
    members = [(model.net, cfg.alone())] + list(zip(model.partners, cfg.partners))
    out = None
    for i, ((net, member), share) in enumerate(zip(members, shares)):
        report = None if progress is None else (
            lambda done, total, msg, i=i: progress(i * total + done, len(members) * total,
                                                   f"Network {i + 1}/{len(members)}: {msg}"))
        x = share * sample_dose(net, member, stack, rows, sampler, seed, device, batch_size, report, precision)
        out = x if out is None else out + x
    return out


def dose_rows(stack: SliceStack, cfg: ModelConfig, slice_mm: float) -> np.ndarray:
    """Rows of the stack worth predicting: within the margin of a slice holding a target."""
    pos = [STACK_ROIS.index(n) for n, _ in cfg.conditions.ptv_weights]
    target = (stack.psdm[:, pos] > 0).reshape(len(stack.slices), -1).any(axis=1)
    rows = np.arange(len(stack.slices))
    if not target.any():
        return rows
    z = stack.slices * slice_mm
    dist = np.abs(z[:, None] - z[target][None, :]).min(axis=1)
    return rows[dist <= TARGET_SLAB_MARGIN_MM]


def resolve_sampler(cfg: ModelConfig, sampler: str | None = None, steps: int | None = None,
                    samples: int | None = None, flip: bool | None = None,
                    z_smoothing_mm: float | None = None, normalise: bool | None = None) -> tuple[str, SamplerConfig]:
    """A named sampler (default: the one the model card was validated with), with the card's
    mirror averaging, slice-noise filter and plan normalisation, and overrides."""
    name = sampler or cfg.diffusion.sampler
    if name not in SAMPLERS:
        raise DoseDiffError(f"Unknown sampler {name!r}.", f"Choose one of: {', '.join(SAMPLERS)}.")
    if normalise and not cfg.diffusion.target_mean_gy:
        raise DoseDiffError("This model card has no normalisation level (its training plans' mean dose in the "
                            "primary target).", "Predict without --normalise, or retrain with --set normalise=True.")
    changes = {k: v for k, v in (("steps", steps), ("samples", samples), ("flip", flip),
                                 ("z_smoothing_mm", z_smoothing_mm)) if v is not None}
    if normalise is False:
        changes["target_mean_gy"] = 0.0
    card = {"flip": SAMPLERS[name].flip or bool(cfg.diffusion.flip),
            "z_smoothing_mm": float(cfg.diffusion.z_smoothing_mm),
            "target_mean_gy": float(cfg.diffusion.target_mean_gy)}
    chosen = replace(SAMPLERS[name], **{**card, **changes})
    if chosen.samples < 1 or not 1 <= chosen.steps <= cfg.diffusion.timesteps:
        raise DoseDiffError(f"Steps must be 1 to {cfg.diffusion.timesteps} and samples at least 1 "
                            f"(got {chosen.steps} steps, {chosen.samples} samples).")
    if not 0.0 <= chosen.z_smoothing_mm <= MAX_Z_SMOOTHING_MM:
        raise DoseDiffError(f"The z smoothing must be 0 to {MAX_Z_SMOOTHING_MM:g} mm "
                            f"(got {chosen.z_smoothing_mm:g} mm).",
                            "Use the model card's value (leave it unset), or 0 to turn it off.")
    return name, chosen


def smooth_along_z(gy: np.ndarray, weight: np.ndarray, keep: np.ndarray, sigma_mm: float,
                   slice_mm: float) -> np.ndarray:
    """Gaussian filter of doses (samples, z, y, x) along z, normalised within `weight`,
    unchanged where `keep` is set or `weight` is not.

    Slices are predicted one by one, so their errors are partly independent: the
    prediction's second difference along z is larger than the clinical plans' (README,
    "Slice noise"). Normalising by the filtered weight keeps the dose at the edges of the
    body and of the predicted slab, where a plain filter would mix in zeros. Targets keep
    their dose: their coverage and hot spots are scored and planned to a plateau.
    """
    if sigma_mm <= 0:
        return gy
    sigma = sigma_mm / slice_mm
    w = weight.astype(np.float32)
    norm = ndimage.gaussian_filter1d(w, sigma, axis=0, mode="nearest")
    filt = ndimage.gaussian_filter1d(gy * w[None], sigma, axis=1, mode="nearest")
    change = (w > 0) & ~keep.astype(bool)
    return np.where(change[None], filt / np.maximum(norm, 1e-12)[None], gy).astype(gy.dtype)


def _predicted_region(possible_dose: np.ndarray, slices: np.ndarray) -> np.ndarray:
    """Where the network predicted: the possible-dose mask on the predicted slices."""
    region = np.zeros(possible_dose.shape, bool)
    region[slices] = possible_dose[slices] > 0
    return region


def _target_region(masks: Mapping[str, Volume], cfg: ModelConfig) -> np.ndarray:
    """The union of the model's target volumes on the model grid."""
    shape = masks[POSSIBLE_DOSE].array.shape
    region = np.zeros(shape, bool)
    for name, _ in cfg.conditions.ptv_weights:
        if name in masks:
            region |= masks[name].array > 0
    return region


def samples_in_gy(x: np.ndarray, inputs: ModelInputs, cfg: ModelConfig, sampler: SamplerConfig,
                  slices: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Samples in network units (samples, z, y, x) on the model grid -> Gy at the given
    prescription, zero outside the possible dose, with the sampler's z filter and plan
    normalisation; and each sample's normalisation factor (1 without)."""
    pdm = inputs.masks[POSSIBLE_DOSE].array
    gy = cfg.norm.gy(x) * pdm[None].astype(np.float32) / inputs.scale
    gy = smooth_along_z(gy, _predicted_region(pdm, slices), _target_region(inputs.masks, cfg),
                        sampler.z_smoothing_mm, inputs.ct.spacing[2])
    if not sampler.target_mean_gy:
        return gy, [1.0] * len(gy)
    target = inputs.masks[primary_target(cfg)].array > 0
    return scale_to_level(gy, target, sampler.target_mean_gy / inputs.scale)


def predict_case(inputs: ModelInputs, model: MMFNet | TwoStage | Ensemble, cfg: ModelConfig, steps: int | None = None,
                 samples: int | None = None, seed: int | None = None, device: torch.device | str = "cpu",
                 batch_size: int | None = None, with_std: bool = False, progress: Progress | None = None,
                 sampler: str | None = None, flip: bool | None = None,
                 z_smoothing_mm: float | None = None, precision: str = "auto",
                 normalise: bool | None = None) -> Prediction:
    name, smp = resolve_sampler(cfg, sampler, steps, samples, flip, z_smoothing_mm, normalise)
    dtype = network_dtype(torch.device(device), precision)  # a wrong choice fails before any work
    if batch_size is not None and batch_size < 1:
        raise DoseDiffError(f"The batch size must be at least 1 (got {batch_size}).")
    if smp.target_mean_gy:
        require_target(inputs.masks[primary_target(cfg)].array > 0)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    t0 = time.perf_counter()
    stack = slice_stack(inputs.ct, inputs.masks, cfg)
    pdm = inputs.masks[POSSIBLE_DOSE].array
    rows = dose_rows(stack, cfg, inputs.ct.spacing[2])
    slices = stack.slices[rows]
    t1 = time.perf_counter()
    x = np.full((smp.samples,) + pdm.shape, -1.0, np.float32)
    x[:, slices] = sample_dose(model, cfg, stack, rows, smp, seed, device, batch_size, progress=progress,
                                   precision=precision)
    t2 = time.perf_counter()
    gy, factors = samples_in_gy(x, inputs, cfg, smp, slices)
    warnings = list(inputs.warnings)
    off = max(factors, key=lambda f: abs(f - 1.0))
    if abs(off - 1.0) > WARN_FRACTION:
        level = smp.target_mean_gy / inputs.scale
        warn(warnings, f"The network put the mean dose in {primary_target(cfg)} at {level / off:.1f} Gy, "
                       f"{100 * (1 / off - 1):+.0f} % from the {level:.1f} Gy the training plans were normalised "
                       "to; the whole dose was scaled to that level. Check the targets' contours and "
                       "prescriptions (the command line's --no-normalise shows the unscaled prediction).")
    mean = gy.mean(0)
    std = gy.std(0) if (with_std and smp.samples > 1) else None
    dose = _to_ct_grid(inputs, mean)
    std_v = _to_ct_grid(inputs, std) if std is not None else None
    info = {"seed": seed, "sampler": name, "steps": smp.steps, "samples": smp.samples, "flip": smp.flip,
            "z_smoothing_mm": smp.z_smoothing_mm, "timestep_spacing": smp.spacing,
            "target_mean_gy": smp.target_mean_gy, "normalisation_factors": [round(f, 4) for f in factors],
            "stage1_weight": cfg.diffusion.stage1_weight, "partner_weights": list(cfg.diffusion.partner_weights),
            "slices_predicted": int(len(slices)),
            "device": str(device), "precision": precision_name(dtype),
            "seconds_conditions": round(t1 - t0, 3),
            "seconds_sampling": round(t2 - t1, 3), "matched_rois": inputs.matched,
            "warnings": warnings, "model_grid_spacing_mm": list(inputs.ct.spacing),
            "prescription": inputs.prescription.describe() if inputs.prescription else "targets matched by name",
            "prescription_scale": inputs.scale}
    return Prediction(dose, std_v, info)


def _to_ct_grid(inputs: ModelInputs, arr: np.ndarray) -> Volume:
    on_model = inputs.ct.with_array(arr.astype(np.float32))
    if inputs.resampled:
        on_ct = resample(on_model, inputs.ct_grid, "linear", default=0.0).array
    else:
        on_ct = on_model.array
    out = Volume.on_grid((on_ct * (inputs.body_on_ct > 0)).astype(np.float32), inputs.ct_grid)
    if inputs.output_grid is not None:  # the CT as given: exact for flips, interpolated when oblique
        out = resample(out, inputs.output_grid, "linear", default=0.0)
        body = resample_mask(Volume.on_grid(inputs.body_on_ct, inputs.ct_grid), inputs.output_grid)
        out = out.with_array(out.array * body.array)  # interpolation must not spill dose out of the body
        out = out.with_array(out.array * (inputs.body_on_output > 0))
    return out
