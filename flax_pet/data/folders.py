"""Discovery of class-folder datasets: classes, files and a pre-split layout.

Two layouts are accepted, with hidden files and folders (names that start with
'.') ignored everywhere:

    root/<class>/<image>                  unsplit
    root/<split>/<class>/<image>          pre-split, <split> in train, val, test

The second is what the `splitfolders` package writes. Class names are the
folder names, spaces and case kept, in Python's sorted order (the order that
`keras.utils.image_dataset_from_directory` also uses), so label i is the i-th
name of the sorted list.
"""

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from flax_pet.data import defaults

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One visible file inside a class folder.

  Attributes:
    path: path relative to the data root, with '/' separators.
    class_name: the name of the class folder that contains the file.
    split: the split folder of a pre-split layout, or None.
    size: file size in bytes.
    mtime_ns: modification time in nanoseconds since the epoch.
  """

  path: str
  class_name: str
  split: str | None
  size: int
  mtime_ns: int

  @property
  def name(self) -> str:
    return self.path.rsplit('/', 1)[-1]

  @property
  def has_image_extension(self) -> bool:
    return Path(self.name).suffix.lower() in defaults.IMAGE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class FolderScan:
  """The classes and files found under a data root.

  Attributes:
    root: the data root, absolute.
    class_names: class folder names in sorted order; index = label.
    files: every visible file of every class folder, sorted by path.
    split_names: split folders of a pre-split layout in train, val, test
      order, or () for an unsplit layout.
  """

  root: Path
  class_names: tuple[str, ...]
  files: tuple[SourceFile, ...]
  split_names: tuple[str, ...]

  @property
  def presplit(self) -> bool:
    return bool(self.split_names)

  def fingerprint(self) -> str:
    """Return a sha256 hex digest of the root path and every file's path, size and mtime.

    Adding, removing, replacing or touching any file changes the digest.
    """
    listing = [str(self.root)] + [
        [f.path, f.class_name, f.split, f.size, f.mtime_ns] for f in self.files
    ]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def scan_class_folder(data_dir: str | os.PathLike) -> FolderScan:
  """List the classes and files of a class-folder dataset and check its layout.

  Args:
    data_dir: root folder with one subfolder per class, or with train/, val/
      and test/ subfolders that each contain the class folders.

  Returns:
    The classes and files found.

  Raises:
    FileNotFoundError: if data_dir does not exist.
    NotADirectoryError: if data_dir is not a folder.
    ValueError: for fewer than 2 classes, or a class folder without an image
      file. Also for a split folder that lacks a class of another split, split
      and class folders mixed at the top level, or a class name with a control
      character.
  """
  root = Path(data_dir).expanduser().resolve()
  if not root.exists():
    raise FileNotFoundError(f'data folder {root} does not exist')
  if not root.is_dir():
    raise NotADirectoryError(f'data folder {root} is not a folder')

  top_folders = _visible_subfolders(root)
  split_folders = [d for d in top_folders if d.name in defaults.SPLIT_NAMES]
  if not split_folders:
    class_names, files = _scan_classes(root, root, split=None)
    _check_class_count(class_names, root)
    return FolderScan(root, class_names, files, ())

  other_folders = [d.name for d in top_folders if d.name not in defaults.SPLIT_NAMES]
  if other_folders:
    raise ValueError(
        f'{root} mixes split folders ({", ".join(d.name for d in split_folders)}) '
        f'with other folders ({", ".join(other_folders)}); put every class '
        'folder inside train/, val/ and test/, or remove the split folders'
    )

  split_names = tuple(
      name for name in defaults.SPLIT_NAMES if (root / name) in split_folders
  )
  classes_by_split, files = {}, []
  for split in split_names:
    class_names, split_files = _scan_classes(root, root / split, split=split)
    classes_by_split[split] = class_names
    files.extend(split_files)

  all_classes = tuple(sorted(set().union(*classes_by_split.values())))
  _check_class_count(all_classes, root)
  for split, class_names in classes_by_split.items():
    missing = sorted(set(all_classes) - set(class_names))
    if missing:
      raise ValueError(
          f'split folder {root / split} has no class folder for '
          f'{", ".join(repr(c) for c in missing)}, which other splits have; '
          'every split needs images of every class. Split the data again, '
          'or move images of those classes into it.'
      )

  files.sort(key=lambda f: f.path)
  return FolderScan(root, all_classes, tuple(files), split_names)


def _visible_subfolders(folder: Path) -> list[Path]:
  return sorted(
      entry
      for entry in folder.iterdir()
      if not entry.name.startswith('.') and entry.is_dir()
  )


def _is_sidecar(path: Path) -> bool:
  """Return whether `path` is the JSON sidecar `flax_pet.ingest` writes beside an image."""
  return path.suffix.lower() == '.json' and any(
      path.with_suffix(extension).is_file() for extension in defaults.IMAGE_EXTENSIONS
  )


def _scan_classes(
    root: Path, folder: Path, split: str | None
) -> tuple[tuple[str, ...], list[SourceFile]]:
  """List the class folders directly inside folder and their visible files."""
  class_dirs = _visible_subfolders(folder)
  class_names = tuple(sorted(d.name for d in class_dirs))
  files = []

  for class_dir in class_dirs:
    if any(not ch.isprintable() for ch in class_dir.name):
      raise ValueError(
          f'class folder name {class_dir.name!r} in {folder} contains a control '
          'character; rename the folder'
      )

    class_files = []
    for entry in sorted(class_dir.iterdir()):
      if entry.name.startswith('.'):
        continue
      if entry.is_dir():
        logger.warning(
            'Ignoring subfolder %s: images must sit directly in their class folder',
            entry,
        )
        continue
      if not entry.is_file() or _is_sidecar(entry):
        continue
      stat = entry.stat()
      class_files.append(
          SourceFile(
              path=entry.relative_to(root).as_posix(),
              class_name=class_dir.name,
              split=split,
              size=stat.st_size,
              mtime_ns=stat.st_mtime_ns,
          )
      )

    if not any(f.has_image_extension for f in class_files):
      raise ValueError(
          f'class folder {class_dir} contains no image file '
          f'({", ".join(defaults.IMAGE_EXTENSIONS)}); add images or remove the folder'
      )
    files.extend(class_files)

  return class_names, files


def _check_class_count(class_names: tuple[str, ...], root: Path) -> None:
  if len(class_names) < 2:
    found = f'only {class_names[0]!r}' if class_names else 'none'
    raise ValueError(
        f'{root} needs at least 2 class folders (one subfolder of images per '
        f'class) but has {found}; add a folder for each class'
    )
