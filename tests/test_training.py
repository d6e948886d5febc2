"""Head training: batching, loss checks, data parallelism and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flax_pet import models
from flax_pet import training

REPO = Path(__file__).resolve().parents[1]


def make_separable_features(count=96, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, count)
  centers = rng.normal(0, 1, (classes, models.FEATURE_CHANNELS))
  features = centers[labels] + rng.normal(0, 0.5, (count, models.FEATURE_CHANNELS))
  return features.astype(np.float32), labels.astype(np.int32)


def train_head(features, labels, epochs, batch_size=16, seed=0):
  settings = training.LossSettings(
      alpha=(0.5, 0.3, 0.2), gamma=2.0, class_weights=(0.9, 1.1, 1.0),
      clip_epsilon=1e-7, l2=1e-3,
  )
  head = models.ClassifierHead(3, 64, 0.7)
  tx = training.create_optimizer()
  mesh = training.make_mesh(batch_size)
  state = training.replicate(training.create_train_state(head, jax.random.key(seed), tx), mesh)
  train_epoch = training.make_train_epoch(head, settings, tx)
  history = []
  for epoch in range(epochs):
    state = training.set_learning_rate(state, 1e-3)
    batches = training.epoch_batches(features, labels, batch_size, seed, epoch)
    state, step_metrics = train_epoch(
        state, *(training.shard_batches(b, mesh) for b in batches),
        jax.random.fold_in(jax.random.key(seed), epoch),
    )
    history.append(training.epoch_summary(jax.device_get(step_metrics)))
  return state, history


def test_epoch_batches_pad_and_mask():
  features = np.arange(10, dtype=np.float32)[:, None].repeat(4, 1)
  labels = np.arange(10)

  batch_features, batch_labels, mask = training.epoch_batches(features, labels, 4, 0, 0)

  assert batch_features.shape == (3, 4, 4)
  assert mask.sum() == 10
  assert mask[-1].tolist() == [1, 1, 0, 0]
  assert sorted(batch_labels.reshape(-1)[mask.reshape(-1) > 0].tolist()) == list(range(10))


def test_epoch_batches_shuffle_depends_on_epoch():
  features = np.zeros((32, 2), np.float32)
  labels = np.arange(32)

  first = training.epoch_batches(features, labels, 8, 0, 0)[1]
  again = training.epoch_batches(features, labels, 8, 0, 0)[1]
  second = training.epoch_batches(features, labels, 8, 0, 1)[1]

  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, second)


def test_training_reduces_loss():
  features, labels = make_separable_features()

  _, history = train_head(features, labels, epochs=8)

  assert history[-1]['loss'] < 0.5 * history[0]['loss']
  assert history[-1]['accuracy'] > 0.9


def test_alpha_must_match_classes():
  with pytest.raises(ValueError, match=r"3 entries .* 2 classes \['Cancer', 'No cancer'\]"):
    training.check_alpha((0.5, 0.3, 0.2), ['Cancer', 'No cancer'])
  assert training.check_alpha((), ['a', 'b']) is None


def test_non_finite_loss_names_epoch_and_step():
  metrics = {'loss': np.array([0.5, np.nan, 0.4])}

  with pytest.raises(FloatingPointError, match='epoch 7, step 31'):
    training.check_finite(metrics, epoch=7, first_step=30)


def test_batch_not_divisible_by_devices(monkeypatch):
  monkeypatch.setattr(jax, 'devices', lambda: [object()] * 4)

  with pytest.raises(ValueError, match='batch_size 10 is not divisible by the 4 devices'):
    training.make_mesh(10)


_SHARDED_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from tests import test_training as t
import jax
features, labels = t.make_separable_features()
_, history = t.train_head(features, labels, epochs=4)
print(json.dumps({{'devices': jax.device_count(), 'history': history}}))
"""


def run_with_devices(count):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={count}')
  output = subprocess.run(
      [sys.executable, '-c', _SHARDED_SCRIPT.format(repo=str(REPO))],
      env=env, capture_output=True, text=True, check=True, cwd=REPO,
  ).stdout
  return json.loads(output.strip().splitlines()[-1])


def test_four_devices_match_one_device():
  one = run_with_devices(1)
  four = run_with_devices(4)

  assert one['devices'] == 1
  assert four['devices'] == 4
  for single, sharded in zip(one['history'], four['history']):
    assert sharded['loss'] == pytest.approx(single['loss'], rel=1e-5)
    assert sharded['accuracy'] == single['accuracy']


DEMO_OVERRIDES = [
    '--config.image_size=75',
    '--config.demo_images_per_class=16',
    '--config.num_epochs=30',
    '--config.early_stopping_patience=50',
    '--config.batch_size=8',
    '--config.hidden_units=32',
]


def train_command(workdir):
  return [
      sys.executable, str(REPO / 'train.py'), '--config', str(REPO / 'configs' / 'demo.py'),
      '--workdir', str(workdir), *DEMO_OVERRIDES,
  ]


@pytest.mark.slow
def test_sigkill_and_rerun_gives_same_result(tmp_path):
  uninterrupted = tmp_path / 'uninterrupted'
  subprocess.run(train_command(uninterrupted), check=True, capture_output=True, cwd=REPO)
  expected = json.loads((uninterrupted / 'summary.json').read_text())

  # Kill the second run as soon as an epoch after the first is checkpointed.
  interrupted = tmp_path / 'interrupted'
  process = subprocess.Popen(train_command(interrupted), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while not (interrupted / 'checkpoints' / 'latest' / '2').is_dir():
    assert process.poll() is None, 'training ended before it could be killed'
    assert time.monotonic() < deadline, 'no checkpoint of epoch 2 within 300 s'
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (interrupted / 'summary.json').exists()

  subprocess.run(train_command(interrupted), check=True, capture_output=True, cwd=REPO)
  resumed = json.loads((interrupted / 'summary.json').read_text())

  assert resumed == expected
  lines = (interrupted / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['epoch'] for line in lines] == list(range(30))


@pytest.mark.slow
def test_full_network_fine_tunes_top_block(tmp_path):
  from flax_pet import evaluation  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / 'finetune'
  subprocess.run(
      [sys.executable, str(REPO / 'train.py'), '--config', str(REPO / 'configs' / 'demo.py'),
       '--workdir', str(workdir), '--config.image_size=75', '--config.demo_images_per_class=8',
       '--config.num_epochs=1', '--config.mode=full_network', '--config.unfreeze_top_blocks=1',
       '--config.batch_size=4', '--config.hidden_units=16'],
      check=True, capture_output=True, cwd=REPO,
  )

  trained = evaluation.load_trained(workdir)
  frozen = ocp.StandardCheckpointer().restore(workdir / 'backbone')

  tuned_kernel = trained.backbone['params']['block8_10']['up']['kernel']
  frozen_kernel = frozen['params']['block8_10']['up']['kernel']
  assert not np.allclose(tuned_kernel, frozen_kernel)
  np.testing.assert_array_equal(
      trained.backbone['params']['block8_9']['up']['kernel'],
      frozen['params']['block8_9']['up']['kernel'],
  )


@pytest.mark.slow
def test_rerun_with_other_config_is_rejected(tmp_path):
  workdir = tmp_path / 'run'
  # Later flags override earlier ones.
  command = train_command(workdir) + ['--config.num_epochs=2']
  subprocess.run(command, check=True, capture_output=True, cwd=REPO)
  config_before = (workdir / 'config.json').read_text()

  changed = subprocess.run(
      command + ['--config.hidden_units=64'], capture_output=True, text=True, cwd=REPO
  )

  assert changed.returncode != 0
  assert 'contains a run with another config (hidden_units: 32 -> 64)' in changed.stderr
  assert (workdir / 'config.json').read_text() == config_before


def test_invalid_config_value_is_named():
  from configs import demo  # pylint: disable=import-outside-toplevel
  from flax_pet import experiment  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  config.batch_size = 0

  with pytest.raises(ValueError, match=r'Invalid --config.batch_size=0'):
    experiment.validate_config(config)
