"""Grad-CAM heatmaps, overlay images and the pointing-game score.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks
via Gradient-based Localization", ICCV 2017, arXiv:1610.02391) on the
backbone's last feature map, conv_7b, which the classifier head pools:

    score   = logit of the target class (the predicted class by default)
    w_k     = spatial mean of d(score) / d(A_k)        for each channel k
    cam     = ReLU(sum_k w_k A_k)                       [h, w]
    heatmap = bilinear upsampling of cam to the input size, then scaled
              per image to 0..1 by (cam - min) / (max - min)

The head averages the feature map before its first layer, so d(score)/d(A_k)
is the same at every position and w_k equals it.

NOTE: the feature map has 1x1 positions for inputs of 75 to 106 px, 2x2 up to
138 px, 3x3 up to 170 px, 5x5 at 224 px and 8x8 at 299 px. Below 107 px the
heatmap is constant and carries no location; such heatmaps are returned as
zeros and flagged in `GradCamResult.flat`.

The pointing game (Zhang et al., "Top-down Neural Attention by Excitation
Backprop", ECCV 2016, arXiv:1608.00507) counts a hit when the heatmap's
maximum falls inside the tumour mask. Masks are mapped into the model's input
geometry with the same 'stretch' or 'pad' geometry as
`flax_pet.data.decode.decode_image` uses for the image, by nearest-neighbour
sampling. The random baseline is the chance that a uniformly random pixel of
the image region (padding excluded) hits the mask, which is the mask's area
fraction of that region.
"""

from collections.abc import Callable, Sequence
import functools
import logging
import os
from pathlib import Path
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from flax_pet import metrics
from flax_pet import models
from flax_pet import preprocessing
from flax_pet.data import decode

logger = logging.getLogger(__name__)

# Pointing-game tolerance in pixels of the model input: a peak within this
# Euclidean distance of a mask pixel is a hit. Zhang et al. used 15 px at
# their image scale; 0 means the peak pixel itself must be in the mask.
DEFAULT_TOLERANCE_PX = 0

# Overlay appearance: matplotlib colormap name and heatmap opacity (0..1).
DEFAULT_COLORMAP = 'jet'
DEFAULT_ALPHA = 0.4

# A heatmap whose range (max - min) is at most this fraction of its maximum
# is flat: it has no single location to point at.
_FLAT_RELATIVE_RANGE = 1e-6

# 8-bit mask pixels at or above this value are tumour ("white = tumour").
_MASK_THRESHOLD_8BIT = 128

_EXIF_ORIENTATION_TAG = 0x0112


class GradCamResult(NamedTuple):
  """Grad-CAM output for a batch of N images.

  Attributes:
    heatmaps: float32 [N, H, W] in 0..1, in the model's input geometry. Flat
      heatmaps are all zeros.
    cams: float32 [N, h, w], ReLU(sum_k w_k A_k) on the feature grid, before
      upsampling and scaling.
    channel_weights: float32 [N, 1536], the Grad-CAM weights w_k.
    probabilities: float32 [N, C], softmax of the head's logits.
    targets: int32 [N], the class each heatmap explains.
    flat: bool [N], True where the heatmap has no maximum to point at (a 1x1
      feature grid, or no positive evidence for the target class).
  """

  heatmaps: Any
  cams: Any
  channel_weights: Any
  probabilities: Any
  targets: Any
  flat: Any


def feature_gradcam(
    head_params: dict,
    features: jax.Array,
    targets: jax.Array,
    output_size: Sequence[int],
) -> GradCamResult:
  """Compute Grad-CAM from the backbone's feature map.

  The function is pure JAX, so it can run inside `jax.jit`. `make_gradcam`
  wraps it with the backbone.

  Args:
    head_params: the `ClassifierHead` parameters, {'hidden': ..., 'logits':
      ...}, optionally wrapped in {'params': ...}.
    features: float [N, h, w, K] feature map of the backbone.
    targets: int [N] class indices; a negative entry explains the predicted
      class of that image.
    output_size: (H, W) of the heatmaps, the model's input size.

  Returns:
    A `GradCamResult` of JAX arrays.
  """
  head_params = models.unwrap_head_params(head_params)
  num_classes, hidden_units = models.head_shape(head_params)
  head = models.ClassifierHead(num_classes, hidden_units)
  features = features.astype(jnp.float32)

  def logits_fn(feature_map):
    return head.apply({'params': head_params}, feature_map, train=False)

  logits = logits_fn(features)
  targets = jnp.where(targets < 0, jnp.argmax(logits, axis=-1), targets)
  targets = targets.astype(jnp.int32)

  # Each image's logits depend only on its own features, so the gradient of
  # the summed target logits gives every image its own d(score)/d(A).
  def target_score(feature_map):
    batch_logits = logits_fn(feature_map)
    return jnp.take_along_axis(batch_logits, targets[:, None], axis=-1).sum()

  gradients = jax.grad(target_score)(features)
  channel_weights = jnp.mean(gradients, axis=(1, 2))
  cams = jax.nn.relu(jnp.einsum('nhwk,nk->nhw', features, channel_weights))

  height, width = output_size
  upsampled = jax.image.resize(
      cams, (cams.shape[0], height, width), method='bilinear'
  )
  low = upsampled.min(axis=(1, 2), keepdims=True)
  high = upsampled.max(axis=(1, 2), keepdims=True)
  value_range = high - low
  flat = (value_range <= _FLAT_RELATIVE_RANGE * high) | (high <= 0)
  heatmaps = jnp.where(flat, 0.0, (upsampled - low) / jnp.where(flat, 1.0, value_range))

  return GradCamResult(
      heatmaps=heatmaps,
      cams=cams,
      channel_weights=channel_weights,
      probabilities=jax.nn.softmax(logits, axis=-1),
      targets=targets,
      flat=flat[:, 0, 0],
  )


@functools.lru_cache(maxsize=8)
def make_gradcam(
    convention: str, dtype: Any = jnp.float32
) -> Callable[..., GradCamResult]:
  """Build a jitted Grad-CAM function for one input convention.

  Example:

    gradcam_fn = make_gradcam('radimagenet')
    result = gradcam_fn(backbone_variables, head_params, pixels, targets)

  Args:
    convention: the input convention the backbone weights expect (see
      `flax_pet.preprocessing`).
    dtype: the backbone's compute dtype.

  Returns:
    fn(backbone_variables, head_params, pixels, targets) -> GradCamResult,
    where pixels are RGB float [N, H, W, 3] in 0..255 with H, W >= 75, and
    targets are int32 [N] (negative: the predicted class). It compiles once
    per input shape.
  """
  preprocessing.check_convention(convention)
  backbone = models.InceptionResNetV2(dtype=dtype)

  @jax.jit
  def gradcam_fn(backbone_variables, head_params, pixels, targets):
    images = preprocessing.preprocess(preprocessing.to_rgb(pixels), convention)
    features = backbone.apply(backbone_variables, images, train=False)
    return feature_gradcam(head_params, features, targets, pixels.shape[1:3])

  return gradcam_fn


def gradcam(
    backbone_variables: dict,
    head_params: dict,
    pixels: np.ndarray,
    convention: str,
    targets: int | Sequence[int] | np.ndarray | None = None,
    *,
    batch_size: int = 8,
    dtype: Any = jnp.float32,
) -> GradCamResult:
  """Compute Grad-CAM heatmaps for many images, batch by batch.

  Every batch has the same shape (the last one is padded), so the network
  compiles once.

  Args:
    backbone_variables: the backbone's {'params', 'batch_stats'}.
    head_params: the `ClassifierHead` parameters.
    pixels: RGB float [N, H, W, 3] in 0..255, as `decode_image` returns them.
    convention: the input convention the backbone weights expect.
    targets: None for each image's predicted class, one class index for all
      images, or one index per image.
    batch_size: images per compiled call.
    dtype: the backbone's compute dtype.

  Returns:
    A `GradCamResult` of numpy arrays.

  Raises:
    ValueError: if pixels is not [N, H, W, 3] with H, W >= 75, or a target is
      not a valid class index.
  """
  pixels = np.asarray(pixels, np.float32)
  if pixels.ndim != 4 or pixels.shape[-1] != 3 or len(pixels) == 0:
    raise ValueError(
        f'Expected RGB pixels of shape [N, H, W, 3] with N >= 1, got shape '
        f'{pixels.shape}.'
    )
  if min(pixels.shape[1:3]) < models.MIN_INPUT_SIZE:
    raise ValueError(
        f'Input of {pixels.shape[1]}x{pixels.shape[2]} px is too small for '
        f'InceptionResNetV2; it needs at least {models.MIN_INPUT_SIZE} px per '
        'side.'
    )
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  num_classes, _ = models.head_shape(models.unwrap_head_params(head_params))
  target_array = _check_targets(targets, len(pixels), num_classes)

  gradcam_fn = make_gradcam(convention, dtype)
  batch_size = min(batch_size, len(pixels))
  batches = []
  for start in range(0, len(pixels), batch_size):
    batch_pixels = pixels[start:start + batch_size]
    batch_targets = target_array[start:start + batch_size]
    count = len(batch_pixels)
    if count < batch_size:
      padding = batch_size - count
      batch_pixels = np.concatenate(
          [batch_pixels, np.zeros((padding, *pixels.shape[1:]), np.float32)]
      )
      batch_targets = np.concatenate(
          [batch_targets, np.full(padding, -1, np.int32)]
      )
    result = gradcam_fn(backbone_variables, head_params, batch_pixels,
                        batch_targets)
    batches.append([np.asarray(field)[:count] for field in result])

  result = GradCamResult(*(np.concatenate(parts) for parts in zip(*batches)))
  if result.flat.any():
    logger.warning(
        '%d of %d Grad-CAM heatmaps are flat (feature grid %dx%d); they are '
        'all zeros and have no location.',
        int(result.flat.sum()), len(pixels), *result.cams.shape[1:],
    )
  return result


def save_overlay(
    path: str | os.PathLike,
    pixels: np.ndarray,
    heatmap: np.ndarray,
    *,
    true_class: str | None = None,
    predicted_class: str | None = None,
    probability: float | None = None,
    target_class: str | None = None,
    mask: np.ndarray | None = None,
    colormap: str = DEFAULT_COLORMAP,
    alpha: float = DEFAULT_ALPHA,
) -> Path:
  """Write a PNG of a heatmap over the grayscale input image.

  The title names the true and predicted class, the predicted probability
  and, if it differs from the predicted class, the class the heatmap
  explains. The heatmap's maximum is marked with a cross, and a mask, if
  given, is outlined in white.

  Args:
    path: the PNG file to write; its folder is created.
    pixels: RGB or grayscale float [H, W, 3] or [H, W] in 0..255.
    heatmap: float [H, W] in 0..1, the same size as the image.
    true_class: the label's class name, if known.
    predicted_class: the predicted class name.
    probability: the predicted class's probability.
    target_class: the class the heatmap explains.
    mask: bool [H, W] tumour mask in the model's input geometry.
    colormap: matplotlib colormap of the heatmap.
    alpha: heatmap opacity, 0..1.

  Returns:
    The path written.

  Raises:
    ValueError: if the image, heatmap and mask sizes differ, or alpha is
      outside 0..1.
  """
  pixels = np.asarray(pixels, np.float32)
  gray = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
  heatmap = np.asarray(heatmap, np.float32)
  if gray.shape != heatmap.shape:
    raise ValueError(
        f'Image of shape {pixels.shape} and heatmap of shape {heatmap.shape} '
        'differ in size; compute the heatmap at the model input size.'
    )
  if mask is not None and np.shape(mask) != heatmap.shape:
    raise ValueError(
        f'Mask of shape {np.shape(mask)} does not match the heatmap shape '
        f'{heatmap.shape}; map it with resize_mask first.'
    )
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in 0..1, got {alpha}.')

  figure = Figure(figsize=(5.0, 5.0 * heatmap.shape[0] / heatmap.shape[1] + 0.6))
  axes = figure.add_subplot()
  axes.imshow(gray, cmap='gray', vmin=0.0, vmax=255.0, interpolation='nearest')
  image = axes.imshow(heatmap, cmap=colormap, vmin=0.0, vmax=1.0, alpha=alpha,
                      interpolation='nearest')
  if mask is not None and np.any(mask):
    axes.contour(np.asarray(mask, np.float32), levels=[0.5], colors='white',
                 linewidths=1.0)
  if heatmap.max() > heatmap.min():
    row, col = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    axes.plot(col, row, marker='+', color='white', markersize=12, mew=2)
  axes.set_axis_off()
  figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02, label='Grad-CAM')
  axes.set_title(
      _overlay_title(true_class, predicted_class, probability, target_class),
      fontsize=9,
  )

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, format='png', dpi=100, bbox_inches='tight')
  return path


def save_overlays(
    output_dir: str | os.PathLike,
    names: Sequence[str],
    pixels: np.ndarray,
    result: GradCamResult,
    class_names: Sequence[str],
    labels: Sequence[int] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
) -> list[Path]:
  """Write one overlay PNG per image, named after the image.

  Args:
    output_dir: folder of the PNG files.
    names: one unique name per image, such as its path relative to the data
      folder. Characters other than letters, digits, '.', '-' and '_' become
      '_' in the file name.
    pixels: RGB float [N, H, W, 3] in 0..255.
    result: the `gradcam` output for these images.
    class_names: class names in class-index order.
    labels: true class indices, if known.
    masks: per image, a bool [H, W] mask in the model's geometry or None.

  Returns:
    The written paths, in image order.

  Raises:
    ValueError: if the lengths differ or two names map to the same file.
  """
  count = len(names)
  lengths = {'pixels': len(pixels), 'heatmaps': len(result.heatmaps)}
  if labels is not None:
    lengths['labels'] = len(labels)
  if masks is not None:
    lengths['masks'] = len(masks)
  mismatched = {key: n for key, n in lengths.items() if n != count}
  if mismatched:
    raise ValueError(
        f'Got {count} names but these lengths differ: {mismatched}.'
    )

  file_names = [_overlay_file_name(name) for name in names]
  duplicates = sorted({f for f in file_names if file_names.count(f) > 1})
  if duplicates:
    raise ValueError(
        f'Image names map to the same overlay file: {duplicates}. Pass names '
        'that differ in letters or digits, such as paths relative to the '
        'data folder.'
    )

  paths = []
  for i, file_name in enumerate(file_names):
    probabilities = np.asarray(result.probabilities[i])
    predicted = int(np.argmax(probabilities))
    paths.append(save_overlay(
        Path(output_dir) / file_name,
        pixels[i],
        result.heatmaps[i],
        true_class=None if labels is None else class_names[int(labels[i])],
        predicted_class=class_names[predicted],
        probability=float(probabilities[predicted]),
        target_class=class_names[int(result.targets[i])],
        mask=None if masks is None else masks[i],
    ))
  return paths


def load_mask(path: str | os.PathLike) -> np.ndarray:
  """Read a tumour mask image as a bool array, white = tumour.

  The file's EXIF orientation is applied, as `decode_image` does for images.
  8-bit masks (grayscale, RGB, RGBA, palette) are tumour where the grayscale
  value is >= 128; the alpha channel is ignored. Masks with more bits per
  sample are tumour above half of their own maximum, which accepts both 0/1
  and 0/65535 label images.

  Args:
    path: a mask image file.

  Returns:
    bool [height, width].

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if the file is not a readable image.
  """
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)
      if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
        values = np.asarray(image, np.float64)
        return values > 0.5 * values.max() if values.max() > 0 else values > 0
      values = np.asarray(image.convert('L'))
  except FileNotFoundError:
    raise
  except (OSError, SyntaxError, ValueError) as error:
    raise ValueError(f'{path}: cannot read the mask image: {error}') from error
  return values >= _MASK_THRESHOLD_8BIT


def image_region(
    source_shape: Sequence[int],
    image_size: int | Sequence[int],
    resize: str,
) -> tuple[int, int, int, int]:
  """Locate the source image inside the model input, as `decode_image` does.

  'stretch' fills the whole input. 'pad' scales the image to fit, keeping
  its aspect ratio, and centres it, so the rest is padding.

  Args:
    source_shape: (height, width) of the upright source image.
    image_size: the model input size, one int or (height, width).
    resize: 'stretch' or 'pad'.

  Returns:
    (top, left, height, width) of the image region in input pixels.

  Raises:
    ValueError: if resize is not a known mode.
  """
  height, width = decode.normalize_image_size(image_size)
  if resize == 'stretch':
    return 0, 0, height, width
  if resize != 'pad':
    raise ValueError(f"resize={resize!r} is invalid: use 'stretch' or 'pad'.")

  # The same arithmetic as flax_pet.data.decode's padding, kept in step by a
  # test that decodes an image and compares the region.
  source_height, source_width = source_shape[:2]
  scale = min(height / source_height, width / source_width)
  fitted_height = min(height, max(1, round(source_height * scale)))
  fitted_width = min(width, max(1, round(source_width * scale)))
  top = (height - fitted_height) // 2
  left = (width - fitted_width) // 2
  return top, left, fitted_height, fitted_width


def resize_mask(
    mask: np.ndarray, image_size: int | Sequence[int], resize: str
) -> tuple[np.ndarray, np.ndarray]:
  """Map a source-resolution mask into the model's input geometry.

  Nearest-neighbour sampling with half-pixel centres: output pixel i reads
  source pixel floor((i + 0.5) * source_size / output_size).

  NOTE: shrinking a tall MIP by 4x or more can drop lesions a few source
  pixels wide, so a non-empty mask can come back empty.

  Args:
    mask: bool [height, width] at the source image's resolution.
    image_size: the model input size, one int or (height, width).
    resize: 'stretch' or 'pad', as the image was decoded.

  Returns:
    (mask, region): bool [H, W] arrays of the tumour and of the image region
    (False on padding).
  """
  mask = np.asarray(mask, bool)
  height, width = decode.normalize_image_size(image_size)
  top, left, region_height, region_width = image_region(
      mask.shape, (height, width), resize
  )
  rows = _nearest_indices(mask.shape[0], region_height)
  cols = _nearest_indices(mask.shape[1], region_width)

  resized = np.zeros((height, width), bool)
  resized[top:top + region_height, left:left + region_width] = mask[
      rows[:, None], cols[None, :]
  ]
  region = np.zeros((height, width), bool)
  region[top:top + region_height, left:left + region_width] = True
  return resized, region


def heatmap_peak(heatmap: np.ndarray) -> tuple[int, int]:
  """Return the (row, col) of the heatmap's maximum.

  On ties the first maximum in row-major order wins, as `numpy.argmax` and
  TorchRay's pointing game implementation pick it.
  """
  heatmap = np.asarray(heatmap)
  row, col = np.unravel_index(np.argmax(heatmap), heatmap.shape)
  return int(row), int(col)


def pointing_game(
    heatmaps: np.ndarray,
    image_paths: Sequence[str | os.PathLike],
    mask_dir: str | os.PathLike,
    image_size: int | Sequence[int],
    resize: str,
    *,
    tolerance: float = DEFAULT_TOLERANCE_PX,
    require_masks: bool = False,
    confidence: float = metrics.DEFAULT_CONFIDENCE,
    n_resamples: int = metrics.DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
  """Score heatmaps against tumour masks with the pointing game.

  The mask of an image is the file of the same name in `mask_dir`. Pass only
  images of the class the masks annotate, with heatmaps computed for that
  class (`targets` of `gradcam`).

  An image is scored when its mask is non-empty in the model's input
  geometry. Its peak (`heatmap_peak`) is a hit when it lies within
  `tolerance` pixels of a mask pixel. A peak on the padding is a miss, and a
  flat heatmap, which has no peak, is a miss too. Images whose mask file is
  empty, or becomes empty after resizing, are listed and left out of the
  score. Images without a mask file are listed too, unless `require_masks`
  makes them an error.

  The random baseline is the mean over scored images of the fraction of the
  image region (padding excluded) within `tolerance` of the mask. This is the
  hit rate of a peak drawn uniformly at random from the image region.

  Args:
    heatmaps: float [N, H, W] in the model's input geometry.
    image_paths: the N source image files, in heatmap order.
    mask_dir: folder of mask images named like the source images.
    image_size: the model input size, one int or (height, width).
    resize: 'stretch' or 'pad', as the images were decoded.
    tolerance: hit distance in input pixels, >= 0.
    require_masks: raise when an image has no mask file.
    confidence: coverage of the intervals.
    n_resamples: bootstrap resamples for the baseline's interval.
    seed: seed of the baseline's bootstrap.

  Returns:
    A JSON-serializable dict with these keys:
    - 'hit_rate': `metrics.proportion_ci` output (value, Wilson ci_low and
      ci_high, n, successes).
    - 'baseline': value, ci_low, ci_high, sd, min, max, n and method.
    - 'n_images' and 'n_scored'.
    - 'missing_masks', 'empty_masks', 'empty_after_resize', 'flat_heatmaps'
      and 'peak_on_padding': lists of image paths.
    - 'per_image': one record per scored image.
    - the settings 'tolerance_px', 'confidence', 'image_size', 'resize' and
      'mask_dir'.
    'hit_rate' and 'baseline' are None when no image is scored.

  Raises:
    ValueError: if shapes or lengths disagree, tolerance is negative, or a
      mask's size differs from its image's size.
    FileNotFoundError: with `require_masks`, for the first missing mask, and
      for a missing mask folder.
  """
  heatmaps = np.asarray(heatmaps, np.float32)
  size = decode.normalize_image_size(image_size)
  mask_dir = Path(mask_dir)
  if heatmaps.ndim != 3 or heatmaps.shape[1:] != size:
    raise ValueError(
        f'Heatmaps must have shape [N, {size[0]}, {size[1]}] for image_size '
        f'{image_size}, got {heatmaps.shape}.'
    )
  if len(heatmaps) != len(image_paths):
    raise ValueError(
        f'Got {len(heatmaps)} heatmaps for {len(image_paths)} image paths; '
        'pass one path per heatmap, in the same order.'
    )
  if tolerance < 0:
    raise ValueError(f'tolerance must be >= 0 pixels, got {tolerance}.')
  if not mask_dir.is_dir():
    raise FileNotFoundError(f'Mask folder {mask_dir} does not exist.')

  missing, empty, vanished, flat, on_padding, records = [], [], [], [], [], []
  for heatmap, image_path in zip(heatmaps, image_paths):
    image_path = Path(image_path)
    mask_path = mask_dir / image_path.name
    if not mask_path.is_file():
      if require_masks:
        raise FileNotFoundError(
            f'No mask for {image_path}: expected {mask_path}. Add the mask or '
            'leave require_masks off to list such images instead.'
        )
      missing.append(str(image_path))
      continue

    source_mask = load_mask(mask_path)
    source_shape = _upright_size(image_path)
    if source_mask.shape != source_shape:
      raise ValueError(
          f'Mask {mask_path} is {source_mask.shape[0]}x{source_mask.shape[1]} '
          f'px but image {image_path} is {source_shape[0]}x{source_shape[1]} '
          'px; a mask must have its image\'s size.'
      )
    if not source_mask.any():
      empty.append(str(image_path))
      continue
    mask, region = resize_mask(source_mask, size, resize)
    if not mask.any():
      vanished.append(str(image_path))
      continue

    near_mask = _within_tolerance(mask, tolerance)
    is_flat = not heatmap.max() > heatmap.min()
    row, col = heatmap_peak(heatmap)
    hit = (not is_flat) and bool(near_mask[row, col])
    if is_flat:
      flat.append(str(image_path))
    elif not region[row, col]:
      on_padding.append(str(image_path))
    records.append({
        'image': str(image_path),
        'mask': str(mask_path),
        'hit': hit,
        'flat_heatmap': is_flat,
        'peak_row': None if is_flat else row,
        'peak_col': None if is_flat else col,
        'mask_fraction': float(near_mask[region].mean()),
    })

  result = {
      'hit_rate': None,
      'baseline': None,
      'n_images': len(image_paths),
      'n_scored': len(records),
      'missing_masks': missing,
      'empty_masks': empty,
      'empty_after_resize': vanished,
      'flat_heatmaps': flat,
      'peak_on_padding': on_padding,
      'tolerance_px': float(tolerance),
      'confidence': confidence,
      'image_size': list(size),
      'resize': resize,
      'mask_dir': str(mask_dir),
      'per_image': records,
  }
  _log_exclusions(result)
  if not records:
    logger.warning('Pointing game: no image has a usable mask; nothing scored.')
    return result

  hits = sum(record['hit'] for record in records)
  result['hit_rate'] = metrics.proportion_ci(hits, len(records), confidence)
  fractions = np.array([record['mask_fraction'] for record in records])
  result['baseline'] = _baseline(fractions, confidence, n_resamples, seed)
  return result


def _check_targets(targets, count, num_classes) -> np.ndarray:
  """Return int32 [count] targets, -1 meaning the predicted class."""
  if targets is None:
    return np.full(count, -1, np.int32)
  array = np.asarray(targets)
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f'targets must be integer class indices, got {targets!r}.')
  if array.ndim == 0:
    array = np.full(count, int(array))
  if array.shape != (count,):
    raise ValueError(
        f'Got {array.size} targets for {count} images; pass one class index '
        'or one per image.'
    )
  if array.min() < 0 or array.max() >= num_classes:
    raise ValueError(
        f'targets must be in [0, {num_classes}) for a head with {num_classes} '
        f'classes, got values from {array.min()} to {array.max()}.'
    )
  return array.astype(np.int32)


def _overlay_title(true_class, predicted_class, probability, target_class):
  parts = []
  if true_class is not None:
    parts.append(f'true: {true_class}')
  if predicted_class is not None:
    predicted = f'predicted: {predicted_class}'
    if probability is not None:
      predicted += f' (p = {probability:.3f})'
    parts.append(predicted)
  title = ' | '.join(parts)
  if target_class is not None and target_class != predicted_class:
    title += f'\nGrad-CAM for: {target_class}'
  return title


def _overlay_file_name(name: str) -> str:
  stem = re.sub(r'[^A-Za-z0-9._-]', '_', str(Path(name).with_suffix('')))
  return f'{stem}_gradcam.png'


def _upright_size(path: Path) -> tuple[int, int]:
  """Return (height, width) of an image after its EXIF orientation."""
  try:
    with Image.open(path) as image:
      width, height = image.size
      orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  except (OSError, SyntaxError, ValueError) as error:
    raise ValueError(f'{path}: cannot read the image size: {error}') from error
  # Orientations 5 to 8 rotate by a quarter turn.
  if orientation in (5, 6, 7, 8):
    return width, height
  return height, width


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  # floor((i + 0.5) * in / out) in integers, so exact boundaries do not
  # depend on float rounding.
  indices = ((2 * np.arange(out_size) + 1) * in_size) // (2 * out_size)
  return np.minimum(indices, in_size - 1)


def _within_tolerance(mask: np.ndarray, tolerance: float) -> np.ndarray:
  if tolerance == 0:
    return mask
  # Euclidean distance of every pixel to its nearest mask pixel.
  distance = ndimage.distance_transform_edt(~mask)
  return distance <= tolerance


def _baseline(fractions, confidence, n_resamples, seed) -> dict[str, Any]:
  entry = {
      'value': float(fractions.mean()),
      'ci_low': None,
      'ci_high': None,
      'sd': float(fractions.std(ddof=1)) if len(fractions) > 1 else 0.0,
      'min': float(fractions.min()),
      'max': float(fractions.max()),
      'n': len(fractions),
      'method': (
          'mean mask area fraction of the image region; percentile bootstrap '
          f'interval of the mean ({n_resamples} resamples, seed {seed})'
      ),
  }
  if n_resamples > 0:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(fractions), size=(n_resamples, len(fractions)))
    means = fractions[draws].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    entry['ci_low'], entry['ci_high'] = float(low), float(high)
  return entry


def _log_exclusions(result):
  for key, reason in (
      ('missing_masks', 'have no mask file and are not scored'),
      ('empty_masks', 'have an empty mask and are not scored'),
      ('empty_after_resize', 'have a mask that is empty at the model input '
                             'size and are not scored'),
      ('flat_heatmaps', 'have a flat heatmap and count as misses'),
      ('peak_on_padding', 'have their heatmap peak on the padding and count '
                          'as misses'),
  ):
    if result[key]:
      logger.warning('Pointing game: %d images %s: %s', len(result[key]),
                     reason, result[key])
