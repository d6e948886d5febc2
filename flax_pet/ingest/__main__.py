"""Entry point of `python -m flax_pet.ingest`."""

import sys

from flax_pet.ingest.cli import main

if __name__ == '__main__':
  sys.exit(main())
