"""flax-pet: train, evaluate and explain 2D PET image classifiers in JAX/Flax.

The backbone is InceptionResNetV2 with RadImageNet weights converted from
Keras. Research use only; not for clinical decisions.
"""

from flax_pet.models import Classifier
from flax_pet.models import ClassifierHead
from flax_pet.models import InceptionResNetV2
from flax_pet.pretrained import load_backbone
from flax_pet.pretrained import load_pretrained
from flax_pet.preprocessing import preprocess

__version__ = '0.1.0'
