"""Predict classes of unlabeled images: `python predict.py --workdir DIR INPUT...`.

INPUT is any mix of image files and folders (searched recursively), such as
the 16-bit PNGs written by `python -m flax_pet.ingest`. Writes a CSV with one
row per file: path, status, reason, predicted class and one probability
column per class.
"""

import argparse
import sys

import flax_pet

from flax_pet import evaluation


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('inputs', nargs='+', help='Image files or folders.')
  parser.add_argument('--workdir', required=True, help='The train.py workdir.')
  parser.add_argument('--output', default='predictions.csv', help='CSV file to write.')
  parser.add_argument('--checkpoint', default='best',
                      help="'best' (default), 'latest', or a saved epoch number (0-based).")
  parser.add_argument('--gradcam', default=None, metavar='DIR',
                      help='Also save a Grad-CAM overlay for every image into DIR.')
  parser.add_argument('--batch_size', type=int, default=16, help='Images per forward pass.')
  parser.add_argument('--strict', action='store_true',
                      help='Stop at the first file that cannot be decoded.')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  flax_pet.setup_logging()
  args = parse_args(argv)
  try:
    skipped = evaluation.predict_files(
        args.workdir, args.inputs, args.output, checkpoint=args.checkpoint,
        gradcam_dir=args.gradcam, batch_size=args.batch_size, strict=args.strict,
    )
  except (FileNotFoundError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  print(f'Wrote {args.output}' + (f'; {len(skipped)} file(s) skipped, see its reason column.' if skipped else '.'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
