"""PSDM against analytic distances on anisotropic grids."""
import numpy as np
import pytest

from DoseDiffLib.psdm import psdm, signed_distance_mm
from DoseDiffLib.volume import Volume

SPACING_XYZ = (0.9, 0.9, 3.0)


def centres(shape, spacing_xyz):
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing_xyz[::-1])), indexing="ij")
    return x, y, z


def test_box_exact_on_anisotropic_grid():
    shape = (20, 40, 50)
    sz, sy, sx = 3.0, 0.9, 0.9
    mask = np.zeros(shape, bool)
    k0, k1, j0, j1, i0, i1 = 5, 14, 10, 29, 12, 39  # inclusive voxel bounds, off-centre
    mask[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = True
    d = signed_distance_mm(mask, (sz, sy, sx))
    k, j, i = np.indices(shape)
    # inside: nearest outside voxel centre is straight across the nearest face
    inside = np.minimum.reduce([(k - k0 + 1) * sz, (k1 + 1 - k) * sz, (j - j0 + 1) * sy,
                                (j1 + 1 - j) * sy, (i - i0 + 1) * sx, (i1 + 1 - i) * sx])
    # outside: Euclidean distance to the box of inside voxel centres
    dk = np.maximum.reduce([k0 - k, np.zeros(shape), k - k1]) * sz
    dj = np.maximum.reduce([j0 - j, np.zeros(shape), j - j1]) * sy
    di = np.maximum.reduce([i0 - i, np.zeros(shape), i - i1]) * sx
    outside = np.sqrt(dk ** 2 + dj ** 2 + di ** 2)
    expected = np.where(mask, inside, -outside)
    np.testing.assert_allclose(d, expected, atol=1e-4)


def test_sphere_matches_analytic_distance_within_a_voxel():
    shape = (30, 90, 90)
    x, y, z = centres(shape, SPACING_XYZ)
    c = (40.3, 38.7, 44.1)
    r = 20.0
    rho = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    mask = (rho <= r).astype(np.uint8)
    vol = Volume(mask, SPACING_XYZ)
    got = psdm(vol).array * 100.0  # back to mm
    analytic = r - rho
    # voxel-centre distances differ from the continuous surface by at most one voxel step
    err = np.abs(got - analytic)
    near = np.abs(analytic) < 15
    assert err[near].max() <= max(SPACING_XYZ) + 1e-6
    # and on average far less than the coarse slice spacing
    assert err[near].mean() < 0.9
    assert (got[mask == 1] > 0).all() and (got[mask == 0] < 0).all()


def test_units_are_decimetres_and_axis_order_is_respected():
    shape = (11, 11, 11)
    mask = np.zeros(shape, np.uint8)
    mask[5, 5, 5] = 1
    vol = Volume(mask, (1.0, 2.0, 4.0))  # x, y, z
    p = psdm(vol).array
    assert p[5, 5, 8] == pytest.approx(-3 * 1.0 / 100)   # along x
    assert p[5, 8, 5] == pytest.approx(-3 * 2.0 / 100)   # along y
    assert p[8, 5, 5] == pytest.approx(-3 * 4.0 / 100)   # along z (slices)


def test_absent_roi_gives_zeros():
    vol = Volume(np.zeros((4, 5, 6), np.uint8), (1, 1, 1))
    assert not psdm(vol).array.any()


def test_cropped_inside_transform_equals_the_full_one_even_at_the_image_edge():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    mask = ndimage.binary_opening(rng.random((12, 30, 25)) > 0.45, iterations=1)
    mask[:, :4, :] = True  # touches the image edge, as a body cut by the first slices
    sp = (2.5, 1.1, 0.7)
    full = ndimage.distance_transform_edt(mask, sampling=sp) - ndimage.distance_transform_edt(~mask, sampling=sp)
    np.testing.assert_allclose(signed_distance_mm(mask, sp), full, atol=1e-4)
