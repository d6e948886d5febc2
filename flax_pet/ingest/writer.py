"""16-bit PNG images with JSON sidecars, written all-or-nothing.

Layout: `DST/<class name>/<patient>_<series>_<view>.png` with
`<same stem>.json` beside it. Outputs go to a hidden staging folder inside
DST first and move into place only when every input has been rendered, so a
failed run leaves no partial outputs behind.
"""

import io
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flax_pet.ingest.errors import IngestError
from flax_pet.ingest.render import (
    PNG_MAX,
    RenderedView,
    uint16_to_values,
)
from flax_pet.ingest.volume import CANONICAL_AXES, PetVolume

# Version of the output format (PNG encoding and sidecar keys). Increase it
# when either changes meaning, so readers can tell outputs apart.
INGEST_VERSION = '1'

UNLABELED_CLASS = 'unlabeled'
SIDECAR_SUFFIX = '.json'
_STAGING_PREFIX = '.ingest-staging-'


def safe_name(text: str) -> str:
  """Replace characters other than letters, digits, '.', '_' and '-' by '-'."""
  cleaned = re.sub(r'[^A-Za-z0-9._-]+', '-', text.strip()).strip('.-')
  return cleaned or 'unnamed'


def validate_class_name(name: str) -> str:
  """Return the class folder name, or raise if it cannot be one folder name.

  Spaces and mixed case are kept, because class-folder datasets take the
  class name from the folder name.

  Raises:
    IngestError: if the name is empty, contains a path separator, or is '.' or
      '..' or starts with '.'.
  """
  if not name or not name.strip():
    raise IngestError('The class name is empty; omit --class-name to use "unlabeled".')
  if '/' in name or '\\' in name or name.startswith('.'):
    raise IngestError(
        f'Invalid class name {name!r}: it must be one folder name, without path '
        'separators and not starting with ".".'
    )
  return name


def output_stem(volume: PetVolume, view_name: str) -> str:
  """Build the output file name without suffix: `<patient>_<series>_<view>`."""
  return f'{safe_name(volume.patient_id)}_{safe_name(volume.series_label)}_{view_name}'


def encode_png16(pixels: np.ndarray) -> bytes:
  """Encode a 2D uint16 array as a 16-bit grayscale PNG."""
  if pixels.dtype != np.uint16 or pixels.ndim != 2:
    raise ValueError(f'expected a 2D uint16 array, got {pixels.dtype} {pixels.shape}')
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  return buffer.getvalue()


def read_png16(path: Path) -> np.ndarray:
  """Read a 16-bit grayscale PNG into a uint16 array.

  Raises:
    IngestError: if the file is not a 16-bit grayscale PNG.
  """
  with Image.open(path) as image:
    if image.mode not in ('I;16', 'I;16B', 'I'):
      raise IngestError(f'{path}: expected a 16-bit grayscale PNG, got mode {image.mode}.')
    return np.asarray(image).astype(np.uint16)


def decode_image(png_path: Path) -> np.ndarray:
  """Read an ingested PNG back into values in its units (e.g. SUVbw).

  Uses the window and inversion recorded in the sidecar beside the PNG.
  Values are exact within half a quantization step for pixels inside the
  window. Values outside it were clipped to its bounds when written.

  Raises:
    IngestError: if the sidecar is missing.
  """
  png_path = Path(png_path)
  sidecar_path = png_path.with_suffix(SIDECAR_SUFFIX)
  if not sidecar_path.is_file():
    raise IngestError(f'{png_path}: its sidecar {sidecar_path.name} is missing.')
  sidecar = json.loads(sidecar_path.read_text())
  return uint16_to_values(
      read_png16(png_path), tuple(sidecar['window']), sidecar['inverted']
  )


def build_sidecar(
    volume: PetVolume,
    rendered: RenderedView,
    image_name: str,
    window: tuple[float, float],
    invert: bool,
) -> dict[str, Any]:
  """Describe one output image: its source, geometry, units and value mapping."""
  low, high = window
  return {
      'ingest_version': INGEST_VERSION,
      'image': image_name,
      'view': rendered.view.text,
      'projection': rendered.description,
      'rows': rendered.row_axis,
      'columns': rendered.column_axis,
      'shape': list(rendered.image.shape),
      'pixel_spacing_mm': [rendered.pixel_spacing_mm, rendered.pixel_spacing_mm],
      'resampling': rendered.resampling,
      'volume_shape': list(volume.data.shape),
      'volume_axes': list(CANONICAL_AXES),
      'voxel_spacing_mm': list(volume.spacing_mm),
      'source_axis_codes': volume.source_axis_codes,
      'units': volume.units,
      'suv_scale_factor': volume.suv_scale_factor,
      'window': [low, high],
      'pixel_to_value': (
          f'value = lo + p / {PNG_MAX} * (hi - lo) with [lo, hi] = window and '
          f'p = {PNG_MAX} - pixel if inverted else pixel; values outside the '
          'window were clipped'
      ),
      'inverted': invert,
      'image_max': float(np.max(rendered.image)),
      'volume_max': float(np.max(volume.data)),
      'patient_id': volume.patient_id,
      'series_instance_uid': volume.series_instance_uid,
      'series_label': volume.series_label,
      'source_path': volume.source_path,
      'source_format': volume.source_format,
      **volume.provenance,
  }


class StagedWriter:
  """Staging folder for outputs, moved into the class folder on commit.

  Use as a context manager: leaving the block without `commit()` (e.g. on an
  error) deletes everything staged.
  """

  def __init__(self, dst: Path, class_name: str, overwrite: bool = False):
    self.dst = Path(dst)
    self.class_dir = self.dst / validate_class_name(class_name)
    self.overwrite = overwrite
    self._staging = None
    self._staged = []
    self._staged_set = set()
    self._created_dst = False

  def __enter__(self):
    self._created_dst = not self.dst.exists()
    self.dst.mkdir(parents=True, exist_ok=True)
    self._staging = self.dst / f'{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}'
    self._staging.mkdir()
    return self

  def __exit__(self, exc_type, exc_value, traceback):
    if self._staging is not None and self._staging.exists():
      shutil.rmtree(self._staging)
    if exc_type is not None and self._created_dst and not any(self.dst.iterdir()):
      self.dst.rmdir()
    return False

  def add(self, stem: str, png: bytes, sidecar: dict[str, Any]) -> None:
    """Stage one PNG and its sidecar.

    Raises:
      IngestError: if another output of this run has the same name, or the
        target exists and overwriting is off.
    """
    for suffix in ('.png', SIDECAR_SUFFIX):
      target = self.class_dir / f'{stem}{suffix}'
      if target in self._staged_set:
        raise IngestError(
            f'Two inputs produce the same output {target}; give them distinct '
            'PatientID/SeriesInstanceUID (or file names for NIfTI).'
        )
      if target.exists() and not self.overwrite:
        raise IngestError(
            f'Output {target} already exists. Remove it, choose another DST, or '
            'pass --overwrite.'
        )
    (self._staging / f'{stem}.png').write_bytes(png)
    (self._staging / f'{stem}{SIDECAR_SUFFIX}').write_text(
        json.dumps(sidecar, indent=2, allow_nan=False) + '\n'
    )
    for suffix in ('.png', SIDECAR_SUFFIX):
      self._staged.append(self.class_dir / f'{stem}{suffix}')
      self._staged_set.add(self.class_dir / f'{stem}{suffix}')

  def commit(self) -> list[Path]:
    """Move every staged file into the class folder; return the PNG paths.

    If a move fails, the files already moved are removed again. NOTE: with
    overwrite on, the files they replaced are gone by then and stay gone.
    """
    created_class_dir = not self.class_dir.exists()
    self.class_dir.mkdir(parents=True, exist_ok=True)
    moved = []
    try:
      for target in self._staged:
        (self._staging / target.name).replace(target)
        moved.append(target)
    except OSError:
      for target in moved:
        target.unlink(missing_ok=True)
      if created_class_dir and not any(self.class_dir.iterdir()):
        self.class_dir.rmdir()
      raise
    return [path for path in self._staged if path.suffix == '.png']
