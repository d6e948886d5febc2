"""Orbax checkpoints of a training run: the latest epochs and the best one.

`WORKDIR/checkpoints/latest/<epoch>/` keeps the last few epochs for resuming;
`WORKDIR/checkpoints/best/<epoch>/` keeps the epoch with the lowest validation
loss, which early stopping restores. Each checkpoint contains the train state
(head parameters, Adam state, step) and a JSON 'progress' item with the
schedule, early-stopping state and metric history, so a resumed run continues
exactly where the last saved epoch ended.

Saves are asynchronous: Orbax writes into a temporary folder and renames it
when done, so a run killed mid-save leaves the previous checkpoint intact.
"""

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

LATEST = 'latest'
BEST = 'best'


def has_checkpoint(workdir: str | Path) -> bool:
  """Return whether `workdir` contains a finished 'latest' checkpoint to resume from."""
  folder = Path(workdir) / 'checkpoints' / LATEST
  return folder.is_dir() and any(entry.name.isdigit() for entry in folder.iterdir())


class RunCheckpoints:
  """The latest and best checkpoint managers of one workdir."""

  def __init__(self, workdir: str | Path, keep_latest: int = 2):
    root = Path(workdir).absolute() / 'checkpoints'
    self.managers = {
        LATEST: ocp.CheckpointManager(
            root / LATEST,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, create=True),
        ),
        BEST: ocp.CheckpointManager(
            root / BEST,
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        ),
    }

  def latest_epoch(self, kind: str = LATEST) -> int | None:
    return self.managers[kind].latest_step()

  def epochs(self, kind: str = LATEST) -> list[int]:
    return list(self.managers[kind].all_steps())

  def save(self, kind: str, epoch: int, state, progress: dict) -> None:
    self.managers[kind].save(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave(progress),
        ),
    )

  def restore(self, kind: str, state_target, epoch: int | None = None):
    """Return (state, progress) of `epoch`, or of the newest if None.

    Args:
      kind: LATEST or BEST.
      state_target: a pytree of the state's structure (arrays or
        jax.ShapeDtypeStruct) so that optax states come back as their types.
      epoch: which saved epoch; None for the newest.

    Raises:
      FileNotFoundError: if there is no such checkpoint.
    """
    manager = self.managers[kind]
    epoch = manager.latest_step() if epoch is None else epoch
    if epoch is None or epoch not in manager.all_steps():
      raise FileNotFoundError(
          f'No {kind} checkpoint for epoch {epoch} in {manager.directory}; '
          f'saved epochs: {list(manager.all_steps())}.'
      )
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_target)
    restored = manager.restore(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            progress=ocp.args.JsonRestore(),
        ),
    )
    logger.info(
        'Restored the %s checkpoint saved after epoch %d (index %d in metrics.jsonl) from %s',
        kind, epoch + 1, epoch, manager.directory,
    )
    return restored['state'], restored['progress']

  def wait(self) -> None:
    for manager in self.managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    for manager in self.managers.values():
      manager.close()
