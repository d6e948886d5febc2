"""Read Keras InceptionResNetV2 weights from legacy HDF5 files into Flax.

Two file layouts are accepted, both written by Keras' legacy HDF5 code
(tf.keras 2.x and Keras 3's `legacy_h5_format`):

- weights only (`model.save_weights('x.h5')`, how RadImageNet publishes
  `RadImageNet-IRV2_notop.h5`): a root attribute `layer_names`, one group per
  layer with an attribute `weight_names`, arrays at `<layer>/<weight name>`;
- a whole saved model (`model.save('x.h5')`): the same tree under
  `model_weights/`. When the backbone is a nested model, its group contains the
  weights of all its layers, named `<layer>/<weight>`. When the model was
  built from `base_model.output`, the backbone layers are at the top level.
  Dense layers after the backbone are imported as the classifier head.

Keras names layers automatically (`conv2d_17`, `batch_normalization_203`) with
counters that differ from one Python session to the next, so weights are
matched by their position in the file and by shape, never by name. The file
lists layers in Keras' topological order (sorted by depth inside each block),
not in the order the code creates them; `KERAS_FILE_ORDER` spells that order
out per block. Two same-shaped layers swapped would pass every shape check, so
where the names are Keras' auto-generated ones, their numeric suffixes (which
count up in creation order) are cross-checked as well.
"""

import dataclasses
import hashlib
import logging
import re
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from flax_pet import models

logger = logging.getLogger(__name__)

NUM_WEIGHTED_LAYERS = 448

_STEM = ('conv2d_1a', 'conv2d_2a', 'conv2d_2b', 'conv2d_3b', 'conv2d_4a')

# Sub-layers of each block in Keras' creation order (the order of the code in
# keras.applications.inception_resnet_v2). A ConvBN contributes two weighted
# layers, '<name>/conv' and '<name>/bn'.
_CREATION_ORDER = {
    'mixed_5b': ('branch0', 'branch1_0', 'branch1_1', 'branch2_0',
                 'branch2_1', 'branch2_2', 'branch_pool'),
    'mixed_6a': ('branch0', 'branch1_0', 'branch1_1', 'branch1_2'),
    'mixed_7a': ('branch0_0', 'branch0_1', 'branch1_0', 'branch1_1',
                 'branch2_0', 'branch2_1', 'branch2_2'),
    **{
        block_type: tuple(name for name, _, _ in branches) + ('up',)
        for block_type, branches in models._BLOCK_BRANCHES.items()
    },
}

# Weighted layers of each block in the order Keras writes them to HDF5,
# measured with Keras 3.15 (TF backend) and identical to the order of
# tf.keras 2.x files: deepest layers of the longest branch first.
_FILE_ORDER = {
    'mixed_5b': (
        'branch2_0/conv', 'branch2_0/bn', 'branch1_0/conv', 'branch2_1/conv',
        'branch1_0/bn', 'branch2_1/bn', 'branch0/conv', 'branch1_1/conv',
        'branch2_2/conv', 'branch_pool/conv', 'branch0/bn', 'branch1_1/bn',
        'branch2_2/bn', 'branch_pool/bn'),
    'block35': (
        'branch2_0/conv', 'branch2_0/bn', 'branch1_0/conv', 'branch2_1/conv',
        'branch1_0/bn', 'branch2_1/bn', 'branch0/conv', 'branch1_1/conv',
        'branch2_2/conv', 'branch0/bn', 'branch1_1/bn', 'branch2_2/bn', 'up'),
    'mixed_6a': (
        'branch1_0/conv', 'branch1_0/bn', 'branch1_1/conv', 'branch1_1/bn',
        'branch0/conv', 'branch1_2/conv', 'branch0/bn', 'branch1_2/bn'),
    'block17': (
        'branch1_0/conv', 'branch1_0/bn', 'branch1_1/conv', 'branch1_1/bn',
        'branch0/conv', 'branch1_2/conv', 'branch0/bn', 'branch1_2/bn', 'up'),
    'mixed_7a': (
        'branch2_0/conv', 'branch2_0/bn', 'branch0_0/conv', 'branch1_0/conv',
        'branch2_1/conv', 'branch0_0/bn', 'branch1_0/bn', 'branch2_1/bn',
        'branch0_1/conv', 'branch1_1/conv', 'branch2_2/conv', 'branch0_1/bn',
        'branch1_1/bn', 'branch2_2/bn'),
}
_FILE_ORDER['block8'] = _FILE_ORDER['block17']

# The network's blocks from input to output.
_BLOCKS = (
    *_STEM, 'mixed_5b', *(f'block35_{i}' for i in range(1, 11)), 'mixed_6a',
    *(f'block17_{i}' for i in range(1, 21)), 'mixed_7a',
    *(f'block8_{i}' for i in range(1, 11)), 'conv_7b',
)


def _block_type(block: str) -> str:
  return block.rsplit('_', 1)[0] if block.startswith('block') else block


def _file_layers(block: str) -> list[str]:
  if block in _STEM or block == 'conv_7b':
    return [f'{block}/conv', f'{block}/bn']
  return [f'{block}/{entry}' for entry in _FILE_ORDER[_block_type(block)]]


def _creation_layers(block: str) -> list[str]:
  if block in _STEM or block == 'conv_7b':
    return [f'{block}/conv', f'{block}/bn']
  layers = []
  for name in _CREATION_ORDER[_block_type(block)]:
    if name == 'up':
      layers.append(f'{block}/up')
    else:
      layers += [f'{block}/{name}/conv', f'{block}/{name}/bn']
  return layers


# Flax layer paths ('block35_1/branch2_0/conv') in the order Keras writes the
# layers to HDF5, and in the order Keras creates them.
KERAS_FILE_ORDER = tuple(l for b in _BLOCKS for l in _file_layers(b))
KERAS_CREATION_ORDER = tuple(l for b in _BLOCKS for l in _creation_layers(b))
assert len(KERAS_FILE_ORDER) == NUM_WEIGHTED_LAYERS
assert sorted(KERAS_FILE_ORDER) == sorted(KERAS_CREATION_ORDER)

_WRONG_FILE_HINT = (
    'The file does not hold keras.applications.InceptionResNetV2 weights in '
    "the order Keras writes them. Check that it is RadImageNet's "
    'RadImageNet-IRV2_notop.h5 (RadImageNet publishes one file per '
    'architecture: ResNet50, DenseNet121, InceptionV3, InceptionResNetV2) or a '
    'model saved from keras.applications.InceptionResNetV2(include_top=False).'
)


class WeightFileError(ValueError):
  """A Keras weight file that cannot be read or does not fit the network."""


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """One weighted Keras layer as stored in the file."""

  name: str
  weight_names: tuple[str, ...]
  arrays: tuple[np.ndarray, ...]

  @property
  def shapes(self) -> tuple[tuple[int, ...], ...]:
    return tuple(a.shape for a in self.arrays)


@dataclasses.dataclass(frozen=True)
class KerasWeightFile:
  """The weighted layers of a Keras HDF5 file, in file order."""

  path: Path
  kind: str  # 'weights-only' or 'whole-model'
  layers: tuple[KerasLayer, ...]
  keras_version: str
  backend: str


@dataclasses.dataclass(frozen=True)
class ConvertedWeights:
  """Flax variables converted from a Keras file, with their provenance.

  Attributes:
    backbone: {'params', 'batch_stats'} of `models.InceptionResNetV2`.
    head: {'params'} of `models.ClassifierHead`, or None for a backbone-only
      file.
    num_classes: output classes of the head, or None.
    hidden_units: width of the head's hidden Dense layer, or None.
    provenance: JSON-serializable facts about the source file.
  """

  backbone: dict
  head: dict | None
  num_classes: int | None
  hidden_units: int | None
  provenance: dict


def sha256_of(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _decode(value) -> str:
  return value.decode('utf8') if isinstance(value, bytes) else str(value)


def _read_name_list(group: h5py.Group, name: str) -> list[str]:
  """Read a list-of-strings attribute, joining Keras' chunked form."""
  if name in group.attrs:
    return [_decode(v) for v in group.attrs[name]]
  # Keras splits attributes above 64 KiB into name0, name1, ...
  values, index = [], 0
  while f'{name}{index}' in group.attrs:
    values += [_decode(v) for v in group.attrs[f'{name}{index}']]
    index += 1
  return values


def _read_layers(root: h5py.Group) -> list[KerasLayer]:
  """Read the weighted layers under `root`, expanding nested models."""
  layers = []
  for layer_name in _read_name_list(root, 'layer_names'):
    group = root[layer_name]
    weight_names = _read_name_list(group, 'weight_names')
    if not weight_names:
      continue

    # A nested model stores all its layers' weights in one group, named
    # '<inner layer>/<weight>'. Group them by inner layer in order of first
    # appearance: Keras lists trainable weights before non-trainable ones, so
    # a BatchNorm's moving statistics may come long after its beta.
    by_layer: dict[str, list[str]] = {}
    for weight_name in weight_names:
      inner = weight_name.rsplit('/', 1)[0] if '/' in weight_name else layer_name
      by_layer.setdefault(inner, []).append(weight_name)

    for inner, names in by_layer.items():
      arrays = tuple(np.asarray(group[n], dtype=np.float32) for n in names)
      layers.append(KerasLayer(inner, tuple(names), arrays))
  return layers


def read_keras_h5(path: str | Path) -> KerasWeightFile:
  """Read every weighted layer of a legacy Keras HDF5 file.

  Args:
    path: a weights-only file or a whole saved model (`model_weights/`).

  Returns:
    The file's weighted layers in file order.

  Raises:
    WeightFileError: if the file is missing, not HDF5, truncated, or has no
      Keras layer list.
  """
  path = Path(path)
  if path.is_dir():
    raise WeightFileError(
        f'{path}: is a folder, not a Keras .h5 file. Pass the .h5 file; a '
        'folder written by the converter is used as it is, with no conversion.'
    )
  if not path.is_file():
    raise WeightFileError(f'{path}: weight file not found.')
  if not h5py.is_hdf5(path):
    raise WeightFileError(
        f'{path}: not an HDF5 file. Expected a Keras .h5 weight file such as '
        "RadImageNet-IRV2_notop.h5; Keras 3's native '.weights.h5' and "
        "'.keras' formats are not supported."
    )

  try:
    with h5py.File(path, 'r') as f:
      kind = 'whole-model' if 'model_weights' in f else 'weights-only'
      root = f['model_weights'] if kind == 'whole-model' else f
      if not _read_name_list(root, 'layer_names'):
        raise WeightFileError(
            f'{path}: HDF5 file without a Keras "layer_names" attribute, so '
            'not a legacy Keras weight file. Keras 3 ".weights.h5" files key '
            'layers by class and cannot be mapped; save with '
            "model.save_weights('x.h5') from tf.keras 2.x, or with "
            'keras.src.legacy.saving.legacy_h5_format.'
        )
      layers = _read_layers(root)
      keras_version = _decode(root.attrs.get('keras_version', 'unknown'))
      backend = _decode(root.attrs.get('backend', 'unknown'))
  except (OSError, KeyError, RuntimeError) as error:
    raise WeightFileError(
        f'{path}: cannot read the HDF5 file ({error}). It may be truncated or '
        'corrupt: download it again and compare its sha256 with the '
        "publisher's."
    ) from error

  logger.info(
      'Read %d weighted layers from %s (%s file, Keras %s, backend %s).',
      len(layers), path, kind, keras_version, backend,
  )
  return KerasWeightFile(path, kind, tuple(layers), keras_version, backend)


def _expected_shapes(variable_shapes: dict, flax_path: str):
  """Return [(collection, key path, shape)] in Keras' weight order."""
  parts = tuple(flax_path.split('/'))
  params = variable_shapes['params']
  stats = variable_shapes['batch_stats']

  def lookup(tree, keys):
    for key in keys:
      tree = tree[key]
    return tuple(tree.shape)

  if parts[-1] == 'bn':
    return [
        ('params', parts + ('bias',), lookup(params, parts + ('bias',))),
        ('batch_stats', parts + ('mean',), lookup(stats, parts + ('mean',))),
        ('batch_stats', parts + ('var',), lookup(stats, parts + ('var',))),
    ]
  entries = [('params', parts + ('kernel',), lookup(params, parts + ('kernel',)))]
  if parts[-1] == 'up':
    entries.append(('params', parts + ('bias',), lookup(params, parts + ('bias',))))
  return entries


def _set(tree: dict, keys: tuple[str, ...], value) -> None:
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = value


_AUTO_NAME = re.compile(r'^(conv2d|batch_normalization)(?:_(\d+))?$')
_BLOCK_CONV_NAME = re.compile(r'^(block35|block17|block8)_(\d+)_conv$')


def _check_names(path: Path, layers, flax_paths) -> None:
  """Cross-check the mapping against Keras' layer names where they exist.

  Auto-generated names count up in creation order within each layer type
  (from an arbitrary start), so sorted by our creation index their suffixes
  must increase. Named layers (block35_3_conv, conv_7b, conv_7b_bn) must sit
  where their name says.
  """
  creation_index = {p: i for i, p in enumerate(KERAS_CREATION_ORDER)}
  by_type: dict[str, list[tuple[int, int, int]]] = {}

  for position, (layer, flax_path) in enumerate(zip(layers, flax_paths)):
    name = layer.name.rsplit('/', 1)[-1]
    block_conv = _BLOCK_CONV_NAME.match(name)
    if block_conv and flax_path != f'{block_conv[1]}_{block_conv[2]}/up':
      raise WeightFileError(
          f'{path}: layer {position} is named {layer.name!r} but its position '
          f'is that of {flax_path}. {_WRONG_FILE_HINT}'
      )
    expected_name = {'conv_7b/conv': 'conv_7b', 'conv_7b/bn': 'conv_7b_bn'}
    if name in ('conv_7b', 'conv_7b_bn') and expected_name.get(flax_path) != name:
      raise WeightFileError(
          f'{path}: layer {position} is named {layer.name!r} but its position '
          f'is that of {flax_path}. {_WRONG_FILE_HINT}'
      )
    auto = _AUTO_NAME.match(name)
    if auto:
      suffix = int(auto[2] or 0)
      by_type.setdefault(auto[1], []).append(
          (creation_index[flax_path], suffix, position)
      )

  for layer_type, entries in by_type.items():
    entries.sort()
    for (_, suffix_a, pos_a), (_, suffix_b, pos_b) in zip(entries, entries[1:]):
      if suffix_b <= suffix_a:
        raise WeightFileError(
            f'{path}: layers {pos_a} ({layers[pos_a].name!r}, placed as '
            f'{flax_paths[pos_a]}) and {pos_b} ({layers[pos_b].name!r}, placed '
            f'as {flax_paths[pos_b]}) are in an order that contradicts '
            "Keras' auto-generated names: the shapes fit, but the weights "
            f'would land in the wrong {layer_type} layers. {_WRONG_FILE_HINT}'
        )
  if not by_type:
    logger.info('%s: layer names are not auto-generated; skipped the name cross-check.', path)


def convert_backbone(weight_file: KerasWeightFile, layers=None) -> dict:
  """Map the first 448 weighted layers onto Flax backbone variables.

  Args:
    weight_file: the file as read by `read_keras_h5`.
    layers: the backbone's layers, if not all of `weight_file.layers`.

  Returns:
    {'params': ..., 'batch_stats': ...} for `models.InceptionResNetV2`.

  Raises:
    WeightFileError: naming the first layer whose position, count or shape
      does not fit InceptionResNetV2.
  """
  path = weight_file.path
  layers = weight_file.layers if layers is None else layers
  model = models.InceptionResNetV2()
  variable_shapes = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 299, 299, 3))
  )

  variables: dict = {'params': {}, 'batch_stats': {}}
  for position, flax_path in enumerate(KERAS_FILE_ORDER):
    expected = _expected_shapes(variable_shapes, flax_path)
    expected_shapes = tuple(shape for _, _, shape in expected)
    if position >= len(layers):
      raise WeightFileError(
          f'{path}: the file ends after {len(layers)} weighted layers, but '
          f'InceptionResNetV2 has {NUM_WEIGHTED_LAYERS}; layer {position} '
          f'({flax_path}, shapes {expected_shapes}) is missing. {_WRONG_FILE_HINT}'
      )

    layer = layers[position]
    if layer.shapes != expected_shapes:
      raise WeightFileError(
          f'{path}: layer {position} (Keras name {layer.name!r}) should be '
          f'{flax_path} with weight shapes {expected_shapes}, but the file '
          f'has {layer.shapes}. {_WRONG_FILE_HINT}'
      )
    for (collection, keys, _), array in zip(expected, layer.arrays):
      _set(variables[collection], keys, array)

  _check_names(path, layers[:NUM_WEIGHTED_LAYERS], KERAS_FILE_ORDER)
  return variables


def _convert_head(path: Path, layers) -> tuple[dict, int, int]:
  """Map the Dense layers after the backbone onto `models.ClassifierHead`."""
  shapes = [layer.shapes for layer in layers]
  hidden_units = shapes[0][0][1] if shapes and len(shapes[0]) == 2 else None
  expected_form = (
      'two Dense layers: (1536, H) + (H,), then (H, classes) + (classes,)'
  )
  if (
      len(layers) != 2
      or len(shapes[0]) != 2
      or len(shapes[1]) != 2
      or shapes[0][0] != (models.FEATURE_CHANNELS, hidden_units)
      or shapes[0][1] != (hidden_units,)
      or shapes[1][0][0] != hidden_units
      or shapes[1][1] != (shapes[1][0][1],)
  ):
    found = ', '.join(f'{l.name} {l.shapes}' for l in layers)
    raise WeightFileError(
        f'{path}: after the backbone the file has {len(layers)} weighted '
        f'layers ({found}); the classifier head must be {expected_form}. A '
        'file with the 1000-class ImageNet top is not supported: use the '
        '"notop" weights.'
    )

  hidden, logits = layers
  params = {
      'hidden': {'kernel': hidden.arrays[0], 'bias': hidden.arrays[1]},
      'logits': {'kernel': logits.arrays[0], 'bias': logits.arrays[1]},
  }
  return {'params': params}, shapes[1][0][1], hidden_units


def convert_h5(path: str | Path) -> ConvertedWeights:
  """Convert a Keras InceptionResNetV2 HDF5 file, and its head if present.

  Args:
    path: `RadImageNet-IRV2_notop.h5` or a whole saved Keras model whose
      backbone is InceptionResNetV2 (`frozen_model.h5` of the reference
      notebook: backbone, global average pooling, Dense, Dropout, Dense).

  Returns:
    The converted variables and the file's provenance.

  Raises:
    WeightFileError: for unreadable files and files of another architecture.
  """
  weight_file = read_keras_h5(path)
  layers = weight_file.layers
  backbone = convert_backbone(weight_file)

  head, num_classes, hidden_units = None, None, None
  extra = layers[NUM_WEIGHTED_LAYERS:]
  if extra and weight_file.kind == 'weights-only':
    names = ', '.join(l.name for l in extra[:3])
    raise WeightFileError(
        f'{weight_file.path}: {len(layers)} weighted layers, but '
        f'InceptionResNetV2 without top has {NUM_WEIGHTED_LAYERS}; the extra '
        f'layers start with {names}. {_WRONG_FILE_HINT}'
    )
  if extra:
    head, num_classes, hidden_units = _convert_head(weight_file.path, extra)
    logger.info(
        'Imported the classifier head: Dense(%d) -> Dense(%d).',
        hidden_units, num_classes,
    )

  value_count = sum(a.size for layer in layers for a in layer.arrays)
  provenance = {
      'source_file': str(weight_file.path.resolve()),
      'source_sha256': sha256_of(weight_file.path),
      'source_kind': weight_file.kind,
      'keras_version': weight_file.keras_version,
      'keras_backend': weight_file.backend,
      'layer_count': len(layers),
      'value_count': int(value_count),
  }
  return ConvertedWeights(backbone, head, num_classes, hidden_units, provenance)
