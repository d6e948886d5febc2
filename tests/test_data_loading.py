"""Tests of load_class_folder on class folders built in tmp_path: layouts, bad files, splits, manifest."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from flax_pet.data import (
    MANIFEST_COLUMNS,
    DecodeError,
    PatientLeakError,
    load_class_folder,
    prepare_class_folder,
    read_manifest,
    write_manifest,
)

SIZE = 16


def _write_png(path, seed, shape=(20, 14)):
  """Write an 8-bit grayscale PNG with content unique to seed."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return path


def _make_folder(root, counts, images_per_patient=1):
  """Write counts[class] images per class, named pt<patient>_<k>.png."""
  seed = 0
  for class_name, count in counts.items():
    for i in range(count):
      patient, k = divmod(i, images_per_patient)
      seed += 1
      _write_png(root / class_name / f'pt{class_name[0]}{patient:03d}_{k}.png', seed)
  return root


def _add_bad_files(class_dir):
  full = _write_png(class_dir / 'truncated.png', 999, shape=(64, 64))
  full.write_bytes(full.read_bytes()[:200])
  (class_dir / 'empty.png').write_bytes(b'')
  (class_dir / 'notes.png').write_text('not an image\n')
  (class_dir / 'readme.txt').write_text('acquisition notes\n')


def _load(root, tmp_path, **options):
  options.setdefault('image_size', SIZE)
  options.setdefault('tfds_data_dir', tmp_path / 'tfds')
  return load_class_folder(root, **options)


def _split_paths(dataset):
  return {name: split.paths for name, split in dataset.splits.items()}


def test_bad_files_skipped_with_reason(tmp_path, caplog):
  root = _make_folder(tmp_path / 'data', {'A': 10, 'B': 10})
  _add_bad_files(root / 'A')

  with caplog.at_level(logging.WARNING):
    dataset = _load(root, tmp_path, split_ratios=(0.5, 0.5))

  rows = {row.path: row for row in dataset.manifest}
  assert len(rows) == 24
  assert rows['A/truncated.png'].status == 'skipped'
  assert 'corrupt or truncated PNG' in rows['A/truncated.png'].reason
  assert rows['A/empty.png'].reason == 'file is empty (0 bytes)'
  assert 'not an image in a supported format' in rows['A/notes.png'].reason
  assert 'unsupported file type .txt' in rows['A/readme.txt'].reason
  assert rows['A/readme.txt'].split == ''
  assert sum(row.ok for row in rows.values()) == 20

  loaded = [p for split in dataset.splits.values() for p in split.paths]
  assert sorted(loaded) == sorted(p for p, row in rows.items() if row.ok)
  assert sum(len(split) for split in dataset.splits.values()) == 20
  assert 'truncated.png' in caplog.text
  assert 'empty.png: file is empty' in caplog.text


def test_strict_raises_naming_file(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 10, 'B': 10})
  (root / 'B' / 'empty.png').write_bytes(b'')

  with pytest.raises(DecodeError, match=r'B/empty\.png: file is empty'):
    _load(root, tmp_path, split_ratios=(0.5, 0.5), strict=True)


def test_strict_rejects_cached_skips(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 10, 'B': 10})
  (root / 'B' / 'readme.txt').write_text('notes')
  _load(root, tmp_path, split_ratios=(0.5, 0.5))

  with pytest.raises(DecodeError, match='prepared without strict mode and skipped 1 files'):
    _load(root, tmp_path, split_ratios=(0.5, 0.5), strict=True)


def test_empty_class_folder_rejected(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 4, 'B': 4})
  (root / 'C').mkdir()
  (root / 'C' / '.DS_Store').write_bytes(b'\0')

  with pytest.raises(ValueError, match=r'class folder .*/data/C contains no image file'):
    _load(root, tmp_path)


def test_single_class_rejected(tmp_path):
  root = _make_folder(tmp_path / 'data', {'Cancer': 4})

  with pytest.raises(ValueError, match="needs at least 2 class folders .* has only 'Cancer'"):
    _load(root, tmp_path)


def test_presplit_missing_class_rejected(tmp_path):
  root = tmp_path / 'data'
  _make_folder(root / 'train', {'A': 4, 'B': 4})
  _make_folder(root / 'val', {'A': 2})

  with pytest.raises(ValueError, match=r"split folder .*/data/val has no class folder for 'B'"):
    _load(root, tmp_path)


def test_mixed_layout_rejected(tmp_path):
  root = tmp_path / 'data'
  _make_folder(root / 'train', {'A': 4, 'B': 4})
  _make_folder(root, {'C': 2})

  with pytest.raises(ValueError, match=r'mixes split folders \(train\) with other folders \(C\)'):
    _load(root, tmp_path)


def test_presplit_folders_used(tmp_path):
  root = tmp_path / 'data'
  _make_folder(root / 'train', {'A': 5, 'B': 6})
  _make_folder(root / 'val', {'A': 2, 'B': 1})
  _make_folder(root / 'test', {'A': 1, 'B': 3})

  dataset = _load(root, tmp_path)

  assert dataset.class_names == ['A', 'B']
  assert {name: len(split) for name, split in dataset.splits.items()} == {
      'train': 11,
      'val': 3,
      'test': 4,
  }
  assert all(p.startswith('val/') for p in dataset.splits['val'].paths)
  np.testing.assert_array_equal(dataset.splits['test'].labels, [0, 1, 1, 1])
  with pytest.raises(ValueError, match='is already split into the folders train, val, test'):
    _load(root, tmp_path, split_mode='stratified')


def test_class_names_sorted_with_spaces(tmp_path):
  root = _make_folder(
      tmp_path / 'data', {'No cancer': 6, 'breast cancer': 6, 'Prostate': 6}
  )

  dataset = _load(root, tmp_path, split_ratios=(0.5, 0.5))

  assert dataset.class_names == ['No cancer', 'Prostate', 'breast cancer']
  train = dataset.splits['train']
  for path, label in zip(train.paths, train.labels):
    assert path.split('/')[0] == dataset.class_names[label]


def test_hidden_entries_ignored(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 4, 'B': 4})
  _write_png(root / '.ipynb_checkpoints' / 'C' / 'x.png', 1)
  _write_png(root / 'A' / '.hidden.png', 2)
  (root / '.DS_Store').write_bytes(b'\0')

  dataset = _load(root, tmp_path, split_ratios=(0.5, 0.5))

  assert dataset.class_names == ['A', 'B']
  assert len(dataset.manifest) == 8


def test_ingest_sidecars_ignored(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 4, 'B': 4})
  (root / 'A' / 'ptA000_0.json').write_text('{"units": "SUV"}')
  (root / 'A' / 'orphan.json').write_text('{}')

  dataset = _load(root, tmp_path, split_ratios=(0.5, 0.5))

  paths = [row.path for row in dataset.manifest]
  assert 'A/ptA000_0.json' not in paths
  assert 'A/orphan.json' in paths
  assert len(paths) == 9


def test_patients_never_span_splits(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 30, 'B': 30}, images_per_patient=3)
  regex = r'^(pt\w\d+)_'

  dataset = _load(root, tmp_path, split_ratios=(0.6, 0.2, 0.2), patient_ids=regex)

  split_of_patient = {}
  for name, split in dataset.splits.items():
    for patient in split.patient_ids:
      assert split_of_patient.setdefault(patient, name) == name
  assert len(split_of_patient) == 20
  assert {len(split) for split in dataset.splits.values()} == {36, 12}
  with pytest.raises(PatientLeakError, match='patients have images in more than one split'):
    _load(
        root,
        tmp_path,
        split_ratios=(0.6, 0.2, 0.2),
        patient_ids=regex,
        split_mode='per_image_seed_compatible',
    )


def test_seed_compatible_counts(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 23, 'B': 41})

  dataset = _load(root, tmp_path, split_mode='per_image_seed_compatible')

  # int(0.9 * n) train, int(0.05 * n) val, the rest test, per class.
  assert {name: len(split) for name, split in dataset.splits.items()} == {
      'train': 20 + 36,
      'val': 1 + 2,
      'test': 2 + 3,
  }


def test_manifest_roundtrip(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 6, 'B': 6})
  (root / 'A' / 'ptA099_0.png').write_bytes(b'')
  dataset = _load(root, tmp_path, split_ratios=(0.5, 0.5), patient_ids=r'^(pt\w\d+)_')

  path = write_manifest(dataset.manifest, tmp_path / 'run' / 'manifest.csv')

  assert path.read_text().splitlines()[0] == ','.join(MANIFEST_COLUMNS)
  assert read_manifest(path) == dataset.manifest
  assert next(r for r in dataset.manifest if r.path == 'A/ptA099_0.png').status == 'skipped'
  row = next(r for r in read_manifest(path) if r.path == 'A/ptA000_0.png')
  assert row.class_name == 'A'
  assert row.label == 0
  assert row.patient_id == 'ptA000'
  assert len(row.sha256) == 64


def test_manifest_invalid_rejected(tmp_path):
  missing_column = tmp_path / 'missing.csv'
  missing_column.write_text('path,sha256,class\nA/x.png,abc,A\n')
  bad_status = tmp_path / 'status.csv'
  bad_status.write_text(','.join(MANIFEST_COLUMNS) + '\nA/x.png,abc,A,0,train,,maybe,\n')

  with pytest.raises(ValueError, match='lacks the columns label, split, patient_id'):
    read_manifest(missing_column)
  with pytest.raises(ValueError, match="line 2: status 'maybe' is invalid"):
    read_manifest(bad_status)


def test_manifest_mode_reproduces_and_checks(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 12, 'B': 12})
  first = _load(root, tmp_path, split_ratios=(0.5, 0.25, 0.25), seed=5)
  manifest = write_manifest(first.manifest, tmp_path / 'manifest.csv')

  again = _load(root, tmp_path / 'other', manifest=manifest)
  assert _split_paths(again) == _split_paths(first)
  other_seed = _load(root, tmp_path, split_ratios=(0.5, 0.25, 0.25), seed=6)
  assert _split_paths(other_seed) != _split_paths(first)

  _write_png(root / 'A' / 'ptA000_0.png', 12345)
  with pytest.raises(ValueError, match=r'1 files .* differ from manifest .* A/ptA000_0\.png'):
    _load(root, tmp_path, manifest=manifest)
  _write_png(root / 'B' / 'new.png', 4321)
  with pytest.raises(ValueError, match=r'1 files .* are not in manifest .* B/new\.png'):
    _load(root, tmp_path, manifest=manifest)


def test_changed_folder_rebuilt(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 6, 'B': 6})
  first = prepare_class_folder(root, image_size=SIZE, split_ratios=(0.5, 0.5),
                               tfds_data_dir=tmp_path / 'tfds')
  same = prepare_class_folder(root, image_size=SIZE, split_ratios=(0.5, 0.5),
                              tfds_data_dir=tmp_path / 'tfds')
  assert same.builder.data_dir == first.builder.data_dir

  _write_png(root / 'B' / 'ptB999_0.png', 777)
  changed = prepare_class_folder(root, image_size=SIZE, split_ratios=(0.5, 0.5),
                                 tfds_data_dir=tmp_path / 'tfds')

  assert changed.builder.data_dir != first.builder.data_dir
  assert 'B/ptB999_0.png' in {row.path for row in changed.manifest}
  os.utime(root / 'A' / 'ptA000_0.png', ns=(1, 1))
  touched = prepare_class_folder(root, image_size=SIZE, split_ratios=(0.5, 0.5),
                                 tfds_data_dir=tmp_path / 'tfds')
  assert touched.builder.data_dir != changed.builder.data_dir


def test_16bit_precision_through_storage(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 3, 'B': 3})
  ramp = np.linspace(1000, 1100, SIZE * SIZE).reshape(SIZE, SIZE).round().astype(np.uint16)
  Image.fromarray(ramp).save(root / 'A' / 'ramp16.png')

  dataset = _load(root, tmp_path, split_ratios=(0.5, 0.5))

  split = next(s for s in dataset.splits.values() if 'A/ramp16.png' in s.paths)
  image = split.images[split.paths.index('A/ramp16.png')]
  expected = (ramp.astype(np.float64) - 1000) * 255 / 100
  np.testing.assert_allclose(image[..., 0], expected, atol=0.5 / 257)
  assert image.max() == pytest.approx(255.0)


def test_tf_dataset_streams_split(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 8, 'B': 8})
  dataset = _load(root, tmp_path, split_ratios=(0.5, 0.5))
  prepared = dataset.prepared

  batches = list(prepared.tf_dataset('train', batch_size=3, shuffle=True, seed=1))
  repeat = list(prepared.tf_dataset('train', batch_size=3, shuffle=True, seed=1))

  assert [b[0].shape[0] for b in batches] == [3, 3, 2]
  assert batches[0][0].dtype == tf.float32
  assert batches[0][1].dtype == tf.int32
  for (images, labels), (images_again, labels_again) in zip(batches, repeat):
    np.testing.assert_array_equal(images.numpy(), images_again.numpy())
    np.testing.assert_array_equal(labels.numpy(), labels_again.numpy())
  streamed = np.concatenate([b[0].numpy() for b in batches])
  in_memory = dataset.splits['train'].images
  np.testing.assert_allclose(
      np.sort(streamed.sum(axis=(1, 2, 3))), np.sort(in_memory.sum(axis=(1, 2, 3))), rtol=1e-6
  )
  with pytest.raises(ValueError, match="split 'test' does not exist"):
    prepared.tf_dataset('test')


def test_split_without_decodable_class_rejected(tmp_path):
  root = tmp_path / 'data'
  _make_folder(root / 'train', {'A': 3, 'B': 3})
  _make_folder(root / 'val', {'B': 2})
  (root / 'val' / 'A').mkdir()
  (root / 'val' / 'A' / 'broken.png').write_bytes(b'')

  with pytest.raises(ValueError, match="split 'val' .* has no decodable image of class 'A'"):
    _load(root, tmp_path)


def test_small_class_for_ratios_rejected(tmp_path):
  root = _make_folder(tmp_path / 'data', {'A': 3, 'B': 40})

  with pytest.raises(ValueError, match="split 'val' has no images of class 'A' \\('A' has 3 in all splits\\)"):
    _load(root, tmp_path)
