"""Body-weight SUV factors: published vendor headers and real ACRIN DICOM slices."""

import dataclasses
import json
import math

import numpy as np
import pydicom
import pytest

from flax_pet.ingest import (
    IngestError,
    compute_suv_bw_factors,
    read_dicom_series,
    suv_header_from_dataset,
    suv_header_from_mapping,
)
from flax_pet.ingest.suv import parse_dicom_datetime, parse_dicom_time

# The eight header sets published with calculate-suv (MIT), one per scanner case.
HEADER_FILES = [
    'SIEMENS-instances.json',
    'GE_MEDICAL_AND_BQML-instances.json',
    'PHILIPS_BQML-instances.json',
    'PHILIPS_CNTS_AND_BQML_SUV-instances.json',
    'PHILIPS_CNTS_AND_SUV-instances.json',
    'BQML_AC_DT_lessThan_S_DT_SIEMENS-instances.json',
    'CPS_AND_BQML_AC_DT_-_S_DT-instances.json',
    'RADIOPHARM_DATETIME_UNDEFINED-instances.json',
]


def _headers(data_dir, name):
  records = json.loads((data_dir / 'suv-headers' / name).read_text())
  return [suv_header_from_mapping(r, f'{name}[{i}]') for i, r in enumerate(records)]


@pytest.fixture(scope='module')
def expected_factors(data_dir):
  return json.loads((data_dir / 'suv-headers' / 'expected-suvbw-factors.json').read_text())


@pytest.fixture(scope='module')
def siemens_headers(data_dir):
  return _headers(data_dir, 'SIEMENS-instances.json')


@pytest.mark.parametrize('name', HEADER_FILES)
def test_suv_factor_matches_published(data_dir, expected_factors, name):
  result = compute_suv_bw_factors(_headers(data_dir, name))

  assert len(result.factors) == 3
  assert result.factors[0] == pytest.approx(expected_factors[name], rel=1e-6)


def test_suv_factor_expected_file_lists_all(expected_factors):
  assert sorted(k for k in expected_factors if not k.startswith('_')) == sorted(HEADER_FILES)


def test_suv_acquisition_before_series_uses_acquisition(data_dir):
  # SeriesTime 13:49:18 is 45 minutes after AcquisitionTime 13:03:48.234.
  result = compute_suv_bw_factors(_headers(data_dir, 'CPS_AND_BQML_AC_DT_-_S_DT-instances.json'))

  assert result.scan_datetime.isoformat() == '2020-12-17T13:03:48.234000'
  assert result.decay_time_s == pytest.approx(3791.234, abs=1e-6)


def test_suv_missing_start_datetime_uses_series_date(data_dir):
  result = compute_suv_bw_factors(
      _headers(data_dir, 'RADIOPHARM_DATETIME_UNDEFINED-instances.json')
  )

  assert result.injection_datetime.isoformat() == '2020-12-17T12:50:00'


def test_suv_philips_counts_use_private_factor(data_dir):
  result = compute_suv_bw_factors(_headers(data_dir, 'PHILIPS_CNTS_AND_SUV-instances.json'))

  assert '(7053,1000)' in result.method
  assert result.factors == (0.000728, 0.000728, 0.000728)


def test_suv_philips_activity_scale_path(data_dir):
  # Without (7053,1000), (7053,1009) converts counts to Bq/mL, then the BQML rule.
  headers = _headers(data_dir, 'PHILIPS_CNTS_AND_BQML_SUV-instances.json')
  headers = [dataclasses.replace(h, philips_suv_scale_factor=None) for h in headers]
  as_bqml = [dataclasses.replace(h, units='BQML') for h in headers]

  result = compute_suv_bw_factors(headers)
  bqml = compute_suv_bw_factors(as_bqml)

  assert '(7053,1009)' in result.method
  assert result.factors[0] == pytest.approx(1.602563 * bqml.factors[0], rel=1e-12)


def test_suv_counts_without_private_tags(data_dir):
  headers = _headers(data_dir, 'PHILIPS_CNTS_AND_SUV-instances.json')
  headers = [dataclasses.replace(h, philips_suv_scale_factor=None) for h in headers]

  with pytest.raises(IngestError, match=r'CNTS.*\(7053,1000\).*\(7053,1009\)'):
    compute_suv_bw_factors(headers)


def test_suv_decay_admin_skips_decay(siemens_headers):
  headers = [dataclasses.replace(h, decay_correction='ADMIN') for h in siemens_headers]

  result = compute_suv_bw_factors(headers)

  assert result.decay_time_s == 0.0
  assert result.factors[0] == pytest.approx(67 * 1000 / 374e6, rel=1e-12)


@pytest.mark.parametrize(
    'field, keyword',
    [
        ('patient_weight_kg', r'PatientWeight \(0010,1030\)'),
        ('radionuclide_total_dose_bq', r'RadionuclideTotalDose \(0018,1074\)'),
        ('radionuclide_half_life_s', r'RadionuclideHalfLife \(0018,1075\)'),
        ('decay_correction', r'DecayCorrection \(0054,1102\)'),
        ('units', r'Units \(0054,1001\)'),
        ('series_time', r'SeriesTime \(0008,0031\)'),
        ('acquisition_time', r'AcquisitionTime \(0008,0032\)'),
        ('corrected_image', r'CorrectedImage \(0028,0051\)'),
    ],
)
def test_suv_missing_tag_named(siemens_headers, field, keyword):
  headers = [dataclasses.replace(h, **{field: None}) for h in siemens_headers]

  with pytest.raises(IngestError, match=keyword) as raised:
    compute_suv_bw_factors(headers)

  assert 'SIEMENS-instances.json[0]' in str(raised.value)
  assert '--units raw' in str(raised.value)


def test_suv_missing_both_start_times(siemens_headers):
  headers = [
      dataclasses.replace(
          h, radiopharmaceutical_start_time=None, radiopharmaceutical_start_datetime=None
      )
      for h in siemens_headers
  ]

  with pytest.raises(IngestError, match=r'RadiopharmaceuticalStartTime \(0018,1072\)'):
    compute_suv_bw_factors(headers)


def test_suv_zero_weight_rejected(siemens_headers):
  headers = [dataclasses.replace(h, patient_weight_kg=0.0) for h in siemens_headers]

  with pytest.raises(IngestError, match='PatientWeight.*positive'):
    compute_suv_bw_factors(headers)


def test_suv_unsupported_units(siemens_headers):
  headers = [dataclasses.replace(h, units='PROPCPS') for h in siemens_headers]

  with pytest.raises(IngestError, match="Units.*'PROPCPS'"):
    compute_suv_bw_factors(headers)


def test_suv_decay_none_rejected(siemens_headers):
  headers = [dataclasses.replace(h, decay_correction='NONE') for h in siemens_headers]

  with pytest.raises(IngestError, match="DecayCorrection.*'NONE'"):
    compute_suv_bw_factors(headers)


def test_suv_without_attenuation_rejected(siemens_headers):
  headers = [dataclasses.replace(h, corrected_image=('DECY', 'NORM')) for h in siemens_headers]

  with pytest.raises(IngestError, match=r"lacks \['ATTN'\]"):
    compute_suv_bw_factors(headers)


def test_suv_injection_after_scan_rejected(siemens_headers):
  headers = [
      dataclasses.replace(h, radiopharmaceutical_start_datetime='20201217110000')
      for h in siemens_headers
  ]

  with pytest.raises(IngestError, match='after the scan reference time'):
    compute_suv_bw_factors(headers)


def test_suv_mixed_series_rejected(siemens_headers):
  headers = list(siemens_headers)
  headers[2] = dataclasses.replace(headers[2], patient_weight_kg=68.0)

  with pytest.raises(IngestError, match=r'PatientWeight.*differs.*SIEMENS-instances.json\[2\]'):
    compute_suv_bw_factors(headers)


def test_suv_non_numeric_weight(data_dir):
  record = json.loads((data_dir / 'suv-headers' / 'SIEMENS-instances.json').read_text())[0]
  record['PatientWeight'] = 'heavy'

  with pytest.raises(IngestError, match="PatientWeight is 'heavy', not a number"):
    suv_header_from_mapping(record, 'record')


def test_dicom_time_formats():
  assert parse_dicom_time('123514.999995', 'T', 's').microsecond == 999995
  assert parse_dicom_time('084500.5', 'T', 's').microsecond == 500000
  assert parse_dicom_time('0845', 'T', 's').isoformat() == '08:45:00'
  assert parse_dicom_time('08:45:10', 'T', 's').isoformat() == '08:45:10'
  assert parse_dicom_datetime('20201217084500.00 ', 'D', 's').isoformat() == (
      '2020-12-17T08:45:00'
  )
  assert parse_dicom_datetime('20201217084500+0100', 'D', 's').hour == 8
  with pytest.raises(IngestError, match="SeriesTime \\(0008,0031\\) is '25x'"):
    parse_dicom_time('25x', 'SeriesTime', 's')


def test_acrin_whole_body_suvmax(data_dir):
  path = data_dir / 'dicom' / 'acrin-flt-breast' / '1.dcm'
  ds = pydicom.dcmread(path)

  volume = read_dicom_series([path])

  # The stored pixels are signed (PixelRepresentation 1) and pydicom must
  # decode them as such before the rescale.
  assert ds.PixelRepresentation == 1
  assert ds.pixel_array.dtype == np.int16
  assert volume.units == 'SUVbw'
  # Published SUVmax of this slice: about 7.2. Computed by hand: 1327 stored *
  # slope 9.12329 Bq/mL * 69734.4 g / (178340011.6 Bq * 2^(-3976.921 s / 6586.2 s)).
  assert float(volume.data.max()) == pytest.approx(7.1943, abs=1e-3)
  assert volume.provenance['decay_time_s'] == pytest.approx(3976.921, abs=1e-6)


def test_acrin_series_at_injection_time(data_dir):
  # 2.dcm is a DYNAMIC frame whose SeriesTime (11:19:59.109) equals the
  # injection time (11:19:59) to 0.109 s, while its AcquisitionTime is 16
  # minutes later. DecayCorrection START refers to the series start, so the
  # decay time is 0.109 s and the factor is essentially weight / dose; using
  # AcquisitionTime would overstate it by 2^(960 s / 6586.2 s) = 1.106.
  path = data_dir / 'dicom' / 'acrin-flt-breast' / '2.dcm'
  ds = pydicom.dcmread(path)
  half_life = 6586.2

  volume = read_dicom_series([path])

  weight_over_dose = 82.174 * 1000 / 173529998.7793
  assert volume.provenance['decay_time_s'] == pytest.approx(0.109, abs=1e-6)
  assert volume.suv_scale_factor == pytest.approx(
      weight_over_dose * 2 ** (0.109 / half_life), rel=1e-9
  )
  # The scanner's own Decay Factor (0054,1321) confirms the reference: it
  # agrees to 0.1% with the decay over FrameReferenceTime, which counts from
  # the series start. Relative to the acquisition start it would be near 1.
  frame_reference_s = float(ds.FrameReferenceTime) / 1000
  assert float(ds.DecayFactor) == pytest.approx(
      math.pow(2, frame_reference_s / half_life), rel=1e-3
  )


def test_acrin_raw_units_keep_bqml(data_dir):
  path = data_dir / 'dicom' / 'acrin-flt-breast' / '1.dcm'

  volume = read_dicom_series([path], units='raw')

  assert volume.units == 'BQML'
  assert volume.suv_scale_factor is None
  assert float(volume.data.max()) == pytest.approx(1327 * 9.12329, rel=1e-6)


def test_acrin_header_from_dataset(data_dir):
  path = data_dir / 'dicom' / 'acrin-flt-breast' / '1.dcm'

  header = suv_header_from_dataset(pydicom.dcmread(path, stop_before_pixels=True), str(path))

  assert header.units == 'BQML'
  assert header.decay_correction == 'START'
  assert header.patient_weight_kg == pytest.approx(69.7344)
  assert header.radionuclide_half_life_s == pytest.approx(6586.2)
  assert header.radiopharmaceutical_start_time == '141700.000000'
  assert header.radiopharmaceutical_start_datetime is None
  assert header.philips_suv_scale_factor is None
