"""Random synthetic spines (chains shaped like the real subjects' when their disc coordinates are
available) and their rendering: training samples (an oblique, thick slice with its disc
targets) and whole volumes (``phantom --synthetic``).  The anatomy itself: ``synthetic_spine``."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from .. import DISC_VALUES
from ..io.files import data_root
from .augment import rotation, smooth_field, to_slice_pixels, visible_or_nan
from .midsagittal import normalize_intensity
from .synthetic_spine import (
    AIR,
    BRAIN,
    CONTRASTS,
    CORD,
    CORTEX,
    CSF,
    FAT,
    FIRST_PLANE,
    LAST_PLANE,
    MARROW,
    MUSCLE,
    N_TISSUES,
    SOFT,
    SyntheticSpine,
)
from .volume import Volume

CONTRAST_FAMILIES = ("T2", "T1", "STIR", "PD", "random")
CONTRAST_WEIGHTS = (0.42, 0.22, 0.08, 0.08, 0.20)


def _default_geometry_file() -> Path:
    return data_root() / "disc-geometry" / "disc_coords_gt.csv"


@lru_cache(maxsize=4)
def real_chain_shapes(path: str | None = None) -> tuple:
    """Scale-free disc chains of the real subjects: per chain, unit-free (A, S) points of discs
    2..N (SCT numbering), normalised so the mean C2/C3..C6/C7 spacing is 1.

    Empty when the file is missing (the generator then draws chains from its own priors).
    """
    path = Path(path) if path else _default_geometry_file()
    if not path.exists():
        return ()
    chains: dict = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            key = (row["subject"], row["contrast"])
            # row grows upwards (superior), col grows posteriorly: A = -col, S = row.
            chains.setdefault(key, {})[int(row["disc"])] = (-float(row["col"]), float(row["row"]))
    shapes = []
    for discs in chains.values():
        values = sorted(v for v in discs if v >= FIRST_PLANE)
        if not all(v in discs for v in range(3, 9)):
            continue
        run = [v for v in values if v <= values[0] + len(values)]
        pts = np.array([discs[v] for v in run], float)
        gaps = np.linalg.norm(np.diff(np.array([discs[v] for v in range(3, 8)]), axis=0), axis=1)
        scale = gaps.mean()
        if scale <= 0:
            continue
        shapes.append((tuple(run), (pts - pts[0]) / scale))
    return tuple(shapes)


# ---------------------------------------------------------------------------------------------
def random_spine(rng: np.random.Generator, shapes: tuple | None = None) -> SyntheticSpine:
    """Draw one anatomy.  ``shapes``: real scale-free chains (``real_chain_shapes()``)."""
    shapes = real_chain_shapes() if shapes is None else shapes
    n_planes = LAST_PLANE - FIRST_PLANE + 1
    spacing = rng.uniform(14.0, 20.0)                 # mean C2/C3..C6/C7 distance, mm
    chain = _chain_shape(rng, shapes, n_planes)        # (P, 2) scale-free (A, S), plane 2 first
    chain = chain * spacing
    # Shape changes: global flexion/extension, curvature scaled (straight, kyphotic, more lordotic).
    seg = np.diff(chain, axis=0)
    angles = np.arctan2(seg[:, 1], seg[:, 0])
    bend = np.diff(angles)
    style = rng.random()
    factor = rng.uniform(-1.0, 0.3) if style < 0.2 else (rng.uniform(0.3, 1.8) if style < 0.85
                                                         else rng.uniform(-2.0, -1.0))
    bend = bend * factor + rng.normal(0, 0.03, bend.shape)
    start_angle = angles[0] + rng.uniform(-0.35, 0.35)
    new_angles = start_angle + np.concatenate([[0.0], np.cumsum(bend)])
    # Never more than 55 degrees from vertical: a cervical spine does not fold back on itself.
    new_angles = np.clip(new_angles, -np.pi / 2 - 0.96, -np.pi / 2 + 0.96)
    lengths = np.linalg.norm(seg, axis=1) * np.exp(rng.normal(0, 0.06, len(seg)))
    steps = np.stack([np.cos(new_angles), np.sin(new_angles)], axis=1) * lengths[:, None]
    chain = np.concatenate([[[0.0, 0.0]], np.cumsum(steps, axis=0)])
    # Scoliotic tilt and lateral curve.
    s_rel = chain[:, 1] - chain[0, 1]
    lateral = rng.uniform(-0.15, 0.15) * s_rel + rng.uniform(0, 12) * \
        np.sin(np.pi * s_rel / rng.uniform(-220, -120) + rng.uniform(0, np.pi)) * (rng.random() < 0.4)
    planes = np.stack([lateral, chain[:, 0], chain[:, 1]], axis=1)
    planes -= planes[3]  # centre near C4/C5 (value 5 is index 3)
    normals, anteriors, laterals = _plane_frames(planes, rng)

    level = np.arange(n_planes)
    disc = rng.uniform(3.5, 6.5) * np.exp(rng.normal(0, 0.15, n_planes)) * np.where(level >= 6, 1.1, 1.0)
    degenerate = rng.random(n_planes) < rng.uniform(0, 0.3)
    disc[degenerate] *= rng.uniform(0.3, 0.6, degenerate.sum())
    fused = rng.random(n_planes) < 0.03
    disc[fused] = 0.0
    disc[0] = 0.0                                                      # C1/C2: no disc
    depth = rng.uniform(14.0, 18.5) * np.exp(rng.normal(0, 0.05, n_planes)) * \
        (1 + 0.05 * np.clip(level - 5, 0, None))                       # thoracic bodies deeper
    nucleus = np.clip(rng.uniform(0.4, 1.0, n_planes) * ~degenerate, 0, 1)
    bulge = np.clip(rng.normal(0.6, 0.8, n_planes), 0, 3.5)
    listhesis = np.where(rng.random(n_planes) < 0.05, rng.uniform(-4, 4, n_planes), 0.0)
    listhesis[0] = 0.0
    params = _soft_params(rng, n_planes, depth)
    return SyntheticSpine(planes, normals, anteriors, laterals, disc, depth, bulge, nucleus,
                          listhesis, params)


def _chain_shape(rng, shapes, n_planes):
    if shapes:
        values, pts = shapes[rng.integers(len(shapes))]
        pts = np.array(pts)
        values = list(values)
    else:
        values, pts = [2, 3], np.array([[0.0, 0.0], [0.05, -1.1]])
    # Make sure the chain starts at plane 2: extrapolate upwards if C1/C2 is missing.
    while values[0] > FIRST_PLANE:
        step = pts[1] - pts[0] if len(pts) > 1 else np.array([0.0, -1.0])
        pts = np.vstack([pts[0] - step * 1.1, pts])
        values.insert(0, values[0] - 1)
    # Extrapolate downwards (thoracic discs a little further apart) to the last plane.
    while len(pts) < n_planes:
        step = pts[-1] - pts[-2]
        turn = rng.normal(0.05, 0.05)
        rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
        pts = np.vstack([pts, pts[-1] + rot @ step * rng.uniform(1.0, 1.1)])
    pts = pts[:n_planes]
    # C1/C2 to C2/C3 is the C2 body: real data measure it to the odontoid base, keep it tall.
    return pts - pts[0]


def _plane_frames(planes, rng):
    """Per plane: superior normal (bisector of adjacent segments, plus a random wedge), anterior
    and right unit vectors."""
    up = planes[:-1] - planes[1:]
    up = up / np.linalg.norm(up, axis=1, keepdims=True)
    normals = np.empty_like(planes)
    normals[0], normals[-1] = up[0], up[-1]
    normals[1:-1] = up[:-1] + up[1:]
    normals += rng.normal(0, 0.04, normals.shape) * np.array([0.3, 1, 0.3])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    right = np.array([1.0, 0.0, 0.0])
    laterals = right - (normals @ right)[:, None] * normals
    laterals /= np.linalg.norm(laterals, axis=1, keepdims=True)
    anteriors = np.cross(normals, laterals)  # superior x right = anterior
    return normals, anteriors, laterals


def _soft_params(rng, n_planes, depth):
    u = rng.uniform
    level = np.arange(n_planes)
    spinous = np.where(level == 0, u(28, 40), np.where(level < 5, u(14, 26), u(30, 45)))
    spinous = spinous * np.exp(rng.normal(0, 0.1, n_planes))
    spinous[5] = max(spinous[5], u(30, 45))   # C7: vertebra prominens
    septa = [(u(8, 50), u(0.6, 1.8), u(-0.2, 0.2)) for _ in range(rng.integers(0, 5))]
    blobs = []
    for _ in range(rng.integers(1, 10)):  # tongue, mandible, hyoid, thyroid, vessels, pharynx
        blobs.append(((u(20, 100), u(-100, 80)), (u(3, 22), u(3, 28), u(4, 20)),
                      int(rng.choice([AIR, AIR, FAT, MUSCLE, SOFT, CSF, MARROW, CORTEX]))))
    return dict(
        ant_neck=u(55, 95), face_extra=u(0, 60), chest_extra=u(0, 80), chest_start=u(70, 130),
        post_neck=u(45, 100), head_extra=u(0, 50), neck_half_width=u(45, 70),
        fat_ant=u(2, 10), fat_post=u(3, 14), septa=septa, blobs=blobs,
        prevert_upper=u(2.5, 7), prevert_lower=u(8, 20), airway_ap=u(8, 30),
        airway_half_width=u(6, 16), airway_top=u(20, 80),
        canal_ap=u(11, 17) * (0.7 if rng.random() < 0.1 else 1.0), canal_half_width=u(10, 14),
        cord_ap=u(5.5, 9), cord_width=u(9, 13), cord_position=u(0.4, 0.6), brainstem_growth=u(0.5, 1.2),
        pll=u(0.4, 1.2), body_half_width=u(8, 12), cortex=u(0.8, 1.8),
        osteophyte=np.where(rng.random(n_planes) < 0.1, u(2, 5, n_planes), 0.0),
        spinous_length=spinous, spinous_slope=np.where(level >= 5, u(0.2, 0.5), u(0.0, 0.25)),
        lamina_half_width=u(7, 11),
        dens_height=u(10, 17), dens_centre=u(0.3, 0.5), dens_radius=u(4.5, 6.5),
        c1_height=u(5, 11), c1a_h=u(4.5, 7), c1a_ap=u(3, 5), c1p_h=u(4, 6), c1p_ap=u(4, 8),
        basion_gap=u(3, 9), clivus_angle=np.radians(u(50, 75)), clivus_thickness=u(6, 12),
        opisthion_rise=u(2, 12), occiput_angle=np.radians(u(20, 55)), occiput_thickness=u(5, 9),
        prepontine=u(2, 6),
    )


@dataclass
class SyntheticSample:
    """A rendered slice and its targets (pixel row, col; NaN where not in view)."""

    image: np.ndarray        # (H, W) float32, normalised like the labeler's input
    levels: np.ndarray       # (6, 2) C2/C3 .. C7/T1 posterior tips
    discs: np.ndarray        # (M, 2) every disc in view (C2/C3 and below), for the disc detector
    anchor: np.ndarray       # (2,) the dens tip (NaN when out of view)
    contrast: str = ""


def tissue_intensities(rng: np.random.Generator, family: str) -> np.ndarray:
    """A random intensity per tissue class for one sample."""
    if family == "random":
        table = rng.uniform(0, 1, N_TISSUES)
        table[AIR] = rng.uniform(0, 0.1)
        return table
    table = np.array(CONTRASTS[family]) + rng.normal(0, 0.07, N_TISSUES)
    table[AIR] = abs(rng.normal(0, 0.02))
    return np.clip(table, 0, 1.3)


def render_sample(rng: np.random.Generator, shape=(192, 128), spine: SyntheticSpine | None = None,
                  family: str | None = None) -> SyntheticSample:
    """Render a random slice of a random anatomy, the way a scanner might have seen it."""
    spine = spine or random_spine(rng)
    family = family or CONTRAST_FAMILIES[rng.choice(len(CONTRAST_FAMILIES), p=CONTRAST_WEIGHTS)]
    origin, row, col, normal = _random_plane(rng, spine, shape)
    thickness = rng.choice([1.0, rng.uniform(1, 3), rng.uniform(3, 5)], p=[0.45, 0.35, 0.2])
    offsets = np.linspace(-thickness / 2, thickness / 2, max(1, int(round(thickness))))
    rr, cc = np.meshgrid(np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float),
                         indexing="ij")
    grid = origin + rr[..., None] * row + cc[..., None] * col
    table = tissue_intensities(rng, family)
    # Each disc and body varies on its own (degeneration, marrow fat): tissue x level factors.
    per_level = np.exp(rng.normal(0, 0.18, (N_TISSUES, len(spine.planes))))
    per_level[[AIR, SOFT, FAT, MUSCLE, CSF, CORD, BRAIN]] = 1.0
    image = np.zeros(shape, np.float32)
    for offset in offsets:
        tissues, level = spine.tissue_at((grid + offset * normal).reshape(-1, 3), with_level=True)
        image += (table[tissues] * per_level[tissues, level]).reshape(shape)
    image /= len(offsets)
    image = _scanner_effects(rng, image)
    inside = _field_of_view(rng, spine, origin, row, col, normal, shape)
    targets = _targets(spine, origin, row, col, normal)
    levels = visible_or_nan(targets["levels"], inside)
    discs = visible_or_nan(targets["discs"], inside)
    anchor = visible_or_nan(targets["anchor"][None], inside)[0]
    image = normalize_intensity(image, inside)
    return SyntheticSample(image, levels, discs[~np.isnan(discs[:, 0])], anchor, family)


def _random_plane(rng, spine, shape):
    """A near-midsagittal plane (superior up, anterior left) placed on a random level."""
    values = spine.values
    k = int(rng.integers(0, min(len(values), 9)))
    target = spine.planes[k]
    row = np.array([0.0, 0.0, -1.0])
    col = np.array([0.0, -1.0, 0.0])
    normal = np.cross(col, row)
    deg = np.pi / 180
    rot = (rotation(normal, rng.uniform(-15, 15) * deg) @ rotation(row, rng.uniform(-6, 6) * deg)
           @ rotation(col, rng.uniform(-5, 5) * deg))
    scale = np.exp(rng.uniform(-0.08, 0.08))
    row, col, normal = rot @ row * scale, rot @ col * scale, rot @ normal
    r0, c0 = rng.uniform(0.15, 0.85) * shape[0], rng.uniform(0.3, 0.65) * shape[1]
    anchor = target.copy()
    anchor[0] += rng.normal(0, 1.2)
    origin = anchor - r0 * row - c0 * col
    return origin, row, col, normal


def _to_pixels(points, origin, row, col, normal):
    return to_slice_pixels(points, origin, np.stack([row, col, normal], axis=1))


def _targets(spine, origin, row, col, normal):
    tips = spine.disc_tips()
    levels = np.array([tips[v] for v in DISC_VALUES])
    discs = np.array([tips[v] for v in sorted(tips)])
    return {"levels": _to_pixels(levels, origin, row, col, normal),
            "discs": _to_pixels(discs, origin, row, col, normal),
            "anchor": _to_pixels(spine.dens_tip(), origin, row, col, normal)[0]}


def _field_of_view(rng, spine, origin, row, col, normal, shape):
    """The scanned region: top anywhere from the skull base to C4, bottom from C5 to T4."""
    inside = np.ones(shape, bool)
    if rng.random() < 0.25:
        return inside
    anchors = np.vstack([spine.dens_tip() + 25 * spine.normals[0], spine.dens_tip(), spine.planes])
    rows = _to_pixels(anchors, origin, row, col, normal)[:, 0]
    # anchors: 0 = skull base, 1 = dens tip, 2 = C1/C2, 3 = C2/C3 ... so "C4 body" ~ index 4.5
    top = np.interp(rng.uniform(0.0, 4.6), np.arange(len(rows)), rows)
    bottom = np.interp(rng.uniform(6.3, 13.5), np.arange(len(rows)), rows)
    if rng.random() < 0.8:
        inside[: max(0, int(top))] = False
    if rng.random() < 0.8:
        inside[max(0, int(bottom)):] = False
    if rng.random() < 0.15:
        cut = int(rng.uniform(0.05, 0.25) * shape[1])
        if rng.random() < 0.5:
            inside[:, :cut] = False
        else:
            inside[:, shape[1] - cut:] = False
    if inside.sum() < 0.3 * inside.size:
        inside[:] = True
    return inside


def _scanner_effects(rng, x):
    """Partial volume, resolution, texture, bias field, ghosts, wrap-around and noise."""
    x = ndimage.gaussian_filter(x, rng.uniform(0.3, 1.0))
    if rng.random() < 0.4:  # coarser acquisition resolution (up to 3-4 mm) along one axis
        axis = int(rng.integers(2))
        factor = rng.uniform(1.5, 3.5)
        zoom = [1.0, 1.0]
        zoom[axis] = 1 / factor
        small = ndimage.zoom(x, zoom, order=1)
        x = ndimage.zoom(small, (x.shape[0] / small.shape[0], x.shape[1] / small.shape[1]), order=1)
    x = x * np.exp(smooth_field(rng, x.shape, 6, rng.uniform(0, 0.12)))     # tissue texture
    x = x * np.exp(smooth_field(rng, x.shape, 48, rng.uniform(0, 0.35)))    # bias field
    if rng.random() < 0.15:  # motion ghosts along the phase-encoding direction
        axis = int(rng.integers(2))
        x = x + rng.uniform(0.05, 0.25) * np.roll(x, int(rng.integers(8, 40)), axis=axis)
    if rng.random() < 0.1:  # wrap-around: tissue beyond one edge folds onto the other
        k = int(rng.uniform(0.05, 0.2) * x.shape[1])
        x = x.copy()
        x[:, :k] += 0.8 * x[:, -k:][:, ::-1]
    sigma = rng.uniform(0, 0.08) * max(float(np.percentile(x, 99)), 1e-3)
    x = np.sqrt((x + rng.normal(0, sigma, x.shape)) ** 2 + rng.normal(0, sigma, x.shape) ** 2)
    return x.astype(np.float32)


def synthetic_volume(seed: int = 0, family: str = "T2", size_mm=(40, 180, 240)):
    """A 3D sagittal volume (1 mm, RAS-aligned) of one generated spine and its disc tips.

    Why: the demo's default input and a realistic test image whose true disc positions are
    known exactly.  The spine is re-centred so the volume holds the skull base to about T3.
    Returns ``(Volume, {SCT value: RAS})``.
    """
    rng = np.random.default_rng(seed)
    spine = random_spine(rng)
    table = tissue_intensities(rng, family)
    tips = spine.disc_tips()
    centre = (tips[3] + tips[9]) / 2 if 9 in tips else tips[5]
    shape = tuple(int(s) for s in size_mm)
    origin = centre - (np.array(shape) - 1) / 2
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    points = np.stack([ii, jj, kk], axis=-1).reshape(-1, 3) + origin.astype(np.float32)
    values = np.empty(len(points), np.float32)
    for start in range(0, len(points), 200_000):  # bounded memory
        values[start:start + 200_000] = table[spine.tissue_at(points[start:start + 200_000])]
    array = ndimage.gaussian_filter(values.reshape(shape), 0.6)
    array = array + rng.normal(0, 0.03, shape).astype(np.float32)
    matrix = np.eye(4)
    matrix[:3, 3] = origin
    volume = Volume(array=np.clip(array, 0, None).astype(np.float32), ijk_to_ras=matrix,
                    name=f"synthetic{seed}")
    return volume, tips
