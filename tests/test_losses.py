"""Tests for flax_pet.losses against numpy formulas, scikit-learn and Keras."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.utils.class_weight import compute_class_weight

from flax_pet import losses

RECIPE_ALPHA = [0.5, 0.3, 0.2]


def _numpy_focal(logits, labels, alpha, gamma, class_weights=None):
  """The textbook formula in float64: -sum_c alpha_c y_c (1-p_c)^g log p_c."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
  one_hot = np.eye(logits.shape[-1])[labels]
  per_sample = -np.sum(
      np.asarray(alpha) * one_hot * (1 - probs) ** gamma * np.log(probs),
      axis=-1,
  )
  if class_weights is not None:
    per_sample = per_sample * np.asarray(class_weights)[labels]
  return per_sample


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=2.0, size=(32, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=32)
  return logits, labels


def test_focal_matches_numpy(batch):
  logits, labels = batch
  for gamma in (0.0, 0.5, 2.0, 5.0):
    got = losses.softmax_focal_loss(
        logits, labels, alpha=RECIPE_ALPHA, gamma=gamma
    )
    want = _numpy_focal(logits, labels, RECIPE_ALPHA, gamma)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_focal_clip_matches_numpy(batch):
  logits, labels = batch
  got = losses.softmax_focal_loss(
      logits, labels, alpha=RECIPE_ALPHA, clip_epsilon=losses.KERAS_EPSILON
  )
  want = _numpy_focal(logits, labels, RECIPE_ALPHA, 2.0)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_weighted_focal_matches_numpy(batch):
  logits, labels = batch
  class_weights = [0.9379, 1.0731, 0.9981]
  got = losses.weighted_focal_loss(
      logits, labels, alpha=RECIPE_ALPHA, gamma=2.0, class_weights=class_weights
  )
  per_sample = _numpy_focal(logits, labels, RECIPE_ALPHA, 2.0, class_weights)
  # Keras' sum_over_batch_size: divide by N, not by the sum of the weights.
  np.testing.assert_allclose(got, per_sample.sum() / len(labels), rtol=2e-5)
  assert abs(float(got) - per_sample.sum() / np.sum(
      np.asarray(class_weights)[labels])) > 1e-4


def test_gamma_zero_is_weighted_ce(batch):
  logits, labels = batch
  class_weights = np.array([2.0, 0.5, 1.0])
  got = losses.weighted_focal_loss(
      logits, labels, gamma=0.0, class_weights=class_weights
  )
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  want = jnp.mean(ce * class_weights[labels])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_alpha_none_is_uniform(batch):
  logits, labels = batch
  got = losses.softmax_focal_loss(logits, labels, alpha=None)
  want = losses.softmax_focal_loss(logits, labels, alpha=[1.0, 1.0, 1.0])
  np.testing.assert_array_equal(got, want)


def test_alpha_length_mismatch(batch):
  logits, labels = batch
  with pytest.raises(ValueError, match='got 2 entries for 3 classes'):
    losses.softmax_focal_loss(logits, labels, alpha=[0.5, 0.5])
  with pytest.raises(ValueError, match='class_weights .*got 4 entries for 3'):
    losses.weighted_focal_loss(logits, labels, class_weights=[1, 1, 1, 1])


def test_invalid_labels_and_gamma(batch):
  logits, labels = batch
  out_of_range = labels.copy()
  out_of_range[5] = 3
  with pytest.raises(ValueError, match=r'in \[0, 3\).*from 0 to 3'):
    losses.softmax_focal_loss(logits, out_of_range)
  with pytest.raises(ValueError, match='not one-hot'):
    losses.softmax_focal_loss(logits, np.eye(3, dtype=np.int32)[labels])
  with pytest.raises(ValueError, match='gamma must be >= 0'):
    losses.softmax_focal_loss(logits, labels, gamma=-1.0)


def test_extreme_logits_finite():
  logits = jnp.array(
      [[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [80.0, -80.0, 0.0], [0.0, 0.0, 0.0]],
      jnp.float32,
  )
  labels = jnp.array([0, 0, 1, 2])
  for gamma in (0.0, 0.5, 2.0):
    loss_fn = lambda x: losses.weighted_focal_loss(
        x, labels, alpha=RECIPE_ALPHA, gamma=gamma
    )
    value, grad = jax.value_and_grad(loss_fn)(logits)
    assert np.isfinite(float(value)), gamma
    assert np.all(np.isfinite(grad)), (gamma, grad)

  # Without the clip, a confidently wrong sample keeps its full loss and a
  # gradient. With the Keras clip, its loss is capped and its gradient is 0.
  per_sample = losses.softmax_focal_loss(logits, labels, alpha=RECIPE_ALPHA)
  np.testing.assert_allclose(per_sample[1], 0.5 * 2e4, rtol=1e-6)
  clipped = losses.softmax_focal_loss(
      logits, labels, alpha=RECIPE_ALPHA, clip_epsilon=losses.KERAS_EPSILON
  )
  np.testing.assert_allclose(clipped[1], -0.5 * np.log(1e-7), rtol=1e-3)
  clip_grad = jax.grad(
      lambda x: losses.softmax_focal_loss(
          x, labels, clip_epsilon=losses.KERAS_EPSILON
      )[1]
  )(logits)
  np.testing.assert_array_equal(clip_grad, 0.0)


def test_near_certain_sample_precise():
  # p_t = 1 - 1e-9 rounds to 1 in float32, but (1 - p_t)^2 * log(p_t) must
  # not: the log-sum-exp path keeps it at about 1e-27.
  logits = jnp.array([[np.log(1e9), 0.0]], jnp.float32)
  got = losses.softmax_focal_loss(logits, jnp.array([0]), gamma=2.0)
  want = _numpy_focal(np.asarray(logits), [0], [1.0, 1.0], 2.0)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert float(got[0]) > 0


def test_jit_matches_eager(batch):
  logits, labels = batch
  kwargs = dict(alpha=RECIPE_ALPHA, gamma=2.0, class_weights=[1.0, 2.0, 0.5])
  eager = losses.weighted_focal_loss(logits, labels, **kwargs)
  jitted = jax.jit(lambda x, y: losses.weighted_focal_loss(x, y, **kwargs))(
      logits, labels
  )
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  eager_grad = jax.grad(losses.weighted_focal_loss)(logits, labels, **kwargs)
  jit_grad = jax.jit(jax.grad(lambda x, y: losses.weighted_focal_loss(
      x, y, **kwargs)))(logits, labels)
  np.testing.assert_allclose(jit_grad, eager_grad, rtol=1e-5, atol=1e-8)


def test_mask_excludes_padding(batch):
  logits, labels = batch
  class_weights = [0.9, 1.1, 1.0]
  real = losses.weighted_focal_loss(
      logits[:20], labels[:20], class_weights=class_weights
  )
  mask = np.arange(32) < 20
  padded = losses.weighted_focal_loss(
      logits, labels, class_weights=class_weights, mask=mask
  )
  np.testing.assert_allclose(padded, real, rtol=1e-6)
  empty = losses.weighted_mean(jnp.ones(4), mask=jnp.zeros(4))
  assert float(empty) == 0.0


def test_balanced_weights_recipe():
  weights = losses.balanced_class_weights([381, 333, 358])
  np.testing.assert_array_equal(np.round(weights, 4), [0.9379, 1.0731, 0.9981])


def test_balanced_weights_match_sklearn(data_dir):
  # Class counts of the real PET MIP folders (two imbalanced classes).
  mip = data_dir / 'pet-mip'
  classes = sorted(p.name for p in mip.iterdir() if p.is_dir())
  counts = [len(list((mip / name).glob('*.png'))) for name in classes]
  assert min(counts) > 0
  labels = np.repeat(np.arange(len(classes)), counts)
  want = compute_class_weight('balanced', classes=np.arange(len(classes)),
                              y=labels)
  np.testing.assert_allclose(losses.balanced_class_weights(counts), want)


def test_balanced_weights_zero_count():
  with pytest.raises(ValueError, match=r'index\(es\) \[1\] have counts \[0\]'):
    losses.balanced_class_weights([10, 0, 5])
  with pytest.raises(ValueError, match='one entry per class'):
    losses.balanced_class_weights([10])


def test_l2_penalty_pytree():
  kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
  assert float(losses.l2_penalty(kernel)) == pytest.approx(1e-3 * 55)
  tree = {'a': kernel, 'b': [np.ones(4, np.float32)]}
  assert float(losses.l2_penalty(tree, 0.5)) == pytest.approx(0.5 * 59)


def test_recipe_loss_matches_keras(batch):
  """Focal loss, class weights and L2 against Keras 3's model.compute_loss."""
  keras = pytest.importorskip('keras')
  from keras import ops

  def notebook_focal(y_true, y_pred):
    # The reference notebook's loss: clip, then the per-sample class sum.
    epsilon = keras.config.epsilon()
    y_pred = ops.clip(y_pred, epsilon, 1 - epsilon)
    alpha = ops.convert_to_tensor(RECIPE_ALPHA)
    loss = alpha * ops.power(1 - y_pred, 2.0) * -y_true * ops.log(y_pred)
    return ops.sum(loss, axis=-1)

  rng = np.random.default_rng(1)
  features = rng.normal(size=(32, 8)).astype(np.float32)
  _, labels = batch
  inputs = keras.Input((8,))
  hidden = keras.layers.Dense(
      16, activation='relu', name='hidden',
      kernel_regularizer=keras.regularizers.L2(1e-3),
  )(inputs)
  logits = keras.layers.Dense(3, name='logits')(hidden)
  probs = keras.layers.Softmax()(logits)
  model = keras.Model(inputs, probs)
  model.compile(loss=notebook_focal)
  logit_model = keras.Model(inputs, logits)

  # Not balanced weights of this batch: those sum to N, which would hide a
  # division by sum(w) instead of N.
  class_weights = np.array([2.0, 0.5, 1.0])
  sample_weight = class_weights[labels].astype(np.float32)
  y_one_hot = np.eye(3, dtype=np.float32)[labels]
  keras_loss = model.compute_loss(
      x=features, y=y_one_hot, y_pred=model(features),
      sample_weight=sample_weight,
  )

  kernel = model.get_layer('hidden').kernel.numpy()
  logits_np = logit_model(features).numpy()
  for clip in (None, losses.KERAS_EPSILON):
    ours = losses.weighted_focal_loss(
        logits_np, labels, alpha=RECIPE_ALPHA, gamma=2.0,
        class_weights=class_weights, clip_epsilon=clip,
    ) + losses.l2_penalty(kernel, 1e-3)
    np.testing.assert_allclose(ours, float(keras_loss), rtol=1e-5)
