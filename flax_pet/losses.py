"""Focal loss, balanced class weights and L2 penalty of the reference recipe.

The reference recipe is a Keras notebook that trains the classifier head with

    total = sum_i(w_{y_i} * FL_i) / N + l2 * sum(W_hidden^2)

where FL_i is the weighted categorical focal loss of sample i (Lin et al.
2017), w is the vector of balanced class weights passed to Keras as
`class_weight`, N is the number of samples in the batch and W_hidden is the
kernel of the hidden Dense layer. The division by N, not by sum(w), is Keras 3's
default `sum_over_batch_size` reduction (`keras.src.losses.loss.reduce_values`
in Keras 3.15): class weights scale each sample's loss and the batch mean is
taken over samples. `weighted_focal_loss` computes the first term and
`l2_penalty` the second.

References:
  Lin, Goyal, Girshick, He, Dollar. "Focal Loss for Dense Object Detection",
  ICCV 2017. https://arxiv.org/abs/1708.02002
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Keras' backend epsilon (`keras.config.epsilon()`), which the reference
# notebook uses to clip probabilities before the logarithm.
KERAS_EPSILON = 1e-7


def softmax_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike | Sequence[float] | None = None,
    gamma: float = 2.0,
    clip_epsilon: float | None = None,
) -> jax.Array:
  r"""Compute the categorical focal loss of each sample from logits.

  For a sample with true class :math:`t` and softmax probabilities :math:`p`,

  .. math::
    FL = -\sum_c \alpha_c y_c (1 - p_c)^\gamma \log p_c
       = -\alpha_t (1 - p_t)^\gamma \log p_t

  where :math:`y` is the one-hot label. With :math:`\gamma = 0` and uniform
  :math:`\alpha = 1` this is the softmax cross-entropy.

  Without `clip_epsilon`, both :math:`\log p_t` and :math:`\log(1 - p_t)` are
  computed from the log-odds against the true class, with a log-sum-exp and a
  softplus as in a stable sigmoid loss. The loss and its gradient therefore
  stay finite and accurate for any finite logits, even when :math:`p_t` rounds
  to 0 or 1 in float32.

  With `clip_epsilon` (the reference notebook uses `KERAS_EPSILON`), the
  probabilities are clipped to [eps, 1 - eps] before the logarithm, as Keras
  focal loss implementations do. This caps each sample's loss at
  :math:`-\alpha_t \log(\epsilon)` (16.1 alpha_t for 1e-7) and makes its
  gradient exactly zero for samples outside the clip range: a confidently
  wrong sample with :math:`p_t < \epsilon` stops contributing to training.
  Both variants agree to float32 rounding while :math:`p_t` stays inside
  [eps, 1 - eps].

  Args:
    logits: unnormalized log probabilities, shape `[..., C]` with C >= 2.
    labels: integer class indices in [0, C), shape `logits.shape[:-1]`.
    alpha: per-class weighting factor, one entry per class. None means 1.0 for
      every class. The reference recipe uses [0.5, 0.3, 0.2].
    gamma: focusing parameter, >= 0. The reference recipe uses 2.
    clip_epsilon: if given, clip probabilities to [clip_epsilon, 1 -
      clip_epsilon] before the logarithm, reproducing the Keras notebook.

  Returns:
    The focal loss of each sample, shape `logits.shape[:-1]`, in the dtype of
    `logits`.

  Raises:
    ValueError: if shapes disagree, `alpha` has the wrong length, `gamma` is
      negative or labels (when not traced) are outside [0, C).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  num_classes = _check_logits_and_labels(logits, labels)
  if not isinstance(gamma, jax.core.Tracer) and gamma < 0:
    raise ValueError(f'Focal loss gamma must be >= 0, got {gamma}.')

  if alpha is None:
    alpha = jnp.ones((num_classes,), logits.dtype)
  alpha = _per_class_vector(alpha, num_classes, 'alpha')
  alpha_true = alpha.astype(logits.dtype)[labels]

  if clip_epsilon is None:
    # With r = log(sum_{c != t} exp(z_c - z_t)), the odds (1 - p_t) / p_t
    # are exp(r), so log p_t = -softplus(r) and log(1 - p_t) = -softplus(-r).
    # Neither form cancels when p_t rounds to 0 or 1.
    is_true = jax.nn.one_hot(labels, num_classes, dtype=bool)
    logit_true = jnp.sum(jnp.where(is_true, logits, 0.0), axis=-1)
    relative = jnp.where(is_true, -jnp.inf, logits - logit_true[..., None])
    log_odds_wrong = jax.nn.logsumexp(relative, axis=-1)
    log_p_true = -jax.nn.softplus(log_odds_wrong)
    modulator = jnp.exp(-gamma * jax.nn.softplus(-log_odds_wrong))
  else:
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.clip(probs, clip_epsilon, 1.0 - clip_epsilon)
    p_true = jnp.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]
    log_p_true = jnp.log(p_true)
    modulator = jnp.power(1.0 - p_true, gamma)

  return -alpha_true * modulator * log_p_true


def weighted_mean(
    per_sample: jax.typing.ArrayLike,
    weights: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Reduce per-sample losses as Keras 3 does: sum(w * l) / N.

  N counts the samples, not their weights, so a batch of harder-class samples
  with weights above 1 yields a larger loss (Keras' `sum_over_batch_size`).
  Padding rows of a fixed-size batch are excluded through `mask`, so N is the
  number of real samples, which is what Keras uses for a short last batch.

  Args:
    per_sample: per-sample losses, shape [N].
    weights: per-sample weights, shape [N]; None means 1.
    mask: 1 for real samples and 0 for padding, shape [N]; None means all real.

  Returns:
    The scalar weighted batch mean. 0 when the mask selects no sample.
  """
  per_sample = jnp.asarray(per_sample)
  if weights is not None:
    per_sample = per_sample * jnp.asarray(weights, per_sample.dtype)
  if mask is None:
    return jnp.sum(per_sample) / per_sample.size

  mask = jnp.asarray(mask, per_sample.dtype)
  count = jnp.sum(mask)
  total = jnp.sum(jnp.where(mask > 0, per_sample, 0.0))
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def weighted_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike | Sequence[float] | None = None,
    gamma: float = 2.0,
    class_weights: jax.typing.ArrayLike | Sequence[float] | None = None,
    mask: jax.typing.ArrayLike | None = None,
    clip_epsilon: float | None = None,
) -> jax.Array:
  r"""Compute the batch focal loss with Keras-style class weights.

  .. math::
    L = \frac{1}{N} \sum_i w_{y_i} FL_i

  with :math:`FL_i` from `softmax_focal_loss` and :math:`w` the class weights
  (Keras `class_weight`, turned into one weight per sample by its true class).

  NOTE: some Keras focal loss implementations return the batch mean instead of
  one value per sample. Keras then multiplies that scalar by each sample weight
  and averages, which gives mean(FL) * mean(w), not this formula. This module
  implements the per-sample form, which is what class weights are meant to do.

  Args:
    logits: unnormalized log probabilities, shape [N, C].
    labels: integer class indices, shape [N].
    alpha: per-class focal weighting factor (see `softmax_focal_loss`).
    gamma: focusing parameter (see `softmax_focal_loss`).
    class_weights: one weight per class; None means 1 for every class.
    mask: 1 for real samples and 0 for padding, shape [N]. Padding rows still
      need labels in [0, C), for example 0.
    clip_epsilon: probability clip of the Keras notebook (see
      `softmax_focal_loss`).

  Returns:
    The scalar loss.

  Raises:
    ValueError: if `alpha` or `class_weights` do not have one entry per class,
      or the inputs are otherwise invalid (see `softmax_focal_loss`).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  per_sample = softmax_focal_loss(
      logits, labels, alpha=alpha, gamma=gamma, clip_epsilon=clip_epsilon
  )

  sample_weights = None
  if class_weights is not None:
    class_weights = _per_class_vector(
        class_weights, logits.shape[-1], 'class_weights'
    )
    sample_weights = class_weights.astype(per_sample.dtype)[labels]
  return weighted_mean(per_sample, sample_weights, mask)


def balanced_class_weights(counts: Sequence[int] | np.ndarray) -> np.ndarray:
  """Compute scikit-learn's 'balanced' class weights from class counts.

  w_c = n_samples / (n_classes * count_c), as in
  `sklearn.utils.class_weight.compute_class_weight('balanced', ...)`. Counts
  381/333/358 give 0.9379/1.0731/0.9981.

  Args:
    counts: number of training samples of each class, in class-index order.

  Returns:
    float64 array of one weight per class.

  Raises:
    ValueError: if `counts` is not a 1-D list of at least two classes, or a
      count is zero or negative.
  """
  counts = np.asarray(counts)
  if counts.ndim != 1 or counts.size < 2:
    raise ValueError(
        f'Class counts must be a 1-D list with one entry per class (at least '
        f'2), got shape {counts.shape}.'
    )
  if not np.all(counts > 0):
    missing = [int(i) for i in np.flatnonzero(counts <= 0)]
    raise ValueError(
        'Balanced class weights need at least one training sample per class, '
        f'but class index(es) {missing} have counts '
        f'{counts[missing].tolist()}. Add samples of those classes or remove '
        'them from the class list.'
    )
  counts = counts.astype(np.float64)
  return counts.sum() / (counts.size * counts)


def l2_penalty(params, scale: float = 1e-3) -> jax.Array:
  """Compute Keras' L2 regularization: scale * sum of squared values.

  This is `keras.regularizers.L2(scale)`, which has no factor 1/2 (unlike
  optax's weight decay). The reference recipe applies it with scale 1e-3 to the
  hidden Dense kernel only, for example
  `l2_penalty(params['head']['hidden']['kernel'])`.

  Args:
    params: an array or a pytree of arrays.
    scale: regularization factor.

  Returns:
    The scalar penalty, in float32 or the widest float dtype of the leaves.
  """
  leaves = jax.tree_util.tree_leaves(params)
  total = sum(jnp.sum(jnp.square(leaf)) for leaf in leaves)
  return scale * jnp.asarray(total, dtype=jnp.result_type(float, *leaves))


def _check_logits_and_labels(logits, labels):
  if logits.ndim < 1 or logits.shape[-1] < 2:
    raise ValueError(
        f'Logits must have shape [..., C] with C >= 2 classes, got shape '
        f'{logits.shape}.'
    )
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f'Labels must be integer class indices of shape {logits.shape[:-1]} '
        f'to match logits of shape {logits.shape}, got shape {labels.shape}. '
        'Pass class indices, not one-hot vectors.'
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
        f'Labels must be integer class indices, got dtype {labels.dtype}.'
    )

  num_classes = logits.shape[-1]
  # Traced labels cannot be checked here. Out-of-range indices then give NaN.
  if not isinstance(labels, jax.core.Tracer) and labels.size:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
      raise ValueError(
          f'Labels must be in [0, {num_classes}) for {num_classes} classes, '
          f'got values from {low} to {high}.'
      )
  return num_classes


def _per_class_vector(values, num_classes, name):
  values = jnp.asarray(values)
  if values.ndim != 1 or values.shape[0] != num_classes:
    length = values.shape[0] if values.ndim == 1 else f'shape {values.shape}'
    raise ValueError(
        f'{name} must have one entry per class: got {length} entries for '
        f'{num_classes} classes.'
    )
  return values
