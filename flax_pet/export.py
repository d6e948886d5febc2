"""Export of a trained classifier for serving, with `jax.export`.

The exported function takes decoded pixels and returns probabilities:

    pixels float32 [batch, H, W, 3], RGB, 0..255, NHWC
      -> input convention (stored with the weights) -> InceptionResNetV2
      -> classifier head -> softmax -> probabilities float32 [batch, C]

The batch dimension is symbolic, so one export serves any batch size. The
weights are embedded as constants, so the export folder is self-contained:

    classifier.jax_exported   `jax.export.Exported.serialize()` bytes:
                              StableHLO bytecode and its calling convention
    classifier.json           class names, input convention, image size,
                              input and output description, platforms, the
                              sha256 of the exported file and provenance
    saved_model/              optional TensorFlow SavedModel (jax2tf), with
                              a 'serving_default' signature pixels ->
                              probabilities

`load_exported` reads the folder back and returns a callable. For other
StableHLO runtimes, `jax.export.deserialize(data).mlir_module()` returns the
module as text. When the export covers several platforms, its main function
takes the platform index (int32 scalar) before the pixels. The images must be
decoded and resized as in training before they reach the exported function,
and `classifier.json` records the resize mode when the caller gives it.

NOTE: XLA on GPU may run float32 convolutions with TF32, so probabilities
served on a GPU can differ slightly from CPU ones. The
tests run the CPU platform only.
"""

from collections.abc import Sequence
import datetime
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from flax_pet import models
from flax_pet import preprocessing

logger = logging.getLogger(__name__)

EXPORTED_FILE = 'classifier.jax_exported'
METADATA_FILE = 'classifier.json'
SAVED_MODEL_DIR = 'saved_model'
FORMAT_VERSION = 1

# Images per call of the exported function in `ExportedClassifier`; it bounds
# the activation memory of large inputs.
DEFAULT_BATCH_SIZE = 16


class ExportedClassifier:
  """A classifier loaded by `load_exported`: pixels in, probabilities out.

  Attributes:
    metadata: the contents of classifier.json.
    class_names: class names in output column order.
    image_size: (height, width) that the function accepts.
    input_convention: the convention applied inside the function.
    exported: the deserialized `jax.export.Exported`.
  """

  def __init__(self, exported: jax_export.Exported, metadata: dict[str, Any]):
    self.exported = exported
    self.metadata = metadata
    self.class_names = list(metadata['class_names'])
    self.image_size = tuple(metadata['image_size'])
    self.input_convention = metadata['input_convention']
    # jit caches one compilation per batch size.
    self._call = jax.jit(exported.call)

  def __call__(
      self, pixels: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE
  ) -> np.ndarray:
    """Classify decoded images.

    Up to `batch_size` images go through the exported function in one call.
    More are split into batches of that size, with the last one padded, so
    that they compile once.

    Args:
      pixels: float32 [N, H, W, 3], RGB, 0..255, at `image_size`.
      batch_size: images per call, >= 1.

    Returns:
      float32 [N, C] probabilities, columns in `class_names` order.

    Raises:
      ValueError: if pixels has another shape or batch_size is below 1.
    """
    pixels = np.asarray(pixels, np.float32)
    height, width = self.image_size
    if pixels.ndim != 4 or pixels.shape[1:] != (height, width, 3) or not len(pixels):
      raise ValueError(
          f'The exported classifier takes float32 pixels of shape '
          f'[N, {height}, {width}, 3] with N >= 1, got {pixels.shape}. Decode '
          f'and resize images to {height}x{width} RGB first.'
      )
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    if len(pixels) <= batch_size:
      return np.asarray(self._call(pixels))

    outputs = []
    for start in range(0, len(pixels), batch_size):
      batch = pixels[start:start + batch_size]
      count = len(batch)
      if count < batch_size:
        padding = np.zeros((batch_size - count, *batch.shape[1:]), np.float32)
        batch = np.concatenate([batch, padding])
      outputs.append(np.asarray(self._call(batch))[:count])
    return np.concatenate(outputs)


def classifier_fn(
    backbone_variables: dict,
    head_params: dict,
    convention: str,
    dtype: Any = jnp.float32,
):
  """Build fn(pixels) -> probabilities with the weights closed over.

  Args:
    backbone_variables: the backbone's {'params', 'batch_stats'}.
    head_params: the `ClassifierHead` parameters, optionally wrapped in
      {'params': ...}.
    convention: the input convention the backbone weights expect.
    dtype: the backbone's compute dtype.

  Returns:
    A pure function of RGB float32 [N, H, W, 3] pixels in 0..255 that
    returns float32 [N, C] probabilities.
  """
  preprocessing.check_convention(convention)
  head_params = models.unwrap_head_params(head_params)
  num_classes, hidden_units = models.head_shape(head_params)
  backbone = models.InceptionResNetV2(dtype=dtype)
  head = models.ClassifierHead(num_classes, hidden_units)

  def predict(pixels):
    images = preprocessing.preprocess(pixels, convention)
    features = backbone.apply(backbone_variables, images, train=False)
    logits = head.apply({'params': head_params}, features, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return predict


def export_classifier(
    output_dir: str | os.PathLike,
    backbone_variables: dict,
    head_params: dict,
    class_names: Sequence[str],
    convention: str,
    image_size: int | Sequence[int],
    *,
    resize: str | None = None,
    platforms: Sequence[str] | None = None,
    saved_model: bool = False,
    provenance: dict[str, Any] | None = None,
    dtype: Any = jnp.float32,
) -> Path:
  """Export preprocessing, backbone, head and softmax as one function.

  Args:
    output_dir: the export folder; created if needed, files in it replaced.
    backbone_variables: the backbone's {'params', 'batch_stats'}.
    head_params: the `ClassifierHead` parameters.
    class_names: class names in class-index order.
    convention: the input convention the backbone weights expect.
    image_size: the model input size, one int or (height, width), >= 75 px.
    resize: the resize mode the images were decoded with ('stretch' or
      'pad'), recorded for the caller that decodes images.
    platforms: lowering platforms such as ('cpu', 'cuda'); None lowers for
      the default backend of this process.
    saved_model: also write a TensorFlow SavedModel with jax2tf.
    provenance: recorded in classifier.json, such as the weights' sha256 and
      the checkpoint.
    dtype: the backbone's compute dtype.

  Returns:
    The export folder.

  Raises:
    ValueError: if the class names do not match the head, or the image size
      is below 75 px.
  """
  height, width = _image_size(image_size)
  num_classes, _ = models.head_shape(models.unwrap_head_params(head_params))
  class_names = [str(name) for name in class_names]
  if len(class_names) != num_classes:
    raise ValueError(
        f'Got {len(class_names)} class names for a head with {num_classes} '
        'outputs; pass one name per class, in class-index order.'
    )

  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  predict = classifier_fn(backbone_variables, head_params, convention, dtype)
  input_shape = jax_export.symbolic_shape(f'b, {height}, {width}, 3')
  exported = jax_export.export(jax.jit(predict), platforms=platforms)(
      jax.ShapeDtypeStruct(input_shape, jnp.float32)
  )
  data = exported.serialize()
  (output_dir / EXPORTED_FILE).write_bytes(data)
  logger.info('Exported the classifier for %s to %s (%.0f MB).',
              ', '.join(exported.platforms), output_dir / EXPORTED_FILE,
              len(data) / 1e6)

  saved_model_dir = None
  if saved_model:
    saved_model_dir = _write_saved_model(
        output_dir / SAVED_MODEL_DIR, backbone_variables, head_params,
        convention, (height, width), platforms, dtype,
    )

  metadata = {
      'format': 'jax.export',
      'format_version': FORMAT_VERSION,
      'file': EXPORTED_FILE,
      'sha256': hashlib.sha256(data).hexdigest(),
      'class_names': class_names,
      'input_convention': convention,
      'image_size': [height, width],
      'resize': resize,
      'input': {
          'name': 'pixels',
          'dtype': 'float32',
          'shape': ['batch', height, width, 3],
          'description': 'RGB pixels in 0..255, NHWC, decoded and resized '
                         'to image_size; the input convention is applied '
                         'inside the function',
      },
      'output': {
          'name': 'probabilities',
          'dtype': 'float32',
          'shape': ['batch', num_classes],
          'description': 'softmax probabilities, columns in class_names '
                         'order',
      },
      'platforms': list(exported.platforms),
      'calling_convention_version': exported.calling_convention_version,
      'saved_model': SAVED_MODEL_DIR if saved_model_dir else None,
      'jax_version': jax.__version__,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'provenance': provenance or {},
  }
  (output_dir / METADATA_FILE).write_text(
      json.dumps(metadata, indent=2, default=str) + '\n')
  return output_dir


def load_exported(path: str | os.PathLike) -> ExportedClassifier:
  """Load a classifier written by `export_classifier`.

  Args:
    path: the export folder or its classifier.json.

  Returns:
    An `ExportedClassifier`; call it on pixels to get probabilities.

  Raises:
    FileNotFoundError: if classifier.json or the exported file is missing.
    ValueError: if the exported file's sha256 differs from classifier.json
      or its input shape does not match the recorded image size.
  """
  path = Path(path)
  metadata_path = path / METADATA_FILE if path.is_dir() else path
  if not metadata_path.is_file():
    raise FileNotFoundError(
        f'No {METADATA_FILE} at {path}; pass a folder written by '
        'export_classifier.'
    )
  metadata = json.loads(metadata_path.read_text())
  exported_path = metadata_path.parent / metadata['file']
  if not exported_path.is_file():
    raise FileNotFoundError(
        f'{exported_path} is missing; {metadata_path} refers to it.'
    )

  data = exported_path.read_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if digest != metadata['sha256']:
    raise ValueError(
        f'{exported_path} has sha256 {digest}, but {metadata_path} records '
        f'{metadata["sha256"]}; the file is corrupt or from another export. '
        'Export the classifier again.'
    )

  exported = jax_export.deserialize(bytearray(data))
  height, width = metadata['image_size']
  input_shape = exported.in_avals[0].shape
  if tuple(input_shape[1:]) != (height, width, 3):
    raise ValueError(
        f'{exported_path} takes input of shape {input_shape}, but '
        f'{metadata_path} records image_size {[height, width]}.'
    )
  return ExportedClassifier(exported, metadata)


def _write_saved_model(directory, backbone_variables, head_params, convention,
                       image_size, platforms, dtype) -> Path:
  """Write a TF SavedModel with jax2tf, with the weights as tf.Variables."""
  # Imported here: only this optional output needs TensorFlow.
  import tensorflow as tf
  from jax.experimental import jax2tf

  height, width = image_size
  # tf.Module wraps dicts in trackable types that jax does not flatten, so
  # the weights travel as a flat list and are rebuilt inside the function.
  leaves, treedef = jax.tree_util.tree_flatten(
      (backbone_variables, models.unwrap_head_params(head_params)))

  def predict(weights, pixels):
    backbone, head = jax.tree_util.tree_unflatten(treedef, weights)
    return classifier_fn(backbone, head, convention, dtype)(pixels)

  converted = jax2tf.convert(
      predict,
      polymorphic_shapes=[None, f'(b, {height}, {width}, 3)'],
      with_gradient=False,
      native_serialization_platforms=tuple(platforms) if platforms else None,
  )
  module = tf.Module()
  module.weights_list = [tf.Variable(np.asarray(leaf), trainable=False)
                         for leaf in leaves]

  @tf.function(
      autograph=False,
      input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32,
                                     name='pixels')],
  )
  def serve(pixels):
    return {'probabilities': converted(list(module.weights_list), pixels)}

  module.serve = serve
  tf.saved_model.save(module, str(directory),
                      signatures={'serving_default': serve})
  logger.info('Wrote a TensorFlow SavedModel to %s.', directory)
  return directory


def _image_size(image_size) -> tuple[int, int]:
  if isinstance(image_size, int):
    height = width = image_size
  else:
    height, width = (int(side) for side in image_size)
  if min(height, width) < models.MIN_INPUT_SIZE:
    raise ValueError(
        f'image_size {image_size} is too small for InceptionResNetV2; it '
        f'needs at least {models.MIN_INPUT_SIZE} px per side.'
    )
  return height, width
