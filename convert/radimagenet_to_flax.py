"""Convert RadImageNet's Keras InceptionResNetV2 weights to a Flax checkpoint.

Usage:

  python convert/radimagenet_to_flax.py --h5 RadImageNet-IRV2_notop.h5 \
      --output weights/radimagenet_irv2 [--verify]

Also accepts a whole saved Keras model (backbone plus Dense head, as the
reference notebook's `frozen_model.h5`); the head is converted too.
"""

import argparse
import logging
import sys

import flax_pet
from flax_pet import keras_weights
from flax_pet import preprocessing
from flax_pet import pretrained
from flax_pet import verify

logger = logging.getLogger('radimagenet_to_flax')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--h5', required=True, help='Keras .h5 weight file to convert.')
  parser.add_argument('--output', required=True, help='Folder to write (must not exist).')
  parser.add_argument(
      '--input-convention', choices=preprocessing.CONVENTIONS, default=None,
      help="Pixel mapping the weights expect, stored with them. Default: "
      "'radimagenet' for a backbone-only file, 'unit' for a whole model "
      "saved by the reference notebook.",
  )
  parser.add_argument('--overwrite', action='store_true', help='Replace an existing --output folder.')
  parser.add_argument(
      '--verify', action='store_true',
      help='Also run Keras (TensorFlow backend) on the same file and print the '
      'max abs difference of the outputs on a seeded random batch.',
  )
  parser.add_argument('--image-size', type=int, default=224, help='Image size for --verify, in pixels.')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  flax_pet.setup_logging()
  args = parse_args(argv)

  try:
    converted = keras_weights.convert_h5(args.h5)
    convention = args.input_convention or pretrained.default_convention(
        converted.provenance['source_kind']
    )
    output = pretrained.save_converted(converted, args.output, convention, args.overwrite)
  except (keras_weights.WeightFileError, FileExistsError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1

  print(
      f'Converted {converted.provenance["layer_count"]} layers '
      f'({converted.provenance["value_count"]:,} values) from {args.h5} to {output} '
      f'(input convention {convention!r}).'
  )
  if args.verify:
    return verify.report(args.h5, output, args.image_size)
  return 0


if __name__ == '__main__':
  sys.exit(main())
