"""DICOM series: discovery, slice sorting, geometry checks and orientation.

Multi-slice series are built from the real ACRIN slice 1.dcm by changing its
position, orientation, rescale slope and pixels, and saving with pydicom.
"""

import copy
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from flax_pet.ingest import IngestError, read_dicom_series, scan_source

ACRIN_SLICE = Path('dicom') / 'acrin-flt-breast' / '1.dcm'
SLICE_STEP_MM = 3.0
FIRST_Z_MM = -278.5


def write_series(
    folder: Path,
    source: Path,
    z_positions,
    slopes=None,
    orientation=None,
    series_uid=None,
    file_order=None,
    edit=None,
    name_prefix='image',
):
  """Write a PET series derived from one real slice; return its file paths.

  Slice k (in the order of `z_positions`) stores the source pixels with a
  marker value 100 * (k + 1) at row 0, column 0, so tests can tell slices and
  in-plane flips apart. `edit(k, ds)` may change each dataset before saving.
  """
  folder.mkdir(parents=True, exist_ok=True)
  template = pydicom.dcmread(source)
  pixels = template.pixel_array
  series_uid = series_uid or generate_uid()
  file_order = file_order or list(range(len(z_positions)))

  paths = []
  for k, z in enumerate(z_positions):
    ds = copy.deepcopy(template)
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    x, y, _ = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, float(z)]
    ds.SliceLocation = float(z)
    ds.InstanceNumber = k + 1
    if orientation is not None:
      ds.ImageOrientationPatient = list(orientation)
    if slopes is not None:
      ds.RescaleSlope = slopes[k]

    marked = pixels.copy()
    marked[0, 0] = 100 * (k + 1)
    ds.PixelData = marked.astype(np.int16).tobytes()
    if edit is not None:
      edit(k, ds)

    path = folder / f'{name_prefix}{file_order[k]:03d}.dcm'
    ds.save_as(path, enforce_file_format=True)
    paths.append(path)
  return paths


@pytest.fixture(scope='module')
def acrin_slice(data_dir):
  return data_dir / ACRIN_SLICE


def _z_positions(count):
  return [FIRST_Z_MM + SLICE_STEP_MM * k for k in range(count)]


def test_series_sorted_by_position(tmp_path, acrin_slice):
  slopes = [1.0, 1.5, 2.0, 2.5, 3.0]
  # File names in an order unrelated to the positions.
  paths = write_series(
      tmp_path, acrin_slice, _z_positions(5), slopes=slopes, file_order=[3, 0, 4, 1, 2]
  )

  volume = read_dicom_series(sorted(paths), units='raw')

  assert volume.data.shape == (5, 168, 168)
  assert volume.spacing_mm == pytest.approx((SLICE_STEP_MM, 4.07283, 4.07283))
  assert volume.source_axis_codes == 'SPL'
  # Canonical axis 0 starts at the most superior slice (largest z, k = 4).
  for index in range(5):
    k = 4 - index
    assert volume.data[index, 0, 0] == pytest.approx(100 * (k + 1) * slopes[k])


def test_series_per_slice_rescale(tmp_path, acrin_slice):
  slopes = [1.0, 2.0, 4.0]
  paths = write_series(tmp_path, acrin_slice, _z_positions(3), slopes=slopes)
  stored = pydicom.dcmread(acrin_slice).pixel_array.astype(np.float64)

  volume = read_dicom_series(paths, units='raw')

  for index, slope in enumerate(reversed(slopes)):
    assert np.allclose(volume.data[index, 1:, 1:], stored[1:, 1:] * slope)


def test_series_suv_factor_applied(tmp_path, acrin_slice):
  paths = write_series(tmp_path, acrin_slice, _z_positions(3))

  raw = read_dicom_series(paths, units='raw')
  suv = read_dicom_series(paths, units='suv')

  assert suv.units == 'SUVbw'
  assert suv.suv_scale_factor == pytest.approx(0.00059424853, rel=1e-6)
  assert np.allclose(suv.data, raw.data * suv.suv_scale_factor, rtol=1e-6)


def test_series_reversed_rows_reoriented(tmp_path, acrin_slice):
  # Row cosine -x: the column index runs toward patient right, so the
  # canonical (right->left) columns are the stored columns reversed. The slice
  # normal then points inferior.
  paths = write_series(
      tmp_path, acrin_slice, _z_positions(3), orientation=[-1, 0, 0, 0, 1, 0]
  )

  volume = read_dicom_series(paths, units='raw')

  assert volume.source_axis_codes == 'IPR'
  assert volume.data[0, 0, -1] == pytest.approx(300 * 9.12329, rel=1e-6)
  assert volume.data[2, 0, -1] == pytest.approx(100 * 9.12329, rel=1e-6)


def test_series_missing_slice_rejected(tmp_path, acrin_slice):
  z = _z_positions(6)
  del z[3]
  paths = write_series(tmp_path, acrin_slice, z)

  with pytest.raises(IngestError, match=r'6\.000 mm but the median step is 3\.000 mm.*missing'):
    read_dicom_series(paths)


def test_series_duplicate_position_rejected(tmp_path, acrin_slice):
  paths = write_series(tmp_path, acrin_slice, [0.0, 3.0, 3.0, 6.0])

  with pytest.raises(IngestError, match=r'same slice position.*4 files at 3 distinct'):
    read_dicom_series(paths)


def test_series_mixed_orientation_rejected(tmp_path, acrin_slice):
  def tilt_last(k, ds):
    if k == 2:
      ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

  paths = write_series(tmp_path, acrin_slice, _z_positions(3), edit=tilt_last)

  with pytest.raises(IngestError, match='ImageOrientationPatient.*one orientation'):
    read_dicom_series(paths)


def test_series_oblique_rejected(tmp_path, acrin_slice):
  angle = math.radians(10)
  orientation = [math.cos(angle), math.sin(angle), 0, -math.sin(angle), math.cos(angle), 0]
  paths = write_series(tmp_path, acrin_slice, _z_positions(3), orientation=orientation)

  with pytest.raises(IngestError, match=r'10\.00 degrees.*Oblique'):
    read_dicom_series(paths)


def test_series_missing_weight_named(tmp_path, acrin_slice):
  def drop_weight(k, ds):
    if k == 1:
      del ds.PatientWeight

  paths = write_series(tmp_path, acrin_slice, _z_positions(3), edit=drop_weight)

  with pytest.raises(IngestError, match=r'PatientWeight \(0010,1030\)') as raised:
    read_dicom_series(paths)
  assert 'differs within one series' in str(raised.value)


def test_series_missing_weight_everywhere(tmp_path, acrin_slice):
  def drop_weight(k, ds):
    del ds.PatientWeight

  paths = write_series(tmp_path, acrin_slice, _z_positions(2), edit=drop_weight)

  with pytest.raises(IngestError, match=r'PatientWeight \(0010,1030\) is missing') as raised:
    read_dicom_series(paths)
  assert str(paths[0]) in str(raised.value) or str(paths[1]) in str(raised.value)

  volume = read_dicom_series(paths, units='raw')
  assert volume.units == 'BQML'


def test_series_missing_rescale_named(tmp_path, acrin_slice):
  def drop_slope(k, ds):
    if k == 0:
      del ds.RescaleSlope

  paths = write_series(tmp_path, acrin_slice, _z_positions(2), edit=drop_slope)

  with pytest.raises(IngestError, match=r'RescaleSlope \(0028,1053\) is missing'):
    read_dicom_series(paths, units='raw')


def test_series_label_unique(tmp_path, acrin_slice):
  first = read_dicom_series(write_series(tmp_path / 'a', acrin_slice, _z_positions(2)))
  second = read_dicom_series(write_series(tmp_path / 'b', acrin_slice, _z_positions(2)))

  assert first.patient_id == 'ACRIN-FLT-Breast_029'
  assert first.series_label.startswith('102-')
  assert first.series_label != second.series_label


def test_scan_groups_and_skips(tmp_path, acrin_slice):
  # Two series share one folder; only the SeriesInstanceUID separates them.
  series_a = write_series(tmp_path / 'series_a', acrin_slice, _z_positions(3), name_prefix='a')
  series_b = write_series(tmp_path / 'series_a', acrin_slice, _z_positions(2), name_prefix='b')

  def make_ct(k, ds):
    ds.Modality = 'CT'

  write_series(tmp_path / 'ct', acrin_slice, _z_positions(2), edit=make_ct)
  (tmp_path / 'series_a' / 'notes.txt').write_text('acquisition notes')

  inventory = scan_source(tmp_path)

  assert sorted(sorted(files) for files in inventory.dicom_series.values()) == [
      sorted(series_a),
      sorted(series_b),
  ]
  reasons = {path.name if path.parent.name != 'ct' else 'ct': reason for path, reason in inventory.skipped}
  assert reasons['notes.txt'] == 'not a DICOM file'
  assert reasons['ct'].startswith('DICOM modality CT')
  assert len(inventory.skipped) == 3


def test_scan_empty_folder(tmp_path):
  with pytest.raises(IngestError, match='contains no files'):
    scan_source(tmp_path)


def test_scan_missing_source(tmp_path):
  with pytest.raises(IngestError, match='does not exist'):
    scan_source(tmp_path / 'absent')


def test_scan_only_non_dicom(tmp_path):
  (tmp_path / 'readme.txt').write_text('no images here')

  with pytest.raises(IngestError, match='no PET DICOM series.*readme.txt: not a DICOM file'):
    scan_source(tmp_path)


def test_series_philips_private_factor(tmp_path, acrin_slice):
  # Units CNTS with the Philips private SUV Scale Factor (7053,1000), written
  # as a real private block so the reader must find it by its creator.
  def philips_counts(k, ds):
    ds.Units = 'CNTS'
    block = ds.private_block(0x7053, 'Philips PET Private Group', create=True)
    block.add_new(0x00, 'DS', '0.000551')
    block.add_new(0x09, 'DS', '1.602563')

  paths = write_series(tmp_path, acrin_slice, _z_positions(2), edit=philips_counts)

  volume = read_dicom_series(paths)

  assert volume.suv_scale_factor == 0.000551
  assert '(7053,1000)' in volume.provenance['suv_method']


def test_series_counts_without_private_tags(tmp_path, acrin_slice):
  def counts(k, ds):
    ds.Units = 'CNTS'

  paths = write_series(tmp_path, acrin_slice, _z_positions(2), edit=counts)

  with pytest.raises(IngestError, match=r'Units is CNTS.*\(7053,1000\)'):
    read_dicom_series(paths)
