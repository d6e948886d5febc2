"""Converted pretrained weights on disk, and `load_backbone`.

A converted weights folder contains:

    weights.json   provenance (source file, sha256, layer count), the input
                   convention the weights expect, and the head's shape
    backbone/      Orbax checkpoint of {'params', 'batch_stats'}
    head/          Orbax checkpoint of the classifier head's {'params'},
                   only when the source file had a head

`load_backbone` also accepts a Keras .h5 file directly and converts it in
memory, so a user can skip the conversion step at the cost of a few seconds.
"""

import dataclasses
import datetime
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flax_pet import inference
from flax_pet import keras_weights
from flax_pet import models
from flax_pet import preprocessing

logger = logging.getLogger(__name__)

METADATA_FILE = 'weights.json'
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
  """Backbone (and optional head) variables with what is known about them."""

  backbone: dict
  head: dict | None
  num_classes: int | None
  hidden_units: int | None
  input_convention: str
  provenance: dict


def default_convention(source_kind: str) -> str:
  """Return the input convention to assume for a Keras file of this kind.

  RadImageNet's own fine-tuning code feeds caffe-style pixels, so a bare
  backbone file gets 'radimagenet'. A whole model saved by the reference
  notebook had its head trained on x / 255 inputs, so it gets 'unit'.
  """
  return 'unit' if source_kind == 'whole-model' else 'radimagenet'


def _save_tree(directory: Path, tree: dict) -> None:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, tree)
  checkpointer.wait_until_finished()


def _restore_tree(directory: Path, target: dict) -> dict:
  checkpointer = ocp.StandardCheckpointer()
  return checkpointer.restore(directory, target)


def save_converted(
    converted: keras_weights.ConvertedWeights,
    output_dir: str | Path,
    input_convention: str,
    overwrite: bool = False,
) -> Path:
  """Write converted weights as Orbax checkpoints plus `weights.json`.

  The folder is assembled under a temporary name beside `output_dir` and
  renamed into place at the end, so a failure leaves nothing half-written.

  Args:
    converted: the result of `keras_weights.convert_h5`.
    output_dir: folder to create.
    input_convention: one of `preprocessing.CONVENTIONS`.
    overwrite: replace an existing `output_dir`.

  Returns:
    The absolute path of the written folder.

  Raises:
    FileExistsError: if `output_dir` exists and `overwrite` is False.
  """
  preprocessing.check_convention(input_convention)
  output_dir = Path(output_dir).absolute()
  if output_dir.exists() and not overwrite:
    raise FileExistsError(
        f'{output_dir} already exists; choose another output folder or pass '
        '--overwrite.'
    )
  output_dir.parent.mkdir(parents=True, exist_ok=True)

  staging = Path(tempfile.mkdtemp(prefix=f'.{output_dir.name}.', dir=output_dir.parent))
  try:
    _save_tree(staging / 'backbone', converted.backbone)
    if converted.head is not None:
      _save_tree(staging / 'head', converted.head)

    metadata = {
        'format_version': FORMAT_VERSION,
        'architecture': 'InceptionResNetV2',
        'input_convention': input_convention,
        'num_classes': converted.num_classes,
        'hidden_units': converted.hidden_units,
        'converted_at': datetime.datetime.now(datetime.timezone.utc).isoformat(),
        **converted.provenance,
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + '\n')

    if output_dir.exists():
      shutil.rmtree(output_dir)
    staging.rename(output_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise

  logger.info('Wrote converted weights to %s', output_dir)
  return output_dir


def _backbone_target() -> dict:
  model = models.InceptionResNetV2()
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))


def load_pretrained(path: str | Path) -> PretrainedWeights:
  """Load converted weights from a folder, or convert a Keras .h5 file.

  Args:
    path: a folder written by `save_converted` (or
      `convert/radimagenet_to_flax.py`), or a Keras .h5 file.

  Returns:
    The variables, the input convention and the provenance.

  Raises:
    FileNotFoundError: if `path` does not exist or lacks `weights.json`.
    keras_weights.WeightFileError: for a .h5 file that does not fit.
  """
  path = Path(path)
  if path.is_file():
    converted = keras_weights.convert_h5(path)
    convention = default_convention(converted.provenance['source_kind'])
    logger.info(
        'Converted %s in memory; assuming input convention %r.', path, convention
    )
    return PretrainedWeights(
        converted.backbone, converted.head, converted.num_classes,
        converted.hidden_units, convention, converted.provenance,
    )

  metadata_path = path / METADATA_FILE
  if not metadata_path.is_file():
    raise FileNotFoundError(
        f'{path}: neither a Keras .h5 file nor a converted weights folder '
        f'(no {METADATA_FILE}). Convert RadImageNet weights with '
        '`python convert/radimagenet_to_flax.py --h5 FILE --output DIR`.'
    )
  metadata = json.loads(metadata_path.read_text())
  backbone = _restore_tree(path.absolute() / 'backbone', _backbone_target())

  head = None
  if (path / 'head').exists():
    head_model = models.ClassifierHead(metadata['num_classes'], metadata['hidden_units'])
    head_target = jax.eval_shape(
        head_model.init, jax.random.key(0), jnp.zeros((1, models.FEATURE_CHANNELS))
    )
    head = _restore_tree(path.absolute() / 'head', head_target)

  logger.info(
      'Loaded converted weights from %s (source %s, sha256 %s, input convention %s).',
      path, metadata.get('source_file'), metadata.get('source_sha256', '')[:12],
      metadata['input_convention'],
  )
  return PretrainedWeights(
      backbone, head, metadata['num_classes'], metadata['hidden_units'],
      metadata['input_convention'], metadata,
  )


def load_backbone(path: str | Path, optimize: bool = False) -> tuple[Callable, dict]:
  """Load a pretrained InceptionResNetV2 backbone for inference.

  Example:

    apply_fn, variables = flax_pet.load_backbone('radimagenet_irv2/')
    images = flax_pet.preprocess(pixels, 'radimagenet')  # 0..255 RGB in
    features = apply_fn(variables, images)  # [N, 5, 5, 1536] at 224 px

  Args:
    path: a converted weights folder or a Keras .h5 file.
    optimize: return the faster inference form of `flax_pet.inference`
      (BatchNorm folded into the convolutions, fused XLA:CPU kernels, two
      threads per batch on the CPU). Its `variables` are then the folded
      weights, not the Flax module's {'params', 'batch_stats'}.

  Returns:
    `(apply_fn, variables)`: `apply_fn(variables, images)` is jit-compiled,
    takes float32 NHWC images already preprocessed with the weights' input
    convention (stored in the folder's `weights.json`), and returns the last
    feature map.
  """
  pretrained = load_pretrained(path)
  if optimize:
    return inference.optimize_backbone(pretrained.backbone)
  model = models.InceptionResNetV2()
  apply_fn = jax.jit(lambda variables, images: model.apply(variables, images))
  return apply_fn, pretrained.backbone
