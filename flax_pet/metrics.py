"""Classification metrics with stratified bootstrap confidence intervals.

`evaluate_classification` takes integer labels and predicted probabilities and
returns one JSON-serializable dict. It contains accuracy, per-class precision,
recall, F1 and support, macro and weighted averages, the confusion matrix,
one-vs-rest ROC AUC and average precision, log loss and the expected
calibration error (ECE), plus ROC and precision-recall curve points and
reliability-diagram bins. `classification_report_text` formats that dict for a
terminal.

Definitions, each checked against scikit-learn in the tests:

- The predicted class is the argmax of the probabilities (the first class
  on ties). Precision, recall and F1 follow
  `sklearn.metrics.precision_recall_fscore_support` with `zero_division=0`:
  a class that is never predicted has precision 0.
- ROC AUC and average precision are one-vs-rest and use the predicted
  probability of each class as its score, never the argmax label. Macro values
  are the unweighted mean over classes. A class without positives or without
  negatives in `y_true` has no AUC or AP; its value is None and the macro mean
  covers the other classes (listed under 'undefined_classes').
- Log loss is the mean of -log p(true class), with probabilities clipped to
  [eps, 1 - eps] for the float64 machine epsilon, as `sklearn.metrics.log_loss`
  does for float64 input.
- ECE is the top-label calibration error of Guo et al. 2017: the confidence
  is the largest probability, samples fall into 15 equal-width bins on [0, 1]
  that are closed on the right ((0, 1/15], ..., (14/15, 1]), and
  ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|.

Confidence intervals are percentile intervals of a stratified bootstrap: each
resample draws, with replacement, as many samples from each true class as the
class has, so every class keeps its support. The same resamples serve every
metric. Resampling works on per-sample multiplicities, so all metrics are
vectorized numpy over the resamples. Resamples where a metric is undefined
(NaN) are dropped from its interval and counted in 'n_dropped'. Precision of a
class that a resample never predicts is 0 by the zero-division convention; such
resamples are counted in 'n_zero_division'.

NOTE: stratified resampling keeps class supports fixed, so it measures the
uncertainty from which samples of each class were drawn, not from the class
mix. For a class with very few samples the percentile interval of its recall
is narrow or even a single point. The Wilson interval reported beside it
('wilson_ci_low', 'wilson_ci_high') is the better guide there. Percentile
intervals of a biased statistic such as ECE can also exclude the point
estimate.

References:
  Guo, Pleiss, Sun, Weinberger. "On Calibration of Modern Neural Networks",
  ICML 2017. https://arxiv.org/abs/1706.04599
  Efron, Tibshirani. "An Introduction to the Bootstrap", Chapman & Hall, 1993
  (percentile interval: chapter 13).
  Wilson. "Probable Inference, the Law of Succession, and Statistical
  Inference", JASA 22(158), 1927.
"""

from collections.abc import Sequence
import logging
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

logger = logging.getLogger(__name__)

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_ECE_BINS = 15

# Maximum deviation of a probability row sum from 1. It leaves room for float32
# softmax output and rejects logits or unnormalized scores.
_ROW_SUM_TOLERANCE = 1e-3

# Resamples processed at once, to bound memory at about 8 bytes * N * chunk
# per intermediate array.
_RESAMPLE_CHUNK = 500


def evaluate_classification(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    n_bins: int = DEFAULT_ECE_BINS,
    include_curves: bool = True,
) -> dict[str, Any]:
  """Compute every evaluation metric with bootstrap confidence intervals.

  Each metric entry is a dict with 'value' (the point estimate on all
  samples), 'ci_low' and 'ci_high' (the percentile bootstrap interval), 'n'
  (the number of samples in the metric's denominator) and 'n_dropped'
  (resamples where the metric was undefined). Accuracy and per-class recall
  also carry a Wilson interval. Undefined values are None.

  Args:
    y_true: true class indices, shape [N], values in [0, C).
    probs: predicted probabilities, shape [N, C], rows summing to 1.
    class_names: C class names, in class-index order.
    n_resamples: bootstrap resamples; 0 skips the intervals (ci_low and
      ci_high are None).
    confidence: coverage of the intervals, in (0, 1).
    seed: seed of the resampling; equal seeds give equal intervals.
    n_bins: number of equal-width confidence bins for ECE and the reliability
      diagram.
    include_curves: whether to add ROC and precision-recall curve points and
      reliability bins (the largest part of the output).

  Returns:
    A dict that `json.dumps(..., allow_nan=False)` accepts, with keys 'n',
    'class_names', 'methods', 'accuracy', 'macro_precision', 'macro_recall'
    (balanced accuracy), 'macro_f1', 'weighted_f1', 'macro_roc_auc',
    'macro_average_precision', 'log_loss', 'ece', 'per_class',
    'confusion_matrix', 'undefined_classes' and, with `include_curves`,
    'curves' and 'reliability'.

  Raises:
    ValueError: if the inputs are inconsistent (see the messages), or
      `n_resamples`, `confidence` or `n_bins` are out of range.
  """
  y_true, probs, class_names = _check_inputs(y_true, probs, class_names)
  if n_resamples < 0:
    raise ValueError(f'n_resamples must be >= 0, got {n_resamples}.')
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}.')
  _check_bins(n_bins)
  num_samples, num_classes = probs.shape

  point = _all_metrics(y_true, probs, np.ones((1, num_samples)), n_bins)
  point = {name: values[0] for name, values in point.items()}
  samples = _bootstrap_metrics(y_true, probs, n_resamples, seed, n_bins)

  def interval(name, n, index=None):
    return _interval_entry(point[name], samples.get(name), n, confidence,
                           index)

  confusion = sk_metrics.confusion_matrix(
      y_true, probs.argmax(axis=1), labels=range(num_classes)
  )
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  undefined = [
      class_names[c]
      for c in range(num_classes)
      if support[c] == 0 or support[c] == num_samples
  ]
  if undefined:
    logger.warning(
        'Classes %s have no positive or no negative samples; their ROC AUC '
        'and average precision are undefined and left out of the macro means.',
        undefined,
    )

  correct = int(np.trace(confusion))
  result = {
      'n': num_samples,
      'class_names': class_names,
      'methods': _methods(n_resamples, confidence, seed, n_bins),
      'accuracy': {
          **interval('accuracy', num_samples),
          **_wilson_entry(correct, num_samples, confidence),
      },
      'macro_precision': interval('macro_precision', num_samples),
      'macro_recall': interval('macro_recall', num_samples),
      'macro_f1': interval('macro_f1', num_samples),
      'weighted_f1': interval('weighted_f1', num_samples),
      'macro_roc_auc': interval('macro_roc_auc', num_samples),
      'macro_average_precision': interval(
          'macro_average_precision', num_samples
      ),
      'log_loss': interval('log_loss', num_samples),
      'ece': interval('ece', num_samples),
      'per_class': {},
      'confusion_matrix': {
          'rows': 'true class',
          'columns': 'predicted class',
          'labels': class_names,
          'matrix': confusion.tolist(),
      },
      'undefined_classes': undefined,
  }

  for c, name in enumerate(class_names):
    true_positives = int(confusion[c, c])
    precision = interval('precision', int(predicted[c]), c)
    precision['n_zero_division'] = _count_zero_division(samples, c)
    result['per_class'][name] = {
        'support': int(support[c]),
        'precision': precision,
        'recall': {
            **interval('recall', int(support[c]), c),
            **_wilson_entry(true_positives, int(support[c]), confidence),
        },
        'f1': interval('f1', num_samples, c),
        'roc_auc': interval('roc_auc', num_samples, c),
        'average_precision': interval('average_precision', num_samples, c),
    }

  if include_curves:
    result['curves'] = curve_points(y_true, probs, class_names)
    result['reliability'] = reliability_bins(y_true, probs, n_bins)
  return result


def classification_report_text(metrics: dict[str, Any], digits: int = 4) -> str:
  """Format `evaluate_classification` output like sklearn's text report.

  The first block is laid out exactly as
  `sklearn.metrics.classification_report(..., digits=digits)`. A second block
  lists the headline metrics with their confidence intervals.

  Args:
    metrics: the dict returned by `evaluate_classification`.
    digits: decimals of each number.

  Returns:
    The report, ending with a newline.
  """
  class_names = metrics['class_names']
  per_class = metrics['per_class']
  width = max(max(len(name) for name in class_names), len('weighted avg'),
              digits)
  headers = ('precision', 'recall', 'f1-score', 'support')

  row_format = '{:>{width}s} ' + ' {:>9.{digits}f}' * 3 + ' {:>9}\n'
  lines = ['{:>{width}s} '.format('', width=width)
           + ''.join(f' {h:>9}' for h in headers) + '\n\n']
  for name in class_names:
    entry = per_class[name]
    lines.append(row_format.format(
        name, _value_or_nan(entry['precision']),
        _value_or_nan(entry['recall']), _value_or_nan(entry['f1']),
        entry['support'], width=width, digits=digits,
    ))
  lines.append('\n')

  total = sum(per_class[name]['support'] for name in class_names)
  accuracy_format = ('{:>{width}s} ' + ' {:>9.{digits}}' * 2
                     + ' {:>9.{digits}f}' + ' {:>9}\n')
  lines.append(accuracy_format.format(
      'accuracy', '', '', metrics['accuracy']['value'], total,
      width=width, digits=digits,
  ))
  macro = [metrics[key]['value']
           for key in ('macro_precision', 'macro_recall', 'macro_f1')]
  lines.append(row_format.format('macro avg', *macro, total, width=width,
                                 digits=digits))
  weighted_precision, weighted_recall = _weighted_averages(per_class,
                                                           class_names)
  lines.append(row_format.format(
      'weighted avg', weighted_precision, weighted_recall,
      metrics['weighted_f1']['value'], total, width=width, digits=digits,
  ))

  lines.append('\n' + _interval_block(metrics, digits))
  return ''.join(lines)


def proportion_ci(
    successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> dict[str, Any]:
  """Estimate a proportion with its Wilson score interval.

  For accuracy, a per-class recall or the pointing-game hit rate. Unlike the
  normal approximation, the Wilson interval stays inside [0, 1] and has a
  nonzero width when successes is 0 or n.

  Args:
    successes: number of successes, 0 <= successes <= n.
    n: number of trials, >= 1.
    confidence: coverage of the interval, in (0, 1).

  Returns:
    {'value', 'ci_low', 'ci_high', 'n', 'successes', 'method': 'wilson'}.

  Raises:
    ValueError: if the counts or `confidence` are out of range.
  """
  low, high = wilson_interval(successes, n, confidence)
  return {
      'value': successes / n,
      'ci_low': low,
      'ci_high': high,
      'n': int(n),
      'successes': int(successes),
      'method': 'wilson',
  }


def wilson_interval(
    successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
  r"""Compute the Wilson score interval of a binomial proportion.

  .. math::
    \frac{\hat p + z^2/2n \pm z \sqrt{\hat p (1 - \hat p)/n + z^2/4n^2}}
         {1 + z^2/n}

  with :math:`z` the standard normal quantile of (1 + confidence) / 2 (1.96
  for 95%).

  Args:
    successes: number of successes, 0 <= successes <= n.
    n: number of trials, >= 1.
    confidence: coverage of the interval, in (0, 1).

  Returns:
    (low, high).

  Raises:
    ValueError: if the counts or `confidence` are out of range.
  """
  if n < 1 or not 0 <= successes <= n:
    raise ValueError(
        f'A proportion needs n >= 1 and 0 <= successes <= n, got '
        f'successes={successes}, n={n}.'
    )
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}.')
  z = stats.norm.ppf((1 + confidence) / 2)
  p = successes / n
  center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
  half_width = (z / (1 + z**2 / n)) * np.sqrt(
      p * (1 - p) / n + z**2 / (4 * n**2)
  )
  return float(max(0.0, center - half_width)), float(
      min(1.0, center + half_width)
  )


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    n_bins: int = DEFAULT_ECE_BINS,
) -> float:
  """Compute the top-label expected calibration error (Guo et al. 2017).

  ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b| over `n_bins`
  equal-width bins of the top-label confidence, closed on the right.

  Args:
    y_true: true class indices, shape [N].
    probs: predicted probabilities, shape [N, C].
    n_bins: number of bins, >= 1.

  Returns:
    The ECE, in [0, 1].

  Raises:
    ValueError: if the inputs are inconsistent or `n_bins` < 1.
  """
  y_true, probs, _ = _check_inputs(y_true, probs, None)
  _check_bins(n_bins)
  weights = np.ones((1, len(y_true)))
  return float(_ece(y_true, probs, weights, n_bins)[0])


def reliability_bins(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    n_bins: int = DEFAULT_ECE_BINS,
) -> dict[str, Any]:
  """Compute the bins of a top-label reliability diagram.

  Args:
    y_true: true class indices, shape [N].
    probs: predicted probabilities, shape [N, C].
    n_bins: number of equal-width bins on [0, 1], closed on the right.

  Returns:
    {'bin_edges': n_bins + 1 floats, 'count': samples per bin, 'accuracy':
    fraction correct per bin, 'confidence': mean top-label probability per
    bin}. Accuracy and confidence are None for empty bins.

  Raises:
    ValueError: if the inputs are inconsistent or `n_bins` < 1.
  """
  y_true, probs, _ = _check_inputs(y_true, probs, None)
  _check_bins(n_bins)
  confidence = probs.max(axis=1)
  correct = probs.argmax(axis=1) == y_true
  bins = _bin_index(confidence, n_bins)

  count = np.bincount(bins, minlength=n_bins)
  correct_sum = np.bincount(bins, weights=correct, minlength=n_bins)
  confidence_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
  mean_or_none = lambda total, k: total / count[k] if count[k] else None
  return {
      'bin_edges': np.linspace(0.0, 1.0, n_bins + 1).tolist(),
      'count': count.tolist(),
      'accuracy': [mean_or_none(correct_sum[k], k) for k in range(n_bins)],
      'confidence': [mean_or_none(confidence_sum[k], k) for k in range(n_bins)],
  }


def curve_points(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
  """Compute one-vs-rest ROC and precision-recall curve points per class.

  Points come from `sklearn.metrics.roc_curve` (with intermediate points
  dropped) and `sklearn.metrics.precision_recall_curve`, using each class's
  predicted probability as the score. sklearn's first ROC threshold is
  infinite, meaning "no sample is positive", and is stored as None so that
  the result stays valid JSON.

  Args:
    y_true: true class indices, shape [N].
    probs: predicted probabilities, shape [N, C].
    class_names: C class names.

  Returns:
    {'roc': {name: {'fpr', 'tpr', 'thresholds'}}, 'pr': {name: {'precision',
    'recall', 'thresholds'}}}. A class without positives or negatives maps to
    None in both.
  """
  y_true, probs, class_names = _check_inputs(y_true, probs, class_names)
  roc, pr = {}, {}
  for c, name in enumerate(class_names):
    positive = y_true == c
    if positive.all() or not positive.any():
      roc[name] = pr[name] = None
      continue
    fpr, tpr, roc_thresholds = sk_metrics.roc_curve(positive, probs[:, c])
    precision, recall, pr_thresholds = sk_metrics.precision_recall_curve(
        positive, probs[:, c]
    )
    roc[name] = {
        'fpr': fpr.tolist(),
        'tpr': tpr.tolist(),
        'thresholds': [float(t) if np.isfinite(t) else None
                       for t in roc_thresholds],
    }
    pr[name] = {
        'precision': precision.tolist(),
        'recall': recall.tolist(),
        'thresholds': pr_thresholds.tolist(),
    }
  return {'roc': roc, 'pr': pr}


def stratified_bootstrap_counts(
    y_true: np.ndarray, n_resamples: int, seed: int
) -> np.ndarray:
  """Draw stratified bootstrap resamples as per-sample multiplicities.

  Each resample draws, with replacement, `count_c` samples among the samples
  of each class c, so class supports are the same in every resample.

  Args:
    y_true: true class indices, shape [N].
    n_resamples: number of resamples B.
    seed: seed of `numpy.random.default_rng`.

  Returns:
    int64 array [B, N]: how many times each sample appears in each resample.
    Every row sums to N.
  """
  y_true = np.asarray(y_true)
  rng = np.random.default_rng(seed)
  counts = np.zeros((n_resamples, y_true.size), np.int64)
  for c in np.unique(y_true):
    members = np.flatnonzero(y_true == c)
    size = members.size
    draws = rng.integers(0, size, size=(n_resamples, size))
    # Offsetting row b by b * size turns B bincounts into one.
    offsets = np.arange(n_resamples)[:, None] * size
    per_row = np.bincount((draws + offsets).ravel(),
                          minlength=n_resamples * size)
    counts[:, members] = per_row.reshape(n_resamples, size)
  return counts


def _check_inputs(y_true, probs, class_names):
  probs = np.asarray(probs, dtype=np.float64)
  y_true = np.asarray(y_true)
  if probs.ndim != 2 or probs.shape[1] < 2 or probs.shape[0] < 1:
    raise ValueError(
        f'Probabilities must have shape [N, C] with N >= 1 and C >= 2, got '
        f'shape {probs.shape}.'
    )
  num_samples, num_classes = probs.shape
  if class_names is not None:
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
      raise ValueError(
          f'Got {len(class_names)} class names for {num_classes} probability '
          f'columns; pass one name per column, in column order.'
      )
    if len(set(class_names)) != num_classes:
      raise ValueError(f'Class names must be unique, got {class_names}.')

  if y_true.shape != (num_samples,):
    raise ValueError(
        f'Labels must have shape ({num_samples},) to match probabilities of '
        f'shape {probs.shape}, got shape {y_true.shape}.'
    )
  if not np.issubdtype(y_true.dtype, np.integer):
    raise ValueError(
        f'Labels must be integer class indices, got dtype {y_true.dtype}.'
    )
  if y_true.min() < 0 or y_true.max() >= num_classes:
    raise ValueError(
        f'Labels must be in [0, {num_classes}), got values from '
        f'{y_true.min()} to {y_true.max()}.'
    )

  if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
    raise ValueError(
        'Probabilities must be finite and in [0, 1], got values from '
        f'{np.nanmin(probs)} to {np.nanmax(probs)}. Apply softmax to logits '
        'first.'
    )
  row_sums = probs.sum(axis=1)
  if np.max(np.abs(row_sums - 1)) > _ROW_SUM_TOLERANCE:
    raise ValueError(
        f'Each row of probabilities must sum to 1, but row sums range from '
        f'{row_sums.min():.6g} to {row_sums.max():.6g}. Apply softmax to '
        'logits first.'
    )
  return y_true.astype(np.int64), probs, class_names


def _check_bins(n_bins):
  if n_bins < 1:
    raise ValueError(f'n_bins must be >= 1, got {n_bins}.')


def _bootstrap_metrics(y_true, probs, n_resamples, seed, n_bins):
  if n_resamples == 0:
    return {}
  counts = stratified_bootstrap_counts(y_true, n_resamples, seed)
  chunks = [
      _all_metrics(y_true, probs, counts[start:start + _RESAMPLE_CHUNK], n_bins)
      for start in range(0, n_resamples, _RESAMPLE_CHUNK)
  ]
  return {name: np.concatenate([chunk[name] for chunk in chunks])
          for name in chunks[0]}


def _all_metrics(y_true, probs, weights, n_bins):
  """Compute every metric per row of sample weights, as arrays [B] or [B, C]."""
  num_classes = probs.shape[1]
  weights = np.asarray(weights, np.float64)
  values = _count_metrics(y_true, probs.argmax(axis=1), weights, num_classes)

  auc = np.stack([
      _roc_auc(probs[:, c], y_true == c, weights) for c in range(num_classes)
  ], axis=1)
  average_precision = np.stack([
      _average_precision(probs[:, c], y_true == c, weights)
      for c in range(num_classes)
  ], axis=1)
  # A class with an undefined AUC in the full data is undefined in every
  # stratified resample too, so the macro mean leaves it out.
  defined = np.all(np.isfinite(auc), axis=0)
  values['roc_auc'] = auc
  values['average_precision'] = average_precision
  values['macro_roc_auc'] = _mean_over(auc, defined)
  values['macro_average_precision'] = _mean_over(average_precision, defined)

  p_true = probs[np.arange(len(y_true)), y_true]
  eps = np.finfo(np.float64).eps
  negative_log = -np.log(np.clip(p_true, eps, 1 - eps))
  values['log_loss'] = weights @ negative_log / weights.sum(axis=1)
  values['ece'] = _ece(y_true, probs, weights, n_bins)
  return values


def _mean_over(per_class, defined):
  if not defined.any():
    return np.full(per_class.shape[0], np.nan)
  return per_class[:, defined].mean(axis=1)


def _count_metrics(y_true, y_pred, weights, num_classes):
  """Compute accuracy, precision, recall and F1 from weighted confusions."""
  cell = y_true * num_classes + y_pred
  one_hot_cells = np.eye(num_classes * num_classes)[cell]
  confusion = (weights @ one_hot_cells).reshape(-1, num_classes, num_classes)

  true_positives = np.diagonal(confusion, axis1=1, axis2=2)
  support = confusion.sum(axis=2)
  predicted = confusion.sum(axis=1)
  precision = _safe_divide(true_positives, predicted)
  recall = _safe_divide(true_positives, support)
  # F1 = 2 tp / (2 tp + fp + fn) as sklearn computes it. It is 0 when the
  # class is neither present nor predicted.
  f1 = _safe_divide(2 * true_positives, predicted + support)

  total = support.sum(axis=1)
  return {
      'accuracy': true_positives.sum(axis=1) / total,
      'precision': precision,
      'recall': recall,
      'f1': f1,
      'predicted_count': predicted,
      'macro_precision': precision.mean(axis=1),
      'macro_recall': recall.mean(axis=1),
      'macro_f1': f1.mean(axis=1),
      'weighted_f1': (f1 * support).sum(axis=1) / total,
  }


def _safe_divide(numerator, denominator):
  return np.divide(numerator, denominator,
                   out=np.zeros_like(numerator, dtype=np.float64),
                   where=denominator > 0)


def _roc_auc(scores, positive, weights):
  """Compute the one-vs-rest ROC AUC per weight row as a Mann-Whitney statistic.

  AUC = sum over (positive i, negative j) pairs of w_i w_j ([s_i > s_j] +
  [s_i = s_j] / 2), divided by (sum of positive weights) * (sum of negative
  weights). This equals the trapezoidal area under sklearn's ROC curve.
  """
  order = np.argsort(scores, kind='stable')
  sorted_scores = scores[order]
  weights = weights[:, order]
  positive = positive[order]

  negative_weights = weights * ~positive
  positive_weights = weights * positive
  cumulative = np.cumsum(negative_weights, axis=1)
  group_start, group_end = _tie_groups(sorted_scores)
  below = np.where(group_start > 0, cumulative[:, group_start - 1], 0.0)
  tied = cumulative[:, group_end] - below

  pairs = np.sum(positive_weights * (below + 0.5 * tied), axis=1)
  normalizer = positive_weights.sum(axis=1) * negative_weights.sum(axis=1)
  return np.divide(pairs, normalizer,
                   out=np.full(pairs.shape, np.nan), where=normalizer > 0)


def _average_precision(scores, positive, weights):
  """Compute average precision per weight row as sklearn does.

  AP = sum over thresholds k of (recall_k - recall_{k-1}) precision_k, with
  one threshold per distinct score, so tied samples enter together.
  """
  order = np.argsort(-scores, kind='stable')
  sorted_scores = scores[order]
  weights = weights[:, order]
  positive = positive[order]

  positive_weights = weights * positive
  cumulative_positive = np.cumsum(positive_weights, axis=1)
  cumulative_all = np.cumsum(weights, axis=1)
  _, group_end = _tie_groups(sorted_scores)
  precision_at_group = _safe_divide(cumulative_positive[:, group_end],
                                    cumulative_all[:, group_end])

  total_positive = positive_weights.sum(axis=1)
  summed = np.sum(positive_weights * precision_at_group, axis=1)
  return np.divide(summed, total_positive,
                   out=np.full(summed.shape, np.nan), where=total_positive > 0)


def _tie_groups(sorted_scores):
  """Return the first and last index of each position's run of equal scores."""
  is_new = np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]])
  starts = np.flatnonzero(is_new)
  ends = np.concatenate([starts[1:] - 1, [len(sorted_scores) - 1]])
  run = np.cumsum(is_new) - 1
  return starts[run], ends[run]


def _bin_index(confidence, n_bins):
  # Right-closed bins, as sklearn.calibration.calibration_curve assigns them.
  inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
  return np.searchsorted(inner_edges, confidence, side='left')


def _ece(y_true, probs, weights, n_bins):
  confidence = probs.max(axis=1)
  correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
  one_hot_bins = np.eye(n_bins)[_bin_index(confidence, n_bins)]
  # sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum_{i in b} (correct_i -
  # confidence_i)| / N, with each sample counted by its weight.
  gap_per_bin = (weights * (correct - confidence)) @ one_hot_bins
  return np.abs(gap_per_bin).sum(axis=1) / weights.sum(axis=1)


def _interval_entry(point, samples, n, confidence, index=None):
  if index is not None:
    point = point[index]
    samples = None if samples is None else samples[:, index]
  value = float(point) if np.isfinite(point) else None
  entry = {'value': value, 'ci_low': None, 'ci_high': None, 'n': int(n),
           'n_dropped': 0}
  if samples is None:
    return entry

  finite = samples[np.isfinite(samples)]
  entry['n_dropped'] = int(samples.size - finite.size)
  if finite.size:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    entry['ci_low'], entry['ci_high'] = float(low), float(high)
  return entry


def _wilson_entry(successes, n, confidence):
  if n == 0:
    return {'wilson_ci_low': None, 'wilson_ci_high': None}
  low, high = wilson_interval(successes, n, confidence)
  return {'wilson_ci_low': low, 'wilson_ci_high': high}


def _count_zero_division(samples, index):
  if not samples:
    return 0
  return int(np.sum(samples['predicted_count'][:, index] == 0))


def _methods(n_resamples, confidence, seed, n_bins):
  return {
      'confidence_interval': (
          'percentile bootstrap, resampling within each true class'
          if n_resamples else 'none (n_resamples=0)'
      ),
      'n_resamples': n_resamples,
      'confidence': confidence,
      'seed': seed,
      'wilson': 'Wilson score interval for accuracy and per-class recall',
      'prediction': 'argmax of the probabilities, first class on ties',
      'zero_division': 0,
      'roc_auc': 'one-vs-rest from predicted probabilities; macro = '
                 'unweighted mean over classes',
      'average_precision': 'one-vs-rest step-wise (sklearn); macro = '
                           'unweighted mean over classes',
      'log_loss': 'natural log, probabilities clipped to [eps, 1 - eps] '
                  'with float64 eps',
      'ece': f'top-label, {n_bins} equal-width bins on [0, 1], closed on '
             'the right, weighted by bin size',
      'ece_bins': n_bins,
  }


def _value_or_nan(entry):
  return np.nan if entry['value'] is None else entry['value']


def _weighted_averages(per_class, class_names):
  support = np.array([per_class[name]['support'] for name in class_names])
  precision = np.array([_value_or_nan(per_class[name]['precision'])
                        for name in class_names])
  recall = np.array([_value_or_nan(per_class[name]['recall'])
                     for name in class_names])
  return (float(precision @ support / support.sum()),
          float(recall @ support / support.sum()))


def _interval_block(metrics, digits):
  methods = metrics['methods']
  rows = [
      ('accuracy', metrics['accuracy']),
      ('macro F1', metrics['macro_f1']),
      ('weighted F1', metrics['weighted_f1']),
      ('macro recall', metrics['macro_recall']),
      ('macro ROC AUC', metrics['macro_roc_auc']),
      ('macro AP', metrics['macro_average_precision']),
      ('log loss', metrics['log_loss']),
      (f'ECE ({methods["ece_bins"]} bins)', metrics['ece']),
  ]
  rows += [(f'recall {name}', entry['recall'])
           for name, entry in metrics['per_class'].items()]
  width = max(len(label) for label, _ in rows)

  percent = f'{100 * methods["confidence"]:g}%'
  if methods['n_resamples']:
    header = (f'{percent} CI: {methods["confidence_interval"]}, '
              f'{methods["n_resamples"]} resamples, seed {methods["seed"]}\n')
  else:
    header = 'No confidence intervals (n_resamples=0)\n'

  number = lambda x: 'n/a' if x is None else f'{x:.{digits}f}'
  lines = [header]
  for label, entry in rows:
    line = f'{label:>{width}s}  {number(entry["value"])}'
    if entry['ci_low'] is not None:
      line += f'  [{number(entry["ci_low"])}, {number(entry["ci_high"])}]'
    if entry.get('n_dropped'):
      line += f'  ({entry["n_dropped"]} resamples undefined)'
    lines.append(line + '\n')
  if metrics['undefined_classes']:
    lines.append(
        f'ROC AUC and AP undefined for {metrics["undefined_classes"]} (no '
        'positive or no negative samples); macro means exclude them.\n'
    )
  return ''.join(lines)
