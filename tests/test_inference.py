"""The folded inference path of the backbone, against Keras and the Flax module."""

from pathlib import Path

import jax
import keras
import numpy as np
import pytest

from flax_pet import inference
from flax_pet import keras_weights
from flax_pet import models
from tests import keras_h5

# Keras parity: float32 rounding through ~240 layers (see test_convert.py).
KERAS_TOLERANCE = 1e-4
# Folding only reorders float32 operations of the same network; measured
# differences to the Flax module are about 2e-6 of the largest output.
FLAX_TOLERANCE = 1e-5

flax_backbone = jax.jit(models.InceptionResNetV2().apply)


def max_relative_difference(reference, actual):
  reference, actual = np.asarray(reference), np.asarray(actual)
  return float(np.max(np.abs(reference - actual)) / np.max(np.abs(reference)))


def convert_in_memory(keras_model) -> dict:
  """Flax variables of a Keras InceptionResNetV2, without writing a file."""
  layers = tuple(
      keras_weights.KerasLayer(name, tuple(w for w, _ in weights), tuple(a for _, a in weights))
      for name, weights in keras_h5.model_layers(keras_model)
  )
  weight_file = keras_weights.KerasWeightFile(
      Path('in-memory.h5'), 'weights-only', layers, keras.__version__, 'tensorflow'
  )
  return keras_weights.convert_backbone(weight_file)


@pytest.fixture(scope='module')
def keras_model():
  # BatchNorm statistics and residual biases are random, so that a wrong
  # fold or a swapped branch changes the output.
  return keras_h5.random_irv2(keras, 224, seed=3)


@pytest.fixture(scope='module')
def variables(keras_model):
  return convert_in_memory(keras_model)


@pytest.fixture(scope='module')
def folded(variables):
  return inference.fold_backbone(variables)


@pytest.fixture(scope='module')
def apply_folded():
  return inference.jit_apply_folded()


def random_images(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def test_folded_matches_keras_224(keras_model, folded, apply_folded):
  images = random_images((2, 224, 224, 3))

  expected = keras_model.predict(images, verbose=0)
  actual = apply_folded(folded, images)

  assert actual.shape == (2, 5, 5, 1536)
  assert max_relative_difference(expected, actual) < KERAS_TOLERANCE


def test_folded_matches_flax_224(variables, folded, apply_folded):
  images = random_images((2, 224, 224, 3), seed=1)

  expected = flax_backbone(variables, images)
  actual = apply_folded(folded, images)

  assert max_relative_difference(expected, actual) < FLAX_TOLERANCE


def test_folded_matches_flax_non_square(variables, folded, apply_folded):
  images = random_images((2, 107, 160, 3), seed=2)

  expected = flax_backbone(variables, images)
  actual = apply_folded(folded, images)

  assert actual.shape == expected.shape == (2, 2, 3, 1536)
  assert max_relative_difference(expected, actual) < FLAX_TOLERANCE


def test_streams_match_single_call(folded, apply_folded):
  images = random_images((3, 80, 96, 3), seed=4)
  in_streams = inference.run_concurrently(apply_folded, num_streams=2)

  expected = apply_folded(folded, images)
  actual = in_streams(folded, images)

  # Three images in two streams: chunks of 2 and 1, concatenated in order.
  assert actual.shape == expected.shape
  assert max_relative_difference(expected, actual) < FLAX_TOLERANCE


def test_optimize_backbone_matches_flax(variables):
  images = random_images((2, 75, 75, 3), seed=5)
  apply_fn, folded = inference.optimize_backbone(variables, num_streams=2)

  expected = flax_backbone(variables, images)
  actual = apply_fn(folded, images)

  assert max_relative_difference(expected, actual) < FLAX_TOLERANCE


def test_fold_keeps_input_variables(variables):
  before = jax.tree.map(np.array, variables)

  inference.fold_backbone(variables)

  unchanged = jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, variables))
  assert all(jax.tree.leaves(unchanged))


def test_fold_folds_batchnorm():
  variables = models.random_backbone_variables(seed=0)
  stats = variables['batch_stats']['conv2d_1a']['bn']
  stats['mean'] = np.full_like(stats['mean'], 0.5)
  stats['var'] = np.full_like(stats['var'], 4.0 - models.BN_EPSILON)

  folded = inference.fold_backbone(variables)['conv2d_1a']

  kernel = variables['params']['conv2d_1a']['conv']['kernel']
  np.testing.assert_allclose(folded['kernel'], kernel / 2.0, rtol=1e-6)
  np.testing.assert_allclose(folded['bias'], np.full(32, -0.25), rtol=1e-6)


def test_fold_scales_residual_up():
  variables = models.random_backbone_variables(seed=0)
  up = variables['params']['block35_2']['up']
  up['bias'] = np.ones_like(up['bias'])

  folded = inference.fold_backbone(variables)

  np.testing.assert_allclose(folded['block35_2']['up']['kernel'], up['kernel'] * 0.17, rtol=1e-6)
  np.testing.assert_allclose(folded['block35_2']['up']['bias'], 0.17, rtol=1e-6)
  # The last block8 has scale 1.0.
  np.testing.assert_array_equal(
      folded['block8_10']['up']['kernel'], variables['params']['block8_10']['up']['kernel']
  )


def test_fold_rejects_missing_block():
  variables = models.random_backbone_variables(seed=0)
  del variables['params']['block17_20']

  with pytest.raises(ValueError, match='block17_20'):
    inference.fold_backbone(variables)


def test_fold_rejects_missing_batch_stats():
  variables = models.random_backbone_variables(seed=0)

  with pytest.raises(ValueError, match='batch_stats'):
    inference.fold_backbone({'params': variables['params']})


def test_fold_rejects_mismatched_batchnorm():
  variables = models.random_backbone_variables(seed=0)
  branch = variables['params']['block8_4']['branch0']['conv']
  branch['kernel'] = np.zeros((1, 1, 2080, 100), np.float32)

  with pytest.raises(ValueError, match='block8_4/branch0'):
    inference.fold_backbone(variables)


def test_apply_rejects_small_input(folded):
  with pytest.raises(ValueError, match='too small'):
    inference.apply_folded(folded, np.zeros((1, 74, 224, 3), np.float32))


def test_streams_reject_zero(apply_folded):
  with pytest.raises(ValueError, match='num_streams'):
    inference.run_concurrently(apply_folded, num_streams=0)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU option')
def test_cpu_options_fuse_elementwise(folded):
  # Compiled only, never run. At 75x75 XLA keeps most loops separate either way.
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  plain = jax.jit(inference.apply_folded).lower(folded, images).compile().as_text()
  fused = inference.jit_apply_folded().lower(folded, images).compile().as_text()

  # With ELTWISE in the YNNPACK fusion list, bias, ReLU and residual sums join
  # the convolution fusions instead of running as separate XLA loops: 20
  # loops instead of 252 with jaxlib 0.10.2.
  assert '__ynn_fusion' in fused
  assert fused.count('kind=kLoop') < plain.count('kind=kLoop') // 4
