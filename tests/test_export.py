"""Tests for flax_pet.export: jax.export round trip and the TF SavedModel."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_pet import export
from flax_pet import models
from flax_pet import preprocessing
from tests.flax_helpers import random_backbone_variables

IMAGE_SIZE = 96
CLASS_NAMES = ['Cancer', 'No cancer', 'other']
CONVENTION = 'radimagenet'
HIDDEN_UNITS = 16


def random_head(seed=1):
  rng = np.random.default_rng(seed)
  # Scaled so that the small, similar features of a random backbone still
  # give probabilities that differ between the test images.
  return {
      'hidden': {
          'kernel': rng.normal(size=(models.FEATURE_CHANNELS, HIDDEN_UNITS)),
          'bias': rng.normal(size=HIDDEN_UNITS) * 0.1,
      },
      'logits': {
          'kernel': rng.normal(size=(HIDDEN_UNITS, len(CLASS_NAMES))) * 0.3,
          'bias': rng.normal(size=len(CLASS_NAMES)) * 0.1,
      },
  }


@pytest.fixture(scope='module')
def weights():
  head = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32),
                                random_head())
  return random_backbone_variables(IMAGE_SIZE), head


@pytest.fixture(scope='module')
def pixels():
  """Five noisy images of different brightness."""
  rng = np.random.default_rng(7)
  brightness = np.array([20, 80, 140, 200, 250], np.float32)
  noise = rng.normal(0, 30, size=(5, IMAGE_SIZE, IMAGE_SIZE, 3))
  return np.clip(brightness[:, None, None, None] + noise, 0, 255).astype(
      np.float32)


@pytest.fixture(scope='module')
def reference(weights, pixels):
  """Probabilities of the in-process Flax Classifier module."""
  backbone, head = weights
  classifier = models.Classifier(len(CLASS_NAMES), HIDDEN_UNITS)
  variables = {
      'params': {'backbone': backbone['params'], 'head': head},
      'batch_stats': {'backbone': backbone['batch_stats']},
  }
  images = preprocessing.preprocess(pixels, CONVENTION)
  logits = jax.jit(classifier.apply)(variables, images)
  return np.asarray(jax.nn.softmax(logits, axis=-1))


@pytest.fixture(scope='module')
def export_dir(weights, tmp_path_factory):
  backbone, head = weights
  return export.export_classifier(
      tmp_path_factory.mktemp('export'), backbone, {'params': head},
      CLASS_NAMES, CONVENTION, IMAGE_SIZE, resize='pad', saved_model=True,
      provenance={'weights_sha256': 'cd' * 32},
  )


def test_export_matches_flax_two_batch_sizes(export_dir, pixels, reference):
  classifier = export.load_exported(export_dir)

  first = classifier(pixels[:2])
  rest = classifier(pixels[2:])

  assert first.shape == (2, 3)
  assert rest.shape == (3, 3)
  np.testing.assert_allclose(first, reference[:2], atol=1e-5, rtol=0)
  np.testing.assert_allclose(rest, reference[2:], atol=1e-5, rtol=0)

  # Five images in batches of two: the last batch is padded.
  batched = classifier(pixels, batch_size=2)
  np.testing.assert_allclose(batched, reference, atol=1e-5, rtol=0)
  # The comparison is meaningful only if the images get different outputs.
  assert np.ptp(reference, axis=0).max() > 0.05


def test_export_metadata(export_dir):
  metadata = json.loads((export_dir / export.METADATA_FILE).read_text())
  assert metadata['class_names'] == CLASS_NAMES
  assert metadata['input_convention'] == CONVENTION
  assert metadata['image_size'] == [IMAGE_SIZE, IMAGE_SIZE]
  assert metadata['resize'] == 'pad'
  assert metadata['input']['shape'] == ['batch', IMAGE_SIZE, IMAGE_SIZE, 3]
  assert metadata['output']['shape'] == ['batch', 3]
  assert metadata['platforms'] == ['cpu']
  assert metadata['saved_model'] == export.SAVED_MODEL_DIR
  assert metadata['provenance'] == {'weights_sha256': 'cd' * 32}

  classifier = export.load_exported(export_dir / export.METADATA_FILE)
  assert classifier.class_names == CLASS_NAMES
  assert classifier.image_size == (IMAGE_SIZE, IMAGE_SIZE)
  assert classifier.exported.in_avals[0].shape[1:] == (IMAGE_SIZE,
                                                       IMAGE_SIZE, 3)


def test_saved_model_matches_flax(export_dir, pixels, reference):
  import tensorflow as tf

  loaded = tf.saved_model.load(str(export_dir / export.SAVED_MODEL_DIR))
  serve = loaded.signatures['serving_default']

  outputs = serve(pixels=tf.constant(pixels[1:4]))

  np.testing.assert_allclose(outputs['probabilities'].numpy(), reference[1:4],
                             atol=1e-5, rtol=0)


def test_load_rejects_wrong_checksum(export_dir, tmp_path):
  metadata = json.loads((export_dir / export.METADATA_FILE).read_text())
  metadata['sha256'] = '0' * 64
  (tmp_path / export.EXPORTED_FILE).symlink_to(
      export_dir / export.EXPORTED_FILE)
  (tmp_path / export.METADATA_FILE).write_text(json.dumps(metadata))

  with pytest.raises(ValueError, match='sha256'):
    export.load_exported(tmp_path)
  with pytest.raises(FileNotFoundError, match='classifier.json'):
    export.load_exported(tmp_path / 'absent')


def test_exported_rejects_wrong_shape(export_dir):
  classifier = export.load_exported(export_dir)
  with pytest.raises(ValueError, match=r'\[N, 96, 96, 3\]'):
    classifier(np.zeros((2, 112, 112, 3), np.float32))


def test_export_rejects_bad_arguments(weights, tmp_path):
  backbone, head = weights
  with pytest.raises(ValueError, match='3 outputs'):
    export.export_classifier(tmp_path, backbone, head, ['a', 'b'],
                             CONVENTION, IMAGE_SIZE)
  with pytest.raises(ValueError, match='too small'):
    export.export_classifier(tmp_path, backbone, head, CLASS_NAMES,
                             CONVENTION, 64)
  with pytest.raises(ValueError, match='Unknown input convention'):
    export.export_classifier(tmp_path, backbone, head, CLASS_NAMES, 'caffe',
                             IMAGE_SIZE)
