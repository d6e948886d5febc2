"""Synthetic two-class images for the demo run (not PET data).

Each image is a noisy, body-shaped ellipse of uniform brightness. Images of the
'hot spots' class add two to four small bright blobs, a crude stand-in for
focal uptake. The demo exists to show the whole pipeline running in minutes
without any data of the user's own; its numbers mean nothing clinically.
"""

import logging
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CLASS_NAMES = ('hot spots', 'no hot spots')


def _demo_image(rng: np.random.Generator, size: int, hot_spots: bool) -> np.ndarray:
  rows, cols = np.mgrid[0:size, 0:size] / size
  body = ((rows - 0.5) / 0.45) ** 2 + ((cols - 0.5) / 0.22) ** 2 < 1.0
  image = 40.0 * body + rng.normal(0.0, 8.0, (size, size))
  if hot_spots:
    for _ in range(rng.integers(2, 5)):
      center_row, center_col = rng.uniform(0.2, 0.8), rng.uniform(0.35, 0.65)
      radius = rng.uniform(0.02, 0.05)
      distance = (rows - center_row) ** 2 + (cols - center_col) ** 2
      image += 180.0 * np.exp(-distance / (2 * radius**2))
  return np.clip(image, 0, 255).astype(np.uint8)


def write_demo_folder(root: str | Path, images_per_class: int, seed: int = 0, size: int = 128) -> Path:
  """Write a class-folder dataset of synthetic images under `root`.

  Existing files are kept, so a resumed demo run reads identical images.

  Returns:
    `root`, ready for `flax_pet.data.load_class_folder`.
  """
  root = Path(root)
  rng = np.random.default_rng(seed)
  for class_name in CLASS_NAMES:
    folder = root / class_name
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(images_per_class):
      pixels = _demo_image(rng, size, class_name == 'hot spots')
      path = folder / f'demo_{index:04d}.png'
      if not path.exists():
        Image.fromarray(pixels, mode='L').save(path)
  logger.info('Synthetic demo images: %d per class in %s', images_per_class, root)
  return root
