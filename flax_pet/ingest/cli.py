"""Command line: python -m flax_pet.ingest SRC DST [options]."""

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from flax_pet.ingest.errors import IngestError
from flax_pet.ingest.pipeline import IngestOptions, ingest
from flax_pet.ingest.render import RESAMPLING_METHODS

# Skipped files listed by name in the summary; the rest are counted.
MAX_SKIPPED_LISTED = 10


def build_parser() -> argparse.ArgumentParser:
  """Build the argument parser of the ingest command."""
  parser = argparse.ArgumentParser(
      prog='python -m flax_pet.ingest',
      description=(
          'Convert PET volumes (DICOM series, NIfTI) to 16-bit grayscale PNG '
          'views with JSON sidecars, in body-weight SUV, laid out as '
          'DST/<class>/<patient>_<series>_<view>.png for a class-folder dataset. '
          'Research use only.'
      ),
  )
  parser.add_argument(
      'src', type=Path, help='DICOM folder (searched recursively), DICOM file or NIfTI file.'
  )
  parser.add_argument('dst', type=Path, help='Dataset root folder for the outputs.')
  parser.add_argument(
      '--views',
      nargs='+',
      default=['coronal_mip'],
      metavar='VIEW',
      help=(
          'Views to write: coronal_mip, sagittal_mip, axial_mip, or slices '
          'axial:N, coronal:N, sagittal:N with a 0-based N counted from the '
          'superior, anterior and patient-right side. Default: coronal_mip.'
      ),
  )
  parser.add_argument(
      '--units',
      choices=('suv', 'raw'),
      default='suv',
      help=(
          'suv: convert DICOM to body-weight SUV (an error names any missing '
          'tag). raw: keep the stored units (e.g. BQML) without SUV. Default: suv.'
      ),
  )
  parser.add_argument(
      '--window',
      nargs=2,
      type=float,
      metavar=('LO', 'HI'),
      help=(
          'Values mapped to pixel 0 and 65535, in the output units (e.g. 0 10 '
          'for SUV); values outside are clipped. Default: 0 to each image maximum.'
      ),
  )
  parser.add_argument(
      '--class-name',
      help='Class folder name under DST (spaces allowed). Default: unlabeled.',
  )
  parser.add_argument(
      '--invert',
      action='store_true',
      help='Store high values dark (as published MIPs are shown). Default: off.',
  )
  parser.add_argument(
      '--resample',
      choices=RESAMPLING_METHODS,
      default='linear',
      help=(
          'Interpolation that makes pixels square along the coarser axis. '
          'nearest keeps every source value exactly. Default: linear.'
      ),
  )
  parser.add_argument(
      '--nifti-suv',
      action='store_true',
      help=(
          'Declare that NIfTI inputs already contain body-weight SUV. NIfTI '
          'stores no dose or weight, so with --units suv NIfTI inputs need it.'
      ),
  )
  parser.add_argument(
      '--include',
      metavar='PATTERN',
      help=(
          "Read only files whose name matches this shell pattern, e.g. "
          "'*_pt.nii.gz' to leave out masks. Default: every file."
      ),
  )
  parser.add_argument(
      '--overwrite', action='store_true', help='Replace existing outputs of the same name.'
  )
  parser.add_argument('--verbose', action='store_true', help='Log debug messages.')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Run the ingest command; return the process exit status.

  Returns:
    0 on success, 1 if the input or options were invalid. Then the message
    goes to stderr and no output is left behind. For arguments that argparse
    rejects, it raises SystemExit with status 2 instead.
  """
  args = build_parser().parse_args(argv)

  options = IngestOptions(
      views=args.views,
      units=args.units,
      window=tuple(args.window) if args.window else None,
      invert=args.invert,
      class_name=args.class_name,
      resample=args.resample,
      nifti_values_are_suv=args.nifti_suv,
      overwrite=args.overwrite,
      include=args.include,
  )
  try:
    with _log_to_stderr(args.verbose):
      summary = ingest(args.src, args.dst, options)
  except IngestError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  except OSError as error:
    print(f'error: cannot read or write a file: {error}', file=sys.stderr)
    return 1

  print(
      f'Wrote {len(summary.images)} image(s) and their JSON sidecars from '
      f'{summary.volumes} volume(s) to {summary.output_dir}'
  )
  if summary.skipped:
    print(f'Skipped {len(summary.skipped)} file(s) that are not PET inputs:')
    for path, reason in summary.skipped[:MAX_SKIPPED_LISTED]:
      print(f'  {path}: {reason}')
    if len(summary.skipped) > MAX_SKIPPED_LISTED:
      print(f'  ... and {len(summary.skipped) - MAX_SKIPPED_LISTED} more')
  return 0


@contextlib.contextmanager
def _log_to_stderr(verbose):
  """Print flax_pet's log records to stderr for the duration of a command.

  The handler sits on the 'flax_pet' logger and does not propagate, so a root
  handler installed by an imported library (absl installs one when Orbax is
  imported) does not print every line twice. Settings are restored on exit,
  so calling main() in-process leaves logging as it was.
  """
  package_logger = logging.getLogger('flax_pet')
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter('%(levelname)s %(name)s: %(message)s'))
  saved_level, saved_propagate = package_logger.level, package_logger.propagate

  package_logger.addHandler(handler)
  package_logger.setLevel(logging.DEBUG if verbose else logging.INFO)
  package_logger.propagate = False
  try:
    yield
  finally:
    package_logger.removeHandler(handler)
    package_logger.setLevel(saved_level)
    package_logger.propagate = saved_propagate
