"""Tests for flax_pet.schedules, with Keras 3's callbacks as the oracle."""

import json

import jax
import numpy as np
import pytest

from flax_pet import schedules


def _notebook_scheduler(epoch):
  """The reference notebook's LearningRateScheduler function, verbatim logic."""
  if epoch < 5:
    return 5e-5
  elif epoch < 15:
    return 1e-4
  elif epoch < 25:
    return 5e-5
  else:
    return 1e-5


# Validation-loss curves with plateaus, exact ties and sub-min_delta changes.
VAL_LOSS_CURVES = {
    'plateaus': [1.0, 0.9, 0.8, 0.8, 0.81, 0.79, 0.7, 0.7, 0.7, 0.7, 0.7,
                 0.7, 0.69995, 0.71, 0.72, 0.6, 0.65, 0.66, 0.67, 0.68, 0.69,
                 0.7, 0.71, 0.72],
    'noisy': list(np.round(
        0.5 + 0.5 * np.exp(-np.arange(40) / 8)
        + np.random.default_rng(3).normal(scale=0.03, size=40), 4)),
}


@pytest.fixture(scope='module')
def keras_model():
  keras = pytest.importorskip('keras')
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-4), loss='mse')
  return model


def test_table_every_epoch():
  for epoch in range(50):
    assert schedules.table_learning_rate(epoch) == _notebook_scheduler(epoch), (
        epoch
    )


def test_table_boundaries():
  assert schedules.table_learning_rate(4) == 5e-5
  assert schedules.table_learning_rate(5) == 1e-4
  assert schedules.table_learning_rate(14) == 1e-4
  assert schedules.table_learning_rate(15) == 5e-5
  assert schedules.table_learning_rate(24) == 5e-5
  assert schedules.table_learning_rate(25) == 1e-5
  assert schedules.table_learning_rate(10_000) == 1e-5


def test_table_schedule_steps():
  schedule = jax.jit(schedules.table_schedule(steps_per_epoch=7))
  for step in range(50 * 7):
    want = np.float32(_notebook_scheduler(step // 7))
    assert schedule(step) == want, step


def test_table_invalid():
  with pytest.raises(ValueError, match='increasing strictly from 0'):
    schedules.table_learning_rate(3, [(1, 1e-4)])
  with pytest.raises(ValueError, match='increasing strictly from 0'):
    schedules.table_learning_rate(3, [(0, 1e-4), (5, 1e-5), (5, 1e-6)])
  with pytest.raises(ValueError, match='must be > 0'):
    schedules.table_learning_rate(3, [(0, 0.0)])
  with pytest.raises(ValueError, match='Epoch must be >= 0'):
    schedules.table_learning_rate(-1)
  with pytest.raises(ValueError, match='steps_per_epoch'):
    schedules.table_schedule(0)


def test_warmup_constant_matches_table():
  schedule = schedules.PlateauSchedule()
  for epoch in range(15):
    assert schedule.learning_rate(epoch) == _notebook_scheduler(epoch), epoch


def test_warmup_linear():
  schedule = schedules.PlateauSchedule(
      base_lr=1e-3, warmup_lr=1e-4, warmup_epochs=3, warmup='linear'
  )
  rates = [schedule.learning_rate(epoch) for epoch in range(5)]
  np.testing.assert_allclose(rates, [1e-4, 4e-4, 7e-4, 1e-3, 1e-3])


def test_warmup_ignores_values():
  schedule = schedules.PlateauSchedule(warmup_epochs=3, patience=1)
  for epoch, value in enumerate([1.0, 2.0, 3.0]):
    assert not schedule.update(epoch, value)
  assert schedule.best is None
  assert not schedule.update(3, 5.0)
  assert schedule.best == 5.0
  assert schedule.update(4, 5.0)
  assert schedule.learning_rate(5) == pytest.approx(5e-5)


def test_plateau_reduction_and_floor():
  schedule = schedules.PlateauSchedule(
      base_lr=1e-4, warmup_epochs=0, factor=0.5, patience=2, min_delta=0.0,
      min_lr=3e-5,
  )
  values = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
  reduced = [schedule.update(epoch, v) for epoch, v in enumerate(values)]
  # Epoch 0 sets best; wait reaches 2 at epochs 2 and 4, 5e-5 then 3e-5
  # (the floor, not 2.5e-5); no reduction below the floor afterwards.
  assert reduced == [False, False, True, False, True, False, False, False]
  assert schedule.learning_rate(8) == 3e-5


def test_plateau_cooldown():
  schedule = schedules.PlateauSchedule(
      base_lr=1e-4, warmup_epochs=0, factor=0.1, patience=1, cooldown=2,
      min_delta=0.0, min_lr=0.0,
  )
  reduced = [schedule.update(epoch, 1.0) for epoch in range(7)]
  # Keras decrements the cooldown counter before checking it, so after a
  # reduction at epoch e, only epoch e + 1 is held and e + 2 counts again.
  assert reduced == [False, True, False, True, False, True, False]
  assert schedule.learning_rate(7) == pytest.approx(1e-7)


@pytest.mark.parametrize('curve', sorted(VAL_LOSS_CURVES))
@pytest.mark.parametrize('cooldown', [0, 2])
def test_plateau_matches_keras(keras_model, curve, cooldown):
  import keras

  settings = dict(factor=0.5, patience=2, min_delta=1e-4, cooldown=cooldown,
                  min_lr=2e-5)
  keras_model.optimizer.learning_rate = 1e-4
  callback = keras.callbacks.ReduceLROnPlateau(monitor='val_loss', **settings)
  callback.set_model(keras_model)
  callback.on_train_begin()
  schedule = schedules.PlateauSchedule(base_lr=1e-4, warmup_epochs=0,
                                       **settings)

  for epoch, value in enumerate(VAL_LOSS_CURVES[curve]):
    callback.on_epoch_end(epoch, {'val_loss': value})
    schedule.update(epoch, value)
    keras_lr = float(keras_model.optimizer.learning_rate.numpy())
    np.testing.assert_allclose(
        schedule.learning_rate(epoch + 1), keras_lr, rtol=1e-6,
        err_msg=f'epoch {epoch}',
    )
  assert schedule.lr < 1e-4


def test_plateau_round_trip():
  schedule = schedules.PlateauSchedule(warmup_epochs=1, patience=2, cooldown=1)
  values = [0.9, 0.8, 0.8, 0.8, 0.85, 0.7, 0.71, 0.72, 0.73]
  for epoch, value in enumerate(values[:5]):
    schedule.update(epoch, value)
  saved = json.loads(json.dumps(schedule.to_dict()))
  resumed = schedules.PlateauSchedule.from_dict(saved)
  assert resumed == schedule
  for epoch, value in enumerate(values[5:], start=5):
    assert resumed.update(epoch, value) == schedule.update(epoch, value)
    assert resumed.learning_rate(epoch + 1) == schedule.learning_rate(epoch + 1)
  assert resumed == schedule


def test_plateau_invalid():
  with pytest.raises(ValueError, match='factor must be in'):
    schedules.PlateauSchedule(factor=1.0)
  with pytest.raises(ValueError, match='min_lr must be in'):
    schedules.PlateauSchedule(base_lr=1e-4, min_lr=1e-3)
  with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
    schedules.PlateauSchedule(mode='auto')
  with pytest.raises(ValueError, match=r"Unknown PlateauSchedule fields \['x"):
    schedules.PlateauSchedule.from_dict({'x_table': []})
  schedule = schedules.PlateauSchedule(warmup_epochs=0)
  schedule.update(0, 1.0)
  with pytest.raises(ValueError, match='got epoch 0 after epoch 0'):
    schedule.update(0, 1.0)
  with pytest.raises(ValueError, match='non-finite monitored value nan'):
    schedule.update(1, float('nan'))


def test_early_stop_epoch():
  stopper = schedules.EarlyStopping(patience=5)
  values = [1.0, 0.9, 0.8, 0.85, 0.8, 0.9, 0.95, 0.81, 0.7, 0.75]
  decisions = [stopper.update(epoch, v) for epoch, v in enumerate(values[:8])]
  # Best at epoch 2; epoch 4 ties (not an improvement); 5 epochs later, stop.
  assert [d.improved for d in decisions] == [True] * 3 + [False] * 5
  assert [d.stop for d in decisions] == [False] * 7 + [True]
  assert stopper.best_epoch == 2
  assert stopper.best == 0.8
  assert stopper.stopped_epoch == 7
  with pytest.raises(ValueError, match='already stopped at epoch 7'):
    stopper.update(8, 0.7)


def test_early_stop_min_delta_and_max():
  stopper = schedules.EarlyStopping(patience=2, min_delta=0.01)
  decisions = [stopper.update(e, v) for e, v in enumerate([1.0, 0.995, 0.99])]
  assert [d.stop for d in decisions] == [False, False, True]
  assert stopper.best_epoch == 0

  stopper = schedules.EarlyStopping(patience=1, mode='max')
  decisions = [stopper.update(e, v) for e, v in enumerate([0.5, 0.6, 0.6])]
  assert [d.improved for d in decisions] == [True, True, False]
  assert decisions[-1].stop
  assert stopper.best_epoch == 1


def test_early_stop_start_epoch():
  stopper = schedules.EarlyStopping(patience=1, start_from_epoch=3)
  decisions = [stopper.update(e, v) for e, v in enumerate([0.1, 0.2, 0.3, 0.5])]
  assert not any(d.stop for d in decisions)
  assert stopper.best_epoch == 3


@pytest.mark.parametrize('curve', sorted(VAL_LOSS_CURVES))
@pytest.mark.parametrize('patience', [0, 3, 5])
def test_early_stop_matches_keras(keras_model, curve, patience):
  import keras

  callback = keras.callbacks.EarlyStopping(
      monitor='val_loss', patience=patience, restore_best_weights=True
  )
  callback.set_model(keras_model)
  keras_model.stop_training = False
  callback.on_train_begin()
  stopper = schedules.EarlyStopping(patience=patience)

  for epoch, value in enumerate(VAL_LOSS_CURVES[curve]):
    callback.on_epoch_end(epoch, {'val_loss': value})
    decision = stopper.update(epoch, value)
    assert decision.stop == keras_model.stop_training, epoch
    assert stopper.best_epoch == callback.best_epoch, epoch
    if decision.stop:
      break
  assert stopper.stopped, 'curve too short to stop; lengthen it'


def test_early_stop_round_trip():
  values = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99]
  stopper = schedules.EarlyStopping(patience=5)
  for epoch, value in enumerate(values[:3]):
    stopper.update(epoch, value)
  resumed = schedules.EarlyStopping.from_dict(
      json.loads(json.dumps(stopper.to_dict()))
  )
  assert resumed == stopper
  decisions = [resumed.update(e, v) for e, v in enumerate(values[3:], start=3)]
  assert [d.stop for d in decisions] == [False, False, False, True]
  assert resumed.best_epoch == 1
  assert resumed.stopped_epoch == 6
