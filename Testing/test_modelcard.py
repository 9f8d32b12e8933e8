"""Model cards: round trip, checksum and card/weights mismatches are errors."""
import json

import pytest
import torch

from DoseDiffLib.config import ModelConfig
from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.mmfnet import MMFNet
from DoseDiffLib.modelcard import load_model, read_card, save_model


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig.preset("test")
    model = MMFNet(cfg.net)
    path = save_model(model, cfg, tmp_path / "m.json", {"validation": {"dose_score": 9.9}}, half=False)
    return path, model


def test_round_trip(saved):
    path, model = saved
    loaded, cfg, card = load_model(path)
    assert cfg == ModelConfig.preset("test")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert card["validation"]["dose_score"] == 9.9
    assert card["condition_channels"][0] == "PTV weighted"
    assert "not a treatment planning system" in card["intended_use"]
    assert "70/63/56 Gy" in card["training_data"] and "9-field" in card["training_data"]


def test_fp16_weights_are_small_and_load_as_fp32(tmp_path):
    cfg = ModelConfig.preset("test")
    path = save_model(MMFNet(cfg.net), cfg, tmp_path / "h.json", half=True)
    model, _, card = load_model(path)
    assert card["weights"]["dtype"] == "float16"
    assert next(model.parameters()).dtype == torch.float32


def test_checksum_failure(saved):
    path, _ = saved
    w = path.with_suffix(".safetensors")
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(DoseDiffError, match="fail the checksum"):
        load_model(path)


def test_channel_count_mismatch_in_card(saved):
    path, _ = saved
    card = json.loads(path.read_text())
    card["config"]["conditions"]["masks"] = card["config"]["conditions"]["masks"][:-1]
    path.write_text(json.dumps(card))
    with pytest.raises(DoseDiffError, match="1 CT and 20 condition channels but its input description has 1 and 19"):
        load_model(path)


def test_weights_of_another_network(saved, tmp_path):
    path, _ = saved
    card = json.loads(path.read_text())
    card["config"]["net"]["base_channels"] = 16
    path.write_text(json.dumps(card))
    with pytest.raises(DoseDiffError, match="do not match the network in their card"):
        load_model(path)


def test_missing_card_and_weights(tmp_path, saved):
    with pytest.raises(DoseDiffError, match="not found"):
        read_card(tmp_path / "none.json")
    path, _ = saved
    path.with_suffix(".safetensors").unlink()
    with pytest.raises(DoseDiffError, match="missing"):
        load_model(path)
