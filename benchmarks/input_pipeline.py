"""Measure the input pipeline: decoding, TFDS preparation and reading, augmentation, batching.

Runs on the real whole-body MIP folder by default and prints images per second
for each stage, with the machine, package versions and the command, so that
the numbers can be recorded with their context. Each stage runs --repeats
times and the median is reported (TFDS preparation runs once, into a fresh
temporary folder). About a minute on a 2-core CPU.

Usage:
  python benchmarks/input_pipeline.py [--data-dir DIR] [--batch-size 32]
"""

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import PIL
import tensorflow as tf
import tensorflow_datasets as tfds

from flax_pet.data import augment, decode_files, prepare_class_folder, scan_class_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / 'shared' / 'data' / 'pet-mip'

# A busy fraction above this while the benchmark sleeps means another process
# competes for the CPU and the numbers are not representative.
MAX_IDLE_BUSY_FRACTION = 0.10


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data-dir', type=Path, default=DEFAULT_DATA_DIR,
                      help='class-folder dataset (default: the real PET MIPs)')
  parser.add_argument('--image-size', type=int, default=224,
                      help='model input size in pixels (square)')
  parser.add_argument('--batch-size', type=int, default=32,
                      help='images per batch for streaming and augmentation')
  parser.add_argument('--repeats', type=int, default=3,
                      help='runs per stage; the median is reported')
  parser.add_argument('--json', type=Path, default=None,
                      help='also write the results to this JSON file')
  return parser.parse_args()


def cpu_busy_fraction(seconds: float = 1.0) -> float:
  """Return the fraction of CPU time that all processes used during a sleep of seconds."""
  def read() -> tuple[int, int]:
    fields = [int(v) for v in Path('/proc/stat').read_text().split('\n')[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields), idle

  total_before, idle_before = read()
  time.sleep(seconds)
  total_after, idle_after = read()
  total = total_after - total_before
  return 1.0 - (idle_after - idle_before) / total if total else 0.0


def machine_info() -> dict:
  cpu_model = platform.processor()
  cpuinfo = Path('/proc/cpuinfo')
  if cpuinfo.exists():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith('model name'):
        cpu_model = line.split(':', 1)[1].strip()
        break
  return {
      'command': shlex.join([sys.executable, *sys.argv]),
      'cpu': cpu_model,
      'cpu_count': os.cpu_count(),
      'platform': platform.platform(),
      'python': platform.python_version(),
      'numpy': np.__version__,
      'pillow': PIL.__version__,
      'tensorflow': tf.__version__,
      'tensorflow_datasets': tfds.__version__,
      'jax': jax.__version__,
      'jax_devices': [str(d) for d in jax.devices()],
  }


def median_rate(run, count: int, repeats: int) -> tuple[float, list[float]]:
  """Run repeats times; return the median images/s and the seconds of each run."""
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  return count / statistics.median(seconds), seconds


def main() -> None:
  args = parse_args()
  logging.basicConfig(level=logging.WARNING)
  tfds.disable_progress_bar()

  info = machine_info()
  busy = cpu_busy_fraction()
  info['cpu_busy_before_start'] = round(busy, 3)
  for key, value in info.items():
    print(f'{key}: {value}')
  if busy > MAX_IDLE_BUSY_FRACTION:
    print(f'WARNING: the CPU was {busy:.0%} busy before the benchmark started; '
          'other processes distort these numbers')

  scan = scan_class_folder(args.data_dir)
  paths = [scan.root / f.path for f in scan.files if f.has_image_extension]
  results = {}

  def record(name: str, rate: float, seconds: list[float]) -> None:
    results[name] = {'images_per_s': round(rate, 1), 'seconds': [round(s, 3) for s in seconds]}
    print(f'{name:<46} {rate:8.1f} img/s   runs: {", ".join(f"{s:.2f}s" for s in seconds)}')

  print(f'\n{len(paths)} images in {scan.root}, {args.image_size} px, '
        f'batch {args.batch_size}, median of {args.repeats} runs')

  # 1. Raw decoding with Pillow and the resize, no cache.
  rate, seconds = median_rate(
      lambda: decode_files(paths, args.image_size, progress=False), len(paths), args.repeats
  )
  record('raw decode + resize (decode_files)', rate, seconds)

  with tempfile.TemporaryDirectory() as tfds_dir:
    # 2. One-time TFDS preparation: decode, resize, encode as uint16 PNG, write.
    start = time.perf_counter()
    prepared = prepare_class_folder(
        args.data_dir, image_size=args.image_size, tfds_data_dir=tfds_dir
    )
    elapsed = time.perf_counter() - start
    record('TFDS prepare (first build)', len(paths) / elapsed, [elapsed])

    # 3. Reading every split into memory.
    total = sum(row.ok for row in prepared.manifest)
    rate, seconds = median_rate(
        lambda: [prepared.read_split(s) for s in prepared.split_names], total, args.repeats
    )
    record('TFDS read all splits into memory', rate, seconds)

    # 4. Streaming the training split in shuffled batches through tf.data.
    train_count = prepared.builder.info.splits['train'].num_examples

    def stream():
      for _ in prepared.tf_dataset('train', batch_size=args.batch_size, shuffle=True, seed=0):
        pass

    rate, seconds = median_rate(stream, train_count, args.repeats)
    record('TFDS stream train, shuffled batches', rate, seconds)

    # 5. Augmentation of in-memory batches with JAX (compile excluded).
    train = prepared.read_split('train')
    batches = [
        train.images[i:i + args.batch_size]
        for i in range(0, len(train) - args.batch_size + 1, args.batch_size)
    ]
    start = time.perf_counter()
    augment(batches[0], 0).block_until_ready()
    compile_seconds = time.perf_counter() - start
    print(f'{"augment: first call (jit compile)":<46} {compile_seconds:8.2f} s')
    results['augment_compile_seconds'] = round(compile_seconds, 2)

    def augment_all():
      for step, batch in enumerate(batches):
        augment(batch, step).block_until_ready()

    rate, seconds = median_rate(augment_all, len(batches) * args.batch_size, args.repeats)
    record('augment in-memory batches (JAX)', rate, seconds)

    # 6. The full streaming path: TFDS batches, then augmentation.
    def stream_and_augment():
      dataset = prepared.tf_dataset(
          'train', batch_size=args.batch_size, shuffle=True, seed=0, drop_remainder=True
      )
      for step, (images, _) in enumerate(dataset):
        augment(images.numpy(), step).block_until_ready()

    stream_count = (train_count // args.batch_size) * args.batch_size
    rate, seconds = median_rate(stream_and_augment, stream_count, args.repeats)
    record('TFDS stream + augment (training input)', rate, seconds)

  busy_after = cpu_busy_fraction()
  info['cpu_busy_after_end'] = round(busy_after, 3)
  if busy_after > MAX_IDLE_BUSY_FRACTION:
    print(f'WARNING: the CPU was {busy_after:.0%} busy after the benchmark; '
          'other processes may have distorted these numbers')

  if args.json:
    args.json.write_text(json.dumps({'machine': info, 'results': results}, indent=2))
    print(f'results written to {args.json}')


if __name__ == '__main__':
  main()
