"""Compare converted weights with Keras on the same file (the `--verify` check).

Needs Keras 3 with the TensorFlow backend (`pip install 'flax-pet[test]'`).
"""

import logging
import os

import jax
import numpy as np

from flax_pet import models
from flax_pet import pretrained

logger = logging.getLogger(__name__)


def _import_keras():
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  try:
    import keras  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        "--verify needs Keras with the TensorFlow backend: pip install 'flax-pet[test]'."
    ) from error
  return keras


def compare_with_keras(h5_path, weights_path, image_size: int = 224, batch_size: int = 2, seed: int = 0) -> dict:
  """Run Keras and Flax on one seeded random batch and measure the difference.

  Args:
    h5_path: the Keras file that was converted.
    weights_path: the converted folder (or the same .h5 file).
    image_size: square input size in pixels; a whole saved model keeps the
      size it was saved with.
    batch_size: images in the random batch.
    seed: seed of the random batch (uniform in [-1, 1]).

  Returns:
    A dict with 'feature_max_abs_diff' and 'feature_max_abs' (the largest
    absolute Keras feature value), plus 'probability_max_abs_diff' when the
    file has a head.
  """
  keras = _import_keras()
  weights = pretrained.load_pretrained(weights_path)

  if weights.head is None:
    keras_backbone = keras.applications.InceptionResNetV2(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3)
    )
    keras_backbone.load_weights(str(h5_path))
    keras_model = None
  else:
    keras_model = keras.models.load_model(str(h5_path), compile=False)
    image_size = keras_model.input_shape[1]
    keras_backbone = next(
        layer for layer in keras_model.layers if isinstance(layer, keras.Model)
    )

  rng = np.random.default_rng(seed)
  images = rng.uniform(-1.0, 1.0, (batch_size, image_size, image_size, 3)).astype(np.float32)

  keras_features = np.asarray(keras_backbone(images, training=False))
  flax_features = np.asarray(
      jax.jit(models.InceptionResNetV2().apply)(weights.backbone, images)
  )
  result = {
      'feature_max_abs_diff': float(np.max(np.abs(keras_features - flax_features))),
      'feature_max_abs': float(np.max(np.abs(keras_features))),
  }

  if keras_model is not None:
    keras_probabilities = np.asarray(keras_model(images, training=False))
    head = models.ClassifierHead(weights.num_classes, weights.hidden_units)
    logits = head.apply(weights.head, flax_features)
    flax_probabilities = np.asarray(jax.nn.softmax(logits))
    result['probability_max_abs_diff'] = float(
        np.max(np.abs(keras_probabilities - flax_probabilities))
    )
  return result


def report(h5_path, weights_path, image_size: int = 224) -> int:
  """Print the comparison; return 0, or 1 when Keras is missing or they differ.

  The pass threshold is 1e-4 of the largest absolute Keras feature value:
  float32 rounding through about 240 layers differs by about 2e-5 of it.
  """
  try:
    result = compare_with_keras(h5_path, weights_path, image_size)
  except ImportError as error:
    print(f'error: {error}')
    return 1

  relative = result['feature_max_abs_diff'] / max(result['feature_max_abs'], 1e-12)
  print(
      f'Keras vs Flax feature map: max abs difference {result["feature_max_abs_diff"]:.3g} '
      f'on values up to {result["feature_max_abs"]:.3g} (relative {relative:.2g}).'
  )
  ok = relative < 1e-4
  if 'probability_max_abs_diff' in result:
    print(f'Class probabilities: max abs difference {result["probability_max_abs_diff"]:.3g}.')
    ok = ok and result['probability_max_abs_diff'] < 1e-5
  print('verify: OK' if ok else 'verify: MISMATCH (above float32 tolerance)')
  return 0 if ok else 1
