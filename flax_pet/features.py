"""Backbone features, computed once per image (and per augmented view) and cached.

The backbone is frozen in the reference recipe, so its pooled 1536-d features
do not change during head training. Computing them once turns 50 epochs of
full-network forward passes into one pass per image and view, which is what
makes head training take seconds instead of hours on a CPU.

Features are cached in `WORKDIR/features/<key>.npz`, where the key hashes
everything that determines them (weights, input convention, image paths and
contents, augmentation settings and seed), so a resumed or repeated run skips
the extraction and a changed input recomputes it.
"""

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from flax_pet import inference
from flax_pet import models
from flax_pet import preprocessing

logger = logging.getLogger(__name__)


def backbone_compiler_options() -> dict | None:
  """Return XLA options that speed up the backbone on this backend, or None.

  On the CPU, `inference.CPU_COMPILER_OPTIONS` fuses bias, BatchNorm and ReLU
  into the convolution calls (about 1.5 times the throughput, see
  docs/benchmarks.md); other backends get XLA's defaults.
  """
  if jax.default_backend() == 'cpu':
    return dict(inference.CPU_COMPILER_OPTIONS)
  return None


def make_pooled_feature_fn(input_convention: str, dtype=jnp.float32) -> Callable:
  """Return a jitted fn(variables, pixels) -> pooled features [N, 1536].

  `pixels` are RGB in 0..255; the input convention is applied inside the jit.
  """
  model = models.InceptionResNetV2(dtype=dtype)

  def pooled_features(variables, pixels):
    images = preprocessing.preprocess(pixels, input_convention)
    feature_map = model.apply(variables, images)
    return jnp.mean(feature_map.astype(jnp.float32), axis=(1, 2))

  return jax.jit(pooled_features, compiler_options=backbone_compiler_options())


def extract_features(
    feature_fn: Callable,
    variables,
    pixels: np.ndarray,
    batch_size: int,
    description: str = 'features',
) -> np.ndarray:
  """Run `feature_fn` over `pixels` in fixed-size batches with a progress bar.

  The last batch is padded to `batch_size` so that one compiled program serves
  every batch.

  Args:
    feature_fn: from `make_pooled_feature_fn`.
    variables: backbone variables.
    pixels: float32 [N, H, W, 3], RGB, 0..255.
    batch_size: images per forward pass.
    description: label of the progress bar and log line.

  Returns:
    float32 [N, 1536].
  """
  count = len(pixels)
  outputs = []
  start = time.perf_counter()
  with tqdm(total=count, desc=description, unit='img', leave=False) as progress:
    for first in range(0, count, batch_size):
      batch = pixels[first:first + batch_size]
      real = len(batch)
      if real < batch_size:
        padding = np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)
        batch = np.concatenate([batch, padding])
      outputs.append(np.asarray(feature_fn(variables, batch))[:real])
      progress.update(real)

  seconds = time.perf_counter() - start
  logger.info(
      'Computed %s for %d images in %.1f s (%.1f img/s).',
      description, count, seconds, count / max(seconds, 1e-9),
  )
  if not outputs:
    return np.zeros((0, models.FEATURE_CHANNELS), np.float32)
  return np.concatenate(outputs).astype(np.float32)


def cache_key(**parts) -> str:
  """Hash JSON-serializable parts (and numpy arrays) into a short key."""
  digest = hashlib.sha256()
  for name in sorted(parts):
    value = parts[name]
    digest.update(name.encode())
    if isinstance(value, np.ndarray):
      digest.update(str(value.shape).encode())
      digest.update(np.ascontiguousarray(value).tobytes())
    else:
      digest.update(json.dumps(value, sort_keys=True, default=str).encode())
  return digest.hexdigest()[:24]


def cached(cache_dir: Path, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
  """Load features for `key` from `cache_dir`, or compute and store them."""
  path = Path(cache_dir) / f'{key}.npy'
  if path.is_file():
    logger.info('Loaded cached features from %s', path)
    return np.load(path)

  features = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix('.partial.npy')
  np.save(partial, features)
  partial.rename(path)
  return features
