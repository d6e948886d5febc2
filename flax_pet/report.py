"""Evaluation plots and a self-contained HTML report.

The plots read the dict that `flax_pet.metrics.evaluate_classification`
returns (with `include_curves=True`) and a run's `metrics.jsonl`. They are
drawn with matplotlib's object API on the Agg canvas, so no display and no
global pyplot state are involved.

`write_report` writes the PNG plots and `report.html` into one folder. The
HTML embeds every image as a base64 data URI and its CSS inline, and has no
scripts and no links, so it opens offline and can be sent as a single file.
"""

import base64
from collections.abc import Sequence
import datetime
import html
import json
import logging
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
import numpy as np

logger = logging.getLogger(__name__)

REPORT_FILE = 'report.html'
DEFAULT_TITLE = 'flax-pet evaluation report'
RESEARCH_USE_NOTE = (
    'Research use only. This model and report are not a medical device and '
    'must not be used for diagnosis or any other clinical decision.'
)

# File names of the plots inside the report folder.
CONFUSION_PLOT = 'confusion_matrix.png'
ROC_PLOT = 'roc_curves.png'
PR_PLOT = 'precision_recall_curves.png'
RELIABILITY_PLOT = 'reliability_diagram.png'
TRAINING_PLOT = 'training_curves.png'

# Decimals of the numbers shown in the HTML tables.
DIGITS = 4

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_DPI = 100

# Headline metrics of the report, as (key in the metrics dict, label).
_SUMMARY_ROWS = (
    ('accuracy', 'Accuracy'),
    ('macro_recall', 'Balanced accuracy (macro recall)'),
    ('macro_precision', 'Macro precision'),
    ('macro_f1', 'Macro F1'),
    ('weighted_f1', 'Weighted F1'),
    ('macro_roc_auc', 'Macro ROC AUC (one-vs-rest)'),
    ('macro_average_precision', 'Macro average precision'),
    ('log_loss', 'Log loss'),
    ('ece', 'Expected calibration error'),
)

_PER_CLASS_COLUMNS = (
    ('precision', 'Precision'),
    ('recall', 'Recall'),
    ('f1', 'F1'),
    ('roc_auc', 'ROC AUC'),
    ('average_precision', 'Average precision'),
)


def plot_confusion_matrix(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
  """Plot the confusion matrix as counts and as row-normalized fractions.

  Args:
    metrics: the `evaluate_classification` output.
    path: the PNG file to write.

  Returns:
    The path written.
  """
  class_names = metrics['class_names']
  counts = np.asarray(metrics['confusion_matrix']['matrix'], np.int64)
  support = counts.sum(axis=1, keepdims=True)
  fractions = np.divide(counts, support, out=np.zeros(counts.shape),
                        where=support > 0)

  size = 2.5 + 0.6 * len(class_names)
  figure = Figure(figsize=(2 * size + 1.0, size))
  for index, (values, title, text_format) in enumerate((
      (counts, 'Counts', '{:d}'),
      (fractions, 'Row-normalized (recall on the diagonal)', '{:.2f}'),
  )):
    axes = figure.add_subplot(1, 2, index + 1)
    scale = fractions if index else counts / max(counts.max(), 1)
    axes.imshow(scale, cmap='Blues', vmin=0.0, vmax=1.0)
    for row in range(len(class_names)):
      for col in range(len(class_names)):
        colour = 'white' if scale[row, col] > 0.5 else 'black'
        axes.text(col, row, text_format.format(values[row, col]),
                  ha='center', va='center', color=colour, fontsize=9)
    _label_classes(axes, class_names)
    axes.set_title(title, fontsize=10)
  figure.suptitle(f'Confusion matrix (n = {metrics["n"]})', fontsize=11)
  return _save(figure, path)


def plot_roc_curves(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
  """Plot one-vs-rest ROC curves with each class's AUC and its interval.

  Args:
    metrics: the `evaluate_classification` output with curves.
    path: the PNG file to write.

  Returns:
    The path written.
  """
  curves = _curves(metrics, 'roc')
  figure = Figure(figsize=(6.0, 5.5))
  axes = figure.add_subplot()
  axes.plot([0, 1], [0, 1], color='grey', linestyle='--', linewidth=1,
            label='chance')
  for name, curve in curves.items():
    if curve is None:
      axes.plot([], [], ' ', label=f'{name}: undefined (one label only)')
      continue
    entry = metrics['per_class'][name]['roc_auc']
    axes.plot(curve['fpr'], curve['tpr'], linewidth=1.5,
              label=f'{name}: AUC {_value_with_ci(entry)}')
  axes.set_xlim(0, 1)
  axes.set_ylim(0, 1.01)
  axes.set_xlabel('False positive rate (1 - specificity)')
  axes.set_ylabel('True positive rate (sensitivity)')
  axes.set_title(f'ROC curves, one class vs the rest ({_ci_label(metrics)})',
                 fontsize=10)
  axes.legend(loc='lower right', fontsize=8)
  return _save(figure, path)


def plot_pr_curves(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
  """Plot one-vs-rest precision-recall curves with average precision.

  A dotted line per class marks its prevalence, the precision of a random
  classifier.

  Args:
    metrics: the `evaluate_classification` output with curves.
    path: the PNG file to write.

  Returns:
    The path written.
  """
  curves = _curves(metrics, 'pr')
  figure = Figure(figsize=(6.0, 5.5))
  axes = figure.add_subplot()
  for name, curve in curves.items():
    if curve is None:
      axes.plot([], [], ' ', label=f'{name}: undefined (one label only)')
      continue
    entry = metrics['per_class'][name]['average_precision']
    (line,) = axes.step(curve['recall'], curve['precision'], where='post',
                        linewidth=1.5,
                        label=f'{name}: AP {_value_with_ci(entry)}')
    prevalence = metrics['per_class'][name]['support'] / metrics['n']
    axes.axhline(prevalence, color=line.get_color(), linestyle=':',
                 linewidth=1)
  axes.set_xlim(0, 1)
  axes.set_ylim(0, 1.01)
  axes.set_xlabel('Recall (sensitivity)')
  axes.set_ylabel('Precision (positive predictive value)')
  axes.set_title('Precision-recall curves, one class vs the rest\n'
                 f'(dotted: prevalence; {_ci_label(metrics)})', fontsize=10)
  axes.legend(loc='lower left', fontsize=8)
  return _save(figure, path)


def plot_reliability(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
  """Plot the top-label reliability diagram and the confidence histogram.

  Args:
    metrics: the `evaluate_classification` output with reliability bins.
    path: the PNG file to write.

  Returns:
    The path written.

  Raises:
    ValueError: if the metrics have no reliability bins.
  """
  bins = metrics.get('reliability')
  if bins is None:
    raise ValueError(
        'The metrics have no reliability bins; call evaluate_classification '
        'with include_curves=True.'
    )
  edges = np.asarray(bins['bin_edges'])
  centres = (edges[:-1] + edges[1:]) / 2
  widths = np.diff(edges)
  filled = [k for k, count in enumerate(bins['count']) if count]

  figure = Figure(figsize=(6.0, 7.0))
  axes = figure.add_subplot(4, 1, (1, 3))
  axes.plot([0, 1], [0, 1], color='grey', linestyle='--', linewidth=1,
            label='perfect calibration')
  axes.bar(centres[filled], [bins['accuracy'][k] for k in filled],
           width=widths[filled], edgecolor='black', alpha=0.7,
           label='accuracy in bin')
  axes.plot([bins['confidence'][k] for k in filled],
            [bins['accuracy'][k] for k in filled], 'o', color='tab:red',
            markersize=4, label='(mean confidence, accuracy)')
  axes.set_xlim(0, 1)
  axes.set_ylim(0, 1.01)
  axes.set_ylabel('Accuracy')
  axes.legend(loc='upper left', fontsize=8)
  axes.set_title(f'Reliability diagram: ECE {_value_with_ci(metrics["ece"])}'
                 f'\n({len(widths)} equal-width bins, top-label confidence)',
                 fontsize=10)

  histogram = figure.add_subplot(4, 1, 4, sharex=axes)
  histogram.bar(centres, bins['count'], width=widths, edgecolor='black',
                color='tab:grey')
  histogram.set_xlabel('Confidence (largest predicted probability)')
  histogram.set_ylabel('Images')
  return _save(figure, path)


def read_history(path: str | os.PathLike | None) -> list[dict[str, Any]]:
  """Read a run's `metrics.jsonl`, one JSON object per epoch.

  Lines that are not valid JSON objects (such as a line cut short when a run
  was killed) are skipped with a warning. If an epoch occurs twice, the later
  line wins, as a resumed run appends it, and a warning names the epoch.

  Args:
    path: the file, or None.

  Returns:
    The rows sorted by 'epoch'; [] if path is None or the file does not
    exist.
  """
  if path is None or not Path(path).is_file():
    if path is not None:
      logger.warning('No training history at %s; the report has no training '
                     'curves.', path)
    return []

  rows = {}
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        logger.warning('Skipping line %d of %s: invalid JSON (%s).', number,
                       path, error)
        continue
      if not isinstance(row, dict) or 'epoch' not in row:
        logger.warning('Skipping line %d of %s: not an object with an '
                       "'epoch' key.", number, path)
        continue
      if row['epoch'] in rows:
        logger.warning('Epoch %s occurs twice in %s; using line %d.',
                       row['epoch'], path, number)
      rows[row['epoch']] = row
  return [rows[epoch] for epoch in sorted(rows)]


def plot_training_curves(
    history: Sequence[dict[str, Any]], path: str | os.PathLike
) -> Path | None:
  """Plot loss, accuracy and learning rate per epoch, train and validation.

  Args:
    history: rows of `read_history`, with keys epoch, train_loss,
      train_accuracy, val_loss, val_accuracy and learning_rate; a missing key
      leaves that line out.
    path: the PNG file to write.

  Returns:
    The path written, or None if history is empty.
  """
  if not history:
    return None

  figure = Figure(figsize=(12.0, 3.8))
  panels = (
      ('Loss', (('train_loss', 'train'), ('val_loss', 'validation'))),
      ('Accuracy', (('train_accuracy', 'train'),
                    ('val_accuracy', 'validation'))),
      ('Learning rate', (('learning_rate', 'learning rate'),)),
  )
  for index, (title, series) in enumerate(panels):
    axes = figure.add_subplot(1, 3, index + 1)
    for key, label in series:
      points = [(row['epoch'], row[key]) for row in history
                if row.get(key) is not None]
      if points:
        epochs, values = zip(*points)
        axes.plot(epochs, values, marker='o', markersize=3, label=label)
    axes.set_xlabel('Epoch (as numbered in metrics.jsonl)')
    axes.set_title(title, fontsize=10)
    if title == 'Learning rate':
      axes.set_yscale('log')
    else:
      axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
  return _save(figure, path)


def write_report(
    output_dir: str | os.PathLike,
    metrics: dict[str, Any],
    class_names: Sequence[str],
    *,
    history_path: str | os.PathLike | None = None,
    gradcam_images: Sequence[str | os.PathLike] = (),
    pointing_game: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    title: str = DEFAULT_TITLE,
) -> Path:
  """Write the evaluation plots and a self-contained `report.html`.

  Args:
    output_dir: folder of the report and its PNG plots; created if needed.
    metrics: the `evaluate_classification` output, with curves.
    class_names: class names in class-index order; must equal
      metrics['class_names'].
    history_path: the run's metrics.jsonl; a missing file gives a report
      without training curves.
    gradcam_images: Grad-CAM overlay PNG files to embed as a gallery.
    pointing_game: the `flax_pet.explain.pointing_game` output.
    provenance: what produced the numbers, such as the weights source and
      sha256, the checkpoint and the config; shown as a table, nested values
      as JSON.
    dataset: what was evaluated, such as {'name': ..., 'split': 'test',
      'data_dir': ...}; shown above the metrics with n.
    title: the report's heading.

  Returns:
    The path of report.html.

  Raises:
    ValueError: if class_names differ from the metrics, the metrics lack
      curves, or a Grad-CAM image is not a PNG file.
    FileNotFoundError: if a Grad-CAM image does not exist.
  """
  class_names = [str(name) for name in class_names]
  if class_names != metrics['class_names']:
    raise ValueError(
        f'class_names {class_names} differ from the metrics\' class names '
        f'{metrics["class_names"]}; pass the names the metrics were '
        'computed with.'
    )
  if 'curves' not in metrics or 'reliability' not in metrics:
    raise ValueError(
        'The metrics have no curves; call evaluate_classification with '
        'include_curves=True.'
    )
  gallery = [(Path(p).stem, _read_png(p)) for p in gradcam_images]

  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  plots = [
      ('Confusion matrix', plot_confusion_matrix(metrics,
                                                 output_dir / CONFUSION_PLOT)),
      ('ROC curves', plot_roc_curves(metrics, output_dir / ROC_PLOT)),
      ('Precision-recall curves', plot_pr_curves(metrics,
                                                 output_dir / PR_PLOT)),
      ('Reliability diagram', plot_reliability(metrics,
                                               output_dir / RELIABILITY_PLOT)),
  ]
  training_plot = plot_training_curves(read_history(history_path),
                                       output_dir / TRAINING_PLOT)

  sections = [
      _header_section(title, metrics, dataset),
      _summary_section(metrics),
      _per_class_section(metrics),
      _plots_section('Plots', [(label, path.read_bytes())
                               for label, path in plots]),
  ]
  if training_plot is not None:
    sections.append(_plots_section('Training curves', [
        ('Loss, accuracy and learning rate per epoch',
         training_plot.read_bytes())]))
  else:
    sections.append('<h2>Training curves</h2>\n<p>No training history '
                    '(metrics.jsonl) was given or found.</p>')
  if pointing_game is not None:
    sections.append(_pointing_game_section(pointing_game))
  if gallery:
    sections.append(_plots_section('Grad-CAM overlays', gallery,
                                   css_class='gallery'))
  sections.append(_provenance_section(provenance))

  path = output_dir / REPORT_FILE
  path.write_text(_page(title, sections), encoding='utf-8')
  logger.info('Wrote the evaluation report to %s', path)
  return path


def _label_classes(axes, class_names):
  ticks = range(len(class_names))
  axes.set_xticks(ticks, class_names, rotation=30, ha='right', fontsize=8)
  axes.set_yticks(ticks, class_names, fontsize=8)
  axes.set_xlabel('Predicted class')
  axes.set_ylabel('True class')


def _curves(metrics, kind):
  curves = metrics.get('curves')
  if curves is None:
    raise ValueError(
        'The metrics have no curve points; call evaluate_classification with '
        'include_curves=True.'
    )
  return curves[kind]


def _save(figure: Figure, path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.tight_layout()
  figure.savefig(path, format='png', dpi=_DPI)
  return path


def _number(value) -> str:
  return 'n/a' if value is None else f'{value:.{DIGITS}f}'


def _value_with_ci(entry) -> str:
  text = _number(entry['value'])
  if entry.get('ci_low') is not None:
    text += f' [{_number(entry["ci_low"])}, {_number(entry["ci_high"])}]'
  return text


def _ci_label(metrics) -> str:
  confidence = metrics['methods']['confidence']
  if not metrics['methods']['n_resamples']:
    return 'no confidence intervals'
  return f'{100 * confidence:g}% bootstrap CI in brackets'


def _read_png(path) -> bytes:
  data = Path(path).read_bytes()
  if not data.startswith(_PNG_SIGNATURE):
    raise ValueError(f'Grad-CAM image {path} is not a PNG file.')
  return data


def _data_uri(png: bytes) -> str:
  return 'data:image/png;base64,' + base64.b64encode(png).decode('ascii')


def _cell(value, metric: str, field: str) -> str:
  return (f'<td data-metric="{html.escape(metric)}" data-field="{field}">'
          f'{_number(value)}</td>')


def _header_section(title, metrics, dataset) -> str:
  created = datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')
  rows = [('Images evaluated (n)', str(metrics['n'])),
          ('Classes', ', '.join(metrics['class_names']))]
  for key, value in (dataset or {}).items():
    rows.append((str(key), _text(value)))
  rows.append(('Report created', created))
  table = ''.join(f'<tr><th>{html.escape(key)}</th><td>{html.escape(value)}'
                  '</td></tr>' for key, value in rows)
  return (f'<h1>{html.escape(title)}</h1>\n'
          f'<p class="note">{html.escape(RESEARCH_USE_NOTE)}</p>\n'
          f'<h2>Dataset</h2>\n<table class="keyvalue">{table}</table>')


def _summary_section(metrics) -> str:
  methods = metrics['methods']
  percent = f'{100 * methods["confidence"]:g}%'
  rows = []
  for key, label in _SUMMARY_ROWS:
    entry = metrics[key]
    wilson = '<td></td>'
    if 'wilson_ci_low' in entry:
      wilson = (f'<td data-metric="{key}" data-field="wilson_ci">'
                f'{_number(entry["wilson_ci_low"])}, '
                f'{_number(entry["wilson_ci_high"])}</td>')
    rows.append(
        f'<tr><th>{html.escape(label)}</th>'
        + _cell(entry['value'], key, 'value')
        + _cell(entry['ci_low'], key, 'ci_low')
        + _cell(entry['ci_high'], key, 'ci_high')
        + f'{wilson}<td>{entry["n"]}</td></tr>'
    )
  if methods['n_resamples']:
    method = (f'{percent} confidence intervals: {methods["confidence_interval"]}'
              f', {methods["n_resamples"]} resamples, seed {methods["seed"]}. '
              f'{methods["wilson"]}.')
  else:
    method = 'No bootstrap confidence intervals were computed (n_resamples=0).'
  notes = [method, f'ECE: {methods["ece"]}.',
           f'Prediction: {methods["prediction"]}.']
  if metrics['undefined_classes']:
    notes.append(
        f'ROC AUC and average precision are undefined for '
        f'{", ".join(metrics["undefined_classes"])} (no positive or no '
        'negative samples) and left out of the macro means.')
  header = (f'<tr><th>Metric</th><th>Value</th><th>{percent} CI low</th>'
            f'<th>{percent} CI high</th><th>Wilson {percent} CI</th>'
            '<th>n</th></tr>')
  notes_html = ''.join(f'<p class="small">{html.escape(n)}</p>' for n in notes)
  return (f'<h2>Metrics</h2>\n<table id="metrics">{header}{"".join(rows)}'
          f'</table>\n{notes_html}')


def _per_class_section(metrics) -> str:
  header = '<tr><th>Class</th><th>Support</th>' + ''.join(
      f'<th>{label}</th>' for _, label in _PER_CLASS_COLUMNS) + '</tr>'
  rows = []
  for name in metrics['class_names']:
    entry = metrics['per_class'][name]
    cells = []
    for key, _ in _PER_CLASS_COLUMNS:
      metric = f'{name}/{key}'
      value = entry[key]
      cells.append(
          f'<td data-metric="{html.escape(metric)}" data-field="value_with_ci">'
          f'{_value_with_ci(value)}</td>')
    rows.append(f'<tr><th>{html.escape(name)}</th><td>{entry["support"]}</td>'
                + ''.join(cells) + '</tr>')
  return ('<h2>Per class (one vs the rest)</h2>\n<p class="small">Value '
          '[CI low, CI high]. Recall of a class is its sensitivity.</p>\n'
          f'<table id="per-class">{header}{"".join(rows)}</table>')


def _plots_section(heading, images, css_class='plots') -> str:
  figures = ''.join(
      f'<figure><img src="{_data_uri(png)}" alt="{html.escape(label)}">'
      f'<figcaption>{html.escape(label)}</figcaption></figure>'
      for label, png in images)
  return f'<h2>{html.escape(heading)}</h2>\n<div class="{css_class}">{figures}</div>'


def _pointing_game_section(result) -> str:
  parts = ['<h2>Grad-CAM pointing game</h2>']
  settings = (f'Hit: the heatmap maximum lies within {result["tolerance_px"]:g}'
              f' px of the tumour mask, at {result["image_size"][0]}x'
              f'{result["image_size"][1]} px input ({result["resize"]}). '
              f'{result["n_scored"]} of {result["n_images"]} images scored.')
  parts.append(f'<p>{html.escape(settings)}</p>')

  hit_rate, baseline = result['hit_rate'], result['baseline']
  percent = f'{100 * result["confidence"]:g}%'
  if hit_rate is None:
    parts.append('<p>No image had a usable mask, so nothing was scored.</p>')
  else:
    parts.append(
        '<table id="pointing-game"><tr><th></th><th>Value</th>'
        f'<th>{percent} CI low</th><th>{percent} CI high</th><th>n</th></tr>'
        '<tr><th>Hit rate (Wilson CI)</th>'
        + _cell(hit_rate['value'], 'hit_rate', 'value')
        + _cell(hit_rate['ci_low'], 'hit_rate', 'ci_low')
        + _cell(hit_rate['ci_high'], 'hit_rate', 'ci_high')
        + f'<td>{hit_rate["n"]}</td></tr>'
        '<tr><th>Random baseline (mean mask fraction)</th>'
        + _cell(baseline['value'], 'baseline', 'value')
        + _cell(baseline['ci_low'], 'baseline', 'ci_low')
        + _cell(baseline['ci_high'], 'baseline', 'ci_high')
        + f'<td>{baseline["n"]}</td></tr></table>'
        f'<p class="small">Baseline: {html.escape(baseline["method"])}; '
        f'sd {_number(baseline["sd"])}, range {_number(baseline["min"])} to '
        f'{_number(baseline["max"])}.</p>')

  for key, label in (
      ('missing_masks', 'without a mask file (not scored)'),
      ('empty_masks', 'with an empty mask (not scored)'),
      ('empty_after_resize', 'with a mask that is empty at the input size '
                             '(not scored)'),
      ('flat_heatmaps', 'with a flat heatmap (counted as misses)'),
      ('peak_on_padding', 'with the heatmap maximum on the padding (counted '
                          'as misses)'),
  ):
    names = result.get(key) or []
    if names:
      items = ''.join(f'<li>{html.escape(n)}</li>' for n in names)
      parts.append(f'<details><summary>{len(names)} images {label}</summary>'
                   f'<ul>{items}</ul></details>')
  return '\n'.join(parts)


def _provenance_section(provenance) -> str:
  if not provenance:
    return '<h2>Provenance</h2>\n<p>No provenance was given.</p>'
  rows = []
  for key, value in provenance.items():
    if isinstance(value, (dict, list, tuple)):
      content = (f'<details><summary>{len(value)} entries</summary><pre>'
                 f'{html.escape(_text(value))}</pre></details>')
    else:
      content = html.escape(_text(value))
    rows.append(f'<tr><th>{html.escape(str(key))}</th><td>{content}</td></tr>')
  return ('<h2>Provenance</h2>\n<table class="keyvalue" id="provenance">'
          f'{"".join(rows)}</table>')


def _text(value) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(value, indent=2, sort_keys=True, default=str)
  return str(value)


_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
td { font-variant-numeric: tabular-nums; }
.note { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; }
.small { font-size: 0.85em; color: #555; }
.plots img { max-width: 100%; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.5em; }
.gallery figure { width: 320px; margin: 0; }
.gallery img { width: 100%; }
figcaption { font-size: 0.8em; color: #555; }
pre { font-size: 0.8em; white-space: pre-wrap; }
"""


def _page(title, sections) -> str:
  body = '\n'.join(sections)
  return (
      '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
      f'<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n'
      f'<body>\n{body}\n</body>\n</html>\n'
  )
