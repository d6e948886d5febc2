"""Random augmentation of training batches, as the reference notebook's Keras layers.

`augment` applies, in this order and as a `keras.Sequential` of these layers
would, the semantics of Keras 3.15's

  RandomRotation(rotation)     angle ~ U(-rotation, rotation) * 360 degrees,
                               about the image centre ((W-1)/2, (H-1)/2).
  RandomZoom(zoom)             one factor z ~ U(1 - zoom, 1 + zoom) for both
                               axes (width_factor=None keeps the aspect ratio);
                               z > 1 zooms out.
  RandomContrast(contrast)     f ~ U(1 - contrast, 1 + contrast);
                               (x - mean) * f + mean with the mean over height
                               and width per image and channel, then clipped
                               to 0..255 (Keras' default value_range).
  RandomTranslation(translation, translation)
                               shifts by dy ~ U(-t, t) * H and dx ~ U(-t, t) * W
                               pixels.

Each factor is drawn per image. `rotate`, `zoom_images`, `adjust_contrast`
and `translate` apply given factors, for tests and custom policies. The
geometric layers map every output pixel
(x, y) to the input point (a0 x + a1 y + a2, b0 x + b1 y + b2) with Keras'
matrices, and sample it bilinearly with fill mode 'reflect'
(d c b a | a b c d | d c b a), which are Keras' defaults. Sampling uses
`jax.scipy.ndimage.map_coordinates`, as Keras' JAX backend does. The random
numbers come from JAX, so a seed gives other draws than in Keras, from the
same distributions.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flax_pet.data import defaults


def augment(
    images: np.ndarray | jax.Array,
    seed: int | jax.Array,
    *,
    rotation: float = defaults.AUGMENT_ROTATION,
    zoom: float = defaults.AUGMENT_ZOOM,
    contrast: float = defaults.AUGMENT_CONTRAST,
    translation: float = defaults.AUGMENT_TRANSLATION,
) -> jax.Array:
  """Randomly rotate, zoom, change contrast and translate a batch of images.

  Apply it to training batches only. The same images and seed give the same
  output; a factor of 0 leaves that step out.

  Args:
    images: float32 (N, height, width, channels) with values in 0..255.
    seed: an int, or a JAX PRNG key (e.g. folded in with the step number).
    rotation: maximum rotation as a fraction of a full turn.
    zoom: maximum zoom as a fraction of the image size.
    contrast: maximum deviation of the contrast factor from 1.
    translation: maximum shift as a fraction of the height and of the width.

  Returns:
    float32 array of the input's shape with values in 0..255.

  Raises:
    ValueError: if images are not a 4D batch or a factor is outside 0..1.
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(
        f'images have shape {images.shape}; expected a batch (N, height, '
        'width, channels)'
    )
  factors = {
      'rotation': rotation,
      'zoom': zoom,
      'contrast': contrast,
      'translation': translation,
  }
  for name, value in factors.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'{name}={value} is invalid: use a value in 0..1')

  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  return _augment(images, key, **{k: float(v) for k, v in factors.items()})


@functools.partial(
    jax.jit, static_argnames=('rotation', 'zoom', 'contrast', 'translation')
)
def _augment(images, key, *, rotation, zoom, contrast, translation):
  batch, height, width, _ = images.shape
  rotation_key, zoom_key, contrast_key, dy_key, dx_key = jax.random.split(key, 5)

  if rotation:
    images = rotate(images, _uniform(rotation_key, batch, -rotation, rotation))
  if zoom:
    images = zoom_images(images, _uniform(zoom_key, batch, 1 - zoom, 1 + zoom))
  if contrast:
    images = adjust_contrast(
        images, _uniform(contrast_key, batch, 1 - contrast, 1 + contrast)
    )
  if translation:
    images = translate(
        images,
        _uniform(dy_key, batch, -translation, translation) * height,
        _uniform(dx_key, batch, -translation, translation) * width,
    )
  return images


def rotate(images: jax.Array, turns: jax.Array) -> jax.Array:
  """Rotate each image about its centre, as keras.layers.RandomRotation.

  Args:
    images: float32 (N, height, width, channels).
    turns: (N,) angles as fractions of a full turn.

  Returns:
    The rotated images, with reflected fill.
  """
  _, height, width, _ = images.shape
  angle = jnp.asarray(turns, jnp.float32) * 2 * math.pi
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  center_x, center_y = (width - 1) / 2, (height - 1) / 2
  matrix = jnp.stack(
      [
          cos,
          -sin,
          center_x - center_x * cos + center_y * sin,
          sin,
          cos,
          center_y - center_x * sin - center_y * cos,
      ],
      axis=1,
  )
  return _affine_transform(images, matrix)


def zoom_images(images: jax.Array, factors: jax.Array) -> jax.Array:
  """Zoom each image about its centre, as keras.layers.RandomZoom with width_factor=None.

  Args:
    images: float32 (N, height, width, channels).
    factors: (N,) zoom factors; above 1 zooms out, below 1 zooms in.

  Returns:
    The zoomed images, with reflected fill.
  """
  _, height, width, _ = images.shape
  factors = jnp.asarray(factors, jnp.float32)
  zeros = jnp.zeros_like(factors)
  matrix = jnp.stack(
      [
          factors,
          zeros,
          (width - 1) / 2 * (1 - factors),
          zeros,
          factors,
          (height - 1) / 2 * (1 - factors),
      ],
      axis=1,
  )
  return _affine_transform(images, matrix)


def adjust_contrast(images: jax.Array, factors: jax.Array) -> jax.Array:
  """Scale each image's deviation from its mean, as keras.layers.RandomContrast.

  Args:
    images: float32 (N, height, width, channels) in 0..255.
    factors: (N,) contrast factors.

  Returns:
    (images - mean) * factor + mean, with the mean per image and channel,
    clipped to 0..255.
  """
  factors = jnp.asarray(factors, jnp.float32)[:, None, None, None]
  mean = images.mean(axis=(1, 2), keepdims=True)
  return jnp.clip((images - mean) * factors + mean, 0.0, 255.0)


def translate(images: jax.Array, dy: jax.Array, dx: jax.Array) -> jax.Array:
  """Shift each image, as keras.layers.RandomTranslation.

  Args:
    images: float32 (N, height, width, channels).
    dy: (N,) downward shifts in pixels.
    dx: (N,) rightward shifts in pixels.

  Returns:
    The shifted images, with reflected fill.
  """
  dy = jnp.asarray(dy, jnp.float32)
  dx = jnp.asarray(dx, jnp.float32)
  zeros, ones = jnp.zeros_like(dx), jnp.ones_like(dx)
  matrix = jnp.stack([ones, zeros, -dx, zeros, ones, -dy], axis=1)
  return _affine_transform(images, matrix)


def _uniform(key, batch: int, low: float, high: float) -> jax.Array:
  return jax.random.uniform(key, (batch,), minval=low, maxval=high)


def _affine_transform(images: jax.Array, matrix: jax.Array) -> jax.Array:
  """Resample each image at the input points given by its row (a0, a1, a2, b0, b1, b2) of matrix."""
  _, height, width, _ = images.shape
  y, x = jnp.meshgrid(
      jnp.arange(height, dtype=jnp.float32),
      jnp.arange(width, dtype=jnp.float32),
      indexing='ij',
  )

  def transform_one(image, row):
    source_x = row[0] * x + row[1] * y + row[2]
    source_y = row[3] * x + row[4] * y + row[5]

    def sample_channel(channel):
      return jax.scipy.ndimage.map_coordinates(
          channel, [source_y, source_x], order=1, mode='reflect'
      )

    return jax.vmap(sample_channel, in_axes=2, out_axes=2)(image)

  return jax.vmap(transform_one)(images, matrix)
