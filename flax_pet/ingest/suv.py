"""Body-weight SUV scale factors from PET DICOM headers.

The rules follow the QIBA/UW PET SUV pseudo-code as implemented by the
MIT-licensed calculate-suv project (Precision Imaging Metrics, 2020):

- Units BQML: SUVbw = activity concentration [Bq/mL] * weight [g] / decayed
  dose [Bq], where the dose decays from the injection time to the scan
  reference time if DecayCorrection is START, and does not decay if it is
  ADMIN (the scanner already corrected the image to the injection time).
- Units CNTS (Philips): the private SUV Scale Factor (7053,1000) converts
  rescaled values to SUVbw directly. Without it, the private Activity
  Concentration Scale Factor (7053,1009) converts to Bq/mL and the BQML rule
  applies on top.
- Units GML: the values already are SUVbw (factor 1).

The scan reference time is the series date/time, unless the series date/time
is after the earliest acquisition date/time of the series (a series
re-created after the scan). Then it is the GE private post-injection
date/time (0009,100D) if present, else the earliest acquisition date/time.
The injection time is RadiopharmaceuticalStartDateTime, else
RadiopharmaceuticalStartTime on the SeriesDate.

Every factor multiplies modality values, i.e. stored values after the
per-slice RescaleSlope and RescaleIntercept.
"""

import dataclasses
import datetime
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword

from flax_pet.ingest.errors import IngestError

logger = logging.getLogger(__name__)

# Philips and GE private tags used by the method, with their private creators.
PHILIPS_PRIVATE_CREATOR = 'Philips PET Private Group'
PHILIPS_SUV_SCALE_FACTOR_ELEMENT = 0x00  # (7053,xx00)
PHILIPS_ACTIVITY_CONCENTRATION_SCALE_FACTOR_ELEMENT = 0x09  # (7053,xx09)
GE_PRIVATE_CREATOR = 'GEMS_PETD_01'
GE_POST_INJECTION_DATETIME_ELEMENT = 0x0D  # (0009,xx0D)

SUPPORTED_UNITS = ('BQML', 'CNTS', 'GML')
SUPPORTED_DECAY_CORRECTIONS = ('START', 'ADMIN')

# Header keys whose values must be equal in every instance of a series.
_SERIES_LEVEL_FIELDS = (
    'units',
    'decay_correction',
    'corrected_image',
    'series_date',
    'series_time',
    'patient_weight_kg',
    'radionuclide_total_dose_bq',
    'radionuclide_half_life_s',
    'radiopharmaceutical_start_time',
    'radiopharmaceutical_start_datetime',
)

_DATASET_KEYWORDS = (
    'Units',
    'DecayCorrection',
    'CorrectedImage',
    'SeriesDate',
    'SeriesTime',
    'AcquisitionDate',
    'AcquisitionTime',
    'PatientWeight',
)
_RADIOPHARMACEUTICAL_KEYWORDS = (
    'RadionuclideTotalDose',
    'RadionuclideHalfLife',
    'RadiopharmaceuticalStartTime',
    'RadiopharmaceuticalStartDateTime',
)

_FIELD_TAGS = {
    'units': 'Units',
    'decay_correction': 'DecayCorrection',
    'corrected_image': 'CorrectedImage',
    'series_date': 'SeriesDate',
    'series_time': 'SeriesTime',
    'acquisition_date': 'AcquisitionDate',
    'acquisition_time': 'AcquisitionTime',
    'patient_weight_kg': 'PatientWeight',
    'radionuclide_total_dose_bq': 'RadionuclideTotalDose',
    'radionuclide_half_life_s': 'RadionuclideHalfLife',
    'radiopharmaceutical_start_time': 'RadiopharmaceuticalStartTime',
    'radiopharmaceutical_start_datetime': 'RadiopharmaceuticalStartDateTime',
}


@dataclasses.dataclass(frozen=True)
class SuvHeader:
  """Header values of one PET instance that its body-weight SUV depends on.

  Field names are the DICOM keywords in snake case, with units where the
  keyword implies them. `source` names the file (or header record) in errors.
  """

  source: str
  units: str | None = None
  decay_correction: str | None = None
  corrected_image: tuple[str, ...] | None = None
  series_date: str | None = None
  series_time: str | None = None
  acquisition_date: str | None = None
  acquisition_time: str | None = None
  patient_weight_kg: float | None = None
  radionuclide_total_dose_bq: float | None = None
  radionuclide_half_life_s: float | None = None
  radiopharmaceutical_start_time: str | None = None
  radiopharmaceutical_start_datetime: str | None = None
  philips_suv_scale_factor: float | None = None
  philips_activity_concentration_scale_factor: float | None = None
  ge_post_injection_datetime: str | None = None


@dataclasses.dataclass(frozen=True)
class SuvFactors:
  """Body-weight SUV scale factors of a series and how they were derived.

  Attributes:
    factors: One factor per instance, in the order given. Multiply modality
      values (after RescaleSlope/RescaleIntercept) by it to get SUVbw.
    method: How the factors were computed, for the output sidecar.
    scan_datetime: Scan reference time, when the BQML rule was used.
    injection_datetime: Injection time, when the BQML rule was used.
    decay_time_s: Seconds from injection to scan reference time by which the
      dose was decayed (0 for DecayCorrection ADMIN), when the BQML rule was
      used.
  """

  factors: tuple[float, ...]
  method: str
  scan_datetime: datetime.datetime | None = None
  injection_datetime: datetime.datetime | None = None
  decay_time_s: float | None = None


def suv_header_from_dataset(ds: pydicom.Dataset, source: str) -> SuvHeader:
  """Extract the SUV-relevant header values of one PET DICOM instance.

  Args:
    ds: The instance, pixel data not needed.
    source: The file name, used in error messages.

  Returns:
    The header values, None where a tag is absent or empty.

  Raises:
    IngestError: if a numeric tag does not contain a number.
  """
  values = {keyword: ds.get(keyword) for keyword in _DATASET_KEYWORDS}

  # Dose, half-life and injection time sit in the first item of the
  # RadiopharmaceuticalInformationSequence (0054,0016).
  sequence = ds.get('RadiopharmaceuticalInformationSequence')
  if sequence:
    for keyword in _RADIOPHARMACEUTICAL_KEYWORDS:
      values[keyword] = sequence[0].get(keyword)

  values['PhilipsSUVScaleFactor'] = _private_value(
      ds, 0x7053, PHILIPS_PRIVATE_CREATOR, PHILIPS_SUV_SCALE_FACTOR_ELEMENT
  )
  values['PhilipsActivityConcentrationScaleFactor'] = _private_value(
      ds,
      0x7053,
      PHILIPS_PRIVATE_CREATOR,
      PHILIPS_ACTIVITY_CONCENTRATION_SCALE_FACTOR_ELEMENT,
  )
  values['GEPrivatePostInjectionDateTime'] = _private_value(
      ds, 0x0009, GE_PRIVATE_CREATOR, GE_POST_INJECTION_DATETIME_ELEMENT
  )
  return _header_from_values(values, source)


def suv_header_from_mapping(record: Mapping[str, Any], source: str) -> SuvHeader:
  """Build a header from one record of calculate-suv's JSON instance format.

  The record uses DICOM keywords (`SeriesTime`, `PatientWeight`, ...) and a
  `PhilipsPETPrivateGroup` object with `SUVScaleFactor` and
  `ActivityConcentrationScaleFactor`, plus an optional
  `GEPrivatePostInjectionDateTime`.

  Args:
    record: One instance's header values.
    source: A name for the record, used in error messages.

  Returns:
    The header values, None where a key is absent or empty.

  Raises:
    IngestError: if a numeric value is not a number.
  """
  values = dict(record)
  philips = record.get('PhilipsPETPrivateGroup') or {}
  values['PhilipsSUVScaleFactor'] = philips.get('SUVScaleFactor')
  values['PhilipsActivityConcentrationScaleFactor'] = philips.get(
      'ActivityConcentrationScaleFactor'
  )
  return _header_from_values(values, source)


def compute_suv_bw_factors(headers: Sequence[SuvHeader]) -> SuvFactors:
  """Compute the body-weight SUV scale factor of each instance of one series.

  Args:
    headers: The instances of one PET series, in any order.

  Returns:
    One factor per header, in the same order, and how they were derived.

  Raises:
    IngestError: if a tag that the method needs is missing or invalid (the
      message names the tag and the file), if the instances disagree on
      series-level values, or if the decay time is negative.
  """
  if not headers:
    raise IngestError('No PET instances given to compute SUV factors from.')

  first = headers[0]
  _require(first, 'units')
  units = first.units.upper()
  if units not in SUPPORTED_UNITS:
    raise IngestError(
        f'{first.source}: Units {format_tag("Units")} is {first.units!r}, but body-weight '
        f'SUV needs {", ".join(SUPPORTED_UNITS)}. Ingest with units "raw" '
        '(--units raw) to keep the stored values.'
    )

  _require(first, 'corrected_image')
  missing_corrections = [c for c in ('ATTN', 'DECY') if c not in first.corrected_image]
  if missing_corrections:
    raise IngestError(
        f'{first.source}: CorrectedImage {format_tag("CorrectedImage")} is '
        f'{list(first.corrected_image)} and lacks {missing_corrections}. SUV needs '
        'attenuation- and decay-corrected images. Ingest with units "raw" '
        '(--units raw) to keep the stored values.'
    )

  _check_single_series(headers)

  if units == 'GML':
    return SuvFactors(
        factors=tuple(1.0 for _ in headers),
        method='Units GML: values are already body-weight SUV (factor 1)',
    )

  if units == 'CNTS':
    return _philips_counts_factors(headers)

  return _bqml_factors(headers)


def parse_dicom_date(text: str, keyword: str, source: str) -> datetime.date:
  """Parse a DICOM DA value (YYYYMMDD, or the older YYYY.MM.DD).

  Raises:
    IngestError: naming the tag and file if the value is not a valid date.
  """
  match = re.fullmatch(r'(\d{4})\.?(\d{2})\.?(\d{2})', text.strip())
  if match is None:
    raise IngestError(
        f'{source}: {keyword} {format_tag(keyword)} is {text!r}, not a DICOM date YYYYMMDD.'
    )
  try:
    return datetime.date(*(int(g) for g in match.groups()))
  except ValueError as error:
    raise IngestError(f'{source}: {keyword} {text!r} is invalid: {error}.') from None


def parse_dicom_time(text: str, keyword: str, source: str) -> datetime.time:
  """Parse a DICOM TM value (HH[MM[SS[.FFFFFF]]], colons of the older form allowed).

  Raises:
    IngestError: naming the tag and file if the value is not a valid time.
  """
  match = re.fullmatch(
      r'(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?', text.strip()
  )
  if match is None:
    raise IngestError(
        f'{source}: {keyword} {format_tag(keyword)} is {text!r}, not a DICOM time '
        'HHMMSS.FFFFFF.'
    )
  hour, minute, second, fraction = match.groups()
  microsecond = int((fraction or '').ljust(6, '0'))
  try:
    return datetime.time(int(hour), int(minute or 0), int(second or 0), microsecond)
  except ValueError as error:
    raise IngestError(f'{source}: {keyword} {text!r} is invalid: {error}.') from None


def parse_dicom_datetime(text: str, keyword: str, source: str) -> datetime.datetime:
  """Parse a DICOM DT value (YYYYMMDDHHMMSS.FFFFFF with optional &ZZXX offset).

  Returns:
    A naive datetime. NOTE: a UTC offset in the value is dropped, so the value
    is taken in the same local time as the DA/TM values it is compared with.

  Raises:
    IngestError: naming the tag and file if the value is not a valid date-time.
  """
  match = re.fullmatch(
      r'(\d{4})(\d{2})(\d{2})(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?',
      text.strip(),
  )
  if match is None:
    raise IngestError(
        f'{source}: {keyword} {format_tag(keyword)} is {text!r}, not a DICOM date-time '
        'YYYYMMDDHHMMSS.FFFFFF.'
    )
  year, month, day, hour, minute, second, fraction, _ = match.groups()
  microsecond = int((fraction or '').ljust(6, '0'))
  try:
    return datetime.datetime(
        int(year),
        int(month),
        int(day),
        int(hour or 0),
        int(minute or 0),
        int(second or 0),
        microsecond,
    )
  except ValueError as error:
    raise IngestError(f'{source}: {keyword} {text!r} is invalid: {error}.') from None


def _header_from_values(values, source):
  """SuvHeader from a dict keyed by DICOM keyword (and the private names above)."""
  corrected_image = values.get('CorrectedImage')
  if corrected_image is not None:
    corrected_image = _as_string_tuple(corrected_image)

  def number(keyword):
    return _as_float(values.get(keyword), keyword, source)

  def text(keyword):
    return _as_string(values.get(keyword))

  return SuvHeader(
      source=source,
      units=text('Units'),
      decay_correction=text('DecayCorrection'),
      corrected_image=corrected_image,
      series_date=text('SeriesDate'),
      series_time=text('SeriesTime'),
      acquisition_date=text('AcquisitionDate'),
      acquisition_time=text('AcquisitionTime'),
      patient_weight_kg=number('PatientWeight'),
      radionuclide_total_dose_bq=number('RadionuclideTotalDose'),
      radionuclide_half_life_s=number('RadionuclideHalfLife'),
      radiopharmaceutical_start_time=text('RadiopharmaceuticalStartTime'),
      radiopharmaceutical_start_datetime=text('RadiopharmaceuticalStartDateTime'),
      philips_suv_scale_factor=number('PhilipsSUVScaleFactor'),
      philips_activity_concentration_scale_factor=number(
          'PhilipsActivityConcentrationScaleFactor'
      ),
      ge_post_injection_datetime=text('GEPrivatePostInjectionDateTime'),
  )


def _bqml_factors(headers, activity_concentration_scales=None):
  """Factors of the BQML rule, optionally times a per-instance Bq/mL scale."""
  first = headers[0]
  for field in (
      'decay_correction',
      'patient_weight_kg',
      'radionuclide_total_dose_bq',
      'radionuclide_half_life_s',
  ):
    _require(first, field)

  decay_correction = first.decay_correction.upper()
  if decay_correction not in SUPPORTED_DECAY_CORRECTIONS:
    raise IngestError(
        f'{first.source}: DecayCorrection {format_tag("DecayCorrection")} is '
        f'{first.decay_correction!r}, but body-weight SUV supports '
        f'{", ".join(SUPPORTED_DECAY_CORRECTIONS)}. Ingest with units "raw" '
        '(--units raw) to keep the stored values.'
    )
  for field in (
      'patient_weight_kg',
      'radionuclide_total_dose_bq',
      'radionuclide_half_life_s',
  ):
    value = getattr(first, field)
    if not value > 0:
      keyword = _FIELD_TAGS[field]
      raise IngestError(
          f'{first.source}: {keyword} {format_tag(keyword)} is {value}, but body-weight '
          'SUV needs a positive value. Correct the header, or ingest with units '
          '"raw" (--units raw) to keep the stored values.'
      )

  scan_datetime = _scan_reference_datetime(headers)
  injection_datetime = _injection_datetime(first)
  elapsed_s = (scan_datetime - injection_datetime).total_seconds()
  if elapsed_s < 0:
    raise IngestError(
        f'{first.source}: the injection time {injection_datetime.isoformat()} is '
        f'{-elapsed_s:.3f} s after the scan reference time {scan_datetime.isoformat()}. '
        'Check RadiopharmaceuticalStartTime/StartDateTime (an injection before '
        'midnight needs RadiopharmaceuticalStartDateTime), or ingest with units '
        '"raw" (--units raw).'
    )

  # With DecayCorrection ADMIN the image is already corrected to the injection
  # time, so the dose is compared undecayed.
  decay_time_s = elapsed_s if decay_correction == 'START' else 0.0
  decayed_dose_bq = first.radionuclide_total_dose_bq * math.pow(
      2.0, -decay_time_s / first.radionuclide_half_life_s
  )
  factor = first.patient_weight_kg * 1000.0 / decayed_dose_bq

  method = (
      'Units BQML: SUVbw = Bq/mL * weight [g] / (dose * 2^(-decay time / half-life)), '
      f'DecayCorrection {decay_correction}'
  )
  factors = tuple(factor for _ in headers)
  if activity_concentration_scales is not None:
    factors = tuple(scale * factor for scale in activity_concentration_scales)
    method = (
        'Units CNTS: Philips Activity Concentration Scale Factor (7053,1009) to '
        f'Bq/mL, then {method}'
    )

  return SuvFactors(
      factors=factors,
      method=method,
      scan_datetime=scan_datetime,
      injection_datetime=injection_datetime,
      decay_time_s=decay_time_s,
  )


def _philips_counts_factors(headers):
  """Factors for Units CNTS from the Philips private scale factors."""
  suv_scales = [h.philips_suv_scale_factor for h in headers]
  if all(scale is not None and scale != 0 for scale in suv_scales):
    return SuvFactors(
        factors=tuple(suv_scales),
        method='Units CNTS: Philips private SUV Scale Factor (7053,1000)',
    )

  activity_scales = [h.philips_activity_concentration_scale_factor for h in headers]
  if all(scale is not None and scale != 0 for scale in activity_scales):
    return _bqml_factors(headers, activity_concentration_scales=activity_scales)

  missing = next(
      h for h, s, a in zip(headers, suv_scales, activity_scales) if not s and not a
  )
  raise IngestError(
      f'{missing.source}: Units is CNTS but neither the Philips private SUV Scale '
      'Factor (7053,1000) nor the Activity Concentration Scale Factor (7053,1009) '
      f'of the private group "{PHILIPS_PRIVATE_CREATOR}" is present and non-zero '
      'in every instance, so counts cannot be converted to SUV. Ingest with units '
      '"raw" (--units raw) to keep the stored values.'
  )


def _scan_reference_datetime(headers):
  """Scan reference time: series time unless it is after the earliest acquisition."""
  first = headers[0]
  _require(first, 'series_date')
  _require(first, 'series_time')
  series_datetime = datetime.datetime.combine(
      parse_dicom_date(first.series_date, 'SeriesDate', first.source),
      parse_dicom_time(first.series_time, 'SeriesTime', first.source),
  )

  acquisition_datetimes = []
  for header in headers:
    _require(header, 'acquisition_date')
    _require(header, 'acquisition_time')
    acquisition_datetimes.append(
        datetime.datetime.combine(
            parse_dicom_date(header.acquisition_date, 'AcquisitionDate', header.source),
            parse_dicom_time(header.acquisition_time, 'AcquisitionTime', header.source),
        )
    )
  earliest_acquisition = min(acquisition_datetimes)

  if series_datetime <= earliest_acquisition:
    return series_datetime

  # The series was (re)created after acquisition started, e.g. a later
  # reconstruction, so SeriesTime is not the scan start.
  # NOTE: no GE header with (0009,100D) was available to test this branch.
  if first.ge_post_injection_datetime:
    logger.info(
        '%s: SeriesTime is after AcquisitionTime, so the GE private '
        'post-injection date/time (0009,100D) is the scan reference time',
        first.source,
    )
    return parse_dicom_datetime(
        first.ge_post_injection_datetime, 'GE post-injection date/time', first.source
    )

  # NOTE: QIBA back-computes the scan start of Siemens multi-bed series from
  # FrameReferenceTime and ActualFrameDuration. Like calculate-suv, this takes
  # the earliest acquisition time instead.
  logger.info(
      '%s: SeriesTime %s is after the earliest AcquisitionTime %s, so the '
      'earliest acquisition time is the scan reference time',
      first.source,
      series_datetime.isoformat(),
      earliest_acquisition.isoformat(),
  )
  return earliest_acquisition


def _injection_datetime(header):
  """Injection time from the start date/time, else start time on the series date."""
  if header.radiopharmaceutical_start_datetime:
    return parse_dicom_datetime(
        header.radiopharmaceutical_start_datetime,
        'RadiopharmaceuticalStartDateTime',
        header.source,
    )

  if not header.radiopharmaceutical_start_time:
    raise IngestError(
        f'{header.source}: both RadiopharmaceuticalStartDateTime '
        f'{format_tag("RadiopharmaceuticalStartDateTime")} and RadiopharmaceuticalStartTime '
        f'{format_tag("RadiopharmaceuticalStartTime")} are missing from the '
        'RadiopharmaceuticalInformationSequence (0054,0016), so the injection time '
        'is unknown. Add one, or ingest with units "raw" (--units raw) to keep the '
        'stored values.'
    )

  # NOTE: without a start date the injection is taken on the SeriesDate, as the
  # QIBA method does, so an injection before midnight for a scan after
  # midnight gives a negative decay time and an error.
  _require(header, 'series_date')
  return datetime.datetime.combine(
      parse_dicom_date(header.series_date, 'SeriesDate', header.source),
      parse_dicom_time(
          header.radiopharmaceutical_start_time,
          'RadiopharmaceuticalStartTime',
          header.source,
      ),
  )


def _check_single_series(headers):
  first = headers[0]
  for header in headers[1:]:
    for field in _SERIES_LEVEL_FIELDS:
      if getattr(header, field) != getattr(first, field):
        keyword = _FIELD_TAGS[field]
        raise IngestError(
            f'{keyword} {format_tag(keyword)} differs within one series: '
            f'{getattr(first, field)!r} in {first.source} but '
            f'{getattr(header, field)!r} in {header.source}. All instances of a '
            'series must share it. Split or correct the series.'
        )


def _require(header, field):
  value = getattr(header, field)
  if value is None or value == '' or value == ():
    keyword = _FIELD_TAGS[field]
    raise IngestError(
        f'{header.source}: {keyword} {format_tag(keyword)} is missing or empty, and '
        'body-weight SUV needs it. Add the tag, or ingest with units "raw" '
        '(--units raw) to keep the stored values.'
    )


def format_tag(keyword: str) -> str:
  """Format the tag of a DICOM keyword as (gggg,eeee) for messages, '' if unknown."""
  tag = tag_for_keyword(keyword)
  if tag is None:
    return ''
  return f'({tag >> 16:04X},{tag & 0xFFFF:04X})'


def _private_value(ds, group, creator, element_offset):
  """Value of a private tag, or None if its block or element is absent."""
  try:
    block = ds.private_block(group, creator)
  except KeyError:
    return None
  if element_offset not in block:
    return None
  return block[element_offset].value


def _as_string(value):
  if value is None:
    return None
  if isinstance(value, bytes):
    value = value.decode('ascii', errors='replace')
  text = str(value).strip().strip('\x00').strip()
  return text or None


def _as_string_tuple(value):
  if isinstance(value, str):
    return tuple(part.strip() for part in value.split('\\') if part.strip())
  return tuple(str(part).strip() for part in value)


def _as_float(value, keyword, source):
  """Float of a DS/IS/number/bytes value, None if absent or empty."""
  if isinstance(value, pydicom.multival.MultiValue):
    value = value[0] if len(value) else None
  text = _as_string(value) if isinstance(value, (str, bytes)) else value
  if text is None:
    return None
  try:
    return float(text)
  except (TypeError, ValueError):
    raise IngestError(
        f'{source}: {keyword} is {text!r}, not a number. Correct the header, or '
        'ingest with units "raw" (--units raw) to keep the stored values.'
    ) from None
