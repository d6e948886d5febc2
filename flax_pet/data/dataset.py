"""Loading a class-folder dataset: scan, split, decode once into TFDS, then read.

`prepare_class_folder` does the one-time work and returns a handle that
streams batches through `tf.data`. `load_class_folder` also reads every split
into numpy arrays. That suits datasets that fit in memory: 373 images at
224x224x3 float32 take 225 MB.

Split modes:
  presplit                   the train/, val/, test/ folders of the data root.
  stratified                 per class, whole patients at a time, seeded (see
                             `flax_pet.data.splits.stratified_group_split`).
  per_image_seed_compatible  the split of `splitfolders.ratio(seed, ratio)`,
                             image by image, as the reference notebook made it.
  manifest                   the splits and patient ids of an earlier run's
                             manifest.csv, after checking that every file is
                             still there with the same sha256.
"""

import dataclasses
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tqdm import tqdm

from flax_pet.data import defaults
from flax_pet.data.builder import (
    STORAGE_SCALE,
    ClassFolderBuilder,
    SourceEntry,
    count_by_split_and_class,
    make_config,
)
from flax_pet.data.decode import DecodeError, normalize_image_size
from flax_pet.data.folders import FolderScan, SourceFile, scan_class_folder
from flax_pet.data.manifest import ManifestRow, read_manifest, sha256_of_file
from flax_pet.data.patients import (
    PatientIdSource,
    describe_patient_id_source,
    resolve_patient_ids,
)
from flax_pet.data.splits import (
    check_class_coverage,
    check_no_patient_leak,
    seed_compatible_split,
    split_names_for,
    stratified_group_split,
    validate_ratios,
)

logger = logging.getLogger(__name__)

SPLIT_MODES = ('presplit', 'stratified', 'per_image_seed_compatible', 'manifest')

_MAX_LISTED = 5


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory, sorted by path.

  Attributes:
    name: 'train', 'val' or 'test'.
    images: float32 array (N, height, width, 3) with values in 0..255.
    labels: int32 array (N,) of indices into the class names.
    paths: source paths relative to the data root.
    patient_ids: patient id per image, '' when patients are unknown.
  """

  name: str
  images: np.ndarray
  labels: np.ndarray
  paths: list[str]
  patient_ids: list[str]

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class PreparedClassFolder:
  """A class-folder dataset stored by TFDS, ready to read.

  Attributes:
    root: the data root, absolute.
    class_names: class names; label i is class_names[i].
    manifest: one row per source file, sorted by path.
    builder: the TFDS builder of the stored dataset.
  """

  root: Path
  class_names: list[str]
  manifest: list[ManifestRow]
  builder: ClassFolderBuilder

  @property
  def split_names(self) -> list[str]:
    """The stored splits, in train, val, test order."""
    stored = self.builder.info.splits.keys()
    return [name for name in defaults.SPLIT_NAMES if name in stored]

  @property
  def image_size(self) -> tuple[int, int]:
    """(height, width) of the stored images."""
    return tuple(self.builder.builder_config.image_size)

  def tf_dataset(
      self,
      split: str,
      *,
      batch_size: int | None = None,
      shuffle: bool = False,
      seed: int | None = None,
      repeat: bool = False,
      drop_remainder: bool = False,
      shuffle_buffer: int = 1024,
  ) -> tf.data.Dataset:
    """Stream (image, label) pairs of one split.

    Images are float32 (height, width, 3) in 0..255 and labels int32, batched
    when batch_size is set. Examples are shuffled while still PNG-encoded, so
    the shuffle buffer stores compressed bytes. Augmentation is not applied here: call
    `flax_pet.data.augment` on training batches.

    Args:
      split: a name from `split_names`.
      batch_size: examples per batch, or None for single examples.
      shuffle: shuffle file order and examples, reshuffled each epoch.
      seed: seed of the shuffle, for a repeatable order.
      repeat: repeat forever.
      drop_remainder: drop the last batch if it is smaller than batch_size.
      shuffle_buffer: examples in the shuffle buffer.

    Returns:
      The dataset.
    """
    self._check_split(split)
    height, width = self.image_size
    dataset = self.builder.as_dataset(
        split=split,
        shuffle_files=shuffle,
        decoders={'image': tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    if shuffle:
      dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
      dataset = dataset.repeat()

    def to_model_input(example):
      image = _decode_stored_image(example['image'], height, width)
      return image, tf.cast(example['label'], tf.int32)

    dataset = dataset.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE)
    if batch_size:
      dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)

  def read_split(self, split: str) -> Split:
    """Read one split into memory, sorted by path.

    Args:
      split: a name from `split_names`.

    Returns:
      The split's images, labels, paths and patient ids.
    """
    self._check_split(split)
    height, width = self.image_size
    rows = sorted(
        (row for row in self.manifest if row.ok and row.split == split),
        key=lambda row: row.path,
    )
    position = {row.path: i for i, row in enumerate(rows)}
    images = np.empty((len(rows), height, width, 3), np.float32)
    labels = np.empty(len(rows), np.int32)
    filled = np.zeros(len(rows), bool)

    dataset = self.builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={'image': tfds.decode.SkipDecoding()},
    )
    dataset = dataset.map(
        lambda ex: (
            _decode_stored_image(ex['image'], height, width),
            ex['label'],
            ex['path'],
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).batch(64)

    for batch_images, batch_labels, batch_paths in tfds.as_numpy(dataset):
      for image, label, path in zip(batch_images, batch_labels, batch_paths):
        index = position[path.decode()]
        images[index] = image
        labels[index] = label
        filled[index] = True

    if not filled.all():
      absent = [rows[i].path for i in np.flatnonzero(~filled)[:_MAX_LISTED]]
      raise ValueError(
          f'TFDS split {split!r} in {self.builder.data_dir} lacks files that its '
          f'manifest lists as ok, e.g. {", ".join(absent)}; delete that folder '
          'to rebuild it'
      )
    return Split(
        name=split,
        images=images,
        labels=labels,
        paths=[row.path for row in rows],
        patient_ids=[row.patient_id for row in rows],
    )

  def _check_split(self, split: str) -> None:
    if split not in self.split_names:
      raise ValueError(
          f'split {split!r} does not exist in {self.root}; available: '
          f'{", ".join(self.split_names)}'
      )


@dataclasses.dataclass(frozen=True)
class PetDataset:
  """A class-folder dataset with every split in memory.

  Attributes:
    class_names: class names; label i is class_names[i].
    splits: {'train': Split, 'val': Split, 'test': Split}, the splits present.
    manifest: one row per source file, sorted by path.
    prepared: the TFDS-backed handle, for streaming with `tf_dataset`.
  """

  class_names: list[str]
  splits: dict[str, Split]
  manifest: list[ManifestRow]
  prepared: PreparedClassFolder


def load_class_folder(data_dir: str | os.PathLike, **options) -> PetDataset:
  """Load a class-folder dataset with every split in memory.

  Args:
    data_dir: the data root (see `flax_pet.data.folders`).
    **options: keyword arguments of `prepare_class_folder`.

  Returns:
    The dataset, splits sorted by path.

  Raises:
    As `prepare_class_folder`.
  """
  prepared = prepare_class_folder(data_dir, **options)
  splits = {name: prepared.read_split(name) for name in prepared.split_names}
  return PetDataset(
      class_names=prepared.class_names,
      splits=splits,
      manifest=prepared.manifest,
      prepared=prepared,
  )


def prepare_class_folder(
    data_dir: str | os.PathLike,
    *,
    image_size: int | Sequence[int] = defaults.IMAGE_SIZE,
    resize: str = defaults.RESIZE,
    antialias: bool = defaults.ANTIALIAS,
    pad_value: float | None = None,
    split_mode: str | None = None,
    split_ratios: Sequence[float] = defaults.SPLIT_RATIOS,
    seed: int = defaults.SPLIT_SEED,
    patient_ids: PatientIdSource = None,
    manifest: str | os.PathLike | None = None,
    strict: bool = False,
    tfds_data_dir: str | os.PathLike | None = None,
) -> PreparedClassFolder:
  """Split a class-folder dataset and store it decoded with TFDS, or reuse it.

  Args:
    data_dir: the data root, unsplit or pre-split (see
      `flax_pet.data.folders`).
    image_size: model input size, one int for a square or (height, width).
    resize: 'stretch' or 'pad' (see `flax_pet.data.decode`).
    antialias: filter when shrinking; False matches tf.image.resize.
    pad_value: padding value in 0..255 for resize='pad', or None for the
      median of each image's border.
    split_mode: one of SPLIT_MODES (see the module docstring). None picks
      'manifest' when a manifest is given, 'presplit' for a pre-split folder
      and 'stratified' otherwise.
    split_ratios: train, val (and test) fractions for 'stratified' and
      'per_image_seed_compatible'.
    seed: split seed for 'stratified' and 'per_image_seed_compatible'.
    patient_ids: where patient ids come from (see
      `flax_pet.data.patients.resolve_patient_ids`), or None.
    manifest: a manifest.csv to take splits and patient ids from.
    strict: raise on the first file that cannot be decoded, instead of
      skipping it and recording the reason in the manifest.
    tfds_data_dir: TFDS data folder; None uses TFDS' default
      ($TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    The prepared dataset.

  Raises:
    ValueError: for an invalid layout or option, a split without some class,
      a patient in two splits, or a manifest that does not match the folder.
    DecodeError: in strict mode, naming the first file that cannot be decoded.
  """
  size = normalize_image_size(image_size)
  if resize not in defaults.RESIZE_MODES:
    raise ValueError(f'resize={resize!r} is invalid: use one of {defaults.RESIZE_MODES}')
  if pad_value is not None and not 0.0 <= pad_value <= 255.0:
    raise ValueError(f'pad_value={pad_value} is invalid: use a value in 0..255')

  scan = scan_class_folder(data_dir)
  split_mode = _resolve_split_mode(split_mode, scan, manifest, patient_ids)

  if split_mode == 'manifest':
    entries, split_names = _entries_from_manifest(scan, Path(manifest))
    split_description = f'from manifest {Path(manifest).resolve()}'
  else:
    entries, split_names = _assign_splits(
        scan, split_mode, validate_ratios(split_ratios), seed, patient_ids
    )
    split_description = _describe_split(split_mode, split_ratios, seed, patient_ids)

  has_patients = split_mode == 'manifest' or patient_ids is not None
  _check_entries(entries, scan.class_names, split_names, has_patients)

  config = make_config(
      source_dir=scan.root,
      folder_fingerprint=scan.fingerprint(),
      class_names=scan.class_names,
      entries=tuple(entries),
      image_size=size,
      resize=resize,
      antialias=antialias,
      pad_value=pad_value,
      split_description=split_description,
      strict=strict,
  )
  builder = ClassFolderBuilder(
      config=config,
      data_dir=None if tfds_data_dir is None else os.fspath(tfds_data_dir),
  )
  logger.info('Preparing %s into TFDS folder %s', scan.root, builder.data_dir)
  builder.download_and_prepare()

  rows = builder.stored_manifest()
  _report_skipped(rows, scan.root, strict)
  _warn_duplicates_across_splits(rows)
  _log_counts(rows, scan, builder)
  return PreparedClassFolder(
      root=scan.root,
      class_names=list(scan.class_names),
      manifest=rows,
      builder=builder,
  )


def _resolve_split_mode(
    split_mode: str | None,
    scan: FolderScan,
    manifest: str | os.PathLike | None,
    patient_ids: PatientIdSource,
) -> str:
  if split_mode is None:
    if manifest is not None:
      split_mode = 'manifest'
    else:
      split_mode = 'presplit' if scan.presplit else 'stratified'

  if split_mode not in SPLIT_MODES:
    raise ValueError(f'split_mode={split_mode!r} is invalid: use one of {SPLIT_MODES}')
  if (split_mode == 'manifest') != (manifest is not None):
    raise ValueError(
        'split_mode="manifest" and the manifest argument go together: pass '
        'both to reuse an earlier split, or neither'
    )
  if split_mode == 'manifest' and patient_ids is not None:
    raise ValueError(
        'patient_ids cannot be combined with a manifest, which already contains '
        'the patient ids; pass one of them'
    )
  if scan.presplit and split_mode not in ('presplit', 'manifest'):
    raise ValueError(
        f'{scan.root} is already split into the folders '
        f'{", ".join(scan.split_names)}, so split_mode={split_mode!r} does not '
        'apply; use '
        'split_mode="presplit" (the default), or point data_dir at an unsplit '
        'folder'
    )
  if not scan.presplit and split_mode == 'presplit':
    raise ValueError(
        f'{scan.root} has no train/, val/ or test/ folders, so '
        'split_mode="presplit" does not apply; use "stratified" or '
        '"per_image_seed_compatible"'
    )
  return split_mode


def _assign_splits(
    scan: FolderScan,
    split_mode: str,
    ratios: tuple[float, ...],
    seed: int,
    patient_id_source: PatientIdSource,
) -> tuple[list[SourceEntry], tuple[str, ...]]:
  """Decide the split and patient of every file; return the entries and the split names."""
  images = [f for f in scan.files if f.has_image_extension]
  patient_by_path = resolve_patient_ids(images, patient_id_source) or {}

  if split_mode == 'presplit':
    split_by_path = {f.path: f.split for f in scan.files}
    split_names = scan.split_names
  elif split_mode == 'stratified':
    groups = [patient_by_path.get(f.path, f.path) for f in images]
    assigned = stratified_group_split(
        [f.class_name for f in images], groups, ratios, seed
    )
    split_by_path = {f.path: split for f, split in zip(images, assigned)}
    split_names = split_names_for(ratios)
  else:
    # splitfolders shuffles every visible file, images or not.
    names_by_class = defaultdict(list)
    for f in scan.files:
      names_by_class[f.class_name].append(f.name)
    assigned = seed_compatible_split(names_by_class, ratios, seed)
    split_by_path = {f.path: assigned[(f.class_name, f.name)] for f in scan.files}
    split_names = split_names_for(ratios)

  entries = [
      SourceEntry(
          path=f.path,
          class_name=f.class_name,
          split=split_by_path.get(f.path, ''),
          patient_id=patient_by_path.get(f.path, ''),
          skip_reason='' if f.has_image_extension else _unsupported_reason(f),
      )
      for f in scan.files
  ]
  return entries, split_names


def _entries_from_manifest(
    scan: FolderScan, manifest_path: Path
) -> tuple[list[SourceEntry], tuple[str, ...]]:
  """Take splits and patient ids from a manifest after checking it matches the folder."""
  rows = {row.path: row for row in read_manifest(manifest_path)}
  files = {f.path: f for f in scan.files}

  missing_files = sorted(set(rows) - set(files))
  if missing_files:
    raise ValueError(
        f'{len(missing_files)} files of manifest {manifest_path} are missing '
        f'from {scan.root}, e.g. {", ".join(missing_files[:_MAX_LISTED])}; '
        'restore them to reproduce that run'
    )
  unlisted_files = sorted(set(files) - set(rows))
  if unlisted_files:
    raise ValueError(
        f'{len(unlisted_files)} files in {scan.root} are not in manifest '
        f'{manifest_path}, e.g. {", ".join(unlisted_files[:_MAX_LISTED])}; '
        'remove them to reproduce that run, or split again without the manifest'
    )

  changed = []
  for path in tqdm(sorted(files), desc='Checking sha256', unit='file'):
    expected = rows[path].sha256
    if expected and sha256_of_file(scan.root / path) != expected:
      changed.append(path)
  if changed:
    raise ValueError(
        f'{len(changed)} files in {scan.root} differ from manifest '
        f'{manifest_path} (sha256), e.g. {", ".join(changed[:_MAX_LISTED])}; '
        'restore the original files to reproduce that run'
    )

  entries = []
  for path, file in files.items():
    row = rows[path]
    if row.class_name != file.class_name:
      raise ValueError(
          f'manifest {manifest_path} lists {path} as class {row.class_name!r}, '
          f'but it is in folder {file.class_name!r}'
      )
    entries.append(
        SourceEntry(
            path=path,
            class_name=file.class_name,
            split=row.split,
            patient_id=row.patient_id,
            skip_reason='' if file.has_image_extension else _unsupported_reason(file),
        )
    )
  split_names = tuple(
      name for name in defaults.SPLIT_NAMES if any(e.split == name for e in entries)
  )
  return entries, split_names


def _check_entries(
    entries: list[SourceEntry],
    class_names: Sequence[str],
    split_names: Sequence[str],
    check_patients: bool,
) -> None:
  """Check, before decoding, that no patient spans splits and every split has every class."""
  images = [e for e in entries if e.split and not e.skip_reason]
  split_by_path = {e.path: e.split for e in images}
  if check_patients:
    patients = {e.path: e.patient_id or e.path for e in images}
    check_no_patient_leak(split_by_path, patients)
  check_class_coverage(
      split_by_path, {e.path: e.class_name for e in images}, class_names, split_names
  )


def _report_skipped(rows: list[ManifestRow], root: Path, strict: bool) -> None:
  skipped = [row for row in rows if not row.ok]
  if not skipped:
    return
  examples = '; '.join(f'{row.path}: {row.reason}' for row in skipped[:_MAX_LISTED])
  if strict:
    raise DecodeError(
        root / skipped[0].path,
        f'{skipped[0].reason}. This TFDS dataset was prepared without strict '
        f'mode and skipped {len(skipped)} files ({examples}); strict mode '
        'allows none',
    )
  logger.warning(
      '%d files of %s are skipped (status "skipped" in the manifest): %s',
      len(skipped),
      root,
      examples,
  )


def _warn_duplicates_across_splits(rows: list[ManifestRow]) -> None:
  """Warn about byte-identical files in different splits, a sign of leakage."""
  splits_by_hash = defaultdict(set)
  paths_by_hash = defaultdict(list)
  for row in rows:
    if row.ok:
      splits_by_hash[row.sha256].add(row.split)
      paths_by_hash[row.sha256].append(row.path)
  shared = [h for h, splits in splits_by_hash.items() if len(splits) > 1]
  if shared:
    examples = '; '.join(' = '.join(paths_by_hash[h]) for h in shared[:_MAX_LISTED])
    logger.warning(
        '%d images occur byte for byte in more than one split: %s',
        len(shared),
        examples,
    )


def _log_counts(rows: list[ManifestRow], scan: FolderScan, builder) -> None:
  counts = count_by_split_and_class(rows)
  for split in defaults.SPLIT_NAMES:
    if split in counts:
      per_class = ', '.join(
          f'{name}: {counts[split].get(name, 0)}' for name in scan.class_names
      )
      logger.info('%s split: %d images (%s)', split, sum(counts[split].values()), per_class)
  logger.info(
      'Loaded %s (classes %s) from TFDS folder %s',
      scan.root,
      list(scan.class_names),
      builder.data_dir,
  )


def _describe_split(
    split_mode: str,
    ratios: Sequence[float],
    seed: int,
    patient_ids: PatientIdSource,
) -> str:
  if split_mode == 'presplit':
    return 'pre-split folders'
  return (
      f'{split_mode}, ratios {tuple(ratios)}, seed {seed}, patients: '
      f'{describe_patient_id_source(patient_ids)}'
  )


def _unsupported_reason(file: SourceFile) -> str:
  suffix = Path(file.name).suffix or '(no extension)'
  return (
      f'unsupported file type {suffix}; images must be '
      f'{", ".join(defaults.IMAGE_EXTENSIONS)}'
  )


def _decode_stored_image(encoded: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """Decode a stored uint16 PNG back to float32 0..255."""
  image = tf.io.decode_png(encoded, channels=3, dtype=tf.uint16)
  image = tf.cast(image, tf.float32) / STORAGE_SCALE
  return tf.ensure_shape(image, (height, width, 3))
