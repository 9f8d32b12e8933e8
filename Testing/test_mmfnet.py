"""MMFNet structure: the paper's size, the fusion wiring, shapes and zero-initialised output."""
import pytest
import torch

from DoseDiffLib.config import PRESETS, ModelConfig
from DoseDiffLib.mmfnet import FusionFormer, MMFNet, count_parameters


def test_paper_preset_matches_the_authors_parameter_count():
    with torch.device("meta"):
        model = MMFNet(ModelConfig.preset("paper").net)
    n = count_parameters(model)
    assert n == pytest.approx(179.2e6, rel=0.01)
    # separate encoders of identical shape for the dose and CT (one input channel each)
    assert count_parameters(model.enc_dose) == count_parameters(model.enc_ct)
    assert model.enc_dose is not model.enc_ct


@pytest.mark.parametrize("name", ["tiny", "test"])
def test_output_shape_and_zero_init(name):
    cfg = ModelConfig.preset(name).net
    model = MMFNet(cfg).eval()
    s = cfg.image_size
    x = torch.randn(3, 1, s, s)
    out = model(x, torch.tensor([0, 500, 999]), torch.randn(3, 1, s, s), torch.randn(3, cfg.cond_channels, s, s))
    assert out.shape == (3, 1, s, s)
    assert torch.count_nonzero(out) == 0  # zero-initialised last conv, as the authors


def test_condition_channel_count_comes_from_the_condition_list():
    cfg = ModelConfig.preset("tiny")
    assert cfg.net.cond_channels == cfg.conditions.n_channels == 20
    names = cfg.conditions.channel_names()
    assert names[0] == "PTV weighted" and names[8] == "mask:possible_dose_mask" and names[-1] == "psdm:PTV56"


def test_fusion_patches_round_trip_and_each_token_is_one_quadrant():
    f = FusionFormer(PRESETS["test"])
    c = PRESETS["test"].base_channels * PRESETS["test"].channel_mult[-1]
    side = f.side
    x = torch.randn(2, c, side, side)
    assert torch.equal(f._image(f._tokens(x), c), x)
    x = torch.zeros(1, c, side, side)
    x[:, :, side // 2:, :side // 2] = 1  # bottom-left quadrant: row 1, column 0
    tokens = f._tokens(x)
    assert tokens.shape == (1, 4, c * (side // 2) ** 2)
    assert [bool(t.any()) for t in tokens[0]] == [False, False, True, False]


def test_every_stream_influences_the_output():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("test").net
    model = MMFNet(cfg)
    for p in model.parameters():  # undo zero init so gradients flow everywhere
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.02)
    s = cfg.image_size
    x, ct, cond = (torch.randn(1, c, s, s, requires_grad=True) for c in (1, 1, cfg.cond_channels))
    model(x, torch.tensor([10]), ct, cond).sum().backward()
    for t in (x, ct, cond):
        assert t.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_on_channels_last_memory_gives_the_plain_result_and_gradient(dtype):
    """The bf16 CPU path transposes to channels-first and back (a speed-up): values, gradients
    and the memory layout the next convolution reads must be those of nn.GroupNorm."""
    from DoseDiffLib.mmfnet import group_norm

    torch.manual_seed(0)
    norm = group_norm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    plain = torch.nn.GroupNorm(norm.num_groups, 16)
    plain.load_state_dict(norm.state_dict())
    x = (torch.randn(2, 16, 12, 10) * 3 + torch.arange(16.0)[:, None, None]).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = norm(a), plain(b)
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)
    want.backward(grad)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out.float(), want.float(), atol=tol, rtol=tol)
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
    assert torch.allclose(norm.weight.grad, plain.weight.grad, atol=10 * tol, rtol=tol)
    # against float64 arithmetic: the group statistics are right, not merely equal to PyTorch's
    ref = torch.nn.functional.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double())
    assert torch.allclose(out.double(), ref, atol=4 * tol, rtol=tol)
    with torch.inference_mode():  # prediction: the plain kernel, bit for bit
        assert torch.equal(norm(x), plain(x))
