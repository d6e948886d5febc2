"""Ingest PET volumes from a source path into a class folder of 2D images."""

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from flax_pet.ingest.dicom import read_dicom_series
from flax_pet.ingest.errors import IngestError
from flax_pet.ingest.nifti import read_nifti
from flax_pet.ingest.render import (
    RESAMPLING_METHODS,
    parse_view,
    render_view,
    window_to_uint16,
)
from flax_pet.ingest.sources import scan_source
from flax_pet.ingest.writer import (
    UNLABELED_CLASS,
    StagedWriter,
    build_sidecar,
    encode_png16,
    output_stem,
    validate_class_name,
)

logger = logging.getLogger(__name__)

UNITS = ('suv', 'raw')


@dataclasses.dataclass
class IngestOptions:
  """Settings of an ingest run: the views to render and their pixel mapping.

  Attributes:
    views: View names, e.g. 'coronal_mip', 'sagittal_mip', 'axial:40' (see
      `render.parse_view`).
    units: 'suv' converts DICOM to body-weight SUV, 'raw' keeps stored units.
    window: (lo, hi) in the output units mapped to 0..65535; None maps 0 to
      each image's maximum.
    invert: Store high values dark, as published MIPs are displayed.
    class_name: Class folder name; None writes to 'unlabeled'.
    resample: 'linear' or 'nearest' interpolation to make pixels square.
    nifti_values_are_suv: Declare that NIfTI inputs already contain SUVbw.
      Required for NIfTI inputs with units 'suv', because NIfTI stores no
      dose, weight or timing.
    overwrite: Replace existing outputs of the same name.
    include: Shell pattern that file names under a source folder must match,
      e.g. '*_pt.nii.gz'; None reads every file.
  """

  views: Sequence[str] = ('coronal_mip',)
  units: str = 'suv'
  window: tuple[float, float] | None = None
  invert: bool = False
  class_name: str | None = None
  resample: str = 'linear'
  nifti_values_are_suv: bool = False
  overwrite: bool = False
  include: str | None = None


@dataclasses.dataclass
class IngestSummary:
  """Result of an ingest run: the images written and the files skipped.

  Attributes:
    output_dir: The class folder the images went to.
    images: Paths of the PNGs written (each has a .json sidecar).
    volumes: Number of volumes (DICOM series and NIfTI files) ingested.
    skipped: (file, reason) for each file that was not a PET input.
  """

  output_dir: Path
  images: list[Path]
  volumes: int
  skipped: list[tuple[Path, str]]


def ingest(src: Path, dst: Path, options: IngestOptions | None = None) -> IngestSummary:
  """Render every PET volume under `src` to PNG + JSON in `dst/<class>/`.

  All inputs are read and rendered before any output appears in `dst`, so an
  error leaves `dst` as it was. A `dst` folder that the failed run created is
  removed again.

  Args:
    src: A folder (searched recursively), a DICOM file or a NIfTI file.
    dst: The dataset root; images go to `dst/<class name or 'unlabeled'>/`.
    options: Views, units, window and the rest; defaults if None.

  Returns:
    The paths written and the files skipped.

  Raises:
    IngestError: on invalid options, an empty or unusable source, a volume
      that cannot be read or converted (the message names the file and the
      tag or value), or an output that already exists.
  """
  options = options or IngestOptions()
  src, dst = Path(src), Path(dst)
  views = _validate_options(options)
  class_name = validate_class_name(options.class_name or UNLABELED_CLASS)

  inventory = scan_source(src, exclude=dst, include=options.include)
  if inventory.nifti_files and options.units == 'suv' and not options.nifti_values_are_suv:
    raise IngestError(
        f'{inventory.nifti_files[0]}: NIfTI stores no dose, weight or timing, so '
        'SUV cannot be computed from it. If the values already are body-weight '
        'SUV, declare it (--nifti-suv); otherwise ingest with units "raw" '
        '(--units raw).'
    )

  jobs = [('dicom', uid, files) for uid, files in inventory.dicom_series.items()]
  jobs += [('nifti', str(path), [path]) for path in inventory.nifti_files]

  with StagedWriter(dst, class_name, overwrite=options.overwrite) as writer:
    for number, (kind, name, files) in enumerate(jobs, start=1):
      if kind == 'dicom':
        source = str(files[0].parent)
        logger.info(
            '[%d/%d] Reading DICOM series %s (%d files) in %s',
            number, len(jobs), name, len(files), source,
        )
        volume = read_dicom_series(files, units=options.units, source=source)
      else:
        logger.info('[%d/%d] Reading NIfTI %s', number, len(jobs), name)
        volume = read_nifti(files[0], values_are_suv=options.nifti_values_are_suv)

      logger.info(
          'Volume %s %s: shape %s, spacing %s mm, %s max %.4g',
          volume.patient_id,
          volume.series_label,
          volume.data.shape,
          tuple(round(s, 3) for s in volume.spacing_mm),
          volume.units,
          float(volume.data.max()),
      )
      for view in views:
        rendered = render_view(volume, view, resample=options.resample)
        try:
          pixels, window = window_to_uint16(rendered.image, options.window, options.invert)
        except IngestError as error:
          raise IngestError(f'{volume.source_path}, view {view.text}: {error}') from None
        stem = output_stem(volume, view.name)
        sidecar = build_sidecar(volume, rendered, f'{stem}.png', window, options.invert)
        writer.add(stem, encode_png16(pixels), sidecar)

    images = writer.commit()

  logger.info(
      'Wrote %d image(s) with sidecars from %d volume(s) to %s; skipped %d file(s)',
      len(images), len(jobs), writer.class_dir, len(inventory.skipped),
  )
  return IngestSummary(
      output_dir=writer.class_dir,
      images=images,
      volumes=len(jobs),
      skipped=inventory.skipped,
  )


def _validate_options(options):
  """Check options before any file is read; return the parsed views."""
  if options.units not in UNITS:
    raise IngestError(f'units must be one of {UNITS}, got {options.units!r}.')
  if options.resample not in RESAMPLING_METHODS:
    raise IngestError(
        f'resample must be one of {RESAMPLING_METHODS}, got {options.resample!r}.'
    )
  if options.window is not None:
    low, high = options.window
    if not high > low:
      raise IngestError(
          f'Invalid window {low} {high}: the upper bound must be above the lower.'
      )
  if not options.views:
    raise IngestError('No views requested; pass at least one, e.g. coronal_mip.')

  views = [parse_view(text) for text in options.views]
  names = [view.name for view in views]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise IngestError(f'Views requested more than once: {duplicates}.')
  return views
