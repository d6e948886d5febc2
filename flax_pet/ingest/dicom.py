"""Read one PET DICOM series into a canonical volume, in SUVbw or stored units."""

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from flax_pet.ingest import suv
from flax_pet.ingest.errors import IngestError
from flax_pet.ingest.volume import PetVolume, reorient_to_canonical

logger = logging.getLogger(__name__)

# Image orientation cosines of two slices may differ by this much and still
# count as the same orientation (rounding in the stored decimal strings).
ORIENTATION_TOLERANCE = 1e-4

# Consecutive slice positions may differ from the median slice step by this
# fraction of it before the series counts as irregular (e.g. a missing slice).
SLICE_STEP_RELATIVE_TOLERANCE = 0.01

# Slice origins may drift sideways (perpendicular to the slice normal) by this
# fraction of a pixel before the stack counts as sheared (e.g. gantry tilt).
MAX_IN_PLANE_DRIFT_PIXELS = 0.1


def read_dicom_series(
    files: Sequence[Path], units: str = 'suv', source: str | None = None
) -> PetVolume:
  """Read the slices of one PET series into a canonical volume.

  Slices are sorted by ImagePositionPatient along the slice normal. Each
  slice gets its own RescaleSlope and RescaleIntercept, and pydicom applies
  PixelRepresentation (signed or unsigned storage) when it decodes pixels.

  Args:
    files: The DICOM files of exactly one series (one SeriesInstanceUID).
    units: 'suv' to convert to body-weight SUV, 'raw' to keep the modality
      values (stored values after rescale) in the series' Units.
    source: Name of the series in messages and the sidecar; defaults to the
      folder of the first file.

  Returns:
    The volume, its spacing, and its provenance.

  Raises:
    IngestError: if the files do not form one consistent, regularly spaced,
      axis-aligned stack, if a tag needed for geometry or SUV is missing (the
      message names it and the file), or if pixel data cannot be decoded.
  """
  if units not in ('suv', 'raw'):
    raise IngestError(f'units must be "suv" or "raw", got {units!r}.')
  if not files:
    raise IngestError('No DICOM files given for the series.')
  source = source or str(Path(files[0]).parent)

  datasets = [_read_dataset(Path(path)) for path in files]
  series_uids = {str(ds.get('SeriesInstanceUID', '')) for ds in datasets}
  if len(series_uids) != 1:
    raise IngestError(
        f'{source}: the files belong to {len(series_uids)} series '
        f'({sorted(series_uids)}); pass the files of one SeriesInstanceUID.'
    )

  geometry = _slice_geometry(datasets, files, source)
  order = geometry['order']
  datasets = [datasets[i] for i in order]
  files = [Path(files[i]) for i in order]

  modality_values = np.stack(
      [_modality_values(ds, path) for ds, path in zip(datasets, files)]
  )

  provenance = {}
  suv_scale_factor = None
  stored_units = _text(datasets[0].get('Units')) or 'unknown'
  if units == 'suv':
    headers = [
        suv.suv_header_from_dataset(ds, str(path))
        for ds, path in zip(datasets, files)
    ]
    result = suv.compute_suv_bw_factors(headers)
    factors = np.asarray(result.factors, dtype=np.float64)
    modality_values = modality_values * factors[:, None, None]

    if np.all(factors == factors[0]):
      suv_scale_factor = float(factors[0])
    else:
      suv_scale_factor = [float(f) for f in factors]
    volume_units = 'SUVbw'
    provenance['suv_method'] = result.method
    provenance['stored_units'] = stored_units
    if result.scan_datetime is not None:
      provenance['scan_reference_time'] = result.scan_datetime.isoformat()
      provenance['injection_time'] = result.injection_datetime.isoformat()
      provenance['decay_time_s'] = result.decay_time_s
  else:
    volume_units = stored_units
    provenance['suv_method'] = 'none: values are in the stored units (units "raw")'

  data, spacing, codes = reorient_to_canonical(
      modality_values.astype(np.float32), geometry['affine'], source
  )

  first = datasets[0]
  series_uid = series_uids.pop()
  patient_id = _text(first.get('PatientID'))
  if not patient_id:
    logger.warning(
        '%s: PatientID (0010,0020) is empty, so outputs are named "unknown-patient"',
        source,
    )
    patient_id = 'unknown-patient'
  provenance['slice_count'] = len(datasets)
  provenance['modality_lut'] = 'per-slice RescaleSlope and RescaleIntercept'

  return PetVolume(
      data=data,
      spacing_mm=spacing,
      units=volume_units,
      patient_id=patient_id,
      series_label=_series_label(first, series_uid),
      source_path=source,
      source_format='dicom',
      source_axis_codes=codes,
      series_instance_uid=series_uid,
      suv_scale_factor=suv_scale_factor,
      provenance=provenance,
  )


def _read_dataset(path):
  try:
    ds = pydicom.dcmread(path)
  except (pydicom.errors.InvalidDicomError, OSError) as error:
    raise IngestError(f'{path}: cannot be read as DICOM: {error}') from None
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  if frames != 1:
    raise IngestError(
        f'{path}: multi-frame DICOM ({frames} frames) is not supported. '
        'Convert it to single-frame PET Image Storage slices first.'
    )
  return ds


def _slice_geometry(datasets, files, source):
  """Sort order and LPS voxel-to-patient matrix of a stack of slices."""
  first, first_path = datasets[0], files[0]
  for keyword in ('ImageOrientationPatient', 'ImagePositionPatient', 'PixelSpacing'):
    for ds, path in zip(datasets, files):
      if ds.get(keyword) is None:
        raise IngestError(
            f'{path}: {keyword} {suv.format_tag(keyword)} is missing, so the slice cannot '
            'be placed in the volume.'
        )

  orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
  pixel_spacing = np.asarray(first.PixelSpacing, dtype=np.float64)
  shape = (first.Rows, first.Columns)
  for ds, path in zip(datasets[1:], files[1:]):
    if (ds.Rows, ds.Columns) != shape:
      raise IngestError(
          f'{source}: slice {path} is {ds.Rows}x{ds.Columns} but {first_path} is '
          f'{shape[0]}x{shape[1]}; all slices of a series must have the same size.'
      )
    other = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    if np.max(np.abs(other - orientation)) > ORIENTATION_TOLERANCE:
      raise IngestError(
          f'{source}: slice {path} has ImageOrientationPatient {other.tolist()} '
          f'but {first_path} has {orientation.tolist()}; all slices must share '
          'one orientation.'
      )
    other_spacing = np.asarray(ds.PixelSpacing, dtype=np.float64)
    if not np.allclose(other_spacing, pixel_spacing, rtol=1e-4):
      raise IngestError(
          f'{source}: slice {path} has PixelSpacing {other_spacing.tolist()} but '
          f'{first_path} has {pixel_spacing.tolist()}; all slices must share it.'
      )

  row_cosine = orientation[:3]
  column_cosine = orientation[3:]
  normal = np.cross(row_cosine, column_cosine)
  positions = np.asarray(
      [np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets]
  )
  distances = positions @ normal
  order = np.argsort(distances, kind='stable')
  positions = positions[order]
  distances = distances[order]

  if len(datasets) > 1:
    slice_step = _check_slice_steps(distances, [files[i] for i in order], source)
    drift = positions - positions[0] - np.outer(distances - distances[0], normal)
    max_drift = float(np.max(np.linalg.norm(drift, axis=1)))
    if max_drift > MAX_IN_PLANE_DRIFT_PIXELS * float(np.min(pixel_spacing)):
      raise IngestError(
          f'{source}: slice origins drift {max_drift:.3f} mm sideways from the '
          'slice normal (a tilted or sheared stack), which is not supported.'
      )
    slice_vector = normal * slice_step
  else:
    thickness = first.get('SliceThickness')
    if thickness is None or not float(thickness) > 0:
      raise IngestError(
          f'{first_path}: a single-slice series needs SliceThickness (0018,0050) '
          'for its spacing along the slice normal, and it is missing.'
      )
    slice_vector = normal * float(thickness)

  # pixel_array[r, c]: the row index r moves along the column cosine by
  # PixelSpacing[0], the column index c along the row cosine by PixelSpacing[1].
  affine = np.eye(4)
  affine[:3, 0] = slice_vector
  affine[:3, 1] = column_cosine * pixel_spacing[0]
  affine[:3, 2] = row_cosine * pixel_spacing[1]
  affine[:3, 3] = positions[0]
  return {'order': order, 'affine': affine}


def _check_slice_steps(distances, files, source):
  """Median slice step in mm, after checking that the steps are regular."""
  steps = np.diff(distances)
  duplicates = np.flatnonzero(steps < 1e-3)
  if duplicates.size:
    i = int(duplicates[0])
    positions = len(np.unique(np.round(distances, 3)))
    raise IngestError(
        f'{source}: {files[i]} and {files[i + 1]} lie at the same slice position '
        f'{distances[i]:.3f} mm ({len(distances)} files at {positions} distinct '
        'positions). A dynamic or gated series stores several frames per position '
        'and is not supported; pass the files of one frame.'
    )

  median_step = float(np.median(steps))
  deviation = np.abs(steps - median_step)
  irregular = np.flatnonzero(deviation > SLICE_STEP_RELATIVE_TOLERANCE * median_step)
  if irregular.size:
    i = int(irregular[0])
    raise IngestError(
        f'{source}: the step between slices {files[i]} and {files[i + 1]} is '
        f'{steps[i]:.3f} mm but the median step is {median_step:.3f} mm '
        f'({irregular.size} irregular step(s)). Slices may be missing; the series '
        'must be regularly spaced.'
    )
  return median_step


def _modality_values(ds, path):
  """Stored pixel values after this slice's RescaleSlope and RescaleIntercept."""
  for keyword in ('RescaleSlope', 'RescaleIntercept'):
    if ds.get(keyword) is None:
      raise IngestError(
          f'{path}: {keyword} {suv.format_tag(keyword)} is missing, but PET Image '
          'Storage requires it to convert stored values to the Units.'
      )
  try:
    stored = ds.pixel_array
  except Exception as error:  # pydicom raises several types for codec problems.
    raise IngestError(
        f'{path}: pixel data cannot be decoded ({type(error).__name__}: {error}). '
        f'Transfer syntax {ds.file_meta.get("TransferSyntaxUID", "unknown")} may '
        'need a pydicom codec plugin such as pylibjpeg.'
    ) from None
  if stored.ndim != 2:
    raise IngestError(f'{path}: expected one 2D grayscale frame, got shape {stored.shape}.')
  return stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _series_label(ds, series_uid):
  """SeriesNumber plus a hash of the SeriesInstanceUID: readable and unique."""
  digest = hashlib.sha1(series_uid.encode('ascii', errors='replace')).hexdigest()[:8]
  number = _text(ds.get('SeriesNumber'))
  return f'{number}-{digest}' if number else digest


def _text(value):
  if value is None:
    return ''
  return str(value).strip()
