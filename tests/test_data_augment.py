"""Tests of the JAX augmentation against Keras 3's preprocessing layers (TensorFlow backend)."""

import jax
import keras
import numpy as np
import pytest

from flax_pet.data.augment import (
    adjust_contrast,
    augment,
    rotate,
    translate,
    zoom_images,
)

HEIGHT, WIDTH = 48, 64


def _smooth_images(count=2):
  """Return float32 (count, 48, 64, 3) images of blobs and gradients in 0..255.

  Height and width differ so that a swapped axis or centre shows up.
  """
  y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
  images = []
  for i in range(count):
    blob = np.exp(-((x - 20 - 7 * i) ** 2 + (y - 14) ** 2) / 60.0)
    image = 40 + 150 * blob + 0.8 * x + 0.5 * y
    images.append(np.stack([image, image * 0.9, image * 0.8], axis=-1))
  return np.clip(np.stack(images), 0, 255).astype(np.float32)


def _dot_images(count):
  """Return count identical images with one bright pixel at the centre."""
  images = np.zeros((count, HEIGHT, WIDTH, 1), np.float32)
  images[:, HEIGHT // 2, WIDTH // 2] = 255.0
  return images


def _keras(layer, images):
  return np.asarray(layer(images, training=True))


def test_rotation_matches_keras():
  images = _smooth_images()

  ours = np.asarray(rotate(images, np.full(2, 0.1)))
  expected = _keras(keras.layers.RandomRotation((0.1, 0.1)), images)

  np.testing.assert_allclose(ours, expected, atol=0.02)


def test_zoom_matches_keras():
  images = _smooth_images()

  for factor in (0.85, 1.2):
    ours = np.asarray(zoom_images(images, np.full(2, factor)))
    expected = _keras(keras.layers.RandomZoom((factor - 1, factor - 1)), images)
    np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_translation_matches_keras():
  images = _smooth_images()

  ours = np.asarray(translate(images, np.full(2, 0.1 * HEIGHT), np.full(2, -0.05 * WIDTH)))
  layer = keras.layers.RandomTranslation((0.1, 0.1), (-0.05, -0.05))
  expected = _keras(layer, images)

  np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_contrast_matches_keras():
  images = _smooth_images()

  ours = np.asarray(adjust_contrast(images, np.full(2, 1.15)))
  expected = _keras(keras.layers.RandomContrast((-0.15, 0.15)), images)

  np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_translation_range_like_keras():
  images = _dot_images(200)

  ours = np.asarray(augment(images, 0, rotation=0, zoom=0, contrast=0, translation=0.1))
  expected = _keras(keras.layers.RandomTranslation(0.1, 0.1, seed=0), images)

  def column_shifts(batch):
    columns = (batch[..., 0].sum(axis=1) * np.arange(WIDTH)).sum(axis=1)
    return columns / batch[..., 0].sum(axis=(1, 2)) - WIDTH // 2

  ours_dx, keras_dx = column_shifts(ours), column_shifts(expected)
  assert np.abs(ours_dx).max() <= 0.1 * WIDTH + 1e-3
  assert np.abs(keras_dx).max() <= 0.1 * WIDTH + 1e-3
  # Both uniform on +-6.4 px: the deciles are +-5.1 px, with a standard
  # error of about 0.3 px at 200 draws.
  for q in (0.1, 0.5, 0.9):
    assert np.quantile(ours_dx, q) == pytest.approx(np.quantile(keras_dx, q), abs=1.5)


def test_contrast_factor_range():
  images = _smooth_images(64) * 0.5 + 60

  out = np.asarray(augment(images, 3, rotation=0, zoom=0, contrast=0.2, translation=0))

  ratio = out.std(axis=(1, 2, 3)) / images.std(axis=(1, 2, 3))
  assert ratio.min() >= 0.8 - 1e-4
  assert ratio.max() <= 1.2 + 1e-4
  assert ratio.min() < 0.85
  assert ratio.max() > 1.15


def test_augment_deterministic_per_seed():
  images = _smooth_images(4)

  first = np.asarray(augment(images, 7))
  again = np.asarray(augment(images, 7))
  from_key = np.asarray(augment(images, jax.random.key(7)))
  other = np.asarray(augment(images, 8))

  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(first, from_key)
  assert np.abs(first - other).mean() > 1.0
  assert first.shape == images.shape
  assert first.min() >= 0.0
  assert first.max() <= 255.0


def test_augment_identity_at_zero():
  images = _smooth_images(3)

  out = augment(images, 1, rotation=0, zoom=0, contrast=0, translation=0)

  np.testing.assert_array_equal(np.asarray(out), images)


def test_augment_invalid_input_rejected():
  with pytest.raises(ValueError, match='expected a batch'):
    augment(_smooth_images()[0], 0)
  with pytest.raises(ValueError, match='zoom=1.5 is invalid'):
    augment(_smooth_images(), 0, zoom=1.5)
