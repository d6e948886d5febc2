"""Full-network training: the backbone runs on every step, its top may train.

`mode='full_network'` in the config. Slower than cached features by the cost
of a backbone forward (and, for unfrozen blocks, backward) pass per image and
epoch, so meant for GPU/TPU. With `unfreeze_top_blocks = k > 0` the last k
block8 modules and conv_7b are fine-tuned at `backbone_lr_multiplier` times
the head's learning rate. BatchNorm layers keep their pretrained statistics
(inference mode), as Keras does for layers loaded from a frozen model.

Augmentation is drawn anew for every epoch from (seed, epoch), as the
reference notebook's augmentation layers do.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from flax_pet import data
from flax_pet import losses
from flax_pet import models
from flax_pet import preprocessing
from flax_pet import training

logger = logging.getLogger(__name__)


def top_block_names(count: int) -> tuple[str, ...]:
  """Return the backbone modules fine-tuned for `unfreeze_top_blocks=count`."""
  if not 0 <= count <= 10:
    raise ValueError(f'unfreeze_top_blocks must be in 0..10 (block8 modules), got {count}.')
  if count == 0:
    return ()
  return tuple(f'block8_{i}' for i in range(11 - count, 11)) + ('conv_7b',)


def create_optimizer(backbone_lr_multiplier: float) -> optax.GradientTransformation:
  """Adam for params {'head', 'backbone'}; the backbone's rate is scaled.

  The learning rate is an injected hyperparameter, set before each epoch.
  """

  def adam_pair(learning_rate):
    return optax.multi_transform(
        {
            'head': optax.adam(learning_rate, eps=1e-7),
            'backbone': optax.adam(learning_rate * backbone_lr_multiplier, eps=1e-7),
        },
        lambda params: {
            'head': jax.tree_util.tree_map(lambda _: 'head', params['head']),
            'backbone': jax.tree_util.tree_map(lambda _: 'backbone', params['backbone']),
        },
    )

  return optax.inject_hyperparams(adam_pair)(learning_rate=0.0)


class FullNetworkTrainer:
  """Trains head (and optionally the backbone's top) on images, step by step."""

  def __init__(self, config, dataset, backbone, settings: training.LossSettings, mesh):
    self.config = config
    self.dataset = dataset
    self.mesh = mesh
    self.settings = settings
    self.convention = backbone.input_convention
    self.trainable_blocks = top_block_names(config.unfreeze_top_blocks)

    params = backbone.variables['params']
    self.frozen_params = {k: v for k, v in params.items() if k not in self.trainable_blocks}
    self.batch_stats = backbone.variables['batch_stats']
    self.initial_backbone = {k: params[k] for k in self.trainable_blocks}
    self.backbone = models.InceptionResNetV2(dtype=jnp.dtype(config.compute_dtype))
    self.head = models.ClassifierHead(
        len(dataset.class_names), config.hidden_units, config.dropout_rate
    )
    self.tx = create_optimizer(config.backbone_lr_multiplier)
    self._train_step = jax.jit(self._step)
    self._forward = jax.jit(
        lambda params, pixels, labels, mask: self._logits_and_loss(
            params, pixels, labels, mask, None, False
        )
    )
    logger.info(
        'Full-network training; fine-tuned backbone modules: %s.',
        ', '.join(self.trainable_blocks) or 'none',
    )

  def init_state(self, rng) -> training.TrainState:
    head_params = self.head.init(rng, jnp.zeros((1, models.FEATURE_CHANNELS)))['params']
    params = {'head': head_params, 'backbone': self.initial_backbone}
    return training.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params)
    )

  def _logits_and_loss(self, params, pixels, labels, mask, rng, train: bool):
    images = preprocessing.preprocess(pixels, self.convention)
    variables = {
        'params': {**self.frozen_params, **params['backbone']},
        'batch_stats': self.batch_stats,
    }
    feature_map = self.backbone.apply(variables, images, train=False)
    logits = self.head.apply(
        {'params': params['head']}, feature_map, train=train,
        rngs={'dropout': rng} if train else None,
    )
    loss = losses.weighted_focal_loss(
        logits, labels, alpha=self.settings.alpha, gamma=self.settings.gamma,
        class_weights=self.settings.class_weights if train else None,
        mask=mask, clip_epsilon=self.settings.clip_epsilon,
    )
    loss = loss + losses.l2_penalty(params['head']['hidden']['kernel'], self.settings.l2)
    return loss, logits

  def _step(self, state, pixels, labels, mask, rng):
    (loss, logits), grads = jax.value_and_grad(self._logits_and_loss, has_aux=True)(
        state.params, pixels, labels, mask, rng, True
    )
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
    new_state = training.TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {'loss': loss, 'correct': correct, 'count': jnp.sum(mask)}

  def _shard(self, array):
    sharding = NamedSharding(self.mesh, P('data'))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  def train_epoch(self, state, epoch: int):
    config = self.config
    pixels = self.dataset.splits['train'].images
    if config.augment:
      pixels = np.asarray(data.augment(
          pixels, seed=config.seed * 100_003 + epoch, rotation=config.rotation,
          zoom=config.zoom, contrast=config.contrast, translation=config.translation,
      ))
    labels = np.asarray(self.dataset.splits['train'].labels, np.int32)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(labels))
    epoch_rng = jax.random.fold_in(jax.random.key(config.seed), epoch)

    step_metrics = {'loss': [], 'correct': [], 'count': []}
    first_step = int(state.step)
    batch_size = config.batch_size
    for step, first in enumerate(tqdm(range(0, len(order), batch_size), desc=f'epoch {epoch + 1}', leave=False)):
      index = order[first:first + batch_size]
      real = len(index)
      index = np.concatenate([index, np.zeros(batch_size - real, index.dtype)])
      mask = (np.arange(batch_size) < real).astype(np.float32)
      state, metrics = self._train_step(
          state, self._shard(pixels[index]), self._shard(labels[index]),
          self._shard(mask), jax.random.fold_in(epoch_rng, step),
      )
      for key, value in jax.device_get(metrics).items():
        step_metrics[key].append(value)

    training.check_finite(step_metrics, epoch, first_step)
    return state, training.epoch_summary(step_metrics)

  def evaluate(self, params, split: str):
    pixels = self.dataset.splits[split].images
    labels = np.asarray(self.dataset.splits[split].labels, np.int32)
    batch_size = self.config.batch_size
    total, probabilities = 0.0, []
    for first in range(0, len(labels), batch_size):
      batch, batch_labels = pixels[first:first + batch_size], labels[first:first + batch_size]
      real = len(batch_labels)
      pad = batch_size - real
      batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
      batch_labels = np.concatenate([batch_labels, np.zeros(pad, np.int32)])
      mask = (np.arange(batch_size) < real).astype(np.float32)
      loss, logits = self._forward(params, batch, batch_labels, mask)
      # The L2 term is added once per batch; keep it once overall.
      total += (float(loss) - float(losses.l2_penalty(params['head']['hidden']['kernel'], self.settings.l2))) * real
      probabilities.append(np.asarray(jax.nn.softmax(logits))[:real])
    loss = total / len(labels) + float(losses.l2_penalty(params['head']['hidden']['kernel'], self.settings.l2))
    return loss, np.concatenate(probabilities)
