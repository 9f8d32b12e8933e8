"""Physical signed distance maps (paper eq. 9 with the voxel spacing).

Value = distance to the nearest voxel on the other side of the ROI surface, in
decimetres: positive inside, negative outside, unclipped, so a voxel's value means the
same physical distance on every scanner grid. An absent ROI gives an all-zero map, as in
the authors' code.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .volume import Volume

MM_PER_UNIT = 100.0  # decimetres


def signed_distance_mm(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Signed Euclidean distance in mm between voxel centres, + inside, - outside."""
    inside = mask.astype(bool)
    if not inside.any():
        return np.zeros(mask.shape, np.float32)
    if inside.all():
        raise ValueError("ROI fills the whole volume; its surface is outside the image")
    # The inside distance only needs the ROI's bounding box grown by one voxel: the
    # nearest background voxel of any inside voxel lies in it (clamping a point onto
    # the box shortens every coordinate difference), so the result is exact.
    idx = np.nonzero(inside)
    box = tuple(slice(max(int(a.min()) - 1, 0), int(a.max()) + 2) for a in idx)
    out = -ndimage.distance_transform_edt(~inside, sampling=spacing_zyx).astype(np.float32)
    out[box] += ndimage.distance_transform_edt(inside[box], sampling=spacing_zyx).astype(np.float32)
    return out


def psdm(mask: Volume) -> Volume:
    """PSDM of a mask volume on its own (axis-aligned) grid, in decimetres."""
    spacing_zyx = tuple(mask.spacing[::-1])
    return mask.with_array(signed_distance_mm(mask.array, spacing_zyx) / MM_PER_UNIT)
