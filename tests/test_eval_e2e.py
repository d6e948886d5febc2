"""End to end on the real MIP folder: train briefly, evaluate, predict, export."""

import csv
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import eval as eval_script
import predict as predict_script
from flax_pet import evaluation

REPO = Path(__file__).resolve().parents[1]

# Small enough for CI on two cores: 160 px, one cached view, three epochs.
QUICK_OVERRIDES = [
    '--config.image_size=160',
    '--config.augment=False',
    '--config.num_epochs=3',
    '--config.hidden_units=64',
]


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp('run') / 'pet_mip'
  subprocess.run(
      [sys.executable, str(REPO / 'train.py'), '--config', str(REPO / 'configs' / 'pet_mip.py'),
       '--workdir', str(workdir), f'--config.data_dir={data_dir / "pet-mip"}', *QUICK_OVERRIDES],
      check=True, capture_output=True, cwd=REPO,
  )
  return workdir


@pytest.fixture(scope='module')
def evaluated(trained_workdir, data_dir):
  output = trained_workdir / 'eval'
  code = eval_script.main([
      '--workdir', str(trained_workdir), '--resamples', '200', '--gradcam', '1',
  ])
  assert code == 0
  return output


def read_rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


class _Resources(HTMLParser):
  def __init__(self):
    super().__init__()
    self.sources = []

  def handle_starttag(self, tag, attrs):
    for name, value in attrs:
      if name in ('src', 'href') and value:
        self.sources.append(value)


@pytest.mark.slow
def test_workdir_has_documented_files(trained_workdir):
  for name in ('config.json', 'manifest.csv', 'metrics.jsonl', 'summary.json'):
    assert (trained_workdir / name).is_file(), name
  assert (trained_workdir / 'checkpoints' / 'best').is_dir()
  assert len(read_rows(trained_workdir / 'manifest.csv')) == 373
  history = [json.loads(line) for line in (trained_workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [row['epoch'] for row in history] == [0, 1, 2]
  summary = json.loads((trained_workdir / 'summary.json').read_text())
  assert summary['test']['n'] == 19
  assert summary['test']['accuracy']['ci_low'] <= summary['test']['accuracy']['value']


@pytest.mark.slow
def test_metrics_match_predictions(evaluated, trained_workdir):
  metrics = json.loads((evaluated / 'metrics.json').read_text())
  rows = read_rows(evaluated / 'predictions.csv')
  manifest = read_rows(trained_workdir / 'manifest.csv')
  test_paths = [row['path'] for row in manifest if row['split'] == 'test']

  assert [row['path'] for row in rows] == test_paths
  assert metrics['n'] == len(rows) == 19
  accuracy = np.mean([row['true_class'] == row['predicted_class'] for row in rows])
  assert metrics['accuracy']['value'] == pytest.approx(accuracy)
  probabilities = np.array([[float(row['p_Cancer']), float(row['p_No cancer'])] for row in rows])
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
  labels = np.array([row['true_class'] == 'No cancer' for row in rows], int)
  log_loss = -np.mean(np.log(probabilities[np.arange(len(rows)), labels]))
  assert metrics['log_loss']['value'] == pytest.approx(log_loss, rel=1e-4)


@pytest.mark.slow
def test_report_is_self_contained(evaluated):
  parser = _Resources()
  parser.feed((evaluated / 'report.html').read_text())

  assert parser.sources
  assert all(source.startswith('data:') for source in parser.sources)
  assert len(list((evaluated / 'gradcam').glob('*.png'))) == 2


@pytest.mark.slow
def test_eval_rejects_mismatched_classes(trained_workdir, data_dir, tmp_path, capsys):
  source = sorted((data_dir / 'pet-mip' / 'Cancer').glob('*.png'))[0]
  for name in ('benign', 'malignant'):
    (tmp_path / 'other' / name).mkdir(parents=True)
    (tmp_path / 'other' / name / source.name).write_bytes(source.read_bytes())

  code = eval_script.main(['--workdir', str(trained_workdir), '--data_dir', str(tmp_path / 'other')])

  message = capsys.readouterr().err
  assert code == 1
  assert "['benign', 'malignant']" in message
  assert "['Cancer', 'No cancer']" in message


@pytest.mark.slow
def test_predict_lists_undecodable_file(trained_workdir, data_dir, tmp_path):
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  source = sorted((data_dir / 'pet-mip' / 'Cancer').glob('*.png'))[0]
  (inputs / 'good.png').write_bytes(source.read_bytes())
  (inputs / 'broken.png').write_bytes(source.read_bytes()[:200])
  output = tmp_path / 'predictions.csv'

  code = predict_script.main(['--workdir', str(trained_workdir), str(inputs), '--output', str(output)])

  rows = {Path(row['path']).name: row for row in read_rows(output)}
  assert code == 0
  assert rows['good.png']['status'] == 'ok'
  assert rows['broken.png']['status'] == 'skipped'
  assert rows['broken.png']['reason']
  assert rows['broken.png']['p_Cancer'] == ''


@pytest.mark.slow
def test_load_trained_checkpoint_choices(trained_workdir):
  best = evaluation.load_trained(trained_workdir, 'best')
  latest = evaluation.load_trained(trained_workdir, 'latest')
  by_epoch = evaluation.load_trained(trained_workdir, '2')

  assert best.checkpoint.startswith('best')
  assert latest.checkpoint == 'latest (epoch 2)'
  assert by_epoch.checkpoint.endswith('(epoch 2)')
  with pytest.raises(ValueError, match="'best', 'latest' or an epoch number"):
    evaluation.load_trained(trained_workdir, 'newest')
