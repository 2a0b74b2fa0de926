"""A procedural cervical spine with random shape and contrast (domain randomisation).

Why: three real subjects cannot teach a network what *any* cervical MRI looks like.  As SynthSeg
does for the brain, every training sample here is a new anatomy (shape drawn from the disc
chains of 115 real subjects, then bent, tilted and deformed) rendered with new, random tissue
intensities (T2-like, T1-like, STIR-like or fully random), resolution, slice thickness, noise,
bias field, ghosts, wrap-around and field of view.  What stays constant is the anatomy and its
order -- skull base, C1 arch, C2 with its dens, the bodies and discs below -- so the network
has to learn level identity from anatomy, not from one scanner's grey values.

The anatomy is *implicit*: ``SyntheticSpine.tissue_at(points)`` gives the tissue at any 3D
point (mm), so a sample is rendered by evaluating exactly the points of the (possibly oblique,
thick) slice being simulated -- no 3D volume is ever built, which keeps generation at a few
milliseconds per sample on one core.

Coordinates: RAS millimetres (x = right, y = anterior, z = superior).  Disc posterior tips use
SCT values: 2 = C1/C2 (a joint plane, no disc in the midline), 3 = C2/C3 ... 8 = C7/T1 ... 12.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from .. import DISC_VALUES
from .augment import rotation, smooth_field, to_slice_pixels, visible_or_nan
from .midsagittal import normalize_intensity

# Tissue classes (index into a per-sample intensity table).
AIR, SOFT, FAT, MUSCLE, MARROW, CORTEX, ANNULUS, NUCLEUS, CSF, CORD, BRAIN, LIGAMENT = range(12)
N_TISSUES = 12
#: First and last plane values of the generated chain (C1/C2 .. T4/T5).
FIRST_PLANE, LAST_PLANE = 2, 13
#: Typical tissue intensities per contrast family (then jittered): index = tissue.
CONTRASTS = {
    #            air   soft  fat   muscle marrow cortex annul  nucl  csf   cord  brain  lig
    "T2": (0.00, 0.35, 0.75, 0.22, 0.38, 0.06, 0.30, 0.75, 1.00, 0.45, 0.42, 0.08),
    "T1": (0.00, 0.40, 0.95, 0.35, 0.70, 0.08, 0.35, 0.40, 0.12, 0.55, 0.50, 0.10),
    "STIR": (0.00, 0.35, 0.08, 0.25, 0.15, 0.05, 0.35, 0.85, 1.00, 0.45, 0.45, 0.08),
    "PD": (0.00, 0.50, 0.85, 0.40, 0.55, 0.10, 0.45, 0.70, 0.70, 0.55, 0.55, 0.12),
}


def _default_geometry_file() -> Path:
    root = os.environ.get("VERTEBRAL_LABELING_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[4] / "shared" / "data"
    return base / "disc-geometry" / "disc_coords_gt.csv"


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


@dataclass
class SyntheticSpine:
    """One random anatomy: disc planes, per-level sizes and the soft-tissue envelope."""

    planes: np.ndarray          # (P, 3) posterior tips of planes FIRST_PLANE.. (RAS mm)
    normals: np.ndarray         # (P, 3) superior unit normals of the disc planes
    anteriors: np.ndarray       # (P, 3) anterior unit vectors in each plane
    laterals: np.ndarray        # (P, 3) right unit vectors in each plane
    disc_thickness: np.ndarray  # (P,) mm; 0 for C1/C2 (no disc in the midline)
    body_depth: np.ndarray      # (P,) AP depth of the body below each plane (mm)
    bulge: np.ndarray           # (P,) posterior disc bulge (mm)
    nucleus: np.ndarray         # (P,) relative nucleus size (0 = degenerate, dark disc)
    listhesis: np.ndarray       # (P,) AP shift of the body below each plane (mm)
    params: dict = field(default_factory=dict)

    @property
    def values(self) -> list[int]:
        return list(range(FIRST_PLANE, FIRST_PLANE + len(self.planes)))

    def disc_tips(self) -> dict:
        """SCT value -> RAS of the posterior disc tip (the SCT / spine-generic label point)."""
        tips = {}
        for k, value in enumerate(self.values):
            if value >= 3:
                tips[value] = self.planes[k] - self.bulge[k] * self.anteriors[k]
        return tips

    def dens_tip(self) -> np.ndarray:
        p = self.params
        return self.planes[0] + p["dens_height"] * self.normals[0] + \
            p["dens_centre"] * self.body_depth[0] * self.anteriors[0]

    # -----------------------------------------------------------------------------------------
    def local_coordinates(self, points: np.ndarray):
        """Per point: upper plane index, distances to the planes above/below, AP and lateral
        coordinates interpolated between them (AP: 0 at the posterior body wall, + anterior)."""
        h = _project(points, self.planes, self.normals)     # + = superior
        v = _project(points, self.planes, self.anteriors)
        w = _project(points, self.planes, self.laterals)
        n_planes = len(self.planes)
        upper = n_planes - 1 - (h > 0).sum(axis=1)                         # -1 = above all
        idx = np.arange(len(points))
        up = np.clip(upper, 0, n_planes - 1)
        lo = np.clip(upper + 1, 0, n_planes - 1)
        d_up = -h[idx, up]
        d_lo = h[idx, lo]
        alpha = np.where((upper >= 0) & (upper < n_planes - 1),
                         d_up / np.maximum(d_up + d_lo, 1e-6), np.where(upper < 0, 0.0, 1.0))
        vv = (1 - alpha) * v[idx, up] + alpha * v[idx, lo]
        ww = (1 - alpha) * w[idx, up] + alpha * w[idx, lo]
        nearest = np.argmin(np.abs(h), axis=1)
        return dict(h=h, upper=upper, d_up=d_up, d_lo=d_lo, v=vv, w=ww, nearest=nearest, v_all=v,
                    h_near=h[idx, nearest], alpha=alpha, h_top=h[:, 0], v_top=v[:, 0],
                    w_top=w[:, 0])

    def tissue_at(self, points: np.ndarray, with_level: bool = False):
        """Tissue class (uint8) at RAS points (N, 3); with ``with_level`` also the index of the
        nearest disc plane (lets a renderer vary each disc and body on its own)."""
        points = np.asarray(points, np.float32).reshape(-1, 3)
        c = self.local_coordinates(points)
        p = self.params
        n_planes = len(self.planes)
        out = np.full(len(points), AIR, np.uint8)
        v, w, upper = c["v"], c["w"], c["upper"]
        level = np.clip(upper, 0, n_planes - 1)
        lateral = np.abs(w)
        top_h = c["h_top"]

        # --- Envelope: neck / head / chest, with fat under the skin.
        ant_skin = p["ant_neck"] + p["face_extra"] * _smoothstep(top_h, -10, 25) + \
            p["chest_extra"] * _smoothstep(-top_h, p["chest_start"], p["chest_start"] + 40)
        post_skin = -(p["canal_ap"] + p["post_neck"] + p["head_extra"] * _smoothstep(top_h, 0, 40))
        body = (v < ant_skin) & (v > post_skin) & (lateral < p["neck_half_width"])
        out[body] = SOFT
        fat = body & ((v > ant_skin - p["fat_ant"]) | (v < post_skin + p["fat_post"]))
        out[fat] = FAT
        # Posterior neck muscles with fat septa.
        muscle = body & ~fat & (v < -p["canal_ap"] - 2)
        out[muscle] = MUSCLE
        for depth, thick, slope in p["septa"]:
            septum = muscle & (np.abs(v + p["canal_ap"] + depth + slope * top_h) < thick)
            out[septum] = FAT
        # Prevertebral tissue and the airway (pharynx, larynx, trachea) in front of it.
        body_depth = self.body_depth[level]
        prevert = p["prevert_upper"] + (p["prevert_lower"] - p["prevert_upper"]) * \
            _smoothstep(-top_h, 40, 80)
        pre = body & (v > body_depth) & (v < body_depth + prevert)
        out[pre] = MUSCLE
        airway_front = body_depth + prevert
        airway = body & (v > airway_front) & (v < airway_front + p["airway_ap"]) & \
            (lateral < p["airway_half_width"]) & (top_h < p["airway_top"])
        out[airway] = AIR
        for centre, radii, tissue in p["blobs"]:
            d = ((v - centre[0]) / radii[0]) ** 2 + ((top_h - centre[1]) / radii[1]) ** 2 + \
                (w / radii[2]) ** 2
            out[body & (d < 1) & (v > body_depth + 2)] = tissue

        # --- Canal, CSF and cord (continuing up into the brainstem).
        canal_ap = p["canal_ap"] * np.where(upper >= 0, 1.0, 1.0 + 0.4 * _smoothstep(top_h, 0, 30))
        canal = (v < 0) & (v > -canal_ap) & (lateral < p["canal_half_width"])
        out[canal] = CSF
        cord_centre = -canal_ap * p["cord_position"]
        cord_scale = 1.0 + p["brainstem_growth"] * _smoothstep(top_h, 5, 45)
        cord = ((v - cord_centre) / (p["cord_ap"] / 2 * cord_scale)) ** 2 + \
            (w / (p["cord_width"] / 2 * cord_scale)) ** 2 < 1
        out[canal & cord] = CORD
        # Dark ligaments: posterior longitudinal ligament and dura / ligamentum flavum.
        out[canal & (v > -p["pll"])] = LIGAMENT
        out[(v <= -canal_ap) & (v > -canal_ap - 1.0) & (lateral < p["canal_half_width"]) &
            (upper >= 0)] = LIGAMENT

        # --- Posterior elements (laminae and spinous processes) of C2..T4.
        self._posterior_elements(out, c, canal_ap)
        # --- Vertebral bodies and discs.
        self._bodies_and_discs(out, c)
        # --- C1 arches, dens, skull base with the brain behind the clivus.
        self._craniocervical(out, c)
        return (out, c["nearest"]) if with_level else out

    def _bodies_and_discs(self, out, c):
        n_planes = len(self.planes)
        v, w, upper, d_up, d_lo = c["v"], c["w"], c["upper"], c["d_up"], c["d_lo"]
        lateral = np.abs(w)
        width = self.params["body_half_width"]
        inside_chain = (upper >= 0) & (upper < n_planes - 1)
        up = np.clip(upper, 0, n_planes - 1)
        lo = np.clip(upper + 1, 0, n_planes - 1)
        shift = self.listhesis[up]
        depth = self.body_depth[up]
        half_up, half_lo = self.disc_thickness[up] / 2, self.disc_thickness[lo] / 2
        vb = v - shift
        body = inside_chain & (d_up > half_up) & (d_lo > half_lo) & (vb > 0) & (vb < depth) & \
            (lateral < width)
        osteo = self.params["osteophyte"]
        spur = inside_chain & (vb >= depth) & (vb < depth + osteo[up] * _edge_bump(d_lo - half_lo, 3.0)) \
            & (lateral < width)
        rim = self.params["cortex"]
        edge = np.minimum.reduce([d_up - half_up, d_lo - half_lo, vb, depth - vb])
        out[body | spur] = CORTEX
        out[body & (edge > rim)] = MARROW
        # Discs: around each plane with a disc, from the posterior bulge to the anterior edge.
        k = c["nearest"]
        hk = np.abs(c["h_near"])
        vk = c["v_all"][np.arange(len(k)), k]
        t = self.disc_thickness[k]
        dd = self.body_depth[np.clip(k - 1, 0, n_planes - 1)]
        disc = (t > 0) & (hk < t / 2) & (vk > -self.bulge[k]) & (vk < dd + 1.0) & (lateral < width)
        out[disc] = ANNULUS
        nuc = self.nucleus[k]
        nucleus = disc & (hk < t * 0.35) & (vk > dd * (0.5 - 0.3 * nuc)) & \
            (vk < dd * (0.5 + 0.3 * nuc)) & (nuc > 0.15) & (lateral < width * 0.6)
        out[nucleus] = NUCLEUS

    def _posterior_elements(self, out, c, canal_ap):
        p = self.params
        n_planes = len(self.planes)
        v, w, upper, d_up, d_lo = c["v"], c["w"], c["upper"], c["d_up"], c["d_lo"]
        lateral = np.abs(w)
        ok = (upper >= 0) & (upper < n_planes - 1)
        up = np.clip(upper, 0, n_planes - 1)
        height = d_up + d_lo
        frac = d_up / np.maximum(height, 1e-6)              # 0 at the upper plane, 1 at the lower
        behind = -canal_ap - v                               # mm behind the canal
        length = p["spinous_length"][up]
        slope = p["spinous_slope"][up]
        # The lamina fills the lower ~70 % of the level; the spinous process slants caudally.
        centre = 0.55 + slope * behind / np.maximum(height, 1e-6)
        band = np.abs(frac - centre) < 0.32 - 0.12 * np.clip(behind / np.maximum(length, 1), 0, 1)
        element = ok & (behind > 0.5) & (behind < length) & band & \
            (lateral < np.where(behind < 6, p["lamina_half_width"], 4.0))
        out[element] = CORTEX
        core = element & (np.abs(frac - centre) < 0.2 - 0.12 * np.clip(behind / np.maximum(length, 1), 0, 1)) & \
            (behind > 1.5) & (behind < length - 1.5) & (lateral < 3.0)
        out[core] = MARROW

    def _craniocervical(self, out, c):
        p = self.params
        h, v, w = c["h_top"], c["v_top"], c["w_top"]
        lateral = np.abs(w)
        depth = self.body_depth[0]
        # Dens: the upper part of C2 rising above the C1/C2 plane.
        dens_c = p["dens_centre"] * depth
        dens = (h >= -1) & (h < p["dens_height"]) & (np.abs(v - dens_c) < p["dens_radius"] *
                                                      np.sqrt(np.clip(1 - (h / p["dens_height"]) ** 4, 0, 1)) + 0.3) \
            & (lateral < 6)
        out[dens] = CORTEX
        out[dens & (np.abs(v - dens_c) < p["dens_radius"] - 1.2) & (h < p["dens_height"] - 1.5)] = MARROW
        # C1 anterior arch (in front of the dens) and posterior arch (behind the canal).
        for centre_h, centre_v, rh, rv in ((p["c1_height"], dens_c + p["dens_radius"] + 2 + p["c1a_ap"],
                                            p["c1a_h"], p["c1a_ap"]),
                                           (p["c1_height"] - 2, -p["canal_ap"] * 1.2 - p["c1p_ap"],
                                            p["c1p_h"], p["c1p_ap"])):
            d = ((h - centre_h) / rh) ** 2 + ((v - centre_v) / rv) ** 2
            out[(d < 1) & (lateral < 8)] = CORTEX
            out[(d < 0.45) & (lateral < 7)] = MARROW
        # Skull base: clivus rising anteriorly from the basion, occipital bone rising posteriorly
        # from the opisthion; brain between them, a rim of CSF in front of the brainstem.
        basion = np.array([p["dens_height"] + p["basion_gap"], dens_c - 1.0])
        clivus_dir = np.array([np.sin(p["clivus_angle"]), np.cos(p["clivus_angle"])])
        rel = np.stack([h - basion[0], v - basion[1]], axis=-1)
        along = rel @ clivus_dir
        across = rel @ np.array([-clivus_dir[1], clivus_dir[0]])     # + = posterior-superior side
        clivus = (along > 0) & (along < 45) & (np.abs(across) < p["clivus_thickness"] / 2) & (lateral < 25)
        opisthion = np.array([basion[0] + p["opisthion_rise"], -p["canal_ap"] * 1.3 - 3])
        occ_dir = np.array([np.sin(p["occiput_angle"]), -np.cos(p["occiput_angle"])])
        rel_o = np.stack([h - opisthion[0], v - opisthion[1]], axis=-1)
        along_o = rel_o @ occ_dir
        across_o = rel_o @ np.array([occ_dir[1], -occ_dir[0]])        # + = anterior-superior side
        occiput = (along_o > 0) & (along_o < 60) & (np.abs(across_o) < p["occiput_thickness"] / 2)
        cranial = (across > p["clivus_thickness"] / 2) & (across_o > p["occiput_thickness"] / 2) & \
            (h > basion[0] - 2) & (lateral < 45)
        out[cranial & (across < p["clivus_thickness"] / 2 + p["prepontine"])] = CSF
        out[cranial & (across >= p["clivus_thickness"] / 2 + p["prepontine"])] = BRAIN
        out[clivus | occiput] = CORTEX
        out[(clivus & (np.abs(across) < p["clivus_thickness"] / 2 - 1.5) & (along > 2)) |
            (occiput & (np.abs(across_o) < p["occiput_thickness"] / 2 - 1.5) & (along_o > 2))] = MARROW


def _project(points, origins, axes):
    """(p - origin_k) . axis_k for every point and plane k, (N, P).

    Written as three broadcast products: a BLAS matrix product of an N x 3 by 3 x P matrix is
    several times slower here (thread start-up for a tiny inner dimension)."""
    offset = np.einsum("pk,pk->p", origins, axes).astype(points.dtype)
    axes = axes.astype(points.dtype)
    return (points[:, 0:1] * axes[:, 0] + points[:, 1:2] * axes[:, 1] + points[:, 2:3] * axes[:, 2]
            - offset)


def _smoothstep(x, lo, hi):
    t = np.clip((np.asarray(x, float) - lo) / (hi - lo), 0, 1)
    return t * t * (3 - 2 * t)


def _edge_bump(distance_to_endplate, reach):
    """1 at an endplate, falling to 0 at ``reach`` mm from it (osteophytes grow at the corners)."""
    return np.clip(1 - distance_to_endplate / reach, 0, 1)


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


# ---------------------------------------------------------------------------------------------
# Rendering one training slice.

CONTRAST_FAMILIES = ("T2", "T1", "STIR", "PD", "random")
CONTRAST_WEIGHTS = (0.42, 0.22, 0.08, 0.08, 0.20)


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
    from .volume import Volume

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
