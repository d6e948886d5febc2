"""Find the PET inputs under a source path: DICOM series and NIfTI files."""

import collections
import fnmatch
import dataclasses
import logging
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    MediaStorageDirectoryStorage,
    PositronEmissionTomographyImageStorage,
)

from flax_pet.ingest.errors import IngestError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = ('.nii', '.nii.gz')
PET_MODALITY = 'PT'


@dataclasses.dataclass
class SourceInventory:
  """The PET inputs found under a source path, and what was skipped.

  Attributes:
    dicom_series: Files of each PET DICOM series, keyed by
      SeriesInstanceUID, in discovery order.
    nifti_files: NIfTI files (.nii, .nii.gz).
    skipped: (file, reason) for every file that is not a PET input, e.g. a
      non-DICOM file, a DICOMDIR or a CT series.
  """

  dicom_series: dict[str, list[Path]] = dataclasses.field(default_factory=dict)
  nifti_files: list[Path] = dataclasses.field(default_factory=list)
  skipped: list[tuple[Path, str]] = dataclasses.field(default_factory=list)

  @property
  def volume_count(self) -> int:
    return len(self.dicom_series) + len(self.nifti_files)


def is_nifti_path(path: Path) -> bool:
  """Return whether the file name has a NIfTI suffix (.nii or .nii.gz)."""
  return path.name.lower().endswith(NIFTI_SUFFIXES)


def scan_source(
    src: Path, exclude: Path | None = None, include: str | None = None
) -> SourceInventory:
  """List the PET DICOM series and NIfTI files in a file or folder tree.

  Only DICOM headers are read here (no pixel data). Files that are not PET
  inputs are skipped and listed with the reason, never read as images.

  Args:
    src: A DICOM file, a NIfTI file, or a folder searched recursively.
    exclude: A folder whose files are ignored, e.g. the output folder when it
      lies inside `src`.
    include: A shell pattern (fnmatch) that file names in a folder must match,
      e.g. '*_pt.nii.gz' to leave out masks stored beside the PET volumes.
      Files that do not match are ignored, not listed as skipped.

  Returns:
    The inventory of inputs and skipped files.

  Raises:
    IngestError: if `src` does not exist, contains no files, contains no PET
      input, or a PET DICOM file lacks its SeriesInstanceUID.
  """
  if not src.exists():
    raise IngestError(f'Source {src} does not exist. Pass a DICOM folder or file, or a NIfTI file.')

  if src.is_file():
    files = [src]
  else:
    files = sorted(path for path in src.rglob('*') if path.is_file())
    if exclude is not None:
      excluded = exclude.resolve()
      files = [path for path in files if not path.resolve().is_relative_to(excluded)]
    if not files:
      raise IngestError(
          f'Source {src} contains no files. Pass a folder with PET DICOM series '
          'or NIfTI files.'
      )
    if include is not None:
      matching = [path for path in files if fnmatch.fnmatch(path.name, include)]
      logger.info(
          '%d of %d file(s) in %s match %r', len(matching), len(files), src, include
      )
      if not matching:
        raise IngestError(
            f'No file name in {src} matches the pattern {include!r} '
            f'({len(files)} file(s) present, e.g. {files[0].name}).'
        )
      files = matching

  inventory = SourceInventory()
  series = collections.defaultdict(list)
  for path in files:
    if is_nifti_path(path):
      inventory.nifti_files.append(path)
      continue

    try:
      ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
      inventory.skipped.append((path, 'not a DICOM file'))
      continue

    reason = _reason_to_skip(ds)
    if reason is not None:
      inventory.skipped.append((path, reason))
      continue

    uid = str(ds.get('SeriesInstanceUID', '')).strip()
    if not uid:
      raise IngestError(
          f'{path}: PET DICOM file without SeriesInstanceUID (0020,000E), so '
          'its series cannot be identified. Add the tag or remove the file.'
      )
    series[uid].append(path)
  inventory.dicom_series = dict(series)

  for path, reason in inventory.skipped:
    logger.warning('Skipped %s: %s', path, reason)

  if inventory.volume_count == 0:
    raise IngestError(
        f'Source {src} contains no PET DICOM series and no NIfTI file '
        f'({len(inventory.skipped)} file(s) skipped, e.g. {inventory.skipped[0][0]}: '
        f'{inventory.skipped[0][1]}).'
    )

  logger.info(
      'Found %d PET DICOM series and %d NIfTI file(s) in %s; skipped %d file(s)',
      len(inventory.dicom_series),
      len(inventory.nifti_files),
      src,
      len(inventory.skipped),
  )
  return inventory


def _reason_to_skip(ds):
  """Why a readable DICOM file is not a PET image, or None if it is one."""
  sop_class = ds.get('SOPClassUID') or ds.file_meta.get('MediaStorageSOPClassUID')
  if sop_class == MediaStorageDirectoryStorage:
    return 'DICOMDIR (a media directory, not an image)'

  modality = str(ds.get('Modality', '')).strip()
  if modality != PET_MODALITY:
    return f'DICOM modality {modality or "missing"}, not PET ({PET_MODALITY})'

  if sop_class != PositronEmissionTomographyImageStorage:
    # Modality PT also marks raw data, reports and Enhanced (multi-frame) PET.
    name = getattr(sop_class, 'name', None) or str(sop_class)
    return f'PET DICOM of SOP class {name}; only PET Image Storage is supported'
  return None
