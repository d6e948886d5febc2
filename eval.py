"""Evaluate a trained classifier: `python eval.py --workdir DIR`.

Writes metrics.json (every headline metric with a 95% bootstrap CI and n),
predictions.csv and a self-contained report.html to DIR/eval (or --output),
and prints a classification report.
"""

import argparse
import sys

import flax_pet

from flax_pet import evaluation
from flax_pet import metrics


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='The train.py workdir.')
  parser.add_argument('--checkpoint', default='best',
                      help="'best' (default), 'latest', or a saved epoch number (0-based).")
  parser.add_argument('--data_dir', default=None,
                      help="A class-folder dataset to evaluate instead of the run's own split; "
                      "its class names must equal the model's.")
  parser.add_argument('--split', default='test', help='Split to evaluate (default: test).')
  parser.add_argument('--output', default=None, help='Output folder (default: WORKDIR/eval).')
  parser.add_argument('--gradcam', type=int, default=0, metavar='N',
                      help='Save N Grad-CAM overlays per class.')
  parser.add_argument('--masks', default=None,
                      help='Folder of tumour masks named like the images; adds the pointing game.')
  parser.add_argument('--resamples', type=int, default=metrics.DEFAULT_RESAMPLES,
                      help='Bootstrap resamples for the confidence intervals.')
  parser.add_argument('--batch_size', type=int, default=16, help='Images per forward pass.')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  flax_pet.setup_logging()
  args = parse_args(argv)
  try:
    result = evaluation.evaluate_run(
        args.workdir, checkpoint=args.checkpoint, data_dir=args.data_dir, split=args.split,
        output_dir=args.output, gradcam_per_class=args.gradcam, mask_dir=args.masks,
        n_resamples=args.resamples, batch_size=args.batch_size,
    )
  except (FileNotFoundError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  print(metrics.classification_report_text(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
