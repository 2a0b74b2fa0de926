"""AP spine radiographs: reading images, the network input geometry and training-time
augmentation (the AASCE data set and its split: ``aasce``).

Geometry bookkeeping: the network sees a fixed ``INPUT_SHAPE`` (rows, cols) picture made by one
affine map from the original pixel grid (uniform scale so that the image height fills the input
height, centred horizontally; training adds random scale, rotation and shift).  The map is kept
as a 3x3 matrix ``input_to_pixel`` (homogeneous (x, y) -> (x, y)), so predicted points go back to
original pixels exactly, and from there to physical space with the image's spacing and origin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..io.images import check_geometry, read_image
from .cobb import CORNER_NAMES, N_VERTEBRAE, VERTEBRA_NAMES

#: Network input (rows, cols).  A ~850 x 2400 radiograph becomes about 230 x 640.
INPUT_SHAPE = (640, 320)
#: Output stride of the landmark network (input pixels per output cell).
STRIDE = 4
#: Corner offsets are regressed in units of this many input pixels.
OFFSET_SCALE = 16.0
#: Gaussian width (output cells) of the vertebra-centre heatmap targets.
HEATMAP_SIGMA = 1.3
#: Smallest image side accepted (pixels); a spine needs room for 17 vertebrae.
MIN_SIDE = 64

POINT_LABELS = tuple(f"{v}-{c}" for v in VERTEBRA_NAMES for c in CORNER_NAMES)


# -- images ----------------------------------------------------------------------------------
@dataclass
class Radiograph:
    """A 2D grayscale radiograph: ``array`` (rows, cols) float32, pixel spacing/origin (x, y)."""

    array: np.ndarray
    spacing: tuple = (1.0, 1.0)
    origin: tuple = (0.0, 0.0)
    name: str = "xray"
    slice_z: float = 0.0  #: z (mm) of a single-slice 3D image, kept in the exported points

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    def pixel_to_physical(self, xy) -> np.ndarray:
        """(N, 2) pixel (x = column, y = row) -> physical (x, y) in mm (LPS of a 2D image)."""
        xy = np.asarray(xy, float)
        return xy * np.asarray(self.spacing, float) + np.asarray(self.origin, float)

    def physical_to_pixel(self, xy) -> np.ndarray:
        xy = np.asarray(xy, float)
        return (xy - np.asarray(self.origin, float)) / np.asarray(self.spacing, float)


def _to_gray(array: np.ndarray, components: int) -> np.ndarray:
    if components == 1:
        return array.astype(np.float32)
    if components in (3, 4):
        rgb = array[..., :3].astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    raise InputError(f"The image has {components} components per pixel; a grayscale or RGB "
                     "radiograph is needed.")


def radiograph_from_sitk(image, name: str = "xray") -> Radiograph:
    """Validate a SimpleITK image and turn it into a 2D grayscale :class:`Radiograph`.

    Accepts 2D images and 3D images with a single slice (DICOM, NRRD from Slicer); refuses
    volumes, tiny images and constant (empty) images with a message saying why.
    """
    size = image.GetSize()
    dim = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    if dim == 3:
        if sorted(size)[0] != 1:
            raise InputError(f"The image is a 3D volume of size {size}; an AP radiograph is a 2D "
                             "image (one slice).")
        if size[2] != 1:
            raise InputError(f"The single-slice image {size} is not in the x-y plane; export the "
                             "radiograph as a 2D image.")
        array = sitk.GetArrayFromImage(image)[0]
    elif dim == 2:
        array = sitk.GetArrayFromImage(image)
    else:
        raise InputError(f"The image is {dim}D; an AP radiograph is a 2D image.")
    array = _to_gray(array, components)
    if min(array.shape[:2]) < MIN_SIDE:
        raise InputError(f"The image is too small for a spine radiograph: {array.shape[1]} x "
                         f"{array.shape[0]} pixels (at least {MIN_SIDE} each way).")
    finite = np.isfinite(array)
    if not finite.all():
        if finite.mean() < 0.5:
            raise InputError("Most pixels are NaN or infinite; the image cannot be labeled.")
        array = np.where(finite, array, array[finite].min()).astype(np.float32)
    if float(array.max()) == float(array.min()):
        raise InputError("The image is empty (every pixel has the same value).")
    return Radiograph(array, (float(spacing[0]), float(spacing[1])),
                      (float(origin[0]), float(origin[1])), name,
                      float(origin[2]) if dim == 3 else 0.0)


#: Largest radiograph accepted (pixels per side, and in all), decided from the header: a
#: 2.4 MB PNG can declare 30000 x 30000 pixels (12 GB once decoded).  Digital radiographs are
#: at most about 4300 x 4300.
MAX_XRAY_SIDE = 10000
MAX_XRAY_PIXELS = 50_000_000


def check_header_2d(size, spacing, origin, direction) -> None:
    """Radiograph limits from the header alone (see :func:`volume.check_geometry`)."""
    check_geometry(size, spacing, origin, direction, max_side=MAX_XRAY_SIDE,
                   max_voxels=MAX_XRAY_PIXELS, what="image", spacing_range=(1e-3, 100.0),
                   max_extent=float("inf"))


def read_radiograph(path: str | os.PathLike) -> Radiograph:
    """Read any 2D image SimpleITK opens (JPEG, PNG, DICOM file or folder, NRRD, ...)."""
    path = Path(path)
    image = read_image(path, check=check_header_2d)  # InputError for missing / unreadable / too big
    name = path.name
    for suffix in (".nii.gz", ".nrrd", ".jpeg", ".jpg", ".png", ".dcm", ".tif", ".tiff", ".mha",
                   ".nii", ".bmp"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return radiograph_from_sitk(image, name or "xray")


def normalize(array: np.ndarray) -> np.ndarray:
    """Intensities to about [0, 1] (1st-99.5th percentile of the non-black pixels)."""
    values = array[array > array.min()] if np.any(array > array.min()) else array.ravel()
    lo, hi = np.percentile(values, [1.0, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


# -- input geometry --------------------------------------------------------------------------
def base_transform(height: int, width: int, shape=INPUT_SHAPE) -> np.ndarray:
    """3x3 map input pixel (x, y) -> original pixel (x, y): the height fills the input, centred.

    Pixel-index convention throughout: the centre of pixel (column j, row i) is at (j, i).
    """
    rows, cols = shape
    scale = height / rows  # original pixels per input pixel
    matrix = np.eye(3)
    matrix[0, 0] = matrix[1, 1] = scale
    matrix[0, 2] = (width - 1) / 2.0 - scale * (cols - 1) / 2.0
    matrix[1, 2] = (height - 1) / 2.0 - scale * (rows - 1) / 2.0
    return matrix


def warp(array: np.ndarray, input_to_pixel: np.ndarray, shape=INPUT_SHAPE, order: int = 1) -> np.ndarray:
    """Sample ``array`` (rows, cols) on the input grid (bilinear); outside the image is 0."""
    m = input_to_pixel  # (x, y) convention; ndimage works in (row, col)
    matrix = np.array([[m[1, 1], m[1, 0]], [m[0, 1], m[0, 0]]])
    offset = np.array([m[1, 2], m[0, 2]])
    return ndimage.affine_transform(array, matrix, offset=offset, output_shape=shape, order=order,
                                    mode="constant", cval=0.0, prefilter=False).astype(np.float32)


def apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3x3 homogeneous 2D map to (N, 2) points."""
    xy = np.asarray(xy, float)
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def prepare_input(radiograph: Radiograph, shape=INPUT_SHAPE, normalized: np.ndarray | None = None):
    """Network input (rows, cols) float32 in [0, 1] and its input->original-pixel matrix.
    ``normalized``: ``normalize(radiograph.array)`` when the caller has it already (it is the
    slowest step on a full-size radiograph, and both landmark stages need it)."""
    images, matrices = prepare_inputs(radiograph, shape, normalized)
    return images[0], matrices[0]


def prepare_inputs(radiograph: Radiograph, shape=INPUT_SHAPE, normalized: np.ndarray | None = None,
                   views=None):
    """Network inputs (one per view) and their input->original-pixel matrices.  Each view is a 3x3
    map of input pixels onto the standard input (:func:`base_transform`: the identity is the
    standard view, and the default; a scale about the centre zooms, a translation moves the
    content).  The image is normalised and area-averaged once for all views."""
    views = [np.eye(3)] if views is None else views
    matrix = base_transform(radiograph.height, radiograph.width, shape)
    image = normalize(radiograph.array) if normalized is None else normalized
    k = int(np.floor(matrix[0, 0]))
    to_small = np.eye(3)
    if k >= 2:  # area-average first (anti-aliasing), then sample the small image
        rows, cols = -(-image.shape[0] // k) * k, -(-image.shape[1] // k) * k
        padded = np.pad(image, ((0, rows - image.shape[0]), (0, cols - image.shape[1])), mode="edge")
        image = padded.reshape(rows // k, k, cols // k, k).mean(axis=(1, 3))
        to_small = np.array([[1 / k, 0, -(k - 1) / (2 * k)], [0, 1 / k, -(k - 1) / (2 * k)], [0, 0, 1]])
    matrices = [matrix @ np.asarray(view, float) for view in views]
    return [warp(image, to_small @ m, shape) for m in matrices], matrices


def random_transform(rng: np.random.Generator, source_shape, shape=INPUT_SHAPE, strength=1.0) -> np.ndarray:
    """3x3 map input (x, y) -> cache (x, y): random scale, rotation, shift about the centre."""
    scale = np.exp(rng.uniform(np.log(0.85), np.log(1.2)) * strength)  # >1: zoom out
    angle = np.radians(rng.uniform(-10, 10) * strength)
    aspect = np.exp(rng.uniform(-0.08, 0.08) * strength)
    shift = rng.uniform([-25, -30], [25, 30]) * strength
    c, s = np.cos(angle), np.sin(angle)
    linear = np.array([[c, -s], [s, c]]) @ np.diag([scale * aspect, scale / aspect])
    centre_in = np.array([shape[1] - 1, shape[0] - 1]) / 2.0
    centre_src = np.array([source_shape[1] - 1, source_shape[0] - 1]) / 2.0 + shift
    m = np.eye(3)
    m[:2, :2] = linear
    m[:2, 2] = centre_src - linear @ centre_in
    return m


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = np.exp(rng.uniform(-0.4, 0.4))
    out = np.clip(image, 0, 1) ** gamma
    out = out * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.3:
        out = ndimage.gaussian_filter(out, rng.uniform(0.5, 1.2))
    out = out + rng.normal(0, rng.uniform(0, 0.04), out.shape)
    if rng.random() < 0.1:
        out = 1.0 - out  # some radiographs are stored inverted
    return out.astype(np.float32)


def mirror_offsets(offsets) -> np.ndarray:
    """Corner vectors (..., 4, 2) relative to a point on the mirror axis, mirrored left-right: x
    negated and each vertebra's left and right corners swapping names (TL <-> TR, BL <-> BR), so
    the result is still in AASCE order.  Used to map a mirrored image's outputs back."""
    out = np.asarray(offsets)[..., [1, 0, 3, 2], :].copy()  # dtype kept (network outputs: float32)
    out[..., 0] *= -1.0
    return out


def mirror(image: np.ndarray, points) -> tuple:
    """The left-right mirror of an input image and its 68 points: x -> cols - 1 - x, corners
    renamed as :func:`mirror_offsets` (a scoliosis curve mirrored is another plausible curve)."""
    centre = (image.shape[1] - 1) / 2.0
    pts = mirror_offsets(np.asarray(points, float).reshape(-1, 4, 2) - [centre, 0.0]) + [centre, 0.0]
    return image[:, ::-1].copy(), pts.reshape(-1, 2)


def training_sample(image_u8, points, rng, strength=1.0, shape=INPUT_SHAPE, flip_probability=0.0):
    """One augmented (input image, 68 points in input pixels); ``strength`` scales the random
    geometry, ``flip_probability`` is the chance of a left-right mirror (:func:`mirror`)."""
    image = image_u8.astype(np.float32) / 255.0
    m = random_transform(rng, image.shape, shape, strength)
    warped = warp(image, m, shape)
    pts = apply(np.linalg.inv(m), points)
    if flip_probability > 0 and rng.random() < flip_probability:
        warped, pts = mirror(warped, pts)
    if strength > 0:
        warped = augment_intensity(warped, rng)
    return warped, pts


#: The level head's target: (vertebra index - LEVEL_CENTRE) / LEVEL_CENTRE, so T1 = -1, L5 = +1.
LEVEL_CENTRE = 8.0


def level_of(value):
    """Vertebra index (0 = T1 ... 16 = L5, continuous) from the level head's output."""
    return np.asarray(value, float) * LEVEL_CENTRE + LEVEL_CENTRE


#: The anchor head's two channels: the centre of T1 (first rib, clavicles above) and of L5 (sacrum
#: and iliac crests below): vertebra indices in the chain.
ANCHOR_VERTEBRAE = (0, N_VERTEBRAE - 1)


def anchor_targets(points, shape=INPUT_SHAPE, stride=STRIDE, sigma=HEATMAP_SIGMA) -> np.ndarray:
    """(H/s, W/s, 2): a Gaussian at the centre of T1 (channel 0) and of L5 (channel 1), peak
    exactly 1 at the nearest cell (the focal loss's positive), as the centre heatmap."""
    rows, cols = shape[0] // stride, shape[1] // stride
    corners = np.asarray(points, float).reshape(N_VERTEBRAE, len(CORNER_NAMES), 2)
    yy, xx = np.mgrid[0:rows, 0:cols]
    out = np.zeros((rows, cols, len(ANCHOR_VERTEBRAE)), np.float32)
    for channel, index in enumerate(ANCHOR_VERTEBRAE):
        cx, cy = (corners[index].mean(axis=0) + 0.5) / stride - 0.5
        out[..., channel] = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
        ix, iy = int(round(cx)), int(round(cy))
        if 0 <= ix < cols and 0 <= iy < rows:
            out[iy, ix, channel] = 1.0
    return out


def targets(points, shape=INPUT_SHAPE, stride=STRIDE, sigma=HEATMAP_SIGMA, with_level=False):
    """Heatmap (H/s, W/s, 1), offsets (H/s, W/s, 8) and regression mask (H/s, W/s, 1), and with
    ``with_level`` the level map (H/s, W/s, 1): each vertebra's index, scaled, in the same cells
    as its offsets (read only where the mask is set).

    The heatmap has one Gaussian per vertebra centre (mean of its four corners).  Offsets are
    (corner - cell centre) / OFFSET_SCALE, x then y per corner TL, TR, BL, BR, written in the
    3 x 3 cells around each centre so that a peak one cell off still reads good corners.
    """
    rows, cols = shape[0] // stride, shape[1] // stride
    heat = np.zeros((rows, cols), np.float32)
    offsets = np.zeros((rows, cols, 8), np.float32)
    mask = np.zeros((rows, cols), np.float32)
    level = np.zeros((rows, cols), np.float32)
    corners = np.asarray(points, float).reshape(N_VERTEBRAE, len(CORNER_NAMES), 2)
    yy, xx = np.mgrid[0:rows, 0:cols]
    cell_x = (xx + 0.5) * stride - 0.5
    cell_y = (yy + 0.5) * stride - 0.5
    for index, vertebra in enumerate(corners):
        centre = vertebra.mean(axis=0)
        cx, cy = (centre + 0.5) / stride - 0.5
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
        heat = np.maximum(heat, g)
        ix, iy = int(round(cx)), int(round(cy))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                x, y = ix + dx, iy + dy
                if 0 <= x < cols and 0 <= y < rows:
                    weight = 1.0 if dx == dy == 0 else 0.5
                    if weight <= mask[y, x]:
                        continue
                    rel = (vertebra - [cell_x[y, x], cell_y[y, x]]) / OFFSET_SCALE
                    offsets[y, x] = rel.ravel()
                    mask[y, x] = weight
                    level[y, x] = (index - LEVEL_CENTRE) / LEVEL_CENTRE
        if 0 <= ix < cols and 0 <= iy < rows:
            heat[iy, ix] = 1.0
    if with_level:
        return heat[..., None], offsets, mask[..., None], level[..., None]
    return heat[..., None], offsets, mask[..., None]
