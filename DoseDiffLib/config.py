"""The one configuration object: network, conditions, normalisation, schedule, grid.

It is saved inside every model card and read back by training, prediction and the
Slicer module alike, so no setting can differ between training and prediction (the
authors' code shipped a 96-vs-128 channel mismatch that way).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

# The ROIs, named once: organs, targets with their prescriptions (Gy), and every ROI in
# OpenKBP's order (organs, then targets by rising dose), which the training cache keeps.
OARS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
TARGETS = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}
ROIS = OARS + tuple(sorted(TARGETS, key=TARGETS.get))
POSSIBLE_DOSE = "possible_dose_mask"

# Constants measured on the data, named once here rather than in the code that uses them.
# In all 169 OpenKBP training plans no voxel farther than 45 mm (cranio-caudally) from
# the nearest target slice receives 1 Gy; slices beyond 60 mm are not predicted (0 Gy).
TARGET_SLAB_MARGIN_MM = 60.0
# No OpenKBP dose reaches 80 Gy: the network's dose scale and the PSNR/SSIM peak.
PEAK_DOSE_GY = 80.0
# A CT in HU: soft tissue lies above -350 HU (the body threshold), air near -1000. Values
# all within +-10 are a normalised image, a span under 50 HU no image at all, and a
# minimum above -10 with a maximum above 500 stored values without the DICOM rescale.
BODY_THRESHOLD_HU = -350.0
HU_NORMALISED_LIMIT = 10.0
HU_MIN_SPAN = 50.0
HU_UNRESCALED_MAX = 500.0


@dataclass(frozen=True)
class NetConfig:
    """MMFNet size. `paper` reproduces the authors' network (about 179.2 M parameters)."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)
    enc_blocks: int = 2               # decoder uses enc_blocks + 1 per level
    attention_levels: tuple[int, ...] = (4,)
    num_heads: int = 4
    fusion_dim: int = 1024
    fusion_mlp: int = 2048
    fusion_head_dim: int = 64
    fusion_grid: int = 2              # the bottleneck is cut into grid x grid patches
    image_size: int = 128
    ct_channels: int = 1
    cond_channels: int = 20
    out_channels: int = 1
    dropout: float = 0.0
    # residual blocks after the bottleneck's own three layers: capacity added to a trained
    # network at almost no cost (8 x 8 px), grown by warm start (train._warm_start)
    middle_blocks: int = 0


PRESETS: dict[str, NetConfig] = {
    "paper": NetConfig(),
    "small": NetConfig(base_channels=32, fusion_dim=512, fusion_mlp=1024),
    "tiny": NetConfig(base_channels=16, fusion_dim=256, fusion_mlp=512, num_heads=2),
    # Only for fast tests: a 32 px image through three levels.
    "test": NetConfig(base_channels=8, channel_mult=(1, 2, 2), enc_blocks=1, attention_levels=(2,),
                      num_heads=1, fusion_dim=32, fusion_mlp=64, fusion_head_dim=16, image_size=32),
}


@dataclass(frozen=True)
class ConditionConfig:
    """The ordered condition channels, exactly as the network sees them.

    Channel 0 is the PTV image (sum of weight * mask); then a binary mask per entry of
    `masks`; then a PSDM per entry of `psdms`. `possible_dose_mask` is the OpenKBP
    possible-dose region, replaced by the body contour on clinical CTs.
    """

    ptv_weights: tuple[tuple[str, float], ...] = (("PTV70", 1.0), ("PTV63", 0.9), ("PTV56", 0.8))
    masks: tuple[str, ...] = OARS + (POSSIBLE_DOSE,)
    psdms: tuple[str, ...] = OARS + (POSSIBLE_DOSE, "PTV70", "PTV63", "PTV56")
    required: tuple[str, ...] = ("PTV70",)
    # Slices each side whose CT and PTV image join the inputs (2.5-D context); 0 = the
    # authors' single slice. Beyond the first/last slice where dose is possible the
    # nearest such slice repeats, in training and prediction alike.
    context: int = 0
    # Per target: the share of these in-plane beam lines (parallel-beam approximation)
    # through a pixel that cross the target on the same slice. OpenKBP plans are 9
    # equispaced coplanar beams; a line is undirected, so 0, 40, ..., 320 degrees give
    # 9 line orientations 20 degrees apart. Empty = no beam channels.
    beam_targets: tuple[str, ...] = ()
    beam_angles_deg: tuple[float, ...] = (0.0, 40.0, 80.0, 120.0, 160.0, 200.0, 240.0, 280.0, 320.0)
    # > 0: per beam target also the same lines faded by exp(-mu * water-equivalent depth)
    # along each beam's travel direction (angle a travels along (sin a, cos a) in (x, y):
    # 0 degrees enters anteriorly), so a beam's entrance side differs from its exit side.
    # 6 MV loses about 4.5 % per cm beyond the build-up: 0.0045 per mm.
    beam_mu_per_mm: float = 0.0
    # Per OAR: the share of the beam lines through a pixel that cross a beam target and
    # this OAR on the same slice. Inverse planning lowers the fluence of exactly those
    # lines to spare the organ; a line integral is what a small CNN finds hard to learn.
    beam_oars: tuple[str, ...] = ()
    # Predict-and-refine: the dose a first-stage model (ModelConfig.stage1) predicts for
    # the slice and its context slices joins the CT encoder's inputs, in network units,
    # -1 where no dose is possible. It carries the dose's 3-D shape the slices share.
    stage1_dose: bool = False
    # A last channel, 1 where the slice is the left-right mirror of a patient, 0 where it is
    # the patient as imaged. Plans need not be mirror-symmetric (the mirrored view of a network
    # that cannot tell puts the parotids' mean doses off by side, README), so a network told
    # which view it sees could learn both the plan and its mirror image (phase 34, 90 minutes,
    # did not: it became mirror-symmetric instead; README, "Model inputs").
    mirror_flag: bool = False

    @property
    def n_channels(self) -> int:
        return len(self.channel_names())

    @property
    def context_offsets(self) -> tuple[int, ...]:
        """Neighbour offsets in channel order; new channels only ever follow old ones."""
        return tuple(o for k in range(1, self.context + 1) for o in (-k, k))

    @property
    def rois(self) -> tuple[str, ...]:
        names = [n for n, _ in self.ptv_weights] + list(self.masks) + list(self.psdms) + list(self.beam_targets)
        names += list(self.beam_oars)
        return tuple(dict.fromkeys(n for n in names if n != POSSIBLE_DOSE))

    def channel_names(self) -> list[str]:
        return (["PTV weighted"] + [f"mask:{m}" for m in self.masks]
                + [f"psdm:{p}" for p in self.psdms]
                + [f"PTV weighted@{o:+d}" for o in self.context_offsets]
                + [f"beams:{t}" for t in self.beam_targets]
                + [f"beams attenuated:{t}" for t in (self.beam_targets if self.beam_mu_per_mm > 0 else ())]
                + [f"beams via:{o}" for o in self.beam_oars]
                + (["mirrored"] if self.mirror_flag else []))

    def ct_channel_names(self) -> list[str]:
        stage1 = ["stage-1 dose"] + [f"stage-1 dose@{o:+d}" for o in self.context_offsets] if self.stage1_dose else []
        return ["CT"] + [f"CT@{o:+d}" for o in self.context_offsets] + stage1


@dataclass(frozen=True)
class NormConfig:
    """CT HU clip window and dose scale mapped to [-1, 1] (authors' code values)."""

    ct_min_hu: float = -1024.0
    ct_max_hu: float = 1476.0
    dose_max_gy: float = PEAK_DOSE_GY

    def ct(self, hu):
        lo, hi = self.ct_min_hu, self.ct_max_hu
        return (hu.clip(lo, hi) - lo) / (hi - lo) * 2.0 - 1.0

    def hu(self, x):
        """The inverse of `ct` inside the window."""
        return (x + 1.0) / 2.0 * (self.ct_max_hu - self.ct_min_hu) + self.ct_min_hu

    def dose(self, gy):
        return gy.clip(0.0, self.dose_max_gy) / self.dose_max_gy * 2.0 - 1.0

    def gy(self, x):
        return ((x + 1.0) / 2.0 * self.dose_max_gy).clip(0.0, self.dose_max_gy)


# a Gaussian along z wider than this would blur the dose's real fall-off, not slice noise
MAX_Z_SMOOTHING_MM = 10.0


@dataclass(frozen=True)
class SamplerConfig:
    """How a trained network is sampled into a dose."""

    steps: int = 8
    spacing: str = "leading"      # leading: 875, 750, ..., 0 (the authors'); trailing: 999, 874, ..., 124
    samples: int = 1              # independent noise draws, averaged
    flip: bool = False            # also run the left-right mirrored patient and average
    eta: float = 0.0
    z_smoothing_mm: float = 0.0   # Gaussian SD along z outside the targets (README, "Slice noise")
    target_mean_gy: float = 0.0   # each sample scaled to this mean in the primary target (normalisation.py); 0: off


# Named, measured choices (README, "Sampler"). "regression" is one network call at
# t = T-1 from pure noise: the x0 read-out of an x0-prediction model (Lin et al. 2024
# spacing). "ddim" is the paper's sampler: 8 leading DDIM steps, eta 0, here with the
# mean of 4 samples and the mirrored patient, whose spread gives the uncertainty map.
SAMPLERS: dict[str, SamplerConfig] = {
    "regression": SamplerConfig(steps=1, spacing="trailing"),
    "ddim": SamplerConfig(steps=8, spacing="leading", samples=4, flip=True),
}


# the network's arithmetic (runtime.network_dtype): auto picks bf16 where it is native
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "epsilon"   # epsilon | x0 | v
    sampler: str = "ddim"         # the named sampler this model is validated with, its default
    flip: bool = False            # validated with the mirrored patient averaged in, whatever the sampler
    z_smoothing_mm: float = 0.0   # the slice-noise filter this model is validated with (0: none)
    target_mean_gy: float = 0.0   # the training plans' primary-target mean its doses are normalised to (0: none)
    stage1_weight: float = 0.0    # a refiner's output: this share of its first stage's dose averaged in
    partner_weights: tuple[float, ...] = ()  # an ensemble's output: each partner's share (ModelConfig.partners)

    # how a trained network is read out, not what its weights mean: free to differ on a warm start
    SAMPLER_SETTINGS: ClassVar[tuple[str, ...]] = ("sampler", "flip", "z_smoothing_mm", "target_mean_gy",
                                                   "stage1_weight", "partner_weights")


@dataclass(frozen=True)
class GridConfig:
    """The model's in-plane grid for clinical CTs; OpenKBP data already lies on it."""

    spacing_mm: float = 3.906
    max_spacing_mm: float = 5.5     # coarser than this is outside the training range
    min_spacing_mm: float = 3.5


@dataclass(frozen=True)
class ModelConfig:
    net: NetConfig = field(default_factory=NetConfig)
    conditions: ConditionConfig = field(default_factory=ConditionConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    # the first stage of a predict-and-refine pair, whose dose this model reads
    stage1: ModelConfig | None = None
    # An ensemble: networks read out beside this one on the same case (each on its own input
    # channels), each with its share of the dose (diffusion.partner_weights; this network keeps
    # the rest). Networks trained apart err apart, so their average is closer (README, "Ensembles").
    partners: tuple[ModelConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.conditions.stage1_dose != (self.stage1 is not None):
            raise ValueError("a model reads a stage-1 dose exactly when it names its first stage")
        if self.stage1 is not None and self.stage1.stage1 is not None:
            raise ValueError("a first stage cannot itself be a refiner")
        if not 0.0 <= self.diffusion.stage1_weight <= (1.0 if self.stage1 is not None else 0.0):
            raise ValueError("stage1_weight is a share in [0, 1], and only a refiner has a first stage to weigh")
        if self.conditions.beam_oars and not self.conditions.beam_targets:
            raise ValueError("beam_oars counts the lines of the beam targets, so it needs beam_targets")
        self._check_partners()

    def _check_partners(self) -> None:
        shares = self.diffusion.partner_weights
        if len(shares) != len(self.partners):
            raise ValueError(f"an ensemble gives each of its {len(self.partners)} partners a share "
                             f"(got {len(shares)} partner_weights)")
        if not self.partners:
            return
        if not (all(w > 0 for w in shares) and sum(shares) < 1):
            raise ValueError("partner shares must be positive and leave this network a share (sum below 1)")
        if self.stage1 is not None or any(p.stage1 is not None or p.partners for p in self.partners):
            raise ValueError("an ensemble's networks are single networks, not refiners or ensembles")
        targets = [n for n, _ in self.conditions.ptv_weights]
        for p in self.partners:
            if (p.norm, p.grid, p.net.image_size) != (self.norm, self.grid, self.net.image_size):
                raise ValueError("an ensemble's networks must share the dose scale, CT window, grid and image size")
            if ([n for n, _ in p.conditions.ptv_weights] != targets or not set(p.conditions.rois) <= set(self.conditions.rois)
                    or not set(p.conditions.required) <= set(self.conditions.required)):
                raise ValueError("an ensemble's partners must read the targets, structures and required "
                                 "structures of its first network")

    def alone(self) -> "ModelConfig":
        """The first network of an ensemble as a model of its own."""
        return replace(self, partners=(), diffusion=replace(self.diffusion, partner_weights=()))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(net=PRESETS[name]).with_conditions(ConditionConfig())

    def with_conditions(self, cond: ConditionConfig) -> "ModelConfig":
        """The same model with other inputs; the network's input widths follow them."""
        net = replace(self.net, cond_channels=cond.n_channels, ct_channels=len(cond.ct_channel_names()))
        return replace(self, net=net, conditions=cond)

    def with_stage1(self, first: ModelConfig) -> ModelConfig:
        """This model as the refiner of `first`: its CT encoder also reads first's dose."""
        cond = replace(self.conditions, stage1_dose=True)
        net = replace(self.net, ct_channels=len(cond.ct_channel_names()))
        return replace(self, net=net, conditions=cond, stage1=first)

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["stage1"], d["partners"]  # a single network's card keeps its original shape
        if self.stage1 is not None:
            d["stage1"] = self.stage1.to_dict()
        if self.partners:
            d["partners"] = [p.to_dict() for p in self.partners]
        else:
            del d["diffusion"]["partner_weights"]
        return d

    def weights_dict(self) -> dict:
        """The settings trained weights depend on: everything but the sampler's."""
        d = self.to_dict()
        d["diffusion"] = {k: v for k, v in d["diffusion"].items() if k not in DiffusionConfig.SAMPLER_SETTINGS}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        def build(klass, values):
            kw = {}
            for f in fields(klass):
                if f.name not in values:
                    continue
                v = values[f.name]
                if isinstance(v, list):
                    v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
                kw[f.name] = v
            return klass(**kw)

        return cls(net=build(NetConfig, d.get("net", {})),
                   conditions=build(ConditionConfig, d.get("conditions", {})),
                   norm=build(NormConfig, d.get("norm", {})),
                   diffusion=build(DiffusionConfig, d.get("diffusion", {})),
                   grid=build(GridConfig, d.get("grid", {})),
                   stage1=cls.from_dict(d["stage1"]) if d.get("stage1") else None,
                   partners=tuple(cls.from_dict(p) for p in d.get("partners", ())))
