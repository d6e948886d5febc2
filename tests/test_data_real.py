"""Tests of the data pipeline on the real whole-body PET MIPs (373 RGBA PNGs)."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flax_pet.data import load_class_folder, scan_class_folder, seed_compatible_split

# File names are patient_<n>.png and control_<n>.png, one image per subject.
PATIENT_REGEX = r'^((?:patient|control)_\d+)\.png$'


@pytest.fixture(scope='module')
def mip_dir(data_dir):
  return data_dir / 'pet-mip'


@pytest.fixture(scope='module')
def mip_dataset(mip_dir, tmp_path_factory):
  return load_class_folder(
      mip_dir,
      patient_ids=PATIENT_REGEX,
      tfds_data_dir=tmp_path_factory.mktemp('tfds'),
  )


def test_mip_classes_and_counts(mip_dataset):
  assert mip_dataset.class_names == ['Cancer', 'No cancer']
  assert len(mip_dataset.manifest) == 373
  assert all(row.status == 'ok' for row in mip_dataset.manifest)
  assert Counter(row.class_name for row in mip_dataset.manifest) == {
      'Cancer': 118,
      'No cancer': 255,
  }


def test_mip_stratified_split_sizes(mip_dataset):
  counts = {
      name: np.bincount(split.labels, minlength=2).tolist()
      for name, split in mip_dataset.splits.items()
  }

  # 0.9/0.05/0.05 of 118 and 255, rounded to whole images.
  assert counts == {'train': [106, 229], 'val': [6, 13], 'test': [6, 13]}


def test_mip_no_patient_in_two_splits(mip_dataset):
  split_of_patient = {}
  for name, split in mip_dataset.splits.items():
    for patient in split.patient_ids:
      assert patient
      assert split_of_patient.setdefault(patient, name) == name
  assert len(split_of_patient) == 373


def test_mip_images_in_model_range(mip_dataset):
  images = mip_dataset.splits['val'].images

  assert images.shape == (19, 224, 224, 3)
  assert images.dtype == np.float32
  assert images.min() >= 0.0
  assert images.max() <= 255.0
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  # Inverted display: the background (image corners) is white.
  assert images[:, :3, :3].mean() > 250


def test_mip_matches_keras_loader(mip_dataset, mip_dir):
  keras = pytest.importorskip('keras')
  reference = keras.utils.image_dataset_from_directory(
      mip_dir, image_size=(224, 224), shuffle=False, batch_size=512
  )
  images, labels = next(iter(reference))
  relative = [Path(p).relative_to(mip_dir).as_posix() for p in reference.file_paths]
  index = {path: i for i, path in enumerate(relative)}

  assert reference.class_names == mip_dataset.class_names
  test = mip_dataset.splits['test']
  expected = images.numpy()[[index[p] for p in test.paths]]
  # Storage as uint16 rounds to 1/257 of a grey level.
  np.testing.assert_allclose(test.images, expected, atol=0.5 / 257 + 1e-4)
  np.testing.assert_array_equal(test.labels, labels.numpy()[[index[p] for p in test.paths]])


def test_mip_seed_compatible_golden(mip_dir):
  scan = scan_class_folder(mip_dir)
  names = {c: [f.name for f in scan.files if f.class_name == c] for c in scan.class_names}

  assignment = seed_compatible_split(names, (0.9, 0.05, 0.05), seed=101)

  assert Counter(assignment.values()) == {'train': 335, 'val': 17, 'test': 21}
  # Written by splitfolders 0.6.1: ratio(pet-mip, seed=101, ratio=(.9, .05, .05)).
  val_cancer = sorted(n for (c, n), s in assignment.items() if c == 'Cancer' and s == 'val')
  assert val_cancer == [
      'patient_044.png',
      'patient_046.png',
      'patient_108.png',
      'patient_131.png',
      'patient_139.png',
  ]
