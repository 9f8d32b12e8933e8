"""Network inputs: every channel against what it means, on asymmetric data."""
import numpy as np
import pytest
import torch

from DoseDiffLib.conditions import (assemble, beam_directions, beam_hits, beam_lines, beams_via, gather,
                                    mirror_channels, mirror_view, neighbours, slice_stack)
from DoseDiffLib.config import OARS, POSSIBLE_DOSE, ConditionConfig, ModelConfig
from DoseDiffLib.losses import sorted_dose_l1
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.psdm import psdm
from DoseDiffLib.volume import Volume

CFG = ModelConfig.preset("test").with_conditions(ConditionConfig(context=2, beam_targets=("PTV70", "PTV56")))


def one_pixel(n=33, r=10, c=20):
    t = torch.zeros(1, 1, n, n, dtype=torch.bool)
    t[0, 0, r, c] = True
    return t


def test_a_vertical_beam_line_is_the_targets_column_and_a_horizontal_one_its_row():
    t = one_pixel()
    vertical = beam_lines(beam_hits(t, torch.tensor([[[0.0, 1.0]]])))[0, 0]
    horizontal = beam_lines(beam_hits(t, torch.tensor([[[1.0, 0.0]]])))[0, 0]
    assert torch.equal(vertical.nonzero()[:, 1].unique(), torch.tensor([20])) and vertical[:, 20].all()
    assert torch.equal(horizontal.nonzero()[:, 0].unique(), torch.tensor([10])) and horizontal[10].all()


def test_a_diagonal_beam_line_runs_along_the_diagonal_through_the_target():
    t = one_pixel()
    d = torch.tensor([[[2 ** -0.5, 2 ** -0.5]]])
    m = beam_lines(beam_hits(t, d))[0, 0]
    r, c = m.nonzero().T
    assert torch.all((c - r) == 10)                    # the line x - y = 20 - 10 and nothing else
    assert m[0, 10] == 1 and m[22, 32] == 1


def test_nine_openkbp_beams_count_how_many_lines_reach_the_target():
    t = one_pixel(65, 32, 32)
    m = beam_lines(beam_hits(t, beam_directions(CFG, 1)))[0, 0]
    assert m[32, 32] == 1.0                            # every line through the target itself
    assert m[0, 32] == pytest.approx(1 / 9)             # straight above: only the 0-degree line
    assert m[32, 0] == 0.0                              # 90 degrees lies between 80 and 100: none
    assert m[0, 0] == 0.0


def test_every_channel_means_what_its_name_says():
    ct, masks = head_and_neck(shape=(12, 32, 32), spacing=(4.0, 4.0, 3.0))
    m = {k: v for k, v in masks.items() if k != "BODY"}
    m[POSSIBLE_DOSE] = masks["BODY"]
    stack = slice_stack(ct, m, CFG)
    rows = np.arange(len(stack.slices))
    c, k = assemble(*gather(stack.ct, stack.psdm, rows, CFG), CFG)
    names = CFG.conditions.channel_names()
    assert k.shape[1] == len(names) == CFG.net.cond_channels and c.shape[1] == CFG.net.ct_channels == 5
    sl = stack.slices
    ptv = sum(w * m[n].array[sl] for n, w in CFG.conditions.ptv_weights if n in m)
    np.testing.assert_allclose(k[:, 0].numpy(), ptv, atol=1e-6)
    np.testing.assert_array_equal(k[:, names.index("mask:LeftParotid")].numpy(), m["LeftParotid"].array[sl])
    np.testing.assert_allclose(k[:, names.index("psdm:SpinalCord")].numpy(), psdm(m["SpinalCord"]).array[sl],
                               atol=1e-6)
    # context: row i's "@-1" channel is row i-1's PTV image, the first row repeating itself
    prev = k[:, names.index("PTV weighted@-1")].numpy()
    np.testing.assert_allclose(prev[1:], ptv[:-1], atol=1e-6)
    np.testing.assert_allclose(prev[0], ptv[0], atol=1e-6)
    np.testing.assert_allclose(k[:, names.index("PTV weighted@+2")].numpy()[:-2], ptv[2:], atol=1e-6)
    np.testing.assert_array_equal(c[:, CFG.conditions.ct_channel_names().index("CT@+1")].numpy()[:-1],
                                  CFG.norm.ct(ct.array[sl][1:].astype(np.float32)))
    beams = k[:, names.index("beams:PTV70")]
    assert torch.all(beams[torch.from_numpy(m["PTV70"].array[sl] > 0)] == 1)
    assert 0 < beams.mean() < 1


def test_neighbours_repeat_the_ends_of_the_stack():
    np.testing.assert_array_equal(neighbours(5, np.array([0, 4]), (-1, 1, -2, 2)), [[0, 1, 0, 2], [3, 4, 2, 4]])


def phantom_and_mirror_inputs(cfg):
    """The network inputs of the phantom and of its left-right mirror image (parotids relabelled)."""
    ct, masks = head_and_neck(shape=(10, 32, 32), spacing=(4.0, 4.0, 3.0))
    m = {k: v for k, v in masks.items() if k != "BODY"}
    m[POSSIBLE_DOSE] = masks["BODY"]
    mirrored = {n: Volume.on_grid(v.array[..., ::-1].copy(), v.grid) for n, v in m.items()}
    mirrored["RightParotid"], mirrored["LeftParotid"] = mirrored["LeftParotid"], mirrored["RightParotid"]
    ct_m = Volume.on_grid(ct.array[..., ::-1].copy(), ct.grid)
    a = assemble(*gather(*(lambda s: (s.ct, s.psdm))(slice_stack(ct, m, cfg)), np.arange(10), cfg), cfg)
    b = assemble(*gather(*(lambda s: (s.ct, s.psdm))(slice_stack(ct_m, mirrored, cfg)), np.arange(10), cfg), cfg)
    return a, b


def test_mirroring_the_patient_permutes_the_channels_it_should():
    """The flip test-time augmentation: the mirrored patient's inputs, parotids relabelled."""
    a, b = phantom_and_mirror_inputs(CFG)
    pc, pk = mirror_channels(CFG)
    assert pk != list(range(len(pk)))                   # the parotid channels do move
    torch.testing.assert_close(a[0][:, pc].flip(-1), b[0])
    torch.testing.assert_close(a[1][:, pk].flip(-1), b[1], atol=1e-5, rtol=0)


def test_sorted_dose_l1_is_zero_for_a_reordering_and_the_shift_for_a_shift():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 1, 8, 8, generator=g)
    roi = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    roi[:, 0, 2:6, 2:6] = True
    roi[:, 1, 0, :3] = True
    permuted = ref.clone()
    permuted[:, :, 2:6, 2:6] = ref[:, :, 2:6, 2:6].flip(-1)
    assert sorted_dose_l1(permuted, ref, roi[:, :1]).item() == pytest.approx(0.0, abs=1e-7)
    assert sorted_dose_l1(ref + 0.3, ref, roi).item() == pytest.approx(0.3, abs=1e-6)
    # one pixel raised by 1.6 in a 16-pixel ROI: a mean error of 0.1 there, none in the other
    bumped = ref.clone()
    bumped[:, :, 3, 3] += 1.6
    assert sorted_dose_l1(bumped, ref, roi[:, :1]).item() == pytest.approx(0.1, abs=1e-6)
    # ROIs under min_pixels are left out
    assert sorted_dose_l1(ref + 0.3, ref, roi[:, 1:], min_pixels=4).item() == 0.0


def water_disk(n=65, radius=25.0):
    c = np.arange(n) + 0.5 - n / 2
    y, x = np.meshgrid(c, c, indexing="ij")
    return torch.from_numpy((x ** 2 + y ** 2 <= radius ** 2).astype(np.float32))[None], x, y


@pytest.mark.parametrize("deg", [0.0, 40.0, 200.0, 280.0])
def test_beam_depth_in_a_water_disk_is_the_chord_back_to_where_the_beam_entered(deg):
    """Inside a disk of water of radius R, a beam travelling along d reaches q at depth d.q + sqrt(R^2 - (e.q)^2)."""
    from DoseDiffLib.conditions import beam_depths

    disk, x, y = water_disk()
    a = np.radians(deg)
    d = np.array([np.sin(a), np.cos(a)])
    e = np.array([d[1], -d[0]])
    depth = beam_depths(disk, torch.from_numpy(np.array([[d]], np.float32)), pixel_mm=2.0)[0, 0].numpy()
    along, across = x * d[0] + y * d[1], x * e[0] + y * e[1]
    inner = x ** 2 + y ** 2 <= 20.0 ** 2
    want = (along + np.sqrt(np.clip(25.0 ** 2 - across ** 2, 0, None))) * 2.0
    np.testing.assert_allclose(depth[inner], want[inner], atol=2 * 2.0)   # within the disk edge's two pixels
    assert np.corrcoef(depth[inner], want[inner])[0, 1] > 0.999


def test_attenuated_beams_fade_with_depth_and_without_attenuation_are_the_beam_lines():
    from dataclasses import replace

    from DoseDiffLib.conditions import attenuated_beams

    disk, _, _ = water_disk()
    ct = CFG.norm.ct(torch.where(disk > 0, 0.0, -1024.0))               # water in air, normalised
    target = one_pixel(65, 32, 32)
    down = torch.tensor([[[0.0, 1.0]]])                                # enters at the top (row 0)
    flat = replace(CFG, conditions=replace(CFG.conditions, beam_mu_per_mm=0.0))
    hits = beam_hits(target, down)
    torch.testing.assert_close(attenuated_beams(hits, ct, down, flat), beam_lines(hits))
    mu = 0.0045
    faded = attenuated_beams(hits, ct, down, replace(CFG, conditions=replace(CFG.conditions, beam_mu_per_mm=mu)))
    column = faded[0, 0, :, 32].numpy()
    inside = slice(10, 55)
    assert np.all(np.diff(column[inside]) < 0)                          # deeper, fainter
    ratio = column[40] / column[20]                                     # 20 pixels of water further on
    assert ratio == pytest.approx(np.exp(-mu * 20 * CFG.grid.spacing_mm), rel=1e-3)
    assert column[2] == pytest.approx(1.0, abs=1e-6)                    # air in front of the disk: no fade
    assert faded[0, 0, :, 0].max() == 0                                 # off the beam line: nothing


def test_mirroring_keeps_the_attenuated_beams_in_place():
    """The nine OpenKBP beams are symmetric left-right, so their faded lines mirror with the patient."""
    from dataclasses import replace

    cfg = CFG.with_conditions(replace(CFG.conditions, beam_mu_per_mm=0.0045))
    (_, a), (_, b) = phantom_and_mirror_inputs(cfg)
    names = cfg.conditions.channel_names()
    i = names.index("beams attenuated:PTV70")
    assert a[:, i].max() > 0 and a[:, i].max() < 1
    torch.testing.assert_close(a[:, mirror_channels(cfg)[1]].flip(-1), b, atol=1e-4, rtol=0)


def test_beams_via_an_organ_count_the_lines_that_cross_both_the_target_and_the_organ():
    """Target at the centre, organ 22 pixels straight above it: only the 0-degree line joins them."""
    n = 65
    target, organ = one_pixel(n, 32, 32), one_pixel(n, 10, 32)
    d = beam_directions(CFG, 1)
    via = beams_via(beam_hits(target, d), beam_hits(organ, d))[0, 0]
    lines = beam_lines(beam_hits(target, d))[0, 0]
    for r in (0, 10, 32, 50, 64):                       # all along that line, beyond either end too
        assert via[r, 32] == pytest.approx(1 / 9)
    assert lines[32, 32] == 1 and via[32, 32] == pytest.approx(1 / 9)   # 8 lines through the target miss the organ
    assert via[10, 0] == 0 and via[47, 45] == 0 and lines[47, 45] > 0   # the organ's or the target's other lines
    assert torch.all(via <= lines)                       # a subset of the target's lines, pixel by pixel
    assert int((via > 0).sum()) == n                     # exactly one column
    # two organs stacked: their channels are per organ
    both = torch.cat([organ, one_pixel(n, 60, 32)], 1)
    two = beams_via(beam_hits(target, d), beam_hits(both, d))[0]
    torch.testing.assert_close(two[0], two[1])


def test_beams_via_the_organs_follow_the_names_and_mirror_with_the_parotids():
    from dataclasses import replace

    cfg = CFG.with_conditions(replace(CFG.conditions, beam_oars=OARS))
    names = cfg.conditions.channel_names()
    assert names[-len(OARS):] == [f"beams via:{o}" for o in OARS] and cfg.net.cond_channels == len(names)
    (_, a), (_, b) = phantom_and_mirror_inputs(cfg)
    perm = mirror_channels(cfg)[1]
    i, j = names.index("beams via:RightParotid"), names.index("beams via:LeftParotid")
    assert perm[i] == j and perm[j] == i
    assert a[:, names.index("beams via:SpinalCord")].max() > 0
    torch.testing.assert_close(a[:, perm].flip(-1), b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="beam_targets"):
        ModelConfig.preset("test").with_conditions(ConditionConfig(beam_oars=("SpinalCord",)))


def test_the_mirror_flag_is_the_last_channel_and_the_mirrored_view_is_what_training_sees():
    """Prediction's mirrored view of a patient equals the inputs training assembles for the
    mirrored patient with the flag set: the network meets that view only as it was taught."""
    from dataclasses import replace

    cfg = CFG.with_conditions(replace(CFG.conditions, beam_mu_per_mm=0.0045, beam_oars=OARS, mirror_flag=True))
    names = cfg.conditions.channel_names()
    assert names[-1] == "mirrored" and len(names) == CFG.conditions.n_channels + len(OARS) + 2 + 1
    assert cfg.net.cond_channels == len(names)
    (ct, own), (ct_m, mirrored) = phantom_and_mirror_inputs(cfg)
    assert torch.all(own[:, -1] == 0) and torch.all(mirrored[:, -1] == 0)   # assembled without a flag: the patient
    view_ct, view = mirror_view(ct, own, cfg)
    assert torch.all(view[:, -1] == 1)
    torch.testing.assert_close(view_ct, ct_m)
    torch.testing.assert_close(view[:, :-1], mirrored[:, :-1], atol=1e-4, rtol=0)
    back_ct, back = mirror_view(view_ct, view, cfg)                         # mirroring twice: the patient again
    assert torch.equal(back_ct, ct) and torch.equal(back, own)
    # training's flag: per slice, a constant plane of 1 where the slice was mirrored
    ct_vol, masks = head_and_neck(shape=(10, 32, 32), spacing=(4.0, 4.0, 3.0))
    masks[POSSIBLE_DOSE] = masks.pop("BODY")
    s = slice_stack(ct_vol, masks, cfg)
    flags = torch.tensor([True, False, True])
    _, k = assemble(*gather(s.ct, s.psdm, np.array([2, 4, 6]), cfg), cfg, mirrored=flags)
    assert torch.equal(k[:, -1], flags.float()[:, None, None].expand(-1, 32, 32))
    _, plain = assemble(*gather(s.ct, s.psdm, np.array([2, 4, 6]), CFG), CFG)   # no flag: no channel
    assert plain.shape[1] == k.shape[1] - len(OARS) - 2 - 1
