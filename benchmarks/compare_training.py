"""Train flax-pet and the Keras notebook recipe on the same data and compare them.

Steps, each logged with its command and wall time:

1. Write a seeded random Keras InceptionResNetV2 weights file (legacy HDF5,
   as RadImageNet's files are) and convert it with
   convert/radimagenet_to_flax.py. No pretrained weights are used, so the
   accuracies carry no information about RadImageNet. They only show whether
   the two recipes agree when they start from the same backbone.
2. Run `train.py --config configs/pet_mip.py` on the data, timed from process
   start to exit (summary.json is written last).
3. Export flax-pet's per-image val/test predictions from its best checkpoint
   and cached features, and check that the pixels it trained on equal the
   ones `keras_recipe.py` decodes.
4. Run benchmarks/keras_recipe.py on the run's manifest and settings.
5. Compare: wall times and their ratio, test accuracies with Wilson 95% CIs,
   the paired difference (Newcombe's interval, exact McNemar test on the same
   test images), prediction agreement and backbone feature agreement.

Other processes' CPU use is sampled every few seconds during each run,
because the timings mean little on a machine that other jobs share.

Usage:
  python benchmarks/compare_training.py --data-dir PET_MIP_FOLDER \
      [--out workdirs/compare_training] [--num-epochs N] [--reuse]

Outputs in OUT: comparison.json, comparison.md, flax/ (the flax-pet workdir),
keras/ (result.json), logs/, weights/.
"""

import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

logger = logging.getLogger('compare_training')

PYTHON = sys.executable
DEFAULT_DATA_DIR = REPO_ROOT.parent / 'shared' / 'data' / 'pet-mip'
DEFAULT_OUT = REPO_ROOT / 'workdirs' / 'compare_training'
DEFAULT_CONFIG = 'configs/pet_mip.py'

# Seconds between two samples of the CPU counters while a run is going on.
LOAD_SAMPLE_SECONDS = 5.0

CLOCK_TICKS = os.sysconf('SC_CLK_TCK')


# ---------------------------------------------------------------------------
# Machine and load.


def machine_description() -> dict:
  """Return the CPU model, core counts, memory, OS and Python version."""
  cpu_model = platform.processor() or 'unknown'
  cpuinfo = Path('/proc/cpuinfo')
  if cpuinfo.is_file():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith('model name'):
        cpu_model = line.split(':', 1)[1].strip()
        break
  memory_gib = None
  meminfo = Path('/proc/meminfo')
  if meminfo.is_file():
    for line in meminfo.read_text().splitlines():
      if line.startswith('MemTotal:'):
        memory_gib = round(int(line.split()[1]) / 2**20, 1)
  return {
      'cpu': cpu_model,
      'logical_cores': os.cpu_count(),
      'usable_cores': len(os.sched_getaffinity(0)),
      'memory_gib': memory_gib,
      'os': platform.platform(),
      'python': platform.python_version(),
  }


def _system_busy_ticks() -> int:
  # First line of /proc/stat: cpu user nice system idle iowait irq softirq steal ...
  # Busy time is user + nice + system + irq + softirq; steal time goes to
  # other virtual machines and is not counted.
  fields = [int(value) for value in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
  return fields[0] + fields[1] + fields[2] + fields[5] + fields[6]


def _process_ticks() -> dict[int, tuple[int, int, str]]:
  """Return {pid: (parent pid, user + system ticks, command name)} of live processes."""
  table = {}
  for entry in os.scandir('/proc'):
    if not entry.name.isdigit():
      continue
    try:
      text = Path(entry.path, 'stat').read_text()
    except OSError:
      continue  # the process exited while /proc was listed
    name = text[text.index('(') + 1:text.rindex(')')]
    rest = text[text.rindex(')') + 2:].split()
    # Fields after the name: state ppid ... utime (index 11) stime (index 12).
    table[int(entry.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]), name)
  return table


def _own_tree(table) -> set[int]:
  own = {os.getpid()}
  changed = True
  while changed:
    changed = False
    for pid, (parent, _, _) in table.items():
      if parent in own and pid not in own:
        own.add(pid)
        changed = True
  return own


class CpuSample:
  """CPU use over one interval: the whole system, this script's process tree, the rest."""

  def __init__(self, seconds: float, system_ticks: int, own_ticks: int, top_others):
    self.seconds = seconds
    self.system_cores = system_ticks / CLOCK_TICKS / seconds
    self.own_cores = own_ticks / CLOCK_TICKS / seconds
    # Ticks of children that exited in the interval are lost from own_ticks,
    # so this can overstate other processes' use slightly.
    self.other_cores = max(0.0, self.system_cores - self.own_cores)
    self.top_others = top_others

  def to_dict(self) -> dict:
    return {
        'seconds': round(self.seconds, 2),
        'system_cores_busy': round(self.system_cores, 2),
        'this_benchmark_cores': round(self.own_cores, 2),
        'other_processes_cores': round(self.other_cores, 2),
        'top_other_processes': self.top_others,
    }


def sample_cpu(seconds: float = 3.0) -> CpuSample:
  """Measure CPU use over `seconds`, split into this benchmark and everything else."""
  system_before, table_before = _system_busy_ticks(), _process_ticks()
  started = time.perf_counter()
  time.sleep(seconds)
  system_after, table_after = _system_busy_ticks(), _process_ticks()
  elapsed = time.perf_counter() - started

  own = _own_tree(table_after) | _own_tree(table_before)
  own_ticks = 0
  others = []
  for pid, (_, ticks, name) in table_after.items():
    delta = ticks - table_before.get(pid, (0, ticks, ''))[1]
    if pid in own:
      own_ticks += delta
    elif delta > 0:
      others.append((delta, pid, name))
  others.sort(reverse=True)
  top = [
      {'pid': pid, 'command': name, 'cores': round(delta / CLOCK_TICKS / elapsed, 2)}
      for delta, pid, name in others[:5]
  ]
  return CpuSample(elapsed, system_after - system_before, own_ticks, top)


class LoadMonitor:
  """Sample CPU use in a background thread while a run is going on."""

  def __init__(self, interval: float = LOAD_SAMPLE_SECONDS):
    self.interval = interval
    self.samples: list[CpuSample] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def _loop(self):
    while not self._stop.is_set():
      self.samples.append(sample_cpu(self.interval))

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()

  def summary(self) -> dict:
    """Return the mean and maximum cores used by other processes and by this benchmark."""
    if not self.samples:
      return {'samples': 0}
    other = np.array([s.other_cores for s in self.samples])
    own = np.array([s.own_cores for s in self.samples])
    return {
        'samples': len(self.samples),
        'interval_s': self.interval,
        'other_processes_cores_mean': round(float(other.mean()), 2),
        'other_processes_cores_max': round(float(other.max()), 2),
        'this_benchmark_cores_mean': round(float(own.mean()), 2),
    }


# ---------------------------------------------------------------------------
# Statistics of two classifiers on the same test images.


def paired_difference_interval(both: int, only_first: int, only_second: int, neither: int,
                               confidence: float = 0.95) -> dict:
  """Estimate the difference of two paired proportions with Newcombe's score interval.

  Newcombe's square-and-add interval for paired data (Statistics in Medicine
  17:2635-2650, 1998) combines the Wilson intervals (l1, u1) and (l2, u2) of
  both proportions with the phi correlation of the 2x2 table, without
  continuity correction:

    low  = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
    high = d + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)

  This is what `binomDiffCI(paired=TRUE, method='wilson')` of the R package
  MKinfer computes.

  Args:
    both: images both classifiers got right.
    only_first: images only the first got right.
    only_second: images only the second got right.
    neither: images both got wrong.
    confidence: coverage of the interval.

  Returns:
    {'value': p1 - p2, 'ci_low', 'ci_high', 'n', 'method'}.

  Raises:
    ValueError: if there are no images.
  """
  from flax_pet import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  n = both + only_first + only_second + neither
  if n < 1:
    raise ValueError('A paired difference needs at least one image, got an empty table.')
  first_right, second_right = both + only_first, both + only_second
  p1, p2 = first_right / n, second_right / n
  low1, high1 = metrics_lib.wilson_interval(first_right, n, confidence)
  low2, high2 = metrics_lib.wilson_interval(second_right, n, confidence)

  margins = first_right * (n - first_right) * second_right * (n - second_right)
  phi = 0.0 if margins == 0 else (both * neither - only_first * only_second) / math.sqrt(margins)
  difference = p1 - p2
  below = (p1 - low1)**2 - 2 * phi * (p1 - low1) * (high2 - p2) + (high2 - p2)**2
  above = (p2 - low2)**2 - 2 * phi * (p2 - low2) * (high1 - p1) + (high1 - p1)**2
  return {
      'value': difference,
      'ci_low': max(-1.0, difference - math.sqrt(max(0.0, below))),
      'ci_high': min(1.0, difference + math.sqrt(max(0.0, above))),
      'n': n,
      'method': "Newcombe's paired score interval",
  }


def mcnemar_exact(only_first: int, only_second: int) -> float:
  """Return the two-sided exact McNemar p-value from the discordant pair counts."""
  from scipy import stats  # pylint: disable=import-outside-toplevel

  discordant = only_first + only_second
  if discordant == 0:
    return 1.0
  return float(stats.binomtest(only_first, discordant, 0.5).pvalue)


def compare_predictions(flax_test: list[dict], keras_test: list[dict]) -> dict:
  """Compare two classifiers' predictions on the same test images.

  Args:
    flax_test: flax-pet's rows {'path', 'label', 'predicted', 'probabilities'}.
    keras_test: the Keras recipe's rows of the same form.

  Returns:
    The paired 2x2 table, the accuracy difference with its interval, the
    exact McNemar p-value and how often the predicted classes agree.

  Raises:
    RuntimeError: if the lists do not cover the same images with the same labels.
  """
  flax_by_path = {row['path']: row for row in flax_test}
  keras_by_path = {row['path']: row for row in keras_test}
  if set(flax_by_path) != set(keras_by_path):
    unmatched = sorted(set(flax_by_path) ^ set(keras_by_path))
    raise RuntimeError(
        f'flax-pet and Keras predictions cover different test images, e.g. {unmatched[:5]}; '
        'run the Keras recipe again on the flax-pet workdir.'
    )
  paths = sorted(flax_by_path)
  flax_rows = [flax_by_path[path] for path in paths]
  keras_rows = [keras_by_path[path] for path in paths]
  labels = np.array([row['label'] for row in flax_rows])
  if np.any(labels != np.array([row['label'] for row in keras_rows])):
    raise RuntimeError('flax-pet and Keras predictions give different labels for the same image.')

  flax_predicted = np.array([row['predicted'] for row in flax_rows])
  keras_predicted = np.array([row['predicted'] for row in keras_rows])
  flax_right = flax_predicted == labels
  keras_right = keras_predicted == labels
  probability_difference = np.abs(
      np.array([row['probabilities'] for row in flax_rows])
      - np.array([row['probabilities'] for row in keras_rows])
  )

  table = {
      'both_right': int(np.sum(flax_right & keras_right)),
      'only_flax_right': int(np.sum(flax_right & ~keras_right)),
      'only_keras_right': int(np.sum(~flax_right & keras_right)),
      'both_wrong': int(np.sum(~flax_right & ~keras_right)),
  }
  return {
      'n': len(paths),
      'paired_table': table,
      'accuracy_difference_flax_minus_keras': paired_difference_interval(
          table['both_right'], table['only_flax_right'], table['only_keras_right'],
          table['both_wrong'],
      ),
      'mcnemar_exact_p': mcnemar_exact(table['only_flax_right'], table['only_keras_right']),
      'same_predicted_class': int(np.sum(flax_predicted == keras_predicted)),
      'max_abs_probability_difference': float(np.max(probability_difference)),
  }


# ---------------------------------------------------------------------------
# Steps that run in their own process (memory of TF, JAX and Keras is freed).


def make_weights(output: Path, seed: int, image_size: int) -> None:
  """Write a seeded random Keras IRV2 (no top) in the legacy HDF5 layout."""
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  import keras  # pylint: disable=import-outside-toplevel

  from tests import keras_h5  # pylint: disable=import-outside-toplevel

  model = keras_h5.random_irv2(keras, image_size, seed)
  output.parent.mkdir(parents=True, exist_ok=True)
  partial = output.with_name(output.name + '.partial')
  keras_h5.write_weights_h5(partial, keras_h5.model_layers(model))
  partial.rename(output)
  logger.info('Wrote random IRV2 weights (seed %d) to %s.', seed, output)


def _run_config(workdir: Path):
  """Rebuild the ml_collections config of a flax-pet run from its config.json."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  from configs import seed as seed_config  # pylint: disable=import-outside-toplevel

  resolved = json.loads((workdir / 'config.json').read_text())
  config = seed_config.get_config()
  for key in config.keys():
    if key in resolved:
      value = resolved[key]
      config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return config, resolved


def export_flax_predictions(workdir: Path, output: Path, data_dir: Path | None) -> None:
  """Write flax-pet's val/test predictions of the best checkpoint, and check the pixels.

  Uses the run's cached features (no backbone pass when the cache is intact)
  and the best head checkpoint, the state that summary.json reports.

  Raises:
    RuntimeError: if the recomputed test accuracy differs from summary.json.
  """
  # pylint: disable=import-outside-toplevel
  import jax
  import keras_recipe
  from sklearn.metrics import f1_score

  from flax_pet import checkpoints, experiment, models, training
  from flax_pet import metrics as metrics_lib
  # pylint: enable=import-outside-toplevel

  config, resolved = _run_config(workdir)
  if data_dir is not None:
    config.data_dir = str(data_dir)
  elif not Path(config.data_dir).is_absolute():
    config.data_dir = str(keras_recipe.resolve_data_dir(resolved, None))
  dataset = experiment.load_dataset(config, workdir)
  backbone = experiment.load_backbone_weights(config)
  features = experiment.compute_features(config, workdir, dataset, backbone)

  head = models.ClassifierHead(
      len(dataset.class_names), config.hidden_units, config.dropout_rate
  )
  state = training.create_train_state(
      head, jax.random.key(config.seed), training.create_optimizer()
  )
  run_checkpoints = checkpoints.RunCheckpoints(workdir)
  state, progress = run_checkpoints.restore(checkpoints.BEST, state)
  run_checkpoints.close()

  summary = json.loads((workdir / 'summary.json').read_text())
  result = {'best_epoch': progress['epoch']}
  for name in ('val', 'test'):
    split = dataset.splits[name]
    logits = head.apply({'params': state.params}, features[name])
    probabilities = np.asarray(jax.nn.softmax(logits))
    predicted = probabilities.argmax(-1)
    labels = np.asarray(split.labels)
    correct = int(np.sum(predicted == labels))
    if correct != summary[name]['accuracy']['successes']:
      raise RuntimeError(
          f'{name}: the best checkpoint in {workdir} gives {correct} correct, '
          f'summary.json says {summary[name]["accuracy"]["successes"]}.'
      )
    result[name] = {
        'n': int(len(labels)),
        'loss': summary[name]['loss'],
        'accuracy': metrics_lib.proportion_ci(correct, len(labels)),
        'weighted_f1': float(f1_score(labels, predicted, average='weighted', zero_division=0)),
        'macro_f1': float(f1_score(labels, predicted, average='macro', zero_division=0)),
        'predictions': [
            {
                'path': path,
                'label': int(label),
                'predicted': int(prediction),
                'probabilities': row.tolist(),
            }
            for path, label, prediction, row in zip(split.paths, labels, predicted, probabilities)
        ],
    }

  # The Keras recipe decodes the manifest's files itself; they must give the
  # very pixels flax-pet trained on.
  decoded = keras_recipe.load_split_images(
      workdir / 'manifest.csv', config.data_dir, config.image_size, config.resize
  )
  pixel_check = {}
  for name, split in dataset.splits.items():
    if decoded[name]['paths'] != list(split.paths):
      raise RuntimeError(
          f'{name}: the files of {workdir / "manifest.csv"} differ from the flax-pet '
          f'dataset split of the same name; delete {workdir} and train again.'
      )
    pixel_check[name] = float(np.max(np.abs(decoded[name]['images'] - split.images)))
  result['pixel_max_abs_difference'] = pixel_check
  result['test_features'] = np.asarray(features['test']).tolist()
  output.write_text(json.dumps(result) + '\n')
  logger.info('Wrote flax-pet predictions to %s; pixel differences %s.', output, pixel_check)


# ---------------------------------------------------------------------------
# The benchmark.


def run_timed(name: str, command: list[str], log_path: Path) -> dict:
  """Run a command with its output in a log file; return its wall time and the CPU load.

  Raises:
    RuntimeError: if the command fails.
  """
  log_path.parent.mkdir(parents=True, exist_ok=True)
  logger.info('%s: %s (log: %s)', name, ' '.join(command), log_path)
  before = sample_cpu()
  with open(log_path, 'w') as log, LoadMonitor() as monitor:
    started = time.perf_counter()
    process = subprocess.run(
        command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False
    )
    wall = time.perf_counter() - started
  after = sample_cpu()
  if process.returncode != 0:
    tail = ''.join(log_path.read_text().splitlines(keepends=True)[-20:])
    raise RuntimeError(
        f'{name} failed with exit code {process.returncode}; end of {log_path}:\n{tail}'
    )

  during = monitor.summary()
  logger.info(
      '%s: %.1f s wall; other processes used %s cores on average.',
      name, wall, during.get('other_processes_cores_mean'),
  )
  return {
      'command': ' '.join(command),
      'wall_s': wall,
      'load_before': before.to_dict(),
      'load_during': during,
      'load_after': after.to_dict(),
  }


def run_or_reuse(name: str, command: list[str], result: Path, timing_path: Path,
                 log_path: Path, reuse: bool, clear: Path | None = None) -> dict:
  """Run a step, or reuse its earlier result and the timing measured then.

  Args:
    name: the step's name in logs.
    command: the command line.
    result: the file the step writes last; its presence marks a finished step.
    timing_path: JSON file that keeps the step's timing for later reuse.
    log_path: file for the command's output.
    reuse: reuse a finished step instead of running it again.
    clear: a folder to delete before running, so that nothing is cached.

  Returns:
    The timing of `run_timed`, plus 'reused'.
  """
  if reuse and result.exists() and timing_path.is_file():
    logger.info('Reusing the finished step %r (%s).', name, result)
    return json.loads(timing_path.read_text()) | {'reused': True}

  if clear is not None and clear.exists():
    shutil.rmtree(clear)
  timing_path.unlink(missing_ok=True)
  timing = run_timed(name, command, log_path)
  timing_path.parent.mkdir(parents=True, exist_ok=True)
  timing_path.write_text(json.dumps(timing, indent=2) + '\n')
  return timing | {'reused': False}


def _relative(path: Path) -> str:
  try:
    return str(path.resolve().relative_to(REPO_ROOT))
  except ValueError:
    return str(path)


def run_benchmark(args) -> dict:
  """Run every step and write OUT/comparison.json and OUT/comparison.md.

  Raises:
    FileNotFoundError: if the data folder does not exist.
    RuntimeError: if a step fails or the runs disagree on their own results.
  """
  out = Path(args.out).resolve()
  flax_dir, keras_dir, logs, timings = out / 'flax', out / 'keras', out / 'logs', out / 'timings'
  weights_h5 = out / 'weights' / f'irv2_random_seed{args.weights_seed}.h5'
  converted = out / 'weights' / f'irv2_random_seed{args.weights_seed}_flax'
  data_dir = Path(args.data_dir).resolve()
  if not data_dir.is_dir():
    raise FileNotFoundError(
        f'data folder {data_dir} not found; pass --data-dir with the class folders.'
    )
  report = {'machine': machine_description(), 'data_dir': str(data_dir), 'steps': {}}
  logger.info('Machine: %s', report['machine'])
  this_script = _relative(Path(__file__))
  steps = report['steps']

  # 1. The same random backbone for both recipes. The files are reused
  # whenever they exist, because the seed fixes their content.
  steps['make_weights'] = run_or_reuse('make weights', [
      PYTHON, this_script, 'make-weights', '--output', str(weights_h5),
      '--seed', str(args.weights_seed),
  ], weights_h5, timings / 'make_weights.json', logs / 'make_weights.log', reuse=True)
  steps['convert'] = run_or_reuse('convert', [
      PYTHON, 'convert/radimagenet_to_flax.py', '--h5', str(weights_h5),
      '--output', str(converted), '--input-convention', 'unit',
  ], converted, timings / 'convert.json', logs / 'convert.log', reuse=True, clear=converted)

  # 2. flax-pet, from a fresh workdir so that no feature or dataset is cached.
  command = [
      PYTHON, 'train.py', '--config', args.config, '--workdir', str(flax_dir),
      f'--config.data_dir={data_dir}', f'--config.weights={converted}',
  ]
  if args.num_epochs is not None:
    command.append(f'--config.num_epochs={args.num_epochs}')
  steps['flax'] = run_or_reuse(
      'flax-pet train.py', command, flax_dir / 'summary.json', timings / 'flax.json',
      logs / 'flax.log', args.reuse, clear=flax_dir,
  )

  # 3. flax-pet's per-image predictions and the pixel check.
  flax_predictions = out / 'flax_predictions.json'
  steps['flax_predictions'] = run_timed('flax-pet predictions', [
      PYTHON, this_script, 'flax-predictions', '--workdir', str(flax_dir),
      '--output', str(flax_predictions), '--data-dir', str(data_dir),
  ], logs / 'flax_predictions.log')

  # 4. The Keras recipe on the same manifest and settings. Its result belongs
  # to the flax-pet run whose manifest it read, so it is reused only with it.
  if not args.skip_keras:
    steps['keras'] = run_or_reuse('Keras recipe', [
        PYTHON, 'benchmarks/keras_recipe.py', '--workdir', str(flax_dir),
        '--weights-h5', str(weights_h5), '--output', str(keras_dir),
        '--data-dir', str(data_dir),
    ], keras_dir / 'result.json', timings / 'keras.json', logs / 'keras.log',
        args.reuse and steps['flax']['reused'], clear=keras_dir)

  # 5. Comparison.
  report['comparison'] = summarize(out, flax_dir, keras_dir, flax_predictions, report)
  (out / 'comparison.json').write_text(json.dumps(report, indent=2) + '\n')
  markdown = comparison_markdown(report)
  (out / 'comparison.md').write_text(markdown)
  print(markdown)
  return report


def flax_feature_throughput(log_path: Path) -> dict:
  """Sum flax-pet's feature extraction log lines into images, seconds and images/s."""
  pattern = re.compile(r'Computed .* features for (\d+) images in ([\d.]+) s')
  images, seconds = 0, 0.0
  if log_path.is_file():
    for match in pattern.finditer(log_path.read_text()):
      images += int(match.group(1))
      seconds += float(match.group(2))
  return {
      'images': images,
      'seconds': seconds,
      'images_per_s': images / seconds if seconds else None,
  }


def learning_curves(flax_metrics: list[dict], keras_history: list[dict]) -> dict:
  """Pair both runs' per-epoch losses over the epochs that both ran."""
  epochs = min(len(flax_metrics), len(keras_history))
  rows = [
      {
          'epoch': epoch,
          'flax_train_loss': flax_metrics[epoch]['train_loss'],
          'keras_train_loss': keras_history[epoch]['loss'],
          'flax_val_loss': flax_metrics[epoch]['val_loss'],
          'keras_val_loss': keras_history[epoch]['val_loss'],
          'flax_val_accuracy': flax_metrics[epoch]['val_accuracy'],
          'keras_val_accuracy': keras_history[epoch]['val_accuracy'],
      }
      for epoch in range(epochs)
  ]
  val_difference = [abs(row['flax_val_loss'] - row['keras_val_loss']) for row in rows]
  return {
      'epochs': rows,
      'val_loss_max_abs_difference': max(val_difference) if rows else None,
  }


def _without_predictions(split: dict) -> dict:
  return {key: value for key, value in split.items() if key != 'predictions'}


def _intervals_overlap(first: dict, second: dict) -> bool:
  return first['ci_low'] <= second['ci_high'] and second['ci_low'] <= first['ci_high']


def summarize(out: Path, flax_dir: Path, keras_dir: Path, flax_predictions: Path,
              report: dict) -> dict:
  """Collect both runs' results into the comparison section of the report.

  Raises:
    RuntimeError: if the Keras test features are not in flax-pet's image order.
  """
  flax_summary = json.loads((flax_dir / 'summary.json').read_text())
  flax_result = json.loads(flax_predictions.read_text())
  flax_config = json.loads((flax_dir / 'config.json').read_text())
  metrics_lines = (flax_dir / 'metrics.jsonl').read_text().splitlines()
  flax_metrics = [json.loads(line) for line in metrics_lines if line]
  comparison = {
      'flax': {
          'wall_s': report['steps']['flax']['wall_s'],
          'epochs_run': flax_summary['epochs_run'],
          'best_epoch': flax_summary['best_epoch'],
          'head_training_s': float(sum(row['seconds'] for row in flax_metrics)),
          'test': _without_predictions(flax_result['test']),
          'val': _without_predictions(flax_result['val']),
          'augmented_views': flax_config['augmented_views'],
          'feature_extraction': flax_feature_throughput(out / 'logs' / 'flax.log'),
      },
      'pixel_max_abs_difference': flax_result['pixel_max_abs_difference'],
  }
  keras_result_path = keras_dir / 'result.json'
  if 'keras' not in report['steps'] or not keras_result_path.is_file():
    return comparison

  keras_result = json.loads(keras_result_path.read_text())
  n = keras_result['n']
  keras = {
      'wall_s': report['steps']['keras']['wall_s'],
      'epochs_run': keras_result['epochs_run'],
      'best_epoch': keras_result['best_epoch'],
      'fit_s': keras_result['times']['fit_s'],
      'epoch_mean_s': keras_result['times']['epoch_mean_s'],
      'test': _without_predictions(keras_result['test']),
      'val': _without_predictions(keras_result['val']),
      'versions': keras_result['versions'],
      # Every epoch runs the backbone on the train and the val images.
      'backbone_images': keras_result['epochs_run'] * (n['train'] + n['val']),
  }
  keras['backbone_images_per_s'] = keras['backbone_images'] / keras['fit_s']
  comparison['keras'] = keras
  comparison['wall_time_ratio_keras_over_flax'] = keras['wall_s'] / comparison['flax']['wall_s']
  comparison['test_cis_overlap'] = _intervals_overlap(
      comparison['flax']['test']['accuracy'], keras['test']['accuracy']
  )
  comparison['paired_test'] = compare_predictions(
      flax_result['test']['predictions'], keras_result['test']['predictions']
  )
  comparison['learning_curves'] = learning_curves(flax_metrics, keras_result['history'])

  keras_features = np.load(keras_dir / 'test_features.npz')
  flax_features = np.asarray(flax_result['test_features'], np.float32)
  flax_paths = [row['path'] for row in flax_result['test']['predictions']]
  if list(keras_features['paths']) != flax_paths:
    raise RuntimeError(
        f'{keras_dir / "test_features.npz"} lists the test images in another order than '
        f'{flax_predictions}; run both steps again.'
    )
  difference = np.abs(keras_features['features'] - flax_features)
  comparison['backbone_feature_max_abs_difference'] = float(np.max(difference))
  comparison['backbone_feature_max_abs'] = float(np.max(np.abs(flax_features)))
  return comparison


def _accuracy_text(accuracy: dict) -> str:
  return (
      f'{accuracy["value"]:.3f} ({accuracy["successes"]}/{accuracy["n"]}; '
      f'95% CI {accuracy["ci_low"]:.3f}-{accuracy["ci_high"]:.3f})'
  )


def _load_text(step: dict) -> str:
  during = step['load_during']
  return (
      f'{step["load_before"]["other_processes_cores"]} / '
      f'{during.get("other_processes_cores_mean")} '
      f'(max {during.get("other_processes_cores_max")}) / '
      f'{step["load_after"]["other_processes_cores"]}'
  )


def _results_table(report: dict) -> list[str]:
  comparison = report['comparison']
  flax = comparison['flax']
  keras = comparison.get('keras')
  lines = [
      '| | flax-pet `train.py` | Keras recipe (`model.fit`) |',
      '| --- | --- | --- |',
  ]

  def row(label, flax_value, keras_value=None):
    lines.append(f'| {label} | {flax_value} | {keras_value if keras else "not run"} |')

  row('wall time, process start to exit', f'{flax["wall_s"]:.0f} s',
      keras and f'{keras["wall_s"]:.0f} s')
  row('training loop', f'{flax["head_training_s"]:.1f} s (head on cached features)',
      keras and f'{keras["fit_s"]:.0f} s ({keras["epoch_mean_s"]:.1f} s per epoch)')

  extraction = flax['feature_extraction']
  flax_backbone = 'not found in the log'
  if extraction['images_per_s']:
    flax_backbone = (
        f'{extraction["images"]} images once, {extraction["seconds"]:.0f} s '
        f'({extraction["images_per_s"]:.1f} img/s)'
    )
  row('backbone forward passes', flax_backbone,
      keras and f'{keras["backbone_images"]} images during fit '
      f'({keras["backbone_images_per_s"]:.1f} img/s, with augmentation and head)')
  row('epochs run / best epoch (1-based)', f'{flax["epochs_run"]} / {flax["best_epoch"] + 1}',
      keras and f'{keras["epochs_run"]} / {keras["best_epoch"] + 1}')
  row('test accuracy', _accuracy_text(flax['test']['accuracy']),
      keras and _accuracy_text(keras['test']['accuracy']))
  row('test weighted F1', f'{flax["test"]["weighted_f1"]:.3f}',
      keras and f'{keras["test"]["weighted_f1"]:.3f}')
  row('val accuracy', _accuracy_text(flax['val']['accuracy']),
      keras and _accuracy_text(keras['val']['accuracy']))
  steps = report['steps']
  row('cores used by other processes: before / during (mean) / after',
      _load_text(steps['flax']), 'keras' in steps and _load_text(steps['keras']))
  return lines + ['']


def _agreement_lines(comparison: dict) -> list[str]:
  paired = comparison['paired_test']
  table = paired['paired_table']
  difference = paired['accuracy_difference_flax_minus_keras']
  overlap = 'yes' if comparison['test_cis_overlap'] else 'no'
  curves = comparison['learning_curves']
  lines = [
      f'- Wall time ratio Keras / flax-pet: {comparison["wall_time_ratio_keras_over_flax"]:.1f}.',
      f'- Test accuracy 95% CIs overlap: {overlap}. Paired difference flax-pet minus Keras: '
      f'{difference["value"]:+.3f} (95% CI {difference["ci_low"]:+.3f} to '
      f'{difference["ci_high"]:+.3f}, {difference["method"]}).',
      f'- Exact McNemar test: p = {paired["mcnemar_exact_p"]:.3f}, with '
      f'{table["only_flax_right"]} images right only in flax-pet and '
      f'{table["only_keras_right"]} right only in Keras.',
      f'- Same predicted class on {paired["same_predicted_class"]} of {paired["n"]} test images; '
      f'largest probability difference {paired["max_abs_probability_difference"]:.1e}.',
      f'- Backbone features of the unaugmented test images, Keras vs flax-pet: max abs '
      f'difference {comparison["backbone_feature_max_abs_difference"]:.2e} (largest value '
      f'{comparison["backbone_feature_max_abs"]:.2f}).',
      f'- Validation loss, largest difference between the runs in any epoch: '
      f'{curves["val_loss_max_abs_difference"]:.4f}.',
      '',
      '| epoch | flax-pet train loss | Keras train loss | flax-pet val loss | Keras val loss |',
      '| --- | --- | --- | --- | --- |',
  ]
  rows = curves['epochs']
  # The first and last epoch and every fifth one.
  table_rows = sorted({0, len(rows) - 1, *range(4, len(rows), 5)})
  for index in table_rows:
    epoch = rows[index]
    lines.append(
        f'| {epoch["epoch"] + 1} | {epoch["flax_train_loss"]:.4f} | '
        f'{epoch["keras_train_loss"]:.4f} | {epoch["flax_val_loss"]:.4f} | '
        f'{epoch["keras_val_loss"]:.4f} |'
    )
  return lines + ['']


def comparison_markdown(report: dict) -> str:
  """Format the comparison as the body of a Markdown section."""
  machine = report['machine']
  comparison = report['comparison']
  lines = [
      f'Machine: {machine["cpu"]}, {machine["usable_cores"]} usable cores, '
      f'{machine["memory_gib"]} GiB, {machine["os"]}, Python {machine["python"]}.',
      '',
  ]
  lines += _results_table(report)
  if 'keras' in comparison:
    lines += _agreement_lines(comparison)
  pixel_difference = max(comparison['pixel_max_abs_difference'].values())
  lines += [
      f'- Pixels decoded by the Keras script vs the ones flax-pet trained on: max abs '
      f'difference {pixel_difference:.1e}.',
      '',
      'Commands:',
      '',
      '```',
      *[step['command'] for step in report['steps'].values()],
      '```',
      '',
  ]
  return '\n'.join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  subparsers = parser.add_subparsers(dest='step')

  run = subparsers.add_parser('run', help='Run the whole benchmark (the default).')
  run.add_argument('--data-dir', default=str(DEFAULT_DATA_DIR), help='Class-folder data root.')
  run.add_argument('--out', default=str(DEFAULT_OUT), help='Output folder.')
  run.add_argument('--config', default=DEFAULT_CONFIG, help='flax-pet config file.')
  run.add_argument(
      '--weights-seed', type=int, default=0, help='Seed of the random backbone weights.'
  )
  run.add_argument(
      '--num-epochs', type=int, default=None,
      help="Override the config's num_epochs, e.g. 2 for a quick check.",
  )
  run.add_argument(
      '--reuse', action='store_true',
      help='Reuse finished runs in OUT/flax and OUT/keras instead of training again.',
  )
  run.add_argument('--skip-keras', action='store_true', help='Do not run the Keras recipe.')

  weights = subparsers.add_parser('make-weights', help='Write seeded random Keras IRV2 weights.')
  weights.add_argument('--output', required=True, help='The .h5 file to write.')
  weights.add_argument('--seed', type=int, default=0, help='Random seed.')
  weights.add_argument(
      '--image-size', type=int, default=224, help='Input size of the model, in pixels.'
  )

  predictions = subparsers.add_parser(
      'flax-predictions', help="Export a flax-pet run's val/test predictions."
  )
  predictions.add_argument('--workdir', required=True, help='flax-pet workdir.')
  predictions.add_argument('--output', required=True, help='JSON file to write.')
  predictions.add_argument(
      '--data-dir', default=None, help="Data root; default: the run's config.data_dir."
  )

  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or (argv[0].startswith('-') and argv[0] not in ('-h', '--help')):
    argv = ['run', *argv]
  return parser.parse_args(argv)


def main(argv=None) -> int:
  logging.basicConfig(
      level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s', force=True
  )
  # Orbax logs every checkpoint operation through absl at INFO.
  logging.getLogger('absl').setLevel(logging.WARNING)
  args = parse_args(argv)
  # keras_recipe.py sits next to this file.
  sys.path.insert(0, str(REPO_ROOT / 'benchmarks'))

  if args.step == 'make-weights':
    make_weights(Path(args.output), args.seed, args.image_size)
    return 0
  if args.step == 'flax-predictions':
    data_dir = Path(args.data_dir) if args.data_dir else None
    export_flax_predictions(Path(args.workdir), Path(args.output), data_dir)
    return 0
  try:
    run_benchmark(args)
  except (FileNotFoundError, RuntimeError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
