"""Input conventions: how 0..255 RGB pixels are mapped before the backbone.

A backbone only gives the features it was trained for when its input pixels
have the range and channel order it was trained with. Three conventions matter here:

- `radimagenet`: RadImageNet's own fine-tuning code. Keras' caffe-mode
  `preprocess_input` (RGB to BGR, subtract the ImageNet BGR means
  [103.939, 116.779, 123.68]) followed by the data generator's
  `rescale=1/255`, in that order.
- `inception`: Keras' `inception_resnet_v2.preprocess_input`, x / 127.5 - 1.
- `unit`: x / 255, what the reference Keras notebook fed to RadImageNet
  weights.

The convention is stored with converted weights, so training, evaluation and
prediction all apply the one the weights expect.
"""

import numpy as np

CONVENTIONS = ('radimagenet', 'inception', 'unit')

# ImageNet channel means in BGR order, as subtracted by Keras' caffe mode.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def check_convention(convention: str) -> str:
  """Return `convention` if it is known, else raise ValueError naming them."""
  if convention not in CONVENTIONS:
    raise ValueError(
        f'Unknown input convention {convention!r}; choose one of '
        f'{", ".join(CONVENTIONS)}.'
    )
  return convention


def to_rgb(images):
  """Repeat single-channel images to 3 channels; pass RGB through.

  Args:
    images: array [..., H, W, C] with C in {1, 3}.

  Returns:
    An array [..., H, W, 3] of the same dtype.

  Raises:
    ValueError: for any other channel count (drop alpha before this).
  """
  channels = images.shape[-1]
  if channels == 1:
    return images.repeat(3, axis=-1)
  if channels == 3:
    return images
  raise ValueError(
      f'Expected 1 or 3 channels, got {channels} (shape {images.shape}). '
      'Drop the alpha channel of RGBA images before preprocessing.'
  )


def preprocess(images, convention: str):
  """Map RGB pixels in 0..255 to the range a convention expects.

  Works on numpy and JAX arrays alike (it uses only array methods and
  operators), so it can run in a tf.data-free numpy pipeline or inside a
  jitted function.

  Args:
    images: float array [..., H, W, 3], RGB, values in 0..255.
    convention: one of `CONVENTIONS`.

  Returns:
    A float32 array of the same shape.
  """
  check_convention(convention)
  images = images.astype('float32')
  if convention == 'unit':
    return images / 255.0
  if convention == 'inception':
    return images / 127.5 - 1.0

  # radimagenet: RGB -> BGR, subtract the caffe means, then rescale.
  bgr = images[..., ::-1]
  return (bgr - np.asarray(CAFFE_BGR_MEAN, np.float32)) / 255.0
