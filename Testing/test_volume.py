"""Volumes keep their geometry through files, reorientation and resampling."""
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.volume import (Grid, Volume, read_structures, read_volume, resample_mask, to_axial,
                                write_segmentation, write_volume)


def asym_volume():
    arr = np.zeros((6, 8, 10), np.float32)
    arr[1, 2, 7] = 5.0  # one bright voxel, off-centre in every axis
    return Volume(arr, (0.9, 1.1, 3.0), (-10.0, 20.0, 30.0))


def bright_point(vol: Volume) -> np.ndarray:
    k, j, i = np.unravel_index(np.argmax(vol.array), vol.array.shape)
    return vol.grid.physical([i, j, k])[0]


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_round_trip_keeps_values_and_geometry(tmp_path, suffix):
    v = asym_volume()
    path = write_volume(v, tmp_path / f"v{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, v.array)
    np.testing.assert_allclose(back.spacing, v.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, v.origin, atol=1e-5)
    np.testing.assert_allclose(bright_point(back), bright_point(v), atol=1e-5)


def test_flipped_axes_are_reoriented_without_moving_anatomy():
    v = asym_volume()
    img = v.to_sitk()
    flipped = sitk.Flip(img, [True, False, True])  # direction becomes diag(-1, 1, -1)
    fv = Volume.from_sitk(flipped)
    assert fv.direction != v.direction
    axial = to_axial(fv)
    assert np.allclose(axial.direction, np.eye(3).ravel())
    np.testing.assert_allclose(bright_point(axial), bright_point(v), atol=1e-5)
    np.testing.assert_array_equal(axial.array, v.array)


def test_oblique_direction_is_resampled_to_axial_with_a_warning(caplog):
    arr = np.zeros((20, 30, 30), np.float32)
    arr[8:12, 10:20, 18:24] = 100.0
    th = np.radians(20)
    direction = (np.cos(th), -np.sin(th), 0, np.sin(th), np.cos(th), 0, 0, 0, 1)
    v = Volume(arr, (1.0, 1.0, 2.0), (0, 0, 0), direction)
    centre = v.grid.physical(np.argwhere(arr > 0)[:, ::-1].astype(float)).mean(0)
    with caplog.at_level(logging.WARNING):
        out = to_axial(v)
    assert "Oblique" in caplog.text
    assert np.allclose(out.direction, np.eye(3).ravel())
    got = out.grid.physical(np.argwhere(out.array > 50)[:, ::-1].astype(float)).mean(0)
    np.testing.assert_allclose(got, centre, atol=1.0)


def test_segmentation_round_trip_keeps_names_and_overlaps(tmp_path):
    g = Grid((5, 6, 7), (1.0, 1.5, 2.5), (3.0, -4.0, 5.0))
    a = np.zeros(g.shape, np.uint8)
    a[1:3, 1:4, 2:6] = 1
    b = np.zeros(g.shape, np.uint8)
    b[2:4, 2:5, 1:3] = 1  # overlaps a
    masks = {"PTV 70Gy": Volume.on_grid(a, g), "Parotid_L": Volume.on_grid(b, g)}
    path = write_segmentation(masks, tmp_path / "s.seg.nrrd")
    back = read_structures(path)
    assert set(back) == {"PTV 70Gy", "Parotid_L"}
    for k in masks:
        np.testing.assert_array_equal(back[k].array, masks[k].array)
        assert back[k].grid.close_to(g)


def test_mask_folder(tmp_path):
    v = asym_volume()
    write_volume(v.with_array((v.array > 0).astype(np.uint8)), tmp_path / "Cord.nii.gz")
    write_volume(v.with_array(np.ones_like(v.array, np.uint8)), tmp_path / "BODY.nrrd")
    back = read_structures(tmp_path)
    assert set(back) == {"Cord", "BODY"} and back["Cord"].array.sum() == 1


def test_unreadable_and_truncated_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.nrrd"
    bad.write_text("this is not an image")
    with pytest.raises(DoseDiffError, match="unreadable or truncated"):
        read_volume(bad)
    good = write_volume(asym_volume(), tmp_path / "good.mha")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.mha"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DoseDiffError, match="unreadable or truncated"):
        read_volume(trunc)
    with pytest.raises(DoseDiffError, match="not found"):
        read_volume(tmp_path / "missing.nrrd")


def test_existing_output_is_never_overwritten_unless_asked(tmp_path):
    path = tmp_path / "dose.nrrd"
    path.write_bytes(b"precious")
    with pytest.raises(DoseDiffError, match="already exists"):
        write_volume(asym_volume(), path)
    assert path.read_bytes() == b"precious"
    write_volume(asym_volume(), path, overwrite=True)
    assert read_volume(path).array.max() == 5.0


def test_crash_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "dose.nrrd"

    def boom(img, fname, useCompression=True):
        with open(fname, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("disk full")
    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(RuntimeError):
        write_volume(asym_volume(), path)
    assert list(tmp_path.iterdir()) == []


def test_mask_resampling_keeps_volume_on_a_coarser_grid():
    fine = Grid((40, 80, 80), (0.5, 0.5, 1.0))
    z, y, x = np.indices(fine.shape)
    m = (((x - 40) * 0.5) ** 2 + ((y - 38) * 0.5) ** 2 + ((z - 20) * 1.0) ** 2 <= 12 ** 2).astype(np.uint8)
    coarse = Grid((20, 20, 20), (2.0, 2.0, 2.0), (-0.25 + 0.75, -0.25 + 0.75, 0.5))
    out = resample_mask(Volume.on_grid(m, fine), coarse)
    v_fine = m.sum() * 0.25
    v_coarse = out.array.sum() * 8.0
    assert v_coarse == pytest.approx(v_fine, rel=0.1)


def test_written_files_have_ordinary_permissions(tmp_path):
    import os
    import stat

    path = write_volume(asym_volume(), tmp_path / "v.nrrd")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
