"""A synthetic T2-like cervical spine with known disc positions.

Why: tests need images whose true disc positions are known exactly (orientation handling,
midsagittal search, file round-trips), the demo command needs an input that ships with the
code, and training gets extra, randomised anatomy beyond the few real subjects.

The phantom is deliberately simple: vertebral bodies (dark) stacked along a lordotic curve with
bright discs between them, a tall C2 with its dens, a dark skull base above, the CSF-filled
canal (bright) with the cord (grey) behind the bodies, posterior elements and soft tissue.
Disc points follow the SCT convention: the posterior tip of each disc on the midsagittal plane.
"""

from __future__ import annotations

import numpy as np

from .. import DISC_VALUES
from .volume import Volume

BODY, DISC, NUCLEUS, CSF, CORD, SOFT, FAT, BONE = 0.42, 0.62, 0.8, 1.0, 0.45, 0.2, 0.55, 0.06


def make_phantom(seed: int = 0, shape=(64, 150, 230), randomize: bool = True,
                 lateral_shift: float = 0.0, lateral_tilt: float = 0.0, noise: float = 0.03):
    """Build a phantom volume (RAS-aligned, 1 mm) and its disc posterior tips.

    Returns ``(volume, discs)`` where ``discs`` maps SCT value (3..8, plus 2 and 9) to RAS mm.
    ``lateral_shift`` (mm) and ``lateral_tilt`` (mm of R per mm of S) move the spine off the
    centre of the field of view, to test the midsagittal search.
    """
    rng = np.random.default_rng(seed)
    u = (lambda lo, hi: rng.uniform(lo, hi)) if randomize else (lambda lo, hi: (lo + hi) / 2)
    nr, na, ns = shape
    r = (np.arange(nr) - (nr - 1) / 2)[:, None, None]
    a = (np.arange(na) - (na - 1) / 2)[None, :, None]
    s = (np.arange(ns) - (ns - 1) / 2)[None, None, :]
    r = r - (lateral_shift + lateral_tilt * s)  # spine-centred left-right coordinate

    body_h, disc_h = u(12.5, 16.0), u(4.0, 6.5)
    depth, width = u(14.0, 18.0), u(16.0, 22.0)
    lordosis, a0 = u(0.0, 9.0), u(5.0, 15.0)
    top = (ns - 1) / 2 - u(25.0, 45.0)  # top of the dens, below the skull base
    canal_r, cord_r = u(6.0, 8.0), u(3.0, 4.5)

    vol = np.zeros(shape, dtype=np.float32)
    neck = (r / 45.0) ** 2 + ((a - 5) / 70.0) ** 2 <= 1.0
    vol[np.broadcast_to(neck, shape)] = SOFT
    length = 8 * (body_h + disc_h) + 30

    def centre_a(sv):
        t = np.clip((top - sv) / length, 0, 1)
        return a0 + lordosis * np.sin(np.pi * t)

    # Skull base: dark bone above the dens, brainstem/CSF behind it.
    skull = (s > top + 6) & (a > -35) & (np.abs(r) < 40)
    vol[np.broadcast_to(skull, shape)] = BONE
    # Canal (CSF) and cord along the whole length, posterior to the bodies.
    ca = centre_a(s) - depth / 2 - 1.5 - canal_r
    canal = (r / (canal_r * 1.2)) ** 2 + ((a - ca) / canal_r) ** 2 <= 1.0
    vol[canal] = CSF
    cord = (r / (cord_r * 1.3)) ** 2 + ((a - ca) / cord_r) ** 2 <= 1.0
    vol[cord] = CORD
    # Posterior elements (laminae / spinous processes): grey-dark blocks behind the canal.
    post = (a < ca - canal_r - 1) & (a > ca - canal_r - 30) & (np.abs(r) < 10) & (s < top)
    vol[post & (vol == SOFT)] = FAT

    heights = [2.2 * body_h] + [body_h * u(0.9, 1.1) for _ in range(8)]  # C2 (with dens) .. T2
    discs = _add_levels(vol, (r, a, s), top, heights, centre_a, (depth, width, disc_h))
    if noise:
        vol += rng.normal(0, noise, size=shape).astype(np.float32)
    vol = np.clip(vol, 0, None)

    # Array indices are centred coordinates + half size: RAS = index - centre.
    matrix = np.eye(4)
    matrix[:3, 3] = -(np.array(shape) - 1) / 2
    discs = {v: p for v, p in discs.items() if v in DISC_VALUES or v == 9}
    # The lateral shift/tilt were applied to centred S coordinates; express points in RAS.
    for point in discs.values():
        point[0] = lateral_shift + lateral_tilt * point[2]
    return Volume(array=vol, ijk_to_ras=matrix, name=f"phantom{seed}"), discs


def _add_levels(vol, grids, top, heights, centre_a, sizes) -> dict:
    """Draw the vertebral bodies (C2 with its dens first) and the discs below them into ``vol``;
    returns the discs' posterior tips {SCT value: (R, A, S) in centred coordinates}."""
    r, a, s = grids
    depth, width, disc_h = sizes
    discs = {}
    level_top = top
    for index, height in enumerate(heights):
        bottom = level_top - height
        mid_s = (level_top + bottom) / 2
        ac = centre_a(mid_s)
        body_depth = depth * (0.7 if index == 0 else 1.0)
        box = (np.abs(s - mid_s) <= height / 2) & (np.abs(a - ac) <= body_depth / 2) & \
              (np.abs(r) <= width / 2)
        if index == 0:  # the dens: narrower upper part of C2
            box &= (s < bottom + 0.55 * height) | (np.abs(a - ac) <= body_depth / 4)
        vol[box] = BODY
        disc_mid = bottom - disc_h / 2
        dac = centre_a(disc_mid)
        disc = (np.abs(s - disc_mid) <= disc_h / 2) & (np.abs(a - dac) <= depth / 2) & \
               (np.abs(r) <= width / 2)
        vol[disc] = DISC
        nucleus = (np.abs(s - disc_mid) <= disc_h / 3) & (np.abs(a - dac) <= depth / 4) & \
                  (np.abs(r) <= width / 4)
        vol[nucleus] = NUCLEUS
        value = 3 + index  # disc below C2 is C2/C3 = 3
        discs[value] = np.array([0.0, dac - depth / 2, disc_mid])
        level_top = bottom - disc_h
    return discs
