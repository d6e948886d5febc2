"""Measure InceptionResNetV2 forward throughput: Flax under jax.jit vs Keras 3 (TensorFlow).

Every variant computes the same backbone (224x224 RGB, float32, no top) from
the same weights. The weights are random, because speed does not depend on
their values. They come from a Keras model and are converted to Flax in
memory, and the script prints how far each Flax variant's output is from
Keras'.

Variants (--variants):
  flax            jax.jit(models.InceptionResNetV2().apply), default XLA options
  flax-eltwise    the same with inference.CPU_COMPILER_OPTIONS
  folded          inference.jit_apply_folded(): BatchNorm and residual scales
                  folded, parallel 1x1 convolutions merged, CPU options on
  folded-streams  `folded` with each batch split over --streams threads
                  (inference.run_concurrently)
  keras-function  a tf.function calling the Keras model with training=False
  keras-predict   keras.Model.predict(batch_size=batch size)

Warm-up calls are excluded. Each measurement runs at least --min-images
images, and the variants take turns (in a rotating order) so that a change
in machine load affects all of them alike. The table gives the median of
--repeats measurements, and the ratio to keras-function is the median of the
per-round ratios. Before and during each measurement the script reads
/proc/stat and its own CPU time to find how many cores other processes used,
and marks measurements where they used more than --max-other-cores.

Usage:
  python benchmarks/backbone_throughput.py [--batch-sizes 1,16] [--repeats 5]
      [--variants flax,folded,keras-function] [--json results.json]

A full run takes about 3 to 5 minutes on a 2-core CPU.
"""

import os

# Keras must use TensorFlow, and TF's start-up logs would drown the table.
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import argparse
import dataclasses
import datetime
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax
import jax
import jaxlib
import keras
import numpy as np
import tensorflow as tf

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from flax_pet import inference  # noqa: E402
from flax_pet import keras_weights  # noqa: E402
from flax_pet import models  # noqa: E402

VARIANTS = (
    'flax', 'flax-eltwise', 'folded', 'folded-streams', 'keras-function',
    'keras-predict',
)
REFERENCE_VARIANT = 'keras-function'

# Flax outputs further than this from Keras' (relative to the largest Keras
# output) mean that the variants do not compute the same network.
PARITY_TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch-sizes', default='1,16',
                      help='comma-separated batch sizes (default: 1,16)')
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed measurements per variant and batch size; '
                           'the median is reported (default: 5)')
  parser.add_argument('--variants', default=','.join(VARIANTS),
                      help=f'comma-separated subset of {",".join(VARIANTS)}')
  parser.add_argument('--image-size', type=int, default=224,
                      help='input height and width in pixels (default: 224)')
  parser.add_argument('--streams', type=int, default=inference.DEFAULT_STREAMS,
                      help='threads per batch for folded-streams (default: '
                           f'{inference.DEFAULT_STREAMS})')
  parser.add_argument('--min-images', type=int, default=16,
                      help='images per measurement; small batches are called '
                           'repeatedly to reach it (default: 16)')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed calls after the first call (default: 1)')
  parser.add_argument('--max-other-cores', type=float, default=0.2,
                      help='CPU cores that other processes may use during a '
                           'measurement before it is marked as contended '
                           '(default: 0.2)')
  parser.add_argument('--wait-idle', type=float, default=0.0,
                      help='before each measurement, wait up to this many '
                           'seconds for other processes to use less than '
                           '--max-other-cores (default: 0, no wait)')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the random weights and images')
  parser.add_argument('--json', type=Path, default=None,
                      help='also write the machine, settings and every '
                           'measurement to this JSON file')
  args = parser.parse_args(argv)

  args.batch_sizes = [int(v) for v in args.batch_sizes.split(',') if v]
  args.variants = [v for v in args.variants.split(',') if v]
  unknown = sorted(set(args.variants) - set(VARIANTS))
  if unknown:
    parser.error(f'unknown variants {unknown}; choose from {", ".join(VARIANTS)}')
  if not args.batch_sizes or min(args.batch_sizes) < 1:
    parser.error(f'--batch-sizes must list positive integers, got {args.batch_sizes}')
  if args.repeats < 1 or args.min_images < 1 or args.streams < 1:
    parser.error('--repeats, --min-images and --streams must be at least 1')
  return args


# ---------------------------------------------------------------------------
# Machine and CPU load


def _cpuinfo_field(name: str) -> str:
  cpuinfo = Path('/proc/cpuinfo')
  if not cpuinfo.exists():
    return ''
  for line in cpuinfo.read_text().splitlines():
    if line.split(':', 1)[0].strip() == name:
      return line.split(':', 1)[1].strip()
  return ''


def machine_info() -> dict:
  """Collect the CPU, package versions, thread settings and the command."""
  flags = set(_cpuinfo_field('flags').split())
  memory_kib = 0
  meminfo = Path('/proc/meminfo')
  if meminfo.exists():
    memory_kib = int(meminfo.read_text().split('\n')[0].split()[1])
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': shlex.join([sys.executable, *sys.argv]),
      'cpu': _cpuinfo_field('model name') or platform.processor(),
      'cpu_family_model': f'{_cpuinfo_field("cpu family")}/{_cpuinfo_field("model")}',
      'cpu_flags': sorted(flags & {'avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16'}),
      'cpu_count': os.cpu_count(),
      'cpus_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'memory_gib': round(memory_kib / 2**20, 1),
      'platform': platform.platform(),
      'python': platform.python_version(),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'tensorflow': tf.__version__,
      'keras': keras.__version__,
      'numpy': np.__version__,
      'jax_backend': jax.default_backend(),
      'XLA_FLAGS': os.environ.get('XLA_FLAGS', '(unset)'),
      'TF_ENABLE_ONEDNN_OPTS': os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(unset)'),
      'tf_intra_op_threads': tf.config.threading.get_intra_op_parallelism_threads(),
      'tf_inter_op_threads': tf.config.threading.get_inter_op_parallelism_threads(),
      'folded_compiler_options': dict(inference.CPU_COMPILER_OPTIONS),
  }


@dataclasses.dataclass
class CpuSample:
  """CPU seconds of all processes and of this process at one moment."""

  all_busy: float
  own: float
  steal: float
  wall: float


def cpu_sample() -> CpuSample:
  # /proc/stat's first line: user nice system idle iowait irq softirq steal,
  # in clock ticks, summed over all CPUs.
  fields = [int(v) for v in Path('/proc/stat').read_text().split('\n')[0].split()[1:9]]
  ticks = os.sysconf('SC_CLK_TCK')
  busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
  return CpuSample(busy / ticks, time.process_time(), fields[7] / ticks, time.perf_counter())


def other_cores(before: CpuSample, after: CpuSample) -> float:
  """Return the cores that other processes (and the hypervisor) used in between."""
  wall = after.wall - before.wall
  if wall <= 0:
    return 0.0
  return max(0.0, (after.all_busy - before.all_busy) - (after.own - before.own)) / wall


def wait_for_idle(max_cores: float, timeout: float, probe_seconds: float = 0.3) -> float:
  """Probe until other processes use at most max_cores; return the last reading."""
  deadline = time.perf_counter() + timeout
  while True:
    before = cpu_sample()
    time.sleep(probe_seconds)
    reading = other_cores(before, cpu_sample())
    if reading <= max_cores or time.perf_counter() >= deadline:
      return reading


# ---------------------------------------------------------------------------
# Models


def keras_backbone(image_size: int, seed: int):
  """Return keras.applications.InceptionResNetV2 without top, random weights."""
  keras.utils.set_random_seed(seed)
  return keras.applications.InceptionResNetV2(
      include_top=False, weights=None, input_shape=(image_size, image_size, 3)
  )


def flax_variables_from_keras(model) -> dict:
  """Convert a Keras InceptionResNetV2's weights to Flax variables in memory."""
  layers = tuple(
      keras_weights.KerasLayer(
          layer.name,
          tuple(variable.path for variable in layer.weights),
          tuple(np.asarray(variable, np.float32) for variable in layer.weights),
      )
      for layer in model.layers
      if layer.weights
  )
  weight_file = keras_weights.KerasWeightFile(
      Path('<keras model in memory>'), 'weights-only', layers, keras.__version__,
      'tensorflow',
  )
  return keras_weights.convert_backbone(weight_file)


@dataclasses.dataclass
class Runner:
  """One variant at one batch size, ready to time."""

  run: Callable[[], object]
  compile_seconds: float | None
  first_call_seconds: float
  output: np.ndarray


def _jax_runner(jitted, variables, images, streams: int = 1) -> Runner:
  """Compile ahead of time, so that compilation is timed on its own."""
  start = time.perf_counter()
  if streams > 1 and images.shape[0] > 1:
    chunk_sizes = {len(c) for c in np.array_split(np.arange(images.shape[0]), streams)}
    compiled = {
        size: jitted.lower(variables, images[:size]).compile() for size in chunk_sizes
    }
    compile_seconds = time.perf_counter() - start
    by_shape = lambda folded, chunk: compiled[chunk.shape[0]](folded, chunk)
    apply_fn = inference.run_concurrently(by_shape, streams)
  else:
    apply_fn = jitted.lower(variables, images).compile()
    compile_seconds = time.perf_counter() - start

  first = time.perf_counter()
  output = np.asarray(apply_fn(variables, images))
  first_call_seconds = compile_seconds + time.perf_counter() - first
  run = lambda: apply_fn(variables, images).block_until_ready()
  return Runner(run, compile_seconds, first_call_seconds, output)


def build_runner(variant: str, batch_size: int, context: dict) -> Runner:
  """Return the Runner of one variant for one batch size."""
  images_np = context['images'][:batch_size]
  images = jax.device_put(images_np)

  if variant == 'flax':
    jitted = jax.jit(models.InceptionResNetV2().apply)
    return _jax_runner(jitted, context['variables'], images)
  if variant == 'flax-eltwise':
    jitted = jax.jit(
        models.InceptionResNetV2().apply,
        compiler_options=dict(inference.CPU_COMPILER_OPTIONS),
    )
    return _jax_runner(jitted, context['variables'], images)
  if variant == 'folded':
    return _jax_runner(inference.jit_apply_folded(), context['folded'], images)
  if variant == 'folded-streams':
    return _jax_runner(
        inference.jit_apply_folded(), context['folded'], images, context['streams']
    )

  model = context['keras_model']
  tensor = tf.constant(images_np)
  if variant == 'keras-function':
    function = context.setdefault(
        'keras_function', tf.function(lambda x: model(x, training=False))
    )
    run = lambda: function(tensor).numpy()
  elif variant == 'keras-predict':
    run = lambda: model.predict(tensor, batch_size=batch_size, verbose=0)
  else:
    raise ValueError(f'unknown variant {variant!r}')
  start = time.perf_counter()
  output = np.asarray(run())
  return Runner(run, None, time.perf_counter() - start, output)


# ---------------------------------------------------------------------------
# Measurement


def measure(runner: Runner, batch_size: int, args) -> dict:
  """Time one measurement of at least args.min_images images."""
  other_before = None
  if args.wait_idle > 0:
    other_before = wait_for_idle(args.max_other_cores, args.wait_idle)

  calls = max(1, math.ceil(args.min_images / batch_size))
  before = cpu_sample()
  for _ in range(calls):
    runner.run()
  after = cpu_sample()

  wall = after.wall - before.wall
  return {
      'images_per_second': calls * batch_size / wall,
      'seconds': wall,
      'calls': calls,
      'own_cores': (after.own - before.own) / wall,
      'other_cores': other_cores(before, after),
      'steal_cores': (after.steal - before.steal) / wall,
      'other_cores_before': other_before,
      'load_average_1min': os.getloadavg()[0],
  }


def relative_difference(reference: np.ndarray, output: np.ndarray) -> float:
  return float(np.max(np.abs(reference - output)) / np.max(np.abs(reference)))


def summarize(variants, measurements, args) -> list[dict]:
  """Return one table row per variant: medians, ratio, contention."""
  rows = []
  for variant in variants:
    runs = measurements[variant]
    rates = [m['images_per_second'] for m in runs]
    row = {
        'variant': variant,
        'images_per_second': statistics.median(rates),
        'min': min(rates),
        'max': max(rates),
        'own_cores': statistics.median(m['own_cores'] for m in runs),
        'other_cores_max': max(m['other_cores'] for m in runs),
        'contended_runs': sum(m['other_cores'] > args.max_other_cores for m in runs),
        'ratio_to_reference': None,
    }
    if REFERENCE_VARIANT in measurements:
      ratios = [
          m['images_per_second'] / reference['images_per_second']
          for m, reference in zip(runs, measurements[REFERENCE_VARIANT])
      ]
      row['ratio_to_reference'] = statistics.median(ratios)
    rows.append(row)
  return rows


def print_table(batch_size: int, rows, runners, parity) -> None:
  print(f'\nbatch {batch_size}:')
  print(f'  {"variant":16s} {"img/s":>7s} {"min-max":>13s} {"ratio":>6s} '
        f'{"compile s":>9s} {"1st call s":>10s} {"own cores":>9s} '
        f'{"other max":>9s} {"contended":>9s} {"rel diff":>8s}')
  for row in rows:
    runner = runners[row['variant']]
    ratio = row['ratio_to_reference']
    compile_seconds = runner.compile_seconds
    print(
        f'  {row["variant"]:16s} {row["images_per_second"]:7.2f} '
        f'{row["min"]:6.2f}-{row["max"]:<6.2f} '
        f'{"" if ratio is None else f"{ratio:.2f}":>6s} '
        f'{"" if compile_seconds is None else f"{compile_seconds:.1f}":>9s} '
        f'{runner.first_call_seconds:10.1f} {row["own_cores"]:9.2f} '
        f'{row["other_cores_max"]:9.2f} {row["contended_runs"]:9d} '
        f'{parity.get(row["variant"], float("nan")):8.1e}'
    )


def main(argv=None) -> None:
  args = parse_args(argv)
  info = machine_info()
  for key, value in info.items():
    print(f'{key}: {value}')
  print('weights: random (speed does not depend on the values of the weights)')

  idle_reading = wait_for_idle(args.max_other_cores, 0.0, probe_seconds=1.0)
  print(f'other processes before start: {idle_reading:.2f} cores')
  if idle_reading > args.max_other_cores:
    print(f'WARNING: other processes used {idle_reading:.2f} CPU cores before '
          'the start; the numbers below are lower than on an idle machine.')

  start = time.perf_counter()
  keras_model = keras_backbone(args.image_size, args.seed)
  variables = flax_variables_from_keras(keras_model)
  rng = np.random.default_rng(args.seed)
  context = {
      'keras_model': keras_model,
      # On the device like the folded variables, so no variant pays a
      # host-to-device copy per call.
      'variables': jax.device_put(variables),
      'folded': inference.fold_backbone(variables),
      'streams': args.streams,
      'images': rng.uniform(
          -1.0, 1.0, (max(args.batch_sizes), args.image_size, args.image_size, 3)
      ).astype(np.float32),
  }
  print(f'models built in {time.perf_counter() - start:.1f} s')

  results = {'machine': info, 'settings': {
      k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
  }, 'batches': {}}
  for batch_size in args.batch_sizes:
    runners, parity = {}, {}
    for variant in args.variants:
      runners[variant] = build_runner(variant, batch_size, context)
      for _ in range(args.warmup):
        runners[variant].run()

    reference = (runners.get('keras-function') or runners.get('keras-predict'))
    if reference is not None:
      for variant, runner in runners.items():
        parity[variant] = relative_difference(reference.output, runner.output)
        if parity[variant] > PARITY_TOLERANCE:
          print(f'WARNING: {variant} differs from Keras by {parity[variant]:.1e} '
                'of the largest output; it does not compute the same network.')

    measurements = {variant: [] for variant in args.variants}
    for round_index in range(args.repeats):
      # Rotate the order so that no variant always runs first.
      shift = round_index % len(args.variants)
      for variant in args.variants[shift:] + args.variants[:shift]:
        measurements[variant].append(measure(runners[variant], batch_size, args))

    rows = summarize(args.variants, measurements, args)
    print_table(batch_size, rows, runners, parity)
    contended = sum(row['contended_runs'] for row in rows)
    if contended:
      print(f'  WARNING: in {contended} of {args.repeats * len(rows)} '
            f'measurements other processes used more than '
            f'{args.max_other_cores} cores; compare the ratios, which are '
            'taken within a round, rather than the absolute numbers.')
    results['batches'][str(batch_size)] = {
        'rows': rows,
        'measurements': measurements,
        'compile_seconds': {v: r.compile_seconds for v, r in runners.items()},
        'first_call_seconds': {v: r.first_call_seconds for v, r in runners.items()},
        'relative_difference_to_keras': parity,
    }
    del runners

  print(f'\ntotal time {time.perf_counter() - start:.0f} s')
  if args.json:
    args.json.write_text(json.dumps(results, indent=2) + '\n')
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
