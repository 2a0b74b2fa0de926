"""Writing results: Slicer markups JSON, CSV, SCT disc-label NIfTI and a QC picture.

Every writer is atomic (temporary file, then rename), so an interrupted run never leaves a
half-written file where a study expects a good one.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from ..errors import InputError
from ..io.files import write_atomic_bytes, write_json
from ..io.images import write_image_atomic
from ..io.markups import control_point, markups_document, read_control_points
from .midsagittal import normalize_intensity
from .volume import Volume

CSV_COLUMNS = ("disc", "value", "R", "A", "S", "confidence", "flagged", "reason")


def describe(disc) -> str:
    """Control point description: confidence always, and the review reason when flagged."""
    text = f"confidence={disc.confidence:.2f}"
    return text + (f"; REVIEW: {disc.reason}" if disc.flagged else "")


def markups_dict(discs, locked: bool = False) -> dict:
    """Slicer markups (schema v1.0.3) with one control point per disc, coordinates in LPS."""
    points = []
    for disc in discs:
        r, a, s = (float(v) for v in disc.ras)
        points.append(control_point(disc.name, [-r, -a, s], describe(disc), disc.flagged))
    return markups_document(points, locked)


def write_markups_json(discs, path, locked: bool = False) -> None:
    write_json(path, markups_dict(discs, locked))


def read_markups_json(path):
    """Control points of a .mrk.json as (label, RAS position, description) tuples."""
    points = read_control_points(path)
    unplaced = [point["label"] for point in points if point["lps"] is None]
    if unplaced:
        raise InputError(f"Cannot read markups file {path}: point {unplaced[0]!r} has no position")
    return [(point["label"], point["lps"] * [-1.0, -1.0, 1.0], point["description"])
            for point in points]


def write_csv(discs, path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for disc in discs:
        r, a, s = (float(v) for v in disc.ras)
        writer.writerow([disc.name, disc.value, f"{r:.2f}", f"{a:.2f}", f"{s:.2f}",
                         f"{disc.confidence:.3f}", int(disc.flagged), disc.reason])
    write_atomic_bytes(path, buffer.getvalue().encode())


def disc_label_image(discs, reference: Volume) -> sitk.Image:
    """SCT disc-label image in the reference grid: value 3..8 at the voxel nearest each disc."""
    shape = reference.array.shape
    labels = np.zeros(shape[::-1], np.uint8)  # built in SimpleITK's (k, j, i) order: no transposed copy
    for disc in discs:
        ijk = np.rint(reference.ras_to_index(disc.ras)[0]).astype(int)
        if np.all(ijk >= 0) and np.all(ijk < shape):
            labels[tuple(ijk[::-1])] = disc.value
    image = sitk.GetImageFromArray(labels)
    reference.copy_geometry_to(image)
    return image


def write_disc_label_nifti(discs, reference: Volume, path) -> None:
    write_image_atomic(disc_label_image(discs, reference), path)


def qc_image(result, scale: int = 2):
    """The midsagittal slice with the labeled discs drawn on it (PIL image)."""
    plane = result.slice
    gray = np.clip(normalize_intensity(plane.image, plane.inside) * 200, 0, 255).astype(np.uint8)
    image = Image.fromarray(gray).convert("RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for disc in result.discs:
        r, c = plane.ras_to_pixel(disc.ras)[0] * scale
        colour = (255, 70, 70) if disc.flagged else (80, 255, 120)
        draw.ellipse([c - 4, r - 4, c + 4, r + 4], outline=colour, width=2)
        draw.text((c + 8, r - 6), f"{disc.name} {disc.confidence:.2f}", fill=colour)
    title = f"{result.model_name}  midline R={result.midline.offset:.1f} mm"
    if not result.spine_found:
        title += "  NO SPINE FOUND"
    draw.text((4, 4), title, fill=(255, 255, 0))
    return image


def write_qc_png(result, path) -> None:
    buffer = io.BytesIO()
    # zlib level 1: a third of the default's encoding time (the batch writes one per volume)
    qc_image(result).save(buffer, format="PNG", compress_level=1)
    write_atomic_bytes(path, buffer.getvalue())
