"""A trained classifier restored from its workdir, and its predictions.

`load_trained(workdir, checkpoint)` rebuilds everything `train.py` left: the
resolved config, class names, input convention, the backbone variables (with
fine-tuned blocks merged in) and the head parameters of the chosen checkpoint.
`predict_probabilities` then runs preprocessing, backbone and head on 0..255
RGB pixels in fixed-size batches.
"""

import csv
import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from flax_pet import checkpoints
from flax_pet import data
from flax_pet import experiment
from flax_pet import explain
from flax_pet import features
from flax_pet import finetune
from flax_pet import metrics
from flax_pet import models
from flax_pet import preprocessing
from flax_pet import report
from flax_pet import training

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainedClassifier:
  """Everything needed to run a trained classifier.

  Attributes:
    workdir: the training run's folder.
    config: the resolved config (config.json) as a dict.
    class_names: label i is class_names[i].
    input_convention: pixel mapping applied before the backbone.
    backbone: {'params', 'batch_stats'} of the backbone, fine-tuned blocks
      included.
    head: {'params'} of the classifier head.
    checkpoint: which checkpoint, e.g. 'best (epoch 12)'.
  """

  workdir: Path
  config: dict
  class_names: list[str]
  input_convention: str
  backbone: dict
  head: dict
  checkpoint: str

  @property
  def image_size(self) -> int:
    return int(self.config['image_size'])

  @property
  def resize(self) -> str:
    return self.config['resize']

  @property
  def head_module(self) -> models.ClassifierHead:
    return models.ClassifierHead(
        len(self.class_names), self.config['hidden_units'], self.config['dropout_rate']
    )


def _state_template(config: dict, num_classes: int, backbone_params: dict) -> training.TrainState:
  head = models.ClassifierHead(num_classes, config['hidden_units'], config['dropout_rate'])
  head_params = head.init(jax.random.key(0), jnp.zeros((1, models.FEATURE_CHANNELS)))['params']
  if config['mode'] == 'full_network':
    blocks = finetune.top_block_names(config['unfreeze_top_blocks'])
    params = {'head': head_params, 'backbone': {k: backbone_params[k] for k in blocks}}
    tx = finetune.create_optimizer(config['backbone_lr_multiplier'])
  else:
    params = head_params
    tx = training.create_optimizer()
  return training.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def load_trained(workdir: str | Path, checkpoint: str = 'best') -> TrainedClassifier:
  """Restore a trained classifier from a `train.py` workdir.

  Args:
    workdir: the folder passed to `train.py --workdir`.
    checkpoint: 'best' (lowest validation loss, what early stopping keeps),
      'latest', or a saved epoch number (0-based, as in metrics.jsonl).

  Returns:
    The classifier.

  Raises:
    FileNotFoundError: if the workdir lacks config.json, the backbone or the
      requested checkpoint.
  """
  workdir = Path(workdir).absolute()
  config_path = workdir / experiment.CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(
        f'{config_path} not found: {workdir} is not a finished or running '
        'train.py workdir.'
    )
  config = json.loads(config_path.read_text())
  class_names = list(config['class_names'])

  backbone_target = jax.eval_shape(
      models.InceptionResNetV2().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3))
  )
  backbone = ocp.StandardCheckpointer().restore(workdir / experiment.BACKBONE_DIR, backbone_target)

  if checkpoint in (checkpoints.BEST, checkpoints.LATEST):
    kind, epoch = checkpoint, None
  else:
    try:
      kind, epoch = checkpoints.LATEST, int(checkpoint)
    except ValueError:
      raise ValueError(
          f"--checkpoint must be 'best', 'latest' or an epoch number, got {checkpoint!r}."
      ) from None
    if epoch in checkpoints.RunCheckpoints(workdir).epochs(checkpoints.BEST):
      kind = checkpoints.BEST

  run_checkpoints = checkpoints.RunCheckpoints(workdir)
  template = _state_template(config, len(class_names), backbone['params'])
  state, progress = run_checkpoints.restore(kind, template, epoch)
  run_checkpoints.close()

  if config['mode'] == 'full_network':
    params = dict(backbone['params'])
    params.update(state.params['backbone'])
    backbone = {'params': params, 'batch_stats': backbone['batch_stats']}
    head_params = state.params['head']
  else:
    head_params = state.params

  description = f'{kind} (epoch {progress["epoch"]})'
  logger.info('Loaded the %s checkpoint of %s', description, workdir)
  return TrainedClassifier(
      workdir=workdir,
      config=config,
      class_names=class_names,
      input_convention=config['input_convention'],
      backbone=backbone,
      head={'params': head_params},
      checkpoint=description,
  )


def make_predict_fn(trained: TrainedClassifier):
  """Return a jitted fn(pixels [N, H, W, 3] in 0..255) -> probabilities [N, C]."""
  backbone = models.InceptionResNetV2(dtype=jnp.dtype(trained.config['compute_dtype']))
  head = trained.head_module

  def predict(backbone_variables, head_variables, pixels):
    images = preprocessing.preprocess(pixels, trained.input_convention)
    logits = head.apply(head_variables, backbone.apply(backbone_variables, images))
    return jax.nn.softmax(logits)

  predict = jax.jit(predict, compiler_options=features.backbone_compiler_options())
  return lambda pixels: predict(trained.backbone, trained.head, pixels)


def predict_probabilities(
    trained: TrainedClassifier, pixels: np.ndarray, batch_size: int = 16, description: str = 'predict'
) -> np.ndarray:
  """Return class probabilities [N, C] for RGB pixels in 0..255, with progress."""
  predict = make_predict_fn(trained)
  outputs = []
  for first in tqdm(range(0, len(pixels), batch_size), desc=description, unit='batch', leave=False):
    batch = pixels[first:first + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)])
    outputs.append(np.asarray(predict(batch))[:real])
  if not outputs:
    return np.zeros((0, len(trained.class_names)), np.float32)
  return np.concatenate(outputs)


@dataclasses.dataclass(frozen=True)
class LabeledImages:
  """Decoded images of one evaluation set, in manifest (path) order."""

  name: str
  root: Path
  pixels: np.ndarray
  labels: np.ndarray
  paths: list[str]
  skipped: list[tuple[str, str]]


def load_labeled_images(
    trained: TrainedClassifier, data_dir: str | Path | None = None, split: str = 'test'
) -> LabeledImages:
  """Load the images to evaluate, with labels in the model's class order.

  Without `data_dir`, the split comes from the training data and the
  workdir's manifest.csv (every file checked against its recorded sha256).
  With `data_dir`, any class-folder dataset whose class names equal the
  model's: its `split` subfolder if it is pre-split, else every image.

  Raises:
    ValueError: if the classes of `data_dir` differ from the model's, or the
      split does not exist.
  """
  config = trained.config
  if data_dir is None:
    dataset = data.load_class_folder(
        config['data_root'],
        image_size=trained.image_size,
        resize=trained.resize,
        manifest=trained.workdir / experiment.MANIFEST_FILE,
        tfds_data_dir=trained.workdir / 'tfds',
    )
    if split not in dataset.splits:
      raise ValueError(
          f'Split {split!r} not found in {config["data_root"]}; available: '
          f'{sorted(dataset.splits)}.'
      )
    chosen = dataset.splits[split]
    return LabeledImages(split, Path(config['data_root']), chosen.images,
                         np.asarray(chosen.labels), list(chosen.paths), [])

  scan = data.scan_class_folder(data_dir)
  if list(scan.class_names) != trained.class_names:
    raise ValueError(
        f'The classes of {data_dir} {list(scan.class_names)} do not match the '
        f"model's {trained.class_names}. Evaluate on folders named exactly as "
        'the training classes.'
    )
  files = [f for f in scan.files if not scan.presplit or f.split == split]
  if scan.presplit and not files:
    raise ValueError(f'{data_dir} has no {split!r} split; available: {list(scan.split_names)}.')
  skipped = [(f.path, 'not an image file extension') for f in files if not f.has_image_extension]
  files = [f for f in files if f.has_image_extension]

  decoded = data.decode_files(
      [scan.root / f.path for f in files], trained.image_size, trained.resize
  )
  by_path = {str(scan.root / f.path): f for f in files}
  labels = np.asarray(
      [trained.class_names.index(by_path[p].class_name) for p in decoded.paths], np.int32
  )
  relative = [by_path[p].path for p in decoded.paths]
  skipped += [(str(Path(e.path).relative_to(scan.root)), e.reason) for e in decoded.errors]
  name = split if scan.presplit else Path(data_dir).name
  return LabeledImages(name, scan.root, decoded.images, labels, relative, skipped)


def write_predictions(path: Path, images: LabeledImages, probabilities: np.ndarray, class_names) -> None:
  """Write predictions.csv: path, true class, predicted class, one column per class."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', 'true_class', 'predicted_class', *[f'p_{c}' for c in class_names]])
    for row_path, label, row in zip(images.paths, images.labels, probabilities):
      writer.writerow([
          row_path, class_names[label], class_names[int(np.argmax(row))],
          *[f'{p:.9g}' for p in row],
      ])


def _mask_class(images: LabeledImages, mask_dir: Path, class_names) -> int | None:
  """Return the class whose images have masks in `mask_dir` (e.g. 'Cancer')."""
  with_masks = {int(label) for path, label in zip(images.paths, images.labels)
                if (mask_dir / Path(path).name).is_file()}
  if len(with_masks) > 1:
    raise ValueError(
        f'Masks in {mask_dir} match images of several classes '
        f'{[class_names[i] for i in sorted(with_masks)]}; the pointing game '
        'needs masks of one class.'
    )
  return with_masks.pop() if with_masks else None


def evaluate_run(
    workdir: str | Path,
    *,
    checkpoint: str = 'best',
    data_dir: str | Path | None = None,
    split: str = 'test',
    output_dir: str | Path | None = None,
    gradcam_per_class: int = 0,
    mask_dir: str | Path | None = None,
    n_resamples: int = metrics.DEFAULT_RESAMPLES,
    batch_size: int = 16,
) -> dict:
  """Evaluate a trained run and write metrics.json, predictions.csv, report.html.

  Args:
    workdir: the `train.py` workdir.
    checkpoint: 'best', 'latest' or a saved epoch number.
    data_dir: evaluate this class-folder dataset instead of the run's split.
    split: which split ('test' by default).
    output_dir: where to write; default WORKDIR/eval.
    gradcam_per_class: Grad-CAM overlays to save for the first images (in
      path order) of each true class.
    mask_dir: tumour masks named like the images; adds the pointing game.
    n_resamples: bootstrap resamples of the confidence intervals.
    batch_size: images per forward pass.

  Returns:
    The metrics dict written to metrics.json.
  """
  trained = load_trained(workdir, checkpoint)
  output_dir = Path(output_dir) if output_dir else trained.workdir / 'eval'
  output_dir.mkdir(parents=True, exist_ok=True)

  images = load_labeled_images(trained, data_dir, split)
  for path, reason in images.skipped:
    logger.warning('Not evaluated: %s (%s)', path, reason)
  if len(images.labels) == 0:
    raise ValueError(f'No decodable images to evaluate in {images.root} ({split}).')
  logger.info('Evaluating %d images of %s (%s).', len(images.labels), images.root, images.name)

  probabilities = predict_probabilities(trained, images.pixels, batch_size, f'{images.name} predictions')
  write_predictions(output_dir / 'predictions.csv', images, probabilities, trained.class_names)
  result = metrics.evaluate_classification(
      images.labels, probabilities, trained.class_names, n_resamples=n_resamples
  )
  result['evaluated'] = {
      'data_root': str(images.root),
      'split': images.name,
      'checkpoint': trained.checkpoint,
      'workdir': str(trained.workdir),
      'skipped': [{'path': p, 'reason': r} for p, r in images.skipped],
  }

  # Grad-CAM overlays and the pointing game.
  overlays, pointing = [], None
  backbone_dtype = jnp.dtype(trained.config['compute_dtype'])
  if gradcam_per_class > 0:
    chosen = np.concatenate([
        np.flatnonzero(images.labels == c)[:gradcam_per_class]
        for c in range(len(trained.class_names))
    ]).astype(int)
    cams = explain.gradcam(
        trained.backbone, trained.head, images.pixels[chosen], trained.input_convention,
        batch_size=min(batch_size, 8), dtype=backbone_dtype,
    )
    overlays = explain.save_overlays(
        output_dir / 'gradcam', [images.paths[i] for i in chosen], images.pixels[chosen],
        cams, trained.class_names, labels=images.labels[chosen],
    )
    logger.info('Saved %d Grad-CAM overlays to %s', len(overlays), output_dir / 'gradcam')

  if mask_dir is not None:
    mask_dir = Path(mask_dir)
    target = _mask_class(images, mask_dir, trained.class_names)
    if target is None:
      logger.warning('No image of this set has a mask in %s; no pointing game.', mask_dir)
    else:
      chosen = np.flatnonzero(images.labels == target)
      cams = explain.gradcam(
          trained.backbone, trained.head, images.pixels[chosen], trained.input_convention,
          targets=target, batch_size=min(batch_size, 8), dtype=backbone_dtype,
      )
      pointing = explain.pointing_game(
          cams.heatmaps, [images.root / images.paths[i] for i in chosen], mask_dir,
          trained.image_size, trained.resize,
      )
      pointing['target_class'] = trained.class_names[target]
      result['pointing_game'] = pointing
      if pointing['hit_rate'] is not None:
        logger.info(
            'Pointing game (%s): hit rate %.3f (95%% CI %.3f-%.3f, n=%d); random baseline %.3f.',
            trained.class_names[target], pointing['hit_rate']['value'],
            pointing['hit_rate']['ci_low'], pointing['hit_rate']['ci_high'],
            pointing['hit_rate']['n'], pointing['baseline']['value'],
        )

  (output_dir / 'metrics.json').write_text(json.dumps(result, indent=2) + '\n')
  provenance = {
      'workdir': str(trained.workdir),
      'checkpoint': trained.checkpoint,
      'input_convention': trained.input_convention,
      'weights': trained.config.get('weights_provenance'),
  }
  report_path = report.write_report(
      output_dir, result, trained.class_names,
      history_path=trained.workdir / experiment.METRICS_FILE,
      gradcam_images=overlays, pointing_game=pointing, provenance=provenance,
      dataset={'name': images.name, 'data_dir': str(images.root), 'n': int(len(images.labels))},
  )
  logger.info('Wrote %s, %s and %s', output_dir / 'metrics.json', output_dir / 'predictions.csv', report_path)
  return result


def list_image_files(inputs) -> list[Path]:
  """Expand files and folders (searched recursively) into image files, sorted."""
  files = []
  for item in map(Path, inputs):
    if item.is_dir():
      files += sorted(p for p in item.rglob('*')
                      if p.is_file() and p.suffix.lower() in data.defaults.IMAGE_EXTENSIONS
                      and not any(part.startswith('.') for part in p.relative_to(item).parts))
    elif item.is_file():
      files.append(item)
    else:
      raise FileNotFoundError(f'{item}: no such file or folder.')
  return files


def predict_files(
    workdir: str | Path,
    inputs,
    output_csv: str | Path,
    *,
    checkpoint: str = 'best',
    gradcam_dir: str | Path | None = None,
    batch_size: int = 16,
    strict: bool = False,
) -> list[tuple[str, str]]:
  """Write class probabilities of unlabeled images to a CSV.

  Files that cannot be decoded get a row with status 'skipped' and the reason
  (or raise with `strict`); no other image takes their place.

  Args:
    workdir: the `train.py` workdir.
    inputs: image files and folders (searched recursively).
    output_csv: the CSV to write: path, status, reason, predicted class, one
      probability column per class.
    checkpoint: 'best', 'latest' or a saved epoch number.
    gradcam_dir: also save a Grad-CAM overlay per image here.
    batch_size: images per forward pass.
    strict: raise on the first file that cannot be decoded.

  Returns:
    The skipped files as (path, reason).
  """
  trained = load_trained(workdir, checkpoint)
  files = list_image_files(inputs)
  if not files:
    raise ValueError(f'No image files found in {list(map(str, inputs))}.')
  decoded = data.decode_files(files, trained.image_size, trained.resize, strict=strict)
  skipped = [(str(e.path), e.reason) for e in decoded.errors]
  probabilities = predict_probabilities(trained, decoded.images, batch_size)

  by_path = dict(zip(decoded.paths, probabilities))
  reasons = dict(skipped)
  output_csv = Path(output_csv)
  output_csv.parent.mkdir(parents=True, exist_ok=True)
  with open(output_csv, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', 'status', 'reason', 'predicted_class',
                     *[f'p_{c}' for c in trained.class_names]])
    for path in map(str, files):
      if path in by_path:
        row = by_path[path]
        writer.writerow([path, 'ok', '', trained.class_names[int(np.argmax(row))],
                         *[f'{p:.9g}' for p in row]])
      else:
        writer.writerow([path, 'skipped', reasons.get(path, 'not decoded'), '',
                         *[''] * len(trained.class_names)])

  if gradcam_dir is not None and len(decoded.paths):
    cams = explain.gradcam(
        trained.backbone, trained.head, decoded.images, trained.input_convention,
        batch_size=min(batch_size, 8), dtype=jnp.dtype(trained.config['compute_dtype']),
    )
    explain.save_overlays(gradcam_dir, decoded.paths, decoded.images, cams, trained.class_names)
  logger.info('Wrote predictions for %d of %d files to %s', len(decoded.paths), len(files), output_csv)
  return skipped
