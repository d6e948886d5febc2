"""flax-pet: train, evaluate and explain 2D PET image classifiers in JAX/Flax.

The backbone is InceptionResNetV2 with RadImageNet weights converted from
Keras. Research use only; not for clinical decisions.
"""

import logging

from flax_pet.models import Classifier
from flax_pet.models import ClassifierHead
from flax_pet.models import InceptionResNetV2
from flax_pet.pretrained import load_backbone
from flax_pet.pretrained import load_pretrained
from flax_pet.preprocessing import preprocess

__version__ = '0.1.0'


def setup_logging() -> None:
  """Log INFO and above to stderr with timestamps, as the scripts do.

  Orbax logs every checkpoint step through absl at INFO; only its warnings
  are kept.
  """
  logging.basicConfig(
      level=logging.INFO,
      format='%(asctime)s %(levelname)s %(name)s: %(message)s',
      force=True,
  )
  logging.getLogger('absl').setLevel(logging.WARNING)
