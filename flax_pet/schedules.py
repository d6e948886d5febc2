"""Learning-rate schedules by epoch, reduce-on-plateau and early stopping.

Three pieces, all driven by the training loop once per epoch:

- `table_learning_rate`: the reference recipe's fixed table (epoch -> rate),
  and `table_schedule`, the same table as an optax schedule over steps.
- `PlateauSchedule`: a warmup, then Keras' ReduceLROnPlateau on a monitored
  value such as the validation loss.
- `EarlyStopping`: Keras' EarlyStopping, which records the best epoch so that
  the caller can restore the best checkpoint.

The stateful classes are dataclasses whose `to_dict()` output is plain JSON and
whose `from_dict()` rebuilds them, so a resumed run continues with the same
counters. Their `update(epoch, value)` must be called once per epoch, in order.

The learning rate reaches optax through `optax.inject_hyperparams`, for
example `opt_state.hyperparams['learning_rate'] = lr` before each epoch.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

# The reference notebook's LearningRateScheduler, as (first epoch, rate) rows:
#   if epoch < 5: 5e-5 elif epoch < 15: 1e-4 elif epoch < 25: 5e-5 else 1e-5.
# Epochs count from 0, as Keras passes them to the scheduler.
RECIPE_LR_TABLE = ((0, 5e-5), (5, 1e-4), (15, 5e-5), (25, 1e-5))

Mode = Literal['min', 'max']


def table_learning_rate(
    epoch: int, table: Sequence[tuple[int, float]] = RECIPE_LR_TABLE
) -> float:
  """Look up the learning rate of a 0-based epoch in a piecewise-constant table.

  Each row (first_epoch, rate) applies from `first_epoch` until the next row's
  first epoch. The last row applies to every later epoch.

  Args:
    epoch: 0-based epoch index.
    table: rows (first_epoch, rate) with strictly increasing first epochs,
      starting at 0. Defaults to the reference recipe.

  Returns:
    The learning rate for `epoch`.

  Raises:
    ValueError: if `epoch` is negative or the table is malformed.
  """
  starts, rates = _check_table(table)
  if epoch < 0:
    raise ValueError(f'Epoch must be >= 0, got {epoch}.')
  index = int(np.searchsorted(starts, epoch, side='right')) - 1
  return float(rates[index])


def table_schedule(
    steps_per_epoch: int, table: Sequence[tuple[int, float]] = RECIPE_LR_TABLE
):
  """Turn an epoch table into an optax schedule (step -> learning rate).

  Useful when a whole run is one jitted loop over steps and the rate cannot be
  set from Python between epochs. Step s belongs to epoch s // steps_per_epoch.

  Args:
    steps_per_epoch: optimizer steps in one epoch, >= 1.
    table: rows (first_epoch, rate) as in `table_learning_rate`.

  Returns:
    A function of the integer step count that returns a float32 scalar,
    usable as `learning_rate` of any optax optimizer.

  Raises:
    ValueError: if `steps_per_epoch` < 1 or the table is malformed.
  """
  starts, rates = _check_table(table)
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}.')
  starts = jnp.asarray(starts)
  rates = jnp.asarray(rates, jnp.float32)

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    index = jnp.searchsorted(starts, epoch, side='right') - 1
    return rates[index]

  return schedule


def _check_table(table):
  starts = np.asarray([row[0] for row in table])
  rates = np.asarray([row[1] for row in table], np.float64)
  if starts.size == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0):
    raise ValueError(
        'Learning-rate table rows must be (first_epoch, rate) with first '
        f'epochs increasing strictly from 0, got {list(table)}.'
    )
  if not np.all(rates > 0):
    raise ValueError(f'Learning rates must be > 0, got {rates.tolist()}.')
  return starts, rates


class _Serializable:
  """to_dict/from_dict for a dataclass of JSON-compatible fields."""

  def to_dict(self) -> dict[str, Any]:
    """Return every field, settings and state, as a JSON-compatible dict."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict[str, Any]):
    """Rebuild an instance from `to_dict()` output.

    Raises:
      ValueError: if `data` contains keys that are not fields of the class.
    """
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(
          f'Unknown {cls.__name__} fields {unknown} in saved state. Expected '
          f'a subset of {sorted(names)}.'
      )
    return cls(**data)


def _is_improvement(value, best, min_delta, mode):
  # Keras' MonitorCallback: strictly better than best by more than min_delta.
  if best is None:
    return True
  if mode == 'min':
    return value < best - min_delta
  return value > best + min_delta


def _check_epoch_order(name, epoch, last_epoch):
  if last_epoch is not None and epoch <= last_epoch:
    raise ValueError(
        f'{name}.update() got epoch {epoch} after epoch {last_epoch}. Call it '
        'once per epoch in increasing order, and after a resume continue with '
        'the next epoch.'
    )


def _check_finite(name, epoch, value):
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(
        f'{name}.update() got a non-finite monitored value {value} at epoch '
        f'{epoch}. Stop the run and check the loss of this epoch.'
    )
  return value


def _check_mode(mode):
  if mode not in ('min', 'max'):
    raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")


@dataclasses.dataclass
class PlateauSchedule(_Serializable):
  """Warmup, then Keras ReduceLROnPlateau on a monitored value.

  Warmup covers epochs 0 to `warmup_epochs - 1`. With `warmup='constant'` the
  rate is `warmup_lr` throughout, which reproduces the reference table's first
  phase (5e-5 for epochs 0-4, then 1e-4). With `warmup='linear'` the rate rises
  linearly from `warmup_lr` at epoch 0 towards `base_lr`, reaching it at epoch
  `warmup_epochs`. Values passed to `update` during warmup are ignored.

  After warmup the rate starts at `base_lr` and follows
  `keras.callbacks.ReduceLROnPlateau` (Keras 3.15) at the end of each epoch:

  1. During cooldown, the cooldown counter drops by one and `wait` resets.
     Because this happens before the check in step 3, a reduction at epoch e
     with cooldown k pauses counting for epochs e + 1 to e + k - 1, and epoch
     e + k counts towards `patience` again.
  2. The value improves if it is below `best - min_delta` (mode 'min') or
     above `best + min_delta` (mode 'max'), with `min_delta` absolute. An
     improvement sets `best` and resets `wait`.
  3. Otherwise, unless still in cooldown, `wait` grows by one. When it reaches
     `patience` and the rate is above `min_lr`, the rate becomes
     max(rate * factor, min_lr), `wait` resets and cooldown starts.

  The first value after warmup is always an improvement.

  Attributes:
    base_lr: rate after warmup, before any reduction.
    warmup_epochs: number of warmup epochs; 0 disables warmup.
    warmup_lr: rate at epoch 0 (constant warmup: during all of warmup).
    warmup: 'constant' or 'linear'.
    factor: multiplier of the rate at each reduction, in (0, 1).
    patience: epochs without improvement before a reduction, >= 1.
    min_delta: minimum absolute change that counts as an improvement.
    cooldown: epochs after a reduction during which no new reduction happens
      and `wait` stays 0.
    min_lr: lower bound of the rate.
    mode: 'min' for a loss, 'max' for a score such as accuracy.
    lr: current rate after warmup (state).
    best: best monitored value since warmup, None before the first (state).
    wait: epochs since the last improvement or reduction (state).
    cooldown_counter: cooldown epochs left (state).
    last_epoch: last epoch passed to `update`, None before the first (state).
  """

  base_lr: float = 1e-4
  warmup_epochs: int = 5
  warmup_lr: float = 5e-5
  warmup: Literal['constant', 'linear'] = 'constant'
  factor: float = 0.5
  patience: int = 2
  min_delta: float = 1e-4
  cooldown: int = 0
  min_lr: float = 1e-5
  mode: Mode = 'min'

  lr: float | None = None
  best: float | None = None
  wait: int = 0
  cooldown_counter: int = 0
  last_epoch: int | None = None

  def __post_init__(self):
    if self.base_lr <= 0 or self.warmup_lr <= 0:
      raise ValueError(
          f'base_lr and warmup_lr must be > 0, got {self.base_lr} and '
          f'{self.warmup_lr}.'
      )
    if self.warmup not in ('constant', 'linear'):
      raise ValueError(
          f"warmup must be 'constant' or 'linear', got {self.warmup!r}."
      )
    if self.warmup_epochs < 0:
      raise ValueError(f'warmup_epochs must be >= 0, got {self.warmup_epochs}.')
    if not 0 < self.factor < 1:
      raise ValueError(f'factor must be in (0, 1), got {self.factor}.')
    if self.patience < 1 or self.cooldown < 0 or self.min_delta < 0:
      raise ValueError(
          'patience must be >= 1 and cooldown and min_delta >= 0, got '
          f'patience={self.patience}, cooldown={self.cooldown}, '
          f'min_delta={self.min_delta}.'
      )
    if not 0 <= self.min_lr <= self.base_lr:
      raise ValueError(
          f'min_lr must be in [0, base_lr={self.base_lr}], got {self.min_lr}.'
      )
    _check_mode(self.mode)
    if self.lr is None:
      self.lr = self.base_lr

  def learning_rate(self, epoch: int) -> float:
    """Return the learning rate for the 0-based `epoch` about to run."""
    if epoch < self.warmup_epochs:
      if self.warmup == 'constant':
        return self.warmup_lr
      fraction = epoch / self.warmup_epochs
      return self.warmup_lr + fraction * (self.base_lr - self.warmup_lr)
    return self.lr

  def update(self, epoch: int, value: float) -> bool:
    """Record the monitored value at the end of `epoch` and maybe reduce.

    Args:
      epoch: the 0-based epoch that just finished.
      value: the monitored value after that epoch (e.g. validation loss).

    Returns:
      True if the rate was reduced, so `learning_rate(epoch + 1)` is lower.

    Raises:
      ValueError: if `epoch` is not after the last epoch passed, or `value`
        is NaN or infinite.
    """
    _check_epoch_order('PlateauSchedule', epoch, self.last_epoch)
    value = _check_finite('PlateauSchedule', epoch, value)
    self.last_epoch = epoch
    if epoch < self.warmup_epochs:
      return False

    if self.cooldown_counter > 0:
      self.cooldown_counter -= 1
      self.wait = 0

    if _is_improvement(value, self.best, self.min_delta, self.mode):
      self.best = value
      self.wait = 0
      return False
    if self.cooldown_counter > 0:
      return False

    self.wait += 1
    # Keras stores the rate in float32 and compares it with float32(min_lr),
    # so a rate already at the floor is not reduced again.
    at_floor = np.float32(self.lr) <= np.float32(self.min_lr)
    if self.wait < self.patience or at_floor:
      return False
    self.lr = max(self.lr * self.factor, self.min_lr)
    self.cooldown_counter = self.cooldown
    self.wait = 0
    return True


@dataclasses.dataclass(frozen=True)
class StopDecision:
  """Outcome of one `EarlyStopping.update` call.

  Attributes:
    improved: the value is the new best, so save the best checkpoint now.
    stop: training should stop after this epoch.
  """

  improved: bool
  stop: bool


@dataclasses.dataclass
class EarlyStopping(_Serializable):
  """Early stopping with `keras.callbacks.EarlyStopping` semantics (Keras 3.15).

  At the end of each epoch from `start_from_epoch` on, `wait` grows by one. A
  value below `best - min_delta` (mode 'min') or above `best + min_delta`
  (mode 'max') becomes the new best, records `best_epoch` and resets `wait`.
  Training stops at the first epoch > 0 where `wait >= patience`. With
  patience 5 and the best value at epoch e, that is epoch e + 5 unless a later
  epoch improves.

  Restoring the best weights is the caller's job: save a checkpoint whenever
  `update` returns `improved`, and restore the one of `best_epoch` after the
  loop, whether it stopped early or ran all epochs (as Keras does with
  `restore_best_weights=True`).

  Attributes:
    patience: epochs without improvement before stopping.
    min_delta: minimum absolute change that counts as an improvement.
    mode: 'min' for a loss, 'max' for a score such as accuracy.
    start_from_epoch: epochs before this one are ignored (a warmup).
    best: best monitored value, None before the first (state).
    best_epoch: epoch of `best`, None before the first (state).
    wait: epochs since the last improvement (state).
    stopped_epoch: epoch at which stopping was decided, or None (state).
    last_epoch: last epoch passed to `update`, None before the first (state).
  """

  patience: int = 5
  min_delta: float = 0.0
  mode: Mode = 'min'
  start_from_epoch: int = 0

  best: float | None = None
  best_epoch: int | None = None
  wait: int = 0
  stopped_epoch: int | None = None
  last_epoch: int | None = None

  def __post_init__(self):
    if self.patience < 0 or self.min_delta < 0 or self.start_from_epoch < 0:
      raise ValueError(
          'patience, min_delta and start_from_epoch must be >= 0, got '
          f'patience={self.patience}, min_delta={self.min_delta}, '
          f'start_from_epoch={self.start_from_epoch}.'
      )
    _check_mode(self.mode)

  @property
  def stopped(self) -> bool:
    """Whether an earlier `update` decided to stop."""
    return self.stopped_epoch is not None

  def update(self, epoch: int, value: float) -> StopDecision:
    """Record the monitored value at the end of `epoch`.

    Args:
      epoch: the 0-based epoch that just finished.
      value: the monitored value after that epoch (e.g. validation loss).

    Returns:
      Whether this epoch is the new best and whether to stop now.

    Raises:
      ValueError: if `epoch` is not after the last epoch passed, training
        already stopped, or `value` is NaN or infinite.
    """
    _check_epoch_order('EarlyStopping', epoch, self.last_epoch)
    value = _check_finite('EarlyStopping', epoch, value)
    if self.stopped:
      raise ValueError(
          f'EarlyStopping already stopped at epoch {self.stopped_epoch}, so '
          f'epoch {epoch} should not have run.'
      )
    self.last_epoch = epoch
    if epoch < self.start_from_epoch:
      return StopDecision(improved=False, stop=False)

    self.wait += 1
    if _is_improvement(value, self.best, self.min_delta, self.mode):
      self.best = value
      self.best_epoch = epoch
      self.wait = 0
      return StopDecision(improved=True, stop=False)

    if self.wait >= self.patience and epoch > 0:
      self.stopped_epoch = epoch
      return StopDecision(improved=False, stop=True)
    return StopDecision(improved=False, stop=False)
