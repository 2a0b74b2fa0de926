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

from dataclasses import dataclass, field

import numpy as np

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

        canal_ap = self._canal(out, c)

        # --- Posterior elements (laminae and spinous processes) of C2..T4.
        self._posterior_elements(out, c, canal_ap)
        # --- Vertebral bodies and discs.
        self._bodies_and_discs(out, c)
        # --- C1 arches, dens, skull base with the brain behind the clivus.
        self._craniocervical(out, c)
        return (out, c["nearest"]) if with_level else out

    def _canal(self, out, c):
        """Canal, CSF and cord (continuing up into the brainstem), and the dark ligaments;
        returns the canal's AP depth at each point."""
        p = self.params
        v, w, upper, top_h = c["v"], c["w"], c["upper"], c["h_top"]
        lateral = np.abs(w)
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
        return canal_ap

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
# Rendering one training slice.


