"""Train/val/test assignment: stratified by class, grouped by patient, seeded.

Two algorithms:

- `stratified_group_split` keeps all images of a patient in one split and
  gives each split close to its fraction of every class. It is deterministic
  for a seed and does not depend on the order of its input.
- `seed_compatible_split` reproduces `splitfolders.ratio(input, seed=...,
  ratio=...)` (split-folders 0.4 to 0.6.1) image by image, for comparison with
  results of the reference notebook. It ignores patients, so
  `check_no_patient_leak` rejects its result when patients have several
  images that land in different splits.
"""

import logging
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from flax_pet.data import defaults

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


class PatientLeakError(ValueError):
  """Raised when one patient's images are in more than one split."""


def validate_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
  """Check split fractions and return them as a tuple of floats.

  Args:
    ratios: 2 (train, val) or 3 (train, val, test) fractions, each >= 0,
      summing to 1.

  Returns:
    The fractions as floats.

  Raises:
    ValueError: if there are not 2 or 3 fractions, one is negative, or they
      do not sum to 1 (rounded to 5 decimals, as splitfolders checks).
  """
  values = tuple(float(r) for r in ratios)
  if len(values) not in (2, 3):
    raise ValueError(
        f'split_ratios={tuple(ratios)} is invalid: give 2 (train, val) or 3 '
        '(train, val, test) fractions'
    )
  if min(values) < 0:
    raise ValueError(f'split_ratios={values} is invalid: fractions must be >= 0')
  if round(sum(values), 5) != 1:
    raise ValueError(f'split_ratios={values} is invalid: fractions must sum to 1')
  return values


def split_names_for(ratios: Sequence[float]) -> tuple[str, ...]:
  """Return the names of the splits that get a fraction above 0."""
  return tuple(
      name for name, ratio in zip(defaults.SPLIT_NAMES, ratios) if ratio > 0
  )


def stratified_group_split(
    classes: Sequence[str],
    groups: Sequence[str],
    ratios: Sequence[float] = defaults.SPLIT_RATIOS,
    seed: int = defaults.SPLIT_SEED,
) -> list[str]:
  """Assign items to splits, whole groups at a time, stratified by class.

  Groups (patients) are visited largest first, ties in an order shuffled by
  the seed. Each goes to the split whose class counts it brings closest to the
  split's targets ratio * class total. Closeness is the chi-square-like cost
  sum((count - target)**2 / target) over splits and classes, so a small split
  that lacks a class is filled before a large one that is short by a few.

  Args:
    classes: class name of each item.
    groups: group (patient) id of each item; use a unique id per item to
      split item by item.
    ratios: train, val (and test) fractions.
    seed: seed of the tie order.

  Returns:
    The split name of each item, in input order.

  Raises:
    ValueError: if the ratios are invalid or the inputs differ in length.
  """
  ratios = validate_ratios(ratios)
  if len(classes) != len(groups):
    raise ValueError(
        f'classes and groups differ in length ({len(classes)} vs {len(groups)})'
    )

  class_ids = {name: i for i, name in enumerate(sorted(set(classes)))}
  group_ids = {name: i for i, name in enumerate(sorted(set(groups)))}
  counts = np.zeros((len(group_ids), len(class_ids)))
  for class_name, group in zip(classes, groups):
    counts[group_ids[group], class_ids[class_name]] += 1

  # Sorted ids make the result independent of input order; the seeded
  # permutation then sets the order among groups of equal size.
  order = np.random.default_rng(seed).permutation(len(group_ids))
  order = order[np.argsort(-counts[order].sum(axis=1), kind='stable')]

  targets = np.outer(ratios, counts.sum(axis=0))
  assigned = np.zeros_like(targets)
  active = [s for s, ratio in enumerate(ratios) if ratio > 0]
  split_of_group = np.empty(len(group_ids), dtype=np.int64)

  for group in order:
    group_counts = counts[group]
    present = group_counts > 0
    costs = []
    for s in active:
      # Cost increase of adding group_counts to split s.
      deficit = assigned[s, present] - targets[s, present]
      costs.append(
          np.sum(
              group_counts[present]
              * (group_counts[present] + 2 * deficit)
              / targets[s, present]
          )
      )
    best = active[int(np.argmin(costs))]
    split_of_group[group] = best
    assigned[best] += group_counts

  return [defaults.SPLIT_NAMES[split_of_group[group_ids[g]]] for g in groups]


def seed_compatible_split(
    file_names_by_class: Mapping[str, Sequence[str]],
    ratios: Sequence[float] = defaults.SPLIT_RATIOS,
    seed: int = defaults.SPLIT_SEED,
) -> dict[tuple[str, str], str]:
  """Split each class like `splitfolders.ratio(seed=seed, ratio=ratios)`.

  splitfolders sorts the visible file names of each class folder, calls
  `random.seed(seed)` and `random.shuffle` on them, and cuts the list at
  int(ratio_train * n) and int(ratio_val * n) past that. With 2 ratios the
  rest is val; with 3 it is test. Its list includes every visible file, images
  or not, so pass the same list to get the same cut.

  Args:
    file_names_by_class: class name to the bare file names in its folder.
    ratios: train, val (and test) fractions.
    seed: the splitfolders seed.

  Returns:
    {(class name, file name): split name}.

  Raises:
    ValueError: if the ratios are invalid.
  """
  ratios = validate_ratios(ratios)
  assignment = {}

  for class_name, names in file_names_by_class.items():
    files = sorted(names)
    # A private Random seeded like the module-level functions gives the same
    # shuffle without touching the global random state.
    random.Random(seed).shuffle(files)

    train_end = int(ratios[0] * len(files))
    val_end = train_end + int(ratios[1] * len(files))
    if len(ratios) == 2:
      val_end = len(files)

    for index, name in enumerate(files):
      if index < train_end:
        split = 'train'
      elif index < val_end:
        split = 'val'
      else:
        split = 'test'
      assignment[(class_name, name)] = split

  return assignment


def check_no_patient_leak(
    split_by_path: Mapping[str, str], patient_by_path: Mapping[str, str]
) -> None:
  """Raise PatientLeakError if a patient has images in more than one split.

  Args:
    split_by_path: split name of each file.
    patient_by_path: patient id of each file.

  Raises:
    PatientLeakError: naming the first patients, their splits and files.
  """
  splits_of_patient = defaultdict(set)
  files_of_patient = defaultdict(list)
  for path, split in split_by_path.items():
    patient = patient_by_path[path]
    splits_of_patient[patient].add(split)
    files_of_patient[patient].append(path)

  leaks = sorted(p for p, splits in splits_of_patient.items() if len(splits) > 1)
  if leaks:
    examples = '; '.join(
        f'{patient!r} in {", ".join(sorted(splits_of_patient[patient]))} '
        f'({", ".join(sorted(files_of_patient[patient])[:3])})'
        for patient in leaks[:_MAX_LISTED]
    )
    raise PatientLeakError(
        f'{len(leaks)} patients have images in more than one split, e.g. '
        f'{examples}. Use split_mode="stratified" with patient ids, which '
        'keeps each patient in one split, or fix the pre-split folders.'
    )


def check_class_coverage(
    split_by_path: Mapping[str, str],
    class_by_path: Mapping[str, str],
    class_names: Sequence[str],
    split_names: Sequence[str],
    item_name: str = 'images',
) -> None:
  """Raise ValueError if a split has no item of some class.

  Args:
    split_by_path: split name of each file.
    class_by_path: class name of each file.
    class_names: every class.
    split_names: every split that must contain every class.
    item_name: plural noun for the files in the message, e.g. 'images'.

  Raises:
    ValueError: naming the split, the missing classes and the fix.
  """
  present = defaultdict(set)
  totals = defaultdict(int)
  for path, split in split_by_path.items():
    present[split].add(class_by_path[path])
    totals[class_by_path[path]] += 1

  for split in split_names:
    missing = [c for c in class_names if c not in present[split]]
    if missing:
      sizes = ', '.join(f'{c!r} has {totals[c]} in all splits' for c in missing)
      raise ValueError(
          f'split {split!r} has no {item_name} of class '
          f'{", ".join(repr(c) for c in missing)} ({sizes}); give that split a '
          'larger fraction in split_ratios or add images of that class'
      )
