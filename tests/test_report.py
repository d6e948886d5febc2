"""Tests for flax_pet.report: plots and the self-contained HTML report."""

import base64
import html.parser
import io
import json
import logging

import numpy as np
from PIL import Image
import pytest

from flax_pet import metrics
from flax_pet import report

CLASS_NAMES = ['No cancer', 'Cancer <b>', 'prostate']


def _fixed_predictions(num_samples=60, seed=0):
  rng = np.random.default_rng(seed)
  y_true = rng.integers(0, 3, size=num_samples)
  logits = rng.normal(size=(num_samples, 3)) + 1.5 * np.eye(3)[y_true]
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  return y_true, probs


@pytest.fixture(scope='module')
def evaluation():
  y_true, probs = _fixed_predictions()
  return metrics.evaluate_classification(y_true, probs, CLASS_NAMES,
                                         n_resamples=200, seed=3)


@pytest.fixture(scope='module')
def history_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('run') / 'metrics.jsonl'
  rows = [
      {'epoch': e, 'train_loss': 1.0 / (e + 1), 'train_accuracy': 0.5 + 0.05 * e,
       'val_loss': 1.2 / (e + 1), 'val_accuracy': 0.45 + 0.04 * e,
       'learning_rate': 1e-4}
      for e in range(5)
  ]
  lines = [json.dumps(row) for row in rows]
  lines.insert(2, '{"epoch": 9, "train_loss"')  # cut short by a killed run
  path.write_text('\n'.join(lines) + '\n')
  return path


@pytest.fixture(scope='module')
def overlay_png(tmp_path_factory):
  path = tmp_path_factory.mktemp('overlays') / 'patient_001_gradcam.png'
  Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(path)
  return path


POINTING_GAME = {
    'hit_rate': metrics.proportion_ci(7, 10),
    'baseline': {'value': 0.0123, 'ci_low': 0.01, 'ci_high': 0.015,
                 'sd': 0.004, 'min': 0.002, 'max': 0.03, 'n': 10,
                 'method': 'mean mask area fraction'},
    'n_images': 12, 'n_scored': 10, 'missing_masks': ['a.png'],
    'empty_masks': ['b.png'], 'empty_after_resize': [], 'flat_heatmaps': [],
    'peak_on_padding': [], 'tolerance_px': 0.0, 'confidence': 0.95,
    'image_size': [224, 224], 'resize': 'pad', 'mask_dir': 'masks',
    'per_image': [],
}


@pytest.fixture(scope='module')
def written(evaluation, history_file, overlay_png, tmp_path_factory):
  output_dir = tmp_path_factory.mktemp('eval')
  path = report.write_report(
      output_dir, evaluation, CLASS_NAMES, history_path=history_file,
      gradcam_images=[overlay_png], pointing_game=POINTING_GAME,
      provenance={'weights_sha256': 'ab' * 32,
                  'checkpoint': 'runs/x/checkpoints/best/12',
                  'config': {'image_size': 224, 'resize': 'pad'}},
      dataset={'name': 'pet-mip', 'split': 'test'},
  )
  parser = ReportParser()
  parser.feed(path.read_text(encoding='utf-8'))
  return path, parser


class ReportParser(html.parser.HTMLParser):
  """Collect tags, link attributes, images and tagged table cells."""

  def __init__(self):
    super().__init__()
    self.tags = []
    self.links = []
    self.images = []
    self.cells = {}
    self.text = []
    self._cell_key = None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags.append(tag)
    for name in ('src', 'href', 'srcset', 'action', 'data', 'poster'):
      if name in attrs:
        self.links.append((tag, name, attrs[name]))
    if tag == 'img':
      self.images.append(attrs['src'])
    if tag == 'td' and 'data-metric' in attrs:
      self._cell_key = (attrs['data-metric'], attrs['data-field'])
      self.cells[self._cell_key] = ''

  def handle_endtag(self, tag):
    if tag == 'td':
      self._cell_key = None

  def handle_data(self, data):
    self.text.append(data)
    if self._cell_key is not None:
      self.cells[self._cell_key] += data


def _shown(value):
  return 'n/a' if value is None else f'{value:.4f}'


def test_report_has_no_external_references(written):
  path, parser = written
  assert 'script' not in parser.tags
  assert 'link' not in parser.tags
  assert 'iframe' not in parser.tags
  assert parser.links, 'the report should embed images'
  for tag, name, value in parser.links:
    assert value.startswith('data:image/png;base64,'), (tag, name, value[:60])
  text = path.read_text(encoding='utf-8')
  assert 'http://' not in text
  assert 'https://' not in text
  assert 'url(' not in text


def test_report_images_decode_as_png(written):
  _, parser = written
  # 4 metric plots, the training curves and one Grad-CAM overlay.
  assert len(parser.images) == 6
  for src in parser.images:
    data = base64.b64decode(src.split(',', 1)[1], validate=True)
    with Image.open(io.BytesIO(data)) as image:
      assert image.format == 'PNG'
      image.load()
      assert image.width > 10
      assert image.height > 10


def test_report_writes_plot_files(written):
  path, _ = written
  for name in (report.CONFUSION_PLOT, report.ROC_PLOT, report.PR_PLOT,
               report.RELIABILITY_PLOT, report.TRAINING_PLOT):
    with Image.open(path.parent / name) as image:
      assert image.format == 'PNG'


def test_report_summary_numbers_match(written, evaluation):
  _, parser = written
  for key, _ in report._SUMMARY_ROWS:
    entry = evaluation[key]
    assert parser.cells[(key, 'value')] == _shown(entry['value']), key
    assert parser.cells[(key, 'ci_low')] == _shown(entry['ci_low']), key
    assert parser.cells[(key, 'ci_high')] == _shown(entry['ci_high']), key
  accuracy = evaluation['accuracy']
  assert parser.cells[('accuracy', 'wilson_ci')] == (
      f'{accuracy["wilson_ci_low"]:.4f}, {accuracy["wilson_ci_high"]:.4f}')


def test_report_per_class_numbers_match(written, evaluation):
  _, parser = written
  for name in CLASS_NAMES:
    for key, _ in report._PER_CLASS_COLUMNS:
      entry = evaluation['per_class'][name][key]
      expected = (f'{_shown(entry["value"])} [{_shown(entry["ci_low"])}, '
                  f'{_shown(entry["ci_high"])}]')
      assert parser.cells[(f'{name}/{key}', 'value_with_ci')] == expected


def test_report_pointing_game_and_text(written):
  _, parser = written
  assert parser.cells[('hit_rate', 'value')] == '0.7000'
  expected = metrics.proportion_ci(7, 10)
  assert parser.cells[('hit_rate', 'ci_low')] == _shown(expected['ci_low'])
  assert parser.cells[('baseline', 'value')] == '0.0123'
  text = ''.join(parser.text)
  assert report.RESEARCH_USE_NOTE in text
  assert 'Cancer <b>' in text  # escaped in the HTML, intact as text
  assert 'ab' * 32 in text
  assert '1 images without a mask file' in text
  assert 'pet-mip' in text
  assert 'test' in text


def test_read_history_skips_bad_lines(history_file, caplog):
  with caplog.at_level(logging.WARNING, logger='flax_pet.report'):
    rows = report.read_history(history_file)
  assert [row['epoch'] for row in rows] == [0, 1, 2, 3, 4]
  assert 'invalid JSON' in caplog.text


def test_read_history_missing_file(tmp_path):
  assert report.read_history(tmp_path / 'absent.jsonl') == []
  assert report.read_history(None) == []
  assert report.plot_training_curves([], tmp_path / 'x.png') is None
  assert not (tmp_path / 'x.png').exists()


def test_report_without_history_or_intervals(tmp_path):
  y_true, probs = _fixed_predictions(20, seed=1)
  result = metrics.evaluate_classification(y_true, probs, CLASS_NAMES,
                                           n_resamples=0)
  path = report.write_report(tmp_path, result, CLASS_NAMES,
                             history_path=tmp_path / 'absent.jsonl')
  parser = ReportParser()
  parser.feed(path.read_text(encoding='utf-8'))
  assert len(parser.images) == 4
  assert parser.cells[('accuracy', 'ci_low')] == 'n/a'
  assert 'No training history' in ''.join(parser.text)


def test_report_undefined_class(tmp_path):
  y_true = np.array([0, 0, 1, 1, 0, 1])
  probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1],
                    [0.5, 0.4, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1]])
  result = metrics.evaluate_classification(y_true, probs, CLASS_NAMES,
                                           n_resamples=50)
  path = report.write_report(tmp_path, result, CLASS_NAMES)
  parser = ReportParser()
  parser.feed(path.read_text(encoding='utf-8'))
  assert parser.cells[('prostate/roc_auc', 'value_with_ci')] == 'n/a'
  assert 'undefined for prostate' in ''.join(parser.text)


def test_write_report_rejects_bad_inputs(evaluation, tmp_path):
  with pytest.raises(ValueError, match='differ from'):
    report.write_report(tmp_path, evaluation, ['a', 'b', 'c'])
  not_png = tmp_path / 'fake.png'
  not_png.write_bytes(b'GIF89a')
  with pytest.raises(ValueError, match='not a PNG'):
    report.write_report(tmp_path, evaluation, CLASS_NAMES,
                        gradcam_images=[not_png])
  without_curves = {k: v for k, v in evaluation.items() if k != 'curves'}
  with pytest.raises(ValueError, match='include_curves'):
    report.write_report(tmp_path, without_curves, CLASS_NAMES)
