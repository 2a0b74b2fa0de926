"""Writing and reading X-ray results: Slicer markups JSON (68 corners), CSV, angles JSON, QC PNG.

Points are stored in the image's physical space.  A 2D image's physical (x, y) is what
SimpleITK and Slicer call LPS, so the markups file has ``coordinateSystem: LPS`` and positions
``[x, y, z]`` with z = 0 (or the slice position of a single-slice 3D image), exactly where
Slicer draws the radiograph it loads from the same file.  Every writer is atomic.
"""

from __future__ import annotations

import csv
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from ..io.files import write_atomic_bytes, write_json
from ..io.markups import control_point, markups_document, read_control_points
from .cobb import CORNER_NAMES, N_POINTS, N_VERTEBRAE, VERTEBRA_NAMES, CobbResult
from .data import POINT_LABELS, normalize

#: Column names of angles.csv in the AASCE reference order (the names the challenge uses).
ANGLE_COLUMNS = ("PT", "MT", "TL/L")
CSV_COLUMNS = ("label", "vertebra", "corner", "x", "y", "z", "x_px", "y_px", "confidence")
#: A vertebra whose confidence is below this is flagged for review (markups, QC picture).
REVIEW_BELOW = 0.3


def curve_region(upper: str, lower: str) -> str:
    """Anatomical region of a curve from the middle of its end vertebrae (for display)."""
    middle = (VERTEBRA_NAMES.index(upper) + VERTEBRA_NAMES.index(lower)) / 2
    if middle < 5:  # apex T1-T5
        return "proximal thoracic"
    if middle < 11:  # apex T6-T11
        return "main thoracic"
    return "thoracolumbar/lumbar"


def angles_dict(cobb: CobbResult) -> dict:
    """The three angles with end vertebrae, in the AASCE reference order."""
    curves = []
    for column, angle, (upper, lower) in zip(ANGLE_COLUMNS, cobb.angles_deg, cobb.end_vertebrae):
        curves.append({"column": column, "angle_deg": round(float(angle), 3),
                       "upper_end_vertebra": upper, "lower_end_vertebra": lower,
                       "region": curve_region(upper, lower) if upper != lower else "none"})
    return {"angles_deg": [round(float(a), 3) for a in cobb.angles_deg], "curves": curves,
            "largest_deg": round(float(max(cobb.angles_deg)), 3), "branch": cobb.branch,
            "method": "AASCE 2019 reference (angleCal.m); column 1 is the largest curve, "
                      "columns 2 and 3 the curves above/below it"}


#: The review reason of a vertebra whose level the chain could not confirm (T1 or L5 to check).
LEVEL_REVIEW = "REVIEW: level not confirmed (the chain could be a level off)"


def with_review(description: str, reason: str) -> str:
    """A point's description with a review reason added ("confidence=0.87; REVIEW: ...")."""
    return f"{description}; {reason}" if description else reason


def markups_dict(points, confidence=None, slice_z: float = 0.0, locked: bool = False,
                 threshold: float = REVIEW_BELOW, level_review=None) -> dict:
    """The 68 corners as a Slicer point list; ``level_review`` (17,) marks the vertebrae whose
    level is to be checked (their four corners are flagged with :data:`LEVEL_REVIEW`)."""
    points = np.asarray(points, float)
    if points.shape != (N_POINTS, 2):
        raise InputError(f"expected {N_POINTS} points, got {points.shape}")
    control = []
    for index, (label, (x, y)) in enumerate(zip(POINT_LABELS, points)):
        conf = None if confidence is None else float(confidence[index // 4])
        description = "" if conf is None else f"confidence={conf:.2f}"
        flagged = conf is not None and conf < threshold
        if flagged:
            description = with_review(description, "REVIEW: low confidence")
        if level_review is not None and level_review[index // 4]:
            description, flagged = with_review(description, LEVEL_REVIEW), True
        control.append(control_point(label, [x, y, slice_z], description, flagged))
    return markups_document(control, locked)


def write_markups_json(points, path, confidence=None, slice_z: float = 0.0, level_review=None) -> None:
    write_json(path, markups_dict(points, confidence, slice_z, level_review=level_review))


def read_markups_json(path) -> np.ndarray:
    """The 68 corners (physical x, y) of a .mrk.json, matched by label (T1-TL ... L5-BR)."""
    found = {point["label"]: tuple(point["lps"][:2]) for point in read_control_points(path)
             if point["status"] == "defined"}
    missing = [label for label in POINT_LABELS if label not in found]
    if missing:
        raise InputError(f"{path} lacks {len(missing)} of the 68 corner points, e.g. {missing[0]}")
    return np.array([found[label] for label in POINT_LABELS])


def write_csv(points, path, points_px=None, confidence=None, slice_z: float = 0.0) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for index, label in enumerate(POINT_LABELS):
        vertebra, corner = VERTEBRA_NAMES[index // 4], CORNER_NAMES[index % 4]
        x, y = points[index]
        px = ("", "") if points_px is None else (f"{points_px[index][0]:.2f}", f"{points_px[index][1]:.2f}")
        conf = "" if confidence is None else f"{float(confidence[index // 4]):.3f}"
        writer.writerow([label, vertebra, corner, f"{x:.3f}", f"{y:.3f}", f"{slice_z:.3f}", *px, conf])
    write_atomic_bytes(path, buffer.getvalue().encode())


def write_angles_json(cobb: CobbResult, path, extra: dict | None = None) -> None:
    write_json(path, dict(extra or {}, **angles_dict(cobb)))


# -- QC picture ------------------------------------------------------------------------------
def qc_image(array, points_px, cobb: CobbResult, confidence=None, height: int = 1000):
    """PIL picture: the radiograph, the 17 vertebra outlines, the end-vertebra lines and angles."""

    try:
        font = ImageFont.load_default(size=max(11, height // 60))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    gray = (normalize(np.asarray(array, np.float32)) * 255).astype(np.uint8)
    scale = height / gray.shape[0]
    width = max(1, int(round(gray.shape[1] * scale)))
    picture = Image.fromarray(gray).resize((width, height), Image.BILINEAR).convert("RGB")
    draw = ImageDraw.Draw(picture)
    pts = np.asarray(points_px, float) * scale
    colours = [(0, 220, 255), (255, 200, 0), (255, 80, 200)]
    for v in range(N_VERTEBRAE):
        tl, tr, bl, br = pts[4 * v: 4 * v + 4]
        flagged = confidence is not None and confidence[v] < REVIEW_BELOW
        colour = (255, 60, 60) if flagged else (60, 255, 90)
        draw.line([tuple(tl), tuple(tr), tuple(br), tuple(bl), tuple(tl)], fill=colour, width=1)
        for p in (tl, tr, bl, br):
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        draw.text((tr[0] + 4, (tr[1] + br[1]) / 2 - 5), VERTEBRA_NAMES[v], fill=colour, font=font)
    reach = 0.18 * width + 40
    for k, (angle, ends) in enumerate(zip(cobb.angles_deg, cobb.end_vertebrae)):
        colour = colours[k]
        for name in ends:
            v = VERTEBRA_NAMES.index(name)
            tl, tr, bl, br = pts[4 * v: 4 * v + 4]
            left, right = (tl + bl) / 2, (tr + br) / 2
            d = (right - left) / max(np.linalg.norm(right - left), 1e-6)
            mid = (left + right) / 2
            # main curve extends to the left, the others to the right, so shared end
            # vertebrae show both lines
            a, b = (mid - d * reach, mid + d * 0.25 * reach) if k == 0 else (mid - d * 0.25 * reach, mid + d * reach)
            draw.line([tuple(a), tuple(b)], fill=colour, width=2)
        line_height = max(14, height // 45)
        text = f"{ANGLE_COLUMNS[k]} {angle:5.1f} deg  {ends[0]}-{ends[1]}"
        box = draw.textbbox((6, 6 + line_height * k), text, font=font)
        draw.rectangle([box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2], fill=(0, 0, 0))
        draw.text((6, 6 + line_height * k), text, fill=colour, font=font)
    return picture


def write_qc_png(array, points_px, cobb, path, confidence=None, height: int = 1000) -> None:
    buffer = io.BytesIO()
    qc_image(array, points_px, cobb, confidence, height).save(buffer, format="PNG", optimize=True)
    write_atomic_bytes(path, buffer.getvalue())
