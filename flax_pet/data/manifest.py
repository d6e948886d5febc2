"""The manifest: one CSV row per source file with its hash, class, split and status.

A manifest records which file went into which split, the sha256 of its bytes,
and whether it was used ('ok') or left out ('skipped', with the reason). It is
enough to audit a run and to rebuild the same splits later with
`load_class_folder(..., split_mode='manifest', manifest=path)`.

Columns:
  path        path relative to the data root, '/' separated
  sha256      sha256 of the file's bytes (empty if the file could not be read)
  class       class folder name
  label       index of the class in the sorted class names
  split       train, val or test; empty for a file that no split takes
  patient_id  patient id, empty when patients are unknown
  status      ok or skipped
  reason      why a file was skipped, empty for ok
"""

import csv
import dataclasses
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

MANIFEST_COLUMNS = (
    'path',
    'sha256',
    'class',
    'label',
    'split',
    'patient_id',
    'status',
    'reason',
)
STATUS_OK = 'ok'
STATUS_SKIPPED = 'skipped'


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  """One source file of a dataset; the module docstring describes the fields."""

  path: str
  sha256: str
  class_name: str
  label: int
  split: str
  patient_id: str
  status: str
  reason: str = ''

  @property
  def ok(self) -> bool:
    return self.status == STATUS_OK

  def to_record(self) -> dict[str, str | int]:
    """Return the row as a dict keyed by MANIFEST_COLUMNS."""
    return {
        'path': self.path,
        'sha256': self.sha256,
        'class': self.class_name,
        'label': self.label,
        'split': self.split,
        'patient_id': self.patient_id,
        'status': self.status,
        'reason': self.reason,
    }

  @classmethod
  def from_record(cls, record: dict) -> 'ManifestRow':
    """Build a row from a dict keyed by MANIFEST_COLUMNS."""
    return cls(
        path=record['path'],
        sha256=record['sha256'],
        class_name=record['class'],
        label=int(record['label']),
        split=record['split'],
        patient_id=record['patient_id'],
        status=record['status'],
        reason=record['reason'],
    )


def write_manifest(rows: Iterable[ManifestRow], path: str | os.PathLike) -> Path:
  """Write rows to a CSV file, replacing it atomically.

  Args:
    rows: manifest rows, written in the given order.
    path: the CSV file; missing parent folders are created.

  Returns:
    The path written.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')
  with partial.open('w', newline='', encoding='utf-8') as handle:
    writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow(row.to_record())
  os.replace(partial, path)
  return path


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
  """Read a manifest CSV file written by `write_manifest`.

  Args:
    path: the CSV file.

  Returns:
    The rows in file order.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if a column is missing, a label is not an integer, a status
      is unknown, or a path occurs twice. The message names the file and line.
  """
  path = Path(path)
  rows = []
  with path.open(newline='', encoding='utf-8') as handle:
    reader = csv.DictReader(handle)
    missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(
          f'manifest {path} lacks the columns {", ".join(missing)}; expected '
          f'{", ".join(MANIFEST_COLUMNS)}'
      )

    seen = set()
    for record in reader:
      line = reader.line_num
      try:
        row = ManifestRow.from_record(record)
      except ValueError as error:
        raise ValueError(f'manifest {path} line {line}: invalid label: {error}') from error
      if row.status not in (STATUS_OK, STATUS_SKIPPED):
        raise ValueError(
            f'manifest {path} line {line}: status {row.status!r} is invalid; '
            f'expected {STATUS_OK!r} or {STATUS_SKIPPED!r}'
        )
      if row.path in seen:
        raise ValueError(f'manifest {path} line {line}: path {row.path!r} occurs twice')
      seen.add(row.path)
      rows.append(row)

  return rows


def sha256_of_file(path: str | os.PathLike) -> str:
  """Return the sha256 hex digest of a file's bytes.

  Raises:
    OSError: if the file cannot be read.
  """
  digest = hashlib.sha256()
  with open(path, 'rb') as handle:
    for block in iter(lambda: handle.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()
