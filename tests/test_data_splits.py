"""Tests of split assignment, patient ids and the leak check, without decoding images."""

import random
from collections import Counter
from pathlib import Path

import pytest

from flax_pet.data.folders import SourceFile
from flax_pet.data.patients import resolve_patient_ids
from flax_pet.data.splits import (
    PatientLeakError,
    check_class_coverage,
    check_no_patient_leak,
    seed_compatible_split,
    stratified_group_split,
    validate_ratios,
)


def _patients(count=60, seed=0):
  """Return (classes, groups): patients with 1 to 5 images each, a third in class A."""
  rng = random.Random(seed)
  classes, groups = [], []
  for patient in range(count):
    class_name = 'A' if patient < count // 3 else 'B'
    for _ in range(rng.randint(1, 5)):
      classes.append(class_name)
      groups.append(f'p{patient:03d}')
  return classes, groups


def test_stratified_per_image_counts():
  classes = ['Cancer'] * 118 + ['No cancer'] * 255
  groups = [str(i) for i in range(len(classes))]

  splits = stratified_group_split(classes, groups, (0.9, 0.05, 0.05), seed=101)

  counts = Counter(zip(classes, splits))
  assert counts[('Cancer', 'train')] == 106
  assert counts[('Cancer', 'val')] == 6
  assert counts[('Cancer', 'test')] == 6
  assert counts[('No cancer', 'train')] == 229
  assert counts[('No cancer', 'val')] == 13
  assert counts[('No cancer', 'test')] == 13


def test_stratified_keeps_patients_together():
  classes, groups = _patients()

  splits = stratified_group_split(classes, groups, (0.6, 0.2, 0.2), seed=3)

  split_of = {}
  for group, split in zip(groups, splits):
    assert split_of.setdefault(group, split) == split
  counts = Counter(zip(classes, splits))
  for class_name in ('A', 'B'):
    total = classes.count(class_name)
    assert abs(counts[(class_name, 'train')] - 0.6 * total) <= 5
    assert abs(counts[(class_name, 'val')] - 0.2 * total) <= 5
    assert abs(counts[(class_name, 'test')] - 0.2 * total) <= 5


def test_stratified_deterministic_and_order_free():
  classes, groups = _patients()

  first = stratified_group_split(classes, groups, (0.6, 0.2, 0.2), seed=3)
  again = stratified_group_split(classes, groups, (0.6, 0.2, 0.2), seed=3)
  reversed_input = stratified_group_split(classes[::-1], groups[::-1], (0.6, 0.2, 0.2), seed=3)
  other_seed = stratified_group_split(classes, groups, (0.6, 0.2, 0.2), seed=4)

  assert first == again
  assert reversed_input[::-1] == first
  assert other_seed != first


def test_stratified_two_ratios_and_zero_ratio():
  classes, groups = _patients()

  two = stratified_group_split(classes, groups, (0.8, 0.2), seed=0)
  zero_test = stratified_group_split(classes, groups, (0.8, 0.2, 0.0), seed=0)

  assert set(two) == {'train', 'val'}
  assert set(zero_test) == {'train', 'val'}


@pytest.mark.parametrize(
    'ratios, message',
    [
        ((0.9, 0.05), 'must sum to 1'),
        ((1.0,), 'give 2 .* or 3'),
        ((1.1, -0.1), 'must be >= 0'),
    ],
)
def test_ratios_invalid(ratios, message):
  with pytest.raises(ValueError, match=message):
    validate_ratios(ratios)


def test_seed_compatible_golden():
  # Expected lists written by splitfolders 0.6.1:
  # splitfolders.ratio(folder, seed=101, ratio=(.9, .05, .05)) on a folder
  # with 23 and 41 files named img_000.png, img_001.png, ...
  names = {
      'Cancer': [f'img_{i:03d}.png' for i in range(23)],
      'No cancer': [f'img_{i:03d}.png' for i in range(41)],
  }

  assignment = seed_compatible_split(names, (0.9, 0.05, 0.05), seed=101)

  def members(class_name, split):
    return sorted(n for (c, n), s in assignment.items() if c == class_name and s == split)

  assert members('Cancer', 'val') == ['img_017.png']
  assert members('Cancer', 'test') == ['img_006.png', 'img_018.png']
  assert members('No cancer', 'val') == ['img_022.png', 'img_029.png']
  assert members('No cancer', 'test') == ['img_012.png', 'img_034.png', 'img_037.png']
  assert len(members('No cancer', 'train')) == 36


def test_seed_compatible_matches_splitfolders(tmp_path):
  splitfolders = pytest.importorskip(
      'splitfolders', reason="split-folders is not installed; pip install -e '.[test]'"
  )
  source = tmp_path / 'source'
  names = {}
  for class_name, count in [('b class', 17), ('A', 29), ('c', 8)]:
    (source / class_name).mkdir(parents=True)
    names[class_name] = [f'{random.Random(count).random():.6f}_{i}.png' for i in range(count)]
    for name in names[class_name]:
      (source / class_name / name).write_bytes(b'x')

  for seed, ratios in [(101, (0.9, 0.05, 0.05)), (7, (0.7, 0.3))]:
    output = tmp_path / f'out_{seed}'
    splitfolders.ratio(str(source), output=str(output), seed=seed, ratio=ratios)
    expected = {
        (path.parent.name, path.name): path.parent.parent.name
        for path in output.glob('*/*/*')
    }
    assert seed_compatible_split(names, ratios, seed) == expected


def test_leak_check_raises():
  split_by_path = {'a/1.png': 'train', 'a/2.png': 'test', 'b/3.png': 'val'}
  patients = {'a/1.png': 'P7', 'a/2.png': 'P7', 'b/3.png': 'P8'}

  with pytest.raises(PatientLeakError, match=r"'P7' in test, train \(a/1.png, a/2.png\)"):
    check_no_patient_leak(split_by_path, patients)
  check_no_patient_leak(split_by_path, {**patients, 'a/2.png': 'P9'})


def test_class_coverage_raises():
  split_by_path = {'A/1.png': 'train', 'B/2.png': 'train', 'B/3.png': 'val'}
  class_by_path = {'A/1.png': 'A', 'B/2.png': 'B', 'B/3.png': 'B'}

  with pytest.raises(ValueError, match="split 'val' has no images of class 'A'"):
    check_class_coverage(split_by_path, class_by_path, ['A', 'B'], ['train', 'val'])


def _files(*paths):
  return [SourceFile(p, p.split('/')[-2], None, 1, 0) for p in paths]


def test_patient_ids_from_regex():
  files = _files('A/pt01_a.png', 'A/pt01_b.png', 'B/pt02_a.png')

  ids = resolve_patient_ids(files, r'^(pt\d+)_')

  assert ids == {'A/pt01_a.png': 'pt01', 'A/pt01_b.png': 'pt01', 'B/pt02_a.png': 'pt02'}
  with pytest.raises(ValueError, match='has no group'):
    resolve_patient_ids(files, r'^pt\d+_')
  with pytest.raises(ValueError, match=r'gives no id for 1 files, e.g. B/pt02_a.png'):
    resolve_patient_ids(files, r'^(pt01)_')


def test_patient_ids_from_csv(tmp_path):
  files = _files('A/x.png', 'B/y.png', 'B/z.png')
  table = tmp_path / 'patients.csv'
  table.write_text('\ufeffFilename,Patient_ID\nx.png,P1\nB/y.png,P2\nz.png,P2\nextra.png,P3\n')

  ids = resolve_patient_ids(files, table)

  assert ids == {'A/x.png': 'P1', 'B/y.png': 'P2', 'B/z.png': 'P2'}
  assert resolve_patient_ids(files, str(table)) == ids


def test_patient_ids_csv_errors(tmp_path):
  files = _files('A/x.png', 'B/x.png')
  no_column = tmp_path / 'no_column.csv'
  no_column.write_text('image,label\nx.png,1\n')
  ambiguous = tmp_path / 'ambiguous.csv'
  ambiguous.write_text('file,patient\nx.png,P1\n')
  incomplete = tmp_path / 'incomplete.csv'
  incomplete.write_text('path,patient_id\nA/x.png,P1\n')

  with pytest.raises(ValueError, match='needs a file column'):
    resolve_patient_ids(files, no_column)
  with pytest.raises(ValueError, match='several folders contain a file of that name'):
    resolve_patient_ids(files, ambiguous)
  with pytest.raises(ValueError, match='has no patient id for 1 files, e.g. B/x.png'):
    resolve_patient_ids(files, incomplete)
  with pytest.raises(FileNotFoundError, match='missing.csv does not exist'):
    resolve_patient_ids(files, Path(tmp_path / 'missing.csv'))
