"""Decoding of 2D image files into float32 model inputs in the 0..255 range.

Supported files are PNG, JPEG, BMP and TIFF with 8 or 16 bits per sample, in
grayscale, RGB, RGBA, grayscale with alpha, or palette form. Every image goes
through the same steps:

1. The EXIF orientation is applied, so that the image is upright.
2. The pixels become float32 in 0..255. 8-bit values are kept as they are.
   Images with more than 8 bits per sample (16-bit PNG and TIFF, 32-bit integer
   or float TIFF) are scaled linearly from their own min..max range to 0..255,
   so that a 16-bit image whose values span 1000..1100 keeps its contrast.
3. An alpha channel is dropped only if it is fully opaque. Any transparent or
   translucent pixel makes the file invalid (`DecodeError`), because filling
   those pixels would invent image content. Palette images with a transparent
   entry and PNGs with a transparent colour key are checked the same way.
4. The image is resized to the model size with bilinear interpolation, in one
   of two modes. 'stretch' ignores the aspect ratio, as
   `keras.utils.image_dataset_from_directory` does. 'pad' keeps the aspect
   ratio, fits the longer side and centres the image on a canvas of the
   background value. Without antialiasing the result equals
   `tf.image.resize(method='bilinear')` (half-pixel centres), which is what
   `image_dataset_from_directory` calls. That filter reads only the two nearest
   source rows and columns, so shrinking a 991 px MIP to 224 px skips rows.
   With antialias=True, Pillow's bilinear filter widens its support when
   shrinking and every source pixel contributes.
5. Grayscale becomes 3 channels by repetition.
"""

import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from flax_pet.data import defaults

logger = logging.getLogger(__name__)

# Formats as Pillow names them. MPO is the multi-picture JPEG variant that
# phones write; its first frame is the primary image.
SUPPORTED_FORMATS = ('PNG', 'JPEG', 'MPO', 'BMP', 'TIFF')

# Pillow modes that hold more than 8 bits per sample and are scaled by their
# own min..max range.
_HIGH_BIT_DEPTH_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F')

# Pillow modes that are converted to RGB before anything else.
_COLOUR_MODES_TO_RGB = ('CMYK', 'YCbCr', 'LAB', 'HSV')

_EXIF_ORIENTATION_TAG = 0x0112


class DecodeError(ValueError):
  """Raised for a file that cannot become a model input.

  Attributes:
    path: the file, as given to the decoder.
    reason: what is wrong with it, without the path.
  """

  def __init__(self, path: str | os.PathLike, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = str(path)
    self.reason = reason


def normalize_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
  """Return the model input size as (height, width).

  Args:
    image_size: one int for a square, or (height, width).

  Returns:
    (height, width) as positive ints.

  Raises:
    ValueError: if the size is not one or two positive ints.
  """
  if isinstance(image_size, (int, np.integer)):
    size = (int(image_size), int(image_size))
  else:
    size = tuple(int(value) for value in image_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(
        f'image_size={image_size!r} is invalid: pass one positive int or '
        '(height, width)'
    )
  return size


def decode_image(
    path: str | os.PathLike,
    image_size: int | Sequence[int] = defaults.IMAGE_SIZE,
    resize: str = defaults.RESIZE,
    *,
    antialias: bool = defaults.ANTIALIAS,
    pad_value: float | None = None,
) -> np.ndarray:
  """Decode one image file into a float32 (height, width, 3) array in 0..255.

  Args:
    path: a PNG, JPEG, BMP or TIFF file.
    image_size: output size, one int for a square or (height, width).
    resize: 'stretch' or 'pad' (see the module docstring).
    antialias: filter when shrinking, instead of reading only the nearest two
      rows and columns as tf.image.resize does by default.
    pad_value: value of the padding in 0..255 when resize='pad'. None uses
      the median of the image's outermost pixels, per channel, which is the
      background of a PET image whether or not its grey scale is inverted.

  Returns:
    float32 array of shape (height, width, 3) with values in 0..255.

  Raises:
    DecodeError: if the file is empty, not a supported image, truncated or
      corrupt, has several frames, has a non-opaque alpha channel, or is a
      high bit depth image with one value everywhere.
    FileNotFoundError: if the file does not exist.
  """
  data = Path(path).read_bytes()
  return decode_image_bytes(
      data,
      image_size,
      resize,
      name=str(path),
      antialias=antialias,
      pad_value=pad_value,
  )


def decode_image_bytes(
    data: bytes,
    image_size: int | Sequence[int] = defaults.IMAGE_SIZE,
    resize: str = defaults.RESIZE,
    *,
    name: str = '<bytes>',
    antialias: bool = defaults.ANTIALIAS,
    pad_value: float | None = None,
) -> np.ndarray:
  """Decode the bytes of one image file; see `decode_image`.

  Args:
    data: the complete file content.
    image_size: output size, one int for a square or (height, width).
    resize: 'stretch' or 'pad'.
    name: the file name used in error messages.
    antialias: filter when shrinking (see `decode_image`).
    pad_value: padding value for resize='pad', or None for the border median.

  Returns:
    float32 array of shape (height, width, 3) with values in 0..255.

  Raises:
    DecodeError: as `decode_image`.
    ValueError: if image_size, resize or pad_value is invalid.
  """
  size = normalize_image_size(image_size)
  if resize not in defaults.RESIZE_MODES:
    raise ValueError(
        f'resize={resize!r} is invalid: use one of {defaults.RESIZE_MODES}'
    )
  if pad_value is not None and not 0.0 <= pad_value <= 255.0:
    raise ValueError(f'pad_value={pad_value} is invalid: use a value in 0..255')

  pixels = _read_pixels(data, name)

  if resize == 'stretch':
    resized = _resize_channels(pixels, size, antialias)
  else:
    resized = _resize_and_pad(pixels, size, antialias, pad_value)

  if resized.shape[-1] == 1:
    resized = np.repeat(resized, 3, axis=-1)
  return np.clip(resized, 0.0, 255.0).astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True)
class DecodedFiles:
  """Images decoded by `decode_files`.

  Attributes:
    images: float32 array (N, height, width, 3) in 0..255, one per decoded file.
    paths: the decoded files, in the order of `images`.
    errors: the files that failed, in input order.
  """

  images: np.ndarray
  paths: list[str]
  errors: list[DecodeError]


def decode_files(
    paths: Sequence[str | os.PathLike],
    image_size: int | Sequence[int] = defaults.IMAGE_SIZE,
    resize: str = defaults.RESIZE,
    *,
    antialias: bool = defaults.ANTIALIAS,
    pad_value: float | None = None,
    strict: bool = False,
    progress: bool = True,
) -> DecodedFiles:
  """Decode many image files into one array, without a TFDS cache.

  Each file that fails is logged as a warning with its reason and left out;
  no other image takes its place.

  Args:
    paths: image files.
    image_size: output size, one int for a square or (height, width).
    resize: 'stretch' or 'pad'.
    antialias: filter when shrinking (see `decode_image`).
    pad_value: padding value for resize='pad', or None for the border median.
    strict: raise on the first file that fails instead of leaving it out.
    progress: show a tqdm progress bar.

  Returns:
    The decoded images, their paths and the errors.

  Raises:
    DecodeError: in strict mode, for the first file that fails.
  """
  height, width = normalize_image_size(image_size)
  images, decoded_paths, errors = [], [], []

  for path in tqdm(paths, desc='Decoding images', unit='img', disable=not progress):
    try:
      data = Path(path).read_bytes()
      images.append(
          decode_image_bytes(
              data,
              (height, width),
              resize,
              name=str(path),
              antialias=antialias,
              pad_value=pad_value,
          )
      )
    except OSError as error:
      failure = DecodeError(path, f'cannot read the file: {error}')
    except DecodeError as error:
      failure = error
    else:
      decoded_paths.append(str(path))
      continue

    if strict:
      raise failure
    logger.warning('Skipping %s: %s', failure.path, failure.reason)
    errors.append(failure)

  stacked = (
      np.stack(images) if images else np.zeros((0, height, width, 3), np.float32)
  )
  return DecodedFiles(images=stacked, paths=decoded_paths, errors=errors)


def _read_pixels(data: bytes, name: str) -> np.ndarray:
  """Decode to float32 (H, W, C) in 0..255 with C in (1, 3), upright and without alpha."""
  if not data:
    raise DecodeError(name, 'file is empty (0 bytes)')

  # verify() checks a PNG's chunk CRCs and its end without decoding. Other
  # formats are checked by load() below.
  try:
    with Image.open(io.BytesIO(data)) as probe:
      image_format = probe.format
      probe.verify()
  except UnidentifiedImageError as error:
    raise DecodeError(
        name, f'not an image in a supported format ({", ".join(SUPPORTED_FORMATS)})'
    ) from error
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
    raise DecodeError(name, f'corrupt or truncated {image_format} file: {error}') from error

  if image_format not in SUPPORTED_FORMATS:
    raise DecodeError(
        name,
        f'{image_format} files are not supported; convert it to one of '
        f'{", ".join(SUPPORTED_FORMATS)}',
    )

  image = Image.open(io.BytesIO(data))
  frame_count = getattr(image, 'n_frames', 1)
  if frame_count > 1 and image_format != 'MPO':
    raise DecodeError(
        name, f'has {frame_count} frames; expected a single 2D image per file'
    )

  # Pillow clears `tile` on load(), so the raw sample layout is read first.
  rawmode = _tile_rawmode(image)
  orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  if image.mode in ('RGB', 'RGBA') and ';16' in rawmode:
    # Pillow (13.0) keeps only the high byte of 16-bit colour samples.
    if image_format != 'PNG':
      raise DecodeError(
          name,
          f'16-bit colour {image_format} files are not supported because '
          'Pillow drops the low byte; save it as a 16-bit PNG or as '
          'grayscale',
      )
    pixels = _decode_png_16bit_colour(data, name)
    return _apply_orientation(pixels, orientation)

  try:
    with _truncated_images_rejected():
      image.load()
    image = ImageOps.exif_transpose(image)
  except (OSError, SyntaxError, ValueError, EOFError) as error:
    raise DecodeError(name, f'corrupt or truncated {image_format} file: {error}') from error

  return _pixels_from_pil(image, name)


@contextlib.contextmanager
def _truncated_images_rejected():
  """Make Pillow raise on truncated data even if ImageFile.LOAD_TRUNCATED_IMAGES is set.

  With that flag, Pillow 13 decodes a truncated JPEG, BMP or TIFF file
  without error and leaves the missing pixels filled in.
  """
  previous = ImageFile.LOAD_TRUNCATED_IMAGES
  if not previous:
    yield
    return
  # NOTE: the flag is global, so it is also cleared for another thread that
  # decodes at the same moment.
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    yield
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _tile_rawmode(image: Image.Image) -> str:
  for tile in image.tile:
    args = tile[3]
    if isinstance(args, str):
      return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
      return args[0]
  return ''


def _pixels_from_pil(image: Image.Image, name: str) -> np.ndarray:
  """Convert a loaded Pillow image to float32 (H, W, C) in 0..255 with C in (1, 3)."""
  transparency = image.info.get('transparency')

  if image.mode in ('P', 'PA'):
    has_alpha = image.mode == 'PA' or transparency is not None
    image = image.convert('RGBA' if has_alpha else 'RGB')
    transparency = None
  elif image.mode == '1':
    image = image.convert('L')
  elif image.mode in _COLOUR_MODES_TO_RGB:
    image = image.convert('RGB')
  elif image.mode in ('La', 'RGBa'):
    image = image.convert(image.mode.upper())

  mode = image.mode
  if mode in ('LA', 'RGBA'):
    values = np.asarray(image)
    _check_opaque(values[..., -1], 255, name)
    pixels = values[..., :-1].astype(np.float32)
  elif mode in ('L', 'RGB'):
    values = np.asarray(image)
    _check_colour_key(values, transparency, name)
    pixels = values.astype(np.float32)
  elif mode in _HIGH_BIT_DEPTH_MODES:
    values = np.asarray(image)
    _check_colour_key(values, transparency, name)
    pixels = _scale_min_max(values, name)
  else:
    raise DecodeError(name, f'unsupported Pillow image mode {mode!r}')

  if pixels.ndim == 2:
    pixels = pixels[..., None]
  return pixels


def _decode_png_16bit_colour(data: bytes, name: str) -> np.ndarray:
  """Decode a 16-bit RGB, RGBA or grayscale-alpha PNG with TensorFlow, which keeps all 16 bits."""
  import tensorflow as tf  # Imported here: only these rare files need it.

  try:
    values = tf.io.decode_png(data, channels=0, dtype=tf.uint16).numpy()
  except tf.errors.InvalidArgumentError as error:
    raise DecodeError(name, f'corrupt 16-bit PNG: {error.message}') from error

  if values.shape[-1] in (2, 4):
    _check_opaque(values[..., -1], np.iinfo(np.uint16).max, name)
    values = values[..., :-1]
  return _scale_min_max(values, name)


def _apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
  """Apply an EXIF orientation (1-8) to an (H, W, C) array, as ImageOps.exif_transpose does."""
  if orientation == 2:
    return pixels[:, ::-1]
  if orientation == 3:
    return pixels[::-1, ::-1]
  if orientation == 4:
    return pixels[::-1]
  if orientation == 5:
    return pixels.swapaxes(0, 1)
  if orientation == 6:
    return np.rot90(pixels, k=-1)
  if orientation == 7:
    return pixels[::-1, ::-1].swapaxes(0, 1)
  if orientation == 8:
    return np.rot90(pixels, k=1)
  return pixels


def _check_opaque(alpha: np.ndarray, opaque: int, name: str) -> None:
  not_opaque = int(np.count_nonzero(alpha != opaque))
  if not_opaque:
    raise DecodeError(
        name,
        f'alpha channel is not fully opaque ({not_opaque} of {alpha.size} '
        'pixels are transparent or translucent); flatten the image onto its '
        'background before training',
    )


def _check_colour_key(values: np.ndarray, transparency, name: str) -> None:
  """Reject a PNG whose tRNS colour key (the transparent colour) occurs in the image."""
  if transparency is None or isinstance(transparency, bytes):
    return
  key = np.asarray(transparency)
  matches = np.all(values == key, axis=-1) if values.ndim == 3 else values == key
  transparent = int(np.count_nonzero(matches))
  if transparent:
    raise DecodeError(
        name,
        f'{transparent} of {matches.size} pixels have the transparent colour '
        f'{transparency!r}; flatten the image onto its background before '
        'training',
    )


def _scale_min_max(values: np.ndarray, name: str) -> np.ndarray:
  """Scale a high bit depth array linearly from its own min..max to 0..255."""
  values = values.astype(np.float64)
  if not np.isfinite(values).all():
    raise DecodeError(name, 'contains NaN or infinite values')
  low, high = float(values.min()), float(values.max())
  if high == low:
    raise DecodeError(
        name,
        f'every pixel has the value {low:g}, so there is no min..max range to '
        'scale to 0..255',
    )
  return ((values - low) * (255.0 / (high - low))).astype(np.float32)


def _resize_channels(
    pixels: np.ndarray, size: tuple[int, int], antialias: bool
) -> np.ndarray:
  """Resize float32 (H, W, C) to size=(height, width) with bilinear interpolation."""
  height, width = size
  if pixels.shape[:2] == (height, width):
    return pixels
  if not antialias:
    return _resize_bilinear(pixels, size)

  # PET images stored as RGB usually have R = G = B: resize one channel.
  channels = pixels.shape[-1]
  if channels == 3 and _channels_equal(pixels):
    return np.repeat(_resize_channels(pixels[..., :1], size, antialias), 3, axis=-1)

  resized = [
      np.asarray(
          Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize(
              (width, height), Image.Resampling.BILINEAR
          )
      )
      for c in range(channels)
  ]
  return np.stack(resized, axis=-1)


def _resize_bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resize like tf.image.resize(method='bilinear', antialias=False)."""
  rows_low, rows_high, row_weights = _bilinear_taps(pixels.shape[0], size[0])
  cols_low, cols_high, col_weights = _bilinear_taps(pixels.shape[1], size[1])

  col_weights = col_weights[None, :, None]
  top = pixels[rows_low]
  top = top[:, cols_low] + (top[:, cols_high] - top[:, cols_low]) * col_weights
  bottom = pixels[rows_high]
  bottom = (
      bottom[:, cols_low] + (bottom[:, cols_high] - bottom[:, cols_low]) * col_weights
  )
  return top + (bottom - top) * row_weights[:, None, None]


def _bilinear_taps(in_size: int, out_size: int):
  """Return the two source indices and the weight of the second, per output pixel.

  Half-pixel centres as in TensorFlow's ResizeBilinear kernel: output pixel i
  samples source coordinate (i + 0.5) * in_size / out_size - 0.5, and indices
  outside the image are clamped to its edge.
  """
  centres = (np.arange(out_size, dtype=np.float32) + 0.5) * np.float32(
      in_size / out_size
  ) - 0.5
  floors = np.floor(centres)
  low = np.clip(floors, 0, in_size - 1).astype(np.int64)
  high = np.clip(np.ceil(centres), 0, in_size - 1).astype(np.int64)
  return low, high, (centres - floors).astype(np.float32)


def _channels_equal(pixels: np.ndarray) -> bool:
  return bool(
      np.array_equal(pixels[..., 0], pixels[..., 1])
      and np.array_equal(pixels[..., 0], pixels[..., 2])
  )


def _resize_and_pad(
    pixels: np.ndarray,
    size: tuple[int, int],
    antialias: bool,
    pad_value: float | None,
) -> np.ndarray:
  """Fit the image inside size, keeping its aspect ratio, and centre it on the background."""
  height, width = size
  source_height, source_width = pixels.shape[:2]
  scale = min(height / source_height, width / source_width)
  fitted_height = min(height, max(1, round(source_height * scale)))
  fitted_width = min(width, max(1, round(source_width * scale)))

  if pad_value is None:
    background = _border_median(pixels)
  else:
    background = np.full(pixels.shape[-1], pad_value, np.float32)

  canvas = np.empty((height, width, pixels.shape[-1]), np.float32)
  canvas[...] = background
  top = (height - fitted_height) // 2
  left = (width - fitted_width) // 2
  canvas[top:top + fitted_height, left:left + fitted_width] = _resize_channels(
      pixels, (fitted_height, fitted_width), antialias
  )
  return canvas


def _border_median(pixels: np.ndarray) -> np.ndarray:
  """Return the per-channel median of the outermost row and column of pixels."""
  border = np.concatenate(
      [pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]], axis=0
  )
  return np.median(border, axis=0).astype(np.float32)
