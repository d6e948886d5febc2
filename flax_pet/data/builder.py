"""TFDS builder that stores a class-folder dataset, decoded and resized, per split.

Each example contains the image at model size as a 3-channel uint16 PNG, with
the label, the source path relative to the data root, the file's sha256 and
the patient id. The PNG stores the 0..255 float image times 257, so 16-bit
sources keep their precision. The manifest (every file with its status, see
`flax_pet.data.manifest`) is stored in the dataset's metadata.json.

The config name combines a slug of the folder name with a digest of
everything that determines the stored data: the folder's absolute path, the
path, size and mtime of every file, the decoding settings and the split of
every file. A changed folder or setting therefore gets a new config and is
built again instead of silently reusing old data. Old configs stay on disk
until deleted.

The builder lives in a package module rather than a script because TFDS
looks up builder metadata next to the defining module, which fails with
NotADirectoryError for a script.
"""

import dataclasses
import hashlib
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from flax_pet.data import defaults
from flax_pet.data.decode import DecodeError, decode_image_bytes
from flax_pet.data.manifest import (
    STATUS_OK,
    STATUS_SKIPPED,
    ManifestRow,
    sha256_of_file,
)

logger = logging.getLogger(__name__)

# Stored uint16 value = round(pixel * STORAGE_SCALE) for pixels in 0..255.
STORAGE_SCALE = 65535.0 / 255.0

BUILDER_VERSION = '1.0.0'

_MANIFEST_KEY = 'manifest'

# Skipped files logged one by one; the manifest lists every one of them.
_MAX_LOGGED_SKIPS = 20


@dataclasses.dataclass(frozen=True)
class SourceEntry:
  """A file to store, with its split and patient decided beforehand.

  Attributes:
    path: path relative to the data root, '/' separated.
    class_name: class folder name.
    split: split name, or '' for a file that no split takes.
    patient_id: patient id, or '' when unknown.
    skip_reason: a reason known before decoding (e.g. the file type), or ''.
  """

  path: str
  class_name: str
  split: str
  patient_id: str
  skip_reason: str = ''


@dataclasses.dataclass(eq=False)
class ClassFolderConfig(tfds.core.BuilderConfig):
  """Builder config for one folder, decoding setting and split.

  Use `make_config` to build one with the right name.
  """

  source_dir: str = ''
  class_names: tuple[str, ...] = ()
  image_size: tuple[int, int] = (defaults.IMAGE_SIZE, defaults.IMAGE_SIZE)
  resize: str = defaults.RESIZE
  antialias: bool = defaults.ANTIALIAS
  pad_value: float | None = None
  # Left out of repr: TFDS logs the config, and this can hold 100k files.
  entries: tuple[SourceEntry, ...] = dataclasses.field(default=(), repr=False)
  # Not part of the name: strict only decides whether a bad file raises.
  strict: bool = False


def make_config(
    *,
    source_dir: Path,
    folder_fingerprint: str,
    class_names: tuple[str, ...],
    entries: tuple[SourceEntry, ...],
    image_size: tuple[int, int],
    resize: str,
    antialias: bool,
    pad_value: float | None,
    split_description: str,
    strict: bool,
) -> ClassFolderConfig:
  """Return a config whose name identifies the folder content, decoding and split.

  Args:
    source_dir: the data root, absolute.
    folder_fingerprint: `FolderScan.fingerprint()` of the data root.
    class_names: sorted class names.
    entries: every file with its split and patient.
    image_size: (height, width) of the stored images.
    resize: 'stretch' or 'pad'.
    antialias: whether resizing filters when shrinking.
    pad_value: padding value, or None for the border median.
    split_description: how the split was made, stored in the description.
    strict: raise on the first file that cannot be decoded.

  Returns:
    The config.
  """
  identity = {
      'builder_version': BUILDER_VERSION,
      'folder': folder_fingerprint,
      'class_names': list(class_names),
      'image_size': list(image_size),
      'resize': resize,
      'antialias': antialias,
      'pad_value': pad_value,
      'entries': [dataclasses.astuple(e) for e in entries],
  }
  digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
  slug = re.sub(r'[^a-z0-9]+', '_', source_dir.name.lower()).strip('_')[:40]
  description = (
      f'Class folders of {source_dir} (folder sha256 {folder_fingerprint}), '
      f'{image_size[0]}x{image_size[1]} px, resize={resize}, '
      f'antialias={antialias}, pad_value={pad_value}; split: {split_description}.'
  )
  return ClassFolderConfig(
      name=f'{slug or "images"}-{digest[:16]}',
      version=BUILDER_VERSION,
      description=description,
      source_dir=str(source_dir),
      class_names=tuple(class_names),
      image_size=tuple(image_size),
      resize=resize,
      antialias=antialias,
      pad_value=pad_value,
      entries=tuple(entries),
      strict=strict,
  )


class ClassFolderBuilder(tfds.core.GeneratorBasedBuilder):
  """Decodes a class-folder dataset once and stores it in TFDS format."""

  name = 'pet_class_folder'
  VERSION = tfds.core.Version(BUILDER_VERSION)
  RELEASE_NOTES = {
      BUILDER_VERSION: 'Images at model size as 3-channel uint16 PNG, with '
      'path, sha256 and patient id; manifest in the metadata.',
  }

  def __init__(self, *, config: ClassFolderConfig, **kwargs):
    super().__init__(config=config, **kwargs)
    self._manifest_rows: list[ManifestRow] = []
    self._skip_count = 0

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    height, width = config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=config.description,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(height, width, 3), dtype=np.uint16, encoding_format='png'
            ),
            'label': tfds.features.ClassLabel(names=list(config.class_names)),
            'path': tfds.features.Text(),
            'sha256': tfds.features.Text(),
            'patient_id': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    config = self.builder_config
    self._manifest_rows = []
    for entry in config.entries:
      if not entry.split:
        reason = entry.skip_reason or 'no split takes this file'
        self._skip(entry, reason, _sha256_of_file(Path(config.source_dir) / entry.path))
    self._store_manifest()

    split_names = [
        name
        for name in defaults.SPLIT_NAMES
        if any(entry.split == name for entry in config.entries)
    ]
    return {name: self._generate_examples(name) for name in split_names}

  def _generate_examples(self, split: str):
    config = self.builder_config
    decoded_classes = set()

    for entry in config.entries:
      if entry.split != split:
        continue
      example = self._process(entry)
      if example is not None:
        decoded_classes.add(entry.class_name)
        yield entry.path, example

    self._store_manifest()
    missing = [c for c in config.class_names if c not in decoded_classes]
    if missing:
      raise ValueError(
          f'split {split!r} of {config.source_dir} has no decodable image of '
          f'class {", ".join(repr(c) for c in missing)}; the "Skipping" '
          'warnings above give the reasons. Replace the broken files or add '
          'images of that class.'
      )

  def _process(self, entry: SourceEntry) -> dict | None:
    """Decode one file, record its manifest row, and return the example or None."""
    config = self.builder_config
    file_path = Path(config.source_dir) / entry.path

    if entry.skip_reason:
      return self._skip(entry, entry.skip_reason, _sha256_of_file(file_path))

    try:
      data = file_path.read_bytes()
    except OSError as error:
      return self._skip(entry, f'cannot read the file: {error}', '')

    sha256 = hashlib.sha256(data).hexdigest()
    try:
      image = decode_image_bytes(
          data,
          config.image_size,
          config.resize,
          name=str(file_path),
          antialias=config.antialias,
          pad_value=config.pad_value,
      )
    except DecodeError as error:
      return self._skip(entry, error.reason, sha256)

    self._record(entry, sha256, STATUS_OK)
    return {
        'image': np.round(image * STORAGE_SCALE).astype(np.uint16),
        'label': config.class_names.index(entry.class_name),
        'path': entry.path,
        'sha256': sha256,
        'patient_id': entry.patient_id,
    }

  def _skip(self, entry: SourceEntry, reason: str, sha256: str) -> None:
    """Record a skipped file, or raise DecodeError in strict mode."""
    config = self.builder_config
    file_path = Path(config.source_dir) / entry.path
    if config.strict:
      raise DecodeError(file_path, f'{reason} (strict mode stops on the first bad file)')
    self._skip_count += 1
    if self._skip_count <= _MAX_LOGGED_SKIPS:
      logger.warning('Skipping %s: %s', file_path, reason)
    if self._skip_count == _MAX_LOGGED_SKIPS:
      logger.warning('Further skipped files are listed in the manifest only')
    self._record(entry, sha256, STATUS_SKIPPED, reason)
    return None

  def _record(self, entry: SourceEntry, sha256: str, status: str, reason: str = '') -> None:
    self._manifest_rows.append(
        ManifestRow(
            path=entry.path,
            sha256=sha256,
            class_name=entry.class_name,
            label=self.builder_config.class_names.index(entry.class_name),
            split=entry.split,
            patient_id=entry.patient_id,
            status=status,
            reason=reason,
        )
    )

  def _store_manifest(self) -> None:
    rows = sorted(self._manifest_rows, key=lambda row: row.path)
    self.info.metadata[_MANIFEST_KEY] = [row.to_record() for row in rows]

  def stored_manifest(self) -> list[ManifestRow]:
    """Return the manifest saved with the prepared dataset, sorted by path.

    Raises:
      ValueError: if the dataset has no manifest, e.g. it was not prepared.
    """
    records = (self.info.metadata or {}).get(_MANIFEST_KEY)
    if records is None:
      raise ValueError(
          f'TFDS dataset {self.data_dir} has no manifest in its metadata; '
          'call download_and_prepare() first'
      )
    return [ManifestRow.from_record(record) for record in records]


def count_by_split_and_class(rows: list[ManifestRow]) -> dict[str, dict[str, int]]:
  """Return {split: {class: number of ok rows}}."""
  counts = defaultdict(lambda: defaultdict(int))
  for row in rows:
    if row.status == STATUS_OK:
      counts[row.split][row.class_name] += 1
  return {split: dict(by_class) for split, by_class in counts.items()}


def _sha256_of_file(path: Path) -> str:
  """Return the sha256 hex digest of a file, or '' if it cannot be read."""
  try:
    return sha256_of_file(path)
  except OSError:
    return ''
