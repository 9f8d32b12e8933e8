"""A synthetic head-and-neck phantom: the embedded default case and a test fixture.

Anatomy is placed in physical LPS millimetres (x to the patient's left, y posterior,
z superior) around the volume centre, so any grid gives the same patient. It is
deliberately asymmetric (the primary target on the patient's right) so orientation
errors show.
"""
from __future__ import annotations

import numpy as np

from .volume import Grid, Volume


def _ellipsoid(x, y, z, c, r) -> np.ndarray:
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


def _cylinder(x, y, z, c, r, z_lo, z_hi) -> np.ndarray:
    return (((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 <= 1.0) & (z >= z_lo) & (z <= z_hi)


def head_and_neck(shape: tuple[int, int, int] = (96, 256, 256),
                  spacing: tuple[float, float, float] = (1.95, 1.95, 3.0),
                  origin: tuple[float, float, float] | None = None,
                  seed: int = 0) -> tuple[Volume, dict[str, Volume]]:
    """CT in HU and a dict of structure masks (BODY, targets, organs at risk).

    shape is (z, y, x); spacing and origin are (x, y, z) mm. The default grid covers
    50 x 50 x 29 cm; the body is about 16 x 20 cm in-plane and 29 cm long.
    """
    nz, ny, nx = shape
    if origin is None:
        origin = tuple(-(n - 1) / 2 * s for n, s in zip((nx, ny, nz), spacing))
    grid = Grid(shape, spacing, origin)
    z = origin[2] + spacing[2] * np.arange(nz)[:, None, None]
    y = origin[1] + spacing[1] * np.arange(ny)[None, :, None]
    x = origin[0] + spacing[0] * np.arange(nx)[None, None, :]
    zext = (nz - 1) * spacing[2] / 2

    body = _cylinder(x, y, z, (0, 0), (78, 100), -zext, zext) | _ellipsoid(x, y, z, (0, 0, zext), (78, 100, 40))
    vertebra = _cylinder(x, y, z, (0, 45), (14, 14), -zext, zext * 0.7)
    cord = _cylinder(x, y, z, (0, 45), (5, 5), -zext, zext * 0.45)
    brainstem = _cylinder(x, y, z, (0, 40), (10, 10), zext * 0.45, zext * 0.85)
    ring = ((x / 55) ** 2 + ((y + 20) / 65) ** 2 <= 1) & ((x / 45) ** 2 + ((y + 20) / 55) ** 2 > 1)
    mandible = ring & (y < -20) & (z > 0.05 * zext) & (z < 0.35 * zext)
    parotid_r = _ellipsoid(x, y, z, (-48, 5, 0.4 * zext), (13, 20, 22))
    parotid_l = _ellipsoid(x, y, z, (48, 5, 0.4 * zext), (13, 20, 22))
    larynx = _cylinder(x, y, z, (0, -45), (14, 12), -0.6 * zext, -0.1 * zext)
    esophagus = _cylinder(x, y, z, (0, 20), (8, 6), -zext, -0.15 * zext)
    ptv70 = _ellipsoid(x, y, z, (-22, -15, 0.1 * zext), (22, 20, 30)) & body
    nodes = _ellipsoid(x, y, z, (-35, 10, -0.2 * zext), (16, 18, 40)) | _ellipsoid(x, y, z, (35, 10, -0.2 * zext), (14, 16, 35))
    ptv56 = (nodes | _ellipsoid(x, y, z, (-22, -15, 0.1 * zext), (32, 30, 42))) & body & ~ptv70

    rng = np.random.default_rng(seed)
    ct = np.full(shape, -1000.0, np.float32)
    ct[body] = 30.0
    ct[body & (((x / 70) ** 2 + (y / 92) ** 2) > 1)] = -90.0  # subcutaneous fat
    ct[mandible | (vertebra & ~cord)] = 800.0
    ct[larynx & _cylinder(x, y, z, (0, -45), (6, 5), -zext, zext)] = -950.0  # airway
    ct += rng.normal(0.0, 8.0, shape).astype(np.float32)
    ct[~body] = -1000.0 + rng.normal(0.0, 3.0, int((~body).sum())).astype(np.float32)

    masks = {"BODY": body, "PTV70": ptv70, "PTV56": ptv56, "SpinalCord": cord, "Brainstem": brainstem,
             "Mandible": mandible, "RightParotid": parotid_r, "LeftParotid": parotid_l, "Larynx": larynx,
             "Esophagus": esophagus}
    return (Volume.on_grid(ct, grid),
            {k: Volume.on_grid(v.astype(np.uint8), grid) for k, v in masks.items()})
