"""Render 2D views of a canonical PET volume and map them to 16-bit pixels.

A view is a maximum intensity projection (MIP) or one slice, in the axial,
coronal or sagittal plane. Rendered images have square pixels: the axis with
the coarser spacing is resampled to the finer spacing, so no information of
the finer axis is lost.
"""

import dataclasses
import re

import numpy as np

from flax_pet.ingest.errors import IngestError
from flax_pet.ingest.volume import CANONICAL_AXES, PetVolume

PLANES = ('axial', 'coronal', 'sagittal')
RESAMPLING_METHODS = ('linear', 'nearest')
PNG_MAX = 65535

# The canonical volume axis that each plane's views project along or cut.
_PLANE_AXIS = {'axial': 0, 'coronal': 1, 'sagittal': 2}

# Spacings that differ by less than this fraction count as equal (no resampling).
_SQUARE_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One 2D view: a MIP (index None) or slice `index` of a plane.

  Slice indices count along the canonical axis that the plane cuts, from 0:
  axial from the most superior slice, coronal from the most anterior,
  sagittal from the patient's right.
  """

  plane: str
  index: int | None = None

  @property
  def name(self) -> str:
    """File-name token: 'coronal_mip' or 'axial-40'."""
    if self.index is None:
      return f'{self.plane}_mip'
    return f'{self.plane}-{self.index}'

  @property
  def text(self) -> str:
    """The command-line form: 'coronal_mip' or 'axial:40'."""
    if self.index is None:
      return f'{self.plane}_mip'
    return f'{self.plane}:{self.index}'


@dataclasses.dataclass
class RenderedView:
  """A rendered 2D view with square pixels, in the volume's units.

  Attributes:
    view: What was rendered.
    image: float32 array (rows, columns).
    pixel_spacing_mm: Size of the square output pixels in mm.
    row_axis: Anatomical direction in which the row index increases.
    column_axis: Anatomical direction in which the column index increases.
    description: How the image was formed, e.g. 'maximum intensity projection
      along anterior->posterior'.
    resampling: How pixels were made square, e.g. 'none' or 'linear
      interpolation of rows from 5.000 mm to 4.073 mm'.
  """

  view: ViewSpec
  image: np.ndarray
  pixel_spacing_mm: float
  row_axis: str
  column_axis: str
  description: str
  resampling: str


def parse_view(text: str) -> ViewSpec:
  """Parse a view: 'coronal_mip', 'sagittal_mip', 'axial_mip' or '<plane>:<index>'.

  Raises:
    IngestError: if the text is neither form, or the index is negative.
  """
  text = text.strip()
  match = re.fullmatch(r'(axial|coronal|sagittal)(?:_mip|:(\d+))', text)
  if match is None:
    raise IngestError(
        f'Invalid view {text!r}. Use coronal_mip, sagittal_mip, axial_mip, or a '
        'slice such as axial:40, coronal:32, sagittal:10 (0-based index).'
    )
  plane, index = match.groups()
  return ViewSpec(plane=plane, index=None if index is None else int(index))


def render_view(
    volume: PetVolume, view: ViewSpec, resample: str = 'linear'
) -> RenderedView:
  """Render a MIP or slice of the volume with square pixels.

  Args:
    volume: A volume in canonical orientation.
    view: The projection or slice to render.
    resample: 'linear' or 'nearest' interpolation along the coarser axis.
      Upsampling with 'nearest' repeats source pixels, so it keeps every
      source value (and the maximum) exactly, while 'linear' can lower a peak
      that falls between output pixel centers.

  Returns:
    The rendered image and its geometry.

  Raises:
    IngestError: if the slice index is out of range, or the image would be
      less than 2 pixels along an axis (e.g. a coronal view of one slice).
  """
  if resample not in RESAMPLING_METHODS:
    raise IngestError(f'resample must be one of {RESAMPLING_METHODS}, got {resample!r}.')

  axis = _PLANE_AXIS[view.plane]
  size = volume.data.shape[axis]
  if view.index is None:
    image = np.max(volume.data, axis=axis)
    description = f'maximum intensity projection along {CANONICAL_AXES[axis]}'
  else:
    if view.index >= size:
      raise IngestError(
          f'{volume.source_path}: view {view.text} is out of range. The volume '
          f'has {size} {view.plane} slices (indices 0 to {size - 1}, counted '
          f'{CANONICAL_AXES[axis]}).'
      )
    image = np.take(volume.data, view.index, axis=axis)
    description = f'slice {view.index} of {size} along {CANONICAL_AXES[axis]}'

  in_plane_axes = [a for a in range(3) if a != axis]
  row_spacing, column_spacing = (volume.spacing_mm[a] for a in in_plane_axes)
  for a in in_plane_axes:
    if volume.data.shape[a] < 2:
      raise IngestError(
          f'{volume.source_path}: view {view.text} needs at least 2 voxels along '
          f'{CANONICAL_AXES[a]}, but the volume has {volume.data.shape[a]} '
          f'(shape {volume.data.shape}). Use an axial view for single slices.'
      )

  image, pixel_spacing, resampling = _make_pixels_square(
      image.astype(np.float32), row_spacing, column_spacing, resample
  )
  return RenderedView(
      view=view,
      image=image,
      pixel_spacing_mm=pixel_spacing,
      row_axis=CANONICAL_AXES[in_plane_axes[0]],
      column_axis=CANONICAL_AXES[in_plane_axes[1]],
      description=description,
      resampling=resampling,
  )


def window_to_uint16(
    image: np.ndarray,
    window: tuple[float, float] | None = None,
    invert: bool = False,
) -> tuple[np.ndarray, tuple[float, float]]:
  """Map values in a window linearly to 0..65535, clipping outside it.

  A pixel p decodes back to lo + p / 65535 * (hi - lo), within half a
  quantization step (hi - lo) / 131070, for values inside the window. With
  `invert`, p is stored as 65535 - p so that high values are dark.

  Args:
    image: Values in the volume's units.
    window: (lo, hi); default (0, image maximum).
    invert: Store dark for high values, as printed MIPs often are.

  Returns:
    The uint16 image and the window used.

  Raises:
    IngestError: if hi <= lo (with the default window: the image maximum is
      not above 0) or a bound is not finite.
  """
  if window is None:
    low, high = 0.0, float(np.max(image))
  else:
    low, high = float(window[0]), float(window[1])
  if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
    default_note = ' (default window 0..image maximum)' if window is None else ''
    raise IngestError(
        f'Invalid window [{low}, {high}]{default_note}: the upper bound must be '
        'above the lower. An image whose maximum is not above 0 needs an explicit '
        'window (--window LO HI).'
    )

  scaled = (np.clip(image.astype(np.float64), low, high) - low) / (high - low)
  pixels = np.rint(scaled * PNG_MAX).astype(np.uint16)
  if invert:
    pixels = PNG_MAX - pixels
  return pixels, (low, high)


def uint16_to_values(
    pixels: np.ndarray, window: tuple[float, float], invert: bool = False
) -> np.ndarray:
  """Invert `window_to_uint16`: decode 16-bit pixels to values in the window's units."""
  pixels = np.asarray(pixels, dtype=np.float64)
  if invert:
    pixels = PNG_MAX - pixels
  low, high = window
  return low + pixels / PNG_MAX * (high - low)


def _make_pixels_square(image, row_spacing, column_spacing, method):
  """Resample the coarser axis to the finer spacing; return image, spacing, description."""
  target = min(row_spacing, column_spacing)
  if abs(row_spacing - column_spacing) <= _SQUARE_TOLERANCE * target:
    return image, float(target), 'none (pixels already square)'

  axis = 0 if row_spacing > column_spacing else 1
  source_spacing = max(row_spacing, column_spacing)
  resampled = _resample_axis(image, axis, source_spacing, target, method)
  axis_name = 'rows' if axis == 0 else 'columns'
  description = (
      f'{method} interpolation along {axis_name} from {source_spacing:.4f} mm to '
      f'{target:.4f} mm (pixel centers on a grid starting half a pixel in from '
      'the first source pixel edge; edge values repeated)'
  )
  return resampled, float(target), description


def _resample_axis(image, axis, source_spacing, target_spacing, method):
  size = image.shape[axis]
  out_size = max(1, int(round(size * source_spacing / target_spacing)))

  # Output pixel o covers [o, o + 1) * target mm from the first source edge.
  # Source pixel i has its center at i + 0.5 source pixels from that edge, so
  # the output center lies at the fractional source index computed here.
  centers = (np.arange(out_size) + 0.5) * target_spacing / source_spacing - 0.5
  centers = np.clip(centers, 0.0, size - 1)

  moved = np.moveaxis(image, axis, 0)
  if method == 'nearest':
    resampled = moved[np.floor(centers + 0.5).astype(np.int64)]
  else:
    lower = np.floor(centers).astype(np.int64)
    upper = np.minimum(lower + 1, size - 1)
    weight = (centers - lower).astype(np.float32)[:, None]
    resampled = (1.0 - weight) * moved[lower] + weight * moved[upper]
  return np.moveaxis(resampled.astype(np.float32), 0, axis)
