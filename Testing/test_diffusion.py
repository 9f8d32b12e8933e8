"""DDIM and schedule algebra against closed forms."""
import math

import pytest
import torch

from DoseDiffLib.config import DiffusionConfig
from DoseDiffLib.diffusion import Diffusion


def test_linear_schedule_end_points():
    d = Diffusion()
    assert d.betas[0].item() == pytest.approx(1e-4)
    assert d.betas[-1].item() == pytest.approx(0.02)
    assert d.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    # closed form of the product
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert d.alpha_bar[-1].item() == pytest.approx(expected, rel=1e-9)


def test_ddim_timesteps_match_the_authors_spacing():
    d = Diffusion()
    assert d.ddim_timesteps(8) == [875, 750, 625, 500, 375, 250, 125, 0]
    assert d.ddim_timesteps(1) == [0]
    with pytest.raises(ValueError):
        d.ddim_timesteps(0)


def test_trailing_spacing_starts_from_pure_noise():
    d = Diffusion(DiffusionConfig())
    assert d.ddim_timesteps(8, "trailing") == [999, 874, 749, 624, 499, 374, 249, 124]
    assert d.ddim_timesteps(1, "trailing") == [999]
    assert d.ddim_timesteps(1000, "trailing") == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="spacing"):
        d.ddim_timesteps(8, "middle")


def test_the_named_samplers_are_the_regression_read_out_and_the_authors_ddim():
    from DoseDiffLib.config import SAMPLERS

    d = Diffusion(DiffusionConfig())
    r, a = SAMPLERS["regression"], SAMPLERS["ddim"]
    assert d.ddim_timesteps(r.steps, r.spacing) == [999] and r.samples == 1 and not r.flip
    assert d.ddim_timesteps(a.steps, a.spacing) == [875, 750, 625, 500, 375, 250, 125, 0]
    assert a.eta == 0.0 and a.samples > 1 and a.flip


def test_one_trailing_step_of_x0_prediction_is_one_network_call_at_the_last_step():
    """The regression read-out: the clamped network output at t = T-1, nothing added."""
    d = Diffusion(DiffusionConfig(prediction="x0"))
    seen = []

    def fn(x, t):
        seen.append(t.tolist())
        return 0.7 * torch.ones_like(x) + 0.5 * (torch.arange(x.shape[-1]) > 1)
    out = d.ddim_sample(fn, (2, 1, 1, 4), steps=1, spacing="trailing", generator=torch.Generator().manual_seed(0))
    assert seen == [[999, 999]]
    assert torch.allclose(out, torch.tensor([0.7, 0.7, 1.0, 1.0]).expand(2, 1, 1, 4))


def test_last_step_fraction_draws_that_share_at_t_max():
    d = Diffusion(DiffusionConfig(prediction="x0"))
    x0 = torch.zeros((4000, 1, 1, 1))
    ts = []

    def fn(x, t):
        ts.append(t)
        return x
    d.loss(fn, x0, generator=torch.Generator().manual_seed(0), last_step_fraction=0.5)
    share = (ts[0] == 999).float().mean().item()
    assert share == pytest.approx(0.5 + 0.5 / 1000, abs=0.03)
    d.loss(fn, x0, generator=torch.Generator().manual_seed(0))
    assert (ts[1] == 999).float().mean().item() < 0.01 and ts[1].min() < 50


def _oracle(d: Diffusion, x0: torch.Tensor):
    """A perfect network: recovers the target from x_t knowing x0."""
    def fn(x_t, t):
        ab = d.alpha_bar[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return d.target(x0, t, eps)
    return fn


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("steps", [1, 8, 50])
def test_ddim_with_oracle_returns_x0(prediction, steps):
    d = Diffusion(DiffusionConfig(prediction=prediction))
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand((2, 1, 8, 8), generator=g, dtype=torch.float64) * 2 - 1
    out = d.ddim_sample(_oracle(d, x0), x0.shape, steps=steps, eta=0.0, generator=g, dtype=torch.float64)
    assert torch.allclose(out, x0, atol=1e-5)


def test_ddim_with_eta_still_lands_on_x0_for_an_oracle():
    d = Diffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((1, 1, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    out = d.ddim_sample(_oracle(d, x0), x0.shape, steps=8, eta=1.0, generator=g, dtype=torch.float64)
    assert torch.allclose(out, x0, atol=1e-5)


def test_one_ddim_step_matches_equation_12():
    """x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps for eta = 0."""
    d = Diffusion()
    x_t = torch.full((1, 1, 2, 2), 0.3, dtype=torch.float64)
    eps_const = 0.2
    ab_t, ab_prev = d.alpha_bar[500].item(), d.alpha_bar[0].item()
    x0 = (0.3 - math.sqrt(1 - ab_t) * eps_const) / math.sqrt(ab_t)
    x0c = max(-1.0, min(1.0, x0))
    eps_c = (0.3 - math.sqrt(ab_t) * x0c) / math.sqrt(1 - ab_t)
    expected = math.sqrt(ab_prev) * x0c + math.sqrt(1 - ab_prev) * eps_c
    # two steps: 500 -> 0, then 0 -> final (x0 at t=0)
    seen = []

    def fn(x, t):
        seen.append(int(t[0]))
        return torch.full_like(x, eps_const)
    d2 = Diffusion()
    d2.ddim_timesteps = lambda s, spacing="leading": [500, 0]
    out = d2.ddim_sample(fn, x_t.shape, steps=2, x_T=x_t, dtype=torch.float64, clamp=True)
    assert seen == [500, 0]
    # the last step returns its clamped x0 from the state after the first step
    ab0 = d.alpha_bar[0].item()
    x0_last = (expected - math.sqrt(1 - ab0) * eps_const) / math.sqrt(ab0)
    assert out[0, 0, 0, 0].item() == pytest.approx(max(-1, min(1, x0_last)), abs=1e-9)


def test_q_sample_closed_form_and_target_consistency():
    d = Diffusion(DiffusionConfig(prediction="v"))
    x0 = torch.tensor([[[[0.5]]]], dtype=torch.float64)
    eps = torch.tensor([[[[-1.0]]]], dtype=torch.float64)
    t = torch.tensor([300])
    ab = d.alpha_bar[300].item()
    x_t = d.q_sample(x0, t, eps)
    assert x_t.item() == pytest.approx(math.sqrt(ab) * 0.5 - math.sqrt(1 - ab))
    x0_back, eps_back = d.split(d.target(x0, t, eps), x_t, t)
    assert x0_back.item() == pytest.approx(0.5) and eps_back.item() == pytest.approx(-1.0)


def test_same_seed_same_sample_different_seed_different():
    d = Diffusion()
    fn = lambda x, t: 0.5 * x  # noqa: E731
    a = d.ddim_sample(fn, (1, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    b = d.ddim_sample(fn, (1, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    c = d.ddim_sample(fn, (1, 1, 4, 4), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_loss_is_zero_for_an_oracle():
    d = Diffusion()
    x0 = torch.rand((4, 1, 8, 8)) * 2 - 1
    g = torch.Generator().manual_seed(0)
    seen = {}

    def fn(x_t, t):
        ab = d.alpha_bar[t].float().reshape(-1, 1, 1, 1)
        seen["t"] = t
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    assert d.loss(fn, x0, generator=g).item() < 1e-8
    assert seen["t"].min() >= 0 and seen["t"].max() < 1000


@pytest.mark.parametrize("kind,expected", [("mse", 0.09), ("l1", 0.3)])
def test_loss_kinds_and_weights_against_closed_forms(kind, expected):
    """x0-prediction off by 0.3 inside a region and by 2.0 outside: the weight decides what counts."""
    d = Diffusion(DiffusionConfig(prediction="x0"))
    x0 = torch.zeros((2, 1, 8, 8))
    inside = torch.zeros_like(x0, dtype=torch.bool)
    inside[..., 2:6, 2:6] = True
    fn = lambda x_t, t: x0 + torch.where(inside, 0.3, 2.0)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    masked = d.loss(fn, x0, generator=g, kind=kind, weight=inside.float())
    assert masked.item() == pytest.approx(expected, rel=1e-5)
    # outside pixels at a tenth of the weight: (16 * e_in + 0.1 * 48 * e_out) / (16 + 4.8)
    e_out = 4.0 if kind == "mse" else 2.0
    partly = d.loss(fn, x0, generator=g, kind=kind, weight=torch.where(inside, 1.0, 0.1))
    assert partly.item() == pytest.approx((16 * expected + 4.8 * e_out) / 20.8, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        d.loss(fn, x0, kind="huber")
