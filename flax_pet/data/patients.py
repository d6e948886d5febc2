"""Patient ids of image files, from a CSV file, a regular expression or a mapping.

Splits group images by patient so that no patient contributes images to two
splits. Every file must get an id: a file without one is an error, because
treating it as its own patient could put a patient's images in two splits.
"""

import csv
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from flax_pet.data.folders import SourceFile

logger = logging.getLogger(__name__)

# Accepted CSV header names, in order of preference (compared in lower case).
FILE_COLUMNS = ('path', 'file', 'filename', 'file_name', 'image')
PATIENT_COLUMNS = ('patient_id', 'patient', 'subject_id', 'subject')

PatientIdSource = str | os.PathLike | Mapping[str, str] | None

_MAX_LISTED = 5


def resolve_patient_ids(
    files: Sequence[SourceFile], source: PatientIdSource
) -> dict[str, str] | None:
  """Return the patient id of every file, keyed by its path relative to the data root.

  Args:
    files: the files to label.
    source: None when patients are unknown. A `Path`, or a str that ends in
      '.csv', names a CSV file with a file column (one of FILE_COLUMNS) and a
      patient column (one of PATIENT_COLUMNS). The file column contains either
      the path relative to the data root or the bare file name. Any other str
      is a regular expression searched in each file name, whose first group is
      the patient id. A mapping from relative path or file name to patient id
      is used as it is.

  Returns:
    {relative path: patient id}, or None when source is None.

  Raises:
    FileNotFoundError: if the CSV file does not exist.
    ValueError: if the regular expression has no group, the CSV file lacks a
      file or patient column, or a file gets no id or an empty one.
  """
  if source is None:
    return None

  if isinstance(source, Mapping):
    return _ids_from_mapping(files, source, 'the patient id mapping')

  if isinstance(source, os.PathLike) or str(source).lower().endswith('.csv'):
    return _ids_from_csv(files, Path(source))

  return _ids_from_regex(files, str(source))


def describe_patient_id_source(source: PatientIdSource) -> str:
  """Return a short text that names where patient ids come from, for logs and configs."""
  if source is None:
    return 'none (each image is its own patient)'
  if isinstance(source, Mapping):
    return f'mapping of {len(source)} files'
  if isinstance(source, os.PathLike) or str(source).lower().endswith('.csv'):
    return f'CSV file {Path(source).expanduser().resolve()}'
  return f'regular expression {str(source)!r} over the file name'


def _ids_from_regex(files: Sequence[SourceFile], pattern: str) -> dict[str, str]:
  try:
    regex = re.compile(pattern)
  except re.error as error:
    raise ValueError(f'patient id regular expression {pattern!r} is invalid: {error}') from error
  if regex.groups < 1:
    raise ValueError(
        f'patient id regular expression {pattern!r} has no group; put the '
        r"patient id in parentheses, e.g. r'^(\w+?)_\d+\.png$'"
    )

  ids, unmatched = {}, []
  for file in files:
    match = regex.search(file.name)
    if match is None or not match.group(1):
      unmatched.append(file.path)
    else:
      ids[file.path] = match.group(1)

  if unmatched:
    raise ValueError(
        f'patient id regular expression {pattern!r} gives no id for '
        f'{len(unmatched)} files, e.g. {_listing(unmatched)}; change the '
        'expression so that its first group matches every file name'
    )
  return ids


def _ids_from_csv(files: Sequence[SourceFile], csv_path: Path) -> dict[str, str]:
  csv_path = csv_path.expanduser()
  if not csv_path.is_file():
    raise FileNotFoundError(f'patient id CSV file {csv_path} does not exist')

  # utf-8-sig drops the byte order mark that spreadsheet programs write.
  with csv_path.open(newline='', encoding='utf-8-sig') as handle:
    reader = csv.DictReader(handle)
    header = {name.strip().lower(): name for name in reader.fieldnames or ()}
    file_column = next((header[c] for c in FILE_COLUMNS if c in header), None)
    patient_column = next((header[c] for c in PATIENT_COLUMNS if c in header), None)
    if file_column is None or patient_column is None:
      raise ValueError(
          f'patient id CSV file {csv_path} needs a file column (one of '
          f'{", ".join(FILE_COLUMNS)}) and a patient column (one of '
          f'{", ".join(PATIENT_COLUMNS)}); its header is {reader.fieldnames}'
      )
    mapping = {}
    for row in reader:
      key = (row[file_column] or '').strip()
      if key:
        mapping[key] = (row[patient_column] or '').strip()

  return _ids_from_mapping(files, mapping, f'patient id CSV file {csv_path}')


def _ids_from_mapping(
    files: Sequence[SourceFile], mapping: Mapping[str, str], origin: str
) -> dict[str, str]:
  """Look each file up by relative path, then by bare file name."""
  name_counts = Counter(file.name for file in files)
  ids, missing, ambiguous, empty = {}, [], [], []
  used_keys = set()

  for file in files:
    if file.path in mapping:
      patient = mapping[file.path]
      used_keys.add(file.path)
    elif file.name in mapping:
      if name_counts[file.name] > 1:
        ambiguous.append(file.path)
        continue
      patient = mapping[file.name]
      used_keys.add(file.name)
    else:
      missing.append(file.path)
      continue

    patient = str(patient).strip()
    if not patient:
      empty.append(file.path)
    ids[file.path] = patient

  if missing:
    raise ValueError(
        f'{origin} has no patient id for {len(missing)} files, e.g. '
        f'{_listing(missing)}; add a row for every image'
    )
  if ambiguous:
    raise ValueError(
        f'{origin} names files by bare file name, but several folders contain '
        f'a file of that name, e.g. {_listing(ambiguous)}; use paths relative '
        'to the data root for those files'
    )
  if empty:
    raise ValueError(
        f'{origin} has an empty patient id for {len(empty)} files, e.g. '
        f'{_listing(empty)}'
    )

  unused = len(mapping) - len(used_keys)
  if unused:
    logger.info('%s lists %d files that are not in the data folder', origin, unused)
  return ids


def _listing(paths: Sequence[str]) -> str:
  listed = ', '.join(paths[:_MAX_LISTED])
  return listed + (', ...' if len(paths) > _MAX_LISTED else '')
