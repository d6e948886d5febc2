"""Keras-to-Flax conversion of InceptionResNetV2, with Keras as the oracle."""

import json
import re

import h5py
import jax
import keras
import numpy as np
import pytest

from flax_pet import keras_weights
from flax_pet import models
from flax_pet import pretrained
from tests import keras_h5

from convert import radimagenet_to_flax

# Converted outputs must match Keras to float32 rounding through ~240 layers.
RELATIVE_TOLERANCE = 1e-4
NAME_OFFSET = 203  # as if an earlier model in the session took conv2d..conv2d_202

flax_backbone = jax.jit(models.InceptionResNetV2().apply)


def max_relative_difference(reference, actual):
  return float(np.max(np.abs(reference - actual)) / np.max(np.abs(reference)))


@pytest.fixture(scope='module')
def keras_model():
  return keras_h5.random_irv2(keras, 224, seed=0)


@pytest.fixture(scope='module')
def keras_layers(keras_model):
  return keras_h5.model_layers(keras_model, name_offset=NAME_OFFSET)


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory, keras_layers):
  path = tmp_path_factory.mktemp('weights') / 'RadImageNet-IRV2_notop.h5'
  keras_h5.write_weights_h5(path, keras_layers)
  return path


@pytest.fixture(scope='module')
def converted(weights_file):
  return keras_weights.convert_h5(weights_file)


@pytest.fixture(scope='module')
def random_batch():
  rng = np.random.default_rng(1)
  return rng.uniform(-1.0, 1.0, (2, 224, 224, 3)).astype(np.float32)


def write_layers(tmp_path, layers, name='edited.h5'):
  path = tmp_path / name
  keras_h5.write_weights_h5(path, layers)
  return path


def test_file_order_matches_fresh_keras_model():
  model = keras.applications.InceptionResNetV2(
      include_top=False, weights=None, input_shape=(75, 75, 3)
  )
  names = [layer.name for layer in model.layers if layer.weights]

  # Keras' counters give the creation order of each layer type; rebuild it
  # and express the file order in Flax paths independently of the module.
  def suffix(name):
    match = re.search(r'_(\d+)$', name)
    return int(match[1]) if match else 0

  convs = iter(sorted((n for n in names if n.startswith('conv2d')), key=suffix))
  norms = iter(sorted((n for n in names if n.startswith('batch_normalization')), key=suffix))
  keras_name = {}
  for flax_path in keras_weights.KERAS_CREATION_ORDER:
    block, leaf = flax_path.split('/')[0], flax_path.split('/')[-1]
    if leaf == 'up':
      keras_name[flax_path] = f'{block}_conv'
    elif block == 'conv_7b':
      keras_name[flax_path] = 'conv_7b' if leaf == 'conv' else 'conv_7b_bn'
    else:
      keras_name[flax_path] = next(convs) if leaf == 'conv' else next(norms)

  assert [keras_name[p] for p in keras_weights.KERAS_FILE_ORDER] == names


def test_backbone_matches_keras_224(keras_model, converted, random_batch):
  expected = np.asarray(keras_model(random_batch, training=False))
  actual = np.asarray(flax_backbone(converted.backbone, random_batch))

  assert actual.shape == (2, 5, 5, 1536)
  assert max_relative_difference(expected, actual) < RELATIVE_TOLERANCE


@pytest.mark.slow
def test_backbone_matches_keras_299(weights_file, converted):
  keras_model = keras.applications.InceptionResNetV2(
      include_top=False, weights=None, input_shape=(299, 299, 3)
  )
  keras_model.load_weights(str(weights_file))
  images = np.random.default_rng(2).uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)

  expected = np.asarray(keras_model(images, training=False))
  actual = np.asarray(flax_backbone(converted.backbone, images))

  assert actual.shape == (1, 8, 8, 1536)
  assert max_relative_difference(expected, actual) < RELATIVE_TOLERANCE


def build_head(keras_features, num_classes=3, seed=3):
  keras.utils.set_random_seed(seed)
  x = keras.layers.GlobalAveragePooling2D()(keras_features)
  x = keras.layers.Dense(
      1024, activation='relu', kernel_regularizer=keras.regularizers.l2(1e-3)
  )(x)
  x = keras.layers.Dropout(0.7)(x)
  return keras.layers.Dense(num_classes, activation='softmax')(x)


@pytest.mark.parametrize('layout', ['nested', 'flat'])
def test_whole_model_probabilities_match_keras(tmp_path, keras_model, random_batch, layout):
  if layout == 'nested':
    # The reference notebook: the frozen backbone called as one layer.
    keras_model.trainable = False
    inputs = keras.Input((224, 224, 3))
    whole = keras.Model(inputs, build_head(keras_model(inputs, training=False)))
  else:
    whole = keras.Model(keras_model.input, build_head(keras_model.output))
  path = tmp_path / 'frozen_model.h5'
  whole.save(path)

  with h5py.File(path) as f:
    if layout == 'nested':
      assert 'model_weights/inception_resnet_v2' in f
  result = keras_weights.convert_h5(path)
  probabilities = jax.nn.softmax(
      models.ClassifierHead(result.num_classes, result.hidden_units).apply(
          result.head, flax_backbone(result.backbone, random_batch)
      )
  )

  assert result.num_classes == 3
  assert result.hidden_units == 1024
  np.testing.assert_allclose(
      np.asarray(probabilities), np.asarray(whole(random_batch, training=False)), atol=1e-5
  )


def test_cli_writes_checkpoint_and_metadata(tmp_path, weights_file, converted, random_batch, capsys):
  output = tmp_path / 'radimagenet_irv2'

  code = radimagenet_to_flax.main(['--h5', str(weights_file), '--output', str(output)])

  assert code == 0
  assert 'Converted 448 layers' in capsys.readouterr().out
  metadata = json.loads((output / 'weights.json').read_text())
  assert metadata['input_convention'] == 'radimagenet'
  assert metadata['layer_count'] == 448
  assert metadata['value_count'] == 54_336_736
  assert metadata['source_sha256'] == keras_weights.sha256_of(weights_file)
  assert metadata['source_kind'] == 'weights-only'

  apply_fn, variables = pretrained.load_backbone(output)
  np.testing.assert_array_equal(
      np.asarray(apply_fn(variables, random_batch)),
      np.asarray(flax_backbone(converted.backbone, random_batch)),
  )


@pytest.mark.slow
def test_cli_verify_reports_match(tmp_path, weights_file, capsys):
  output = tmp_path / 'verified'

  code = radimagenet_to_flax.main(
      ['--h5', str(weights_file), '--output', str(output), '--verify']
  )

  printed = capsys.readouterr().out
  assert code == 0, printed
  assert 'verify: OK' in printed
  assert 'max abs difference' in printed


def test_load_backbone_accepts_h5_directly(weights_file, converted, random_batch):
  apply_fn, variables = pretrained.load_backbone(weights_file)

  np.testing.assert_array_equal(
      np.asarray(apply_fn(variables, random_batch)),
      np.asarray(flax_backbone(converted.backbone, random_batch)),
  )


def test_load_backbone_optimized_matches(weights_file, converted, random_batch):
  apply_fn, folded = pretrained.load_backbone(weights_file, optimize=True)

  expected = np.asarray(flax_backbone(converted.backbone, random_batch))
  actual = np.asarray(apply_fn(folded, random_batch))

  assert max_relative_difference(expected, actual) < 1e-5


def test_chunked_layer_names_are_read(tmp_path, keras_layers, converted):
  path = tmp_path / 'chunked.h5'
  keras_h5.write_weights_h5(path, keras_layers, attribute_limit=4096)
  with h5py.File(path) as f:
    assert 'layer_names0' in f.attrs

  result = keras_weights.convert_h5(path)

  np.testing.assert_array_equal(
      result.backbone['params']['conv_7b']['conv']['kernel'],
      converted.backbone['params']['conv_7b']['conv']['kernel'],
  )


# Bad files: each must fail with a message naming the file, the place and the fix,
# and leave no output behind.


def convert_fails(tmp_path, path, capsys):
  output = tmp_path / 'out'
  code = radimagenet_to_flax.main(['--h5', str(path), '--output', str(output)])
  message = capsys.readouterr().err
  assert code == 1
  assert not output.exists()
  assert not list(tmp_path.glob('.out.*'))
  assert str(path) in message
  return message


def test_error_not_hdf5(tmp_path, capsys):
  path = tmp_path / 'weights.h5'
  path.write_text('<html>404 Not Found</html>')

  message = convert_fails(tmp_path, path, capsys)

  assert 'not an HDF5 file' in message


def test_error_truncated_file(tmp_path, weights_file, capsys):
  path = tmp_path / 'truncated.h5'
  path.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])

  message = convert_fails(tmp_path, path, capsys)

  assert 'truncated or corrupt' in message


def test_error_other_architecture(tmp_path, capsys):
  resnet = keras.applications.ResNet50(
      include_top=False, weights=None, input_shape=(64, 64, 3)
  )
  path = write_layers(tmp_path, keras_h5.model_layers(resnet), 'RadImageNet-ResNet50_notop.h5')

  message = convert_fails(tmp_path, path, capsys)

  assert "layer 0 (Keras name 'conv1_conv')" in message
  assert 'conv2d_1a/conv with weight shapes ((3, 3, 3, 32),)' in message
  assert '((7, 7, 3, 64), (64,))' in message
  assert 'RadImageNet-IRV2_notop.h5' in message


def test_error_missing_layers(tmp_path, keras_layers, capsys):
  path = write_layers(tmp_path, keras_layers[:300])

  message = convert_fails(tmp_path, path, capsys)

  assert 'ends after 300 weighted layers' in message
  assert 'layer 300' in message


def test_error_shape_mismatch(tmp_path, keras_layers, capsys):
  layers = list(keras_layers)
  name, weights = layers[57]
  weight_name, kernel = weights[0]
  layers[57] = (name, [(weight_name, kernel[..., :-1])])

  message = convert_fails(tmp_path, write_layers(tmp_path, layers), capsys)

  assert f"layer 57 (Keras name '{name}')" in message
  assert str(kernel.shape) in message
  assert str(kernel[..., :-1].shape) in message


def test_error_swapped_same_shape_layers(tmp_path, keras_layers, capsys):
  # Two 1x1 convolutions 320 -> 32 in block35_1: shapes cannot tell them apart.
  layers = list(keras_layers)
  first = keras_weights.KERAS_FILE_ORDER.index('block35_1/branch2_0/conv')
  second = keras_weights.KERAS_FILE_ORDER.index('block35_1/branch1_0/conv')
  assert layers[first][1][0][1].shape == layers[second][1][0][1].shape
  layers[first], layers[second] = layers[second], layers[first]

  message = convert_fails(tmp_path, write_layers(tmp_path, layers), capsys)

  assert 'contradicts' in message
  assert 'placed as block35_1/' in message


def test_error_extra_layers_in_weights_file(tmp_path, keras_layers, capsys):
  extra = ('predictions', [('predictions/kernel:0', np.zeros((1536, 1000), np.float32))])
  path = write_layers(tmp_path, list(keras_layers) + [extra])

  message = convert_fails(tmp_path, path, capsys)

  assert '449 weighted layers' in message
  assert 'predictions' in message


def test_error_output_exists(tmp_path, weights_file, capsys):
  output = tmp_path / 'existing'
  output.mkdir()

  code = radimagenet_to_flax.main(['--h5', str(weights_file), '--output', str(output)])

  assert code == 1
  assert '--overwrite' in capsys.readouterr().err


def test_input_smaller_than_75_pixels_is_rejected(converted):
  with pytest.raises(ValueError, match='at least 75x75'):
    models.InceptionResNetV2().apply(converted.backbone, np.zeros((1, 74, 80, 3), np.float32))
