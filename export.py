"""Export a trained classifier for serving outside JAX: `python export.py --workdir DIR --output OUT`.

Writes a serialized `jax.export` (StableHLO) function from RGB float32 pixels
in 0..255 (NHWC, any batch size) to class probabilities, with its input
convention applied inside, plus classifier.json. `--saved_model` adds a
TensorFlow SavedModel made with jax2tf.
"""

import argparse
import sys

import flax_pet

from flax_pet import evaluation
from flax_pet import export


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='The train.py workdir.')
  parser.add_argument('--output', required=True, help='Export folder.')
  parser.add_argument('--checkpoint', default='best',
                      help="'best' (default), 'latest', or a saved epoch number (0-based).")
  parser.add_argument('--platforms', nargs='*', default=None,
                      help="Lowering platforms such as 'cpu cuda' (default: this machine's).")
  parser.add_argument('--saved_model', action='store_true', help='Also write a TensorFlow SavedModel.')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  flax_pet.setup_logging()
  args = parse_args(argv)
  try:
    trained = evaluation.load_trained(args.workdir, args.checkpoint)
  except (FileNotFoundError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  output = export.export_classifier(
      args.output, trained.backbone, trained.head, trained.class_names,
      trained.input_convention, trained.image_size, resize=trained.resize,
      platforms=args.platforms, saved_model=args.saved_model,
      provenance={'workdir': str(trained.workdir), 'checkpoint': trained.checkpoint,
                  'weights': trained.config.get('weights_provenance')},
  )
  print(f'Exported the {trained.checkpoint} classifier to {output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
