"""One training run from a config: data, features, epochs, checkpoints, workdir.

`train_and_evaluate(config, workdir)` is what `train.py` calls. It leaves in
the workdir:

    config.json        the resolved config, class names and weights provenance
    manifest.csv       every source image with its split, status and sha256
    metrics.jsonl      one JSON line per epoch (loss, accuracy, lr, seconds)
    summary.json       best epoch and test metrics with 95% CIs
    checkpoints/       Orbax: latest/ and best/ head checkpoints
    backbone/          Orbax: the frozen backbone variables used for training
    features/          cached backbone features (safe to delete)
    tensorboard/       TensorBoard event files

Running the same command again resumes from `checkpoints/latest`.
"""

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from flax_pet import checkpoints
from flax_pet import data
from flax_pet import demo
from flax_pet import features as features_lib
from flax_pet import losses
from flax_pet import metrics as metrics_lib
from flax_pet import models
from flax_pet import preprocessing
from flax_pet import pretrained
from flax_pet import schedules
from flax_pet import training

logger = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
MANIFEST_FILE = 'manifest.csv'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
BACKBONE_DIR = 'backbone'


@dataclasses.dataclass
class Backbone:
  variables: dict
  input_convention: str
  provenance: dict


def load_dataset(config, workdir: Path):
  """Load the class-folder dataset named by the config (or generate the demo)."""
  data_dir = config.data_dir
  if config.demo_images_per_class > 0:
    data_dir = demo.write_demo_folder(
        workdir / 'demo_data', config.demo_images_per_class, seed=config.seed
    )
    logger.warning(
        'DEMO: training on %d generated synthetic images per class in %s, not '
        'on PET data. The metrics only show that the pipeline runs.',
        config.demo_images_per_class, data_dir,
    )
  if not data_dir:
    raise ValueError(
        'No data: set --config.data_dir=PATH to a class-folder image dataset, '
        'or use configs/demo.py for generated images.'
    )

  return data.load_class_folder(
      data_dir,
      image_size=config.image_size,
      resize=config.resize,
      split_ratios=tuple(config.split_ratios),
      seed=config.split_seed,
      split_mode=config.split_mode,
      patient_ids=config.patient_ids or None,
      strict=config.strict_decoding,
      tfds_data_dir=workdir / 'tfds',
  )


def load_backbone_weights(config) -> Backbone:
  """Load pretrained backbone variables, or a seeded random backbone."""
  if config.weights:
    weights = pretrained.load_pretrained(config.weights)
    convention = config.input_convention or weights.input_convention
    if convention != weights.input_convention:
      logger.warning(
          'Input convention %r overrides the %r stored with the weights %s.',
          convention, weights.input_convention, config.weights,
      )
    return Backbone(weights.backbone, convention, dict(weights.provenance))

  logger.warning(
      '!!! No --config.weights given: the backbone is RANDOM (seed %d). The '
      'classifier trains, but its results say nothing about PET. Convert '
      'RadImageNet-IRV2_notop.h5 with convert/radimagenet_to_flax.py and pass '
      'it as --config.weights. !!!', config.seed,
  )
  variables = models.random_backbone_variables(config.seed)
  return Backbone(
      variables, config.input_convention or 'unit',
      {'source_file': None, 'random_seed': config.seed},
  )


def compute_features(config, workdir: Path, dataset, backbone: Backbone) -> dict:
  """Return {'train': [views, N, 1536], 'val': [N, 1536], 'test': ...}."""
  feature_fn = features_lib.make_pooled_feature_fn(
      backbone.input_convention, jnp.dtype(config.compute_dtype)
  )
  common = dict(
      weights=backbone.provenance.get('source_sha256') or backbone.provenance,
      convention=backbone.input_convention,
      dtype=config.compute_dtype,
  )

  def split_features(name, pixels, view=None):
    split = dataset.splits[name]
    augmentation = None
    if view is not None and config.augment:
      augmentation = dict(
          seed=[config.seed, view], rotation=config.rotation, zoom=config.zoom,
          contrast=config.contrast, translation=config.translation,
      )
    key = features_lib.cache_key(
        pixels=pixels, augmentation=augmentation, labels=np.asarray(split.labels), **common
    )

    def compute():
      images = pixels
      if augmentation is not None:
        images = np.asarray(data.augment(
            pixels, seed=config.seed * 1000 + view, rotation=config.rotation,
            zoom=config.zoom, contrast=config.contrast, translation=config.translation,
        ))
      label = name if view is None else f'{name} view {view + 1}'
      return features_lib.extract_features(
          feature_fn, backbone.variables, images, config.feature_batch_size,
          f'{label} features',
      )

    return features_lib.cached(workdir / 'features', key, compute)

  train_pixels = dataset.splits['train'].images
  views = config.augmented_views if config.augment else 1
  result = {'train': np.stack([split_features('train', train_pixels, v) for v in range(views)])}
  for name in dataset.splits:
    if name != 'train':
      result[name] = split_features(name, dataset.splits[name].images)
  return result


def _write_json(path: Path, value) -> None:
  path.write_text(json.dumps(value, indent=2, default=str) + '\n')


def _rewrite_metrics(workdir: Path, history: list[dict]) -> None:
  with open(workdir / METRICS_FILE, 'w') as f:
    for row in history:
      f.write(json.dumps(row) + '\n')


def _learning_rate(config, plateau: schedules.PlateauSchedule | None, epoch: int) -> float:
  if plateau is not None:
    return plateau.learning_rate(epoch)
  return schedules.table_learning_rate(epoch, [tuple(row) for row in config.lr_table])


def _save_backbone(workdir: Path, backbone: Backbone, resuming: bool) -> None:
  """Save the backbone once per run; a fresh run replaces a stale copy."""
  path = workdir.absolute() / BACKBONE_DIR
  if path.exists() and resuming:
    return
  if path.exists():
    shutil.rmtree(path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, backbone.variables)
  checkpointer.wait_until_finished()


class CachedFeatureTrainer:
  """Trains the head on cached features, one jitted `lax.scan` per epoch."""

  def __init__(self, config, workdir, dataset, backbone, settings, mesh):
    self.config = config
    self.dataset = dataset
    self.mesh = mesh
    self.features = compute_features(config, workdir, dataset, backbone)
    self.train_labels = np.asarray(dataset.splits['train'].labels, np.int32)
    self.head = models.ClassifierHead(
        len(dataset.class_names), config.hidden_units, config.dropout_rate
    )
    self.tx = training.create_optimizer()
    self._train_epoch = training.make_train_epoch(self.head, settings, self.tx)
    self._evaluate = training.make_evaluate(self.head, settings)

  def init_state(self, rng) -> training.TrainState:
    return training.create_train_state(self.head, rng, self.tx)

  def train_epoch(self, state, epoch: int):
    """Run one epoch on augmented view `epoch % views`; return (state, summary)."""
    config = self.config
    views = self.features['train']
    batch_features, batch_labels, batch_mask = training.epoch_batches(
        views[epoch % len(views)], self.train_labels, config.batch_size, config.seed, epoch
    )
    first_step = int(state.step)
    state, step_metrics = self._train_epoch(
        state,
        training.shard_batches(batch_features, self.mesh),
        training.shard_batches(batch_labels, self.mesh),
        training.shard_batches(batch_mask, self.mesh),
        jax.random.fold_in(jax.random.key(config.seed), epoch),
    )
    step_metrics = jax.device_get(step_metrics)
    training.check_finite(step_metrics, epoch, first_step)
    return state, training.epoch_summary(step_metrics)

  def evaluate(self, params, split: str):
    """Return (loss, probabilities [N, C]) on a split."""
    labels = jnp.asarray(self.dataset.splits[split].labels, jnp.int32)
    loss, probabilities = self._evaluate(params, jnp.asarray(self.features[split]), labels)
    return float(loss), np.asarray(probabilities)


# Config keys that may change when a run is resumed. Data and weights are
# compared by content (manifest and sha256), not by path.
_RESUMABLE_KEYS = frozenset({
    'num_epochs', 'log_every_epochs', 'feature_batch_size', 'data_dir',
    'data_root', 'weights', 'weights_provenance',
})


def validate_config(config) -> None:
  """Raise ValueError naming the first invalid config value, before any work."""
  checks = [
      (config.batch_size >= 1, 'batch_size', 'a positive number of images'),
      (config.num_epochs >= 1, 'num_epochs', 'at least 1'),
      (config.image_size >= models.MIN_INPUT_SIZE, 'image_size',
       f'at least {models.MIN_INPUT_SIZE} pixels'),
      (config.augmented_views >= 1, 'augmented_views', 'at least 1'),
      (config.early_stopping_patience >= 0, 'early_stopping_patience', '0 or more epochs'),
      (config.input_convention in ('',) + preprocessing.CONVENTIONS, 'input_convention',
       f"'' (use the weights') or one of {preprocessing.CONVENTIONS}"),
      (config.mode in ('cached_features', 'full_network'), 'mode',
       "'cached_features' or 'full_network'"),
      (config.lr_schedule in ('table', 'plateau'), 'lr_schedule', "'table' or 'plateau'"),
      (config.class_weights in ('balanced', 'none'), 'class_weights', "'balanced' or 'none'"),
  ]
  for valid, key, expected in checks:
    if not valid:
      raise ValueError(f'Invalid --config.{key}={config[key]!r}: it must be {expected}.')
  if config.weights and not Path(config.weights).exists():
    raise FileNotFoundError(
        f'--config.weights={config.weights}: no such file or folder. Pass a '
        'converted weights folder or a Keras .h5 file.'
    )


def _check_resumable(workdir: Path, resolved: dict, manifest) -> None:
  """Raise if the run saved in `workdir` differs from the one configured now.

  A resumed run must train the same head on the same data and features, or
  its checkpoints, metrics.jsonl and config.json would describe a mixture.
  """
  saved = json.loads((workdir / CONFIG_FILE).read_text())
  current = json.loads(json.dumps(resolved, default=str))
  differing = sorted(
      key for key in set(saved) | set(current)
      if key not in _RESUMABLE_KEYS and saved.get(key) != current.get(key)
  )

  saved_weights = saved.get('weights_provenance') or {}
  current_weights = current.get('weights_provenance') or {}
  for key in ('source_sha256', 'random_seed'):
    if saved_weights.get(key) != current_weights.get(key):
      differing.append(f'weights ({key})')

  if differing:
    changes = '; '.join(
        f'{key}: {saved.get(key)!r} -> {current.get(key)!r}' for key in differing[:5]
    )
    raise ValueError(
        f'{workdir} contains a run with another config ({changes}). Use a new '
        '--workdir, or rerun with the same config to resume it.'
    )

  saved_rows = {row.path: row for row in data.read_manifest(workdir / MANIFEST_FILE)}
  for row in manifest:
    old = saved_rows.pop(row.path, None)
    if old is None or (old.sha256, old.split, old.status) != (row.sha256, row.split, row.status):
      raise ValueError(
          f'{workdir} contains a run on other data: {row.path} is new or changed '
          '(content, split or status) since it started. Use a new --workdir.'
      )
  if saved_rows:
    raise ValueError(
        f'{workdir} contains a run on other data: {next(iter(saved_rows))} is no '
        'longer in the dataset. Use a new --workdir.'
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Train the classifier as configured and evaluate it on val and test.

  Args:
    config: see `configs/seed.py` for every key.
    workdir: output folder; an existing run in it is resumed.

  Returns:
    The summary written to `summary.json`.
  """
  validate_config(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  resuming = checkpoints.has_checkpoint(workdir)
  logger.info(
      'JAX %s on %d %s device(s) over %d process(es).',
      jax.__version__, jax.device_count(), jax.devices()[0].platform,
      jax.process_count(),
  )
  mesh = training.make_mesh(config.batch_size)

  # Data.
  dataset = load_dataset(config, workdir)
  class_names = list(dataset.class_names)
  alpha = training.check_alpha(config.focal_alpha, class_names)
  if 'val' not in dataset.splits:
    raise ValueError(
        'The dataset has no validation split, which early stopping needs; '
        'give split_ratios three entries such as (0.9, 0.05, 0.05).'
    )
  for name, split in dataset.splits.items():
    counts = np.bincount(split.labels, minlength=len(class_names))
    logger.info(
        '%s: %d images (%s)', name, len(split.labels),
        ', '.join(f'{c}: {n}' for c, n in zip(class_names, counts)),
    )
  train_labels = np.asarray(dataset.splits['train'].labels, np.int32)

  # Backbone and the resolved config.
  backbone = load_backbone_weights(config)
  resolved = config.to_dict()
  resolved.update(
      data_root=str(dataset.prepared.root),
      class_names=class_names,
      input_convention=backbone.input_convention,
      weights_provenance=backbone.provenance,
  )
  if resuming:
    _check_resumable(workdir, resolved, dataset.manifest)
  _write_json(workdir / CONFIG_FILE, resolved)
  data.write_manifest(dataset.manifest, workdir / MANIFEST_FILE)
  _save_backbone(workdir, backbone, resuming)

  # Loss.
  class_weights = None
  if config.class_weights == 'balanced':
    class_weights = tuple(
        float(w) for w in losses.balanced_class_weights(
            np.bincount(train_labels, minlength=len(class_names))
        )
    )
    logger.info('Balanced class weights: %s', dict(zip(class_names, class_weights)))
  elif config.class_weights != 'none':
    raise ValueError(f"class_weights must be 'balanced' or 'none', got {config.class_weights!r}.")
  settings = training.LossSettings(
      alpha=alpha,
      gamma=config.focal_gamma,
      class_weights=class_weights,
      clip_epsilon=config.focal_clip_epsilon or None,
      l2=config.l2,
  )

  if config.mode == 'cached_features':
    trainer = CachedFeatureTrainer(config, workdir, dataset, backbone, settings, mesh)
  elif config.mode == 'full_network':
    from flax_pet import finetune  # pylint: disable=import-outside-toplevel
    trainer = finetune.FullNetworkTrainer(config, dataset, backbone, settings, mesh)
  else:
    raise ValueError(f"mode must be 'cached_features' or 'full_network', got {config.mode!r}.")
  return fit(config, workdir, trainer, class_names, mesh)


def fit(config, workdir: Path, trainer, class_names, mesh) -> dict:
  """Run the epochs with schedule, early stopping, checkpoints and resume."""
  state = trainer.init_state(jax.random.key(config.seed))
  trained = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  logger.info('Trained parameters: %d.', trained)

  plateau = None
  if config.lr_schedule == 'plateau':
    plateau = schedules.PlateauSchedule(**config.plateau.to_dict())
  elif config.lr_schedule != 'table':
    raise ValueError(f"lr_schedule must be 'table' or 'plateau', got {config.lr_schedule!r}.")
  stopper = schedules.EarlyStopping(patience=config.early_stopping_patience)
  history: list[dict] = []
  run_checkpoints = checkpoints.RunCheckpoints(workdir)

  start_epoch = 0
  if run_checkpoints.latest_epoch() is not None:
    state, progress = run_checkpoints.restore(checkpoints.LATEST, state)
    stopper = schedules.EarlyStopping.from_dict(progress['early_stopping'])
    if plateau is not None:
      plateau = schedules.PlateauSchedule.from_dict(progress['plateau'])
    history = progress['history']
    start_epoch = progress['epoch'] + 1
    logger.info('Resuming after epoch %d from %s', progress['epoch'] + 1, workdir)
  _rewrite_metrics(workdir, history)

  state = training.replicate(state, mesh)
  writer = SummaryWriter(str(workdir / 'tensorboard'))
  n_train = len(trainer.dataset.splits['train'].labels)
  n_val = len(trainer.dataset.splits['val'].labels)

  epoch = start_epoch
  while epoch < config.num_epochs and not stopper.stopped:
    started = time.perf_counter()
    learning_rate = _learning_rate(config, plateau, epoch)
    state = training.set_learning_rate(state, learning_rate)
    state, train_summary = trainer.train_epoch(state, epoch)
    val_loss, val_probabilities = trainer.evaluate(state.params, 'val')
    val_labels = np.asarray(trainer.dataset.splits['val'].labels)
    val_accuracy = float(np.mean(np.argmax(val_probabilities, -1) == val_labels))

    decision = stopper.update(epoch, val_loss)
    if plateau is not None:
      plateau.update(epoch, val_loss)
    row = {
        'epoch': epoch,
        'learning_rate': learning_rate,
        'train_loss': train_summary['loss'],
        'train_accuracy': train_summary['accuracy'],
        'val_loss': val_loss,
        'val_accuracy': val_accuracy,
        'n_train': n_train,
        'n_val': n_val,
        'seconds': time.perf_counter() - started,
    }
    history.append(row)

    # Checkpoint before logging: a run killed in between redoes nothing and
    # rewrites metrics.jsonl from the checkpointed history on resume.
    # Orbax saves asynchronously, so the checkpoint gets its own copy of the
    # history: the list grows while the save may still be running.
    progress = {
        'epoch': epoch,
        'history': [dict(row) for row in history],
        'early_stopping': stopper.to_dict(),
        'plateau': plateau.to_dict() if plateau is not None else None,
    }
    if decision.improved:
      run_checkpoints.save(checkpoints.BEST, epoch, state, progress)
    run_checkpoints.save(checkpoints.LATEST, epoch, state, progress)

    with open(workdir / METRICS_FILE, 'a') as f:
      f.write(json.dumps(row) + '\n')
    for key, value in row.items():
      if key != 'epoch':
        writer.add_scalar(key, value, epoch)
    if epoch % config.log_every_epochs == 0 or decision.stop:
      logger.info(
          'epoch %d/%d  lr %.1e  loss %.4f  acc %.3f  val_loss %.4f  val_acc %.3f (n=%d)%s',
          epoch + 1, config.num_epochs, learning_rate, row['train_loss'],
          row['train_accuracy'], val_loss, val_accuracy, n_val,
          '  *best*' if decision.improved else '',
      )
    epoch += 1

  writer.close()
  run_checkpoints.wait()

  # Early stopping restores the best weights, whether it stopped or not.
  state, progress = run_checkpoints.restore(checkpoints.BEST, jax.device_get(state))
  run_checkpoints.close()
  summary = {
      'best_epoch': progress['epoch'],
      'epochs_run': len(history),
      'class_names': class_names,
  }
  for name, split in trainer.dataset.splits.items():
    if name == 'train':
      continue
    labels = np.asarray(split.labels)
    loss, probabilities = trainer.evaluate(state.params, name)
    correct = int(np.sum(np.argmax(probabilities, -1) == labels))
    summary[name] = {
        'n': int(len(labels)),
        'loss': loss,
        'accuracy': metrics_lib.proportion_ci(correct, len(labels)),
    }
  _write_json(workdir / SUMMARY_FILE, summary)

  if 'test' in summary:
    accuracy = summary['test']['accuracy']
    logger.info(
        'Best epoch %d. Test accuracy %.3f (95%% CI %.3f-%.3f, n=%d). Outputs in %s',
        summary['best_epoch'] + 1, accuracy['value'], accuracy['ci_low'],
        accuracy['ci_high'], accuracy['n'], workdir,
    )
  return summary
