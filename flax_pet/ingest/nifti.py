"""Read a 3D PET NIfTI file into a canonical volume."""

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from flax_pet.ingest.errors import IngestError
from flax_pet.ingest.volume import PetVolume, lps_affine_from_ras, reorient_to_canonical


def read_nifti(path: Path, values_are_suv: bool = False) -> PetVolume:
  """Read a 3D NIfTI PET volume, with its scl_slope/scl_inter applied.

  NIfTI stores no dose, weight or timing, so SUV cannot be computed from it.
  The caller states whether the values already are body-weight SUV.

  Args:
    path: A .nii or .nii.gz file.
    values_are_suv: Whether the voxel values already are SUVbw (e.g. exported
      by a tool that converted them). Otherwise the units are 'unknown'.

  Returns:
    The volume. Its patient id and series label come from the file name.

  Raises:
    IngestError: if the file cannot be read, is not 3D (a 4D file with one
      volume counts as 3D), or contains NaN or infinite values.
  """
  path = Path(path)
  try:
    image = nib.load(path)
    data = np.asarray(image.get_fdata(dtype=np.float32))
  except (
      OSError,
      EOFError,
      ValueError,
      zlib.error,
      nib.filebasedimages.ImageFileError,
  ) as error:
    raise IngestError(f'{path}: cannot be read as NIfTI: {error}') from None

  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise IngestError(
        f'{path}: expected a 3D volume, got shape {data.shape}. Split 4D '
        '(dynamic) files into one file per frame first.'
    )

  non_finite = int(np.count_nonzero(~np.isfinite(data)))
  if non_finite:
    raise IngestError(
        f'{path}: {non_finite} voxel(s) are NaN or infinite. Replace them (e.g. '
        'with 0 outside the field of view) before ingesting.'
    )

  canonical, spacing, codes = reorient_to_canonical(
      data, lps_affine_from_ras(image.affine), str(path)
  )
  stem = _strip_nifti_suffix(path.name)
  return PetVolume(
      data=canonical,
      spacing_mm=spacing,
      units='SUVbw' if values_are_suv else 'unknown',
      patient_id=stem,
      series_label='nifti',
      source_path=str(path),
      source_format='nifti',
      source_axis_codes=codes,
      provenance={
          'suv_method': (
              'none: the NIfTI values were declared to be SUVbw already'
              if values_are_suv
              else 'none: NIfTI stores no units for voxel values'
          ),
          'affine': 'NIfTI sform if set, else qform (nibabel)',
      },
  )


def _strip_nifti_suffix(name):
  lower = name.lower()
  for suffix in ('.nii.gz', '.nii'):
    if lower.endswith(suffix):
      return name[: -len(suffix)]
  return name
