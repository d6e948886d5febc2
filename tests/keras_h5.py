"""Build Keras InceptionResNetV2 weight files for tests, as tf.keras 2 writes them.

Model weights cannot be downloaded here, so tests make their own: a Keras
model with seeded random weights (BatchNorm statistics and residual biases
randomized too, so that a misplaced array changes the output), written in the
legacy HDF5 layout that RadImageNet's files use.
"""

import h5py
import numpy as np

# tf.keras 2 splits attributes above this size into name0, name1, ...
_HDF5_ATTRIBUTE_LIMIT = 64512


def random_irv2(keras, image_size: int, seed: int = 0):
  """Return keras.applications.InceptionResNetV2 with seeded random weights."""
  keras.utils.set_random_seed(seed)
  model = keras.applications.InceptionResNetV2(
      include_top=False, weights=None, input_shape=(image_size, image_size, 3)
  )
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      beta, mean, variance = layer.get_weights()
      layer.set_weights([
          rng.normal(0.0, 0.2, beta.shape).astype(np.float32),
          rng.normal(0.0, 0.2, mean.shape).astype(np.float32),
          rng.uniform(0.5, 2.0, variance.shape).astype(np.float32),
      ])
    elif layer.name.endswith('_conv') and layer.name.startswith('block'):
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0.0, 0.1, bias.shape).astype(np.float32)])
  return model


def model_layers(model, name_offset: int = 0):
  """List (layer name, [(weight name, array)]) in Keras' file order.

  Auto-generated names are renumbered with `name_offset`, as a fresh tf.keras
  session that had already built other layers would name them
  (conv2d_205 instead of conv2d).
  """
  def rename(name):
    for prefix in ('conv2d', 'batch_normalization'):
      if name == prefix or (name.startswith(prefix + '_') and name[len(prefix) + 1:].isdigit()):
        number = int(name[len(prefix) + 1:] or 0) if name != prefix else 0
        return f'{prefix}_{number + name_offset}' if number + name_offset else prefix
    return name

  layers = []
  for layer in model.layers:
    if not layer.weights:
      continue
    name = rename(layer.name)
    weights = [
        (f'{name}/{variable.name}:0', np.asarray(variable))
        for variable in layer.weights
    ]
    layers.append((name, weights))
  return layers


def _write_name_list(group, name: str, values, limit: int = _HDF5_ATTRIBUTE_LIMIT) -> None:
  encoded = np.array([v.encode('utf8') for v in values])
  chunks = max(1, int(np.ceil(encoded.nbytes / limit)))
  if chunks == 1:
    group.attrs[name] = encoded
    return
  for index, part in enumerate(np.array_split(encoded, chunks)):
    group.attrs[f'{name}{index}'] = part


def write_weights_h5(
    path, layers, extra_unweighted=('input_layer', 'activation'),
    attribute_limit: int = _HDF5_ATTRIBUTE_LIMIT,
) -> None:
  """Write layers in tf.keras 2's weights-only HDF5 layout.

  A small `attribute_limit` forces the chunked `layer_names0, ...` form.
  """
  with h5py.File(path, 'w') as f:
    f.attrs['backend'] = b'tensorflow'
    f.attrs['keras_version'] = b'2.10.0'
    names = list(extra_unweighted) + [name for name, _ in layers]
    _write_name_list(f, 'layer_names', names, attribute_limit)
    for name in extra_unweighted:
      _write_name_list(f.create_group(name), 'weight_names', [])
    for name, weights in layers:
      group = f.create_group(name)
      _write_name_list(group, 'weight_names', [w for w, _ in weights])
      for weight_name, array in weights:
        group.create_dataset(weight_name, data=array)
