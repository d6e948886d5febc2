"""The reference Keras notebook's recipe, trained on the split of a flax-pet run.

This is the baseline that flax-pet's `train.py` is compared against. It builds
the notebook's model in Keras 3 (TensorFlow backend) and trains it with
`model.fit`, reading every setting and the split from a finished flax-pet run:

    Input -> RandomRotation -> RandomZoom -> RandomContrast -> RandomTranslation
          -> input scaling (the run's input convention)
          -> frozen InceptionResNetV2(include_top=False) with the given weights
          -> GlobalAveragePooling2D -> Dense(hidden, ReLU, L2) -> Dropout
          -> Dense(classes, softmax)

The loss is the categorical focal loss with per-class alpha and gamma, on
probabilities clipped to [eps, 1 - eps], with balanced `class_weight` as
scikit-learn computes it. Training uses Adam with Keras' defaults, a
`LearningRateScheduler` with the run's epoch table and
`EarlyStopping(monitor='val_loss', restore_best_weights=True)`.

Images come from the run's manifest.csv (same files, same split) and are
decoded by flax-pet's decoder, then rounded exactly as flax-pet's TFDS storage
rounds them, so both recipes see bit-identical pixels.

Usage:
  python benchmarks/keras_recipe.py --workdir RUN --weights-h5 W.h5 --output DIR

It writes DIR/result.json (times, history, test metrics, per-image
predictions) and DIR/test_features.npz (pooled backbone features of the
unaugmented test images, to check that both backbones agree).
"""

import time

# Taken before the heavy imports, so that the total wall time includes them.
PROCESS_START = time.perf_counter()

# pylint: disable=wrong-import-position
import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

import keras
import numpy as np
import sklearn
import tensorflow as tf
from keras import ops
from sklearn.metrics import f1_score
from sklearn.utils.class_weight import compute_class_weight

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from flax_pet import metrics as metrics_lib  # noqa: E402
from flax_pet.data import decode_image, read_manifest  # noqa: E402
from flax_pet.data.builder import STORAGE_SCALE  # noqa: E402

logger = logging.getLogger('keras_recipe')

RESULT_FILE = 'result.json'
FEATURES_FILE = 'test_features.npz'

# ImageNet channel means in BGR order (Keras' caffe-mode preprocess_input).
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

# Run settings this script reproduces; any other value raises, because the
# Keras recipe would then train something else than the flax-pet run did.
_REQUIRED_SETTINGS = {
    'optimizer': 'adam',
    'lr_schedule': 'table',
    'unfreeze_top_blocks': 0,
    'compute_dtype': 'float32',
}


def load_run_config(workdir: str | os.PathLike) -> dict:
  """Read the resolved config of a flax-pet run and check that Keras can reproduce it.

  Args:
    workdir: a flax-pet workdir with config.json and manifest.csv.

  Returns:
    The resolved config as a dict.

  Raises:
    FileNotFoundError: if config.json or manifest.csv is missing.
    ValueError: if the run used a setting this recipe does not reproduce.
  """
  workdir = Path(workdir)
  for name in ('config.json', 'manifest.csv'):
    if not (workdir / name).is_file():
      raise FileNotFoundError(
          f'{workdir / name} not found: pass the workdir of a flax-pet '
          'train.py run, which writes config.json and manifest.csv.'
      )
  config = json.loads((workdir / 'config.json').read_text())
  for key, expected in _REQUIRED_SETTINGS.items():
    if config.get(key) != expected:
      raise ValueError(
          f'{workdir / "config.json"}: {key} is {config.get(key)!r}, but the '
          f'Keras recipe only reproduces {key}={expected!r}. Train the '
          'flax-pet run with that setting.'
      )
  if not config.get('focal_clip_epsilon'):
    raise ValueError(
        f'{workdir / "config.json"}: focal_clip_epsilon is '
        f'{config.get("focal_clip_epsilon")!r}, but the notebook recipe always '
        'clips probabilities; train the flax-pet run with a clip such as 1e-7.'
    )
  if not isinstance(config.get('image_size'), int):
    raise ValueError(
        f'{workdir / "config.json"}: image_size is {config.get("image_size")!r}; '
        'the Keras recipe builds square inputs and needs one int.'
    )
  return config


def resolve_data_dir(config: dict, data_dir: str | os.PathLike | None) -> Path:
  """Return the data root: `data_dir` if given, else the run's config.data_dir.

  A relative config.data_dir is taken relative to the current folder first
  and then to the repository root, where train.py is usually started.

  Raises:
    FileNotFoundError: if the folder does not exist.
  """
  if data_dir is not None:
    candidates = [Path(data_dir)]
  else:
    candidates = [Path(config['data_dir']), REPO_ROOT / config['data_dir']]
  for candidate in candidates:
    if candidate.is_dir():
      return candidate.resolve()
  raise FileNotFoundError(
      f'data folder {candidates[0]} not found; pass --data-dir with the class '
      'folders the flax-pet run was trained on.'
  )


def load_split_images(
    manifest_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    image_size: int,
    resize: str,
) -> dict[str, dict]:
  """Decode the images of every split named in a flax-pet manifest.

  Each image is decoded with `flax_pet.data.decode_image` and rounded to the
  uint16 grid that flax-pet's TFDS storage keeps (value * 65535 / 255), so
  the pixels equal the ones flax-pet trained on, not just come close.

  Args:
    manifest_path: manifest.csv of a flax-pet run.
    data_dir: the data root the manifest's paths are relative to.
    image_size: model input size in pixels.
    resize: 'stretch' or 'pad'.

  Returns:
    {split: {'images': float32 [N, H, W, 3] in 0..255, 'labels': int [N],
    'paths': [str]}}, each split sorted by path as flax-pet sorts it.

  Raises:
    ValueError: if the manifest lists no usable image.
  """
  rows = [row for row in read_manifest(manifest_path) if row.ok and row.split]
  if not rows:
    raise ValueError(f'manifest {manifest_path} lists no image with status ok and a split.')

  splits = {}
  for name in sorted({row.split for row in rows}):
    split_rows = sorted((row for row in rows if row.split == name), key=lambda row: row.path)
    images = np.stack([
        decode_image(Path(data_dir) / row.path, image_size, resize) for row in split_rows
    ])
    stored = np.round(images * STORAGE_SCALE).astype(np.uint16)
    splits[name] = {
        'images': stored.astype(np.float32) / np.float32(STORAGE_SCALE),
        'labels': np.asarray([row.label for row in split_rows], np.int64),
        'paths': [row.path for row in split_rows],
    }
  return splits


def input_scaling_layer(convention: str) -> keras.layers.Layer:
  """Return a Keras layer that maps 0..255 RGB pixels as the named convention does.

  Raises:
    ValueError: for an unknown convention.
  """
  if convention == 'unit':
    return keras.layers.Rescaling(1.0 / 255.0, name='unit_scaling')
  if convention == 'inception':
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name='inception_scaling')
  if convention == 'radimagenet':
    mean = np.asarray(CAFFE_BGR_MEAN, np.float32)
    return keras.layers.Lambda(
        lambda x: (ops.flip(x, axis=-1) - mean) / 255.0, name='radimagenet_scaling'
    )
  raise ValueError(
      f'input convention {convention!r} is unknown; expected unit, inception or radimagenet.'
  )


def categorical_focal_loss(alpha, gamma: float, clip_epsilon: float):
  """Return the notebook's weighted categorical focal loss for one-hot labels.

  loss_i = sum_c alpha_c y_ic (1 - p_ic)^gamma (-log p_ic), with p clipped to
  [clip_epsilon, 1 - clip_epsilon]. The function returns one value per
  sample, so that Keras multiplies each sample by its class weight and
  divides the sum by the batch size.

  NOTE: a widespread variant returns the batch mean instead; Keras then
  computes mean(loss) * mean(weight) and class weights no longer weight
  individual samples. This follows flax-pet's per-sample form.
  """
  alpha = np.asarray(alpha, np.float32)

  def focal_loss(y_true, y_pred):
    y_pred = ops.clip(y_pred, clip_epsilon, 1.0 - clip_epsilon)
    cross_entropy = -y_true * ops.log(y_pred)
    return ops.sum(alpha * ops.power(1.0 - y_pred, gamma) * cross_entropy, axis=-1)

  return focal_loss


def table_learning_rate(table, epoch: int) -> float:
  """Look up a 0-based epoch in rows (first epoch, rate) sorted by first epoch."""
  rate = table[0][1]
  for first_epoch, row_rate in table:
    if epoch >= first_epoch:
      rate = row_rate
  return float(rate)


def build_model(config: dict, num_classes: int, weights_h5: str | os.PathLike):
  """Build the notebook's model with the run's settings.

  Args:
    config: resolved flax-pet config (see `load_run_config`).
    num_classes: number of output classes.
    weights_h5: Keras InceptionResNetV2 weights (legacy HDF5, no top).

  Returns:
    (model, feature_model): the trainable classifier, and a model of the
    same frozen backbone that maps 0..255 pixels to pooled features.
  """
  size = int(config['image_size'])
  inputs = keras.Input((size, size, 3), name='pixels')
  x = inputs
  if config['augment']:
    # These layers are active only in training (fit), not in evaluate/predict.
    x = keras.layers.RandomRotation(config['rotation'])(x)
    x = keras.layers.RandomZoom(config['zoom'])(x)
    x = keras.layers.RandomContrast(config['contrast'])(x)
    x = keras.layers.RandomTranslation(config['translation'], config['translation'])(x)
  scaling = input_scaling_layer(config['input_convention'])
  x = scaling(x)

  backbone = keras.applications.InceptionResNetV2(
      include_top=False, weights=str(weights_h5), input_shape=(size, size, 3)
  )
  # Keras 3 runs the BatchNormalization layers of a frozen model in inference
  # mode; training=False states the same explicitly.
  backbone.trainable = False
  x = backbone(x, training=False)
  pooled = keras.layers.GlobalAveragePooling2D()(x)

  x = keras.layers.Dense(
      config['hidden_units'], activation='relu',
      kernel_regularizer=keras.regularizers.l2(config['l2']),
  )(pooled)
  x = keras.layers.Dropout(config['dropout_rate'])(x)
  outputs = keras.layers.Dense(num_classes, activation='softmax')(x)
  model = keras.Model(inputs, outputs, name='keras_recipe')

  feature_input = keras.Input((size, size, 3))
  features = keras.layers.GlobalAveragePooling2D()(backbone(scaling(feature_input), training=False))
  feature_model = keras.Model(feature_input, features, name='backbone_features')
  return model, feature_model


class EpochTimer(keras.callbacks.Callback):
  """Record the wall time of every epoch, validation included, in seconds."""

  def __init__(self):
    super().__init__()
    self.seconds = []
    self._start = None

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)


def _one_hot(labels, num_classes: int) -> np.ndarray:
  return keras.utils.to_categorical(labels, num_classes)


def _split_metrics(model, split: dict, num_classes: int, batch_size: int) -> dict:
  """Evaluate one split: loss as Keras reports it, accuracy with its CI, F1, predictions."""
  labels = split['labels']
  loss = model.evaluate(
      split['images'], _one_hot(labels, num_classes), batch_size=batch_size, verbose=0,
      return_dict=True,
  )['loss']
  probabilities = model.predict(split['images'], batch_size=batch_size, verbose=0)
  predicted = np.argmax(probabilities, axis=-1)
  correct = int(np.sum(predicted == labels))
  predictions = [
      {
          'path': path,
          'label': int(label),
          'predicted': int(prediction),
          'probabilities': row.tolist(),
      }
      for path, label, prediction, row in zip(split['paths'], labels, predicted, probabilities)
  ]
  return {
      'n': int(len(labels)),
      'loss': float(loss),
      'accuracy': metrics_lib.proportion_ci(correct, len(labels)),
      'weighted_f1': float(f1_score(labels, predicted, average='weighted', zero_division=0)),
      'macro_f1': float(f1_score(labels, predicted, average='macro', zero_division=0)),
      'predictions': predictions,
  }


def _class_weight(config: dict, labels: np.ndarray, num_classes: int) -> dict | None:
  """Return Keras' class_weight dict ('balanced' as scikit-learn computes it) or None."""
  if config['class_weights'] == 'none':
    return None
  if config['class_weights'] != 'balanced':
    raise ValueError(
        f"class_weights must be 'balanced' or 'none', got {config['class_weights']!r}."
    )
  weights = compute_class_weight('balanced', classes=np.arange(num_classes), y=labels)
  return {index: float(weight) for index, weight in enumerate(weights)}


def _fit(model, config: dict, splits: dict, num_classes: int, class_weight):
  """Train with the notebook's callbacks; return (history, early stopping, epoch times)."""
  lr_table = [tuple(row) for row in config['lr_table']]
  early_stopping = keras.callbacks.EarlyStopping(
      monitor='val_loss', patience=config['early_stopping_patience'], restore_best_weights=True
  )
  timer = EpochTimer()
  history = model.fit(
      splits['train']['images'],
      _one_hot(splits['train']['labels'], num_classes),
      batch_size=config['batch_size'],
      epochs=config['num_epochs'],
      validation_data=(splits['val']['images'], _one_hot(splits['val']['labels'], num_classes)),
      class_weight=class_weight,
      shuffle=True,
      callbacks=[
          keras.callbacks.LearningRateScheduler(
              lambda epoch: table_learning_rate(lr_table, epoch)
          ),
          early_stopping,
          timer,
      ],
      verbose=2,
  )
  return history, early_stopping, timer.seconds


def run_recipe(
    workdir: str | os.PathLike,
    weights_h5: str | os.PathLike,
    output: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
) -> dict:
  """Train and evaluate the Keras recipe on the split of a flax-pet run.

  Args:
    workdir: the flax-pet workdir (config.json, manifest.csv).
    weights_h5: the Keras backbone weights the flax-pet run started from.
    output: folder for result.json and test_features.npz.
    data_dir: data root; None uses the run's config.data_dir.

  Returns:
    The result written to OUTPUT/result.json.

  Raises:
    FileNotFoundError: if the workdir, data or weights are missing.
    ValueError: if the run used settings this recipe does not reproduce, or
      the focal alpha does not have one entry per class.
  """
  workdir, output = Path(workdir), Path(output)
  if not Path(weights_h5).is_file():
    raise FileNotFoundError(
        f'weights file {weights_h5} not found; pass the .h5 file the flax-pet run started from.'
    )
  config = load_run_config(workdir)
  class_names = list(config['class_names'])
  num_classes = len(class_names)
  alpha = config['focal_alpha'] or [1.0] * num_classes
  if len(alpha) != num_classes:
    raise ValueError(
        f'focal_alpha {alpha} of {workdir / "config.json"} does not have one '
        f'entry per class {class_names}.'
    )
  output.mkdir(parents=True, exist_ok=True)
  keras.utils.set_random_seed(int(config['seed']))
  times = {}

  # Data: the run's manifest, decoded by flax-pet's decoder.
  started = time.perf_counter()
  root = resolve_data_dir(config, data_dir)
  manifest = workdir / 'manifest.csv'
  splits = load_split_images(manifest, root, config['image_size'], config['resize'])
  for name in ('train', 'val', 'test'):
    if name not in splits:
      raise ValueError(
          f'manifest {manifest} has no {name!r} split; the recipe needs train, val and test.'
      )
  times['decode_s'] = time.perf_counter() - started
  counts = ', '.join(f'{len(split["labels"])} {name}' for name, split in splits.items())
  logger.info('Decoded %s images from %s in %.1f s.', counts, root, times['decode_s'])

  # Model and loss.
  started = time.perf_counter()
  model, feature_model = build_model(config, num_classes, weights_h5)
  class_weight = _class_weight(config, splits['train']['labels'], num_classes)
  model.compile(
      optimizer=keras.optimizers.Adam(
          learning_rate=table_learning_rate(config['lr_table'], 0)
      ),
      loss=categorical_focal_loss(alpha, config['focal_gamma'], config['focal_clip_epsilon']),
      metrics=['accuracy'],
  )
  times['build_s'] = time.perf_counter() - started

  # Training.
  started = time.perf_counter()
  history, early_stopping, epoch_seconds = _fit(model, config, splits, num_classes, class_weight)
  times['fit_s'] = time.perf_counter() - started
  epochs_run = len(history.history['loss'])

  # Evaluation with the restored best weights.
  started = time.perf_counter()
  evaluation = {
      name: _split_metrics(model, splits[name], num_classes, config['batch_size'])
      for name in ('val', 'test')
  }
  test_features = feature_model.predict(
      splits['test']['images'], batch_size=config['batch_size'], verbose=0
  )
  np.savez(
      output / FEATURES_FILE,
      features=test_features,
      paths=np.asarray(splits['test']['paths']),
      labels=splits['test']['labels'],
  )
  times['evaluate_s'] = time.perf_counter() - started
  times['epoch_s'] = epoch_seconds
  times['epoch_mean_s'] = float(np.mean(epoch_seconds))
  times['total_s'] = time.perf_counter() - PROCESS_START

  result = {
      'recipe': 'keras',
      'workdir': str(workdir.resolve()),
      'data_dir': str(root),
      'weights_h5': str(Path(weights_h5).resolve()),
      'class_names': class_names,
      'class_weight': class_weight,
      'focal_alpha': list(alpha),
      'n': {name: int(len(split['labels'])) for name, split in splits.items()},
      'epochs_run': epochs_run,
      # 0-based, as flax-pet's summary.json counts epochs.
      'best_epoch': int(early_stopping.best_epoch),
      'history': [
          {'epoch': epoch} | {key: float(values[epoch]) for key, values in history.history.items()}
          for epoch in range(epochs_run)
      ],
      'val': evaluation['val'],
      'test': evaluation['test'],
      'times': times,
      'versions': {
          'python': platform.python_version(),
          'keras': keras.__version__,
          'tensorflow': tf.__version__,
          'scikit-learn': sklearn.__version__,
          'keras_backend': keras.backend.backend(),
          'jit_compile': bool(model.jit_compile),
      },
  }
  (output / RESULT_FILE).write_text(json.dumps(result, indent=2) + '\n')
  _log_result(result, output)
  return result


def _log_result(result: dict, output: Path) -> None:
  accuracy = result['test']['accuracy']
  times = result['times']
  logger.info(
      'Epochs run %d, best epoch %d (1-based). Test accuracy %.3f (95%% CI %.3f-%.3f, n=%d), '
      'weighted F1 %.3f.',
      result['epochs_run'], result['best_epoch'] + 1, accuracy['value'], accuracy['ci_low'],
      accuracy['ci_high'], accuracy['n'], result['test']['weighted_f1'],
  )
  logger.info(
      'Wall time %.1f s in total: decode %.1f s, build %.1f s, fit %.1f s (%.1f s per epoch), '
      'evaluate %.1f s.',
      times['total_s'], times['decode_s'], times['build_s'], times['fit_s'],
      times['epoch_mean_s'], times['evaluate_s'],
  )
  logger.info('Wrote %s.', output / RESULT_FILE)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  parser.add_argument(
      '--workdir', required=True, help='Workdir of a finished flax-pet train.py run.'
  )
  parser.add_argument(
      '--weights-h5', required=True,
      help='Keras InceptionResNetV2 weights (.h5, no top) that the run started from.',
  )
  parser.add_argument(
      '--output', required=True, help='Folder for result.json and test_features.npz.'
  )
  parser.add_argument(
      '--data-dir', default=None, help="Data root; default: the run's config.data_dir."
  )
  return parser.parse_args(argv)


def main(argv=None) -> int:
  # force=True: importing TensorFlow and JAX may already have configured logging.
  logging.basicConfig(
      level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s', force=True
  )
  args = parse_args(argv)
  try:
    run_recipe(args.workdir, args.weights_h5, args.output, args.data_dir)
  except (FileNotFoundError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
