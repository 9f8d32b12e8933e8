"""Shared fixtures: a small phantom case, a random tiny model, one real OpenKBP patient."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from DoseDiffLib.config import ModelConfig
from DoseDiffLib.mmfnet import MMFNet
from DoseDiffLib.modelcard import save_model
from DoseDiffLib.phantom import head_and_neck

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "openkbp"


@pytest.fixture(scope="session")
def test_card(tmp_path_factory) -> Path:
    """A random 'test'-preset model (32 px slices) with its card, whose dose depends on its inputs.

    Freshly built networks zero their output layer (and residual branches), so their
    dose ignores the inputs and a wrong channel, normalisation or label would pass
    unnoticed; every parameter is drawn at random instead.
    """
    import torch

    from dataclasses import replace

    torch.manual_seed(0)
    cfg = ModelConfig.preset("test")
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, sampler="regression"))  # one call: fast tests
    net = MMFNet(cfg.net)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("model") / "test.json"
    save_model(net, cfg, path, half=False)
    return path


@pytest.fixture(scope="session")
def tiny_card(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    save_model(MMFNet(cfg.net), cfg, path)
    return path


@pytest.fixture()
def phantom():
    """A coarse phantom: 24 slices of 64 x 64 at 3.2 x 3.2 x 3 mm."""
    return head_and_neck(shape=(24, 64, 64), spacing=(3.2, 3.2, 3.0))


@pytest.fixture(scope="session")
def openkbp_patient(tmp_path_factory) -> Path:
    """pt_201 of the OpenKBP validation split, unpacked from shared/ (or DOSEDIFF_OPENKBP)."""
    env = os.environ.get("DOSEDIFF_OPENKBP")
    if env and (Path(env) / "pt_201").exists():
        return Path(env) / "pt_201"
    archive = SHARED / "validation-pats.tar.xz"
    if not archive.exists():
        pytest.skip(f"OpenKBP data not found at {archive}")
    out = tmp_path_factory.mktemp("openkbp")
    with tarfile.open(archive, "r:xz") as tar:
        members = [m for m in tar.getmembers() if "/pt_201/" in m.name or m.name.endswith("pt_201")]
        tar.extractall(out, members=members, filter="data")
    found = next(out.rglob("pt_201"))
    return found
