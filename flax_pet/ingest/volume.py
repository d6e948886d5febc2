"""A PET volume in one canonical orientation, with the facts an output records.

Every reader returns a `PetVolume` whose array axes are, in order:

  0: superior to inferior (head first),
  1: anterior to posterior,
  2: patient right to patient left.

So `data[k]` is an axial slice as radiologists display it: viewed from the
feet, anterior up, patient right on the image left. A maximum over axis 1 is
a coronal projection viewed from the front. A maximum over axis 2 is a
sagittal projection with anterior on the left.
"""

import dataclasses
import math
from typing import Any

import numpy as np

from flax_pet.ingest.errors import IngestError

CANONICAL_AXES = ('superior->inferior', 'anterior->posterior', 'right->left')

# An array axis may deviate this much from the nearest patient axis before the
# volume counts as oblique. Projections of an oblique volume along array axes
# would mix anatomical directions, so they are rejected.
MAX_OBLIQUE_ANGLE_DEG = 1.0

# DICOM patient coordinates (LPS): +x is patient left, +y posterior,
# +z superior. Letters name the direction in which an index increases.
_LPS_POSITIVE = 'LPS'
_LPS_NEGATIVE = 'RAI'


@dataclasses.dataclass
class PetVolume:
  """A PET volume in canonical orientation and its provenance.

  Attributes:
    data: float32 array (superior->inferior, anterior->posterior,
      right->left), in `units`.
    spacing_mm: Voxel spacing along the three canonical axes, in mm.
    units: 'SUVbw' after SUV conversion, else the stored units (e.g. 'BQML',
      'CNTS', or 'unknown' for NIfTI).
    patient_id: Patient identifier from the header (DICOM) or file name (NIfTI).
    series_label: Short, file-name-safe series identifier, unique per series.
    source_path: The file or folder the volume was read from.
    source_format: 'dicom' or 'nifti'.
    source_axis_codes: Direction in which each array axis of the source
      increases, as LPS letters (e.g. 'LPS' or 'LPI'), in source axis order.
    series_instance_uid: DICOM SeriesInstanceUID, None for NIfTI.
    suv_scale_factor: The SUVbw factor applied, None if no conversion was
      made. Where slices have different factors (Philips private scale
      factors), a list with one per slice, ordered along the slice normal.
    provenance: Further facts for the sidecar, e.g. the SUV method and times.
  """

  data: np.ndarray
  spacing_mm: tuple[float, float, float]
  units: str
  patient_id: str
  series_label: str
  source_path: str
  source_format: str
  source_axis_codes: str
  series_instance_uid: str | None = None
  suv_scale_factor: float | list[float] | None = None
  provenance: dict[str, Any] = dataclasses.field(default_factory=dict)


def reorient_to_canonical(
    data: np.ndarray, affine_lps: np.ndarray, source: str
) -> tuple[np.ndarray, tuple[float, float, float], str]:
  """Permute and flip a 3D array into the canonical orientation.

  No interpolation happens: only axis permutations and flips, so voxel values
  are unchanged.

  Args:
    data: 3D array indexed by voxel (i, j, k) in source order.
    affine_lps: 4x4 matrix mapping (i, j, k, 1) to LPS patient coordinates
      in mm.
    source: The file or folder name, used in error messages.

  Returns:
    The reoriented array, its spacing along the canonical axes in mm, and the
    source axis codes (e.g. 'LPS').

  Raises:
    IngestError: if the volume is not 3D, has a zero-length axis direction,
      is oblique by more than MAX_OBLIQUE_ANGLE_DEG, or two axes point along
      the same patient axis.
  """
  if data.ndim != 3:
    raise IngestError(f'{source}: expected a 3D volume, got shape {data.shape}.')

  directions = np.asarray(affine_lps, dtype=np.float64)[:3, :3]
  spacings = np.linalg.norm(directions, axis=0)
  if np.any(spacings <= 0):
    raise IngestError(
        f'{source}: the voxel-to-patient matrix has a zero column '
        f'({directions.tolist()}), so voxel spacing is undefined.'
    )
  unit_directions = directions / spacings

  patient_axis_of = []
  codes = ''
  for axis in range(3):
    column = unit_directions[:, axis]
    patient_axis = int(np.argmax(np.abs(column)))
    angle_deg = math.degrees(math.acos(min(1.0, abs(column[patient_axis]))))
    if angle_deg > MAX_OBLIQUE_ANGLE_DEG:
      raise IngestError(
          f'{source}: array axis {axis} points along {np.round(column, 4).tolist()} '
          f'(LPS), {angle_deg:.2f} degrees from the nearest patient axis. Oblique '
          f'volumes (more than {MAX_OBLIQUE_ANGLE_DEG} degrees) are not supported '
          'because projections would mix anatomical directions. Resample the '
          'volume to an axis-aligned grid first.'
      )
    patient_axis_of.append(patient_axis)
    positive = column[patient_axis] > 0
    codes += (_LPS_POSITIVE if positive else _LPS_NEGATIVE)[patient_axis]

  if len(set(patient_axis_of)) != 3:
    raise IngestError(
        f'{source}: two array axes point along the same patient axis (codes '
        f'{codes!r}), so the voxel-to-patient matrix is degenerate.'
    )

  # Canonical axis 0 runs along -z, axis 1 along +y, axis 2 along +x.
  targets = ((2, -1), (1, 1), (0, 1))
  order = [patient_axis_of.index(patient_axis) for patient_axis, _ in targets]
  canonical = np.transpose(data, order)
  for canonical_axis, (patient_axis, target_sign) in enumerate(targets):
    source_axis = order[canonical_axis]
    sign = np.sign(unit_directions[patient_axis, source_axis])
    if sign != target_sign:
      canonical = np.flip(canonical, axis=canonical_axis)

  spacing = tuple(float(spacings[axis]) for axis in order)
  return np.ascontiguousarray(canonical), spacing, codes


def lps_affine_from_ras(affine_ras: np.ndarray) -> np.ndarray:
  """Convert a NIfTI (RAS+) voxel-to-world matrix to DICOM's LPS convention."""
  return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)
