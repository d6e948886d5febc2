"""Tests for flax_pet.metrics against scikit-learn and scipy."""

import json

import numpy as np
import pytest
from scipy import stats
from sklearn import calibration
from sklearn import metrics as sk

from flax_pet import metrics

CLASS_NAMES = ['No cancer', 'breast', 'prostate']


def _fixed_predictions(num_samples=90, seed=0):
  """Labels and informative, imperfect probabilities with tied scores."""
  rng = np.random.default_rng(seed)
  y_true = rng.integers(0, 3, size=num_samples)
  logits = rng.normal(size=(num_samples, 3)) + 1.5 * np.eye(3)[y_true]
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  # Duplicate rows so that every class has tied scores across both labels.
  probs[1::7] = probs[0]
  return y_true, probs


@pytest.fixture(scope='module')
def fixed():
  y_true, probs = _fixed_predictions()
  result = metrics.evaluate_classification(
      y_true, probs, CLASS_NAMES, n_resamples=0
  )
  return y_true, probs, result


def test_counts_match_sklearn(fixed):
  y_true, probs, result = fixed
  y_pred = probs.argmax(axis=1)
  precision, recall, f1, support = sk.precision_recall_fscore_support(
      y_true, y_pred, labels=[0, 1, 2], zero_division=0
  )
  assert result['n'] == len(y_true)
  assert result['accuracy']['value'] == pytest.approx(
      sk.accuracy_score(y_true, y_pred))
  for c, name in enumerate(CLASS_NAMES):
    entry = result['per_class'][name]
    assert entry['support'] == support[c]
    assert entry['precision']['value'] == pytest.approx(precision[c])
    assert entry['recall']['value'] == pytest.approx(recall[c])
    assert entry['f1']['value'] == pytest.approx(f1[c])
  assert result['macro_f1']['value'] == pytest.approx(
      sk.f1_score(y_true, y_pred, average='macro'))
  assert result['weighted_f1']['value'] == pytest.approx(
      sk.f1_score(y_true, y_pred, average='weighted'))
  assert result['macro_recall']['value'] == pytest.approx(
      sk.balanced_accuracy_score(y_true, y_pred))
  assert result['confusion_matrix']['matrix'] == sk.confusion_matrix(
      y_true, y_pred).tolist()


def test_auc_ap_match_sklearn(fixed):
  y_true, probs, result = fixed
  for c, name in enumerate(CLASS_NAMES):
    entry = result['per_class'][name]
    assert entry['roc_auc']['value'] == pytest.approx(
        sk.roc_auc_score(y_true == c, probs[:, c]), abs=1e-12)
    assert entry['average_precision']['value'] == pytest.approx(
        sk.average_precision_score(y_true == c, probs[:, c]), abs=1e-12)
  assert result['macro_roc_auc']['value'] == pytest.approx(
      sk.roc_auc_score(y_true, probs, multi_class='ovr', average='macro'))
  assert result['macro_average_precision']['value'] == pytest.approx(
      sk.average_precision_score(np.eye(3)[y_true], probs, average='macro'))


def test_auc_uses_probabilities(fixed):
  y_true, probs, result = fixed
  argmax_one_hot = np.eye(3)[probs.argmax(axis=1)]
  argmax_auc = sk.roc_auc_score(y_true, argmax_one_hot, multi_class='ovr')
  from_probs = sk.roc_auc_score(y_true, probs, multi_class='ovr')
  assert abs(argmax_auc - from_probs) > 0.01
  assert result['macro_roc_auc']['value'] == pytest.approx(from_probs)
  assert result['macro_roc_auc']['value'] != pytest.approx(argmax_auc)


def test_binary_auc_matches_sklearn():
  rng = np.random.default_rng(5)
  y_true = rng.integers(0, 2, size=50)
  p_cancer = np.clip(0.3 * y_true + rng.uniform(0, 0.7, size=50), 0, 1)
  probs = np.stack([1 - p_cancer, p_cancer], axis=1)
  result = metrics.evaluate_classification(
      y_true, probs, ['No cancer', 'Cancer'], n_resamples=0)
  assert result['macro_roc_auc']['value'] == pytest.approx(
      sk.roc_auc_score(y_true, p_cancer))
  assert result['per_class']['Cancer']['average_precision']['value'] == (
      pytest.approx(sk.average_precision_score(y_true, p_cancer)))


def test_log_loss_matches_sklearn(fixed):
  y_true, probs, result = fixed
  assert result['log_loss']['value'] == pytest.approx(
      sk.log_loss(y_true, y_proba=probs))

  # A zero probability for the true class is clipped, not infinite.
  certain = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
  labels = np.array([1, 1, 0])
  got = metrics.evaluate_classification(
      labels, certain, ['a', 'b'], n_resamples=0)['log_loss']['value']
  assert got == pytest.approx(sk.log_loss(labels, y_proba=certain))
  assert np.isfinite(got)


def test_ece_matches_definition(fixed):
  y_true, probs, result = fixed
  confidence = probs.max(axis=1)
  correct = probs.argmax(axis=1) == y_true
  expected = 0.0
  for k in range(15):
    in_bin = (confidence > k / 15) & (confidence <= (k + 1) / 15)
    if in_bin.any():
      gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
      expected += in_bin.mean() * gap
  assert result['ece']['value'] == pytest.approx(expected, abs=1e-12)
  assert metrics.expected_calibration_error(y_true, probs) == pytest.approx(
      expected, abs=1e-12)


def test_reliability_matches_sklearn(fixed):
  y_true, probs, _ = fixed
  confidence = probs.max(axis=1)
  correct = probs.argmax(axis=1) == y_true
  prob_true, prob_pred = calibration.calibration_curve(
      correct, confidence, n_bins=15, strategy='uniform')
  bins = metrics.reliability_bins(y_true, probs)
  filled = [k for k in range(15) if bins['count'][k]]
  np.testing.assert_allclose([bins['accuracy'][k] for k in filled], prob_true)
  np.testing.assert_allclose([bins['confidence'][k] for k in filled],
                             prob_pred)
  assert sum(bins['count']) == len(y_true)
  assert all(bins['accuracy'][k] is None for k in range(15)
             if not bins['count'][k])


def test_ece_bins_right_closed():
  # Confidence exactly 0.6 = 9/15 belongs to bin (8/15, 9/15], not the next.
  probs = np.array([[0.6, 0.4], [0.9, 0.1]])
  bins = metrics.reliability_bins(np.array([0, 1]), probs)
  assert bins['count'][8] == 1
  assert bins['count'][9] == 0
  assert bins['count'][13] == 1


def test_report_matches_sklearn():
  y_true, probs = _fixed_predictions(num_samples=40, seed=2)
  # Class 2 is never predicted: precision 0 by the zero-division convention.
  probs[:, 2] = 0.0
  probs /= probs.sum(axis=1, keepdims=True)
  result = metrics.evaluate_classification(
      y_true, probs, CLASS_NAMES, n_resamples=200)
  text = metrics.classification_report_text(result)
  want = sk.classification_report(
      y_true, probs.argmax(axis=1), labels=[0, 1, 2], target_names=CLASS_NAMES,
      digits=4, zero_division=0)
  assert text.startswith(want + '\n')
  assert '95% CI: percentile bootstrap' in text
  assert 'recall prostate' in text
  assert result['per_class']['prostate']['precision']['n_zero_division'] == 200


def test_json_serializable(fixed):
  y_true, probs, _ = fixed
  result = metrics.evaluate_classification(
      y_true, probs, CLASS_NAMES, n_resamples=100)
  decoded = json.loads(json.dumps(result, allow_nan=False))
  assert decoded['curves']['roc']['breast']['thresholds'][0] is None
  roc = decoded['curves']['roc']['breast']
  assert roc['fpr'][0] == 0.0
  assert roc['tpr'][-1] == 1.0
  precision, recall, _ = sk.precision_recall_curve(y_true == 1, probs[:, 1])
  assert decoded['curves']['pr']['breast']['precision'] == precision.tolist()
  assert decoded['curves']['pr']['breast']['recall'] == recall.tolist()
  for key in ('accuracy', 'macro_f1', 'weighted_f1', 'macro_roc_auc',
              'macro_average_precision', 'log_loss', 'ece', 'macro_recall'):
    assert set(decoded[key]) >= {'value', 'ci_low', 'ci_high', 'n'}, key


def test_weighted_equals_resampled():
  """Metrics of one bootstrap row equal sklearn on the repeated samples."""
  y_true, probs = _fixed_predictions(num_samples=45, seed=4)
  counts = metrics.stratified_bootstrap_counts(y_true, 3, seed=9)
  for row in counts:
    values = metrics._all_metrics(y_true, probs, row[None, :], 15)
    y_rep = np.repeat(y_true, row)
    p_rep = np.repeat(probs, row, axis=0)
    pred_rep = p_rep.argmax(axis=1)
    assert values['accuracy'][0] == pytest.approx(
        sk.accuracy_score(y_rep, pred_rep))
    assert values['macro_f1'][0] == pytest.approx(
        sk.f1_score(y_rep, pred_rep, average='macro', zero_division=0))
    assert values['log_loss'][0] == pytest.approx(
        sk.log_loss(y_rep, y_proba=p_rep))
    assert values['ece'][0] == pytest.approx(
        metrics.expected_calibration_error(y_rep, p_rep))
    for c in range(3):
      assert values['roc_auc'][0, c] == pytest.approx(
          sk.roc_auc_score(y_rep == c, p_rep[:, c]), abs=1e-12)
      assert values['average_precision'][0, c] == pytest.approx(
          sk.average_precision_score(y_rep == c, p_rep[:, c]), abs=1e-12)


def test_bootstrap_keeps_support():
  y_true = np.array([0] * 7 + [1] * 2 + [2] * 1)
  counts = metrics.stratified_bootstrap_counts(y_true, 50, seed=0)
  assert counts.shape == (50, 10)
  for c, size in enumerate([7, 2, 1]):
    np.testing.assert_array_equal(counts[:, y_true == c].sum(axis=1), size)
  assert len({tuple(row) for row in counts}) > 10


def test_bootstrap_rare_class():
  rng = np.random.default_rng(7)
  y_true = np.array([0] * 14 + [1] * 2 + [2] * 1)
  logits = rng.normal(size=(17, 3)) + 1.0 * np.eye(3)[y_true]
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

  run = lambda seed: metrics.evaluate_classification(
      y_true, probs, CLASS_NAMES, n_resamples=500, seed=seed)
  result = run(0)
  headline = ['accuracy', 'macro_precision', 'macro_recall', 'macro_f1',
              'weighted_f1', 'macro_roc_auc', 'macro_average_precision',
              'log_loss']
  entries = {key: result[key] for key in headline}
  for name in CLASS_NAMES:
    for key in ('precision', 'recall', 'f1', 'roc_auc', 'average_precision'):
      entries[f'{name} {key}'] = result['per_class'][name][key]
  for key, entry in entries.items():
    assert entry['n_dropped'] == 0, key
    assert entry['ci_low'] <= entry['value'] <= entry['ci_high'], key
  assert result['per_class']['prostate']['support'] == 1
  wilson = result['per_class']['prostate']['recall']
  assert wilson['wilson_ci_high'] - wilson['wilson_ci_low'] > 0.5

  assert json.dumps(run(0)) == json.dumps(result)
  assert json.dumps(run(1)) != json.dumps(result)


def test_bootstrap_spread_shrinks_with_n():
  widths = []
  for size in (40, 400):
    y_true, probs = _fixed_predictions(num_samples=size, seed=3)
    result = metrics.evaluate_classification(
        y_true, probs, CLASS_NAMES, n_resamples=300, include_curves=False)
    widths.append(result['accuracy']['ci_high'] - result['accuracy']['ci_low'])
    # The bootstrap and Wilson intervals of accuracy agree roughly.
    wilson = (result['accuracy']['wilson_ci_high']
              - result['accuracy']['wilson_ci_low'])
    assert 0.5 < widths[-1] / wilson < 1.5
  assert widths[1] < widths[0] / 2


def test_class_absent_from_labels():
  y_true, probs = _fixed_predictions(num_samples=60, seed=1)
  keep = y_true != 2
  result = metrics.evaluate_classification(
      y_true[keep], probs[keep], CLASS_NAMES, n_resamples=100)
  assert result['undefined_classes'] == ['prostate']
  assert result['per_class']['prostate']['roc_auc']['value'] is None
  assert result['per_class']['prostate']['roc_auc']['n_dropped'] == 100
  defined = [sk.roc_auc_score(y_true[keep] == c, probs[keep][:, c])
             for c in (0, 1)]
  assert result['macro_roc_auc']['value'] == pytest.approx(np.mean(defined))
  assert result['macro_roc_auc']['n_dropped'] == 0
  json.dumps(result, allow_nan=False)
  assert 'undefined for' in metrics.classification_report_text(result)


def test_wilson_matches_scipy():
  for successes, n in [(0, 10), (5, 10), (10, 10), (37, 50), (1, 1)]:
    got = metrics.wilson_interval(successes, n)
    want = stats.binomtest(successes, n).proportion_ci(
        confidence_level=0.95, method='wilson')
    np.testing.assert_allclose(got, (want.low, want.high), atol=1e-12)
  entry = metrics.proportion_ci(8, 10, confidence=0.9)
  assert entry['value'] == 0.8
  assert entry['method'] == 'wilson'
  assert entry['ci_low'] < 0.8 < entry['ci_high']


def test_wilson_invalid():
  with pytest.raises(ValueError, match='successes=11, n=10'):
    metrics.proportion_ci(11, 10)
  with pytest.raises(ValueError, match='successes=0, n=0'):
    metrics.proportion_ci(0, 0)


def test_invalid_inputs(fixed):
  y_true, probs, _ = fixed
  with pytest.raises(ValueError, match='Got 2 class names for 3'):
    metrics.evaluate_classification(y_true, probs, ['a', 'b'])
  with pytest.raises(ValueError, match='must sum to 1'):
    metrics.evaluate_classification(y_true, probs * 0.5, CLASS_NAMES)
  with pytest.raises(ValueError, match=r'in \[0, 1\].*softmax'):
    metrics.evaluate_classification(y_true, probs * 3 - 1, CLASS_NAMES)
  with pytest.raises(ValueError, match=r'in \[0, 3\), got values from 0 to 5'):
    metrics.evaluate_classification(np.where(y_true == 2, 5, y_true), probs,
                                    CLASS_NAMES)
  with pytest.raises(ValueError, match=r'shape \(90,\)'):
    metrics.evaluate_classification(y_true[:-1], probs, CLASS_NAMES)
  with pytest.raises(ValueError, match='n_bins must be >= 1, got 0'):
    metrics.expected_calibration_error(y_true, probs, n_bins=0)
  with pytest.raises(ValueError, match='integer class indices'):
    metrics.evaluate_classification(y_true.astype(float), probs, CLASS_NAMES)
